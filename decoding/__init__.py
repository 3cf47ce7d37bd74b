"""Model backends behind one small protocol: generate the next step, score a given step.

`decoding` is a leaf: it imports none of the project's other packages.
"""

from decoding.hf import HFBackend, weights_fingerprint
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
    "HFBackend",
    "ModelInfo",
    "ModelLoadError",
    "ScoreOutput",
    "ScoreRequest",
    "StepOutput",
    "StepRequest",
    "StopReason",
    "weights_fingerprint",
]
