"""The one final-answer extractor (cascade.answer): what `Result.answer` reads and what the
graders grade."""

from __future__ import annotations

import pytest

from bench.grading import extract_final_answer
from cascade.answer import extract_answer


@pytest.mark.parametrize(("text", "expected"), [
    ("#### =", None),  # no answer in it: the runtime must not stop on it
    ("#### 09", "9"),
    ("#### -007", "-7"),
    ("#### 0", "0"),
    ("#### 0.50", "0.50"),
    ("\\boxed{=}", None),
    ("Final Answer: The final answer is 18. I hope it is correct.", "18"),
    ("so the FINAL ANSWER IS: **7**", "7"),
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("The answer is 42\nand then more", "42"),
    ("First the answer is 3. Then the answer is 5.", "5"),
    ("Step 1: 3 + 5 = 8.\n\n", None),
])
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected
    assert extract_final_answer(text) == expected  # the graders read the same answer
