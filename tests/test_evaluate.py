"""End to end: `python -m stepcoder.evaluate` on deliberately wrong completions of each failure kind,
and on samples from a tiny model built offline."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from stepcoder import evaluate
from stepcoder.data import load_builtin

# Completions written after each function problem's starter code (`def entry(...):\n`).
KINDS = {
    "pass": None,  # the canonical body
    "compile_error": "    return (\n",
    "runtime_error": "    return 1 // 0\n",
    "wrong_answer": "    return 'surely not this'\n",
    "timeout": "    while True:\n        pass\n",
}


def _samples(tmp_path):
    problems = [p for p in load_builtin().problems if p.kind == "function"][:5]
    lines = []
    for problem, (kind, body) in zip(problems, KINDS.items()):
        if body is None:
            body = "```python\n" + problem.solutions[0] + "```\n"  # a whole answer in a fence also works
        lines.append({"task_id": problem.id, "completion": body})
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, problems


def test_samples_of_each_failure_kind_end_to_end(tmp_path):
    path, problems = _samples(tmp_path)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"\d+ problems have no samples"):
        summary = evaluate.main(["--samples", str(path), "--timeout", "0.5", "--workers", "2", "--output", str(out)])
    assert summary["num_problems"] == 5 and summary["num_programs"] == 5
    assert summary["pass@1"] == pytest.approx(0.2) and list(summary["pass@k"]) == ["1"]
    assert {v: n for v, n in summary["outcomes"].items() if n} == {kind: 1 for kind in KINDS}
    assert summary["failure_shares"]["compile_error"] == pytest.approx(0.25)
    assert summary["wall_timeouts"] == 0  # the spinning program is stopped by its CPU time
    report = json.loads((out / "report.json").read_text())
    assert report["wall_timeouts"] == 0
    assert report["pass@1"] == pytest.approx(0.2) and report["num_problems"] == 5
    assert set(report["by_difficulty"]) <= {"introductory", "interview"}
    verdicts = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert {(v["task_id"], v["verdict"]) for v in verdicts} == {(p.id, k) for p, k in zip(problems, KINDS)}
    assert (out / "outcomes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sleeping_program_is_counted_as_a_wall_backstop_timeout(tmp_path):
    problem = next(p for p in load_builtin().problems if p.kind == "function")
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"task_id": problem.id, "completion": "    import time\n    time.sleep(100)\n"}) + "\n")
    with pytest.warns(UserWarning, match="have no samples"):
        summary = evaluate.main(["--samples", str(path), "--timeout", "0.5", "--wall_timeout", "1", "--workers", "1"])
    assert summary["outcomes"]["timeout"] == 1 and summary["wall_timeouts"] == 1
    with pytest.raises(SystemExit):
        evaluate.main(["--samples", str(path), "--timeout", "2", "--wall_timeout", "1"])


def test_unknown_task_ids_and_bad_flags_are_errors(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"task_id": "nope/1", "completion": "x"}) + "\n")
    with pytest.raises(SystemExit, match="match no loaded problem"):
        evaluate.main(["--samples", str(path)])
    for argv in (["--canonical", "--n", "0"], ["--canonical", "--data", "apps_plus"], ["--samples", "missing.jsonl"],
                 []):
        with pytest.raises(SystemExit):
            evaluate.main(argv)


def test_canonical_with_difficulty_and_limit_from_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "stepcoder.evaluate", "--canonical", "--difficulty", "interview",
                           "--limit", "3", "--output", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_problems"] == 3 and report["pass@1"] == 1.0
    assert list(report["by_difficulty"]) == ["interview"]


def _tiny_model(directory):
    """A 1-layer GPT-2 and a byte-level BPE tokenizer trained here: nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = [p.question + "\n" + p.solutions[0] for p in load_builtin().problems]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<pad>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(directory)
    config = GPT2Config(vocab_size=len(fast), n_positions=1024, n_embd=32, n_layer=1, n_head=2,
                        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)


def test_model_samples_are_generated_and_judged(tmp_path):
    pytest.importorskip("torch")
    _tiny_model(tmp_path / "model")
    summary = evaluate.main(["--model", str(tmp_path / "model"), "--n", "2", "--limit", "3", "--max_new_tokens", "12",
                             "--temperature", "0.8", "--batch_size", "4", "--workers", "1",
                             "--output", str(tmp_path / "out")])
    assert summary["num_problems"] == 3 and summary["num_programs"] == 6
    assert sum(summary["outcomes"].values()) == 6
    assert list(summary["pass@k"]) == ["1"]
    lines = (tmp_path / "out" / "verdicts.jsonl").read_text().splitlines()
    assert len(lines) == 6


