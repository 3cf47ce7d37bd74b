"""What every backend does the same way: turn a problem into prompt text, count the
tokens a request's next call must prefill, estimate an entropy from top-k logprobs,
decode tokens as they read after the context, and work out a scored text's
`ScoreOutput.greedy_prefix` from the model's greedy choices along it.

`HFBackend`, `VLLMBackend` and `OpenAIBackend` all render prompts here, so the three
see the same prompt for the same problem and their costs and traces can be compared.
This module knows nothing about any engine, gates, costs or budgets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Container, Iterable, Sequence

__all__ = ["render_prompt", "check_prompt_settings", "PrefixLedger", "crop_point", "prompt_ids", "step_piece",
           "entropy_from_top", "decode_after", "delimiter_end", "greedy_prefix"]


def check_prompt_settings(step_delimiter: str, prompt_template: str | None) -> None:
    """The constructor checks every backend shares (a ValueError naming the parameter)."""
    if not isinstance(step_delimiter, str) or not step_delimiter:
        raise ValueError(f"step_delimiter must be a non-empty string, got {step_delimiter!r}")
    if prompt_template is not None and "{problem}" not in prompt_template:
        raise ValueError(f"prompt_template must contain '{{problem}}', got {prompt_template!r}")


def render_prompt(problem: str, *, tokenizer=None, step_delimiter: str,
                  prompt_template: str | None = None) -> tuple[str, bool]:
    """The prompt text for a problem, and whether the tokenizer should add its specials.

    `prompt_template` (a format string with `{problem}`) when given; else the tokenizer's
    chat template (one user message, generation prompt added) when it has one; else the
    problem followed by the step delimiter.
    """
    if prompt_template is not None:
        return prompt_template.format(problem=problem), True
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": problem}], tokenize=False, add_generation_prompt=True)
        return text, False
    return problem + step_delimiter, True


def crop_point(cached: str, boundaries: Iterable[tuple[int, int]], target: str) -> tuple[int, int]:
    """The (tokens, characters) boundary a cache holding `cached` keeps to reach `target`:
    the last piece boundary inside their shared prefix ((0, 0): start over). HFBackend's
    KV cache and the engine backends' prefill ledger crop by this one rule, so all of
    them charge the same prefill for the same history."""
    shared = 0
    limit = min(len(cached), len(target))
    while shared < limit and cached[shared] == target[shared]:
        shared += 1
    keep = (0, 0)
    for tokens, chars in boundaries:
        if chars <= shared:
            keep = (tokens, chars)
    return keep


def prompt_ids(encode: Callable[[str, bool], list[int]], prompt: str, add_special: bool,
               *pieces: str) -> list[int]:
    """Token ids as HFBackend feeds them to a fresh cache: the prompt, then each piece
    encoded on its own (so engine backends send exactly the tokens HFBackend would)."""
    ids = encode(prompt, add_special)
    for piece in pieces:
        if piece:
            ids += encode(piece, False)
    return ids


def decode_after(tokenizer, anchor: int | None, ids: Sequence[int]) -> str:
    """Text of `ids` as it reads after the token `anchor` (keeps the leading space that
    SentencePiece-style decoders drop at the start of a sequence)."""
    if anchor is None:
        return tokenizer.decode(list(ids), skip_special_tokens=False)
    with_anchor = tokenizer.decode([anchor, *ids], skip_special_tokens=False)
    return with_anchor[len(tokenizer.decode([anchor], skip_special_tokens=False)):]


def delimiter_end(ids: Sequence[int], decode: Callable[[Sequence[int]], str], delimiter: str,
                  may_end: Callable[[int], bool] | None = None) -> int | None:
    """How many of `ids` a step decoding them would keep before stopping at the delimiter
    (the first token that completes it), or None if none does. decode: ids -> their text
    after the context. may_end: a cheap test that a token can complete the delimiter
    (others are not decoded)."""
    for end, token in enumerate(ids, start=1):
        if (may_end is None or may_end(token)) and delimiter in decode(ids[:end]):
            return end
    return None


def greedy_prefix(ids: Sequence[int], agreed: int, next_token: int | None, *, text: str, delimiter: str,
                  decode: Callable[[Sequence[int]], str], eos_ids: Container[int],
                  may_end: Callable[[int], bool] | None = None) -> tuple[str | None, int]:
    """`ScoreOutput.greedy_prefix` and its token count, from a scoring pass over `text`.

    ids: the scored text's tokens; agreed: how many leading ids are the model's own greedy
    choices; next_token: its greedy token at position `agreed` (after the whole text when
    agreed == len(ids)), None when the pass does not show it. decode: ids -> their text
    after the context. (None, 0) when the greedy continuation is unknown, is EOS, or does
    not decode piece by piece (a split character).
    """
    if agreed == len(ids) and text.endswith(delimiter):
        greedy = list(ids)
    else:
        if next_token is None or next_token in eos_ids:
            return None, 0
        greedy = [*ids[:agreed], next_token]
        if not decode(greedy).startswith(decode(ids[:agreed])):
            return None, 0
    end = delimiter_end(greedy, decode, delimiter, may_end) or len(greedy)  # where decoding would stop
    prefix = decode(greedy[:end])
    if not prefix:
        return None, 0
    cut = prefix.find(delimiter)
    return (prefix[: cut + len(delimiter)] if cut >= 0 else prefix), end


def step_piece(text: str, generated_tokens: int, stop_reason: str) -> tuple[str, int]:
    """A generated step as a `PrefixLedger.record` piece: its text and the tokens a cache
    holds after it, which is all of them but a final EOS (HFBackend never feeds EOS)."""
    return text, generated_tokens - (1 if stop_reason == "eos" else 0)


@dataclass
class _Entry:
    text: str = ""
    tokens: int = 0
    # (tokens, characters) after each piece sent or generated: the places a cache that
    # holds this text can be cut back to without re-encoding (as HFBackend crops its KV).
    boundaries: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])


class PrefixLedger:
    """Per-request record of the text a (prefix-caching) engine has already seen.

    A backend that re-sends the whole prompt each call (a server, vLLM) still only
    computes the tokens past the cached prefix; this ledger counts those tokens with the
    same rule `HFBackend` applies to its own KV cache: keep the last piece boundary inside
    the shared prefix, re-feed one token when the text diverged after it, then the rest.
    Counting with the same rule is what makes costs, and so calibrations, comparable
    across backends. Not thread-safe: the owning backend serializes access.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def _keep(self, entry: _Entry, target: str) -> tuple[int, int]:
        return crop_point(entry.text, entry.boundaries, target)

    def prefill(self, request_id: str, prompt: str, context: str,
                count: Callable[[str, bool], int]) -> int:
        """Tokens a call on prompt + context must prefill. count(text, is_prompt) -> tokens."""
        entry = self._entries.get(request_id, _Entry())
        tokens, chars = self._keep(entry, prompt + context)
        if tokens == 0:
            return count(prompt, True) + (count(context, False) if context else 0)
        rest = (prompt + context)[chars:]
        return int(tokens < entry.tokens) + (count(rest, False) if rest else 0)

    def record(self, request_id: str, prompt: str, context: str, pieces: Iterable[tuple[str, int]],
               count: Callable[[str, bool], int]) -> None:
        """After a call: the engine now holds prompt + context + the pieces (text, tokens)
        it generated or scored."""
        entry = self._entries.get(request_id, _Entry())
        target = prompt + context
        tokens, chars = self._keep(entry, target)
        if tokens == 0:
            entry = _Entry()
            entry.tokens = count(prompt, True)
            entry.text = prompt
            entry.boundaries.append((entry.tokens, len(prompt)))
            tokens, chars = entry.tokens, len(prompt)
        else:
            entry.tokens = tokens
            entry.text = target[:chars]
            entry.boundaries = [b for b in entry.boundaries if b[0] <= tokens]
        rest = target[chars:]
        if rest:
            entry.tokens += count(rest, False)
            entry.text = target
            entry.boundaries.append((entry.tokens, len(target)))
        for text, n in pieces:
            entry.tokens += n
            entry.text += text
            entry.boundaries.append((entry.tokens, len(entry.text)))
        self._entries[request_id] = entry

    def release(self, request_id: str) -> None:
        self._entries.pop(request_id, None)

    def fork(self, source_id: str, target_id: str) -> None:
        """`target_id` starts from what `source_id` holds (a forked cache holds the same)."""
        entry = self._entries.get(source_id)
        if entry is None:
            self._entries.pop(target_id, None)
        else:
            self._entries[target_id] = _Entry(entry.text, entry.tokens, list(entry.boundaries))


def entropy_from_top(logprobs: Iterable[float]) -> float:
    """Entropy (nats) of a distribution known only by its top-k log-probabilities: the
    unseen mass is lumped into one outcome, so this is a lower bound on the true entropy,
    exact when the top-k cover the whole support."""
    probs = [math.exp(lp) for lp in logprobs if lp is not None and math.isfinite(lp)]
    total = math.fsum(probs)
    rest = max(0.0, 1.0 - total)
    return -math.fsum(p * math.log(p) for p in probs if p > 0) - (rest * math.log(rest) if rest > 0 else 0.0)
