"""VLLMBackend's engine options and lifetime, without vllm: `from_pretrained` is checked
against stand-ins for the two vllm classes it builds the engine with. (The real engine
runs in test_vllm.py where vllm imports.)"""

from __future__ import annotations

import sys
import types

import pytest

from cascade.embedded import EMBEDDED_DELIMITER, embedded_path
from decoding import BackendError, StepRequest


class _Args:
    def __init__(self, **kwargs) -> None:
        self.__dict__.update(kwargs)


class _Engine:
    built: list = []

    def __init__(self, args) -> None:
        self.args, self.shut = args, 0

    @classmethod
    def from_engine_args(cls, args):
        engine = cls(args)
        cls.built.append(engine)
        return engine

    def shutdown(self) -> None:
        self.shut += 1


@pytest.fixture
def stand_ins(monkeypatch):
    arg_utils = types.ModuleType("vllm.engine.arg_utils")
    arg_utils.AsyncEngineArgs = _Args
    async_llm = types.ModuleType("vllm.v1.engine.async_llm")
    async_llm.AsyncLLM = _Engine
    for name in ("vllm", "vllm.engine", "vllm.v1", "vllm.v1.engine"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.engine.arg_utils", arg_utils)
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.async_llm", async_llm)
    _Engine.built.clear()
    return _Engine.built


def _start(**kwargs):
    from decoding.vllm_backend import VLLMBackend

    return VLLMBackend.from_pretrained(embedded_path("small"), step_delimiter=EMBEDDED_DELIMITER, **kwargs)


def test_enforce_eager_reaches_the_engine(stand_ins):
    with _start(enforce_eager=True) as eager:
        assert stand_ins[-1].args.enforce_eager is True
    with _start() as default:
        assert stand_ins[-1].args.enforce_eager is False  # compiled, vLLM's own default
    assert eager.engine is None and default.engine is None
    with pytest.raises(ValueError, match="enforce_eager must be True or False"):
        _start(enforce_eager="yes")


def test_close_shuts_the_engine_down_once_and_refuses_later_calls(stand_ins):
    backend = _start()
    engine = stand_ins[-1]
    backend.close()
    backend.close()
    assert engine.shut == 1
    with pytest.raises(BackendError, match="closed"):
        backend.next_steps([StepRequest("r", "a=1;?a", "", 4)])
