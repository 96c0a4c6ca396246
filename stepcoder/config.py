"""The trainer's configuration: one dataclass, flat command-line flags with TRL-like names, and an
optional YAML file (``--config``) whose keys are the same names. Flags override the file; every value
is checked before any work starts."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import netrc
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_type_hints

from stepcoder.advantages import ESTIMATORS
from stepcoder.distributed import PRECISIONS, STRATEGIES
from stepcoder.generation import ENGINES
from stepcoder.kernels.reference import KL_ESTIMATORS

IS_MODES = ("none", "token", "sequence")  # --rollout_is: importance weights per token, per sequence, or none


@dataclass
class TrainConfig:
    # model and data
    model_name_or_path: str | None = field(default=None, metadata={"help": "local transformers causal LM; none: "
                                                                           "build the small default model"})
    n_layer: int = field(default=2, metadata={"help": "layers of the small default model (no "
                                                      "--model_name_or_path)"})
    n_embd: int = field(default=128, metadata={"help": "width of the small default model (a multiple of 4: 4 "
                                                       "heads)"})
    data: str = field(default="synthetic:train", metadata={"help": "apps_plus:PATH, apps:DIR, humaneval, mbpp:PATH, "
                                                                   "builtin, synthetic:train"})
    difficulty: str | None = field(default=None, metadata={"help": "only problems of this difficulty"})
    limit: int | None = field(default=None, metadata={"help": "only the first LIMIT problems"})
    output_dir: str = field(default="stepcoder-output", metadata={"help": "metrics, samples, checkpoints"})
    seed: int = 0
    # held-out evaluation: full programs, before the first update, after the last, every eval_every steps
    eval_data: str | None = field(default=None, metadata={"help": "problems to evaluate on (specs as --data); "
                                                                  "default: synthetic:heldout for synthetic:train, "
                                                                  "the other APPS+ split (train.json <-> "
                                                                  "valid.json) beside apps_plus data, else none"})
    eval_every: int | None = field(default=None, metadata={"help": "also evaluate every N steps"})
    eval_samples: int = field(default=4, metadata={"help": "programs sampled per held-out problem"})
    eval_temperature: float = field(default=0.2, metadata={"help": "sampling temperature of the evaluation (0: "
                                                                   "greedy)"})
    eval_batch_size: int = field(default=64, metadata={"help": "programs per generate call in the evaluation"})
    eval_limit: int | None = field(default=None, metadata={"help": "only the first N held-out problems"})
    start_evaluation: str | None = field(default=None, metadata={"help": "eval/step-0.json of the starting model "
                                                                         "on the same held-out problems (e.g. "
                                                                         "another run's from the same start): "
                                                                         "step 0's evaluation, not run again"})
    # warm-up (supervised pass over canonical solutions)
    sft_steps: int | None = field(default=0, metadata={"help": "supervised steps on canonical solutions before "
                                                               "PPO (the small default model: 1000, or 6 passes "
                                                               "over its examples when fewer)"})
    sft_learning_rate: float = 1e-4
    sft_data: str | None = field(default=None, metadata={"help": "problems the warm-up trains on (specs as --data; "
                                                                 "default: the training problems)"})
    sft_whole_programs: bool = field(default=False, metadata={"help": "warm up on whole programs only, not on "
                                                                      "every CCCS prefix of them"})
    # rollouts
    total_steps: int = 100
    problems_per_step: int = 8
    rollouts_per_prompt: int = 4
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch_size: int = 16
    chat: str = field(default="auto", metadata={"help": "chat-template prompts: auto, on, off"})
    rollout_engine: str = field(default="hf", metadata={"help": "hf (the learner's own generate) or vllm (in "
                                                                 "this process, weights pushed after every "
                                                                 "update; pip install -e \".[vllm]\")"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vllm: the share of GPU memory "
                                                                               "its weights and KV cache take"})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: ranks one engine spans (under "
                                                                         "torchrun; must divide the ranks)"})
    vllm_enable_sleep_mode: bool = field(default=False, metadata={"help": "vllm: free its KV cache and weights "
                                                                           "while the learner trains (GPUs)"})
    rollout_is: str | None = field(default=None, metadata={"help": "importance weights for the engine's "
                                                                   "log-probs differing from the learner's: "
                                                                   "none, token or sequence (None: token "
                                                                   "with vllm, none with hf)"})
    rollout_is_cap: float = field(default=2.0, metadata={"help": "the importance weights' upper bound"})
    # rewards (CodeRL / StepCoder scale), placed on the last generated token
    reward_pass: float = 1.0
    reward_wrong_answer: float = -0.3
    reward_runtime_error: float = -0.6
    reward_compile_error: float = -1.0
    truncation_penalty: float = field(default=0.0, metadata={"help": "subtracted from the reward of a response "
                                                                     "cut at max_new_tokens (TRL: missing_eos_penalty)"})
    # PPO
    advantage: str = field(default="gae", metadata={"help": "gae (the paper's: a critic), or critic-free grpo / "
                                                             "rloo (each rollout against its prompt's others)"})
    grpo_no_std: bool = field(default=False, metadata={"help": "grpo: do not divide by the group's std (Dr. "
                                                                "GRPO)"})
    kl_in_loss: bool = field(default=False, metadata={"help": "kl_coef x KL(policy || reference) in the per-token "
                                                               "loss (k3 unless --kl_estimator) instead of the "
                                                               "reward; kl_coef 0 builds no reference"})
    learning_rate: float = 1e-5
    critic_learning_rate: float = 5e-5
    lr_scheduler_type: str = field(default="constant", metadata={"help": "after warm-up: constant, linear or "
                                                                         "cosine decay to 0 at total_steps"})
    warmup_steps: int = field(default=10, metadata={"help": "steps of linear learning-rate warm-up"})
    ppo_epochs: int = 2
    num_mini_batches: int = 2
    gradient_accumulation_steps: int = 1
    cliprange: float = 0.2
    cliprange_high: float | None = field(default=None, metadata={"help": "upper clip (default: cliprange)"})
    cliprange_value: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.01
    kl_estimator: str = "k1"
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0
    share_trunk: bool = field(default=False, metadata={"help": "the critic's value head on the policy's trunk"})
    fused_lm_head: str = field(default="auto", metadata={"help": "auto: losses from hidden states when the LM "
                                                                  "head is a plain linear map (no logits; not "
                                                                  "under fsdp2); off"})
    # LoRA (peft): only adapters train; the reference is the base with the adapter off
    lora_r: int = field(default=0, metadata={"help": "LoRA rank (0: train every weight)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scaling numerator (default: 2 x "
                                                                      "lora_r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "accepted for peft users' scripts and forced to 0: "
                                                                "PPO needs the sampler and the learner to be one "
                                                                "function"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "all-linear (every linear layer but "
                                                                              "the LM head) or module names, "
                                                                              "comma-separated"})
    # scale: sharding, precision, memory
    strategy: str = field(default="fsdp2", metadata={"help": "under torchrun: fsdp2 (shard policy, critic and "
                                                              "reference) or ddp (replicate them)"})
    precision: str = field(default="auto", metadata={"help": "compute dtype over fp32 master weights: bf16, fp32, "
                                                              "or auto (bf16 on GPUs)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward "
                                                                           "(policy and critic)"})
    forward_batch_size: int = field(default=16, metadata={"help": "rollouts per no-grad scoring forward "
                                                                   "(old and reference log-probs, values)"})
    reference_offload: bool = field(default=False, metadata={"help": "fsdp2: keep the reference's shards in CPU "
                                                                      "memory"})
    # CCCS and FGO
    no_cccs: bool = field(default=False, metadata={"help": "always full generation (ablation)"})
    no_fgo: bool = field(default=False, metadata={"help": "policy loss on every generated token (ablation)"})
    cccs_threshold: float = field(default=0.5, metadata={"help": "rho: pass rate that advances a problem"})
    cccs_window: int | None = field(default=None, metadata={"help": "recent rollouts at a stage the pass rate is "
                                                                    "taken over (default: one draw's: "
                                                                    "rollouts_per_prompt per problem, a step's "
                                                                    "rollouts in global mode)"})
    cccs_mode: str = "per_problem"
    cccs_loops: bool = field(default=False, metadata={"help": "also split at for/while"})
    fgo_coverage: str = field(default="all_tests", metadata={"help": "lines FGO counts as run: over all unit "
                                                                      "tests (the paper), or only those up to "
                                                                      "the first failing test (first_failure)"})
    # sandbox
    sandbox_workers: int | None = field(default=None, metadata={"help": "sandbox processes per rank (default: "
                                                                         "this rank's share of the CPUs, less one "
                                                                         "left to the trainer from 4 up)"})
    sandbox_timeout: float = field(default=2.0, metadata={"help": "CPU seconds per test (all threads): the limit "
                                                                  "programs are judged by, however busy the "
                                                                  "machine"})
    sandbox_wall_timeout: float | None = field(default=None, metadata={"help": "wall-clock backstop per test for "
                                                                               "programs that sleep or block "
                                                                               "(default: 4 x sandbox_timeout "
                                                                               "+ 1)"})
    sandbox_memory_mb: int = 1024
    sandbox_url: str | None = field(default=None, metadata={"help": "judge on python -m stepcoder.serve servers "
                                                                    "instead of a local pool: URL[,URL...], each "
                                                                    "http://host:port/t/TOKEN (or the token in "
                                                                    "$STEPCODER_SERVE_TOKEN)"})
    # logging and checkpoints
    report_to: str = field(default="none", metadata={"help": "none, tensorboard or wandb (the project: $WANDB_PROJECT, "
                                                             "default stepcoder)"})
    run_name: str | None = field(default=None, metadata={"help": "the run's name in wandb (default: the output "
                                                                 "directory's name)"})
    sample_every: int = field(default=10, metadata={"help": "write sample completions every N steps"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end)"})
    save_total_limit: int = 2
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint dir, or 'latest' (the "
                                                                                "newest intact one in output_dir)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start a new run in an output_dir that holds "
                                                                        "another: its folder is moved aside to "
                                                                        "DIR.previous-TIME, not deleted"})
    stop_after_steps: int | None = field(default=None, metadata={"help": "exit after this many steps of this run "
                                                                           "(e.g. to test resuming)"})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)"})
    dist_timeout_minutes: float = field(default=60.0, metadata={
        "help": "how long a rank waits at a collective for the others (torch's NCCL default is 10): rank 0 alone "
                "hashes a checkpoint before a barrier, about 100 GB for 6.7B with its optimizer states, which "
                "takes minutes on a network file system"})


# With no --model_name_or_path the trainer builds a small model from scratch (the embedded default run);
# these values suit it and apply unless a flag or the config file sets them. Real models keep the
# conservative defaults above (see docs/training.md for APPS+ on GPUs). Each was measured (benchmarks/RESULTS.md):
# - the curriculum is global: with 1000 training problems a per-problem window never fills, and training
#   stuck at the first CCCS stage did not carry over to full programs;
# - GRPO with 8 rollouts of 8 problems per step: GAE's held-out gain was +1.0 and -0.6 points on two
#   seeds where GRPO 8 x 8 gave +2.7 and +0.6 (80 steps; 3e-4 and 1e-3 degraded both estimators);
# - kl_coef 0 (no reference forward): the per-token KL stayed near 1e-4, and the run without it gained
#   +3.5 / +2.6 / +2.3 at steps 40 / 80 / 120 where the same seed with 0.01 gained +0.1 / +0.6 / +1.8;
# - the rate decays linearly to 0 at the last step: at a constant 1e-4 the gain peaked near step 50 and
#   then drifted away (seed 4: +3.2 at step 50, +0.0 at 80; another start: +2.4 at 40, +0.3 at 80, where
#   the decay gave +3.0 at 80); seeds 0-4 of the default run gained +0.1 / +4.1 / +2.2 / +2.2 / +0.0
#   points at a constant rate, +2.4 / +3.1 / +2.4 / +2.2 / +2.7 with the decay (every interval above 0);
# - 80 steps, which with the 1000-step warm-up and two greedy evaluations of 1600 problems keeps the run
#   under 10 minutes on 2 cores; one generate call per step (64 rollouts);
# - greedy evaluation, one sample per problem: a quarter of the programs 4 samples at T = 0.2 judged, for
#   an interval on the difference of about +-1.6 points instead of +-1.4.
# `--help` and docs/training.md list these values.
# - the warm-up: 1000 steps of 16 examples (5.6 passes over synthetic:train's 2846), or 6 passes over the
#   data's own examples when that is fewer (16 APPS+ problems have 52: 20 steps, not 300 passes of
#   1.2k-token examples); sft_steps None asks warmup.sized_warmup for it.
SMALL_MODEL_WARMUP_STEPS, SMALL_MODEL_WARMUP_PASSES = 1000, 6
SMALL_MODEL_PRESET = {"sft_steps": None, "sft_learning_rate": 2e-3, "learning_rate": 1e-4,
                      "critic_learning_rate": 1e-3, "total_steps": 80, "max_new_tokens": 96,
                      "cccs_mode": "global", "cccs_threshold": 0.5, "sandbox_timeout": 0.5,
                      "advantage": "grpo", "kl_coef": 0.0, "problems_per_step": 8, "rollouts_per_prompt": 8,
                      "generation_batch_size": 64, "forward_batch_size": 64, "lr_scheduler_type": "linear",
                      "eval_samples": 1, "eval_temperature": 0.0}

# LoRA trains a few small matrices from zero (B = 0) and, as the usual practice for LoRA, at a higher rate than
# full fine-tuning; unless --learning_rate / --critic_learning_rate are given, theirs default to this many
# times the full-weight default (about the optimum reported for LoRA on all layers of billion-parameter models).
LORA_LEARNING_RATE_FACTOR = 10
# The small default model's policy adapter learns best at 3x its full-weight rate, not 10x. The default run
# with --advantage grpo --lora_r 16 moved held-out pass@1 (1600 problems) by +2.7, +2.1, +3.3 points at 3e-4
# (seeds 0, 1, 2), by +0.8, +1.3, +3.0 at 5e-4 and by -0.6 at 1e-3 (seed 0); full-weight GRPO by +2.7,
# +0.9, +2.9. Runs from one warm-up (800 problems): 3e-3 collapses to 1.9 % pass@1.
SMALL_MODEL_LORA_PRESET = {"learning_rate": 3e-4}

CHOICES = {"advantage": ESTIMATORS, "kl_estimator": KL_ESTIMATORS, "chat": ("auto", "on", "off"), "cccs_mode": ("per_problem", "global"),
           "report_to": ("none", "tensorboard", "wandb"), "fused_lm_head": ("auto", "off"),
           "difficulty": ("introductory", "interview", "competition", None), "device": ("cuda", "cpu", None),
           "lr_scheduler_type": ("constant", "linear", "cosine"), "fgo_coverage": ("all_tests", "first_failure"),
           "strategy": STRATEGIES, "precision": PRECISIONS,
           "rollout_engine": ENGINES, "rollout_is": IS_MODES}
POSITIVE = ("n_layer", "n_embd", "problems_per_step", "rollouts_per_prompt", "max_new_tokens", "generation_batch_size",
            "ppo_epochs", "num_mini_batches", "gradient_accumulation_steps", "sandbox_memory_mb",
            "sample_every", "eval_samples", "eval_batch_size", "save_steps", "save_total_limit", "learning_rate",
            "forward_batch_size", "critic_learning_rate", "sft_learning_rate", "sandbox_timeout",
            "max_grad_norm", "vllm_tensor_parallel_size", "rollout_is_cap", "dist_timeout_minutes")
NON_NEGATIVE = ("total_steps", "sft_steps", "cliprange", "cliprange_value", "kl_coef", "entropy_coef", "seed", "truncation_penalty",
                "warmup_steps", "lora_r", "lora_dropout", "temperature")


class ConfigError(ValueError):
    """A bad flag, file or value; raised before any work starts."""


def _annotation(name: str) -> type:
    hint = get_type_hints(TrainConfig)[name]
    return next((t for t in getattr(hint, "__args__", (hint,)) if t is not type(None)), hint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stepcoder.train",
                                     description="PPO with CCCS and FGO for code LLMs (StepCoder). With no "
                                                 "arguments: a small model on generated problems, on CPU, evaluated "
                                                 "on held-out ones before and after.")
    parser.add_argument("--config", metavar="FILE.yaml", help="options as a YAML mapping; flags override it")
    for item in dataclasses.fields(TrainConfig):
        kind = _annotation(item.name)
        help_text = item.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(f"--{item.name}", action="store_true", default=None, help=help_text)
        else:
            default = f"default: {item.default}"
            if SMALL_MODEL_PRESET.get(item.name) is not None:  # None: the help says how it is sized
                default += f"; {SMALL_MODEL_PRESET[item.name]} for the small default model"
            if item.name in ("learning_rate", "critic_learning_rate"):
                default += f"; {LORA_LEARNING_RATE_FACTOR}x that with --lora_r"
            if item.name in SMALL_MODEL_LORA_PRESET:
                default += f" ({SMALL_MODEL_LORA_PRESET[item.name]} for the small default model)"
            parser.add_argument(f"--{item.name}", type=str, default=None, metavar=kind.__name__.upper(),
                                help=f"{help_text} ({default})".strip())
    return parser


def _convert(name: str, value, source: str):
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and name in _optional()):
        return None
    kind = _annotation(name)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        where = f"--{name}" if source == "--" else f"{source} {name}"  # a flag, or a key of a --config file
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}") from None


def _optional() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig) if f.default is None}


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags (and --config) to a checked TrainConfig; raises ConfigError with the offending name."""
    parser = build_parser()
    try:
        namespace = parser.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code == 0:
            raise
        raise ConfigError("bad command line (see the message above)") from None
    values: dict = {}
    if namespace.config:
        values.update(read_config_file(namespace.config))
    for item in dataclasses.fields(TrainConfig):
        flag = getattr(namespace, item.name)
        if flag is not None:
            values[item.name] = _convert(item.name, flag, "--")
    given = set(values)
    small_model = values.get("model_name_or_path") is None
    if small_model:
        values = {**SMALL_MODEL_PRESET, **values}
    if values.get("lora_r"):
        for name in ("learning_rate", "critic_learning_rate"):
            if name in given:
                continue
            measured = SMALL_MODEL_LORA_PRESET.get(name) if small_model else None
            values[name] = measured or LORA_LEARNING_RATE_FACTOR * values.get(name, getattr(TrainConfig, name))
        if values.get("lora_dropout"):
            if os.environ.get("RANK", "0") == "0":
                print(f"warning: lora_dropout {values['lora_dropout']} is set to 0: PPO's ratio needs the sampler "
                      "and the learner to be the same function", file=sys.stderr)
            values["lora_dropout"] = 0.0
    if values.get("kl_in_loss") and "kl_estimator" not in values:
        values["kl_estimator"] = "k3"  # as GRPO: unbiased and non-negative, its gradient well behaved
    if "rollout_is" not in values:  # HF samples from the learner itself: nothing to correct
        values["rollout_is"] = "token" if values.get("rollout_engine") == "vllm" else "none"
    if "eval_data" not in values:
        values["eval_data"] = default_eval_data(values.get("data", TrainConfig.data))
    config = TrainConfig(**values)
    validate(config)
    return config


