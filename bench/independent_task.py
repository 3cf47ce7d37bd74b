"""Embedded-task problems from a second, independently written generator.

The fixed splits (`bench.tasks.generate_split`) come from the generator the embedded
models were trained with, so a figure measured on them could owe something to that
generator's habits (how often a step copies the line just before it, how constants are
drawn). This generator writes problems in the same documented format and range (the
trained configuration: `a` plus 2 to 6 derived variables, each an earlier variable plus
or minus a constant or another earlier variable, every value in [0, 99]) by a different
process: numpy's generator, the first operand drawn uniformly from *all* earlier
variables (long-range copies are more frequent than in training), the second operand a
variable half of the time, and a step redrawn whole when its value leaves the range.
Problems that occur among the first `RESERVED` of any fixed split are skipped.
"""

from __future__ import annotations

import numpy as np

from bench.tasks import RESERVED, SPLIT_SEEDS, Problem, generate_split, solve_lines

__all__ = ["INDEPENDENT_SEED", "generate_independent"]

INDEPENDENT_SEED = 7_000_003
_NAMES = "abcdefg"  # a plus at most 6 derived variables


def _draw(rng: np.random.Generator) -> str:
    n_steps = int(rng.integers(2, 7))
    values = {"a": int(rng.integers(1, 100))}
    parts = [f"a={values['a']}"]
    for name in _NAMES[1:n_steps + 1]:
        earlier = list(values)
        while True:  # redraw the whole step until its value lies in [0, 99]
            left = earlier[int(rng.integers(len(earlier)))]
            op = "+" if rng.random() < 0.5 else "-"
            others = [n for n in earlier if n != left]
            if others and rng.random() < 0.5:
                right = others[int(rng.integers(len(others)))]
                right_value = values[right]
            else:
                right_value = int(rng.integers(1, 100))
                right = str(right_value)
            value = values[left] + right_value if op == "+" else values[left] - right_value
            if 0 <= value <= 99:
                break
        values[name] = value
        parts.append(f"{name}={left}{op}{right}")
    return ";".join(parts) + f";?{name}"


def generate_independent(n: int, seed: int = INDEPENDENT_SEED) -> list[Problem]:
    """The first `n` problems of this generator for `seed` (prefix-stable), none of them
    among the first RESERVED problems of a fixed split."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    fixed = {p.problem for split in SPLIT_SEEDS for p in generate_split(split, RESERVED)}
    rng = np.random.default_rng(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    while len(problems) < n:
        text = _draw(rng)
        if text in fixed or text in seen:
            continue
        seen.add(text)
        lines = solve_lines(text)  # the task's own exact solver: steps and "#### answer"
        problems.append(Problem(id=f"independent-{len(problems)}", problem=text,
                                solution="\n".join(lines), answer=lines[-1].split()[-1]))
    return problems
