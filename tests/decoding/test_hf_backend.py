"""HFBackend on tiny random Llama models: stopping, scoring, KV reuse, errors."""

from __future__ import annotations

import pytest
import torch

from decoding import Backend, HFBackend, ModelLoadError, ScoreRequest, StepRequest

PROBLEM = "a=12;b=a+3;?b"


@pytest.fixture(scope="module")
def small(tiny_dirs) -> HFBackend:
    return HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")


def step(backend, context="", max_tokens=12, request_id="r", **kw):
    return backend.next_steps([StepRequest(request_id, PROBLEM, context, max_tokens, **kw)])[0]


def test_satisfies_protocol(small):
    assert isinstance(small, Backend)
    assert small.info.num_parameters > 0 and len(small.info.fingerprint) == 16


def test_stops_at_max_tokens_and_at_delimiter(tiny_dirs):
    free = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    out = step(free, max_tokens=8)
    assert out.generated_tokens <= 8
    if out.stop_reason == "max_tokens":
        assert out.generated_tokens == 8
    # Make the third generated character the delimiter: greedy decoding must stop there.
    delimiter = out.text[2]
    stopping = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter=delimiter)
    cut = step(stopping, max_tokens=8)
    assert cut.stop_reason == "delimiter"
    assert cut.text.endswith(delimiter) and cut.text == out.text[: len(cut.text)]
    assert len(cut.text) <= 3


def test_eos_stops_and_is_not_in_text(tiny_dirs):
    backend = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    free = step(backend, max_tokens=6, request_id="free")
    # Declare the third greedy token an end-of-sequence token: generation must end there.
    backend.eos_ids = frozenset({free.token_ids[2]})
    out = step(backend, max_tokens=6, request_id="eos")
    assert out.stop_reason == "eos"
    assert out.token_ids == free.token_ids[:3]
    assert out.text == backend._decode_after(None, list(free.token_ids[:2]))


def test_score_agrees_with_generation_logprobs(small):
    context = ""
    for k in range(3):
        out = step(small, context, request_id="gen")
        scored = small.score_steps([ScoreRequest(f"score{k}", PROBLEM, context, out.text)])[0]
        assert scored.token_ids == out.token_ids[: len(scored.token_ids)]
        assert len(scored.logprobs) == len(out.logprobs)
        assert max(abs(a - b) for a, b in zip(scored.logprobs, out.logprobs, strict=False)) < 1e-4
        context += out.text


def _greedy_full_recompute(backend: HFBackend, ids: list[int], n: int) -> list[int]:
    """Reference: each next token from a forward pass over the whole sequence, no cache."""
    ids = list(ids)
    produced = []
    with torch.no_grad():
        for _ in range(n):
            logits = backend.model(input_ids=torch.tensor([ids])).logits[0, -1]
            token = int(torch.argmax(logits))
            produced.append(token)
            ids.append(token)
    return produced


def test_incremental_decoding_equals_full_recompute(tiny_dirs, small):
    other = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    context = ""
    for k in range(4):
        # Alternate authors, as a cascade does: each model catches up on the other's text.
        author = small if k % 2 == 0 else other
        out = step(author, context, max_tokens=6, request_id="kv")
        prompt, _ = author.render_prompt(PROBLEM)
        full_ids = author._encode(prompt) + author._encode(context) if context else author._encode(prompt)
        assert list(out.token_ids) == _greedy_full_recompute(author, full_ids, out.generated_tokens)
        context += out.text + ("\n" if not out.text.endswith("\n") else "")
    assert small._sessions["kv"].ids  # the cache was kept across steps


def test_only_new_tokens_are_fed(small):
    first = step(small, "", request_id="feed")
    assert first.prefill_tokens == len(small._encode(small.render_prompt(PROBLEM)[0]))
    second = step(small, first.text, request_id="feed")
    assert second.prefill_tokens == 0  # its own step is already in the cache
    foreign = "b=15\n"
    third = step(small, first.text + second.text + foreign, request_id="feed")
    assert third.prefill_tokens == len(foreign)


def test_divergence_crops_and_matches_fresh_request(small):
    draft = step(small, "", request_id="div")
    rejected_then = step(small, "b=1\n", request_id="div")  # the draft was rejected
    fresh = step(small, "b=1\n", request_id="fresh")
    assert rejected_then.token_ids == fresh.token_ids
    assert max(abs(a - b) for a, b in zip(rejected_then.logprobs, fresh.logprobs, strict=False)) < 1e-4
    assert rejected_then.prefill_tokens == len("b=1\n") + 1  # one token re-fed at the crop
    assert draft.text


def test_prefill_bound_is_exact(small):
    context = ""
    for _ in range(3):
        bound = small.prefill_bound("pb", PROBLEM, context)
        out = step(small, context, request_id="pb")
        assert out.prefill_tokens == bound
        context += out.text + "9\n"


def test_sampling_is_seeded(small):
    a = step(small, "", request_id="s1", temperature=1.0, seed=7)
    b = step(small, "", request_id="s2", temperature=1.0, seed=7)
    assert a.token_ids == b.token_ids