APPS_PLUS_SPLITS = {"train.json": "valid.json", "valid.json": "train.json"}


def default_eval_data(data: str) -> str | None:
    """The held-out problems a run evaluates unless told: ``synthetic:heldout`` for ``synthetic:train``
    (``synthetic-long:heldout`` for ``synthetic-long:train``); for ``apps_plus:DIR/train.json`` or
    ``DIR/valid.json``, the other of the two when it is there (APPS+ comes as such a pair of disjoint
    splits); else none."""
    if data in ("synthetic:train", "synthetic-long:train"):
        return data.replace(":train", ":heldout")
    source, _, path = data.partition(":")
    other = APPS_PLUS_SPLITS.get(Path(path).name) if source == "apps_plus" else None
    if other and (Path(path).parent / other).is_file():
        return f"apps_plus:{Path(path).parent / other}"
    return None


def read_config_file(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return {name: _convert(name, value, f"{path}:") for name, value in data.items()}


# What each optional part needs installed, and the command that installs it (README.md: "Install").
INSTALLS = {"vllm": ("vllm", 'pip install -e ".[vllm]" on a GPU machine; on a CPU one the three lines of README.md\'s '
                     '"vLLM (optional)" section'),
            "tensorboard": ("tensorboard", "pip install tensorboard"),
            "wandb": ("wandb", 'pip install -e ".[wandb]"')}


def not_installed(option: str, value: str) -> str | None:
    """The error for `option value` where it needs a package this Python lacks (naming the install
    command), else None."""
    if value not in INSTALLS or importlib.util.find_spec(INSTALLS[value][0]) is not None:
        return None
    package, command = INSTALLS[value]
    return f"{option} {value}: the {package} package is not installed in this Python ({sys.executable}); install it with {command}"


def wandb_key_missing() -> str | None:
    """The error for an online W&B run with no API key where wandb looks for one (WANDB_API_KEY, or the
    netrc entry `wandb login` writes for the server's host), else None: wandb.init would otherwise fail
    only when the log opens, after the warm-up."""
    if os.environ.get("WANDB_MODE", "online") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return None
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError):
        entry = None
    if entry is not None:
        return None
    return (f"report_to wandb: no W&B API key for {host} (neither WANDB_API_KEY nor a netrc entry); run `wandb login`, "
            "or set WANDB_MODE=offline to write the run locally for `wandb sync`")


