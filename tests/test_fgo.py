"""FGO: statement-level line verdicts, and the token mask with a real byte-level BPE tokenizer trained
here, on generated programs whose branches do and do not run.

The property test's ground truth is independent of stepcoder.fgo's ast expansion: the generator knows,
for every line it writes, which reporting line decides whether it ran (an `else:` line is decided by
the first statement of its block, a continuation line by its statement's first line, a docstring by
the function's first statement), and Python's own sys.settrace says which reporting lines ran.
"""
from __future__ import annotations

import random
import textwrap
from bisect import bisect_right

import pytest

from stepcoder.fgo import NEUTRAL, NOT_RAN, RAN, line_verdicts, token_mask, token_offsets
from stepcoder.sandbox import TestCase
from trace_reference import settrace_lines


class Program:
    """Lines, each with the index of the line whose LINE event says it ran (None: a comment/blank)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.lines: list[list] = []

    def emit(self, text: str, owner: object = "self") -> int:
        index = len(self.lines)
        self.lines.append([text, index if owner == "self" else owner])
        return index

    def block(self, depth: int, indent: int, in_function: bool = False) -> int:
        """Writes 1-3 statements; returns the owner line of the first."""
        pad, first = "    " * indent, None
        for _ in range(self.rng.randint(1, 3)):
            owner = self.statement(depth, pad, indent, in_function)
            first = owner if first is None else first
        return first

    def statement(self, depth: int, pad: str, indent: int, in_function: bool) -> int:
        rng, choice = self.rng, self.rng.random()
        name = "a" if in_function else "x"
        condition = lambda: rng.choice([f"{name} > {rng.randint(-3, 3)}", f"y % {rng.randint(2, 3)} == 0",  # noqa: E731
                                        f"acc < {rng.randint(-5, 15)}"])
        if depth < 3 and choice < 0.3:
            head = self.emit(f"{pad}if {condition()}:")
            self.block(depth + 1, indent + 1, in_function)
            if rng.random() < 0.5:
                self.emit(f"{pad}elif {condition()}:")
                self.block(depth + 1, indent + 1, in_function)
            if rng.random() < 0.6:
                else_line = self.emit(f"{pad}else:", owner=None)
                self.lines[else_line][1] = self.block(depth + 1, indent + 1, in_function)
            return head
        if depth < 3 and choice < 0.4:
            head = self.emit(f"{pad}for i{len(self.lines)} in range({rng.randint(0, 2)}):")
            self.block(depth + 1, indent + 1, in_function)
            return head
        if choice < 0.5:
            head = self.emit(f"{pad}acc += sum(")
            for text in ("    v * 2", f"    for v in range({rng.randint(0, 3)})", ")"):
                self.emit(f"{pad}{text}", owner=head)
            return head
        if choice < 0.6:
            try_line = self.emit(f"{pad}try:", owner=None)
            body = self.emit(f"{pad}    acc += 10 // ({name} - {rng.randint(-2, 2)})")
            self.lines[try_line][1] = body
            except_line = self.emit(f"{pad}except ZeroDivisionError:", owner=None)
            self.lines[except_line][1] = self.emit(f"{pad}    acc -= 1")
            return body
        if choice < 0.67:
            self.emit(f"{pad}# a comment", owner=None)
        return self.emit(f"{pad}acc += {rng.randint(1, 9)}")

    def generate(self) -> str:
        self.emit("import sys")
        self.emit("def helper(a):")
        doc = self.emit('    """Adds things up."""', owner=None)
        self.lines[doc][1] = self.emit("    acc = 0")
        self.block(0, 1, in_function=True)
        self.emit("    return acc")
        self.emit("", owner=None)
        self.emit("x, y = map(int, sys.stdin.readline().split())")
        self.emit("acc = 0")
        self.block(0, 0)
        if self.rng.random() < 0.6:
            self.emit("acc += helper(x)")
        self.emit("print(acc)")
        return "\n".join(text for text, _ in self.lines) + "\n"

    def truth(self, executed: set[int]) -> list[int]:
        """RAN / NOT_RAN / NEUTRAL per 1-based line, from the generator's ownership and settrace."""
        return [NEUTRAL] + [NEUTRAL if owner is None else (RAN if owner + 1 in executed else NOT_RAN)
                            for _, owner in self.lines]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained here on generated programs: nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [Program(random.Random(seed)).generate() for seed in range(200)]
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>")


def test_line_verdicts_expand_hits_to_statements():
    program = textwrap.dedent('''\
        def f(a,
              b=2):
            """doc"""
            if a > 0:
                x = [
                    1,
                ]
            else:
                x = 3
            try:
                y = 1 / a
            except ZeroDivisionError:
                y = 0
            finally:
                z = 1
            return x
        # comment
        f(1)
    ''')
    executed, _ = settrace_lines(program)
    verdicts = line_verdicts(program, executed)
    assert [verdicts[line] for line in range(1, 19)] == [
        RAN, RAN, RAN, RAN, RAN, RAN, RAN, NOT_RAN, NOT_RAN, RAN, RAN, NOT_RAN, NOT_RAN, RAN, RAN, RAN, NEUTRAL, RAN]
    assert line_verdicts("def f(:\n", [1]) is None


