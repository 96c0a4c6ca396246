"""Sampling completions from a local transformers model (evaluation; the trainer has its own rollout)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from stepcoder.prompts import CODE_FENCE

# Files any one of which makes a directory's tokenizer loadable (fast, SentencePiece, byte-level BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


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


def load_model(path: str, device: str | None = None):
    """(model, tokenizer) from a local directory: nothing is downloaded. Left padding, a pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepcoder.models import quiet_transformers

    check_model_dir(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise ValueError(f"--model {path}: the tokenizer has neither a pad nor an EOS token, so generations "
                         "cannot be batched or stopped")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with quiet_transformers():  # its loading bar would cut through evaluate's own
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
    return model, tokenizer


def sample(model, tokenizer, prompts: Sequence[str], n: int, temperature: float, top_p: float,
           max_new_tokens: int, batch_size: int) -> Iterator[list[str]]:
    """For each prompt, in order, its `n` completions (decoded new tokens). Pure sampling when
    temperature > 0, greedy at 0; batched with the KV cache; stops at the closing fence or EOS."""
    import torch

    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    per_batch = max(1, batch_size // n) if n <= batch_size else 1
    for start in range(0, len(prompts), per_batch):
        chunk = list(prompts[start:start + per_batch])
        encoded = tokenizer(chunk, return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                    pad_token_id=tokenizer.pad_token_id, stop_strings=[CODE_FENCE], tokenizer=tokenizer,
                                    **sampling)
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for index in range(len(chunk)):
            yield texts[index * n:(index + 1) * n]
