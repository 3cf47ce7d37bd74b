"""An OpenAI-compatible `/v1/completions` server that answers with a real transformers
model, greedy, for tests: OpenAIBackend against real tokens without vLLM or llama.cpp.

Two flavours, each mimicking what the real server does (checked against their code and
against the real servers where they ran here):
- "vllm": token-id or text prompts; `return_tokens_as_token_ids` honoured; `stop_reason`
  says which stop string matched (None for EOS); echo returns every prompt token (the
  first with a null logprob) and the generated ones, correctly aligned.
- "llamacpp" (llama-cpp-python 0.3's server): an echo request with a token-id prompt
  fails with HTTP 500 (it concatenates the prompt list with text); `max_tokens` <= 0
  means "until the context is full" (`n_ctx`); no `stop_reason`; tokens come back as
  text; echoed entries skip a leading BOS and pair each token with the distribution
  *after* it, which is right only when the prompt starts with BOS (without it every
  echoed logprob is off by one position and the last entry is missing).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.fake_openai import free_port


@dataclass
class ModelServer:
    model: object
    tokenizer: object
    flavour: str = "vllm"
    n_ctx: int = 2048
    bodies: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- the model -------------------------------------------------------------------

    def _encode_text(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        bos = self.tokenizer.bos_token_id
        if getattr(self.tokenizer, "add_bos_token", False) and bos is not None:
            ids = [bos] + ids
        return ids

    @torch.no_grad()
    def _run(self, ids: list[int], max_tokens: int, stops: list[str]):
        """Greedy completion: (prompt rows (len(ids), vocab) log-probs, generated ids, their
        rows, finish_reason, matched stop or None, text)."""
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
        rows = torch.log_softmax(out.logits[0].float(), dim=-1)
        cache, last = out.past_key_values, rows[-1]
        generated, gen_rows = [], []
        eos = {self.tokenizer.eos_token_id}
        finish, matched = "length", None
        while len(generated) < max_tokens:
            token = int(torch.argmax(last))
            if token in eos:
                finish = "stop"
                break
            generated.append(token)
            gen_rows.append(last)
            text = self.tokenizer.decode(generated, skip_special_tokens=False)
            hit = [s for s in stops if s in text]
            if hit:
                finish, matched = "stop", hit[0]
                break
            if len(generated) >= max_tokens:
                break
            step = self.model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache, last = step.past_key_values, torch.log_softmax(step.logits[0, -1].float(), dim=-1)
        text = self.tokenizer.decode(generated, skip_special_tokens=False)
        if matched is not None:
            text = text[: text.index(matched)]
        return rows, generated, gen_rows, finish, matched, text

    def _key(self, token: int, as_ids: bool) -> str:
        return f"token_id:{token}" if as_ids else self.tokenizer.decode([token], skip_special_tokens=False)

    def _top(self, row: torch.Tensor, token: int, k: int, as_ids: bool) -> dict:
        values, indices = torch.topk(row, k)
        top = {self._key(int(i), as_ids): float(v) for v, i in zip(values, indices, strict=False)}
        top[self._key(token, as_ids)] = float(row[token])
        return top

    # ---- the endpoint ----------------------------------------------------------------

    def complete(self, body: dict) -> tuple[int, dict]:
        self.bodies.append(body)
        prompt, echo = body.get("prompt"), bool(body.get("echo"))
        llamacpp = self.flavour == "llamacpp"
        if isinstance(prompt, list):
            if llamacpp and echo:
                return 500, {"error": {"message": 'can only concatenate list (not "str") to list'}}
            ids = [int(i) for i in prompt]
        else:
            ids = self._encode_text(str(prompt)) if llamacpp else list(self.tokenizer.encode(str(prompt)))
        max_tokens = body.get("max_tokens")
        if llamacpp and (max_tokens is None or max_tokens <= 0):
            max_tokens = self.n_ctx - len(ids)
        max_tokens = int(max_tokens if max_tokens is not None else 16)
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        k = int(body.get("logprobs") or 0)
        as_ids = bool(body.get("return_tokens_as_token_ids")) and not llamacpp
        with self.lock:
            rows, generated, gen_rows, finish, matched, text = self._run(ids, max_tokens, stops)
        tokens, token_lps, tops = [], [], []
        if echo:
            if llamacpp:
                # Row i of its score table is the distribution after token i of the evaluated
                # sequence (the last generated token is never evaluated); entry idx pairs
                # all_tokens[idx] with row idx, and the pairing stops with the rows (zip).
                bos = self.tokenizer.bos_token_id
                has_bos = bool(ids) and ids[0] == bos
                all_tokens = (ids[1:] if has_bos else ids) + generated
                table = list(rows) + list(gen_rows[1:])
                for token, row in zip(all_tokens, table, strict=False):
                    tokens.append(self._key(token, False))
                    token_lps.append(float(row[token]))
                    tops.append(self._top(row, token, max(k, 1), False))
                token_lps[0], tops[0] = None, None
            else:
                for index, token in enumerate(ids):
                    tokens.append(self._key(token, as_ids))
                    if index == 0:
                        token_lps.append(None)
                        tops.append(None)
                    else:
                        token_lps.append(float(rows[index - 1, token]))
                        tops.append(self._top(rows[index - 1], token, max(k, 1), as_ids))
        if not (echo and llamacpp):
            for token, row in zip(generated, gen_rows, strict=False):
                tokens.append(self._key(token, as_ids))
                token_lps.append(float(row[token]))
                tops.append(self._top(row, token, max(k, 1), as_ids))
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        choice = {"index": 0, "text": text, "finish_reason": finish,
                  "logprobs": {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
                               "text_offset": offsets} if k else None}
        if not llamacpp:
            choice["stop_reason"] = matched
        if echo and isinstance(prompt, str):
            choice["text"] = prompt + text
        return 200, {"id": "cmpl-model", "object": "text_completion", "model": body.get("model"),
                     "choices": [choice],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": len(generated),
                               "total_tokens": len(ids) + len(generated)}}


def _app(server: ModelServer) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        status, data = server.complete(await request.json())
        return JSONResponse(data, status_code=status)

    return app


@contextlib.contextmanager
def serving(server: ModelServer):
    """Serve on 127.0.0.1 in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(_app(server), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        if time.monotonic() > deadline:
            raise RuntimeError("model server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


__all__ = ["ModelServer", "serving"]
