"""The PPO trainer end to end on the CPU: one step, KL at the reference, left padding, reward placement,
kill-and-resume, two processes over gloo, bad configurations, and a test-sized default run."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepcoder import batching, kernels, learners, ppo, remote, rollouts, sandbox, selection, startup, train, warmup
from stepcoder.config import ConfigError, parse_config
from stepcoder.data import DataError, Problem, load_builtin
from stepcoder.models import build_default_model, build_default_tokenizer, make_critic
from stepcoder.sandbox import TestCase
from stepcoder.schedules import learning_rate_factor

TINY = ["--data", "builtin", "--limit", "8", "--advantage", "gae", "--kl_coef", "0.01", "--problems_per_step", "4", "--rollouts_per_prompt", "2", "--max_new_tokens", "40",
        "--sft_steps", "20", "--generation_batch_size", "8", "--num_mini_batches", "2", "--sandbox_workers", "1",
        "--save_steps", "100", "--sample_every", "1"]
REQUIRED = ("step", "reward_mean", "pass_rate", "kl", "entropy", "clipfrac", "value_loss", "cccs_stage_mean",
            "cccs_histogram", "cccs_full_windows", "fgo_masked_frac", "outcomes", "sandbox_wall_timeouts",
            "time_generate_s", "time_sandbox_s", "time_forward_s", "time_update_s")


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """The trainer on the CPU uses the PyTorch references, as a user's CPU run does (the interpreter,
    switched on for the kernel tests, would be far too slow here)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def run(tmp_path: Path, *extra: str, name: str = "run") -> list[dict]:
    return train.main([*TINY, "--output_dir", str(tmp_path / name), *extra])


def test_one_ppo_step_end_to_end(tmp_path, capfd):
    history = run(tmp_path, "--total_steps", "1")
    console = capfd.readouterr()
    for noise in ("Writing model shards", "Loading weights", "loss_type", "Warning"):  # transformers', compilers'
        assert noise not in console.err + console.out, noise
    assert "supervised warm-up: 20 steps" in console.out and "1 PPO steps in" in console.out
    assert "model built and warmed up in" in console.out and "held-out evaluations" in console.out
    (metrics,) = history
    assert set(REQUIRED) <= set(metrics)
    assert metrics["step"] == 1 and sum(metrics["outcomes"].values()) == 8
    assert metrics["kl"] == 0.0  # the first rollout comes from the policy, which still equals the reference
    out = tmp_path / "run"
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    assert (out / "config.json").exists() and (out / "samples.jsonl").exists()
    checkpoint = out / "checkpoint-1"
    for part in ("policy/config.json", "policy/tokenizer.json", "reference/config.json", "critic/value_head.pt",
                 "state/.metadata", "schedulers.pt", "curriculum.json", "trainer_state.json", "rng_rank0.pt"):
        assert (checkpoint / part).exists(), part


def _pair():
    problems = load_builtin().problems
    tokenizer = build_default_tokenizer([p.question + "\n" + p.solutions[0] for p in problems])
    return build_default_model(tokenizer, seed=1).eval(), tokenizer


def test_logprobs_with_and_without_left_padding_agree():
    model, tokenizer = _pair()
    short, long = "print(1)\n", "x = [i * i for i in range(10)]\nprint(sum(x))\n"
    response = tokenizer(" if x > 0:\n    y = 1\n")["input_ids"]
    samples, problem = [], load_builtin().problems[0]
    for prompt in (short, long):
        samples.append(rollouts.Sample(problem=problem, stage=0, prefix="", prompt_ids=tokenizer(prompt)["input_ids"],
                                    response_ids=response, completion="", fgo=[1] * len(response)))
    config = parse_config(["--output_dir", "unused"])
    alone = batching.pad_batch(samples[:1], tokenizer, config, "cpu")
    together = batching.pad_batch(samples, tokenizer, config, "cpu")
    assert together.attention_mask[0].sum() < together.attention_mask.shape[1]  # the short prompt is left-padded
    with torch.no_grad():
        logp_alone = kernels.logprobs_from_logits(batching.response_logits(model, alone, slice(None)), alone.responses)
        logp_padded = kernels.logprobs_from_logits(batching.response_logits(model, together, slice(None)),
                                                   together.responses)
    torch.testing.assert_close(logp_padded[0], logp_alone[0], atol=1e-5, rtol=1e-5)


