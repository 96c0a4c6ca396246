"""LoRA policies: the reference is the base model, only adapter tensors train, one copy of the full-size
weights for policy, reference and critic, exact resume, and a merged export that scores as the adapted
model does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoModelForCausalLM, AutoTokenizer

from stepcoder import batching, learners, lora, models, ppo, rollouts, train
from stepcoder.config import parse_config
from stepcoder.data import load_problems
from stepcoder.models import build_default_model, build_default_tokenizer
from stepcoder.plan import plan

TINY = ["--data", "builtin", "--limit", "8", "--problems_per_step", "4", "--max_new_tokens", "32", "--sft_steps", "0",
        "--num_mini_batches", "2", "--sandbox_workers", "1", "--save_steps", "100", "--eval_data", "none",
        "--lora_r", "4", "--learning_rate", "1e-2", "--critic_learning_rate", "1e-2"]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """The trainer on the CPU uses the PyTorch references (the Triton interpreter would be far too slow)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A saved model to put adapters on: a 2-layer GPT-2 (Conv1D layers, tied head) and its tokenizer."""
    directory = tmp_path_factory.mktemp("base")
    problems = load_problems("builtin").problems
    tokenizer = build_default_tokenizer([p.question + "\n" + s for p in problems for s in p.solutions], 400)
    model = build_default_model(tokenizer, seed=11, n_layer=2, n_embd=64)
    torch.manual_seed(11)
    with torch.no_grad():  # a trained-looking model, not GPT-2's tiny initial weights
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_base(base: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def logprobs64(model, batch: batching.Batch) -> torch.Tensor:
    """Response log-probs from the full logits in float64: the independent reference."""
    width = batch.responses.shape[1]
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=models.position_ids(batch.attention_mask)).logits
    logp = logits[:, -width - 1:-1].double().log_softmax(-1)
    return logp.gather(-1, batch.responses[..., None]).squeeze(-1) * batch.action_mask


def random_batch(config, tokenizer, rows: int = 8) -> batching.Batch:
    problem = load_problems("builtin").problems[0]
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    samples = []
    for _ in range(rows):
        prompt = torch.randint(2, len(tokenizer), (int(torch.randint(3, 12, (1,), generator=generator)),),
                               generator=generator).tolist()
        response = torch.randint(2, len(tokenizer), (int(torch.randint(1, 9, (1,), generator=generator)),),
                                 generator=generator).tolist()
        samples.append(rollouts.Sample(problem, 0, "", prompt, response, "", verdict="pass", fgo=[1] * len(response)))
    return batching.pad_batch(samples, tokenizer, config, "cpu")


@pytest.mark.parametrize("fused", ["auto", "off"])
def test_the_reference_is_the_base_model_with_the_adapter_off(base, fused):
    config = parse_config(["--model_name_or_path", str(base), *TINY, "--advantage", "grpo", "--fused_lm_head", fused,
                           "--output_dir", "unused"])
    policy, reference, tokenizer, _, _ = learners.build_models(config, [], {}, None, "cpu")
    assert reference is policy and lora.is_adapted(policy)
    with torch.no_grad():  # a trained adapter: B starts at zero, which would make the test vacuous
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    batch = random_batch(config, tokenizer)
    experience = ppo.score_rollouts(policy, reference, None, batch, config)
    base_logp = logprobs64(load_base(base), batch)
    torch.testing.assert_close(experience["ref_logp"].double() * batch.action_mask, base_logp, atol=1e-5, rtol=0)
    assert (experience["old_logp"].double() * batch.action_mask - base_logp).abs().max() > 1e-2  # the adapter acts
    # the adapter is on again after the reference's pass
    torch.testing.assert_close(ppo.score_rollouts(policy, None, None, batch, config)["old_logp"],
                               experience["old_logp"])


def full_size_copies(models: list[torch.nn.Module], base: torch.nn.Module) -> int:
    """Distinct storages holding a tensor the size of one of the base model's weight matrices."""
    big = {tuple(p.shape) for p in base.parameters() if p.dim() == 2 and p.numel() >= base.config.n_embd ** 2}
    storages = set()
    for model in models:
        for tensor in (*model.parameters(), *model.buffers()):
            if tuple(tensor.shape) in big:
                storages.add(tensor.untyped_storage().data_ptr())
    return len(storages)


@pytest.mark.parametrize("advantage, rank", [("gae", "4"), ("grpo", "4"), ("gae", "0")])
def test_a_lora_run_trains_only_adapters_on_one_copy_of_the_weights(base, tmp_path, wrapped, advantage, rank):
    """After two steps every base tensor of policy, reference and critic is the saved base to the bit, the
    adapters (and value head) moved, and the full-size weights exist once; the same count without LoRA
    (rank 0) is three copies, so the count can fail. state/ holds the adapters, not the base."""
    held = wrapped
    output = tmp_path / "run"
    # an untrained base fails every program alike, so GRPO's advantages are 0: the entropy bonus moves it
    argv = ["--model_name_or_path", str(base), *TINY, "--advantage", advantage, "--total_steps", "2",
            "--entropy_coef", "0.01", "--warmup_steps", "0", "--output_dir", str(output)]
    train.main([*argv, "--lora_r", rank] if rank == "0" else argv)
    reference = load_base(base)
    models = [held["policy"], held["reference"]] + ([held["critic"]] if held["critic"] is not None else [])
    parts = [model for model in models if model is not None]
    if rank == "0":
        assert full_size_copies(parts, reference) == 3 * full_size_copies([reference], reference)
        return
    assert held["reference"] is held["policy"]
    assert full_size_copies(parts, reference) == full_size_copies([reference], reference)
    policy_state = held["policy"].state_dict()
    for name, tensor in lora.plain_weights(held["policy"], policy_state, merge=False).items():
        assert torch.equal(tensor, reference.state_dict()[name]), name
    assert any(tensor.abs().sum() > 0 for name, tensor in policy_state.items() if "lora_B" in name)
    stored = dcp.FileSystemReader(str(output / "checkpoint-2" / "state")).read_metadata().state_dict_metadata
    weights = [key for key in stored if key.startswith(("policy.", "critic.")) and "state" not in key]
    assert weights and all("lora_" in key or key.startswith("critic.head.") for key in weights), weights
    if advantage == "gae":
        critic = held["critic"]
        trunk = lora.plain_weights(critic.trunk, critic.trunk.state_dict(), merge=False)
        for name, tensor in trunk.items():
            assert torch.equal(tensor, reference.transformer.state_dict()[name]), name
        assert any(t.abs().sum() > 0 for n, t in critic.trunk.state_dict().items() if "lora_B" in n)
        assert (output / "checkpoint-2" / "critic" / "value_head.pt").exists()
    else:
        assert held["critic"] is None and not (output / "checkpoint-2" / "critic").exists()


