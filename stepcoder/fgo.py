"""FGO: fine-grained optimization (StepCoder §3.2) — completion tokens on code that never ran are
masked out of the PPO loss.

The sandbox reports which lines of the judged program (context + completion) produced a LINE event.
Many lines never do although their statement ran — ``else:`` / ``finally:`` lines, continuation
lines and closing brackets of multi-line statements, docstrings, decorators' neighbours — so hits are
expanded to whole statements with ``ast`` first (``line_verdicts``):

- a simple statement's lines (lineno..end_lineno) ran if any of them reported;
- a compound statement's header lines (decorators through the line before its body) ran if any of
  them reported (if no header line can report, e.g. ``try:``, if its body was entered);
- the lines before an ``else`` / ``finally`` / ``except`` block (the ``else:`` line) take the verdict
  of that block: entered or not;
- a statement that compiles to no bytecode (a docstring, ``global``, ``nonlocal``) takes the verdict
  of its block: entered if any statement of the block ran;
- lines outside every statement (blank lines, comment lines) are neutral.

Token rule (``token_mask``): a token is masked (0) when every statement line its characters touch
never ran; a token touching any line that ran, or only neutral lines, or text outside the program
(the closing fence, trailing prose, special tokens), is kept (1). A token spanning lines therefore
is kept if any of its statement lines ran; the first completion token, when the context ends mid-line,
takes the verdict of that shared line. A program that does not compile, or one whose tests never
ran, gets the plain action mask (all ones). An answer that restates the entry point is judged as the
code before the entry in the context plus the answer (``completions.assemble``), and masked the same
way.
"""
from __future__ import annotations

import ast
import warnings
from bisect import bisect_right
from types import CodeType
from typing import Sequence

from stepcoder.completions import assemble, code_span
from stepcoder.detokenize import continuation

RAN, NOT_RAN, NEUTRAL = 1, 0, -1


def executable_lines(code: CodeType) -> set[int]:
    """Lines that can report a LINE event: those with bytecode in `code` or its nested code objects."""
    lines, stack = set(), [code]
    while stack:
        current = stack.pop()
        lines.update(line for *_, line in current.co_lines() if line)
        stack.extend(const for const in current.co_consts if isinstance(const, CodeType))
    return lines


class _Verdicts:
    def __init__(self, tree: ast.Module, executed: set[int], executable: set[int], line_count: int):
        self.executed, self.executable = executed, executable
        self.lines = [NEUTRAL] * (line_count + 2)  # 1-based
        self.visit_block(tree.body)

    def mark(self, first: int, last: int, ran: bool) -> None:
        for line in range(first, min(last, len(self.lines) - 2) + 1):
            self.lines[line] = RAN if ran else NOT_RAN

    def own_lines(self, node: ast.stmt) -> tuple[int, int]:
        """A simple statement's lines, or a compound statement's header (decorators included)."""
        blocks = _blocks(node)
        if not blocks:
            return node.lineno, _last_line(node)
        return _first_line(node), _first_line(blocks[0][0]) - 1

    def ran(self, node: ast.stmt) -> bool | None:
        """Whether the statement ran: None when none of its own lines can report (decided by its block)."""
        first, last = self.own_lines(node)
        own = range(first, last + 1)
        if any(line in self.executable for line in own):
            return any(line in self.executed for line in own)
        blocks = _blocks(node)
        if blocks:
            return self.entered(blocks[0])
        return None

    def entered(self, block: list[ast.stmt]) -> bool:
        return any(self.ran(statement) for statement in block)

    def visit_block(self, block: list[ast.stmt]) -> bool:
        entered = self.entered(block)
        for statement in block:
            verdict = self.ran(statement)
            first, last = self.own_lines(statement)
            self.mark(first, last, entered if verdict is None else verdict)
            end = last
            for child in _blocks(statement):
                self.mark(end + 1, _first_line(child[0]) - 1, self.entered(child))  # `else:`, `finally:` lines
                self.visit_block(child)
                end = max(_last_line(child[-1]), end)
        return entered


def _first_line(node: ast.AST) -> int:
    """A statement's first line: its decorators', a match case's pattern's."""
    if isinstance(node, ast.match_case):
        return node.pattern.lineno
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _last_line(node: ast.AST) -> int:
    if isinstance(node, ast.match_case):
        return _last_line(node.body[-1])
    return node.end_lineno or node.lineno


def _blocks(node: ast.AST) -> list[list]:
    """The statement lists inside a compound statement, in source order (except handlers and match
    cases count as one-statement blocks so their own header lines are judged)."""
    blocks = []
    for name in ("body", "handlers", "orelse", "finalbody", "cases"):
        value = getattr(node, name, None)
        if not value:
            continue
        if name in ("handlers", "cases"):
            blocks.extend([item] for item in value)
        else:
            blocks.append(value)
    if isinstance(node, (ast.ExceptHandler, ast.match_case)):
        return [node.body]
    return sorted(blocks, key=lambda block: _first_line(block[0]))


def line_verdicts(program: str, executed_lines: Sequence[int]) -> list[int] | None:
    """RAN / NOT_RAN / NEUTRAL per 1-based line of `program` (index 0 unused), or None when the
    program does not compile."""
    try:
        with warnings.catch_warnings():  # the program's own invalid escapes are its business
            warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
            tree = ast.parse(program)
            code = compile(tree, "<solution>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    line_count = program.count("\n") + 1
    return _Verdicts(tree, set(executed_lines), executable_lines(code), line_count).lines[: line_count + 1]


def token_mask(context: str, completion: str, offsets: Sequence[tuple[int, int]], executed_lines: Sequence[int],
               entry: str | None = None, tests_ran: bool = True) -> list[int]:
    """The FGO mask over completion tokens (1 = in the loss). `offsets` are each token's character
    span in `completion` (``token_offsets``); the judged program is ``assemble(context, completion,
    entry)`` and `executed_lines` its lines that ran, over the tests that ran."""
    keep_all = [1] * len(offsets)
    if not tests_ran:
        return keep_all
    program, shift = assemble(context, completion, entry)
    start, end = code_span(completion)
    verdicts = line_verdicts(program, executed_lines)
    if verdicts is None:
        return keep_all
    line_starts = [0] + [index + 1 for index, char in enumerate(program) if char == "\n"]
    mask = []
    for first, last in offsets:
        first, last = max(first, start), min(last, end)  # characters outside the code are not program text
        touched = set()
        if first < last:
            touched = {verdicts[line] for line in range(bisect_right(line_starts, first + shift),
                                                        bisect_right(line_starts, last - 1 + shift) + 1)}
        touched.discard(NEUTRAL)
        mask.append(0 if touched == {NOT_RAN} else 1)
    return mask


def token_offsets(tokenizer, token_ids: Sequence[int], context_ids: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Each generated token's character span in the text it adds after `context_ids` (the prompt; with
    none, in ``tokenizer.decode(token_ids)``): see ``stepcoder.detokenize.continuation``, which gives
    the text too."""
    return continuation(tokenizer, context_ids, token_ids)[1]
