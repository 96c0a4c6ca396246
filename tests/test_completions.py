"""From completions to judged programs, and prompts in plain and chat modes."""
from __future__ import annotations

from stepcoder.completions import assemble, assemble_program, extract_code
from stepcoder.data import Problem, load_builtin
from stepcoder.prompts import build_prompt
from stepcoder.sandbox import TestCase


def test_extract_code_handles_every_fence_layout():
    cases = {
        "x = 1\n": "x = 1\n",                                                   # continued the prompt's block
        "    return a\n```\nThat is all.\n": "    return a\n",                  # then closed it
        "Sure:\n```python\nprint(1)\n```\nBye\n": "print(1)\n",                 # an answer in a block
        "```py\nprint(2)\n```": "print(2)\n",
        "Sure:\n```\nprint(3)\n```\n": "print(3)\n",                            # unlabeled block
        "Text\n```python\nprint(4)\n": "print(4)\n",                            # stopped inside the block
        "a = 1\n```\nnote\n```python\nb = 2\n```\n": "a = 1\n",                 # code, close, then more
        "Intro\n```text\nnot code\n```\n```python\nreal = 1\n```\n": "real = 1\n",  # the python block wins
    }
    for completion, code in cases.items():
        assert extract_code(completion) == code, completion


def test_assemble_program_continues_or_restates():
    context = "from typing import List\n\ndef total(xs: List[int]) -> int:\n"
    assert assemble_program(context, "    return sum(xs)\n```", "total") == context + "    return sum(xs)\n"
    restated = "```python\ndef total(xs):\n    return sum(xs)\n```"
    assert assemble_program(context, restated, "total") == "from typing import List\n\ndef total(xs):\n    return sum(xs)\n"
    assert assemble_program("", "print(1)\n", None) == "print(1)\n"


def test_a_restated_entry_keeps_the_helpers_before_it():
    """A HumanEval-style prompt defines a helper before the entry: an answer restating only the entry
    still has it. A CCCS prefix ending inside a helper written before the entry: its continuation
    defines the entry and is still a continuation."""
    prompt = "def is_even(n):\n    return n % 2 == 0\n\n\ndef count_even(xs):\n"
    answer = "def count_even(xs):\n    return sum(is_even(x) for x in xs)\n"
    program, shift = assemble(prompt, answer, "count_even")
    assert program == prompt[:prompt.index("def count_even")] + answer and shift == prompt.index("def count_even")
    documented = prompt + '    """Count the even numbers."""\n'  # a definition that already parses: followed
    assert assemble(documented, answer, "count_even") == (documented + answer, len(documented))
    alias = "words_to_sentence = ' '.join\n"  # an entry bound by assignment also restates it
    assert assemble("def words_to_sentence(words):\n", alias, "words_to_sentence") == (alias, 0)
    prefix = "import sys\n\ndef helper(n):\n    if n:\n"
    continuation = "        return 1\n    return 0\n\ndef solve():\n    print(helper(int(input())))\n"
    assert assemble(prefix, continuation, "solve") == (prefix + continuation, len(prefix))
    fenced = "Here:\n```python\n" + answer + "```\n"
    program, shift = assemble(prompt, fenced, "count_even")
    assert program[fenced.index("def") + shift:].startswith("def count_even(xs):")


def test_prompt_ends_inside_a_code_block_with_starter_and_prefix():
    problem = Problem(id="t/1", question="Return the sign of n.", starter_code="def sign(n):\n",
                      solutions=["def sign(n):\n    return 0\n"], tests=[TestCase([1], 1)], kind="function", entry="sign")
    prompt = build_prompt(problem, prefix="def sign(n):\n    if n > 0:\n")
    assert prompt.startswith("### Question:\nReturn the sign of n.")
    assert prompt.endswith("```python\ndef sign(n):\n    if n > 0:")  # the completion opens the next line
    assert build_prompt(problem).endswith("```python\ndef sign(n):\n")  # full generation: the starter code
    # a CCCS prefix no longer than the starter code is the whole program's prompt, boundary and all
    assert build_prompt(problem, prefix="def sign(n):\n") == build_prompt(problem)
    assert "`sign`" in prompt
    assert problem.program("\n        return 1\n    return -1\n```", "def sign(n):\n    if n > 0:\n") == \
        "def sign(n):\n    if n > 0:\n        return 1\n    return -1\n"


class _ChatTokenizer:
    chat_template = "unused"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_chat_prompt_puts_the_instruction_in_a_user_turn():
    problem = load_builtin().problems[0]
    prompt = build_prompt(problem, prefix="", tokenizer=_ChatTokenizer())
    assert prompt.startswith("<user>" + problem.question.strip())
    assert prompt.endswith("<assistant>```python\n" + problem.starter_code)
    assert build_prompt(problem, tokenizer=_ChatTokenizer(), chat=False).startswith("### Question:")