@pytest.mark.slow
def test_kill_and_resume_is_exact_and_the_merged_export_scores_as_the_adapted_model(tmp_path):
    """The small default model with a warm-up, GAE (policy and critic adapters, value head): three steps
    straight, or two then a resumed third, give the same metrics and the same adapter to the bit. The
    merged policy/ scores tokens as the base (reference/) with the adapter (adapter/, loaded by peft)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    argv = [*TINY[:TINY.index("--sft_steps")], "--sft_steps", "10", *TINY[TINY.index("--sft_steps") + 2:],
            "--n_embd", "64", "--total_steps", "3"]

    def run(name, *extra):
        return train.main([*argv, "--output_dir", str(tmp_path / name), *extra])

    straight = run("straight")
    run("resumed", "--stop_after_steps", "2")
    resumed = run("resumed", "--resume_from_checkpoint", "latest")

    def untimed(rows):
        return [{k: v for k, v in row.items() if not k.startswith("time_")} for row in rows]

    assert untimed(resumed) == untimed(straight)
    adapters = [load_file(tmp_path / name / "checkpoint-3" / "adapter" / "adapter_model.safetensors")
                for name in ("straight", "resumed")]
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    assert all(torch.equal(adapters[0][key], adapters[1][key]) for key in adapters[0])

    checkpoint = tmp_path / "straight" / "checkpoint-3"
    config = parse_config([*argv, "--output_dir", "unused"])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "policy")
    batch = random_batch(config, tokenizer, rows=8)
    merged = logprobs64(load_base(checkpoint / "policy"), batch)
    adapted = logprobs64(PeftModel.from_pretrained(load_base(checkpoint / "reference"), checkpoint / "adapter"), batch)
    base_only = logprobs64(load_base(checkpoint / "reference"), batch)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert (merged - base_only).abs().max() > 1e-4  # the adapter moved the model
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 3


def test_the_planner_counts_the_adapter_peft_builds(base):
    """The planner's adapter sizes equal peft's on a real model; with LoRA there is one base-weight line
    and no reference or full-size optimizer state."""
    policy = load_base(base)
    adapted = lora.attach(policy, 4, None, "all-linear", torch.float32)
    peft_count = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert sum(a * b for a, b in lora.adapter_shapes(load_base(base), 4, "all-linear")) == peft_count

    def components(*flags):
        config = parse_config(["--output_dir", "unused", "--n_embd", "64", "--advantage", "gae", "--kl_coef", "0.01",
                               *flags])
        return {line.component: line.bytes for line in plan(config, ranks=1, prompt_tokens=64, on_gpu=False)}

    full, low_rank = components(), components("--lora_r", "4")
    assert "reference weights" in full and "reference weights" not in low_rank
    planned = build_default_model(build_default_tokenizer(["x y z"], 1024), 0, 2, 64)
    assert low_rank["policy adapter weights (fp32 masters)"] == \
        4 * sum(a * b for a, b in lora.adapter_shapes(planned, 4, "all-linear"))
    critic = 4 * (sum(a * b for a, b in lora.adapter_shapes(planned.transformer, 4, "all-linear")) + 64 + 1)
    assert low_rank["critic adapter weights (fp32 masters)"] == critic
    assert low_rank["critic adapter optimizer states (AdamW m, v: fp32)"] == 2 * critic


def test_lora_learning_rates_default_to_the_measured_ones_unless_given(base):
    """A given rate is kept; otherwise LoRA gets 10x the full-weight default on a real model and the rate
    measured on the small default model (3e-4 for its policy, 10x for its critic)."""
    def rates(*flags):
        config = parse_config(["--output_dir", "unused", *flags])
        return config.learning_rate, config.critic_learning_rate

    real = ("--model_name_or_path", str(base))
    assert rates(*real) == (1e-5, 5e-5)
    assert rates(*real, "--lora_r", "8") == pytest.approx((1e-4, 5e-4))
    assert rates() == (1e-4, 1e-3)
    assert rates("--lora_r", "16") == pytest.approx((3e-4, 1e-2))
    assert rates("--lora_r", "16", "--learning_rate", "2e-3", "--critic_learning_rate", "3e-3") == (2e-3, 3e-3)
    assert rates(*real, "--lora_r", "8", "--learning_rate", "2e-5") == pytest.approx((2e-5, 5e-4))
