"""A small OpenAI-compatible `/v1/completions` server that fails on purpose, for tests.

It writes scripted steps one character per token (like the embedded tokenizer) and
answers echo=true with prompt logprobs like vLLM (the prompt's tokens, the first with a
null logprob, then the `max_tokens` generated ones). `FakeState.plan` is a queue
of what the next requests do instead of answering: "429", "500", "503", "400",
"sleep:<seconds>", "garbage" (a 200 whose body is not a completion), "noecho" (a
completion without prompt logprobs), "runon" (an echo that ignores max_tokens and goes on
for 28 generated tokens, as llama-cpp-python does with max_tokens=0), "shifted" (echoed
logprobs one position off, as llama-cpp-python's for a prompt without BOS). Run in a thread
(`running_fake`) or as a process:
`python tests/fake_openai.py --port P [--delay S]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse


@dataclass
class FakeState:
    plan: deque = field(default_factory=deque)
    bodies: list = field(default_factory=list)
    arrivals: list = field(default_factory=list)  # time.monotonic() of each request
    delay: float = 0.0
    step: str = "x=1"
    answer_after: int | None = None  # after this many delimiters in the prompt: "#### 7"
    api_key: str | None = None

    def __post_init__(self) -> None:
        self.plan = deque(self.plan)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):
        return "".join(chr(32 + (int(i) % 90)) for i in prompt)
    return str(prompt)


def make_app(state: FakeState):
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        state.arrivals.append(time.monotonic())
        body = await request.json()
        state.bodies.append(body)
        if state.api_key is not None and request.headers.get("authorization") != f"Bearer {state.api_key}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        action = state.plan.popleft() if state.plan else None
        if state.delay:
            await asyncio.sleep(state.delay)
        if action in ("429", "500", "503", "400"):
            headers = {"Retry-After": "0"} if action == "429" else {}
            return JSONResponse({"error": {"message": f"injected {action}"}}, status_code=int(action),
                                headers=headers)
        if action and action.startswith("sleep:"):
            await asyncio.sleep(float(action.split(":", 1)[1]))
        if action == "garbage":
            return PlainTextResponse("not json at all")
        prompt = body.get("prompt")
        if body.get("echo"):
            text = _prompt_text(prompt)
            n = len(text)
            generated = min(int(body.get("max_tokens") or 0), 1)  # the step's first character
            if action == "runon":
                generated = 28
            run = (state.step * generated)[:generated]
            tokens = list(text) + list(run)
            token_lps = [None] + [-0.5 - 0.01 * i for i in range(1, n)] + [-0.05] * generated
            if action == "shifted":
                token_lps = [None] + token_lps[2:] + [-9.0] * min(generated, 1)
            logprobs = {"tokens": tokens, "token_logprobs": token_lps,
                        "top_logprobs": None, "text_offset": list(range(n + generated))}
            if action == "noecho":
                logprobs = None
            return {"id": "cmpl-fake", "object": "text_completion", "model": body.get("model"),
                    "choices": [{"index": 0, "text": text + run, "logprobs": logprobs,
                                 "finish_reason": "length"}],
                    "usage": {"prompt_tokens": n, "completion_tokens": generated,
                              "total_tokens": n + generated}}
        text = _prompt_text(prompt)
        delimiter = (body.get("stop") or ["\n"])[0]
        step = state.step
        if state.answer_after is not None and text.count(delimiter) > state.answer_after:
            step = "#### 7"
        out = step + delimiter
        max_tokens = int(body.get("max_tokens") or 16)
        finish, stop_reason = "stop", delimiter
        if len(out) > max_tokens:
            out, finish, stop_reason = out[:max_tokens], "length", None
        tokens = list(out)
        token_logprobs = [-0.05] * len(tokens)
        top = [{t: -0.05, "?": -3.0} for t in tokens]
        shown = out[:-len(delimiter)] if finish == "stop" else out
        n_prompt = len(prompt) if isinstance(prompt, list) else len(text)
        return {"id": "cmpl-fake", "object": "text_completion", "model": body.get("model"),
                "choices": [{"index": 0, "text": shown, "finish_reason": finish, "stop_reason": stop_reason,
                             "logprobs": {"tokens": tokens, "token_logprobs": token_logprobs,
                                          "top_logprobs": top, "text_offset": list(range(len(tokens)))}}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
                          "total_tokens": n_prompt + len(tokens)}}

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_fake(state: FakeState | None = None):
    """Serve a fake on 127.0.0.1 in a thread; yields (base_url, state)."""
    import uvicorn

    state = state or FakeState()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(state), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # start-up guard; the loop leaves as soon as it is up
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("fake OpenAI server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)


if __name__ == "__main__":
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--answer-after", type=int, default=None)
    args = parser.parse_args()
    uvicorn.run(make_app(FakeState(delay=args.delay, answer_after=args.answer_after)), host="127.0.0.1",
                port=args.port, log_level="error")
