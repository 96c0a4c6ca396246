"""``python -m stepcoder.plan``: per-GPU memory of a training run, before renting the GPUs.

Takes the trainer's flags (``--model_name_or_path`` may be a directory holding only ``config.json``:
the models are built on the meta device, no weight is read) plus ``--nproc_per_node``,
``--gpu_memory_gb`` and ``--prompt_tokens``, and prints each rank's memory by component and whether the
peak fits:

    python -m stepcoder.plan --model_name_or_path /models/deepseek-coder-6.7b-instruct --strategy fsdp2 \\
        --nproc_per_node 8 --gpu_memory_gb 80 --gradient_checkpointing --rollouts_per_prompt 16 ...

What the trainer holds all the time is exact (its parameter, gradient and optimizer-state bytes are
those of the sharded or replicated tensors, as FSDP2 cuts each parameter's first dimension); the rest
— activations, logits, the KV cache, layers unsharded in flight — are estimates, and say so.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn

from stepcoder import lora
from stepcoder.config import ConfigError, TrainConfig, build_parser, parse_config
from stepcoder.distributed import compute_dtype, transformer_blocks
from stepcoder.warmup import WARMUP_BATCH

GB = 1e9
ACTIVATION_FACTOR = 34  # bytes / (token x hidden x bytes-per-element) a transformer block keeps for backward
                        # (Korthikanti et al. 2022, with fused attention: no seq x seq scores kept)


@dataclass
class Line:
    phase: str       # "static" (held throughout), "generation", "scoring", "update" (the peak of each, on top of
                     # static; "sharded warm-up" too), or "start-up", "warm-up" (before the static components exist)
    component: str
    bytes: float
    exact: bool


def shard_numel(parameter: torch.Tensor, ranks: int) -> int:
    """Elements of rank 0's shard: FSDP2 cuts dim 0 into `ranks` chunks of ceil(dim0 / ranks) rows."""
    if parameter.dim() == 0 or ranks == 1:
        return parameter.numel()
    return math.ceil(parameter.shape[0] / ranks) * (parameter.numel() // parameter.shape[0])


def held(module: nn.Module, ranks: int) -> int:
    """Elements one rank holds of `module`'s parameters (shared ones counted once)."""
    return sum(shard_numel(p, ranks) for p in module.parameters())


def meta_models(config: TrainConfig) -> tuple[nn.Module, nn.Module]:
    """(policy, critic) on the meta device: the architecture without weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    from stepcoder.models import ValueModel

    if config.model_name_or_path is None:  # the embedded default model (models.build_default_model)
        settings = GPT2Config(vocab_size=1024, n_positions=1024, n_embd=config.n_embd, n_layer=config.n_layer, n_head=4)
    else:
        settings = AutoConfig.from_pretrained(config.model_name_or_path, local_files_only=True)
    with torch.device("meta"):
        policy = AutoModelForCausalLM.from_config(settings)
        critic = ValueModel(copy.deepcopy(policy.base_model), settings.hidden_size)
    return policy, critic


def plan(config: TrainConfig, ranks: int, prompt_tokens: int, on_gpu: bool = True,
         gpu_gb: float = 80.0) -> list[Line]:
    """Each rank's memory by component (bytes)."""
    policy, critic = meta_models(config)
    settings = policy.config
    sharded = config.strategy == "fsdp2" and ranks > 1
    share = ranks if sharded else 1
    compute = compute_dtype(config.precision, torch.device("cuda" if on_gpu else "cpu")).itemsize
    lines = []
    adapted = config.lora_r > 0
    trained = [("policy", policy)] + ([("critic", critic)] if config.advantage == "gae" else [])  # grpo, rloo: none
    for name, model in trained:
        local = held(model, share)
        if adapted:  # the adapter (and the critic's value head) train; the base weights are one frozen copy
            body = model.trunk if name == "critic" else model
            shapes = lora.adapter_shapes(body, config.lora_r, config.lora_target_modules)
            shapes += [(1, settings.hidden_size), (1,)] if name == "critic" else []  # the value head
            local = sum(shard_numel(torch.empty(shape, device="meta"), share) for shape in shapes)
            name += " adapter"
        lines += [Line("static", f"{name} weights (fp32 masters)", 4 * local, True),
                  Line("static", f"{name} gradients (fp32)", 4 * local, True),
                  Line("static", f"{name} optimizer states (AdamW m, v: fp32)", 8 * local, True)]
    if adapted:
        lines.append(Line("static", "base weights (frozen, compute dtype; the reference and the critic's too)",
                          compute * held(policy, share), True))
    elif config.kl_coef > 0:  # beta = 0: no reference model
        stored = compute if sharded else 4  # unsharded it runs as the policy does: fp32 under autocast
        reference = 0 if config.reference_offload and sharded else stored * held(policy, share)
        lines.append(Line("static", "reference weights" + (" (CPU-offloaded)" if reference == 0 else ""), reference,
                          True))

    hidden, layers, vocab = settings.hidden_size, settings.num_hidden_layers, settings.vocab_size
    heads = settings.num_attention_heads
    kv_width = getattr(settings, "num_key_value_heads", None) or heads
    head_dim = getattr(settings, "head_dim", None) or hidden // heads
    total = sum(p.numel() for p in policy.parameters())
    block = max(sum(p.numel() for p in unit.parameters()) for unit in transformer_blocks(policy))
    root = total - sum(sum(p.numel() for p in unit.parameters()) for unit in transformer_blocks(policy))
    sequence = prompt_tokens + config.max_new_tokens
    rollouts = config.problems_per_step * config.rollouts_per_prompt
    micro = max(1, rollouts // config.num_mini_batches // config.gradient_accumulation_steps)

    if config.rollout_engine == "vllm":
        lines += engine_lines(config, policy, compute, gpu_gb)
    # Generation (HF): the policy unsharded once per generate call (or autocast's bf16 copies), and the KV cache.
    elif sharded:
        lines.append(Line("generation", "policy weights unsharded for generate", compute * total, True))
    elif compute < 4 and not adapted:  # LoRA: the base weights are held in the compute dtype already
        lines.append(Line("generation", "bf16 copies of the weights (autocast)", compute * total, False))
    if config.rollout_engine == "hf":
        kv = 2 * layers * config.generation_batch_size * sequence * kv_width * head_dim * compute
        lines.append(Line("generation", f"KV cache ({config.generation_batch_size} sequences x {sequence} tokens)", kv,
                          True))

    # Scoring and update: layers unsharded in flight (FSDP2: the root stays gathered, two blocks at a time).
    if sharded:
        flight = compute * (root + 2 * block)
        for phase in ("scoring", "update"):
            lines.append(Line(phase, "unsharded in flight (root + two blocks)", flight, False))
    chunk = config.forward_batch_size
    fused = config.fused_lm_head == "auto" and not sharded
    if fused:
        lines.append(Line("scoring", f"last hidden states ({chunk} rollouts)", chunk * sequence * hidden * compute,
                          False))
        lines.append(Line("scoring", "fp32 logits of one token chunk (fused head)", 128 << 20, False))
    else:
        lines.append(Line("scoring", f"logits ({chunk} rollouts)", chunk * (config.max_new_tokens + 1) * vocab * compute,
                          False))
    if config.gradient_checkpointing:
        activations = layers * micro * sequence * hidden * compute + micro * sequence * ACTIVATION_FACTOR * hidden * compute
    else:
        activations = layers * micro * sequence * ACTIVATION_FACTOR * hidden * compute
    lines.append(Line("update", f"activations (micro-batch {micro} x {sequence} tokens"
                      + (", checkpointed)" if config.gradient_checkpointing else ")"), activations, False))
    update_logits = micro * (config.max_new_tokens + 1) * vocab * (4 if fused else compute)
    lines.append(Line("update", "logits of the micro-batch (gradient written in place)", update_logits, False))
    if sharded:  # models built in host memory reach the device one FSDP unit at a time (learners.model_home)
        lines.append(Line("start-up", "one unit unsharded while sharding (fp32)", 4 * max(block, root), True))
    if config.sft_steps != 0:  # None: sized to the data, so some
        logits = Line("warm-up", "fp32 logits of the targets", WARMUP_BATCH * config.max_new_tokens * vocab * 4, False)
        if sharded and not adapted:  # the sharded policy trains, after sharding: on top of the static shares
            layer_activations = (layers * WARMUP_BATCH * sequence * hidden * compute if config.gradient_checkpointing
                                 else layers * WARMUP_BATCH * sequence * ACTIVATION_FACTOR * hidden * compute)
            lines += [Line("sharded warm-up", "its own AdamW m and v (fp32 shards)", 8 * held(policy, share), True),
                      Line("sharded warm-up", "unsharded in flight (root + two blocks)", compute * (root + 2 * block),
                           False),
                      Line("sharded warm-up", f"activations ({WARMUP_BATCH} examples x {sequence} tokens)",
                           layer_activations, False),
                      Line("sharded warm-up", logits.component, logits.bytes, False)]
        else:  # the whole model on each device, before anything is sharded
            lines += [Line("warm-up", "whole policy: fp32 weights, gradients, AdamW m and v", 16 * total, True),
                      Line("warm-up", f"activations ({WARMUP_BATCH} examples x {sequence} tokens, no checkpointing)",
                           layers * WARMUP_BATCH * sequence * ACTIVATION_FACTOR * hidden * compute, False), logits]
    order = ("static", "generation", "scoring", "update", "start-up", "warm-up", "sharded warm-up")
    return sorted(lines, key=lambda line: order.index(line.phase))


def engine_lines(config: TrainConfig, policy: nn.Module, compute: int, gpu_gb: float) -> list[Line]:
    """A colocated vLLM engine takes vllm_gpu_memory_utilization of the GPU: its copy of the weights in the
    compute dtype (a tensor-parallel share) and, in the rest, its KV cache and activations. With sleep
    mode it frees both while the learner trains, so they count in generation only. A weight sync holds
    one full parameter at a time (gathered from the FSDP2 shards, in fp32)."""
    tensor_parallel = config.vllm_tensor_parallel_size
    weights = compute * sum(p.numel() for p in policy.parameters()) / tensor_parallel
    share = config.vllm_gpu_memory_utilization * gpu_gb * GB
    phase = "generation" if config.vllm_enable_sleep_mode else "static"
    largest = max(p.numel() for p in policy.parameters())
    return [Line(phase, f"vLLM weights (compute dtype, 1/{tensor_parallel} per rank)", weights, True),
            Line(phase, f"vLLM KV cache and activations (the rest of {config.vllm_gpu_memory_utilization:g} x "
                        f"{gpu_gb:g} GB)", max(share - weights, 0.0), True),
            Line("update", "weight sync: one full parameter gathered (fp32)", 4 * largest, True)]


ALONE = ("start-up", "warm-up")  # phases before the static components exist (nothing is sharded or resident yet)


def peak(lines: list[Line]) -> float:
    """The largest of: static + each training phase, and each phase that comes before the static ones."""
    static = sum(line.bytes for line in lines if line.phase == "static")
    phases = {line.phase for line in lines} - {"static"}
    during = [static + sum(line.bytes for line in lines if line.phase == phase) for phase in phases - set(ALONE)]
    before = [sum(line.bytes for line in lines if line.phase == phase) for phase in phases & set(ALONE)]
    return max(during + before)


def report(lines: list[Line], config: TrainConfig, ranks: int, gpu_gb: float) -> str:
    total = peak(lines)
    dtype = compute_dtype(config.precision, torch.device("cuda"))
    title = (f"per-rank memory: {config.strategy} over {ranks} processes, {str(dtype).removeprefix('torch.')} "
             f"compute on fp32 masters, gradient checkpointing {'on' if config.gradient_checkpointing else 'off'}")
    width = max(11, *(len(line.phase) + 1 for line in lines))
    rows = [title, f"{'phase':<{width}}{'component':<60}{'GB':>9}"]
    for line in lines:
        rows.append(f"{line.phase:<{width}}{line.component:<60}{line.bytes / GB:>9.2f}"
                    + ("" if line.exact else "  (estimate)"))
    verdict = "fits" if total <= gpu_gb * GB else "does not fit"
    rows.append(f"peak (static + the largest phase, or the warm-up alone): {total / GB:.1f} GB per GPU: {verdict} in "
                f"{gpu_gb:g} GB")
    engine = [line for line in lines if line.component.startswith("vLLM KV cache")]
    if engine:  # vLLM refuses to start unless its whole share is free then, beside the learner's resident models
        resident = sum(line.bytes for line in lines if line.phase == "static" and not line.component.startswith("vLLM"))
        share = config.vllm_gpu_memory_utilization * gpu_gb * GB
        free = gpu_gb * GB - resident
        rows.append(f"vLLM start: its share ({share / GB:.1f} GB) must be free beside the learner's resident "
                    f"{resident / GB:.1f} GB: {'it is' if share <= free else 'it is not'} ({free / GB:.1f} GB free)")
    if engine and engine[0].bytes == 0:
        rows.append("vLLM: vllm_gpu_memory_utilization leaves no room for a KV cache beside its weights; raise it "
                    "or raise vllm_tensor_parallel_size")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> list[Line]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--nproc_per_node", type=int, default=1)
    parser.add_argument("--gpu_memory_gb", type=float, default=80.0)
    parser.add_argument("--prompt_tokens", type=int, default=1024, help="the longest prompt, in tokens")
    parser.add_argument("-h", "--help", action="store_true")
    own, rest = parser.parse_known_args(argv)
    if own.help:
        print(__doc__)
        build_parser().print_help()
        sys.exit(0)
    if own.nproc_per_node < 1 or own.gpu_memory_gb <= 0 or own.prompt_tokens < 1:
        sys.exit("error: --nproc_per_node and --prompt_tokens must be >= 1, --gpu_memory_gb > 0")
    try:
        config = parse_config(rest)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    lines = plan(config, own.nproc_per_node, own.prompt_tokens, gpu_gb=own.gpu_memory_gb)
    print(report(lines, config, own.nproc_per_node, own.gpu_memory_gb))
    return lines


if __name__ == "__main__":
    main()
