"""The repository's top-level `kernels/` folder (installed as ``stepcoder.kernels``) must not stand in for
Hugging Face's `kernels` package when Python starts in a clone's root, where the root comes first on
sys.path: transformers imports `kernels` when that package is installed, and found this folder instead
("cannot import name ... from 'kernels'"), so `from transformers import GPT2LMHeadModel` failed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_in_root(arguments: list[str], extra_path: Path | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


STAND_IN = '''__version__ = "0.17.2"
HUB = True


class Anything:
    """Whatever transformers takes from the package: a name, a decorator factory, a decorator."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else Anything()

    def __getattr__(self, name):
        return Anything()


def __getattr__(name):
    return Anything
'''


def hub_kernels(directory: Path) -> Path:
    """A stand-in for Hugging Face's `kernels` 0.17 install: a package with its distribution metadata (which
    is what transformers checks before importing it), answering any name transformers imports from it."""
    package = directory / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(STAND_IN)
    info = directory / "kernels-0.17.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.17.2\n")
    return directory


@pytest.mark.parametrize("installed", [False, True], ids=["without-hub-kernels", "with-hub-kernels"])
def test_transformers_and_the_trainer_import_from_the_repository_root(installed, tmp_path):
    pytest.importorskip("transformers")
    extra = hub_kernels(tmp_path / "site") if installed else None
    # one interpreter (a start costs ~6 s): the imports, then the trainer's command line as `python -m` runs it
    done = run_in_root(["-c", "from transformers import GPT2LMHeadModel\nimport kernels\n"
                               "print('hub' if getattr(kernels, 'HUB', False) else 'none' if kernels.__file__ is None "
                               "else kernels.__file__)\nfrom stepcoder import kernels as ours\n"
                               "print(ours.ppo_policy_loss)\nimport runpy, sys\nsys.argv = ['train', '--help']\n"
                               "runpy.run_module('stepcoder.train', run_name='__main__', alter_sys=True)"], extra)
    assert done.returncode == 0, done.stderr[-3000:]
    found, ours, *trainer = done.stdout.splitlines()
    if installed:
        assert found == "hub"
    else:  # transformers >= 5.25 requires the real hub package, so it may be installed; never the repository's
        assert found == "none" or Path(found).resolve().parent != (ROOT / "kernels").resolve(), found
    assert ours.startswith("<function ppo_policy_loss")
    assert "--rollout_engine" in "\n".join(trainer), done.stdout[-3000:]
