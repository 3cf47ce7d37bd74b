"""What every backend does the same way: turn a problem into prompt text, turn a
request's context into tokens by one rule (`plan_catch_up`, kept per request by
`PrefixLedger` for engines that are sent the whole prompt each call), count the tokens
a request's next call must prefill, estimate an entropy from top-k logprobs,
decode tokens as they read after the context, and work out a scored text's
`ScoreOutput.greedy_prefix` from the model's greedy choices along it.

`HFBackend`, `VLLMBackend` and `OpenAIBackend` all render prompts here, so the three
see the same prompt for the same problem and their costs and traces can be compared.
This module knows nothing about any engine, gates, costs or budgets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["render_prompt", "check_prompt_settings", "PrefixLedger", "CatchUp", "plan_catch_up", "crop_point",
           "piece_encoder", "LOOKAHEAD", "step_piece", "entropy_from_top", "decode_after", "delimiter_end",
           "greedy_prefix"]


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


Encode = Callable[[str, bool], list[int]]  # (text, is_prompt) -> token ids

# What a step usually starts with: a word. A piece of context that ends in whitespace (every
# context ends with the step delimiter) is encoded as it reads with a word after it, because
# BPE tokenizers split whitespace by what follows: GPT-2-style ones (SmolLM2) encode "\n\nThe"
# as '\n', '\n', 'The' but "\n\n" alone as '\n\n', a pair ('\n\n', 'The') the model never saw
# in training (measured on SmolLM2-135M: "The" at -14 nats after '\n\n', -1 after '\n', '\n',
# so a step scored or written after a context encoded alone was judged by an artifact).
LOOKAHEAD = "A"


def piece_encoder(encode: Callable[[str, bool], list[int]], tokenizer, add_special: bool) -> Encode:
    """THE encoder behind `plan_catch_up` for a model: (text, is_prompt) -> token ids.

    encode(text, add_special_tokens): the model's encoding; tokenizer: what decodes its ids
    (`tokenizer.decode(ids, skip_special_tokens=False)`, as in `decode_after`; None: no
    lookahead). The prompt gets the specials its rendering asks for. Other text that ends
    in whitespace is encoded followed by `LOOKAHEAD` and cut back to the tokens that spell
    exactly the text; when no cut does (the lookahead merged with the text's end, or the
    decoder does not spell pieces exactly), the text is encoded alone, as before.
    """
    def encode_piece(text: str, is_prompt: bool) -> list[int]:
        if is_prompt:
            return encode(text, add_special)
        if tokenizer is None or not text or not text[-1].isspace():
            return encode(text, False)
        ids = encode(text + LOOKAHEAD, False)
        for cut in range(len(ids) - 1, 0, -1):
            head = tokenizer.decode(ids[:cut], skip_special_tokens=False)
            if head == text:
                return ids[:cut]
            if len(head) < len(text):
                break
        return encode(text, False)
    return encode_piece


@dataclass(frozen=True)
class CatchUp:
    """How a request's token sequence reaches prompt + context (see `plan_catch_up`).

    keep_tokens/keep_chars: the leading tokens (and the characters they spell) of what
    the request already holds that stay; 0 = start over from the prompt.
    new_ids: the tokens after them: the prompt (when starting over), then the new text.
    refeed: one kept token must be fed again (the cache was cut back inside what it held,
    so the distribution after the boundary must be computed again).
    """

    keep_tokens: int
    keep_chars: int
    new_ids: list[int]
    refeed: bool

    @property
    def prefill(self) -> int:
        """Tokens a call that catches up this way feeds through the model."""
        return int(self.refeed) + len(self.new_ids)


def plan_catch_up(held_text: str, held_tokens: int, boundaries: Sequence[tuple[int, int]], prompt: str,
                  context: str, encode: Encode) -> CatchUp:
    """THE rule for what a request's context is in tokens, shared by every backend.

    A request's token sequence is built by appending pieces: the prompt (encoded with the
    tokenizer's specials when it asks for them), then each step exactly as the model's
    own token ids when this model generated it, each scored text encoded on its own, and
    any other new text encoded on its own. When the context diverges from what is held
    (a rejected draft, another tier's step, a sweep branch), the sequence is cut back to
    the last piece boundary inside the shared text and the rest is encoded as one piece.

    So one model's greedy run feeds back exactly the tokens it generated (a cascade with
    a single tier writes what plain greedy decoding writes), the sequence only ever grows
    at its end between divergences (prefix caches always hit), and `HFBackend` (its KV
    cache), `VLLMBackend` and `OpenAIBackend` (their `PrefixLedger`) send the same tokens
    for the same history, so they write the same greedy steps on any tokenizer.
    Re-encoding the whole text instead would turn a step generated as '.', '\n', '\n\n'
    into '.', '\n\n\n' on a BPE tokenizer: tokens the model never wrote, a different next
    step, and a cache that misses at every step boundary.
    """
    target = prompt + context
    tokens, chars = crop_point(held_text, boundaries, target)
    if tokens == 0:
        ids = encode(prompt, True)
        if context:
            ids = ids + encode(context, False)
        return CatchUp(0, 0, ids, False)
    rest = target[chars:]
    return CatchUp(tokens, chars, encode(rest, False) if rest else [], tokens < held_tokens)


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


def step_piece(text: str, token_ids: Sequence[int], stop_reason: str) -> tuple[str, list[int]]:
    """A generated step as a `PrefixLedger.record` piece: its text and the token ids a
    cache holds after it, which is all of them but a final EOS (HFBackend never feeds EOS)."""
    ids = list(token_ids)
    return text, ids[:-1] if stop_reason == "eos" and ids else ids


@dataclass
class _Entry:
    text: str = ""
    ids: list[int] = field(default_factory=list)
    # (tokens, characters) after each piece sent or generated: the places a cache that
    # holds this text can be cut back to without re-encoding (as HFBackend crops its KV).
    boundaries: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])


class PrefixLedger:
    """Per-request record of the tokens a (prefix-caching) engine has been sent and has
    generated, kept by the backend that talks to it (vLLM, an OpenAI-compatible server).

    `plan` gives the token ids to send for prompt + context by `plan_catch_up`, the
    rule `HFBackend` applies to its own KV cache, and the tokens a prefix cache leaves to
    compute; `record` appends what the call sent and generated. Sending the same tokens
    and counting with the same rule is what makes steps, costs and so calibrations the
    same across backends. A backend without a tokenizer passes an `encode` that returns
    placeholder ids (-1), one per token of its count: the counts stay right, the ids are
    not sent. Not thread-safe: the owning backend serializes access.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def _catch_up(self, request_id: str, prompt: str, context: str, encode: Encode) -> tuple[_Entry, CatchUp]:
        entry = self._entries.get(request_id, _Entry())
        return entry, plan_catch_up(entry.text, len(entry.ids), entry.boundaries, prompt, context, encode)

    def plan(self, request_id: str, prompt: str, context: str, encode: Encode) -> tuple[list[int], int]:
        """(the token ids of prompt + context to send, the tokens a call must prefill)."""
        entry, plan = self._catch_up(request_id, prompt, context, encode)
        return entry.ids[:plan.keep_tokens] + plan.new_ids, plan.prefill

    def prefill(self, request_id: str, prompt: str, context: str, encode: Encode) -> int:
        """Tokens a call on prompt + context must prefill."""
        return self._catch_up(request_id, prompt, context, encode)[1].prefill

    def record(self, request_id: str, prompt: str, context: str,
               pieces: Iterable[tuple[str, Sequence[int]]], encode: Encode) -> None:
        """After a call: the engine now holds prompt + context (as `plan` sent it) and the
        pieces (text, token ids) it generated or scored, each one piece."""
        entry, plan = self._catch_up(request_id, prompt, context, encode)
        target = prompt + context
        if plan.keep_tokens == 0:
            prompt_len = len(encode(prompt, True))
            entry = _Entry(text=prompt, ids=plan.new_ids[:prompt_len])
            entry.boundaries.append((prompt_len, len(prompt)))
            rest_ids, rest_text = plan.new_ids[prompt_len:], context
        else:
            entry.ids = entry.ids[:plan.keep_tokens]
            entry.text = target[:plan.keep_chars]
            entry.boundaries = [b for b in entry.boundaries if b[0] <= plan.keep_tokens]
            rest_ids, rest_text = plan.new_ids, target[plan.keep_chars:]
        pieces = [(rest_text, rest_ids), *pieces]
        for text, ids in pieces:
            if not text and not ids:
                continue
            entry.ids.extend(ids)
            entry.text += text
            entry.boundaries.append((len(entry.ids), len(entry.text)))
        self._entries[request_id] = entry

    def release(self, request_id: str) -> None:
        self._entries.pop(request_id, None)

    def fork(self, source_id: str, target_id: str) -> None:
        """`target_id` starts from what `source_id` holds (a forked cache holds the same)."""
        entry = self._entries.get(source_id)
        if entry is None:
            self._entries.pop(target_id, None)
        else:
            self._entries[target_id] = _Entry(entry.text, list(entry.ids), list(entry.boundaries))


def entropy_from_top(logprobs: Iterable[float]) -> float:
    """Entropy (nats) of a distribution known only by its top-k log-probabilities: the
    unseen mass is lumped into one outcome, so this is a lower bound on the true entropy,
    exact when the top-k cover the whole support."""
    probs = [math.exp(lp) for lp in logprobs if lp is not None and math.isfinite(lp)]
    total = math.fsum(probs)
    rest = max(0.0, 1.0 - total)
    return -math.fsum(p * math.log(p) for p in probs if p > 0) - (rest * math.log(rest) if rest > 0 else 0.0)