def check_installed(config: TrainConfig) -> None:
    """Raises ConfigError where the run asks for a package this Python lacks, or W&B online without a
    key: before any work, so that minutes of warm-up do not end in an ImportError. Apart from `validate`,
    which also serves `python -m stepcoder.plan`, where planning a GPU run on a machine without vLLM is fine."""
    for option in ("rollout_engine", "report_to"):
        message = not_installed(option, getattr(config, option))
        if message:
            raise ConfigError(message)
    if config.report_to == "wandb" and (missing := wandb_key_missing()):
        raise ConfigError(missing)


def validate(config: TrainConfig) -> None:
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(f"{name}: {getattr(config, name)!r} is not one of "
                              f"{', '.join(str(a) for a in allowed if a is not None)}")
    for name in POSITIVE:
        value = getattr(config, name)
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{name}: must be positive, got {value}")
    for name in NON_NEGATIVE:
        if getattr(config, name) is not None and getattr(config, name) < 0:  # sft_steps None: sized to the data
            raise ConfigError(f"{name}: must be >= 0, got {getattr(config, name)}")
    if not 0 < config.vllm_gpu_memory_utilization <= 1:
        raise ConfigError(f"vllm_gpu_memory_utilization: must be in (0, 1], got {config.vllm_gpu_memory_utilization}")
    if config.rollout_engine != "vllm" and (config.vllm_enable_sleep_mode or config.vllm_tensor_parallel_size != 1):
        raise ConfigError("vllm_enable_sleep_mode, vllm_tensor_parallel_size: set without --rollout_engine vllm")
    if config.temperature == 0 and config.advantage != "gae" and os.environ.get("RANK", "0") == "0":
        print(f"warning: temperature 0: greedy rollouts of one prompt are identical, so --advantage "
              f"{config.advantage} gives every one of them 0", file=sys.stderr)
    if not 0 < config.top_p <= 1:
        raise ConfigError(f"top_p: must be in (0, 1], got {config.top_p}")
    if not 0 < config.cccs_threshold <= 1:
        raise ConfigError(f"cccs_threshold: must be in (0, 1], got {config.cccs_threshold}")
    if not 0 <= config.gamma <= 1 or not 0 <= config.lam <= 1:
        raise ConfigError(f"gamma and lam must be in [0, 1], got {config.gamma}, {config.lam}")
    if config.cliprange >= 1:
        raise ConfigError(f"cliprange: must be < 1, got {config.cliprange}")
    if config.dual_clip is not None and config.dual_clip <= 1:
        raise ConfigError(f"dual_clip: must be > 1, got {config.dual_clip}")
    if config.model_name_or_path is not None and (config.n_layer, config.n_embd) != (2, 128):
        raise ConfigError("n_layer, n_embd: they size the small default model; --model_name_or_path is given")
    if config.advantage != "gae" and config.rollouts_per_prompt < 2:
        raise ConfigError(f"rollouts_per_prompt: --advantage {config.advantage} baselines each rollout against "
                          f"its prompt's others, so it needs at least 2, got {config.rollouts_per_prompt}")
    if config.advantage != "gae" and config.share_trunk:
        raise ConfigError(f"share_trunk: --advantage {config.advantage} has no critic")
    if not config.lora_r and (config.lora_alpha is not None or config.lora_target_modules != "all-linear"):
        raise ConfigError("lora_alpha, lora_target_modules: set without lora_r (LoRA is off at lora_r 0)")
    if config.lora_alpha is not None and not config.lora_alpha > 0:
        raise ConfigError(f"lora_alpha: must be positive, got {config.lora_alpha}")
    if config.lora_r and config.share_trunk:
        raise ConfigError("share_trunk: with lora_r the critic already shares the policy's base weights (it has "
                          "an adapter of its own on them)")
    if config.n_embd % 4:
        raise ConfigError(f"n_embd: must be a multiple of 4 (the small model has 4 heads), got {config.n_embd}")
    for name in ("limit", "eval_limit", "eval_every", "sandbox_workers", "cccs_window"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ConfigError(f"{name}: must be >= 1, got {getattr(config, name)}")
    if config.sandbox_wall_timeout is not None and not config.sandbox_wall_timeout >= config.sandbox_timeout:
        raise ConfigError(f"sandbox_wall_timeout: must be >= sandbox_timeout ({config.sandbox_timeout}), got "
                          f"{config.sandbox_wall_timeout}")
    if config.sandbox_url is not None:
        from stepcoder.remote import check_urls

        try:
            check_urls(config.sandbox_url)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if not config.eval_temperature >= 0:
        raise ConfigError(f"eval_temperature: must be >= 0, got {config.eval_temperature}")
    batch = config.problems_per_step * config.rollouts_per_prompt
    if batch % config.num_mini_batches:
        raise ConfigError(f"num_mini_batches: {config.num_mini_batches} must divide the rollouts per step "
                          f"(problems_per_step x rollouts_per_prompt = {batch})")
    if (batch // config.num_mini_batches) % config.gradient_accumulation_steps:
        raise ConfigError(f"gradient_accumulation_steps: {config.gradient_accumulation_steps} must divide the "
                          f"mini-batch of {batch // config.num_mini_batches} rollouts")
    if config.model_name_or_path is not None and not Path(config.model_name_or_path).is_dir():
        raise ConfigError(f"model_name_or_path: {config.model_name_or_path} is not a local directory "
                          "(nothing is downloaded)")
    if config.model_name_or_path is not None and not (Path(config.model_name_or_path) / "config.json").is_file():
        raise ConfigError(f"model_name_or_path: {config.model_name_or_path} has no config.json, so it is not a "
                          "transformers model directory (save one with model.save_pretrained(DIR))")
    if config.start_evaluation is not None and not Path(config.start_evaluation).is_file():
        raise ConfigError(f"start_evaluation: {config.start_evaluation} is not a file")
    if config.resume_from_checkpoint not in (None, "latest") and not Path(config.resume_from_checkpoint).is_dir():
        raise ConfigError(f"resume_from_checkpoint: {config.resume_from_checkpoint} is not a directory")


def to_json(config: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2)
