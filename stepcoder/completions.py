"""From a model's completion to the program that is judged — one rule for evaluate, CCCS and the trainer.

A prompt ends inside a Python code block (``build_prompt``), so a completion normally continues the
code and ends at the closing fence. Completions from elsewhere (``--samples``) may instead hold a
whole answer in a markdown fence, or restate the function being completed.
"""
from __future__ import annotations

import ast
import re
import warnings

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
    """Whether `code` defines `entry` (or ``class Solution``) at top level — a def, a class, or an
    assignment (``words_to_sentence = ' '.join``) — i.e. may stand on its own."""
    if entry is None:
        return False
    tree = _parse(code)
    if tree is None:
        return re.search(rf"^(def\s+{re.escape(entry)}\s*\(|class\s+Solution\b)", code, re.MULTILINE) is not None
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
    return entry in names or "Solution" in names


def _parse(source: str) -> ast.Module | None:
    try:
        with warnings.catch_warnings():  # a program's invalid escapes are its own business
            warnings.simplefilter("ignore")
            return ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def entry_definition(context: str, entry: str | None) -> int | None:
    """Where the context starts defining `entry` (``def entry(`` or ``class Solution`` at the start of
    a line): the character offset of that line, or None."""
    if entry is None:
        return None
    found = re.search(rf"^((async\s+)?def\s+{re.escape(entry)}\s*\(|class\s+Solution\b)", context, re.MULTILINE)
    return found.start() if found else None


def assemble(context: str, completion: str, entry: str | None = None) -> tuple[str, int]:
    """The judged program, and where the completion's code sits in it (program index = completion
    index + shift, for the characters of ``code_span(completion)``).

    The code continues the context (starter code, CCCS prefix) — unless it restates the entry point and
    cannot follow the context (the two together do not parse) while the context started defining the
    entry: then the code replaces that definition, and what the context holds before it (imports,
    helper functions of a HumanEval prompt or a CCCS prefix) is kept. Code that defines the entry and
    does follow the context (the rest of a helper, then the entry; a second definition after a
    finished one) is a plain continuation."""
    start, end = code_span(completion)
    code = completion[start:end]
    keep = len(context)
    if context and defines_entry(code, entry) and _parse(context + code) is None:
        definition = entry_definition(context, entry)
        if definition is not None:
            keep = definition
    return context[:keep] + code, keep - start


def completion_shift(context: str, completion: str, entry: str | None = None) -> int:
    """program index = completion index + shift in ``assemble_program``'s program (see ``assemble``)."""
    return assemble(context, completion, entry)[1]


def assemble_program(context: str, completion: str, entry: str | None = None) -> str:
    """The judged program for a completion generated after `context` (see ``assemble``)."""
    return assemble(context, completion, entry)[0]
