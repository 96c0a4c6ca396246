"""CCCS, FGO and the sandbox inside TRL's ``GRPOTrainer`` (TRL 1.16: ``pip install -e ".[trl]"``).

    from stepcoder.data import load_problems
    from stepcoder.integrations.trl import StepCoderGRPOTrainer, cccs_dataset, make_reward

    problems = load_problems("apps_plus:train.json").problems
    dataset = cccs_dataset(problems)                  # prompts at each problem's current CCCS stage
    reward = make_reward(problems)                    # or make_reward(problems, sandbox="http://judge:8080/t/T")
    trainer = StepCoderGRPOTrainer(model=..., reward_funcs=[reward], args=GRPOConfig(...), train_dataset=dataset)
    trainer.train()                                   # FGO in the loss mask, stages advanced by CurriculumCallback

``cccs_dataset`` renders each row when it is read, so the prompts follow the curriculum as it moves.
``make_reward`` judges each completion as ``python -m stepcoder.train`` does and returns the paper's
rewards; with a plain ``GRPOTrainer`` add ``CurriculumCallback(dataset.curriculum, reward)`` yourself.
``StepCoderGRPOTrainer`` adds FGO: tokens on lines the tests never ran get 0 in TRL's ``tool_mask``
(the loss mask is ``completion_mask * tool_mask``; attention is untouched), ``num_items_in_batch`` is
recounted over the new mask, and ``fgo_masked_fraction`` and the CCCS stages are logged.
"""
from __future__ import annotations

from stepcoder.cccs import Curriculum, problem_stages
from stepcoder.data.problem import Problem
from stepcoder.detokenize import code_tokens, continuation
from stepcoder.fgo import token_mask
from stepcoder.integrations.common import Task, judge
from stepcoder.prompts import build_prompt

try:
    from transformers import TrainerCallback
except ImportError:  # transformers is a dependency; keep the error for when TRL is used
    TrainerCallback = object


def cccs_dataset(problems: list[Problem], tokenizer=None, chat: bool = False, curriculum: Curriculum | None = None,
                 loops: bool = False, threshold: float = 0.5, window: int = 8):
    """A ``datasets.Dataset`` with one row per problem: ``prompt`` (at the problem's current CCCS stage),
    ``problem_id``, ``stage`` and ``prefix``. ``dataset.curriculum`` is the ``Curriculum`` behind it
    (per-problem: a stage advances once its last `window` rollouts pass at a rate >= `threshold`)."""
    from datasets import Dataset

    if curriculum is None:
        curriculum = Curriculum(problem_stages(problems, loops)[0], threshold=threshold, window=window)
    by_id = {problem.id: problem for problem in problems}
    missing = set(by_id) - set(curriculum.stage_prefixes)
    if missing:
        raise ValueError(f"the curriculum has no stages for {sorted(missing)[:3]}")

    def render(batch: dict) -> dict:
        ids = batch["problem_id"]
        stages = [curriculum.stage(ident) for ident in ids]
        prefixes = [curriculum.prefix(ident) for ident in ids]
        return {"problem_id": ids, "stage": stages, "prefix": prefixes,
                "prompt": [build_prompt(by_id[ident], prefix, tokenizer, chat) for ident, prefix in zip(ids, prefixes)]}

    dataset = Dataset.from_dict({"problem_id": list(by_id)})
    dataset.set_transform(render)
    dataset.curriculum = curriculum
    return dataset


class StepCoderReward:
    """TRL's reward function: ``reward(prompts, completions, completion_ids, problem_id, stage, prefix, ...)``
    -> the paper's reward of each completion. It keeps the last call's judgements (for FGO) and the
    verdicts not yet counted by the curriculum."""

    def __init__(self, problems: list[Problem], sandbox=None, rewards: dict | None = None):
        self.__name__ = "stepcoder_reward"  # TRL names a reward's metrics after it
        self.problems = {problem.id: problem for problem in problems}
        self.sandbox = sandbox
        self.rewards = rewards
        self.last: list[tuple[Task, str, object]] = []
        self.pending: list[tuple[str, int, bool]] = []

    def __call__(self, prompts, completions, completion_ids=None, problem_id=None, stage=None, prefix=None,
                 **kwargs) -> list[float]:
        if problem_id is None:
            raise ValueError("stepcoder_reward needs the dataset's problem_id, stage and prefix columns: make the "
                             "dataset with cccs_dataset()")
        texts = [_text(completion) for completion in completions]
        tasks = [Task.of(self.problems[ident], level, given) for ident, level, given in zip(problem_id, stage, prefix)]
        judged = judge(tasks, texts, self.sandbox, self.rewards, trace=True)
        self.last = list(zip(tasks, texts, judged))
        self.pending += [(task.id, task.stage, item.verdict == "pass") for task, item in zip(tasks, judged)]
        return [item.reward for item in judged]

    def take_pending(self) -> list[tuple[str, int, bool]]:
        taken, self.pending = self.pending, []
        return taken


