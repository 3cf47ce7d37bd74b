"""Answer grading: extract a model's final answer and compare it with the reference.

Kinds (an `Example.kind` from `bench.datasets`):

- ``gsm8k``: numbers, read by `answer_number` (the one numeric reading every kind uses:
  ``$``, thousands separators including ``{,}``, ``%``, trailing unit words and LaTeX
  fractions); integers compare exactly, other values to 1e-6 relative.
- ``aime``, ``embedded``: integers (``025`` equals ``25``).
- ``math``, ``user``: a normalized string / numeric comparison first (cheap and strict);
  if that says no and the optional ``math-verify`` package is installed, math-verify
  decides (symbolic equality, sets, intervals, ...). math-verify's own timeouts rely on
  signals, so it runs in a worker process with a per-item timeout; on timeout or error
  the fallback's answer stands.

A prediction is the model's text: its final answer is what the runtime's extractor
(`cascade.answer.extract_answer`) reads: the last ``\\boxed{}``/``\\fbox{}``, else the text
after the last ``####``, else the sentence after the last "the answer is" / "Final
Answer:"; a text with none of these is taken as a bare answer. To grade many items, use
`grade_many` or one `Grader` (it starts its worker process once, and only when some item
needs math-verify).

The worker process is started with the "spawn" method (safe in a process that uses CUDA or
threads); a script that grades must therefore guard its entry point with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import math
import multiprocessing
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import TracebackType

from cascade.answer import extract_answer, strip_wrappers

__all__ = [
    "KINDS",
    "Grader",
    "answer_number",
    "extract_final_answer",
    "grade",
    "grade_many",
    "math_verify_available",
    "normalize_math_answer",
    "numbers_equal",
    "parse_number",
]

KINDS = ("gsm8k", "math", "aime", "embedded", "user")
_MATH_KINDS = ("math", "user")

Verifier = Callable[[str, str], "bool | None"]

# --------------------------------------------------------------------------- extraction

def extract_final_answer(text: str) -> str | None:
    """The final answer in a model's text, or None when it states none: the runtime's own
    extractor (`cascade.answer.extract_answer`), so a trace's `Result.answer` and its
    grade read the same answer."""
    return extract_answer(text)


def _answer_text(prediction: str | None) -> str | None:
    if prediction is None:
        return None
    answer = extract_answer(prediction)
    if answer is None:
        answer = strip_wrappers(prediction)  # a bare answer such as "42" or "\frac{1}{2}"
    return answer or None


# --------------------------------------------------------------------------- numbers

_NUMBER_RE = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?"
_PLAIN_NUMBER_RE = re.compile(rf"(?:{_NUMBER_RE})")
_SLASH_FRACTION_RE = re.compile(r"([-+]?)(\d+)/(\d+)")
_LATEX_FRACTION_RE = re.compile(r"([-+]?)(?:(\d+))?\\frac\{([-+]?\d+(?:\.\d+)?)\}\{([-+]?\d+(?:\.\d+)?)\}")


def parse_number(text: str) -> Fraction | None:
    """`text` as an exact number: ``1,000``, ``-2.50``, ``.5``, ``1e3``, ``3/4``,
    ``\\frac{3}{4}``, ``-\\frac{3}{4}`` or a mixed number ``1\\frac{4}{5}``; else None."""
    text = text.strip()
    try:
        if _PLAIN_NUMBER_RE.fullmatch(text):
            return Fraction(text.replace(",", ""))
        if match := _SLASH_FRACTION_RE.fullmatch(text):
            sign, numerator, denominator = match.groups()
            value = Fraction(int(numerator), int(denominator))
            return -value if sign == "-" else value
        if match := _LATEX_FRACTION_RE.fullmatch(text):
            sign, whole, numerator, denominator = match.groups()
            value = Fraction(numerator) / Fraction(denominator) + int(whole or 0)
            return -value if sign == "-" else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def numbers_equal(a: Fraction, b: Fraction, rel_tol: float = 1e-6) -> bool:
    """Exact for integers; otherwise equal to `rel_tol` relative."""
    if a == b:
        return True
    if a.denominator == 1 and b.denominator == 1:
        return False
    return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=0.0)


_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm)\s*\{([^{}]*)\}")
_UNIT_WORDS_RE = re.compile(r"\s+[A-Za-z][A-Za-z.\s/]*$")
_SHORT_FRAC_RE = re.compile(r"\\frac\s*(\d|\{[^{}]*\})\s*(\d|\{[^{}]*\})")


def answer_number(answer: str) -> Fraction | None:
    """An answer as an exact number, for every kind of task (the one numeric reading):
    ``$``/``\\$``, ``%``/``\\%``, ``\\text{...}``, trailing unit words ("18 dollars"), a
    leading ``x =``, thousands separators (``1,000``, ``1{,}000``, ``1\\,000``), and LaTeX
    fractions (``\\frac{1}{2}``, ``\\dfrac{1}{2}``, ``\\tfrac12``, ``1\\frac{4}{5}``) are read;
    else None."""
    text = _TEXT_RE.sub(r" \1", strip_wrappers(answer))
    text = text.replace("{,}", ",")
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = _SHORT_FRAC_RE.sub(lambda m: rf"\frac{{{m[1].strip('{}')}}}{{{m[2].strip('{}')}}}", text)
    text = re.sub(r"\\[!,;:]|\\\$|\\%|[$%]", "", text).strip().rstrip(".").strip()
    text = re.sub(r"^[A-Za-z]\w*\s*=\s*", "", text)  # "x = 18"
    text = _UNIT_WORDS_RE.sub("", text)  # "18 dollars", "5 hours"
    return parse_number(text)


def _integer(answer: str) -> int | None:
    value = answer_number(answer)
    if value is None or value.denominator != 1:
        return None
    return int(value)


# --------------------------------------------------------------------------- MATH fallback

_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_SHORT_SQRT_RE = re.compile(r"\\sqrt\s*(\d+|[A-Za-z])")
_TRAILING_TEXT_RE = re.compile(r"(?<=\S)\s*\\(?:text|textrm|mbox|mathrm)\s*\{[^{}]*\}(?:\^\{?\d\}?)?$")


def normalize_math_answer(answer: str) -> str:
    """A canonical string for comparing MATH-style answers without a CAS.

    Drops surrounding ``$``, ``\\left``/``\\right``, ``\\!`` and other spacing commands,
    degree signs, ``\\%``, ``\\$``, trailing ``\\text{...}`` units and all whitespace;
    ``\\dfrac``/``\\tfrac`` become ``\\frac``; ``\\frac43`` becomes ``\\frac{4}{3}``;
    ``\\text{X}`` around a whole answer is unwrapped; ``(C)`` becomes ``C``; a leading
    single-variable ``x=`` is dropped.
    """
    text = strip_wrappers(answer)
    text = _LEFT_RIGHT_RE.sub("", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree", "", text)
    text = re.sub(r"\\[!,;:]|\\ |~", "", text)
    text = re.sub(r"\\%|%|\\\$|\$", "", text)
    text = _TRAILING_TEXT_RE.sub("", text)
    text = _TEXT_RE.sub(r"\1", text)
    text = _SHORT_FRAC_RE.sub(lambda m: rf"\frac{{{m[1].strip('{}')}}}{{{m[2].strip('{}')}}}", text)
    text = _SHORT_SQRT_RE.sub(r"\\sqrt{\1}", text)
    text = re.sub(r"\s+", "", text).rstrip(".")
    if text.count("=") == 1:
        text = re.sub(r"^[A-Za-z]=", "", text)
    if match := re.fullmatch(r"\(([A-Za-z])\)", text):
        text = match[1]
    return text


def _fallback_math_equal(prediction: str, reference: str) -> bool:
    pred, ref = normalize_math_answer(prediction), normalize_math_answer(reference)
    if not pred:
        return False
    if pred == ref:
        return True
    pred_value, ref_value = answer_number(prediction), answer_number(reference)
    return pred_value is not None and ref_value is not None and numbers_equal(pred_value, ref_value)


# --------------------------------------------------------------------------- math-verify worker


def math_verify_available() -> bool:
    """Is the optional `math-verify` package installed?"""
    return importlib.util.find_spec("math_verify") is not None


def _math_verify_equal(prediction: str, reference: str) -> bool | None:
    """math-verify's verdict (runs in the worker process); None when it fails."""
    try:
        from math_verify import parse, verify

        # The worker runs tasks on its main thread, so math-verify's signal-based inner
        # timeouts work here; the parent's per-item timeout is the backstop.
        gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=5)
        answer = parse(f"\\boxed{{{prediction}}}", parsing_timeout=5)
        if not gold or not answer:
            return None
        return bool(verify(gold, answer, timeout_seconds=5))
    except Exception:  # noqa: BLE001 - any math-verify failure means "fall back"
        return None


