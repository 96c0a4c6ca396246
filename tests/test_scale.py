"""The trainer at scale, checked on CPUs over gloo with small models: FSDP2 and DDP updates equal the
single-process update on the same experience, fp32 master weights under a bf16 checkpoint, generation
under FSDP2 (one all-gather per unit per call), exact resume from sharded checkpoints, and the memory
planner, whose exact lines are compared with what FSDP2 allocates."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepcoder import evaluate, plan
from stepcoder.config import parse_config

HERE = Path(__file__).resolve().parent
TINY = ["--data", "builtin", "--limit", "8", "--advantage", "gae", "--kl_coef", "0.01", "--problems_per_step", "2", "--rollouts_per_prompt", "2", "--max_new_tokens", "24",
        "--sft_steps", "20", "--generation_batch_size", "4", "--num_mini_batches", "2", "--sandbox_workers", "1",
        "--save_steps", "100", "--sample_every", "1",
        "--device", "cpu"]  # gloo and the CPU, also on a one-GPU machine (NCCL would put two ranks on one GPU)
PORTS = iter(range(29601, 29700))


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the trainer uses the references
    return {**env, "OMP_NUM_THREADS": "1"}


def launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(next(PORTS)), *args] if processes > 1 else [sys.executable, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment(), cwd=HERE,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("runs")
    launch(str(HERE / "scale_runner.py"), str(out / "single.pt"), "fsdp2", processes=1)
    for strategy in ("fsdp2", "ddp"):
        launch(str(HERE / "scale_runner.py"), str(out / f"{strategy}.pt"), strategy)
    return {name: torch.load(out / f"{name}.pt", weights_only=False) for name in ("single", "fsdp2", "ddp")}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_one_update_over_two_processes_equals_the_single_process_update(runs, strategy):
    """The same 8 rollouts, split over two ranks: the statistics within 1e-4, and each model's weights
    after two epochs of AdamW at lr 1e-3 within 1e-4 (Frobenius, the whole model)."""
    single, other = runs["single"], runs[strategy]
    for name in ("policy_loss", "value_loss", "clipfrac", "approx_kl", "entropy", "ratio"):
        assert other["update"][name] == pytest.approx(single["update"][name], rel=1e-4, abs=1e-7), name
    for model in ("policy", "critic"):
        names = sorted(single["weights"][model])
        flat = [torch.cat([weights[n].double().flatten() for n in names])
                for weights in (other["weights"][model], single["weights"][model])]
        assert relative(*flat) < 1e-4, model


@pytest.mark.slow
def test_generation_under_fsdp2_unshards_once_per_call_and_samples_the_same_tokens(runs):
    fsdp2 = runs["fsdp2"]
    assert fsdp2["tokens"] == runs["single"]["tokens"]
    assert fsdp2["units"] == 3 and fsdp2["gathers"] == fsdp2["units"]  # 2 blocks and the root, once each


@pytest.mark.slow
def test_the_planners_exact_lines_equal_what_fsdp2_allocates(runs):
    config = parse_config(["--output_dir", "unused", "--strategy", "fsdp2"])
    lines = {line.component: line.bytes for line in plan.plan(config, 2, 128, on_gpu=False)}
    measured = runs["fsdp2"]["memory"]
    for component, key in (("policy weights (fp32 masters)", "weights"), ("policy gradients (fp32)", "gradients"),
                           ("policy optimizer states (AdamW m, v: fp32)", "optimizer")):
        assert lines[component] == pytest.approx(measured[key], rel=0.01), component
    assert measured["weights"] * 2 == pytest.approx(runs["ddp"]["memory"]["weights"], rel=0.01)


DEEPSEEK_6_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                 "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "vocab_size": 32256, "max_position_embeddings": 16384,
                 "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "bfloat16"}
README_FLAGS = ["--rollouts_per_prompt", "16", "--problems_per_step", "4", "--max_new_tokens", "1024",
                "--num_mini_batches", "4", "--gradient_accumulation_steps", "8", "--output_dir", "unused"]


def test_the_planner_says_ddp_does_not_fit_and_fsdp2_does_for_deepseek_6_7b(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_6_7B))
    common = ["--model_name_or_path", str(tmp_path), *README_FLAGS, "--nproc_per_node", "8", "--gpu_memory_gb", "80"]
    ddp = plan.main([*common, "--strategy", "ddp"])
    assert "does not fit in 80 GB" in capsys.readouterr().out
    fsdp2 = plan.main([*common, "--strategy", "fsdp2", "--gradient_checkpointing"])
    table = capsys.readouterr().out
    assert "fits in 80 GB" in table and "does not fit" not in table
    policy_weights = next(line.bytes for line in ddp if line.component == "policy weights (fp32 masters)")
    assert policy_weights == pytest.approx(6.74e9 * 4, rel=0.01)  # 6.74 B parameters in fp32
    sharded = next(line.bytes for line in fsdp2 if line.component == "policy weights (fp32 masters)")
    assert sharded == pytest.approx(policy_weights / 8, rel=0.01)
    # the reference (kl_coef > 0): fp32 when replicated, as the policy computes under autocast; sharded, bf16
    reference = {name: next(line.bytes for line in lines if line.component == "reference weights")
                 for name, lines in (("ddp", ddp), ("fsdp2", fsdp2))}
    assert reference == {"ddp": pytest.approx(policy_weights), "fsdp2": pytest.approx(policy_weights / 16, rel=0.01)}
    # sharded from host memory, one unit at a time: the start-up holds one unit unsharded, never the model
    start_up = next(line for line in fsdp2 if line.phase == "start-up")
    assert start_up.bytes < policy_weights / 20 and not any(line.phase == "warm-up" for line in fsdp2)
    # a warm-up under FSDP2 trains the sharded policy (its own AdamW shards on top of the static shares): it
    # fits; replicated, it trains the whole model on each device, before anything else: counted, no fit
    capsys.readouterr()
    warm = plan.main([*common, "--strategy", "fsdp2", "--gradient_checkpointing", "--sft_steps", "100"])
    assert "fits in 80 GB" in capsys.readouterr().out and not any(line.phase == "warm-up" for line in warm)
    states = next(line.bytes for line in warm if line.phase == "sharded warm-up" and "AdamW" in line.component)
    assert states == pytest.approx(2 * sharded, rel=0.01)
    whole_warm = plan.main([*common, "--strategy", "ddp", "--sft_steps", "100"])
    assert "does not fit in 80 GB" in capsys.readouterr().out
    whole = next(line.bytes for line in whole_warm if line.component.startswith("whole policy"))
    assert whole == pytest.approx(4 * policy_weights)


def test_the_planner_counts_a_colocated_vllm_engine(tmp_path, capsys):
    """--rollout_engine vllm: the engine's bf16 weight copy (its tensor-parallel share) and the rest of
    its share of the GPU, held all along, or only while generating with sleep mode; no HF KV cache."""
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_6_7B))
    common = ["--model_name_or_path", str(tmp_path), *README_FLAGS, "--nproc_per_node", "8", "--gpu_memory_gb", "80",
              "--rollout_engine", "vllm", "--vllm_gpu_memory_utilization", "0.4", "--gradient_checkpointing"]
    lines = {line.component: line for line in plan.main(common)}
    weights = lines["vLLM weights (compute dtype, 1/1 per rank)"]
    assert weights.bytes == pytest.approx(6.74e9 * 2, rel=0.01) and weights.phase == "static"
    assert lines["vLLM KV cache and activations (the rest of 0.4 x 80 GB)"].bytes == pytest.approx(
        0.4 * 80e9 - weights.bytes)
    assert not any(name.startswith("KV cache") or "unsharded for generate" in name for name in lines)
    split = {line.component: line for line in plan.main([*common, "--vllm_tensor_parallel_size", "2",
                                                          "--vllm_enable_sleep_mode"])}
    weights = split["vLLM weights (compute dtype, 1/2 per rank)"]
    assert weights.bytes == pytest.approx(6.74e9, rel=0.01) and weights.phase == "generation"
    capsys.readouterr()
    plan.main([*common, "--vllm_gpu_memory_utilization", "0.1"])  # 8 GB cannot hold 13.5 GB of weights
    assert "leaves no room for a KV cache" in capsys.readouterr().out
    # the engine starts after the learner's models are resident: its whole share must be free then
    plan.main(common)
    assert "vLLM start: its share (32.0 GB) must be free beside the learner's resident" in capsys.readouterr().out
    plan.main([*common, "--vllm_gpu_memory_utilization", "0.8"])
    assert "it is not" in capsys.readouterr().out


def _bf16_model(directory: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from stepcoder.data import load_builtin
    from stepcoder.models import build_default_tokenizer

    tokenizer = build_default_tokenizer([p.question + "\n" + p.solutions[0] for p in load_builtin().problems])
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=2,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id))
    model.to(torch.bfloat16).save_pretrained(directory)


def masters(checkpoint: Path) -> dict:
    """The fp32 master weights in a checkpoint's state/ (torch.distributed.checkpoint), by name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "state", checkpoint / "state.pt")
    return torch.load(checkpoint / "state.pt", weights_only=False)["policy"]


