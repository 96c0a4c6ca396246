"""Run by tests/test_scale.py in one process or under torchrun: one PPO update on fixed experience, and
generation, with the trainer's own functions, so that a sharded or replicated run can be compared with a
single-process one.

    python scale_runner.py OUT.pt STRATEGY           (or torch.distributed.run --nproc_per_node 2 ...)

The experience (prompts, responses, rewards, FGO masks) is drawn from a fixed seed; each rank takes its
share of the rows (rank r: rows r, r + W, ...), so the ranks together hold what the single process holds.
Rank 0 writes the update's statistics, the updated policy's and critic's full weights, the generated
tokens, how many FSDP parameter groups all-gathered during one generate call, and its bytes of weights,
gradients and optimizer states.
"""
from __future__ import annotations

import os
import random
import sys

import torch

from stepcoder import batching, checkpoint, learners, ppo, rollouts, startup
from stepcoder.config import parse_config
from stepcoder.data import load_builtin
from stepcoder.distributed import fsdp_units, setup, unwrap, world
from stepcoder.engines import Sampling
from stepcoder.models import build_default_model, build_default_tokenizer, make_critic, without_dropout

ROWS = 8
ARGS = ["--output_dir", "unused", "--advantage", "gae", "--kl_coef", "0.01", "--problems_per_step", "4", "--rollouts_per_prompt", "2", "--num_mini_batches", "1",
        "--ppo_epochs", "2", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
        "--critic_learning_rate", "1e-3", "--max_new_tokens", "6", "--forward_batch_size", "3", "--fused_lm_head", "off"]


def experience_rows(tokenizer) -> list[rollouts.Sample]:
    rng = random.Random(11)
    problems = load_builtin().problems
    samples = []
    for row in range(ROWS):
        prompt = tokenizer(problems[row].question[:rng.randint(20, 80)])["input_ids"]
        response = [rng.randrange(3, len(tokenizer)) for _ in range(rng.randint(2, 7))]
        samples.append(rollouts.Sample(problem=problems[row], stage=0, prefix="", prompt_ids=prompt, response_ids=response,
                                    completion="", verdict=rng.choice(["pass", "wrong_answer", "compile_error"]),
                                    fgo=[rng.choice([0, 1, 1]) for _ in response]))
    return samples


def local_bytes(model, optimizer) -> dict:
    """This rank's bytes of parameters, gradients and optimizer states (the shards it holds)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    params = list(model.parameters())
    states = [value for state in optimizer.state.values() for value in state.values()
              if torch.is_tensor(value) and value.dim() > 0]
    return {"weights": sum(local(p).numel() * local(p).element_size() for p in params),
            "gradients": sum(local(p.grad).numel() * local(p.grad).element_size() for p in params if p.grad is not None),
            "optimizer": sum(local(s).numel() * local(s).element_size() for s in states)}


def main(out: str, strategy: str) -> None:
    device = setup("cpu")
    rank, ranks = world()
    config = parse_config(ARGS + ["--strategy", strategy])
    tokenizer = build_default_tokenizer([p.question + "\n" + s for p in load_builtin().problems for s in p.solutions])
    policy = without_dropout(build_default_model(tokenizer, seed=5))
    reference = without_dropout(build_default_model(tokenizer, seed=5)).eval().requires_grad_(False)
    critic = make_critic(policy, share_trunk=False)
    train_policy, train_critic = learners.wrap_models(policy, critic, reference, config, device)
    optimizers = [torch.optim.AdamW(train_policy.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0),
                  torch.optim.AdamW(train_critic.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)]
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    gathers = []
    original = FSDPParamGroup.unshard

    def counting(group, *args, **kwargs):  # an unshard that will all-gather (the group is sharded, none pending)
        if not group.is_unsharded and group._all_gather_result is None:
            gathers.append(1)
        return original(group, *args, **kwargs)

    FSDPParamGroup.unshard = counting
    torch.manual_seed(123)
    prompts = [p.question[:60] for p in load_builtin().problems[:2]]
    engine = startup.start_engine(config, train_policy, tokenizer, 0, device)  # the run's HF engine
    pairs = [(g.prompt_ids, g.response_ids) for g in engine.generate(prompts, Sampling(12, config.temperature))]
    FSDPParamGroup.unshard = original

    samples = experience_rows(tokenizer)[rank::ranks]
    batch = batching.pad_batch(samples, tokenizer, config, device)
    experience = ppo.score_rollouts(train_policy, reference, train_critic, batch, config)
    update = ppo.ppo_update(train_policy, train_critic, optimizers, batch, experience, config,
                            torch.Generator().manual_seed(0))
    batching.response_logits(train_policy, batch, slice(None)).float().sum().backward()  # gradients, to count them
    memory = local_bytes(train_policy, optimizers[0])
    weights = {name: checkpoint.full_state_dict(model) for name, model in
               (("policy", train_policy), ("critic", train_critic))}
    if rank == 0:
        torch.save({"update": update, "weights": weights, "tokens": [r for _, r in pairs], "gathers": len(gathers),
                    "units": len(fsdp_units(unwrap(train_policy))), "memory": memory}, out)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
