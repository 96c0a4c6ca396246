"""The trainer's models: loading a local causal LM (or building the small default one offline), a pad
token distinct from EOS, and the critic (a value head on a copy of the trunk, or on the policy's)."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from stepcoder import lora

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"


def build_default_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE trained on `texts` (the built-in problems): nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    model.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   padding_side="left")


def build_default_model(tokenizer, seed: int, n_layer: int = 2, n_embd: int = 128, n_positions: int = 1024):
    """A GPT-2 from a config (by default 2 layers, 128 wide, 4 heads, 1024 positions), without dropout:
    small enough to train on 2 CPU cores."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def checkpoint_dtype(path: str) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (its config's), fp32 when it does not say."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def load_model(path: str, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a local directory; the tokenizer left-pads and has a pad token of its own.
    The trainer loads in fp32: the weights it trains are the optimizer's master weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    with quiet_transformers():  # under torchrun every rank would draw its own loading bar
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


def load_model_skeleton(path: str):
    """(model, tokenizer) as ``load_model`` gives them, with the weights on the meta device (no memory):
    a rank other than 0 of a sharded run receives its shards from rank 0 (``distributed.load_from_rank0``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    settings = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"), quiet_transformers():
        model = AutoModelForCausalLM.from_config(settings, dtype=torch.float32)
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


def load_reference(path: str, tokenizer, dtype: torch.dtype | None = None):
    """The frozen reference model as the policy started: the base checkpoint with its embeddings fitted
    to the policy's tokenizer by the same deterministic step (``fit_embeddings``)."""
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    fit_embeddings(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def ensure_pad_token(tokenizer, model) -> None:
    """Left padding, and a pad token distinct from EOS (pad = EOS would mask real EOS tokens and
    teach the model never to stop); a new token grows the embeddings if it needs a row."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        fit_embeddings(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id


def fit_embeddings(model, tokenizer) -> None:
    """Grows the embeddings (never shrinks them: checkpoints often have more rows than tokens, e.g.
    deepseek-coder's 32,256 for 32,022, and cutting rows changes every softmax) so every token id has a
    row. New rows are the mean of the old ones, not random: built twice, the model is the same to the
    bit, which is how a resumed run rebuilds the reference it did not save."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is None:
                continue
            layer.weight[rows:] = layer.weight[:rows].mean(0)
            if getattr(layer, "bias", None) is not None:
                layer.bias[rows:] = layer.bias[:rows].mean()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' and huggingface_hub's own progress bars off (save_pretrained draws "Writing model
    shards" for every model it writes): during a run the trainer's bar is the one a user watches."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def checkpoint_activations(model) -> None:
    """Recompute each block's activations in backward (non-reentrant, as FSDP2 needs)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def without_dropout(model: nn.Module) -> nn.Module:
    """PPO needs the sampler's and the learner's distributions to be the same function."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0 at each row's first real token, whatever the left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ValueModel(nn.Module):
    """V(s) for every position: a linear head on a trunk's last hidden state, in fp32."""

    def __init__(self, trunk: nn.Module, hidden_size: int):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        values = self.head(hidden.to(self.head.weight.dtype))  # bf16 under FSDP2's mixed-precision policy
        return values.float().sum(-1)  # the one output, as a new tensor: FSDP2 warns when a module returns a view


def make_critic(policy: nn.Module, share_trunk: bool) -> ValueModel:
    """A value head on the policy's trunk (`share_trunk`), on a copy of it, or, for a LoRA policy, on a
    trunk with an adapter of its own over the policy's base tensors (``stepcoder.lora.critic_trunk``)."""
    if lora.is_adapted(policy):
        trunk = lora.critic_trunk(policy)
    else:
        trunk = policy.base_model if share_trunk else copy.deepcopy(policy.base_model)
    return ValueModel(trunk, policy.config.hidden_size)


def save_critic(critic: ValueModel, directory: Path, share_trunk: bool, tokenizer, trunk_weights: dict,
                head_weights: dict) -> None:
    """The value head, and the trunk with the tokenizer when the critic has a trunk of its own (so the
    folder is a value model on its own: the trunk's AutoModel, its tokenizer, value_head.pt). The
    weights are given whole (gathered from the shards)."""
    directory.mkdir(parents=True, exist_ok=True)
    if not share_trunk:
        lora.language_model(critic.trunk).save_pretrained(
            directory, state_dict=lora.plain_weights(critic.trunk, trunk_weights, merge=True))
        tokenizer.save_pretrained(directory)
    torch.save(head_weights, directory / "value_head.pt")
