"""The TRL, veRL and OpenRLHF plug-ins (``stepcoder.integrations``): called as those stacks call them,
they give this package's own verdicts and rewards; TRL's trainer gets FGO through its loss mask and the
CCCS curriculum through its dataset; hostile completions score as failures and harm nothing."""
from __future__ import annotations

import importlib
import json
import os
import uuid
from pathlib import Path

import pytest
import torch

from stepcoder import evaluate
from stepcoder.config import TrainConfig
from stepcoder.data import load_apps_plus, load_problems
from stepcoder.integrations.common import Task, close_shared_sandboxes
from stepcoder.detokenize import code_tokens, continuation
from stepcoder.rollouts import Sample, fgo_mask, reward_of
from stepcoder.sandbox import Sandbox

APPS_PLUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "apps_plus" / "valid.json"
DEAD_CODE = "\nif len('') == 1:\n    unreachable = [0] * 7\n"  # a line no test runs: FGO masks its tokens
HOSTILE = {
    "kill_the_caller": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n",
    "write_a_file": "open({canary!r}, 'w').write('pwned')\n",
    "spin": "while True:\n    pass\n",
    "fork": "import os\nos.fork()\nprint(42)\n",
}


def broken(program: str, how: int) -> str:
    return [program.replace("print(", "print(1+", 1), program.replace("\n", "\n1/0\n", 1), "x = (\n"][how % 3]


def need(module: str):
    """The stack a test needs: skipped without it, except under STEPCODER_REQUIRE_TRL=1 (CI), where its
    absence fails the test."""
    if os.environ.get("STEPCODER_REQUIRE_TRL") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(autouse=True, scope="module")
def shared_pools():
    """The plug-ins' process-wide pool stops with this module (later tests count this process's children)."""
    yield
    close_shared_sandboxes()


# --- veRL and OpenRLHF --------------------------------------------------------------------------------------


@pytest.mark.skipif(not APPS_PLUS.is_file(), reason=f"APPS+ data not found at {APPS_PLUS}")
def test_verl_and_openrlhf_score_as_evaluate_judges(tmp_path):
    from stepcoder.integrations import openrlhf, verl
    from stepcoder.integrations.verl import prepare

    datasets = need("datasets")
    problems = load_apps_plus(str(APPS_PLUS)).problems
    completions = {p.id: [p.solutions[0], broken(p.solutions[0], i)] for i, p in enumerate(problems)}
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": ident, "completion": text}) + "\n"
                               for ident, texts in completions.items() for text in texts))
    evaluate.main(["--data", f"apps_plus:{APPS_PLUS}", "--samples", str(samples), "--workers", "2",
                   "--output", str(tmp_path / "eval")])
    verdicts = [json.loads(line)["verdict"] for line in (tmp_path / "eval" / "verdicts.jsonl").read_text().splitlines()]
    expected = [reward_of(verdict, TrainConfig(output_dir="unused")) for verdict in verdicts]
    assert {"pass", "wrong_answer", "runtime_error", "compile_error"} <= set(verdicts)

    parquet = tmp_path / "train.parquet"
    prepare.main(["--data", f"apps_plus:{APPS_PLUS}", "--output", str(parquet)])
    rows = list(datasets.load_dataset("parquet", data_files=str(parquet), split="train"))
    assert len(rows) == len(problems) and all(row["data_source"] == verl.DATA_SOURCE for row in rows)
    assert rows[0]["prompt"][0]["role"] == "user" and isinstance(rows[0]["prompt"][0]["content"], str)
    scores = []
    for row in rows:  # veRL's naive reward manager: keywords, one response at a time
        for text in completions[row["extra_info"]["problem_id"]]:
            scores.append(verl.compute_score(data_source=row["data_source"], solution_str=text,
                                             ground_truth=row["reward_model"]["ground_truth"],
                                             extra_info=row["extra_info"]))
    assert [score["score"] for score in scores] == expected
    assert [score["verdict"] for score in scores] == verdicts

    jsonl = tmp_path / "train.jsonl"
    openrlhf.main(["--data", f"apps_plus:{APPS_PLUS}", "--output", str(jsonl)])
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    queries, prompts, labels = [], [], []
    for record in records:
        for text in completions[Task.from_json(record["label"]).id]:
            queries.append(record["prompt"] + text)
            prompts.append(record["prompt"])
            labels.append(record["label"])
    answer = openrlhf.reward_func(queries, prompts, labels)
    assert answer["rewards"].tolist() == pytest.approx(expected)
    for index in range(0, len(queries), 5):  # one sample per call, decoded with special tokens, as OpenRLHF does
        single = openrlhf.reward_func(["<s>" + queries[index] + "<|endoftext|><pad>"], [prompts[index]],
                                      [labels[index]])
        assert single["rewards"].tolist() == pytest.approx([expected[index]])
    assert answer["scores"].tolist() == [float(verdict == "pass") for verdict in verdicts]
    assert set(answer["extra_logs"]) >= {"verdict_pass", "verdict_compile_error"}


