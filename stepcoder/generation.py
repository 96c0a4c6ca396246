"""Sampling from a local transformers model: the settings the trainer and evaluate share (one BOS per
prompt, nothing of the checkpoint's generation_config) and model loading."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

from stepcoder.prompts import STOP_STRING

ENGINES = ("hf", "vllm")  # generation engines (stepcoder.engines): transformers' generate, vLLM

# Files any one of which makes a directory's tokenizer loadable (fast, SentencePiece, byte-level BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def encode_prompts(tokenizer, texts: Sequence[str]):
    """Left-padded prompt ids, with one BOS: when a chat template already rendered the BOS token into
    the text (deepseek-instruct, Llama 3), the tokenizer must not add another."""
    bos = tokenizer.bos_token
    rendered = bool(bos) and all(text.startswith(bos) for text in texts)
    return tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=not rendered)


def sampling_config(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0):
    """The generation settings, and only these: pure sampling at `temperature` (top_k 0 = off, nucleus at
    `top_p` 1 = off, as the trainer samples), greedy at 0. Stops at EOS (the tokenizer's and the checkpoint's) or a fence opening a line.
    Use with ``only_these_settings``: what the checkpoint's generation_config ships (a repetition
    penalty, top_k = 50, min_new_tokens) would otherwise fill every field left unset."""
    from transformers import GenerationConfig

    shipped = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(shipped if isinstance(shipped, list) else [shipped])} - {None}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if temperature > 0 \
        else {"do_sample": False}
    return GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=sorted(eos), stop_strings=[STOP_STRING], **sampling)


@contextlib.contextmanager
def only_these_settings(model, settings) -> Iterator[None]:
    """While generating, the model's own generation_config is `settings`, so nothing of the shipped one
    leaks into sampling (transformers fills a passed config's unset fields from the model's)."""
    from stepcoder.lora import language_model  # peft and torch: only where a model is

    model = language_model(model)  # a PeftModel reads, but does not set, its base model's attributes
    shipped = model.generation_config
    model.generation_config = settings
    try:
        yield
    finally:
        model.generation_config = shipped


def check_model_dir(path: str) -> None:
    """Raises ValueError naming `path` unless it holds a causal LM to sample from and its tokenizer:
    checked before anything is loaded, because transformers would build an empty tokenizer from a
    bare config and fail deep inside generate()."""
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"--model {path}: not a directory (a local transformers model is expected)")
    if (directory / "value_head.pt").exists():
        raise ValueError(f"--model {path}: a critic (a value head on a trunk), not a language model to sample "
                         "from; evaluate the policy/ or reference/ folder beside it")
    if not (directory / "config.json").is_file():
        raise ValueError(f"--model {path}: no config.json, so not a transformers model directory")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"--model {path}: no tokenizer in this directory (none of {', '.join(TOKENIZER_FILES)}); "
                         "save the model's tokenizer there with tokenizer.save_pretrained()")


def suited_max_new_tokens(tokenizer, solutions: Sequence[str]) -> int:
    """A generation budget for these problems: 1.5 x the 95th percentile of their canonical solutions'
    token counts (a model rarely needs more than the reference, and a weak model that rambles is cut
    early), within [64, 2048]; 512 when no problem has a solution."""
    if not solutions:
        return 512
    counts = sorted(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in solutions)
    return max(64, min(2048, int(1.5 * counts[int(0.95 * (len(counts) - 1))]) + 8))


def load_tokenizer(path: str):
    """The tokenizer of the model directory `path` (checked first): left padding, a pad token."""
    from transformers import AutoTokenizer

    check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ValueError(f"--model {path}: the tokenizer has neither a pad nor an EOS token, so generations "
                         "cannot be batched or stopped")
    return tokenizer


def load_model(path: str, device: str | None = None):
    """(model, tokenizer) from a local directory: nothing is downloaded. Left padding, a pad token."""
    import torch
    from transformers import AutoModelForCausalLM

    from stepcoder.models import quiet_transformers

    tokenizer = load_tokenizer(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with quiet_transformers():  # its loading bar would cut through evaluate's own
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
    return model, tokenizer
