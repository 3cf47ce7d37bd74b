"""The shared step helpers every backend uses: where a step stops at the delimiter and the
greedy prefix of a scored text, on a character tokenizer (one token per character)."""

from __future__ import annotations

import pytest

from decoding.prompting import decode_after, delimiter_end, greedy_prefix

ALPHABET = "abcxyz=+\n"
EOS = len(ALPHABET)


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(ALPHABET[i] if i < EOS else "" for i in ids)


def ids_of(text: str) -> list[int]:
    return [ALPHABET.index(c) for c in text]


def _prefix(text: str, agreed: int, next_char: str | None):
    decode = lambda ids: decode_after(CharTokenizer(), ALPHABET.index("="), ids)  # noqa: E731
    token = None if next_char is None else (EOS if next_char == "<eos>" else ALPHABET.index(next_char))
    return greedy_prefix(ids_of(text), agreed, token, text=text, delimiter="\n", decode=decode, eos_ids={EOS})


def test_delimiter_end_is_the_first_token_that_completes_it():
    decode = lambda ids: CharTokenizer().decode(ids)  # noqa: E731
    assert delimiter_end(ids_of("ab\nc\n"), decode, "\n") == 3
    assert delimiter_end(ids_of("abc"), decode, "\n") is None
    assert delimiter_end(ids_of("a=\n=\n"), decode, "=\n") == 3
    calls = []
    assert delimiter_end(ids_of("ab\n"), decode, "\n", may_end=lambda t: calls.append(t) or t == 8) == 3
    assert calls == ids_of("ab\n")


@pytest.mark.parametrize("text, agreed, next_char, expected", [
    ("ab+c\n", 5, None, ("ab+c\n", 5)),      # the model's own step, delimiter and all
    ("ab+c\n", 2, "x", ("abx", 3)),          # agreed "ab", then its own "x"
    ("ab+c\n", 0, "z", ("z", 1)),            # disagrees from the first token
    ("ab+c\n", 2, "\n", ("ab\n", 3)),        # its own token ends the step there
    ("ab+c", 4, "\n", ("ab+c\n", 5)),        # agreed, cut short: its next token is the delimiter
    ("ab+c", 4, None, (None, 0)),            # agreed, cut short, next token unknown
    ("ab+c\n", 1, "<eos>", (None, 0)),       # it would end the sequence instead
])
def test_greedy_prefix(text, agreed, next_char, expected):
    assert _prefix(text, agreed, next_char) == expected
