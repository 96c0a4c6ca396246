"""A step's rollouts as padded tensors, and the learner's forward passes over them: per-token log-probs
(from hidden states through the fused LM head when the head is a plain linear map, else from logits),
the reference's, and the critic's values.

Layout: prompts left-padded, responses right-padded, so position ``P + t`` of every row holds response
token ``t``; the logits or hidden states that predict the responses are the last ``R + 1`` positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stepcoder import kernels, lora
from stepcoder.config import TrainConfig
from stepcoder.distributed import sharded, unwrap
from stepcoder.models import position_ids
from stepcoder.rollouts import Sample, reward_of


@dataclass
class Batch:
    input_ids: torch.Tensor       # [N, P + R]: left-padded prompts, right-padded responses
    attention_mask: torch.Tensor
    responses: torch.Tensor       # [N, R]
    action_mask: torch.Tensor     # [N, R]: generated tokens (EOS included)
    policy_mask: torch.Tensor     # action mask x FGO mask
    unexecuted: torch.Tensor      # [N, R]: generated tokens on lines no test ran (what FGO masks), in every arm
    scores: torch.Tensor          # [N]: the verdicts' rewards
    prompts: list[tuple[str, int]]  # [N]: each rollout's prompt (problem, CCCS stage): its group
    engine_logp: torch.Tensor | None = None  # [N, R]: the sampling engine's log-probs (vLLM), else None


def pad_batch(samples: list[Sample], tokenizer, config: TrainConfig, device) -> Batch:
    pad = tokenizer.pad_token_id
    width = max(len(s.prompt_ids) for s in samples)
    length = max(max(len(s.response_ids) for s in samples), 1)
    ids = torch.full((len(samples), width + length), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    action = torch.zeros(len(samples), length)
    fgo = torch.zeros(len(samples), length)
    executed = torch.zeros(len(samples), length)
    recorded = all(s.engine_logprobs is not None for s in samples)
    engine_logp = torch.zeros(len(samples), length)
    for row, sample in enumerate(samples):
        prompt, response = sample.prompt_ids, sample.response_ids
        ids[row, width - len(prompt):width] = torch.tensor(prompt)
        ids[row, width:width + len(response)] = torch.tensor(response, dtype=torch.long)
        attention[row, width - len(prompt):width + len(response)] = 1
        action[row, :len(response)] = 1
        fgo[row, :len(response)] = torch.tensor(sample.fgo, dtype=torch.float)
        executed[row, :len(response)] = torch.tensor(sample.executed or [1] * len(response), dtype=torch.float)
        if recorded:
            engine_logp[row, :len(response)] = torch.tensor(sample.engine_logprobs, dtype=torch.float)
    scores = torch.tensor([reward_of(s.verdict, config) - (config.truncation_penalty if s.truncated else 0.0)
                           for s in samples])
    return Batch(ids.to(device), attention.to(device), ids[:, width:].to(device), action.to(device),
                 (action * fgo).to(device), (action * (1 - executed)).to(device), scores.to(device),
                 [(s.problem.id, s.stage) for s in samples],
                 engine_logp.to(device) if recorded else None)


def learner_temperature(config: TrainConfig) -> float:
    """The temperature the learner's log-probs are taken at: the sampling one, or 1 for greedy rollouts
    (--temperature 0), which are scored under the model's own distribution."""
    return config.temperature or 1.0


def response_logits(model, batch: Batch, rows) -> torch.Tensor:
    """Logits at the positions that predict the response tokens plus one: [n, R + 1, V], computed only
    there (`logits_to_keep`), handed to the kernels as a causal LM's output."""
    width = batch.responses.shape[1]
    attention = batch.attention_mask[rows]
    return model(input_ids=batch.input_ids[rows], attention_mask=attention, position_ids=position_ids(attention),
                 logits_to_keep=width + 1, use_cache=False).logits


def response_hidden(model, batch: Batch, rows) -> torch.Tensor:
    """The last hidden states at the positions that predict the response tokens: [n, R, H]. The model
    runs through its own forward (so DDP sees it) with the LM head kept to one position and no KV cache;
    only the trunk's output is kept (a hook), not every layer's hidden states."""
    width = batch.responses.shape[1]
    attention = batch.attention_mask[rows]
    captured = []
    hook = lora.trunk(unwrap(model)).register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(input_ids=batch.input_ids[rows], attention_mask=attention, position_ids=position_ids(attention),
              logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return captured[0][:, -width - 1:-1]


def lm_head_weight(model, config: TrainConfig) -> torch.Tensor | None:
    """The LM head's weight when the output layer is a plain linear map (no bias, no logit scaling or
    softcapping): the losses then take hidden states and never materialize [tokens x vocab] logits.
    Not under FSDP2, where the weight outside the model's forward is a shard."""
    model = unwrap(model)
    head = model.get_output_embeddings()
    settings = model.config
    plain = (isinstance(head, torch.nn.Linear) and head.bias is None
             and not getattr(settings, "final_logit_softcapping", None)
             and getattr(settings, "logit_scale", None) in (None, 1, 1.0))
    return head.weight if plain and config.fused_lm_head == "auto" and not sharded(config.strategy) else None


def response_logprobs(model, batch: Batch, rows, config: TrainConfig) -> torch.Tensor:
    """Per-token log-probs of the responses, from hidden states when the head allows it."""
    weight = lm_head_weight(model, config)
    if weight is None:
        return kernels.logprobs_from_logits(response_logits(model, batch, rows), batch.responses[rows],
                                            learner_temperature(config))
    hidden = response_hidden(model, batch, rows)
    labels = batch.responses[rows]
    return kernels.linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                   learner_temperature(config)).view(labels.shape)


def reference_logprobs(reference, batch: Batch, rows, config: TrainConfig) -> torch.Tensor:
    """The reference's log-probs; a LoRA run's reference is its policy with the adapter switched off."""
    with lora.adapter_disabled(unwrap(reference)):
        return response_logprobs(reference, batch, rows, config)


def response_values(critic, batch: Batch, rows) -> torch.Tensor:
    """V of the state before each response token: [n, R]."""
    width = batch.responses.shape[1]
    return critic(batch.input_ids[rows], batch.attention_mask[rows])[:, -width - 1:-1]
