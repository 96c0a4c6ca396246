"""Checkpoints: everything a run needs to continue exactly, written to a staging folder and renamed
into place.

    checkpoint-N/
        state/                 torch.distributed.checkpoint: the weights that train (fp32 masters; with
                               LoRA the adapters and the value head only) and their optimizer states,
                               sharded as the run holds them (each rank writes its own)
        schedulers.pt, curriculum.json, trainer_state.json, config.json, rng_rank<R>.pt
        manifest.json          written last: every other file's size and SHA-256, the step, the code
                               version; resume checks it first (``find``)
        policy/                a plain transformers directory with the tokenizer, in the checkpoint's dtype
                               (with LoRA: the adapter merged in)
        adapter/               LoRA runs: the policy's adapter as peft saves it (PeftModel.from_pretrained)
        reference/             the same for the reference (with LoRA: the base weights), when it is not
                               the base checkpoint
        critic/                the critic's trunk, value_head.pt and the tokenizer (GAE runs only)

Resume builds the models as a fresh run does (the policy from ``policy/``; with LoRA from the base
weights, ``reference/`` or the base checkpoint, and a new adapter), shards or replicates them, then loads
``state/`` into them: bit for bit the masters and optimizer states it saved.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import random
import shutil
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from stepcoder import lora
from stepcoder.distributed import barrier, unwrap, world
from stepcoder.models import quiet_transformers, save_critic


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state_dict(model) -> dict:
    """The whole model's weights on the CPU, gathered from the shards (on every rank: collective)."""
    return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export(model, directory: Path, tokenizer, dtype: torch.dtype, merge: bool = True) -> None:
    """A plain transformers directory (weights in `dtype`, the tokenizer): collective, rank 0 writes. A
    LoRA model's adapter is merged into the weights (`merge`) or left out (its base weights); with
    `merge` its adapter is also saved beside, in peft's format, as ``adapter/``."""
    full = full_state_dict(model)
    weights = {name: tensor.to(dtype) for name, tensor in lora.plain_weights(unwrap(model), full, merge).items()}
    if world()[0] == 0:
        with quiet_transformers():
            lora.language_model(unwrap(model)).save_pretrained(directory, state_dict=weights)
            tokenizer.save_pretrained(directory)
            if merge and lora.is_adapted(unwrap(model)):
                unwrap(model).save_pretrained(directory.parent / "adapter", state_dict=full)
        # save_pretrained records the model's (fp32) dtype; a loader would then upcast the bf16 files.
        settings = json.loads((directory / "config.json").read_text())
        settings["dtype"] = str(dtype).removeprefix("torch.")
        (directory / "config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def _trained(policy, critic, optimizers) -> list[tuple[str, torch.nn.Module, torch.optim.Optimizer]]:
    """(name, model, optimizer) of what trains: the policy, and the critic when the run has one."""
    models = [("policy", policy)] + ([("critic", critic)] if critic is not None else [])
    return [(name, unwrap(model), optimizer) for (name, model), optimizer in zip(models, optimizers)]


# Only what trains: a LoRA run's frozen base weights are the reference's (or the base checkpoint's), not
# state; loading then leaves them out (strict=False). A checkpoint that lacks a weight the run trains (a LoRA
# run resumed without --lora_r, or the reverse) is refused by dcp.load, naming the weight.
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)


def _frozen(model) -> set[str]:
    """Names of the frozen parameters, tied aliases included (a tied LM head is its embedding's alias)."""
    return {name for name, parameter in model.named_parameters(remove_duplicate=False) if not parameter.requires_grad}


def _training_state(policy, critic, optimizers) -> dict:
    state = {}
    for name, model, optimizer in _trained(policy, critic, optimizers):
        frozen = _frozen(model)  # ignore_frozen_params misses the aliases
        state[name] = {key: value for key, value in get_model_state_dict(model, options=TRAINED_ONLY).items()
                       if key not in frozen}
        state[f"{name}_optimizer"] = get_optimizer_state_dict(model, optimizer, options=TRAINED_ONLY)
    return state


class SaveError(RuntimeError):
    """A checkpoint that could not be written (a full disk, most often); the message says what is left."""


