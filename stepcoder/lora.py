"""LoRA policies through peft: one copy of the full-size weights for the policy, its reference and its
critic.

The base weights are frozen in the compute dtype and only the adapters (fp32) train. The reference is the
policy with its adapter switched off: the base weights as the run started. With GAE the critic's trunk is
a copy of the policy's module tree whose layers hold the very same base tensors, with an adapter of its
own, so policy and critic train at once without switching adapters (peft's ``set_adapter`` would freeze
the inactive one). Checkpoints keep the adapters; exports merge them into plain transformers weights.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections.abc import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

ADAPTER = "default"  # peft's name for the one adapter each model has
PREFIX = "base_model.model."  # what a PeftModel puts before the wrapped model's parameter names


def is_adapted(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


def language_model(model: nn.Module) -> nn.Module:
    """The transformers model, under a PeftModel wrapper or not (its generation_config, save_pretrained)."""
    return model.get_base_model() if is_adapted(model) else model


def trunk(model: nn.Module) -> nn.Module:
    """The body whose output is the last hidden state (GPT2Model in GPT2LMHeadModel)."""
    return language_model(model).base_model


def _target_names(targets: str) -> list[str] | None:
    """--lora_target_modules as module names; None for "all-linear" (peft resolves it)."""
    return None if targets == "all-linear" else [name.strip() for name in targets.split(",") if name.strip()]


def settings(model: nn.Module, r: int, alpha: float | None, targets: str, task_type: str | None) -> LoraConfig:
    """LoRA on `targets` ("all-linear": every linear layer but the output head, peft's and QLoRA's choice;
    or a comma-separated list of module names), alpha 2r unless given, no dropout: PPO's ratio needs the
    sampler and the learner to be the same function."""
    from transformers.pytorch_utils import Conv1D

    names = _target_names(targets)
    return LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=0.0,
                      target_modules=targets if names is None else names, task_type=task_type,
                      fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()))  # GPT-2's layers


def attach(policy: nn.Module, r: int, alpha: float | None, targets: str, dtype: torch.dtype) -> PeftModel:
    """The policy frozen in `dtype` (the compute dtype: a 7B base is 13.4 GB in bf16 where its fp32 masters
    would be 27 GB) with an fp32 adapter on it."""
    policy.requires_grad_(False).to(dtype)
    try:
        return _adapted(policy, settings(policy, r, alpha, targets, "CAUSAL_LM"))
    except ValueError as error:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"lora_target_modules: {targets!r}: {error}") from None


def _adapted(model: nn.Module, lora_settings: LoraConfig) -> PeftModel:
    with warnings.catch_warnings():  # peft asks transformers in a way transformers 5 deprecates
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        return get_peft_model(model, lora_settings)


def critic_trunk(policy: PeftModel) -> PeftModel:
    """The policy's trunk copied with each adapted layer replaced by the base layer it wraps, every base
    tensor shared (not copied), and a fresh adapter of the policy's settings on it."""
    body = trunk(policy)
    shared = {id(t): t for t in (*body.parameters(), *body.buffers())}
    for layer in body.modules():
        if isinstance(layer, LoraLayer):
            shared[id(layer)] = copy.deepcopy(layer.base_layer, shared)
    copied = copy.deepcopy(body, shared)
    policy_settings = policy.peft_config[ADAPTER]  # its targets resolved to names within the whole model
    targets = sorted({name.rsplit(".", 1)[-1] for name in policy_settings.target_modules})
    return _adapted(copied, dataclasses.replace(policy_settings, target_modules=targets, task_type=None))


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """The base model for the duration (a LoRA run's reference); a plain model is left as it is."""
    with model.disable_adapter() if is_adapted(model) else contextlib.nullcontext():
        yield


def plain_weights(model: nn.Module, state: dict[str, torch.Tensor], merge: bool) -> dict[str, torch.Tensor]:
    """A PeftModel's full state dict (gathered, so it works on shards too) as the wrapped transformers
    model's: each adapted weight W becomes W + scaling * B @ A (transposed for Conv1D) with `merge`, stays
    W without; the adapters' own tensors are dropped. A plain model's state is returned as it is."""
    if not is_adapted(model):
        return state
    layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}
    weights = {}
    for key, tensor in state.items():
        if ".lora_" in key:
            continue
        owner, _, leaf = key.rpartition(".base_layer.")
        if owner and merge and leaf == "weight":
            tensor = merged(layers[owner], tensor, state[f"{owner}.lora_A.{ADAPTER}.weight"],
                            state[f"{owner}.lora_B.{ADAPTER}.weight"])
        name = f"{owner}.{leaf}" if owner else key
        weights[name.removeprefix(PREFIX)] = tensor
    return weights


def merged(layer: LoraLayer, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W + scaling * B @ A (transposed for Conv1D), in float64, returned in W's dtype."""
    delta = b.double() @ a.double()
    delta = delta.T if layer.fan_in_fan_out else delta
    return (weight.double() + layer.scaling[ADAPTER] * delta).to(weight.dtype)


def adapter_shapes(model: nn.Module, r: int, targets: str) -> list[tuple[int, int]]:
    """The shapes of the adapter peft puts on `model` (A: r x in, B: out x r per adapted layer), read off
    the bare architecture (meta tensors are fine): the planner's figures."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = _target_names(targets)
    shapes = []
    for name, module in model.named_modules():
        if module is head or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        if names is not None and name.rsplit(".", 1)[-1] not in names:
            continue
        out, inp = module.weight.shape if isinstance(module, nn.Linear) else module.weight.shape[::-1]
        shapes += [(r, inp), (out, r)]
    return shapes
