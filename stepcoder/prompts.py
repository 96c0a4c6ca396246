"""Prompts: the problem (with its starter code) and a code prefix, in plain and chat-template modes.

Every prompt ends inside an open ```python block holding ``Problem.context(prefix)`` (the CCCS
prefix, or the starter code for full generation), so the model's completion continues that code, and
``Problem.program(completion, prefix)`` is the judged program.
"""
from __future__ import annotations

from stepcoder.data.problem import Problem

CODE_FENCE = "```"  # every prompt ends inside a ```python block: this closing fence ends the program
STOP_STRING = "\n" + CODE_FENCE  # generation stops at a fence opening a line (not at one inside a string)
PLAIN_TEMPLATE = "### Question:\n{question}\n\n### Answer:\n```python\n"


def instruction(problem: Problem) -> str:
    """The task in words: the statement, plus how the program is called."""
    if problem.kind == "stdin" and problem.entry:
        how = f"Complete the function `{problem.entry}()`, which reads standard input and prints the answer."
    elif problem.kind == "stdin":
        how = "Write a program that reads standard input and prints the answer."
    elif problem.kind == "method":
        how = f"Complete the method `Solution.{problem.entry}`."
    else:
        how = f"Write the function `{problem.entry}`." if problem.entry else "Write the code."
    return f"{problem.question.strip()}\n\n{how}"


def chat_option(value: str) -> bool | None:
    """The --chat flag (auto, on, off) as build_prompt's `chat` argument: None, True, False."""
    return {"auto": None, "on": True, "off": False}[value]


def uses_chat(tokenizer, chat: bool | None) -> bool:
    """Chat mode when asked, or (chat=None) when the tokenizer has a chat template."""
    if chat is not None:
        return chat
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def build_prompt(problem: Problem, prefix: str = "", tokenizer=None, chat: bool | None = None) -> str:
    """The text the model continues. With `tokenizer` and a chat template (or chat=True), the
    instruction is a user turn and the assistant turn opens with the code block."""
    code = problem.context(prefix)
    if uses_chat(tokenizer, chat):
        if tokenizer is None:
            raise ValueError("chat prompts need a tokenizer with a chat template")
        request = instruction(problem) + "\n\nAnswer with the complete Python code in one ```python block."
        head = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                             add_generation_prompt=True)
        return f"{head}```python\n{code}"
    return PLAIN_TEMPLATE.format(question=instruction(problem)) + code
