"""Model backends behind one small protocol: generate the next step, score a given step.

`decoding` is a leaf: it imports none of the project's other packages. `VLLMBackend` is
loaded on first use, so importing `decoding` never needs vllm (an optional extra);
`LlamaCppBackend` imports llama-cpp-python (the `llamacpp` extra) only when constructed.
"""

from decoding.faults import FaultKind, FaultSchedule, FaultyBackend, at_calls
from decoding.hf import HFBackend, weights_fingerprint
from decoding.llamacpp import GGUFTokenizer, LlamaCppBackend
from decoding.openai_backend import OpenAIBackend
from decoding.process import ProcessBackend
from decoding.types import (
    Backend,
    BackendError,
    ModelInfo,
    ModelLoadError,
    ScoreOutput,
    ScoreRequest,
    StepOutput,
    StepRequest,
    StopReason,
)

__all__ = [
    "Backend",
    "BackendError",
    "FaultKind",
    "FaultSchedule",
    "FaultyBackend",
    "GGUFTokenizer",
    "HFBackend",
    "LlamaCppBackend",
    "ModelInfo",
    "ModelLoadError",
    "OpenAIBackend",
    "ProcessBackend",
    "ScoreOutput",
    "ScoreRequest",
    "StepOutput",
    "StepRequest",
    "StopReason",
    "at_calls",
    "weights_fingerprint",
]


def __getattr__(name: str):
    # `decoding.VLLMBackend` loads on first use; it stays out of __all__ so that
    # `from decoding import *` works without the optional vllm extra.
    if name == "VLLMBackend":
        from decoding.vllm_backend import VLLMBackend

        return VLLMBackend
    raise AttributeError(f"module 'decoding' has no attribute {name!r}")
