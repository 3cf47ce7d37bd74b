"""Answer extraction and grading: a table of tricky cases, with and without math-verify."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bench.grading import (
    Grader,
    _DelayedVerifier,
    extract_final_answer,
    grade,
    grade_many,
    math_verify_available,
    normalize_math_answer,
)

# (prediction text, reference, kind, expected): the same verdict with and without math-verify.
CASES = [
    # gsm8k: numbers, separators, units, percent, signs
    ("So she pays 18 dollars.\n#### 18", "18", "gsm8k", True),
    ("\\boxed{18 dollars}", "18", "gsm8k", True),
    ("#### $1,000", "1000", "gsm8k", True),
    ("The answer is 1,000.", "1000", "gsm8k", True),
    ("#### 1000.0", "1000", "gsm8k", True),
    ("#### 50%", "50", "gsm8k", True),
    ("#### x = 18", "18", "gsm8k", True),
    ("#### -3", "-3", "gsm8k", True),
    ("18", "18", "gsm8k", True),
    ("#### 3", "-3", "gsm8k", False),
    ("#### 17", "18", "gsm8k", False),
    ("#### 18.5", "18", "gsm8k", False),
    ("#### 1,0000", "10000", "gsm8k", False),
    ("She has 18 apples, I think", "18", "gsm8k", False),
    (None, "18", "gsm8k", False),
    # aime: integers, leading zeros
    ("\\boxed{025}", "25", "aime", True),
    ("\\boxed{25}", "025", "aime", True),
    ("The final answer is 025.", "025", "aime", True),
    ("\\boxed{26}", "025", "aime", False),
    ("\\boxed{25.5}", "25", "aime", False),
    # embedded: integers after ####
    ("b=42-17=25\nc=25+42=67\n#### 201", "201", "embedded", True),
    ("#### 200", "201", "embedded", False),
    ("#### -5", "-5", "embedded", True),
    ("d=67*3=201", "201", "embedded", False),
    # math: fractions vs decimals, \dfrac, nested braces
    ("Thus \\boxed{\\frac{1}{2}}.", "0.5", "math", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", "math", True),
    ("\\boxed{\\dfrac{17}{50}}", "\\frac{17}{50}", "math", True),
    ("\\boxed{\\frac32}", "\\tfrac{3}{2}", "math", True),
    ("so $\\boxed{\\frac{a}{b^{2}}}$", "\\frac{a}{b^{2}}", "math", True),
    ("\\boxed{1\\frac{4}{5}}", "\\frac{9}{5}", "math", True),
    ("\\boxed{\\frac{2}{6}}", "\\frac{1}{3}", "math", True),
    ("\\boxed{0.51}", "\\frac{1}{2}", "math", False),
    ("\\boxed{0.33}", "\\frac{1}{3}", "math", False),
    # units, degrees, percent, money, thousands separators
    ("\\boxed{5.4}", "5.4 \\text{ cents}", "math", True),
    ("\\boxed{15 \\text{ cm}^2}", "15\\mbox{ cm}^2", "math", True),
    ("\\boxed{90}", "90^\\circ", "math", True),
    ("\\boxed{50\\%}", "50", "math", True),
    ("\\boxed{\\$18.90}", "\\$18.90", "math", True),
    ("\\boxed{10080}", "10,\\!080", "math", True),
    ("\\boxed{1,000}", "1000", "math", True),
    ("\\boxed{91}", "90^\\circ", "math", False),
    # intervals and tuples
    ("\\boxed{(1, 2]}", "(1,2]", "math", True),
    ("\\boxed{(1,2)}", "(1,2]", "math", False),
    ("\\boxed{[1,2]}", "(1,2]", "math", False),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math", True),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math", False),
    # negative numbers
    ("\\boxed{-\\frac{35}{9}}", "-\\frac{35}{9}", "math", True),
    ("\\boxed{\\frac{35}{9}}", "-\\frac{35}{9}", "math", False),
    ("\\boxed{-3}", "3", "math", False),
    # several boxes: the last one counts; \fbox; "final answer is"
    ("First \\boxed{3}; no, correcting: \\boxed{4}", "4", "math", True),
    ("First \\boxed{4}; no, correcting: \\boxed{3}", "4", "math", False),
    ("\\fbox{7}", "7", "math", True),
    ("The final answer is $\\frac{3}{2}$.", "\\frac32", "math", True),
    ("\\boxed{}", "5", "math", False),
    # text answers, multiple choice, equations
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", "math", True),
    ("\\boxed{C}", "\\text{(C)}", "math", True),
    ("\\boxed{x=5}", "5", "math", True),
    ("\\boxed{\\text{(B)}}", "\\text{(C)}", "math", False),
    ("\\boxed{2}", "\\sqrt{2}", "math", False),
    # more: separators, money, signs, percent, units, intervals, nested radicals, last box
    ("#### 1,234,567", "1234567", "gsm8k", True),
    ("\\boxed{\\$1,200}", "1200", "gsm8k", True),
    ("#### 18.00", "18", "gsm8k", True),
    ("#### 12.5%", "12.5", "gsm8k", True),
    ("#### -18", "18", "gsm8k", False),
    ("\\boxed{1,234,567}", "1234567", "math", True),
    ("\\boxed{\\dfrac{-3}{4}}", "-\\frac{3}{4}", "math", True),
    ("\\boxed{-0.5}", "-\\frac{1}{2}", "math", True),
    ("\\boxed{- 5}", "-5", "math", True),
    ("\\boxed{12.5\\%}", "12.5", "math", True),
    ("\\boxed{12\\text{ inches}}", "12", "math", True),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", "math", True),
    ("\\boxed{[-2, 5)}", "[-2,5)", "math", True),
    ("\\boxed{(-\\infty,3)}", "(-\\infty,3]", "math", False),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt2}{2}", "math", True),
    ("So \\boxed{2}, then \\boxed{\\frac{1}{\\sqrt{3}}} is wrong; \\boxed{\\frac13}", "\\frac{1}{3}", "math",
     True),
    ("\\boxed{\\frac{1}{3}} and finally \\boxed{3}", "\\frac{1}{3}", "math", False),
    ("\\boxed{-\\frac{1}{2}}", "\\frac{1}{2}", "math", False),
    # user kind: generic math grading
    ("\\boxed{\\frac12}", "0.5", "user", True),
    ("\\boxed{\\frac13}", "0.5", "user", False),
]

# Right answers that only math-verify recognizes: the fallback grades them wrong.
MATH_VERIFY_ONLY = [
    ("\\boxed{\\sqrt{4}}", "2", "math"),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", "math"),
    ("\\boxed{-2, 1}", "1,-2", "math"),
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{1}{\\sqrt{3}}", "math"),
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{1}{\\sqrt{3}}", "user"),
]

needs_math_verify = pytest.mark.skipif(not math_verify_available(), reason="math-verify not installed")


@pytest.fixture(scope="module")
def verifying_grader() -> Iterator[Grader]:
    with Grader(timeout=10.0) as grader:  # generous: the machine may be busy
        yield grader


@pytest.fixture(scope="module")
def fallback_grader() -> Iterator[Grader]:
    with Grader(use_math_verify=False) as grader:
        yield grader


@pytest.mark.parametrize(("prediction", "reference", "kind", "expected"), CASES)
def test_fallback_table(fallback_grader: Grader, prediction: str | None, reference: str,
                        kind: str, expected: bool) -> None:
    assert fallback_grader.grade(prediction, reference, kind) is expected


@needs_math_verify
def test_math_verify_table(verifying_grader: Grader) -> None:
    items = [(p, r, k) for p, r, k, _ in CASES] + MATH_VERIFY_ONLY
    expected = [e for *_, e in CASES] + [True] * len(MATH_VERIFY_ONLY)
    got = verifying_grader.grade_many(items)
    wrong = [(item, want) for item, want, have in zip(items, expected, got, strict=False) if want != have]
    assert not wrong


def test_fallback_rejects_math_verify_only_cases(fallback_grader: Grader) -> None:
    assert fallback_grader.grade_many(MATH_VERIFY_ONLY) == [False] * len(MATH_VERIFY_ONLY)
    assert fallback_grader._pool is None


def test_no_pool_for_pure_python_kinds() -> None:
    with Grader() as grader:
        items = [(p, r, k) for p, r, k, _ in CASES if k in ("gsm8k", "aime", "embedded")]
        assert grader.grade_many(items + [("\\boxed{0.5}", "\\frac12", "math")])
        assert grader._pool is None  # the math item passed the fallback: no worker needed


@needs_math_verify
def test_timeout_falls_back_without_hanging() -> None:
    items = [("\\boxed{\\sqrt{4}}", "2", "math"),    # needs math-verify: times out -> fallback False
             ("\\boxed{0.5}", "\\frac12", "math"),    # fallback True: never sent to the worker
             ("\\boxed{\\sqrt{9}}", "3", "math")]     # a fresh pool, times out again
    delay = 300.0
    start = time.monotonic()
    with Grader(timeout=0.5, verifier=_DelayedVerifier(delay)) as grader:
        assert grader.grade_many(items) == [False, True, False]
    # A grader that waited on the verifier takes >= delay; starting worker processes on a busy
    # machine takes seconds, so the bound is the delay itself rather than a tight figure.
    assert time.monotonic() - start < delay


@needs_math_verify
def test_module_functions() -> None:
    assert grade("#### 18", "18", "gsm8k") is True
    assert grade("\\boxed{\\sqrt{4}}", "2", "math", use_math_verify=False) is False
    items = [("\\boxed{\\sqrt{4}}", "2", "math"), ("\\boxed{3}", "2", "math"), ("#### 025", "25", "aime")]
    assert grade_many(items, workers=2) == [True, False, True]


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        grade("1", "1", "physics")


@pytest.mark.parametrize(("text", "expected"), [
    ("a \\boxed{1} b \\boxed{\\frac{a}{b^{2}}} c", "\\frac{a}{b^{2}}"),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
    ("\\fbox{x}", "x"),
    ("broken \\boxed{2} then \\boxed{3", "2"),
    ("steps\n#### 1,234\n", "1,234"),
    ("The answer is 42.", "42"),
    ("so the FINAL ANSWER IS: **7**", "7"),
    ("The answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("no marker 42", None),
    ("", None),
])
def test_extract_final_answer(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


def test_normalize_math_answer() -> None:
    assert normalize_math_answer("$\\left( \\dfrac43, 2 \\right)$") == "(\\frac{4}{3},2)"
    assert normalize_math_answer("\\$32,\\!348") == "32,348"
    assert normalize_math_answer("\\frac{270}7\\text{ degrees}") == "\\frac{270}{7}"
    assert normalize_math_answer("11\\sqrt2") == "11\\sqrt{2}"


# Natural-language answers as instruction-tuned models write them (issue 18): each row
# was misread (or refused) by at least one grader before they shared one extractor and
# one numeric reading.
NL_CASES = [
    # the MATH "Final Answer" convention: both graders took the whole sentence
    ("Final Answer: The final answer is 18. I hope it is correct.", "18", "gsm8k", True),
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}", "math", True),
    ("**Final Answer:** 12", "12", "gsm8k", True),
    ("Final Answer:\n$42$", "42", "gsm8k", True),
    ("The answer is 3.5. That is all.", "3.5", "gsm8k", True),
    # numbers the MATH side wrote and the GSM8K grader refused
    ("The answer is \\dfrac{1}{2}.", "0.5", "gsm8k", True),
    ("\\boxed{\\frac12}", "0.5", "gsm8k", True),
    ("\\boxed{1{,}000}", "1000", "gsm8k", True),
    ("\\boxed{1{,}000}", "1000", "math", True),
    ("#### 1{,}234", "1234", "gsm8k", True),
    ("\\boxed{1\\,000}", "1000", "aime", True),
    ("The answer is 18. I hope it is correct.", "17", "gsm8k", False),
]


@pytest.mark.parametrize(("prediction", "reference", "kind", "expected"), NL_CASES)
def test_natural_language_answers(fallback_grader: Grader, prediction: str, reference: str, kind: str,
                                  expected: bool) -> None:
    assert fallback_grader.grade(prediction, reference, kind) is expected


def test_one_numeric_reading_for_every_kind() -> None:
    from fractions import Fraction

    from bench.grading import answer_number

    for text in ("\\frac{1}{2}", "\\dfrac{1}{2}", "\\tfrac12", "0.5", "$0.50", "50\\%", "x = 0.5"):
        assert answer_number(text) in (Fraction(1, 2), Fraction(50)), text
    assert answer_number("1{,}000") == answer_number("1,000") == answer_number("1\\,000") == 1000
    assert answer_number("18 dollars") == 18 and answer_number("=") is None