def test_the_prepared_data_carries_every_cccs_stage(tmp_path):
    pq = need("pyarrow.parquet")

    from stepcoder.cccs import problem_stages
    from stepcoder.integrations import openrlhf
    from stepcoder.integrations.verl import prepare

    problems = load_problems("builtin").problems[:6]
    stages = problem_stages(problems)[0]
    prepare.main(["--data", "builtin", "--output", str(tmp_path / "t.parquet"), "--cccs"])
    table = pq.read_table(tmp_path / "t.parquet").to_pylist()
    every = problem_stages(load_problems("builtin").problems)[0]
    assert len(table) == sum(len(prefixes) for prefixes in every.values())
    first = [row for row in table if row["extra_info"]["problem_id"] == problems[0].id]
    assert [row["extra_info"]["stage"] for row in first] == list(range(len(stages[problems[0].id])))
    assert all(Task.from_json(row["reward_model"]["ground_truth"]).context.startswith(
        Task.from_json(first[-1]["reward_model"]["ground_truth"]).context) for row in first)
    openrlhf.main(["--data", "builtin", "--output", str(tmp_path / "t.jsonl"), "--cccs"])
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == len(table)


def test_hostile_completions_score_as_failures_and_harm_no_caller(tmp_path):
    from stepcoder.integrations import openrlhf, verl
    from stepcoder.integrations.trl import make_reward

    problem = load_problems("builtin").problems[0]
    task = Task.of(problem)
    canary = f"/tmp/stepcoder-canary-{uuid.uuid4().hex}"
    programs = [program.format(canary=canary) for program in HOSTILE.values()]
    with Sandbox(workers=2, timeout=1.0) as pool:
        reward = make_reward([problem], sandbox=pool)
        trl_scores = reward(["p"] * len(programs), programs, None, problem_id=[problem.id] * len(programs),
                            stage=[0] * len(programs), prefix=[""] * len(programs))
    verl_scores = [verl.compute_score(data_source="stepcoder", solution_str=p, ground_truth=task.to_json(),
                                      extra_info={}) for p in programs]
    openrlhf_scores = openrlhf.reward_func(programs, [""] * len(programs), [task.to_json()] * len(programs))
    assert all(score < 1.0 for score in trl_scores)
    assert all(score["verdict"] != "pass" and score["score"] < 1.0 for score in verl_scores)
    assert openrlhf_scores["scores"].sum().item() == 0.0
    assert not os.path.exists(canary)
    assert os.getppid() > 1  # this process (the caller) and its parent are alive


# --- TRL ------------------------------------------------------------------------------------------------------


@pytest.fixture
def trl_setup(tmp_path):
    need("trl")
    from trl import GRPOConfig

    from stepcoder.integrations.trl import cccs_dataset, make_reward
    from stepcoder.models import build_default_model, build_default_tokenizer
    from stepcoder.learners import tokenizer_corpus

    problems = [p for p in load_problems("synthetic:train").problems if p.kind == "function"][:4]
    tokenizer = build_default_tokenizer(tokenizer_corpus(problems))
    model = build_default_model(tokenizer, 0)
    dataset = cccs_dataset(problems, window=2)
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=48, max_steps=3, logging_steps=1, report_to=[], use_cpu=True,
                      save_strategy="no", seed=0, learning_rate=1e-4, bf16=False)
    return problems, tokenizer, model, dataset, make_reward(problems), args