def save(output: Path, step: int, *state, **options) -> Path:
    """Every rank calls this (arguments as ``_write``'s). A failure to write (a full disk, a quota, an I/O
    error) removes what was staged, leaves every earlier checkpoint as it was, and is a SaveError saying why
    and how to go on."""
    try:
        return _write(output, step, *state, **options)
    except (OSError, RuntimeError, CheckpointException, SafetensorError) as error:
        cause = error
        if isinstance(error, CheckpointException) and error.failures:  # dcp: each failed rank's own exception
            cause = next(iter(error.failures.values()))[0]
        full = _out_of_space(output, cause)
        shutil.rmtree(_staging(output, step), ignore_errors=True)  # give the space back
        if isinstance(error, RuntimeError) and not full:
            raise  # not a failed write (torch's writer says only "file write failed"): a bug, traced
        raise SaveError(_save_failure(output, step, cause, full)) from error


def _staging(output: Path, step: int) -> Path:
    """Where checkpoint-`step` is written before it is renamed into place."""
    return output / f".staging-checkpoint-{step}"


def _out_of_space(output: Path, error: BaseException) -> bool:
    """The write failed for want of space: ENOSPC or EDQUOT, as an OSError or in the text safetensors gives
    (torch's zip writer gives neither), or the device has under 1 MiB free now."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left" in str(error) or "os error 28" in str(error) or shutil.disk_usage(output).free < 2**20


def _save_failure(output: Path, step: int, error: BaseException, full: bool) -> str:
    reason = f"no space left on the device ({shutil.disk_usage(output).free / 2**20:.1f} MiB free once the " \
             "partial checkpoint was removed)" if full else f"{type(error).__name__}: {error}"
    whole = [path for path in checkpoints(output) if damage(path, hashes=False) is None]
    kept = f"{whole[-1]} is whole and untouched" if whole else "there is no earlier checkpoint"
    advice = "free space (or lower --save_total_limit)" if full else "fix the cause"
    return (f"could not write checkpoint-{step} in {output}: {reason}. Nothing of it was kept; {kept}. "
            f"The run stops here: {advice}, then continue with --resume_from_checkpoint latest")


def _write(output: Path, step: int, models: dict, tokenizer, optimizers, schedulers, curriculum, trainer_state: dict,
           config_json: str, generator: torch.Generator, export_dtype: torch.dtype, save_reference: bool,
           share_trunk: bool, keep: int) -> Path:
    """`models`: policy, critic, reference (as the run holds them)."""
    rank, _ = world()
    final, staging = output / f"checkpoint-{step}", _staging(output, step)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    torch.save({"rng": rng_state(), "generator": generator.get_state()}, staging / f"rng_rank{rank}.pt")
    with _one_process_is_fine():
        dcp.save(_training_state(models["policy"], models["critic"], optimizers), checkpoint_id=staging / "state",
                 no_dist=not dist.is_initialized())
    export(models["policy"], staging / "policy", tokenizer, export_dtype)
    if save_reference:
        reference = models["reference"]
        export(reference, staging / "reference", tokenizer, next(unwrap(reference).parameters()).dtype, merge=False)
    critic_weights = full_state_dict(models["critic"]) if models["critic"] is not None else None
    if rank == 0:
        if critic_weights is not None:
            critic = unwrap(models["critic"])
            trunk = {name[len("trunk."):]: tensor.to(export_dtype) for name, tensor in critic_weights.items()
                     if name.startswith("trunk.")}
            head = {name[len("head."):]: tensor for name, tensor in critic_weights.items() if name.startswith("head.")}
            with quiet_transformers():
                save_critic(critic, staging / "critic", share_trunk, tokenizer, trunk_weights=trunk,
                            head_weights=head)
        torch.save([s.state_dict() for s in schedulers], staging / "schedulers.pt")
        (staging / "curriculum.json").write_text(json.dumps(curriculum.state_dict() if curriculum else None))
        (staging / "trainer_state.json").write_text(json.dumps(dict(trainer_state, step=step), indent=2))
        (staging / "config.json").write_text(config_json)
        write_manifest(staging, step)  # last: a folder with a manifest that checks out is whole
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _sync_folder(output)  # the rename itself survives a power cut
        for old in checkpoints(output)[:-keep]:  # only now: the newest is whole (its manifest came first)
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load(checkpoint: Path, policy, critic, optimizers, schedulers, generator: torch.Generator) -> dict:
    """Loads the training state into models already built and wrapped as the saving run held them; sets
    the RNG states; returns the trainer state (step, data position)."""
    state = _training_state(policy, critic, optimizers)
    with _one_process_is_fine():
        dcp.load(state, checkpoint_id=checkpoint / "state", no_dist=not dist.is_initialized())
    for name, model, optimizer in _trained(policy, critic, optimizers):
        set_model_state_dict(model, state[name], options=TRAINED_ONLY)
        set_optimizer_state_dict(model, optimizer, state[f"{name}_optimizer"], options=TRAINED_ONLY)
    for scheduler, saved in zip(schedulers, torch.load(checkpoint / "schedulers.pt", weights_only=False)):
        scheduler.load_state_dict(saved)
    saved_rng = torch.load(checkpoint / f"rng_rank{world()[0]}.pt", weights_only=False)
    set_rng_state(saved_rng["rng"])
    generator.set_state(saved_rng["generator"])
    return json.loads((checkpoint / "trainer_state.json").read_text())


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """torch.distributed.checkpoint warns on every save and load without a process group, which is how a
    single-process run uses it on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