def test_hidden_state_returned_on_request(small):
    out = step(small, "", request_id="h", return_hidden=True)
    assert out.hidden is not None and len(out.hidden) == small.model.config.hidden_size


def test_release_frees_state(small):
    step(small, "", request_id="gone")
    small.release("gone")
    small.release("gone")
    assert "gone" not in small._sessions


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no model at"):
        HFBackend.from_pretrained(str(tmp_path / "missing"))


def test_bad_settings_are_rejected(tiny_dirs):
    with pytest.raises(ValueError, match="step_delimiter"):
        HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="")
    with pytest.raises(ValueError, match="dtype"):
        HFBackend.from_pretrained(tiny_dirs[0], dtype="float64")
    with pytest.raises(ValueError, match="prompt_template"):
        HFBackend.from_pretrained(tiny_dirs[0], prompt_template="no placeholder")


def _same_step(a, b) -> bool:
    return (a.text == b.text and a.token_ids == b.token_ids and a.stop_reason == b.stop_reason
            and max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=False)), default=0) < 1e-4
            and max((abs(x - y) for x, y in zip(a.entropies, b.entropies, strict=False)), default=0) < 1e-4)


@pytest.mark.parametrize("max_tokens", [12, 3])
def test_greedy_step_after_a_scored_draft_reuses_its_agreed_prefix(tiny_dirs, max_tokens):
    """Scoring a draft leaves the model's greedy choices at each position; a greedy step
    from the same context then starts with the draft's agreed prefix instead of decoding
    it, and must be the very step (tokens, logprobs, entropies, stop, next step) it would
    have decoded from scratch."""
    backend = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    context = "b=1\n"
    own = step(backend, context, max_tokens=12, request_id="own")
    drafts = [own.text, own.text[:-1] + "x", own.text[:2] + "q9\n", "zz\n", own.text[:1], own.text + "c=2\n"]
    reused_any = False
    for k, draft in enumerate(drafts):
        reference = step(backend, context, max_tokens, request_id=f"ref{k}")
        step(backend, "", request_id=f"spec{k}")  # the session holds the prompt
        scored = backend.score_steps([ScoreRequest(f"spec{k}", PROBLEM, context, draft)])[0]
        out = step(backend, context, max_tokens, request_id=f"spec{k}")
        assert _same_step(out, reference), draft
        agreed = 0
        while agreed < min(len(scored.token_ids), len(own.token_ids)) and \
                scored.token_ids[agreed] == own.token_ids[agreed]:
            agreed += 1
        assert 0 <= out.reused_tokens <= min(agreed, out.generated_tokens)
        reused_any |= out.reused_tokens > 0
        assert out.prefill_tokens <= 1
        after = step(backend, context + out.text, request_id=f"spec{k}")
        assert _same_step(after, step(backend, context + reference.text, request_id=f"ref{k}"))
    assert reused_any
    # A draft that agrees with the whole step costs no decoding at all.
    step(backend, "", request_id="whole")
    backend.score_steps([ScoreRequest("whole", PROBLEM, context, own.text)])
    whole = step(backend, context, request_id="whole")
    if own.stop_reason == "delimiter":
        assert whole.reused_tokens == whole.generated_tokens == own.generated_tokens


def test_no_reuse_when_sampling_or_after_another_call(tiny_dirs):
    backend = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    own = step(backend, "", request_id="own")
    backend.score_steps([ScoreRequest("s", PROBLEM, "", own.text)])
    sampled = step(backend, "", request_id="s", temperature=0.8, seed=3)
    assert sampled.reused_tokens == 0
    backend.score_steps([ScoreRequest("t", PROBLEM, "", own.text)])
    step(backend, own.text, request_id="t")  # another call: the record no longer applies
    again = step(backend, "", request_id="t")
    assert again.reused_tokens == 0 and _same_step(again, own)


def test_greedy_prefix_is_what_the_model_would_write(tiny_dirs):
    """ScoreOutput.greedy_prefix: the draft's agreed part plus the model's own next token,
    so it is always a prefix of the model's greedy step (the whole step when the draft is it)."""
    backend = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    context = "b=1\n"
    own = step(backend, context, max_tokens=40, request_id="own")
    further = step(backend, context, max_tokens=60, request_id="further")  # past a draft's end
    for k, draft in enumerate([own.text, own.text[:-1] + "x", own.text[:2] + "q9\n", "zz\n", own.text[:1]]):
        scored = backend.score_steps([ScoreRequest(f"g{k}", PROBLEM, context, draft)])[0]
        prefix = scored.greedy_prefix
        assert prefix, draft
        assert further.text.startswith(prefix), (draft, prefix, further.text)
        assert scored.greedy_prefix_tokens == len(prefix)  # one character per token here
        if draft == own.text and own.stop_reason == "delimiter":
            assert prefix == own.text
        else:
            shared = 0
            while shared < min(len(draft), len(own.text)) and draft[shared] == own.text[shared]:
                shared += 1
            assert len(prefix) == shared + 1