@pytest.mark.slow
@pytest.mark.parametrize("processes, strategy", [(1, "fsdp2"), (2, "ddp"), (2, "fsdp2")])
def test_a_bf16_checkpoint_learns_through_fp32_master_weights(tmp_path, processes, strategy):
    """One PPO step at lr 1e-6 from a checkpoint stored in bf16: in bf16 an update below ~0.4 % of a
    weight rounds away (pure-bf16 AdamW changed 1.9 % of the weights); the fp32 masters all move."""
    _bf16_model(tmp_path / "base")
    launch("-m", "stepcoder.train", "--model_name_or_path", str(tmp_path / "base"), *TINY, "--sft_steps", "0",
           "--learning_rate", "1e-6", "--warmup_steps", "0", "--total_steps", "1", "--strategy", strategy,
           "--output_dir", str(tmp_path / "run"), processes=processes)
    from transformers import GPT2LMHeadModel

    start = GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float32).state_dict()
    trained = masters(tmp_path / "run" / "checkpoint-1")
    name = "transformer.h.0.mlp.c_fc.weight"
    assert trained[name].dtype == torch.float32
    moved = (trained[name] != start[name]).double().mean()
    assert moved >= 0.99, f"{float(moved):.1%} of {name} moved"
    exported = GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "checkpoint-1" / "policy")
    assert exported.dtype == torch.bfloat16  # exported in the checkpoint's own dtype