MANIFEST = "manifest.json"
HASH_THREADS = 8  # files hash in parallel (hashlib releases the GIL): a 7B checkpoint is ~100 GB


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the checkpoint and the file."""


def _sha256(path: Path, sync: bool = False) -> str:
    """The file's SHA-256; with `sync`, after its data is on the disk (fsync), so that a manifest written
    next never vouches for bytes a power cut could still take."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _sync_folder(folder: Path) -> None:
    """fsync a folder: the names created or renamed in it are on the disk."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST)


def write_manifest(folder: Path, step: int) -> None:
    """manifest.json: each file's size and SHA-256, the step and the code version."""
    from stepcoder import __version__

    files = _files(folder)
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        digests = list(pool.map(functools.partial(_sha256, sync=True), files))
    entries = {str(path.relative_to(folder)): {"bytes": path.stat().st_size, "sha256": digest}
               for path, digest in zip(files, digests)}
    with open(folder / MANIFEST, "w") as f:
        f.write(json.dumps({"step": step, "stepcoder": __version__, "files": entries}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    for child in {path.parent for path in files} | {folder}:
        _sync_folder(child)


def damage(folder: Path, hashes: bool = True) -> str | None:
    """What is wrong with a checkpoint (naming the file), or None when every file its manifest lists is
    there with its size (and, with `hashes`, its SHA-256)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        entries = manifest["files"]
    except FileNotFoundError:
        return f"{folder / MANIFEST} is missing (the checkpoint was not finished, or predates manifests)"
    except (ValueError, KeyError, TypeError) as error:
        return f"{folder / MANIFEST} is unreadable ({type(error).__name__}: {error})"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    if hashes:
        paths = [folder / name for name in entries]
        with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
            for path, digest in zip(paths, pool.map(_sha256, paths)):
                if digest != entries[str(path.relative_to(folder))]["sha256"]:
                    return f"{path} does not match its SHA-256 in the manifest (the file was changed or damaged)"
    return None


def checkpoints(output: Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    found = [path for path in output.glob("checkpoint-*") if path.is_dir() and path.name[11:].isdigit()]
    return sorted(found, key=lambda path: int(path.name[11:]))


def find(output_dir: str, resume_from: str | None) -> Path | None:
    """The checkpoint to resume from, verified against its manifest. `latest`: the newest intact one
    (each damaged one skipped is said, with why); a path: that one, or CheckpointError naming the file."""
    if resume_from is None:
        return None
    if resume_from != "latest":
        problem = _check(Path(resume_from))
        if problem is not None:
            raise CheckpointError(f"cannot resume from {resume_from}: {problem}")
        return Path(resume_from)
    for candidate in reversed(checkpoints(Path(output_dir))):
        problem = _check(candidate)
        if problem is None:
            return candidate
        if world()[0] == 0:
            print(f"warning: skipping {candidate}: {problem}", file=sys.stderr)
    return None


def _check(folder: Path) -> str | None:
    """``damage``, except that a checkpoint written before manifests existed is taken, unverified."""
    if folder.is_dir() and not (folder / MANIFEST).exists() and (folder / "trainer_state.json").exists():
        if world()[0] == 0:
            print(f"warning: {folder} has no {MANIFEST} (written before checkpoints carried one): resuming from it "
                  "unverified", file=sys.stderr)
        return None
    return damage(folder)