def make_reward(problems: list[Problem], sandbox=None, rewards: dict | None = None) -> StepCoderReward:
    """`sandbox`: None (a local pool shared by the process), a ``Sandbox``/``RemoteSandbox``, or the URL(s)
    of ``python -m stepcoder.serve`` servers. `rewards`: verdict -> reward overrides of the paper's."""
    return StepCoderReward(problems, sandbox, rewards)


def _text(completion) -> str:
    """A completion as text: TRL passes strings, or assistant messages for conversational prompts."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion if isinstance(message, dict))


class CurriculumCallback(TrainerCallback):
    """Counts each step's verdicts (from every process) into the curriculum, which advances a problem's
    stage by this package's rule; the dataset's prompts follow at once."""

    def __init__(self, curriculum: Curriculum, reward: StepCoderReward):
        self.curriculum = curriculum
        self.reward = reward
        self.advanced = 0

    def on_step_end(self, args, state, control, **kwargs):
        records = self.reward.take_pending()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = [record for part in gathered for record in part]
        for problem, stage, passed in records:
            self.advanced += self.curriculum.record(problem, passed, stage)
        return control


def __getattr__(name: str):
    """``StepCoderGRPOTrainer`` is built on first use, so that importing this module does not import TRL."""
    if name == "StepCoderGRPOTrainer":
        return _grpo_trainer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_built: list = []


def _grpo_trainer():
    if _built:
        return _built[0]
    import torch
    from trl import GRPOTrainer

    class StepCoderGRPOTrainer(GRPOTrainer):
        """``trl.GRPOTrainer`` with FGO and the CCCS curriculum (see the module's docstring). Extra arguments:
        ``fgo=True``; ``curriculum`` (default: the train dataset's, from ``cccs_dataset``)."""

        def __init__(self, *args, fgo: bool = True, curriculum: Curriculum | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.fgo = fgo
            self.stepcoder_reward = next((f for f in self.reward_funcs if isinstance(f, StepCoderReward)), None)
            if self.stepcoder_reward is None:
                raise ValueError("StepCoderGRPOTrainer needs make_reward(...) among its reward_funcs")
            self.curriculum = curriculum or getattr(self.train_dataset, "curriculum", None)
            if self.curriculum is not None:
                self.add_callback(CurriculumCallback(self.curriculum, self.stepcoder_reward))

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            mode = "train" if self.model.training else "eval"
            completion_mask = output["completion_mask"]
            keep = torch.ones_like(completion_mask)
            if self.fgo:
                special = set(self.processing_class.all_special_ids)
                for row, (task, text, judged) in enumerate(self.stepcoder_reward.last):
                    ids = output["completion_ids"][row][completion_mask[row].bool()].tolist()
                    prompt = output["prompt_ids"][row][output["prompt_mask"][row].bool()].tolist()
                    code = code_tokens(self.processing_class, ids)
                    decoded, spans = continuation(self.processing_class, prompt, code)
                    if decoded != text:
                        continue  # a decode TRL did otherwise: this row keeps every token
                    mask = iter(token_mask(task.context, text, spans, judged.executed_lines, task.entry,
                                           judged.tests_ran))
                    for column, token in enumerate(ids):
                        keep[row, column] = 1 if token in special else next(mask)
            tool_mask = output.get("tool_mask")
            tool_mask = keep if tool_mask is None else tool_mask * keep
            output["tool_mask"] = tool_mask
            loss_mask = completion_mask * tool_mask
            output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
            masked = self.accelerator.gather(torch.stack([(completion_mask * (1 - keep)).sum(),
                                                          completion_mask.sum()]).reshape(1, 2)).sum(0)
            self._metrics[mode]["fgo_masked_fraction"].append((masked[0] / masked[1].clamp(min=1)).item())
            if self.curriculum is not None:
                self._metrics[mode]["cccs/stage_mean"].append(self.curriculum.mean_stage())
                for stage, count in self.curriculum.histogram().items():
                    self._metrics[mode][f"cccs/problems_at_stage_{stage}"].append(count)
            return output

    _built.append(StepCoderGRPOTrainer)
    return StepCoderGRPOTrainer
