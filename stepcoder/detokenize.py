"""The exact text generated tokens add after a prompt, and each token's character span in it.

SentencePiece decoders (the Llama family's) drop the leading space of a sequence's first token, so a
response decoded on its own loses one space of its first line's indentation: correct code becomes an
IndentationError. Tokens are therefore decoded after the prompt's last few tokens and only what they
add is kept — exact for SentencePiece and byte-level BPE alike. The spans FGO uses come with the text,
so the two agree by construction:

- usually from the fast tokenizer's offset mapping: the tokens decoded on their own re-encode to the
  same ids (SentencePiece's dummy prefix gives the dropped space back to the first token);
- otherwise from an incremental decode over a sliding window of tokens (as streaming detokenizers do),
  checked against the whole decode, and, failing that, from decoding growing prefixes (exact for any
  tokenizer, one decode per token).
"""
from __future__ import annotations

from collections.abc import Sequence

ANCHOR_TOKENS = 4  # prompt tokens decoded before the response
REPLACEMENT = "\ufffd"  # what a decoder shows for the bytes of a character not yet complete


def code_tokens(tokenizer, token_ids: Sequence[int]) -> list[int]:
    """Generated tokens without the special ones (EOS, padding), which carry no code."""
    special = set(tokenizer.all_special_ids)
    return [token for token in token_ids if token not in special]


def continuation(tokenizer, context_ids: Sequence[int], token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """(text, spans): what `token_ids` add after `context_ids` (the prompt, or nothing), and each
    token's (start, end) in that text. A token that only starts a multi-byte character has an empty
    span; the token completing it spans the character."""
    anchor, ids = list(context_ids)[-ANCHOR_TOKENS:], list(token_ids)
    head = _decode(tokenizer, anchor)
    whole = _decode(tokenizer, anchor + ids)
    text = whole[len(head):] if whole.startswith(head) else _decode(tokenizer, ids)
    spans = _offset_mapping(tokenizer, ids)
    if spans is not None:
        alone = _decode(tokenizer, ids)
        if text.endswith(alone):
            dropped = len(text) - len(alone)  # the space a SentencePiece decoder strips from the first token
            spans = [(start + dropped, end + dropped) for start, end in spans]
            if spans and dropped:
                spans[0] = (0, spans[0][1])
            return text, spans
    streamed, spans = _incremental(tokenizer, anchor, ids)
    if streamed == text:
        return text, spans
    return text, _growing_prefixes(tokenizer, anchor, ids, head)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _offset_mapping(tokenizer, ids: list[int]) -> list[tuple[int, int]] | None:
    """Spans in the tokens' own decode, when re-encoding that text gives the same ids back."""
    if not getattr(tokenizer, "is_fast", False) or not ids:
        return [] if not ids else None
    encoded = tokenizer(_decode(tokenizer, ids), add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != ids:
        return None
    return [tuple(span) for span in encoded["offset_mapping"]]


def _incremental(tokenizer, anchor: list[int], ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Decode token by token over a short window: each step's new text is the window's decode minus
    the decode of the window without the new tokens; it waits while a character is incomplete."""
    sequence = anchor + ids
    prefix, read = max(len(anchor) - 1, 0), len(anchor)  # window start; end of the text emitted so far
    text, spans = "", []
    for end in range(len(anchor) + 1, len(sequence) + 1):
        before = _decode(tokenizer, sequence[prefix:read])
        after = _decode(tokenizer, sequence[prefix:end])
        start = len(text)
        if len(after) > len(before) and after.startswith(before) and not after.endswith(REPLACEMENT):
            text += after[len(before):]
            prefix, read = read, end
        spans.append((start, len(text)))
    return text, spans


def _growing_prefixes(tokenizer, anchor: list[int], ids: list[int], head: str) -> list[tuple[int, int]]:
    spans, previous = [], 0
    for count in range(1, len(ids) + 1):
        decoded = _decode(tokenizer, anchor + ids[:count])
        length = len(decoded) - len(head) if decoded.startswith(head) else len(_decode(tokenizer, ids[:count]))
        spans.append((min(previous, length), length))
        previous = max(previous, length)
    return spans
