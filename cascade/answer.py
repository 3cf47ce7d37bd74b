"""Final-answer extraction from a reasoning trace (runtime side: when to stop)."""

from __future__ import annotations

import re

__all__ = ["extract_answer"]

_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"(?:final answer|the answer) is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.\s*)?$",
                        re.IGNORECASE | re.MULTILINE)


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces respected."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    index = text.index("{", start) + 1
    depth = 1
    for position in range(index, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[index:position].strip()
    return None  # unclosed: the answer is not written yet


def extract_answer(text: str) -> str | None:
    """The final answer stated in `text`: last \\boxed{}, else `#### x`, else
    "The answer is x"; None when the text states none (yet)."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    answer_is = _ANSWER_IS.findall(text)
    if answer_is:
        return answer_is[-1].strip().rstrip(".")
    return None
