"""From a model's completion to the program that is judged — one rule for evaluate, CCCS and the trainer.

A prompt ends inside a Python code block (``build_prompt``), so a completion normally continues the
code and ends at the closing fence. Completions from elsewhere (``--samples``) may instead hold a
whole answer in a markdown fence, or restate the function being completed.
"""
from __future__ import annotations

import ast
import re

_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+-]*)[ \t]*$", re.MULTILINE)


def code_span(completion: str) -> tuple[int, int]:
    """Where the code is in a completion, as (start, end) character offsets:

    - no fence: all of it (the completion continued the block the prompt opened);
    - the first fence closes that block (it is unlabeled and the fences are odd in number, as in
      "code ``` prose ```python ... ```"): everything before it;
    - otherwise the first fence opens a block: the first ```python (or ```py, or unlabeled) block's
      body, up to its closing fence or, when generation stopped inside it, to the end.
    """
    fences = list(_FENCE.finditer(completion))
    if not fences:
        return 0, len(completion)
    first = fences[0]
    if first.group(1) == "" and len(fences) % 2 == 1:
        return 0, first.start()
    opening = next((f for f in fences if f.group(1).lower() in ("python", "py", "python3")), first)
    start = min(opening.end() + 1, len(completion))
    closing = next((f for f in fences if f.start() >= start), None)
    return start, closing.start() if closing else len(completion)


def extract_code(completion: str) -> str:
    """The code in a completion (see ``code_span``)."""
    start, end = code_span(completion)
    return completion[start:end]


def defines_entry(code: str, entry: str | None) -> bool:
    """Whether `code` defines `entry` (or ``class Solution``) at top level, i.e. stands on its own."""
    if entry is None:
        return False
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return re.search(rf"^(def\s+{re.escape(entry)}\s*\(|class\s+Solution\b)", code, re.MULTILINE) is not None
    names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    return entry in names or "Solution" in names


def completion_shift(context: str, completion: str, entry: str | None = None) -> int | None:
    """Where the completion sits in ``assemble_program``'s program: program index = completion index
    + shift, for the characters of ``code_span(completion)``. None when the code restated the entry
    point and stands on its own (the completion is then not a continuation of the context)."""
    start, end = code_span(completion)
    if context and defines_entry(completion[start:end], entry):
        return None
    return len(context) - start


def assemble_program(context: str, completion: str, entry: str | None = None) -> str:
    """The judged program: the context the model continued (starter code, CCCS prefix) followed by
    the completion's code — or, when the code restates the entry point, that code on its own after
    the context's import lines (so ``from typing import List`` in a HumanEval prompt still holds)."""
    code = extract_code(completion)
    if context and defines_entry(code, entry):
        imports = [line for line in context.splitlines() if re.match(r"(import|from)\s+\w", line)]
        return "".join(line + "\n" for line in imports) + code
    return context + code