def scripted(trainer, problems, dataset, tokenizer):
    """Replaces generation by known completions, in turn for each prompt: the canonical rest of the
    program plus a branch no test takes (pass, with FGO to mask), a runtime error, a syntax error."""
    by_question = {p.question.strip(): p for p in problems}
    turns: dict[str, int] = {}

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        completions = []
        for ids in prompt_ids:
            text = tokenizer.decode(ids)
            problem = next(p for q, p in by_question.items() if q in text)
            context = problem.context(dataset.curriculum.prefix(problem.id))  # what the prompt ends with
            rest = problem.solutions[0][len(context):] if context else problem.solutions[0]
            turn = turns[problem.id] = turns.get(problem.id, -1) + 1
            body = [rest + DEAD_CODE, rest + "\n1/0\n", "def (:\n"][turn % 3]
            ids = tokenizer(body + "\n```", add_special_tokens=False)["input_ids"]
            completions.append(ids + [tokenizer.eos_token_id])
        return completions, None

    trainer._generate_single_turn = generate


def test_the_grpo_trainer_logs_this_packages_rewards_and_moves_the_curriculum(trl_setup):
    from stepcoder.integrations.trl import StepCoderGRPOTrainer

    problems, tokenizer, model, dataset, reward, args = trl_setup
    calls = []
    judge_call = reward.__class__.__call__

    def recording(self, prompts, completions, completion_ids=None, **columns):
        rewards = judge_call(self, prompts, completions, completion_ids, **columns)
        calls.append((list(columns["problem_id"]), list(columns["prefix"]), list(completions), rewards))
        return rewards

    reward.__class__.__call__ = recording
    try:
        trainer = StepCoderGRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                                       processing_class=tokenizer)
        scripted(trainer, problems, dataset, tokenizer)
        trainer.train()
    finally:
        reward.__class__.__call__ = judge_call
    by_id = {p.id: p for p in problems}
    config = TrainConfig(output_dir="unused")
    with Sandbox(workers=2, timeout=2.0) as pool:  # this package's own judging of the same completions
        for ids, prefixes, completions, rewards in calls:
            jobs = [by_id[i].job(by_id[i].program(text, prefix)) for i, prefix, text in zip(ids, prefixes, completions)]
            assert rewards == [reward_of(result.verdict, config) for result in pool.run_many(jobs)]
    logged = [row for row in trainer.state.log_history if "reward" in row]
    assert len(logged) == 3 and len(calls) == 3
    assert [row["reward"] for row in logged] == pytest.approx([sum(r) / len(r) for *_, r in calls])
    assert len({r for *_, rewards in calls for r in rewards}) == 3  # pass, runtime and compile errors
    assert all(row["fgo_masked_fraction"] > 0 for row in logged)
    assert dataset.curriculum.mean_stage() > 0  # windows of 2 at a pass rate of 1/3 or more moved stages
    assert logged[-1]["cccs/stage_mean"] >= logged[0]["cccs/stage_mean"]