def test_greedy_decoding_with_several_samples_repeats_the_one_greedy_completion(tmp_path):
    """--temperature 0 --n 2 used to fail inside generate (greedy search cannot return 2 sequences)."""
    from stepcoder.engines import HFEngine, Sampling, completions
    from stepcoder.generation import load_model
    from stepcoder.prompts import build_prompt

    _tiny_model(tmp_path / "model")
    model, tokenizer = load_model(str(tmp_path / "model"), device="cpu")
    engine = HFEngine(model, tokenizer, "cpu")
    problems = load_builtin().problems[:3]
    prompts = [build_prompt(problem, tokenizer=tokenizer) for problem in problems]
    greedy = list(completions(engine, tokenizer, prompts, 3, Sampling(8, 0.0), batch_size=4))
    single = list(completions(engine, tokenizer, prompts, 1, Sampling(8, 0.0), batch_size=4))
    assert [texts[:1] * 3 for texts in single] == greedy
    summary = evaluate.main(["--model", str(tmp_path / "model"), "--n", "2", "--limit", "2", "--max_new_tokens", "8",
                             "--temperature", "0", "--workers", "1"])
    assert summary["num_programs"] == 4
    # top_k applies (top-1 sampling is greedy), and is off unless asked, as in the trainer
    top1 = list(completions(engine, tokenizer, prompts, 2, Sampling(8, 1.0, top_k=1), batch_size=4))
    assert [texts[:1] * 2 for texts in single] == top1
    arguments = evaluate.parse_args(["--canonical"])
    assert (arguments.top_k, arguments.top_p, arguments.max_new_tokens) == (0, 1.0, None)


def test_the_default_generation_budget_suits_the_data(tmp_path):
    from stepcoder.generation import suited_max_new_tokens

    from transformers import AutoTokenizer

    _tiny_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    solutions = [p.solutions[0] for p in load_builtin().problems]
    counts = sorted(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in solutions)
    expected = int(1.5 * counts[int(0.95 * (len(counts) - 1))]) + 8
    assert counts[0] < expected and suited_max_new_tokens(tokenizer, solutions) == max(64, min(2048, expected))
    assert suited_max_new_tokens(tokenizer, []) == 512


def test_a_checkpoints_reference_and_policy_are_judged_side_by_side(tmp_path, capsys, monkeypatch):
    """Before vs after training in one command: both model folders of a checkpoint load on their own
    (weights and tokenizer) and are judged on the same problems; the critic and a tokenizer-less folder
    are clear errors naming the folder."""
    from stepcoder import train

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the trainer on the CPU runs the PyTorch references
    train.main(["--data", "builtin", "--limit", "4", "--problems_per_step", "2", "--rollouts_per_prompt", "2", "--max_new_tokens", "24",
                "--sft_steps", "10", "--sandbox_workers", "1", "--total_steps", "1", "--advantage", "gae",
                "--kl_coef", "0.01", "--output_dir", str(tmp_path / "run")])
    checkpoint = tmp_path / "run" / "checkpoint-1"
    reference, policy = str(checkpoint / "reference"), str(checkpoint / "policy")
    capsys.readouterr()
    result = evaluate.main(["--model", reference, policy, "--n", "2", "--limit", "3", "--max_new_tokens", "24",
                            "--temperature", "1.0", "--workers", "1", "--output", str(tmp_path / "out")])
    assert list(result["models"]) == ["reference", "policy"]
    for summary, path in zip(result["models"].values(), (reference, policy)):
        assert summary["num_problems"] == 3 and summary["num_programs"] == 6
        assert sum(summary["outcomes"].values()) == 6 and summary["config"]["model"] == path
    table = capsys.readouterr().out.splitlines()
    header = next(line for line in table if "reference" in line and "policy" in line)
    assert header.index("reference") < header.index("policy")
    pass_row = next(line for line in table if line.startswith("pass@1"))
    assert pass_row.split()[1:] == [f"{100 * s['pass@1']:.1f}%" for s in result["models"].values()]
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [m["path"] for m in comparison["models"].values()] == [reference, policy]
    for index in range(2):
        assert len((tmp_path / "out" / f"model-{index}" / "verdicts.jsonl").read_text().splitlines()) == 6

    with pytest.raises(SystemExit, match=r"critic.*not a language model"):
        evaluate.main(["--model", str(checkpoint / "critic"), "--limit", "1"])
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((checkpoint / "reference" / name).read_bytes())
    with pytest.raises(SystemExit, match="no tokenizer in this directory") as error:
        evaluate.main(["--model", policy, str(bare), "--limit", "1"])  # checked before the first model runs
    assert str(error.value).startswith(f"error: --model {bare}: ")
    done = subprocess.run([sys.executable, "-m", "stepcoder.evaluate", "--model", str(bare), "--limit", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.strip() == str(error.value)