@pytest.mark.slow
def test_fsdp2_end_to_end_with_exact_resume_and_an_exported_policy(tmp_path):
    """python -m stepcoder.train, 3 steps over 2 processes with FSDP2; killed after 2 and resumed, the
    third step's metrics are identical; checkpoint-3/policy is a plain model whose log-probs equal the
    trained fp32 masters', and evaluate --model judges it."""
    run = lambda name, *extra: launch("-m", "stepcoder.train", *TINY, "--total_steps", "3",  # noqa: E731
                                      "--output_dir", str(tmp_path / name), *extra)
    run("straight")
    run("resumed", "--stop_after_steps", "2")
    run("resumed", "--resume_from_checkpoint", "latest")
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "resumed")}
    strip = lambda m: {k: v for k, v in m.items() if not k.startswith("time_")}  # noqa: E731
    assert [m["step"] for m in rows["resumed"]] == [1, 2, 3]
    assert strip(rows["resumed"][2]) == strip(rows["straight"][2])
    assert sum(rows["straight"][0]["outcomes"].values()) == 2 * 2 * 2  # both ranks' rollouts
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(checkpoint / "policy").eval()
    trained = AutoModelForCausalLM.from_pretrained(checkpoint / "policy").eval()
    trained.load_state_dict(masters(checkpoint))
    ids = torch.tensor([[5, 17, 99, 3, 250, 8, 61]])
    with torch.no_grad():
        assert torch.equal(exported(ids).logits.log_softmax(-1), trained(ids).logits.log_softmax(-1))
    summary = evaluate.main(["--model", str(checkpoint / "policy"), "--limit", "1", "--max_new_tokens", "8",
                             "--workers", "1"])
    assert summary["num_programs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gradient_checkpointing_gives_the_same_update(precision, monkeypatch):
    """Recomputing activations in backward changes memory, not the update: the same experience gives the
    same weights with and without it (to rounding in bf16 compute, which runs here through CPU autocast)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from scale_runner import ARGS, experience_rows

    from stepcoder import batching, ppo
    from stepcoder.data import load_builtin
    from stepcoder.models import (
        build_default_model,
        build_default_tokenizer,
        checkpoint_activations,
        make_critic,
        without_dropout,
    )

    tokenizer = build_default_tokenizer([p.question + "\n" + s for p in load_builtin().problems for s in p.solutions])
    results = []
    for checkpointed in (False, True):
        config = parse_config(ARGS + ["--precision", precision] + (["--gradient_checkpointing"] if checkpointed else []))
        policy = without_dropout(build_default_model(tokenizer, seed=5))
        reference = without_dropout(build_default_model(tokenizer, seed=5)).eval().requires_grad_(False)
        critic = make_critic(policy, share_trunk=False)
        if checkpointed:
            checkpoint_activations(policy)
            checkpoint_activations(critic.trunk)
        optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3) for model in (policy, critic)]
        batch = batching.pad_batch(experience_rows(tokenizer), tokenizer, config, "cpu")
        experience = ppo.score_rollouts(policy, reference, critic, batch, config)
        ppo.ppo_update(policy, critic, optimizers, batch, experience, config, torch.Generator().manual_seed(0))
        results.append(torch.cat([p.detach().flatten() for p in [*policy.parameters(), *critic.parameters()]]))
    assert relative(results[1], results[0]) < (1e-6 if precision == "fp32" else 1e-3)


@pytest.mark.slow
def test_critic_free_groups_stay_whole_over_two_processes_with_a_lora_policy(tmp_path):
    """GRPO with 3 rollouts per prompt generated 4 at a time, over 2 processes (FSDP2, a LoRA policy): each
    rank's rollouts come in whole groups of one problem, no problem is split across ranks, the run (whose
    group check runs on every rank, every step) finishes, and its merged policy/ scores tokens as the base
    (reference/) with the adapter (adapter/, loaded by peft)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    launch("-m", "stepcoder.train", *TINY, "--advantage", "grpo", "--rollouts_per_prompt", "3", "--lora_r", "4",
           "--entropy_coef", "0.01", "--warmup_steps", "0", "--total_steps", "2", "--output_dir", str(tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    for step in (1, 2):
        ranks = [[row["task_id"] for row in rows if row["step"] == step and row["rank"] == rank] for rank in (0, 1)]
        for problems in ranks:
            assert len(problems) == 2 * 3
            assert all(len(set(problems[start:start + 3])) == 1 for start in range(0, 6, 3)), problems
        assert not set(ranks[0]) & set(ranks[1])
    checkpoint = tmp_path / "run" / "checkpoint-2"
    ids = torch.tensor([[5, 17, 99, 3, 250, 8, 61]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(checkpoint / "policy")(ids).logits.log_softmax(-1)
        base = AutoModelForCausalLM.from_pretrained(checkpoint / "reference")
        unadapted = base(ids).logits.log_softmax(-1)
        adapted = PeftModel.from_pretrained(base, checkpoint / "adapter")(ids).logits.log_softmax(-1)  # in place
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert (merged - unadapted).abs().max() > 1e-4  # the adapter trained (the entropy bonus moves it)


def _checkpoint(directory: Path, width: int, layers: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from stepcoder.data import load_builtin
    from stepcoder.models import build_default_tokenizer

    tokenizer = build_default_tokenizer([p.question + "\n" + p.solutions[0] for p in load_builtin().problems])
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=width, n_layer=layers, n_head=4,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(directory)
    return directory


def start(out: Path, processes: int, model: Path, *flags: str, whole: bool = False) -> list[dict]:
    out.mkdir()
    launch(str(HERE / "startup_runner.py"), str(out), *(["--whole_on_every_rank"] if whole else []), "--",
           "--model_name_or_path", str(model), *TINY, "--sft_steps", "0", "--eval_data", "none", *flags,
           "--output_dir", str(out / "run"), processes=processes)
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(processes)]


@pytest.mark.slow
def test_only_rank_0_reads_the_checkpoint_and_the_run_is_the_same(tmp_path):
    """FSDP2 from a checkpoint: ranks other than 0 build the models on the meta device and receive their
    shards from rank 0 (one whole copy per node, not one per rank). Two steps give the same metrics as
    when every rank reads the whole checkpoint."""
    model = _checkpoint(tmp_path / "model", 64, 2)
    rows = {}
    for name in ("from_rank0", "whole"):
        start(tmp_path / name, 2, model, "--total_steps", "2", whole=name == "whole")
        rows[name] = [{k: v for k, v in row.items() if "time" not in k and "seconds" not in k}
                      for row in map(json.loads, (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines())]
    assert len(rows["whole"]) == 2 and rows["from_rank0"] == rows["whole"]


@pytest.mark.slow
def test_host_memory_of_the_other_ranks_falls_with_their_number(tmp_path):
    """Peak host memory per rank at start-up (policy, critic, reference of a 25M-parameter model: about
    300 MB in fp32 together) with 1, 2 and 4 ranks: rank 0 holds the whole checkpoint once; every other
    rank only its shards, so its peak falls as ranks are added, and stays below rank 0's."""
    model = _checkpoint(tmp_path / "model", 512, 8)
    peaks = {n: [rank["peak_rss_mb"] for rank in start(tmp_path / f"n{n}", n, model, "--total_steps", "0")]
             for n in (1, 2, 4)}
    whole = start(tmp_path / "whole", 2, model, "--total_steps", "0", whole=True)
    others = {n: max(values[1:]) for n, values in peaks.items() if n > 1}
    print({"peaks_mb": peaks, "every_rank_whole_mb": [r["peak_rss_mb"] for r in whole]})
    assert others[4] < others[2] < peaks[1][0]
    assert others[2] < whole[1]["peak_rss_mb"] - 150  # the same rank, loading the whole checkpoint


@pytest.mark.slow
def test_the_warm_up_under_fsdp2_trains_the_shards_and_gives_the_same_run(tmp_path):
    """--sft_steps under FSDP2: the warm-up trains the sharded policy (no device holds the whole model and
    its AdamW states), then the reference and the critic's trunk take its shards. Two ranks give the run
    the warm-up on the whole model on every rank gives, to float rounding (FSDP2 sums a tied weight's two
    gradients in another order), and KL exactly 0 at the first step (the reference is the warmed-up policy)."""
    model = _checkpoint(tmp_path / "model", 64, 2)
    rows = {}
    for name in ("sharded", "whole"):
        start(tmp_path / name, 2, model, "--total_steps", "2", "--sft_steps", "20", whole=name == "whole")
        rows[name] = [{k: v for k, v in row.items() if "time" not in k and "seconds" not in k}
                      for row in map(json.loads, (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines())]
    assert len(rows["whole"]) == 2 and rows["sharded"][0]["kl"] == 0.0
    for sharded_row, whole_row in zip(rows["sharded"], rows["whole"]):
        assert sharded_row.keys() == whole_row.keys()
        for key, value in whole_row.items():
            if isinstance(value, float):
                assert sharded_row[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key
            else:
                assert sharded_row[key] == value, key
