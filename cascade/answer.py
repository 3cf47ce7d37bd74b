"""Final-answer extraction from a reasoning trace: the one extractor the runtime (when to
stop, `Result.answer`) and the graders (`bench.grading`) share."""

from __future__ import annotations

import re

__all__ = ["extract_answer", "strip_wrappers"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "the answer is", "final answer is", "Final Answer:", "**Final Answer:**", "answer is: ..."
_ANSWER_IS_RE = re.compile(r"(?:final answer|the answer)(?:\s*\*\*)?\s*(?:is\b|:)"
                           r"(?:\s*\*\*)?\s*:?(?:\s*\*\*)?",
                           re.IGNORECASE)
# Where a stated answer ends on its line: a period (not a decimal point) followed by more
# text, as in "The final answer is 18. I hope it is correct."
_SENTENCE_END_RE = re.compile(r"\.\s+(?=\S)")
_LEADING_ZEROS_RE = re.compile(r"([-+]?)0+(\d+)")


def _braced(text: str, start: int) -> str | None:
    """The content of the brace group whose '{' is at text[start - 1]; None if unbalanced."""
    depth = 1
    for index in range(start, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:index]
    return None


def strip_wrappers(answer: str) -> str:
    """An answer without what surrounds it: whitespace, a final period, markdown bold
    (`**...**`, or a stray `**` left by the phrase before it), and `$...$`, `\\(...\\)`,
    `\\[...\\]` around it (repeatedly)."""
    answer = answer.strip()
    for _ in range(3):
        before = answer
        answer = answer.strip().rstrip(".").strip()
        if answer.count("**") == 1:
            answer = answer.replace("**", "").strip()
        for left, right in (("$", "$"), ("**", "**"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(answer) > len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
                answer = answer[len(left):-len(right)].strip()
        if answer == before:
            break
    return answer


def _canonical(answer: str) -> str | None:
    """None unless the answer has something an answer is made of (a letter, digit or
    symbol such as pi: "=" alone is not one); an integer loses its leading zeros."""
    answer = strip_wrappers(answer)
    if not any(char.isalnum() for char in answer):
        return None
    if match := _LEADING_ZEROS_RE.fullmatch(answer):
        return match[1] + str(int(match[2]))
    return answer


def extract_answer(text: str) -> str | None:
    """The final answer stated in `text`, or None when it states none (yet).

    Order: the last balanced ``\\boxed{...}``/``\\fbox{...}`` (nested braces kept), else
    the text after the last ``####`` on its line, else what follows the last "the answer
    is" / "final answer is" / "Final Answer:" on its line, up to the end of that sentence
    ("The final answer is 18. I hope it is correct." states 18). Surrounding ``$``,
    ``**`` and a final period are dropped; an answer with no letter or digit ("#### =")
    is none; an integer is written without leading zeros ("#### 09" states 9).
    """
    boxed: str | None = None
    for match in _BOX_RE.finditer(text):
        content = _braced(text, match.end())
        if content is not None:
            boxed = content
    if boxed is not None:
        return _canonical(boxed)
    if "####" in text:
        return _canonical(text.rsplit("####", 1)[1].strip().split("\n", 1)[0])
    matches = list(_ANSWER_IS_RE.finditer(text))
    if matches:
        rest = text[matches[-1].end():]
        line = rest.split("\n", 1)[0]
        if not line.strip():  # "Final Answer:" on a line of its own, the answer below it
            line = rest.strip().split("\n", 1)[0]
        end = _SENTENCE_END_RE.search(line)
        return _canonical(line[: end.start()] if end else line)
    return None