def test_fgo_masked_tokens_contribute_nothing_to_the_loss(trl_setup):
    from stepcoder.integrations.trl import StepCoderGRPOTrainer

    problems, tokenizer, model, dataset, reward, args = trl_setup
    trainer = StepCoderGRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                                   processing_class=tokenizer)
    scripted(trainer, problems, dataset, tokenizer)
    inputs = [dataset[i % len(problems)] for i in range(8) for _ in range(1)]
    inputs = [row for row in inputs for _ in range(args.num_generations)][:8]
    output = trainer._generate_and_score_completions(inputs)
    keep, completion_mask = output["tool_mask"], output["completion_mask"]
    dropped = (completion_mask * (1 - keep)).bool()
    by_id = {p.id: p for p in problems}
    for row, (task, text, judged) in enumerate(reward.last):  # the mask the package's own trainer makes
        ids = output["completion_ids"][row][completion_mask[row].bool()].tolist()
        prompt = output["prompt_ids"][row][output["prompt_mask"][row].bool()].tolist()
        spans = continuation(tokenizer, prompt, code_tokens(tokenizer, ids))[1]
        sample = Sample(by_id[task.id], task.stage, task.context, prompt, ids, text, judged.verdict,
                        judged.executed_lines, judged.tests_ran, spans=spans)
        assert keep[row, :len(ids)].tolist() == fgo_mask(sample, tokenizer)
        if judged.verdict == "pass":
            assert "unreachable = [0] * 7" in tokenizer.decode(output["completion_ids"][row][dropped[row]].tolist())
    passed = [judged.verdict == "pass" for _, _, judged in reward.last]
    assert len(passed) == 8 and any(passed), "the scripted rollouts include passes, whose dead branch FGO masks"
    assert all(dropped[row].any() for row in range(8) if passed[row])  # each pass row had tokens masked
    assert output["num_items_in_batch"].item() == (completion_mask * keep).sum().item()

    true_logps = trainer._get_per_token_logps_and_entropies

    def loss_and_grads(noise_where, inputs=output):
        def noisy(*args, **kwargs):
            logps, entropies, extra = true_logps(*args, **kwargs)
            generator = torch.Generator().manual_seed(0)
            noise = torch.randn(logps.shape, generator=generator)
            # a change that moves the value and the gradient of each perturbed token's log-prob
            return logps * (1 + noise * noise_where) + noise * noise_where, entropies, extra

        trainer._get_per_token_logps_and_entropies = noisy
        model.zero_grad()
        loss = trainer._compute_loss(model, dict(inputs))
        loss.backward()
        trainer._get_per_token_logps_and_entropies = true_logps
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test skips
    clean_loss, clean_grads = loss_and_grads(torch.zeros_like(keep, dtype=torch.float32))
    masked_loss, masked_grads = loss_and_grads(dropped.float())
    _, kept_grads = loss_and_grads((completion_mask * keep).float())
    # the control: the same noise with FGO's mask left out moves the gradient (the loss's value is -advantage
    # on every token at the rollout policy, whatever the log-probs: only the gradients can tell)
    unmasked = dict(output, tool_mask=torch.ones_like(keep))
    _, unmasked_clean = loss_and_grads(torch.zeros_like(keep, dtype=torch.float32), unmasked)
    _, unmasked_noisy = loss_and_grads(dropped.float(), unmasked)
    assert not all(torch.allclose(a, b) for a, b in zip(unmasked_clean, unmasked_noisy))
    assert masked_loss == clean_loss
    assert all(torch.equal(a, b) for a, b in zip(clean_grads, masked_grads))
    assert not all(torch.allclose(a, b) for a, b in zip(clean_grads, kept_grads))  # on kept tokens it counts


def test_the_curriculum_callback_advances_a_stage_and_the_dataset_follows():
    need("datasets")
    from stepcoder.integrations.trl import CurriculumCallback, cccs_dataset, make_reward

    problems = [p for p in load_problems("builtin").problems if p.solutions][:3]
    dataset = cccs_dataset(problems, window=2)
    reward = make_reward(problems)
    callback = CurriculumCallback(dataset.curriculum, reward)
    target = next(i for i, p in enumerate(problems) if len(dataset.curriculum.stage_prefixes[p.id]) > 1)
    ident = problems[target].id
    before = dataset[target]
    reward.pending = [(ident, 0, True), (ident, 0, False)]  # 1/2 >= 0.5 over a full window of 2: advance
    callback.on_step_end(None, None, None)
    after = dataset[target]
    assert (before["stage"], after["stage"]) == (0, 1) and len(after["prefix"]) < len(before["prefix"])
    assert after["prompt"].endswith(problems[target].context(after["prefix"])) and before["prompt"] != after["prompt"]
    reward.pending = [(ident, 0, True), (ident, 1, False)]  # a stale rollout (stage 0) is not counted
    callback.on_step_end(None, None, None)
    assert dataset[target]["stage"] == 1 and reward.pending == []
