"""Processes, sharding and precision for the trainer.

A single process is world size 1 and every helper here is then a no-op. Under ``torchrun`` the models
are replicated (``ddp``) or sharded with PyTorch's own FSDP2 (``fsdp2``: ``fully_shard`` on each
transformer block, then the root). Whatever the strategy, parameters are fp32 master weights and the
optimizer keeps fp32 states; with bf16 the forward and backward compute in bf16 (FSDP2's mixed-precision
policy, autocast otherwise) and gradients are reduced in fp32.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("fsdp2", "ddp")
PRECISIONS = ("auto", "bf16", "fp32")


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(value: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(value)
    return value


def all_gather(obj) -> list:
    if world()[1] == 1:
        return [obj]
    gathered = [None] * world()[1]
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj):
    """Rank 0's `obj`, on every rank."""
    if world()[1] == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def setup(device_name: str | None, timeout_minutes: float = 60.0) -> torch.device:
    """Joins the process group under torchrun (NCCL on GPUs, gloo on CPUs) and picks this rank's device.
    `timeout_minutes` bounds every collective: long enough for rank 0's lone work between two of them
    (hashing a checkpoint), short enough that a dead rank ends the run rather than hanging it."""
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    device = torch.device(device_name or ("cuda" if use_cuda else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 compute with `precision` bf16, or auto on a GPU; fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def sharded(strategy: str) -> bool:
    return strategy == "fsdp2" and world()[1] > 1


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, each its own FSDP unit: the classes transformers names in
    ``_no_split_modules`` (GPT2Block, LlamaDecoderLayer, ...)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in names and module is not model]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no transformer blocks found to shard (no _no_split_modules)")
    return blocks


def shard(model: nn.Module, dtype: torch.dtype, device: torch.device, trunk: nn.Module | None = None,
          offload: bool = False) -> nn.Module:
    """FSDP2: each transformer block of `trunk` (default: the model) is a unit, then the root. Compute in
    `dtype`, gradients reduced in fp32; `offload` keeps the shards in CPU memory (the frozen reference).
    A model in host memory moves to the device unit by unit as it is sharded (fully_shard moves each
    unit's tensors, then keeps only this rank's shard): the device never holds the whole model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world()[1],))
    options = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)}
    if offload and device.type == "cuda":  # on CPUs the shards are in host memory anyway
        options["offload_policy"] = CPUOffloadPolicy()
    for block in transformer_blocks(trunk if trunk is not None else model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def load_from_rank0(model: nn.Module, full: dict | None, device: torch.device) -> None:
    """Fills a sharded `model` from rank 0's whole weights (`full`, taken before sharding; None elsewhere,
    where the model was built on the meta device): each tensor is broadcast and every rank keeps its
    shard, so only rank 0 ever holds a whole copy, in host memory. The skeleton's shards are first
    allocated on `device` in place (FSDP2 keeps its own parameter objects, which the optimizer must see),
    then written. Buffers outside the state dict (rotary frequencies, attention masks) follow the same way."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = world()[0]
    if any(parameter.is_meta for parameter in model.parameters()):
        model.to_empty(device=device)
    set_model_state_dict(model, full if rank == 0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    persistent = set(model.state_dict())
    extra = [name for name, _ in model.named_buffers() if name not in persistent]
    holder = [{name: buffer.cpu() for name, buffer in model.named_buffers() if name in extra} if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    for name, value in holder[0].items():  # after to_empty they hold garbage on the other ranks
        owner, _, attribute = name.rpartition(".")
        getattr(model.get_submodule(owner), attribute).copy_(value)


@torch.no_grad()
def copy_shards(source: nn.Module, target: nn.Module) -> None:
    """`target`'s parameters become `source`'s, by name, each rank copying its own shards (both sharded
    alike; the target may hold another dtype, or its shards in host memory)."""
    local = lambda tensor: tensor.to_local() if hasattr(tensor, "to_local") else tensor  # noqa: E731
    sources = dict(source.named_parameters())
    for name, parameter in target.named_parameters():
        local(parameter).copy_(local(sources[name]))


def replicate(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the processes (the model itself when there is one process)."""
    if world()[1] == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """While generating: a sharded model is unsharded once and stays so until the end (FSDP2 would
    otherwise all-gather every layer at every decoding step); a replicated one is left as it is."""
    units = fsdp_units(model)
    for unit in units:
        unit.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def no_sync(model: nn.Module, last: bool):
    """Gradient accumulation: synchronize gradients only on the last micro-batch."""
    if last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _without_gradient_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _without_gradient_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def autocast(dtype: torch.dtype, device: torch.device, strategy: str):
    """bf16 compute over fp32 weights for a replicated (or single) model; FSDP2's mixed-precision policy
    does it for sharded ones."""
    if dtype == torch.float32 or sharded(strategy):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def compute(config, device) -> contextlib.AbstractContextManager:
    """bf16 compute over the fp32 master weights where the run's --precision asks (a TrainConfig's
    precision and strategy)."""
    device = torch.device(device)
    return autocast(compute_dtype(config.precision, device), device, config.strategy)
