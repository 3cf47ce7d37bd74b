"""The embedded model pair that ships with the package (see README, "Model card").

Loaded through the same `HFBackend.from_pretrained` path as any hub model; this module
only knows where the files are and which settings the pair was trained with.
"""

from __future__ import annotations

from pathlib import Path

from cascade.errors import ConfigError

__all__ = ["EMBEDDED_DIR", "EMBEDDED_DELIMITER", "EMBEDDED_MAX_STEP_TOKENS", "embedded_path"]

EMBEDDED_DIR = Path(__file__).parent / "embedded"
# One step per line; a step is at most ~12 characters, and each character is one token.
EMBEDDED_DELIMITER = "\n"
EMBEDDED_MAX_STEP_TOKENS = 24
EMBEDDED_MAX_STEPS = 16


def embedded_path(tier: str) -> Path:
    """Directory of an embedded model: "small", "large" (or "medium" when shipped)."""
    path = EMBEDDED_DIR / tier
    if not (path / "config.json").exists():
        available = sorted(p.name for p in EMBEDDED_DIR.iterdir() if (p / "config.json").exists()) \
            if EMBEDDED_DIR.exists() else []
        raise ConfigError(f"no embedded model {tier!r}; shipped: {available}")
    return path
