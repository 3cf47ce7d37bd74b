"""Step scorers: the embedded task's exact checker, a model's likelihood, PRMs in both formats;
and VerifyGate's decisions against log-probabilities computed by hand with the raw model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
)

from bench.router_data import ExactStepScorer
from cascade import Cascade, ConfigError, LikelihoodScorer, PRMScorer, SolveOptions, StepScorer, VerifyGate
from decoding import HFBackend, ModelLoadError

TAG = "<tag>"


def _raw_logprobs(backend: HFBackend, problem: str, context: str, text: str) -> list[float]:
    """Log-probabilities of `text` after prompt + context by one plain forward pass (no cache)."""
    prompt, add_special = backend.render_prompt(problem)
    prefix = backend.tokenizer.encode(prompt, add_special_tokens=add_special) + \
        backend.tokenizer.encode(context, add_special_tokens=False)
    ids = backend.tokenizer.encode(text, add_special_tokens=False)
    with torch.no_grad():
        logits = backend.model(input_ids=torch.tensor([prefix + ids])).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return [float(log_probs[len(prefix) - 1 + i, token]) for i, token in enumerate(ids)]


def test_exact_scorer_follows_the_checker():
    scorer = ExactStepScorer()
    assert isinstance(scorer, StepScorer)
    problem = "a=5;b=a+7;c=b-2;?c"
    assert scorer.score(problem, "", ["b=5+7=12", "b=5+7=13", "c=5+7=12"]) == [1.0, 0.0, 0.0]
    # Earlier mistakes are not held against a step: it copies the stated (wrong) value.
    assert scorer.score(problem, "b=5+7=13\n", ["c=13-2=11", "c=12-2=10"]) == [1.0, 0.0]
    assert scorer.score(problem, "b=5+7=12\nc=12-2=10\n", ["#### 10", "#### 12"]) == [1.0, 0.0]


def test_likelihood_scorer_is_exp_mean_logprob_by_hand(tiny_dirs):
    large = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    scorer = LikelihoodScorer(large)
    problem, context = "a=3;b=a+1;?b", "b=3+1=4\n"
    candidates = ["#### 4", "#### 5", "b=9"]
    scores = scorer.score(problem, context, candidates)
    for candidate, score in zip(candidates, scores, strict=False):
        by_hand = _raw_logprobs(large, problem, context, candidate)
        assert score == pytest.approx(math.exp(sum(by_hand) / len(by_hand)), rel=1e-4)
        assert 0.0 < score <= 1.0
    assert len(set(scores)) == 3
    assert scorer.score(problem, context, [""]) == [0.0]
    assert large._sessions == {}  # the scorer releases what it cached
    with pytest.raises(ConfigError, match="Backend"):
        LikelihoodScorer("not a backend")


def _prm_dir(tmp_path, kind: str, num_labels: int, tokenizer_dir: str) -> str:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)  # the tiny models' character tokenizer
    tok.add_special_tokens({"additional_special_tokens": [TAG]})
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, num_labels=num_labels)
    cls = LlamaForTokenClassification if kind == "token" else LlamaForSequenceClassification
    model = cls(config)
    path = tmp_path / f"prm_{kind}_{num_labels}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_step_tag_prm_reads_the_last_tag_position(tmp_path, tiny_dirs):
    path = _prm_dir(tmp_path, "token", 2, tiny_dirs[0])
    scorer = PRMScorer.from_pretrained(path, step_tag=TAG)
    assert scorer.layout.format == "step-tag"
    problem, context = "a=3;b=a+1;?b", "b=3+1=4\n"
    text = scorer.render(problem, context, "#### 4")
    assert text == f"a=3;b=a+1;?b\nb=3+1=4{TAG}\n#### 4{TAG}"  # a tag after every step
    scores = scorer.score(problem, context, ["#### 4", "#### 5"])
    for candidate, score in zip(["#### 4", "#### 5"], scores, strict=False):
        ids = scorer.tokenizer.encode(scorer.render(problem, context, candidate), add_special_tokens=True)
        with torch.no_grad():
            logits = scorer.model(input_ids=torch.tensor([ids])).logits[0]
        tag_id = scorer.tokenizer.convert_tokens_to_ids(TAG)
        last_tag = max(i for i, t in enumerate(ids) if t == tag_id)
        assert score == pytest.approx(float(torch.softmax(logits[last_tag], -1)[1]), rel=1e-5)
        assert 0.0 <= score <= 1.0
    assert scores[0] != scores[1]
    assert scorer.score(problem, context, ["#### 4"]) == [scores[0]]  # deterministic


def test_reward_head_prm_is_sigmoid_of_the_pooled_logit(tmp_path, tiny_dirs):
    path = _prm_dir(tmp_path, "sequence", 1, tiny_dirs[0])
    scorer = PRMScorer.from_pretrained(path)
    assert scorer.layout.format == "reward-head"
    problem, context = "a=3;b=a+1;?b", "b=3+1=4\n"
    scores = scorer.score(problem, context, ["#### 4", "#### 5"])
    for candidate, score in zip(["#### 4", "#### 5"], scores, strict=False):
        text = f"{problem}\n{context}{candidate}"
        assert scorer.render(problem, context, candidate) == text
        ids = scorer.tokenizer.encode(text, add_special_tokens=True)
        with torch.no_grad():
            logit = scorer.model(input_ids=torch.tensor([ids])).logits[0, 0]
        assert score == pytest.approx(float(torch.sigmoid(logit)), rel=1e-5)
    assert scores[0] != scores[1]


def test_prm_errors_name_the_problem(tmp_path, tiny_dirs):
    with pytest.raises(ModelLoadError, match="no PRM"):
        PRMScorer.from_pretrained(tmp_path / "missing")
    with pytest.raises(ConfigError, match="classification head"):
        PRMScorer.from_pretrained(tiny_dirs[0])  # a causal LM
    token_dir = _prm_dir(tmp_path, "token", 2, tiny_dirs[0])
    with pytest.raises(ConfigError, match="step_tag"):
        PRMScorer.from_pretrained(token_dir)
    with pytest.raises(ConfigError, match="one token"):
        PRMScorer.from_pretrained(token_dir, step_tag="ab")
    with pytest.raises(ConfigError, match="positive_label"):
        PRMScorer.from_pretrained(token_dir, step_tag=TAG, positive_label=2)


def test_verify_gate_decisions_match_raw_forward_pass(tiny_dirs):
    """Independent of the backend's cache: log-probabilities from one plain forward pass."""
    small = HFBackend.from_pretrained(tiny_dirs[0], step_delimiter="\n")
    large = HFBackend.from_pretrained(tiny_dirs[2], step_delimiter="\n")
    problem, threshold = "a=4;b=a+2;?b", 0.5
    for reduce in ("mean", "min"):
        gate = VerifyGate(threshold=threshold, reduce=reduce)
        result = Cascade(small, large, gate,
                         options=SolveOptions(max_steps=4, max_step_tokens=6)).solve(problem)
        context = ""
        for step in result.steps:
            decision = step.decisions[0]
            draft = step.drafts[0] if step.drafts else (step.text + "\n" if len(step.text) < 6 else step.text)
            logprobs = _raw_logprobs(large, problem, context, draft)
            value = sum(logprobs) / len(logprobs) if reduce == "mean" else min(logprobs)
            expected = 1 - math.exp(value)
            assert decision.score == pytest.approx(expected, abs=1e-4)
            assert decision.escalated == (expected >= threshold)
            assert (step.tier == 1) == decision.escalated
            context += step.text + "\n"
        assert result.steps