@pytest.mark.parametrize("form", ["continuation", "restated"])
def test_mask_property_on_generated_programs(tokenizer, form):
    """continuation: the completion continues the program from a random point (line boundary or mid-line).
    restated: the whole program in a ```python fence with prose around it (or cut inside the fence), after
    a context that only opened the entry's definition -- the instruct-model answer; it replaces that
    definition, and the judged program is the generated one."""
    rng = random.Random()
    masked = kept = 0
    for _ in range(60):
        program = Program(rng)
        source = program.generate()
        stdin = f"{rng.randint(-3, 3)} {rng.randint(-3, 3)}\n"
        executed, _ = settrace_lines(source, stdin)
        truth = program.truth(set(executed))
        if form == "continuation":
            split = rng.randrange(len(source))
            context, entry, before = source[:split], None, ""
            code = source[split:]
            after = rng.choice(["", "```", "```\nThat is the program.\n"])
        else:
            split, context, entry, code = 0, "def helper(a):\n", "helper", source
            before = rng.choice(["", "Here is a solution.\n", "Sure! It reads x and y:\n\n"]) + "```python\n"
            after = rng.choice(["```", "```\nIt adds things up.\n", ""])
        completion = before + code + after
        ids = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
        offsets = token_offsets(tokenizer, ids)
        mask = token_mask(context, completion, offsets, executed, entry=entry)
        assert len(mask) == len(ids)
        line_starts = [0] + [i + 1 for i, c in enumerate(source) if c == "\n"]
        for (first, last), value in zip(offsets, mask):
            first, last = max(first, len(before)), min(last, len(before) + len(code))
            if first >= last:
                assert value == 1  # the fences, the prose, the end-of-sequence token
                continue
            first, last = first - len(before) + split, last - len(before) + split  # offsets in `source`
            lines = range(bisect_right(line_starts, first), bisect_right(line_starts, last - 1) + 1)
            verdicts = {truth[line] for line in lines}
            if verdicts == {NOT_RAN}:
                assert value == 0, (source, context, source[first:last])
                masked += 1
            if RAN in verdicts:
                assert value == 1, (source, context, source[first:last])
                kept += 1
    assert masked > 100 and kept > 100  # both sides of the property were exercised


def test_plain_mask_when_nothing_can_be_said(tokenizer):
    completion = "    return 1\n"
    offsets = token_offsets(tokenizer, tokenizer.encode(completion))
    ones = [1] * len(offsets)
    assert token_mask("def f(:\n", completion, offsets, [1]) == ones                    # does not compile
    assert token_mask("def f():\n", completion, offsets, [], tests_ran=False) == ones   # no test ran



def test_a_restated_entry_is_masked_like_a_continuation(tokenizer):
    """The answer replaces the context's definition (``completions.assemble``): its own lines are judged."""
    restated = "def f():\n    if x:\n        return 2\n    return 3\n"
    context = "x = 0\n\ndef f():\n"
    offsets = token_offsets(tokenizer, tokenizer.encode(restated))
    mask = token_mask(context, restated, offsets, [1, 3, 4, 6], entry="f")  # ran: x = 0, def, if, return 3
    dropped = "".join(restated[a:b] for (a, b), m in zip(offsets, mask) if m == 0)
    assert "return 2" in dropped and "return 3" not in dropped and "def f" not in dropped


def test_token_offsets_exact_also_for_non_canonical_token_sequences(tokenizer):
    text = "acc += helper(x)\nprint(acc)\n"
    canonical = tokenizer.encode(text, add_special_tokens=False)
    spans = token_offsets(tokenizer, canonical)
    assert "".join(text[a:b] for a, b in spans) == text
    # The same text spelled one byte-level symbol per token (all in the alphabet): a valid sequence a
    # sampler could produce, but not the tokenizer's own encoding, so the slow path must handle it.
    spelled = [tokenizer.convert_tokens_to_ids(symbol) for token in tokenizer.convert_ids_to_tokens(canonical)
               for symbol in token]
    assert tokenizer.decode(spelled) == text and spelled != canonical  # character by character: not canonical
    spans = token_offsets(tokenizer, spelled)
    assert len(spans) == len(spelled) and "".join(text[a:b] for a, b in spans) == text


def test_mask_from_the_sandbox_executed_lines(sandbox, tokenizer):
    context = "def sign(n):\n"
    completion = "    if n > 0:\n        return 1\n    elif n < 0:\n        return -1\n    return 0\n```"
    program = context + completion[:-3]
    result = sandbox.run(program, [TestCase([5], 1)], kind="function", entry="sign")
    assert result.verdict == "pass" and result.executed_lines == [1, 2, 3]
    ids = tokenizer.encode(completion, add_special_tokens=False)
    offsets = token_offsets(tokenizer, ids)
    mask = token_mask(context, completion, offsets, result.executed_lines, entry="sign")
    dropped = "".join(completion[a:b] for (a, b), m in zip(offsets, mask) if m == 0)
    assert "elif n < 0:" in dropped and "return -1" in dropped and "return 0" in dropped
    assert "return 1" not in dropped and "if n > 0" not in dropped.replace("elif n < 0", "")