def test_reward_lands_on_the_last_generated_token_and_kl_is_zero_at_the_reference():
    model, tokenizer = _pair()
    problems = load_builtin().problems[:3]
    samples = []
    for length, verdict, problem in zip((3, 7, 1), ("pass", "wrong_answer", "compile_error"), problems):
        samples.append(rollouts.Sample(problem=problem, stage=0, prefix="", prompt_ids=tokenizer("q")["input_ids"],
                                    response_ids=list(range(5, 5 + length)), completion="", verdict=verdict,
                                    fgo=[1] * length))
    config = parse_config(["--output_dir", "unused", "--advantage", "gae", "--kl_coef", "0.5"])
    batch = batching.pad_batch(samples, tokenizer, config, "cpu")
    critic = make_critic(model, share_trunk=False)
    experience = ppo.score_rollouts(model, model, critic, batch, config)
    assert float(experience["kl"].abs().max()) == 0.0
    rewards = experience["rewards"]
    expected = torch.zeros_like(rewards)
    expected[0, 2], expected[1, 6], expected[2, 0] = 1.0, -0.3, -1.0
    torch.testing.assert_close(rewards, expected)


def test_resume_skips_a_damaged_checkpoint_and_drops_the_rows_past_the_one_it_takes(tmp_path, capsys):
    """A run killed after writing step 3's rows and before checkpoint-3, whose checkpoint-2 then lost 1000
    bytes: `latest` skips checkpoint-2 saying why (without the manifest, torch failed inside its reader),
    resumes from checkpoint-1, drops the rows written after step 1 (and a last row cut short), and ends with
    each step's rows once. Naming a damaged checkpoint is an error naming the file."""
    run(tmp_path, "--total_steps", "3", "--save_steps", "1", "--save_total_limit", "3")
    out = tmp_path / "run"
    manifest = json.loads((out / "checkpoint-2" / "manifest.json").read_text())
    assert manifest["step"] == 2 and "state/.metadata" in manifest["files"]
    shutil.rmtree(out / "checkpoint-3")
    shard = max((out / "checkpoint-2" / "state").glob("*.distcp"), key=lambda path: path.stat().st_size)
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        f.write(bytes(1000))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward_me')  # a row the kill cut short
    capsys.readouterr()
    history = run(tmp_path, "--total_steps", "3", "--save_steps", "1", "--save_total_limit", "3",
                  "--resume_from_checkpoint", "latest")
    console = capsys.readouterr()
    assert f"skipping {out / 'checkpoint-2'}" in console.err and shard.name in console.err and "SHA-256" in console.err
    assert "resuming at step 1: dropped 3 metrics rows and 16 sample rows" in console.out
    assert [row["step"] for row in history] == [1, 2, 3]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and samples == [1] * 8 + [2] * 8 + [3] * 8
    shard = max((out / "checkpoint-3" / "state").glob("*.distcp"), key=lambda path: path.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(SystemExit, match=f"cannot resume from .*checkpoint-3.*{shard.name} has"):
        run(tmp_path, "--total_steps", "4", "--resume_from_checkpoint", str(out / "checkpoint-3"))


@pytest.mark.slow
def test_an_output_dir_belongs_to_one_run(tmp_path, capsys):
    """A finished run's folder: a new run there is refused, naming the folder and the two ways on, and
    nothing of the old run changes; --overwrite_output_dir moves the old run aside whole."""
    run(tmp_path, "--total_steps", "1")
    out = tmp_path / "run"
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    with pytest.raises(SystemExit, match=f"{out} already holds a run .*metrics.jsonl.*--resume_from_checkpoint "
                                         "latest.*--overwrite_output_dir"):
        run(tmp_path, "--total_steps", "2")
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before
    capsys.readouterr()
    history = run(tmp_path, "--total_steps", "1", "--overwrite_output_dir", "--seed", "1")
    (aside,) = tmp_path.glob("run.previous-*")
    assert f"now in {aside}" in capsys.readouterr().out
    assert {path.name: path.read_bytes() for path in aside.iterdir() if path.is_file()} == before
    assert (aside / "checkpoint-1").is_dir() and (out / "checkpoint-1").is_dir() and len(history) == 1
    rows = {name: [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")}
                   for line in text.decode().splitlines()]
            for name, text in (("old", before["metrics.jsonl"]), ("new", (out / "metrics.jsonl").read_bytes()))}
    assert [row["step"] for row in rows["new"]] == [1] and rows["new"] != rows["old"]  # a new run (seed 1), its own


def test_save_total_limit_keeps_the_newest_checkpoints_and_removes_the_older(tmp_path, monkeypatch):
    """--save_total_limit 2 with a save every step: after each save the folder holds the newest two
    checkpoints, whole (their manifests check out), and nothing staged."""
    from stepcoder import checkpoint

    seen, save = [], checkpoint.save

    def listing(output, step, *state, **options):
        saved = save(output, step, *state, **options)
        seen.append(sorted(path.name for path in output.iterdir() if "checkpoint" in path.name))
        return saved

    monkeypatch.setattr(checkpoint, "save", listing)
    history = run(tmp_path, "--total_steps", "3", "--save_steps", "1", "--save_total_limit", "2", "--sft_steps", "2",
                  "--max_new_tokens", "8")
    assert [row["step"] for row in history] == [1, 2, 3]
    assert seen == [["checkpoint-1"], ["checkpoint-1", "checkpoint-2"], ["checkpoint-2", "checkpoint-3"]]
    for name in seen[-1]:
        assert checkpoint.damage(tmp_path / "run" / name) is None
        assert json.loads((tmp_path / "run" / name / "trainer_state.json").read_text())["step"] == int(name[11:])


@pytest.mark.slow
def test_the_small_model_is_sized_to_its_data_and_a_pretrained_one_is_checked(tmp_path):
    """APPS+ prompts and solutions run past 1024 positions with the small tokenizer: the small model's
    context grows to what the data needs (it died in the warm-up with an IndexError); a loaded model whose
    context is too short is an error naming a problem and the flags, before any training."""
    long_solution = "x = 0\n" + "x += 1\n" * 700 + "print(x)\n"
    problem = Problem(id="long/0", question="Count to 700.", starter_code="", solutions=[long_solution],
                      tests=[TestCase("", "700\n")], kind="stdin", entry=None)
    config = parse_config(["--output_dir", str(tmp_path / "unused"), "--sft_steps", "2"])
    stages = selection.cccs_stages([problem], config)
    policy, _, tokenizer, _, _ = learners.build_models(config, [problem], stages, None, "cpu")
    needed = max(warmup.context_needed([problem], stages, tokenizer, config).values())
    assert needed > 1024 and policy.config.n_positions == -(-needed // 64) * 64
    # the warm-up: 6 passes over the examples (counted as the warm-up builds them), at most 1000 steps
    small = parse_config(["--output_dir", "unused", "--data", "builtin"])
    builtin = selection.select_problems(small)
    builtin_stages = selection.cccs_stages(builtin, small)
    examples = len(warmup.warmup_examples(builtin, builtin_stages, tokenizer, None))
    assert small.sft_steps is None and examples > len(builtin)
    assert warmup.sized_warmup(small, builtin, builtin_stages).sft_steps == -(-6 * examples // 16)
    assert warmup.sized_warmup(small, builtin * 100, builtin_stages).sft_steps == 1000
    assert warmup.sized_warmup(config, [problem], stages).sft_steps == 2  # given: as given
    short = build_default_model(build_default_tokenizer([long_solution]), 0, n_positions=64)
    short.save_pretrained(tmp_path / "short")
    build_default_tokenizer([long_solution]).save_pretrained(tmp_path / "short")
    with pytest.raises(SystemExit, match="need more than the model's 64 positions .*--max_new_tokens"):
        train.main(["--model_name_or_path", str(tmp_path / "short"), "--data", "builtin", "--limit", "4",
                    "--sft_steps", "2", "--total_steps", "1", "--output_dir", str(tmp_path / "run")])


APPS_PLUS_VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "apps_plus" / "valid.json"


@pytest.mark.slow
@pytest.mark.skipif(not APPS_PLUS_VALID.exists(), reason="the team's APPS+ copy (../shared/data/apps_plus) is absent")
def test_the_small_model_warms_up_on_real_apps_plus_problems(tmp_path):
    """The reproduction: the small default model on APPS+ died in the warm-up with an IndexError from
    GPT-2's position embedding. Its context now holds the longest example, and the warm-up runs."""
    config = parse_config(["--data", f"apps_plus:{APPS_PLUS_VALID}", "--limit", "4", "--sft_steps", "2",
                           "--output_dir", str(tmp_path)])
    problems = selection.select_problems(config)
    stages = selection.cccs_stages(problems, config)
    policy, _, tokenizer, _, _ = learners.build_models(config, problems, stages, None, "cpu")
    longest = max(len(p) + len(t) for p, t in warmup.warmup_examples(problems, stages, tokenizer, None))
    assert longest > 1024 and policy.config.n_positions >= longest


def test_user_errors_name_the_flag_without_a_traceback(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv, message in ((["--total_steps", "abc"], "error: --total_steps: expected int, got 'abc'"),
                          (["--model_name_or_path", str(tmp_path / "empty")], "has no config.json")):
        with pytest.raises(SystemExit, match=message):
            train.main([*argv, "--output_dir", str(tmp_path / "run")])


def _real_like_model(directory: Path, extra_rows: int) -> None:
    """A saved GPT-2 whose tokenizer has no pad token and whose embedding matrix has `extra_rows` more
    rows than the tokenizer has tokens (deepseek-coder: 32,256 rows for 32,022 tokens); 0 extra rows
    means the pad token the trainer adds needs a new row."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = [p.question + "\n" + p.solutions[0] for p in load_builtin().problems]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(3)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer) + extra_rows, n_positions=512, n_embd=32, n_layer=1,
                                       n_head=2, bos_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(directory)


@pytest.mark.parametrize("extra_rows", [16, 0])
def test_the_reference_after_resume_is_exactly_the_starting_policy(tmp_path, extra_rows):
    """A real model, no warm-up: the reference is not saved, and a resumed run rebuilds it from the base
    checkpoint. Its weights and log-probs equal those of the fresh start to the bit (no shrunk embedding
    matrix, no random new rows); the first step's KL is 0."""
    _real_like_model(tmp_path / "base", extra_rows)
    argv = ["--model_name_or_path", str(tmp_path / "base"), "--sft_steps", "0", "--data", "builtin", "--limit", "4",
            "--problems_per_step", "2", "--rollouts_per_prompt", "2", "--max_new_tokens", "16",
            "--sandbox_workers", "1", "--output_dir", str(tmp_path / "run"), "--total_steps", "2"]
    first = train.main([*argv, "--stop_after_steps", "1"])
    assert first[0]["kl"] == 0.0
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert not (checkpoint / "reference").exists()  # rebuilt on resume, not saved
    config = parse_config(argv)
    problems = selection.select_problems(config)
    stages = selection.cccs_stages(problems, config)
    _, fresh, tokenizer, _, _ = learners.build_models(config, problems, stages, None, "cpu")
    _, resumed, _, _, _ = learners.build_models(config, problems, stages, checkpoint, "cpu")
    rows = fresh.get_input_embeddings().weight.shape[0]
    assert rows == max(len(tokenizer), len(tokenizer) - 1 + extra_rows)  # grown where needed, never shrunk
    for (name, a), (_, b) in zip(fresh.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.tensor([tokenizer("def f(x):\n    return x\n")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits.log_softmax(-1), resumed(ids).logits.log_softmax(-1))
    history = train.main([*argv, "--resume_from_checkpoint", "latest"])
    assert [m["step"] for m in history] == [1, 2]


def test_truncated_responses_are_counted_and_penalized(tmp_path):
    """With max_new_tokens 3 an untrained model is cut off nearly always: truncated_frac says so, and
    the penalty lowers those rewards."""
    history = run(tmp_path, "--total_steps", "1", "--sft_steps", "0", "--max_new_tokens", "3",
                  "--truncation_penalty", "0.5")
    assert history[0]["truncated_frac"] > 0.5
    problem = load_builtin().problems[0]
    samples = [rollouts.Sample(problem=problem, stage=0, prefix="", prompt_ids=[1], response_ids=[2], completion="",
                            verdict="wrong_answer", fgo=[1], truncated=cut) for cut in (False, True)]
    _, tokenizer = _pair()
    batch = batching.pad_batch(samples, tokenizer, parse_config(["--output_dir", "x", "--truncation_penalty", "0.5"]),
                            "cpu")
    assert batch.scores.tolist() == pytest.approx([-0.3, -0.8])


@pytest.mark.slow
def test_nucleus_sampling_is_flagged_as_off_policy(tmp_path, capfd):
    run(tmp_path, "--total_steps", "1", "--sft_steps", "0", "--max_new_tokens", "4", "--top_p", "0.9")
    assert "top_p 0.9 samples from a truncated distribution" in capfd.readouterr().err
    run(tmp_path, "--total_steps", "1", "--sft_steps", "0", "--max_new_tokens", "4", name="full")
    assert "off-policy" not in capfd.readouterr().err


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_learning_rate_schedules(tmp_path, kind):
    factors = [learning_rate_factor(step, 10, 2, kind) for step in range(11)]
    assert factors[:2] == [0.5, 1.0]
    if kind == "constant":
        assert factors[2:] == [1.0] * 9
    else:
        assert factors[2] == 1.0 and factors[-1] == pytest.approx(0.0, abs=1e-12)
        assert all(a >= b for a, b in zip(factors[2:], factors[3:]))
    history = run(tmp_path, "--total_steps", "3", "--lr_scheduler_type", kind, "--warmup_steps", "1",
                  "--learning_rate", "1e-3", "--sft_steps", "1")
    used = [m["learning_rate"] for m in history]
    assert used == pytest.approx([1e-3 * learning_rate_factor(step, 3, 1, kind) for step in range(3)])


def test_a_canonical_solution_that_does_not_parse_trains_at_full_generation(capsys):
    config = parse_config(["--output_dir", "unused"])
    problems = load_builtin().problems[:2]
    problems[1] = dataclasses.replace(problems[1], id="apps/py2", solutions=["print 'hello'\n"])
    stages = selection.cccs_stages(problems, config)
    assert stages["apps/py2"] == [""] and len(stages[problems[0].id]) > 1
    assert "apps/py2: the canonical solution does not parse" in capsys.readouterr().err


def test_prompts_that_cannot_fit_the_context_are_an_error_naming_the_problem():
    model, tokenizer = _pair()
    problems = load_builtin().problems[:3]
    config = parse_config(["--output_dir", "unused", "--max_new_tokens", "1000"])  # n_positions is 1024
    stages = {p.id: [""] for p in problems}
    with pytest.raises(DataError, match=rf"3 prompts do not fit .* 1024 tokens .*{problems[0].id}"):
        learners.check_prompts_fit(model, tokenizer, problems, stages, config)
    learners.check_prompts_fit(model, tokenizer, problems, stages, parse_config(["--output_dir", "unused"]))


@pytest.mark.parametrize("coverage, stops, arm", [("all_tests", False, []), ("first_failure", True, []),
                                                  ("all_tests", False, ["--no_fgo"])])
def test_fgo_coverage_chooses_how_many_tests_run(tmp_path, monkeypatch, coverage, stops, arm):
    """all_tests (the paper's coverage, the default): every test runs, so FGO sees the lines later tests
    take; the verdict is still the first failure's (tests/test_sandbox.py). Lines are traced with --no_fgo
    too, where what FGO would mask is measured but nothing is masked."""
    made = []

    class Recorded(sandbox.Sandbox):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(remote, "Sandbox", Recorded)  # the trainer opens its pool through remote.open_sandbox
    (row,) = run(tmp_path, "--total_steps", "1", "--sft_steps", "0", "--max_new_tokens", "4", "--fgo_coverage",
                 coverage, *arm)
    assert made[0]["stop_on_first_failure"] is stops and made[0]["trace"] is True
    # FGO masks exactly the never-run tokens it measures; without FGO they are measured and kept
    assert row["fgo_masked_frac"] == (0.0 if arm else row["unexecuted_frac"])
    assert (row["unexecuted_grad_share"] == 0.0) or bool(arm)
    assert parse_config(["--output_dir", "x"]).fgo_coverage == "all_tests"


@pytest.mark.slow
def test_two_processes_over_gloo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29517", "-m", "stepcoder.train", *TINY, "--total_steps", "2", "--device", "cpu",
                           "--output_dir", str(tmp_path / "ddp")], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    history = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [1, 2]
    assert all(sum(m["outcomes"].values()) == 2 * 4 * 2 for m in history)  # both ranks' rollouts counted
    assert (tmp_path / "ddp" / "checkpoint-2" / "rng_rank1.pt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--learning_rate", "-1"], "learning_rate: must be positive"),
    (["--learning_rate", "fast"], "expected float"),
    (["--kl_estimator", "k9"], "kl_estimator"),
    (["--num_mini_batches", "3"], "must divide the rollouts"),
    (["--gradient_accumulation_steps", "3"], "must divide the mini-batch"),
    (["--model_name_or_path", "/nonexistent/model"], "not a local directory"),
    (["--resume_from_checkpoint", "/nonexistent/ckpt"], "not a directory"),
    (["--top_p", "0"], "top_p"),
    (["--cccs_threshold", "1.5"], "cccs_threshold"),
    (["--dual_clip", "0.5"], "dual_clip"),
    (["--n_embd", "30"], "n_embd"),
    (["--sandbox_timeout", "2", "--sandbox_wall_timeout", "1"], "sandbox_wall_timeout"),
    (["--config", "/nonexistent.yaml"], "no such file"),
])
def test_bad_configurations_fail_before_any_work(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)
    with pytest.raises(SystemExit, match=message.split(":")[0]):
        train.main(argv)


def test_config_file_values_and_errors(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("learning_rate: 3.0e-6\nkl_estimator: k3\nno_fgo: true\n")
    config = parse_config(["--config", str(good), "--kl_estimator", "k1"])
    assert (config.learning_rate, config.kl_estimator, config.no_fgo) == (3e-6, "k1", True)  # flags override
    for text, message in (("learning_rat: 1\n", "unknown option"), ("a: [1\n", "not valid YAML"),
                          ("- 1\n", "mapping"), ("total_steps: many\n", "expected int")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            parse_config(["--config", str(bad)])
    with pytest.raises(ConfigError):
        parse_config(["--no_such_flag", "1"])


@pytest.mark.slow
def test_ppo_on_the_builtin_problems_improves(tmp_path):
    """The small model on the 48 built-in problems (the first default run), per-problem curriculum, 4
    problems x 8 rollouts per step: pass rate and reward of the last quarter of 40 steps beat the first
    (seeds 0, 1, 2: pass rate 0.40 -> 0.48, 0.34 -> 0.44, 0.40 -> 0.53; 85-100 s on 2 cores)."""
    history = train.main(["--data", "builtin", "--sft_steps", "150", "--output_dir", str(tmp_path / "default"),
                          "--total_steps", "40", "--problems_per_step", "4", "--cccs_mode", "per_problem",
                          "--cccs_threshold", "0.9", "--cccs_window", "8"])
    quarter = len(history) // 4
    first, last = history[:quarter], history[-quarter:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "pass_rate") > mean(first, "pass_rate")
    assert mean(last, "reward_mean") > mean(first, "reward_mean")


def test_losses_from_hidden_states_match_the_logits_path():
    """A plain linear LM head: log-probs from hidden states (no logits) equal those from the logits."""
    model, tokenizer = _pair()
    response = tokenizer(" if x > 0:\n    y = 1\n")["input_ids"]
    problem = load_builtin().problems[0]
    samples = [rollouts.Sample(problem=problem, stage=0, prefix="", prompt_ids=tokenizer(p)["input_ids"],
                            response_ids=response, completion="", fgo=[1] * len(response))
               for p in ("print(1)\n", "x = 2\nprint(x)\n")]
    fused = parse_config(["--output_dir", "unused"])
    plain = parse_config(["--output_dir", "unused", "--fused_lm_head", "off"])
    batch = batching.pad_batch(samples, tokenizer, fused, "cpu")
    assert batching.lm_head_weight(model, fused) is not None and batching.lm_head_weight(model, plain) is None
    with torch.no_grad():
        from_hidden = batching.response_logprobs(model, batch, slice(None), fused)
        from_logits = batching.response_logprobs(model, batch, slice(None), plain)
    torch.testing.assert_close(from_hidden, from_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_held_out_evaluation_before_and_after_agrees_with_evaluate(tmp_path, capsys):
    """The default data with its held-out split, test-sized: evaluation rows at the start, every
    eval_every steps and the end; each row's figures recomputed from its per-problem file; greedy
    verdicts equal to what `python -m stepcoder.evaluate` gives the saved start and end models."""
    from stepcoder import evaluate

    out = tmp_path / "run"
    train.main(["--output_dir", str(out), "--total_steps", "2", "--sft_steps", "30", "--eval_limit", "12",
                "--eval_samples", "1", "--eval_temperature", "0", "--eval_every", "1", "--problems_per_step", "4",
                "--rollouts_per_prompt", "2", "--max_new_tokens", "40", "--sandbox_workers", "1",
                "--kl_coef", "0.01"])  # a reference, so checkpoint-N/reference holds the start
    config = json.loads((out / "config.json").read_text())
    assert (config["data"], config["eval_data"]) == ("synthetic:train", "synthetic:heldout")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval_pass@1" in row]
    assert [row["step"] for row in evals] == [0, 1, 2]
    for row in evals:
        saved = json.loads((out / "eval" / f"step-{row['step']}.json").read_text())
        assert len(saved["passed"]) == row["eval_problems"] == 12
        assert row["eval_pass@1"] == pytest.approx(sum(saved["passed"].values()) / 12)
        assert sum(row["eval_outcomes"].values()) == 12
        low, high = row["eval_pass@1_ci95"]
        assert 0 <= low <= row["eval_pass@1"] <= high <= 1
    summary = json.loads((out / "eval_summary.json").read_text())
    assert (summary["before"]["step"], summary["after"]["step"]) == (0, 2)
    assert summary["difference"] == pytest.approx(evals[-1]["eval_pass@1"] - evals[0]["eval_pass@1"])
    assert summary["difference_ci95"][0] <= summary["difference"] <= summary["difference_ci95"][1]
    assert (out / "eval_curve.png").stat().st_size > 0
    assert "held-out pass@1 on synthetic:heldout (12 problems x 1 samples, T=0.0)" in capsys.readouterr().out

    checkpoint = out / "checkpoint-2"
    for model, step in (("reference", 0), ("policy", 2)):
        report = evaluate.main(["--model", str(checkpoint / model), "--data", "synthetic:heldout", "--limit", "12",
                                "--temperature", "0", "--max_new_tokens", "40", "--workers", "1", "--timeout", "0.5"])
        judged = {verdict: count for verdict, count in report["outcomes"].items() if count}
        assert judged == evals[step]["eval_outcomes"], model


def test_a_warm_up_only_run_is_one_start_for_every_arm(tmp_path, capsys):
    """--total_steps 0 saves the warmed-up model as checkpoint-0; the warm-up does not depend on the RL
    arm (--no_cccs, --no_fgo), so the ablation's arms start from one model; --n_layer/--n_embd size it."""
    from safetensors.torch import load_file

    from stepcoder.generation import load_model

    weights = {}
    for name, extra in (("full", []), ("vanilla", ["--no_cccs", "--no_fgo"])):
        assert run(tmp_path, "--total_steps", "0", *extra, name=name) == []
        folder = tmp_path / name / "checkpoint-0" / "policy"
        weights[name] = load_file(folder / "model.safetensors")
        model, _ = load_model(str(folder), device="cpu")  # usable as it is, by evaluate too
    assert "0 PPO steps" in capsys.readouterr().out
    assert weights["full"].keys() == weights["vanilla"].keys()
    for key in weights["full"]:
        assert torch.equal(weights["full"][key], weights["vanilla"][key]), key
    run(tmp_path, "--total_steps", "0", "--n_layer", "3", "--n_embd", "64", name="sized")
    config = json.loads((tmp_path / "sized" / "checkpoint-0" / "policy" / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"]) == (3, 64)


@pytest.mark.parametrize("cpus,ranks,workers", [(2, 1, 2), (3, 1, 3), (4, 1, 3), (96, 8, 11), (96, 1, 95),
                                                 (2, 4, 1)])
def test_the_sandbox_pool_leaves_a_cpu_to_the_trainer_only_from_four_up(monkeypatch, cpus, ranks, workers):
    config = parse_config(["--output_dir", "unused"])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert startup.sandbox_workers(config) == workers
    assert startup.sandbox_workers(parse_config(["--output_dir", "unused", "--sandbox_workers", "3"])) == 3


def test_the_default_tokenizer_spells_the_closing_fence_as_one_token():
    """Trained on what the model reads and writes, the small default tokenizer has the closing fence as
    one token, so a program ends with one decision, not a count of backticks (trained on questions and
    solutions alone it was three tokens, and a 2-layer model often stopped after two)."""
    from stepcoder.data import load_problems
    from stepcoder.prompts import CODE_FENCE, build_prompt

    problems = load_problems("synthetic:train").problems[:200]
    tokenizer = build_default_tokenizer(learners.tokenizer_corpus(problems))
    assert len(tokenizer(CODE_FENCE, add_special_tokens=False)["input_ids"]) == 1
    solution = problems[0].solutions[0]
    ending = tokenizer(solution + CODE_FENCE, add_special_tokens=False)["input_ids"][-1]
    assert tokenizer.decode([ending]) == CODE_FENCE
    # the plain prompt is shorter in these tokens than in a tokenizer that never saw the template
    prompt = build_prompt(problems[0], "", None, False)
    plain = build_default_tokenizer([p.question + "\n" + s for p in problems for s in p.solutions])
    assert len(tokenizer(prompt)["input_ids"]) < len(plain(prompt)["input_ids"])


def test_the_warm_up_can_take_other_problems_and_whole_programs_only(tmp_path):
    """--sft_data warms up on problems the run never trains on (the long family's warm-up split), and
    --sft_whole_programs on their whole programs only: one example per problem, the solution after its
    starter code; by default the training problems at every CCCS stage; none without a warm-up."""
    base = ["--output_dir", str(tmp_path), "--data", "synthetic-long:train", "--sft_steps", "5"]
    problems = selection.select_problems(parse_config(base))
    default_problems, default_stages = selection.select_warmup(parse_config(base), problems)
    assert default_problems is problems and all(len(default_stages[p.id]) >= 3 for p in problems)
    config = parse_config([*base, "--sft_data", "synthetic-long:warmup", "--sft_whole_programs"])
    sft_problems, sft_stages = selection.select_warmup(config, problems)
    assert {p.id.split("/")[1] for p in sft_problems} == {"warmup-0"} and len(sft_problems) == 4000
    assert not {p.solutions[0] for p in sft_problems} & {p.solutions[0] for p in problems}
    assert set(map(tuple, sft_stages.values())) == {("",)}
    tokenizer = build_default_tokenizer(learners.tokenizer_corpus(problems))
    examples = warmup.warmup_examples(sft_problems[:20], sft_stages, tokenizer, False)
    assert len(examples) == 20
    for problem, (_, target) in zip(sft_problems, examples):
        body = problem.solutions[0][len(problem.starter_code):]
        assert tokenizer.decode(target, skip_special_tokens=True) == body + "```"
    assert selection.select_warmup(parse_config([*base, "--sft_steps", "0"]), problems) == ([], {})
    with pytest.raises(DataError, match="synthetic-long:nope"):
        selection.select_warmup(parse_config([*base, "--sft_data", "synthetic-long:nope"]), problems)
    # the small model's context holds the warm-up's examples too (they are longer than any prompt here)
    needed = warmup.context_needed(problems[:3], default_stages, tokenizer, config, sft=(sft_problems[:50], sft_stages))
    assert set(needed) == {p.id for p in problems[:3]} | {p.id for p in sft_problems[:50]}


def test_a_start_evaluation_is_reused_only_for_the_same_problems(tmp_path):
    """--start_evaluation: a saved step-0 evaluation over exactly this run's held-out problems and samples
    stands in for evaluating step 0 again (no time counted); any other file is refused, naming it."""
    from stepcoder.heldout import Evaluation

    saved = Evaluation(0, 1, {"a": 1, "b": 0}, {"pass": 1, "wrong_answer": 1}, 12.5)
    saved.save(tmp_path)
    file = tmp_path / "eval" / "step-0.json"
    reused = Evaluation.read(file, ["b", "a"], 1)
    assert (reused.passed, reused.outcomes, reused.seconds) == (saved.passed, saved.outcomes, 0.0)
    for problems, samples, message in ((["a"], 1, "2 problems x 1 samples"), (["a", "b"], 4, "not of this run")):
        with pytest.raises(ValueError, match=message):
            Evaluation.read(file, problems, samples)
    Evaluation(3, 1, {"a": 1, "b": 0}, {}, 1.0).save(tmp_path)
    with pytest.raises(ValueError, match="at step 3"):
        Evaluation.read(tmp_path / "eval" / "step-3.json", ["a", "b"], 1)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not an evaluation"):
        Evaluation.read(tmp_path / "bad.json", ["a", "b"], 1)
    with pytest.raises(ConfigError, match="start_evaluation: .* is not a file"):
        parse_config(["--output_dir", str(tmp_path), "--start_evaluation", str(tmp_path / "missing.json")])


def test_a_run_needing_a_package_this_python_lacks_is_refused_before_any_work(tmp_path, monkeypatch):
    """--rollout_engine vllm (or --report_to tensorboard) where the package is missing: refused at once,
    naming the install command, before the warm-up or the output folder; `python -m stepcoder.evaluate
    --engine vllm` the same. Parsing alone still accepts it (the planner plans GPU runs on any machine)."""
    import importlib.util

    from stepcoder import evaluate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name in ("vllm", "tensorboard") else real(name, *args))
    output = tmp_path / "run"
    for flags, install in ((["--rollout_engine", "vllm"], 'pip install -e ".[vllm]"'),
                           (["--report_to", "tensorboard"], "pip install tensorboard")):
        with pytest.raises(SystemExit, match=re.escape(install)):
            train.main(["--output_dir", str(output), "--sft_steps", "500", *flags])
        assert not output.exists()  # nothing ran: no folder claimed, no warm-up
        assert parse_config(["--output_dir", str(output), *flags])
    with pytest.raises(SystemExit, match=r"--engine vllm: the vllm package is not installed"):
        evaluate.main(["--data", "builtin", "--model", str(tmp_path), "--engine", "vllm"])


def test_the_process_group_waits_as_long_as_dist_timeout_minutes(monkeypatch):
    """Every collective is bounded by --dist_timeout_minutes (default 60, where torch's NCCL default of 10
    can expire while rank 0 alone hashes a 7B checkpoint before a barrier); --device cpu joins over gloo
    even where CUDA is there (the two-process tests say it, so they run on a one-GPU machine)."""
    from datetime import timedelta

    from stepcoder import distributed

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kwargs: joined.append({"backend": backend, **kwargs}))
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)  # as on a one-GPU machine
    for flags, minutes in (([], 60), (["--dist_timeout_minutes", "90"], 90)):
        config = parse_config(["--output_dir", "x", *flags])
        assert distributed.setup("cpu", config.dist_timeout_minutes) == torch.device("cpu")
        assert joined[-1] == {"backend": "gloo", "timeout": timedelta(minutes=minutes)}  # --device cpu: gloo
    with pytest.raises(ConfigError, match="dist_timeout_minutes"):
        parse_config(["--output_dir", "x", "--dist_timeout_minutes", "0"])


def test_the_reference_computes_as_the_starting_policy_so_the_first_kl_is_zero(tmp_path):
    """With bf16 compute the policy's fp32 weights run under autocast; a reference stored in bf16 would
    not repeat that path (norms and softmax in bf16), so the KL at step 1, before any update, would not be
    0 (1e-4 here on the CPU with a bf16 reference). Measured after the update too: it moves off 0."""
    first, second = run(tmp_path, "--total_steps", "2", "--precision", "bf16", "--learning_rate", "1e-3")
    assert first["kl"] == 0.0 and second["kl"] != 0.0
