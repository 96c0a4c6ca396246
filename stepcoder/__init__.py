"""stepcoder: reinforcement learning from unit-test feedback for code language models (StepCoder).

Keep this module import-light: the sandbox (``stepcoder.sandbox``) must import without torch, and its
workers run under interpreters that may have nothing but the standard library.
"""

__version__ = "0.1.0"
