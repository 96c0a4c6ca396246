"""Tokens to text and back with the tokenizers real checkpoints ship, all built offline here: responses
decode exactly after their prompt (SentencePiece decoders drop a leading space on their own), FGO's
token spans agree with that text, one BOS with chat templates that render it, and sampling that uses
only the trainer's settings, not the checkpoint's generation_config."""
from __future__ import annotations

import random
import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from trace_reference import random_program
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.generation.stopping_criteria import StopStringCriteria

from stepcoder.data import load_builtin
from stepcoder.detokenize import continuation
from stepcoder.fgo import token_mask
from stepcoder.generation import encode_prompts, only_these_settings, sampling_config
from stepcoder.models import build_default_tokenizer
from stepcoder.prompts import STOP_STRING, build_prompt

CORPUS = [p.question + "\n" + s for p in load_builtin().problems for s in p.solutions]


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-style: "▁" for spaces, a dummy prefix on the first word, a decoder that strips it again,
    byte fallback, and a BOS added in front."""
    model = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    alphabet = [char for char in string.printable if not char.isspace() or char == "\n"]  # no <unk> in code
    model.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                                          initial_alphabet=alphabet, show_progress=False))
    model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["sentencepiece", "byte-level"])
def tokenizer(request):
    return sentencepiece_tokenizer() if request.param == "sentencepiece" else build_default_tokenizer(CORPUS)


def split(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int], str]:
    """(prompt ids, response ids, response text) as a sampler would hold them: the encoding of both
    texts cut at the last token boundary within the prompt (a token may straddle the line break: then
    the response starts a little earlier), and the text those response tokens must decode to."""
    ids = tokenizer(prompt + response)["input_ids"]
    cut = max(k for k in range(len(ids) + 1)
              if len(tokenizer.decode(ids[:k], skip_special_tokens=True)) <= len(prompt))
    head = tokenizer.decode(ids[:cut], skip_special_tokens=True)
    assert (prompt + response).startswith(head)
    return ids[:cut], ids[cut:], (prompt + response)[len(head):]


def test_a_response_starting_with_indentation_decodes_exactly(tokenizer):
    program = "def f(n):\n    if n > 0:\n        return 1\n    return 0\n```"
    prompt_ids, ids, response = split(tokenizer, "def f(n):\n", program[len("def f(n):\n"):])
    text, spans = continuation(tokenizer, prompt_ids, ids)
    assert text == response
    assert len(spans) == len(ids) and "".join(text[a:b] for a, b in spans) == text
    if tokenizer.bos_token == "<s>":  # the bug this guards against: on its own, one space is gone
        assert response.startswith("    if") and tokenizer.decode(ids) == response[1:]
    prompt = program[:len(program) - len(response)]
    mask = token_mask(prompt, text, spans, executed_lines=[1, 2, 4])  # n <= 0: `return 1` never ran
    dropped = "".join(text[a:b] for (a, b), kept in zip(spans, mask) if not kept)
    assert dropped.strip() == "return 1"


@pytest.mark.slow
def test_random_programs_cut_anywhere_decode_exactly(tokenizer):
    rng = random.Random()
    for _ in range(30):
        program = random_program(rng)
        lines = program.splitlines(keepends=True)
        cut = rng.randrange(1, len(lines))
        prompt_ids, ids, response = split(tokenizer, "".join(lines[:cut]), "".join(lines[cut:]))
        text, spans = continuation(tokenizer, prompt_ids, ids)
        assert text == response, response
        assert "".join(text[a:b] for a, b in spans) == text
        assert all(a <= b <= c for (a, b), (c, _) in zip(spans, spans[1:] + [(len(text), 0)]))


def test_a_non_canonical_token_sequence_still_decodes_exactly():
    """Sampled tokens need not be the tokenizer's own encoding: the same text spelled one symbol per
    token re-encodes differently, so the spans come from the incremental decode, still exact."""
    tokenizer = sentencepiece_tokenizer()
    prompt_ids, ids, response = split(tokenizer, "def f(n):\n", "    if n:\n        return 1\n")
    spelled = [tokenizer.convert_tokens_to_ids(symbol) for token in tokenizer.convert_ids_to_tokens(ids)
               for symbol in token]
    assert tokenizer.unk_token_id not in spelled and spelled != ids
    text, spans = continuation(tokenizer, prompt_ids, spelled)
    assert text == response and len(spans) == len(spelled)
    assert "".join(text[a:b] for a, b in spans) == text


def chat_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = sentencepiece_tokenizer()
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def test_one_bos_with_a_chat_template_that_renders_it_and_none_in_warmup_targets():
    from stepcoder import warmup

    tokenizer = chat_tokenizer()
    problems = load_builtin().problems[:3]
    prompts = [build_prompt(problem, "", tokenizer) for problem in problems]
    assert all(prompt.startswith("<s>") for prompt in prompts)
    assert tokenizer(prompts[0])["input_ids"].count(tokenizer.bos_token_id) == 2  # what the plain call gives
    encoded = encode_prompts(tokenizer, prompts)
    for row, mask in zip(encoded["input_ids"], encoded["attention_mask"]):
        ids = row[mask.bool()].tolist()
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    plain = encode_prompts(tokenizer, [build_prompt(problems[0], "", tokenizer, chat=False)])["input_ids"][0]
    assert plain.tolist().count(tokenizer.bos_token_id) == 1  # the tokenizer still adds it where nothing did
    examples = warmup.warmup_examples(problems, {p.id: [""] for p in problems}, tokenizer, chat=None)
    for prompt_ids, target_ids in examples:
        assert prompt_ids.count(tokenizer.bos_token_id) == 1 and tokenizer.bos_token_id not in target_ids


def test_the_checkpoints_generation_config_does_not_leak_into_sampling(tmp_path):
    """A checkpoint shipping a repetition penalty and top_k: sampling with the trainer's settings sees
    the model's own distribution (logits / T at every step), exactly what the learner scores."""
    tokenizer = build_default_tokenizer(CORPUS)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id))
    model.generation_config = GenerationConfig(do_sample=True, repetition_penalty=5.0, top_k=5,
                                               eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path)
    model = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert model.generation_config.repetition_penalty == 5.0
    encoded = encode_prompts(tokenizer, ["def f(x):\n    return x + x + x"])
    settings = sampling_config(model, tokenizer, max_new_tokens=4, temperature=0.7)
    settings.output_scores = settings.return_dict_in_generate = True
    width = encoded["input_ids"].shape[1]
    with torch.no_grad():
        with only_these_settings(model, settings):
            out = model.generate(**encoded, generation_config=settings, tokenizer=tokenizer)
        leaked = model.generate(**encoded, generation_config=settings, tokenizer=tokenizer)  # no guard
        logits = model(out.sequences).logits[0, width - 1:-1] / 0.7
        leaked_logits = model(leaked.sequences).logits[0, width - 1:-1] / 0.7
    assert model.generation_config.repetition_penalty == 5.0  # restored afterwards
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(scores[0], logits[step], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaked.scores[0][0], leaked_logits[0])  # unguarded, the shipped penalty applies


def test_generation_stops_at_a_fence_opening_a_line_only():
    tokenizer = build_default_tokenizer(CORPUS)
    stop = StopStringCriteria(tokenizer, [STOP_STRING])
    for text, stops in (('    return "```"', False), ("x = '``` '", False), ("    return 1\n```", True)):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        assert bool(stop(ids, None)[0]) == stops, text
