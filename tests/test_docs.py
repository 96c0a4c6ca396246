"""The documentation: README.md (the landing page) and the mkdocs site under docs/ (mkdocs.yml).

- The site builds with `mkdocs build --strict`, and the strict build fails on a broken link, a broken
  anchor and a nav entry to a missing page (each put into a copy of the pages).
- Every command a page shows in a shell block (```sh) is accounted for: one of CI's commands (`.ci/run`;
  every `pip` line must be one of them), one a named test runs (TESTED, checked against the test's
  source), one the page says below it was run by hand ("Run by hand on YYYY-MM-DD"), or one on the
  short NOT_RUN list whose page says "Not run as shown" and why.
- README.md stays a landing page (at most 200 lines) whose links resolve.

mkdocs and mkdocs-material come with the test extra (pyproject.toml). About 5 s on 2 cores.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
SHELL_FENCE = re.compile(r"^```(sh|bash|shell|console)\s*$")
RUN_BY_HAND = re.compile(r"Run by hand on (\d{4}-\d{2}-\d{2})")

# Page command -> the test that runs it (tests/FILE.py::NAME) and strings that test's file holds: what it
# runs (the flags, the entry point), on its own small inputs in place of the page's placeholder paths.
TESTED = {
    "python -m stepcoder.evaluate --canonical --data apps_plus:../shared/data/apps_plus/valid_all.json":
        ("tests/test_evaluate.py::test_canonical_with_difficulty_and_limit_from_the_command_line",
         ['"-m", "stepcoder.evaluate", "--canonical"']),
    "python -m stepcoder.evaluate --samples completions.jsonl --data humaneval --output out/":
        ("tests/test_evaluate.py::test_samples_of_each_failure_kind_end_to_end", ['evaluate.main(["--samples"', '"--output"']),
    "python -m stepcoder.evaluate --model ./checkpoint --n 10 --temperature 0.8 --top_p 0.95 --data mbpp:mbpp.jsonl":
        ("tests/test_evaluate.py::test_model_samples_are_generated_and_judged",
         ['evaluate.main(["--model"', '"--temperature", "0.8"']),
    "python -m stepcoder.evaluate --model run/checkpoint-80/reference run/checkpoint-80/policy --n 4 --output cmp/":
        ("tests/test_evaluate.py::test_a_checkpoints_reference_and_policy_are_judged_side_by_side",
         ['evaluate.main(["--model", reference, policy']),
    "python -m stepcoder.integrations.verl.prepare --data apps_plus:train.json --output train.parquet --cccs":
        ("tests/test_integrations.py::test_the_prepared_data_carries_every_cccs_stage", ['prepare.main(', '"--cccs"']),
    "python -m stepcoder.integrations.openrlhf --data apps_plus:train.json --output train.jsonl [--cccs]":
        ("tests/test_integrations.py::test_verl_and_openrlhf_score_as_evaluate_judges",
         ['openrlhf.main(["--data", f"apps_plus:']),
    "python tests/aot_compile.py":
        ("tests/test_kernels_compile.py::test_every_launch_compiles_for_real_gpus_without_spills", ['"aot_compile.py"']),
    "bash benchmarks/gpu_run.sh --dry-run":
        ("tests/test_gpu_run.py::test_the_device_script_runs_dry_on_the_cpu", ['"gpu_run.sh"', '"--dry-run"']),
    "mkdocs build --strict": ("tests/test_docs.py::test_the_site_builds_in_strict_mode", ['"build", "--strict"']),
}
# Commands that need what neither CI nor this project's machine has; the page must say "Not run as shown"
# below each, and why. Keyed by the command's start.
NOT_RUN = {
    "torchrun --nproc_per_node 8 -m stepcoder.train --model_name_or_path /models/": "8 GPUs of 80 GB and the model",
    "torchrun --nproc_per_node 8 -m stepcoder.train ... --sandbox_url": "GPU nodes and judge machines",
    "python -m stepcoder.train --advantage grpo --kl_in_loss": "a GPU and the model",
    "python -m stepcoder.train --advantage grpo --lora_r 16": "a GPU and the model",
    "python -m stepcoder.ablation --output_dir runs/ablation --seeds 3 --launcher": "8 GPUs and the model",
    "python -m verl.trainer.main_ppo": "veRL, which pins transformers < 5.11",
    "python -m openrlhf.cli.train_ppo_ray": "OpenRLHF",
    "OUT=results bash benchmarks/gpu_run.sh": "a GPU; not yet run on one",
}


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # material's end-of-life banner, not a warning of ours
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, timeout=120, env=env)


def test_the_site_builds_in_strict_mode(tmp_path):
    done = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    built = {path.parent.name for path in (tmp_path / "site").glob("*/index.html")}
    assert built == {page.stem for page in DOCS.glob("*.md") if page.stem != "index"}  # every page, in its folder


def broken_copy(tmp_path: Path, breakage: str) -> Path:
    shutil.copytree(DOCS, tmp_path / "docs")
    config = tmp_path / "mkdocs.yml"
    shutil.copy(ROOT / "mkdocs.yml", config)
    if breakage == "link":
        with open(tmp_path / "docs" / "reliability.md", "a") as page:
            page.write("\nSee [a page that does not exist](no-such-page.md).\n")
    elif breakage == "anchor":
        with open(tmp_path / "docs" / "reliability.md", "a") as page:
            page.write("\nSee [a section that does not exist](training.md#no-such-section).\n")
    else:  # a nav entry to a missing page
        config.write_text(config.read_text().rstrip("\n") + "\n  - Missing: no-such-page.md\n")
    return config


@pytest.mark.parametrize("breakage, words", [("link", "no-such-page.md"), ("anchor", "#no-such-section"),
                                             ("nav", "no-such-page.md")])
def test_a_broken_link_fails_the_strict_build(tmp_path, breakage, words):
    done = mkdocs_build(broken_copy(tmp_path, breakage), tmp_path / "site")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert words in output and "in strict mode" in output, output


def shown_commands(page: Path) -> list[tuple[str, str]]:
    """Each command in the page's shell blocks (continuation lines joined, comments and spacing
    dropped), with the text after its block up to the next shell block or heading."""
    lines = page.read_text().split("\n")
    found, index = [], 0
    while index < len(lines):
        if not SHELL_FENCE.match(lines[index]):
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        after = []
        for line in lines[end + 1:]:
            if SHELL_FENCE.match(line) or line.startswith("#"):
                break
            after.append(line)
        command = ""
        for line in lines[index + 1:end]:
            command += line.strip()
            if command.endswith("\\"):
                command = command[:-1] + " "
                continue
            command = " ".join(re.sub(r"(^|\s)#.*$", "", command).split())
            if command:
                found.append((command, "\n".join(after)))
            command = ""
        index = end + 1
    return found


def ci_commands() -> set[str]:
    return set(re.findall(r"^\w+='(.+)'$", (ROOT / ".ci" / "run").read_text(), re.M))


def test_every_command_shown_is_run_by_ci_a_test_or_by_hand():
    ci, problems, seen = ci_commands(), [], set()
    for page in PAGES:
        for command, after in shown_commands(page):
            where = f"{page.relative_to(ROOT)}: {command}"
            not_run = [start for start in NOT_RUN if command.startswith(start)]
            dates = RUN_BY_HAND.findall(after)
            if command in ci:
                seen.add(command)
            elif command.split()[0] == "pip":
                problems.append(f"{where}: a pip line that CI does not run (.ci/run)")
            elif command in TESTED:
                seen.add(command)
            elif dates:
                for date in dates:
                    if datetime.date.fromisoformat(date) > datetime.date.today():
                        problems.append(f"{where}: run by hand on {date}, a date still to come")
            elif not_run:
                seen.update(not_run)
                if "Not run as shown" not in after:
                    problems.append(f"{where}: on NOT_RUN, but the page does not say 'Not run as shown' below it")
            else:
                problems.append(f"{where}: no test runs it (TESTED), CI does not, and the page does not say "
                                "'Run by hand on YYYY-MM-DD' below it")
    assert not problems, "\n".join(problems)
    assert not set(TESTED) - seen and not set(NOT_RUN) - seen, "entries no page shows any more"


@pytest.mark.parametrize("command", sorted(TESTED))
def test_the_named_test_runs_the_command(command):
    node, evidence = TESTED[command]
    path, name = node.split("::")
    source = (ROOT / path).read_text()
    assert f"def {name}(" in source, node
    assert all(words in source for words in evidence), (node, [w for w in evidence if w not in source])


def test_pages_show_commands_in_fenced_blocks_only():
    """An indented code block would escape the check above: commands go in ```sh blocks."""
    for page in PAGES:
        fenced = False
        previous = ""
        for number, line in enumerate(page.read_text().split("\n"), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif not fenced and not previous.strip() and line.startswith("    ") and line.strip():
                pytest.fail(f"{page.relative_to(ROOT)}:{number}: an indented code block")
            previous = line


def test_the_readme_is_a_landing_page_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [target for target in targets if not re.match(r"\w+://", target)]
    assert {target for target in local if target.startswith("docs/")} == {
        f"docs/{page.name}" for page in DOCS.glob("*.md")}  # every page is linked from the landing page
    assert all((ROOT / target).exists() for target in local), [t for t in local if not (ROOT / t).exists()]
    for command in ci_commands():  # CI's commands, the test tiers among them, as .ci/run greps them
        assert command in text, command


def test_the_sites_copy_of_the_ablation_figure_is_the_benchmarks_own():
    assert (DOCS / "img" / "ablation_long.png").read_bytes() == (ROOT / "benchmarks" / "ablation_long.png").read_bytes()
