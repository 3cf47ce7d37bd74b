"""The embedded synthetic task: chains of named quantities, solved one step per line.

This module owns the task: the generator (seeded, with difficulty knobs), the exact
step checker, the final-answer checker and the fixed train / calibration / test
splits. It knows nothing about models or tokenizers.

A problem and its solution look like this::

    a=42;b=a-17;c=b+a;d=c-9;?d          <- problem (what a user passes to solve)
    b=42-17=25                           <- one step per line: name=operands=value
    c=25+42=67
    d=67-9=58
    #### 58                              <- final-answer line

The default configuration (what the shipped embedded models were trained on, see
docs/embedded-model-card.md) uses + and - only, with 2-6 derived variables; "*" by
one digit and longer chains are generator options the shipped models do not handle.

Each step copies the operand values as they were stated on earlier lines (or in the
problem, for the first variable) and applies one operation. Steps differ in
difficulty: copying the previous line's value and a one-digit operand are easy;
copying a value from many lines back and a two-digit subtraction with a borrow are
hard. That mix is what a step-level cascade exploits.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

__all__ = [
    "TaskConfig",
    "Problem",
    "DEFAULT_CONFIG",
    "EASY_CONFIG",
    "SPLIT_SEEDS",
    "RESERVED",
    "generate_problem",
    "generate_split",
    "write_split",
    "solve_lines",
    "check_step",
    "check_answer",
    "parse_problem",
    "step_values",
]

_VARIABLES = "abcdefghijklmnopqrstuvwxyz"
_STEP_RE = re.compile(r"^([a-z])=(\d+)([+\-*])(\d+)=(-?\d+)$")
_ANSWER_RE = re.compile(r"^####\s*(-?\d+)\s*$")
_DEF_RE = re.compile(r"^([a-z])=(?:(\d+)|([a-z]|\d+)([+\-*])([a-z]|\d+))$")


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs of the generator.

    min_steps, max_steps: number of derived variables (steps before the answer line).
    max_value: every stated value (inputs, constants, intermediate results) lies in
        [0, max_value]; 99 keeps operands at two digits.
    ops: operations drawn from; "*" always multiplies by a single digit. The default
        leaves "*" out: a one-digit multiplication table was the slowest thing for the
        embedded models to learn on 2 CPU cores, and the shipped models were trained
        without it (see docs/embedded-model-card.md).
    p_previous: probability that a step's first operand is the variable defined just
        before it (an easy copy); otherwise an earlier variable (a long-range copy).
    p_variable_operand: probability that the second operand is a variable rather than
        a constant.
    """

    min_steps: int = 2
    max_steps: int = 6
    max_value: int = 99
    ops: str = "+-"
    p_previous: float = 0.6
    p_variable_operand: float = 0.4

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps <= len(_VARIABLES) - 1:
            raise ValueError(
                f"need 1 <= min_steps <= max_steps <= 25, got {self.min_steps}, {self.max_steps}"
            )
        if self.max_value < 9:
            raise ValueError(f"max_value must be >= 9, got {self.max_value}")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {self.ops!r}")
        for name in ("p_previous", "p_variable_operand"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


# The hardest setting the default benchmark uses, and an easy one for curricula.
DEFAULT_CONFIG = TaskConfig()
EASY_CONFIG = TaskConfig(min_steps=1, max_steps=3, max_value=20, p_previous=0.9)

# Disjoint splits come from disjoint seed streams; a problem that also occurs in an
# earlier split is dropped (see generate_split), so the splits never share a problem.
SPLIT_SEEDS = {"train": 1_000_003, "calibration": 2_000_003, "test": 3_000_017}


@dataclass(frozen=True)
class Problem:
    """One problem: the text a user sends, the reference solution and the answer."""

    id: str
    problem: str
    solution: str
    answer: str

    def to_json(self) -> dict:
        return asdict(self)


_MAX_TRIES = 1000


def _pick_step(rng: random.Random, values: dict[str, int], names: list[str],
               config: TaskConfig) -> tuple[str, str, str, int] | None:
    """Draw one step (first operand, op, second operand, value) whose value is in range;
    None when no draw fits (e.g. ops="+" and every value is already max_value)."""
    for _ in range(_MAX_TRIES):
        if len(names) == 1 or rng.random() < config.p_previous:
            left = names[-1]
        else:
            left = rng.choice(names[:-1])
        op = rng.choice(config.ops)
        left_value = values[left]
        if op == "*":
            if left_value == 0:
                continue
            top = min(9, config.max_value // left_value)
            if top < 2:
                continue
            right_value = rng.randint(2, top)
            right = str(right_value)
        else:
            candidates = [n for n in names if n != left]
            use_variable = candidates and rng.random() < config.p_variable_operand
            if use_variable:
                right = rng.choice(candidates)
                right_value = values[right]
            else:
                right_value = rng.randint(1, config.max_value)
                right = str(right_value)
        value = _apply(left_value, op, right_value)
        if 0 <= value <= config.max_value:
            return left, op, right, value
    return None


def _apply(left: int, op: str, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    return left * right


def generate_problem(rng: random.Random, config: TaskConfig = DEFAULT_CONFIG,
                     problem_id: str = "") -> Problem:
    """Draw one problem from `rng` (a `random.Random`; same state -> same problem)."""
    while True:
        problem = _draw_problem(rng, config, problem_id)
        if problem is not None:
            return problem
        # A chain that painted itself into a corner (possible with ops lacking "-"): redraw.


def _draw_problem(rng: random.Random, config: TaskConfig, problem_id: str) -> Problem | None:
    n_steps = rng.randint(config.min_steps, config.max_steps)
    first = rng.randint(1, config.max_value)
    names = [_VARIABLES[0]]
    values = {names[0]: first}
    definitions = [f"{names[0]}={first}"]
    lines = []
    for index in range(1, n_steps + 1):
        name = _VARIABLES[index]
        picked = _pick_step(rng, values, names, config)
        if picked is None:
            return None
        left, op, right, value = picked
        definitions.append(f"{name}={left}{op}{right}")
        right_text = str(values[right]) if right in values else right
        lines.append(f"{name}={values[left]}{op}{right_text}={value}")
        names.append(name)
        values[name] = value
    answer = str(values[names[-1]])
    lines.append(f"#### {answer}")
    problem = ";".join(definitions) + f";?{names[-1]}"
    return Problem(id=problem_id, problem=problem, solution="\n".join(lines), answer=answer)


# Every split excludes the first RESERVED problems of each earlier split (and training
# excludes calibration's and test's), so splits of up to RESERVED problems are disjoint
# whatever sizes are asked for, and a split's first n problems do not depend on n.
RESERVED = 5000


@lru_cache(maxsize=16)
def _reserved(split: str, config: TaskConfig) -> frozenset[str]:
    return frozenset(p.problem for p in generate_split(split, RESERVED, config))


def generate_split(split: str, n: int, config: TaskConfig = DEFAULT_CONFIG) -> list[Problem]:
    """The first `n` problems of a named split ("train", "calibration", "test").

    Deterministic and prefix-stable. Problems among the first RESERVED of an earlier
    split (in the order train, calibration, test) are skipped, so splits are disjoint.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    earlier = list(SPLIT_SEEDS)[: list(SPLIT_SEEDS).index(split)]
    excluded = frozenset().union(*(_reserved(s, config) for s in earlier))
    rng = random.Random(SPLIT_SEEDS[split])
    problems: list[Problem] = []
    seen: set[str] = set()
    while len(problems) < n:
        candidate = generate_problem(rng, config, problem_id=f"{split}-{len(problems)}")
        if candidate.problem in excluded or candidate.problem in seen:
            continue
        seen.add(candidate.problem)
        problems.append(candidate)
    return problems


def write_split(path: str | Path, split: str, n: int, config: TaskConfig = DEFAULT_CONFIG) -> Path:
    """Write a split as JSONL, with the generator's parameters in `<path>.params.json`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for problem in generate_split(split, n, config):
            handle.write(json.dumps(problem.to_json()) + "\n")
    params = {"split": split, "n": n, "seed": SPLIT_SEEDS[split], "config": asdict(config)}
    Path(str(path) + ".params.json").write_text(json.dumps(params, indent=2) + "\n")
    return path


def parse_problem(problem: str) -> tuple[list[tuple[str, str]], str]:
    """Split a problem into [(name, definition)] and the queried name; ValueError if malformed."""
    parts = [p.strip() for p in problem.strip().split(";") if p.strip()]
    if len(parts) < 2 or not parts[-1].startswith("?"):
        raise ValueError(f"not an embedded-task problem: {problem!r}")
    definitions = []
    for part in parts[:-1]:
        match = _DEF_RE.match(part)
        if not match:
            raise ValueError(f"malformed definition {part!r} in problem {problem!r}")
        definitions.append((match.group(1), part.split("=", 1)[1]))
    return definitions, parts[-1][1:]


def step_values(problem: str, lines: list[str]) -> dict[str, int]:
    """Values of the variables as stated so far: the problem's inputs, then each line's claim."""
    definitions, _ = parse_problem(problem)
    stated: dict[str, int] = {}
    for name, definition in definitions:
        if definition.isdigit():
            stated[name] = int(definition)
    for line in lines:
        match = _STEP_RE.match(line.strip())
        if match:
            stated[match.group(1)] = int(match.group(5))
    return stated


def _operand_value(token: str, stated: dict[str, int]) -> int | None:
    return int(token) if token.isdigit() else stated.get(token)


def check_step(problem: str, previous_lines: list[str], step: str) -> bool:
    """Is `step` locally correct given the problem and the lines written before it?

    Locally correct: it defines the next variable the problem defines, its operands are
    the values stated on earlier lines (or the problem's constants), and its value is
    the operation applied to them. An answer line (``#### v``) is locally correct when
    every variable is defined and v is the queried variable's value as stated.
    Earlier mistakes are not held against a step: this is what per-step correctness
    labels (confidence AUROC, oracle gates) need.
    """
    definitions, query = parse_problem(problem)
    stated = step_values(problem, previous_lines)
    defined = [name for name, d in definitions if not d.isdigit()]
    done = [name for name in defined if name in stated]
    step = step.strip()
    answer = _ANSWER_RE.match(step)
    if answer:
        return len(done) == len(defined) and stated.get(query) == int(answer.group(1))
    match = _STEP_RE.match(step)
    if not match or len(done) == len(defined):
        return False
    name, left_text, op, right_text, value_text = match.groups()
    expected_name = next(name for name in defined if name not in stated)
    if name != expected_name:
        return False
    definition = dict(definitions)[name]
    def_match = re.match(r"^([a-z]|\d+)([+\-*])([a-z]|\d+)$", definition)
    if def_match is None:
        return False
    left_ref, def_op, right_ref = def_match.groups()
    left_value = _operand_value(left_ref, stated)
    right_value = _operand_value(right_ref, stated)
    return (
        op == def_op
        and left_value == int(left_text)
        and right_value == int(right_text)
        and int(value_text) == _apply(left_value, op, right_value)
    )


def solve_lines(problem: str) -> list[str]:
    """The reference solution lines of any well-formed problem (inputs need not be generated)."""
    definitions, query = parse_problem(problem)
    values: dict[str, int] = {}
    lines = []
    for name, definition in definitions:
        if definition.isdigit():
            values[name] = int(definition)
            continue
        left_ref, op, right_ref = re.match(r"^([a-z]|\d+)([+\-*])([a-z]|\d+)$", definition).groups()
        left, right = _operand_value(left_ref, values), _operand_value(right_ref, values)
        if left is None or right is None:
            raise ValueError(f"definition of {name!r} uses an undefined variable in {problem!r}")
        values[name] = _apply(left, op, right)
        lines.append(f"{name}={left}{op}{right}={values[name]}")
    if query not in values:
        raise ValueError(f"queried variable {query!r} is not defined in {problem!r}")
    lines.append(f"#### {values[query]}")
    return lines


def check_answer(problem: str, answer: str | None) -> bool:
    """Is `answer` (a string such as "201", or None) the problem's true final answer?"""
    if answer is None:
        return False
    truth = solve_lines(problem)[-1].split()[-1]
    try:
        return int(str(answer).strip()) == int(truth)
    except ValueError:
        return False