def _warm_up() -> bool:
    """Import math-verify in the worker (and prime its caches) before timing items."""
    return _math_verify_equal("1", "1") is True


@dataclass(frozen=True)
class _DelayedVerifier:
    """Test hook: sleep `seconds`, then verify. Picklable, so it runs in the worker."""

    seconds: float

    def __call__(self, prediction: str, reference: str) -> bool | None:
        time.sleep(self.seconds)
        return _math_verify_equal(prediction, reference)


# --------------------------------------------------------------------------- grader

Item = tuple["str | None", str, str]


class Grader:
    """Grades answers; owns the math-verify worker pool (started lazily, once).

    timeout: seconds allowed per math-verify item (then the fallback's verdict stands).
    workers: worker processes. use_math_verify: False forces the fallback comparison.
    Use as a context manager, or call `close()`.
    """

    def __init__(self, timeout: float = 5.0, workers: int = 1, use_math_verify: bool = True,
                 *, verifier: Verifier = _math_verify_equal, startup_timeout: float = 120.0) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.timeout = timeout
        self.workers = workers
        self.use_math_verify = use_math_verify and math_verify_available()
        self._verifier = verifier
        self._startup_timeout = startup_timeout
        self._pool: cf.ProcessPoolExecutor | None = None

    # -- lifecycle
    def __enter__(self) -> Grader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (a later math item starts new ones)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # A stuck worker never returns: kill it (the executor has no public API for this).
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=True, cancel_futures=True)

    def _ensure_pool(self) -> cf.ProcessPoolExecutor | None:
        if self._pool is None:
            pool = cf.ProcessPoolExecutor(max_workers=self.workers,
                                          mp_context=multiprocessing.get_context("spawn"))
            try:
                warm = [pool.submit(_warm_up) for _ in range(self.workers)]
                ok = all(f.result(timeout=self._startup_timeout) for f in warm)
            except Exception:  # noqa: BLE001 - a pool that cannot start means "fall back"
                ok = False
            if not ok:
                self._pool = pool
                self._kill_pool()
                self.use_math_verify = False
                return None
            self._pool = pool
        return self._pool

    # -- grading
    def grade(self, prediction: str | None, reference: str, kind: str) -> bool:
        """Is `prediction` (a model's text or a bare answer) correct for `reference`?"""
        return self.grade_many([(prediction, reference, kind)])[0]

    def grade_many(self, items: Sequence[Item]) -> list[bool]:
        """Grade (prediction, reference, kind) items; math-verify items share the pool."""
        results: list[bool] = []
        needs_verify: list[tuple[int, str, str]] = []
        for index, (prediction, reference, kind) in enumerate(items):
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
            answer = _answer_text(prediction)
            if answer is None:
                results.append(False)
            elif kind == "gsm8k":
                pred_value, ref_value = answer_number(answer), answer_number(reference)
                results.append(pred_value is not None and ref_value is not None
                               and numbers_equal(pred_value, ref_value))
            elif kind in ("aime", "embedded"):
                pred_int, ref_int = _integer(answer), _integer(reference)
                results.append(pred_int is not None and pred_int == ref_int)
            else:
                correct = _fallback_math_equal(answer, reference)
                results.append(correct)
                if not correct and self.use_math_verify:
                    needs_verify.append((index, answer, reference))
        if needs_verify:
            for index, verdict in zip((i for i, _, _ in needs_verify),
                                      self._verify_all([(a, r) for _, a, r in needs_verify]), strict=False):
                if verdict:
                    results[index] = True
        return results

    def _verify_all(self, pairs: list[tuple[str, str]]) -> list[bool | None]:
        """math-verify verdicts, None where it timed out, failed or is unavailable."""
        verdicts: list[bool | None] = [None] * len(pairs)
        pending = list(range(len(pairs)))
        while pending:
            pool = self._ensure_pool()
            if pool is None:
                return verdicts
            futures = {i: pool.submit(self._verifier, *pairs[i]) for i in pending}
            retry: list[int] = []
            for position, i in enumerate(pending):
                try:
                    verdicts[i] = futures[i].result(timeout=self.timeout)
                except Exception:  # noqa: BLE001 - timeout, or a worker died
                    # Item i keeps the fallback verdict. The pool may hold a stuck worker:
                    # kill it, keep results already in, and run the rest on a fresh pool.
                    self._kill_pool()
                    for j in pending[position + 1:]:
                        future = futures[j]
                        if future.done() and not future.cancelled() and future.exception() is None:
                            verdicts[j] = future.result()
                        else:
                            retry.append(j)
                    break
            pending = retry
        return verdicts


def grade(prediction: str | None, reference: str, kind: str, *, timeout: float = 5.0,
          use_math_verify: bool = True) -> bool:
    """Grade one item. A math item that the fallback rejects starts a worker process for
    math-verify: to grade many items use `grade_many` or a `Grader`."""
    with Grader(timeout=timeout, use_math_verify=use_math_verify) as grader:
        return grader.grade(prediction, reference, kind)


def grade_many(items: Sequence[Item], timeout: float = 5.0, workers: int = 1, *,
               use_math_verify: bool = True) -> list[bool]:
    """Grade (prediction, reference, kind) items with one worker pool for the batch."""
    with Grader(timeout=timeout, workers=workers, use_math_verify=use_math_verify) as grader:
        return grader.grade_many(items)
