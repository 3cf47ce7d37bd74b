"""The embedded synthetic task: generator, seeded disjoint splits, step / answer checkers."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from bench.tasks import (
    DEFAULT_CONFIG,
    EASY_CONFIG,
    SPLIT_SEEDS,
    Problem,
    TaskConfig,
    check_answer,
    check_step,
    generate_problem,
    generate_split,
    parse_problem,
    solve_lines,
    step_values,
    write_split,
)

REPO = Path(__file__).resolve().parents[2]

# A problem with "*" (the checker handles it; the shipped models were not trained on it):
# b = 42-17 = 25, c = 25+42 = 67, d = 67*3 = 201.
P = "a=42;b=a-17;c=b+a;d=c*3;?d"
B, C, D = "b=42-17=25", "c=25+42=67", "d=67*3=201"

# Configs whose generation always terminates (each has '-', see the hang test at the end).
CONFIGS = [
    DEFAULT_CONFIG,
    EASY_CONFIG,
    TaskConfig(min_steps=4, max_steps=6, max_value=30, ops="-*", p_previous=0.0, p_variable_operand=1.0),
    TaskConfig(min_steps=3, max_steps=3, max_value=9, ops="+-", p_previous=1.0, p_variable_operand=0.0),
]

_DEF = re.compile(r"^([a-z]|\d+)([+\-*])([a-z]|\d+)$")


# ---- generator: determinism and splits ------------------------------------------------------

def test_generate_problem_is_a_function_of_the_rng_state():
    first = [generate_problem(random.Random(7), DEFAULT_CONFIG) for _ in range(2)]
    assert first[0] == first[1]
    rng_a, rng_b = random.Random(11), random.Random(11)
    assert [generate_problem(rng_a) for _ in range(30)] == [generate_problem(rng_b) for _ in range(30)]
    others = {generate_problem(random.Random(seed)).problem for seed in range(30)}
    assert len(others) > 25  # different seeds give (almost always) different problems


def test_generate_split_is_deterministic_and_splits_differ():
    for split in SPLIT_SEEDS:
        one, two = generate_split(split, 60), generate_split(split, 60)
        assert one == two
        assert [p.id for p in one] == [f"{split}-{i}" for i in range(60)]
        assert all(isinstance(p, Problem) for p in one)
    train, test = generate_split("train", 60), generate_split("test", 60)
    assert [p.problem for p in train] != [p.problem for p in test]
    assert not {p.problem for p in train} & {p.problem for p in test}
    assert generate_split("train", 60, EASY_CONFIG) != train  # the config matters too


def test_splits_first_2000_are_disjoint_and_duplicate_free():
    problems = {split: [p.problem for p in generate_split(split, 2000)] for split in SPLIT_SEEDS}
    for split, texts in problems.items():
        assert len(texts) == 2000
        assert len(set(texts)) == 2000, f"{split} repeats a problem"
    train, calibration, test = (set(problems[s]) for s in ("train", "calibration", "test"))
    assert not train & calibration
    assert not train & test
    assert not calibration & test


def test_generate_split_rejects_bad_arguments():
    assert generate_split("test", 0) == []
    with pytest.raises(ValueError, match="unknown split"):
        generate_split("validation", 3)
    with pytest.raises(ValueError):
        generate_split("train", -1)


# ---- generator: every problem respects its TaskConfig -----------------------------------------

def _check_respects(problem: Problem, config: TaskConfig) -> None:
    definitions, query = parse_problem(problem.problem)
    inputs = [(n, d) for n, d in definitions if d.isdigit()]
    derived = [(n, d) for n, d in definitions if not d.isdigit()]
    assert [n for n, _ in definitions] == list("abcdefghijklmnopqrstuvwxyz"[: len(definitions)])
    assert len(inputs) == 1 and inputs[0][0] == "a"
    assert config.min_steps <= len(derived) <= config.max_steps, problem
    assert query == derived[-1][0]
    values = {"a": int(inputs[0][1])}
    assert 0 <= values["a"] <= config.max_value
    for index, (name, definition) in enumerate(derived):
        left, op, right = _DEF.match(definition).groups()
        assert op in config.ops, problem
        assert left.isalpha() and left in values, problem  # first operand: an earlier variable
        if config.p_previous == 1.0:
            assert left == definitions[index][0], problem  # always the variable just before
        if op == "*":
            assert len(right) == 1 and right.isdigit(), f"'*' by more than one digit: {problem}"
        elif config.p_variable_operand == 0.0:
            assert right.isdigit(), problem
        elif config.p_variable_operand == 1.0 and index > 0:
            assert right.isalpha(), problem
        for operand in (left, right):
            value = values[operand] if operand.isalpha() else int(operand)
            assert 0 <= value <= config.max_value, problem
        left_value = values[left]
        right_value = values[right] if right.isalpha() else int(right)
        values[name] = {"+": left_value + right_value, "-": left_value - right_value,
                        "*": left_value * right_value}[op]
        assert 0 <= values[name] <= config.max_value, problem
    assert problem.answer == str(values[query])
    lines = problem.solution.split("\n")
    assert len(lines) == len(derived) + 1 and lines[-1] == f"#### {problem.answer}"
    for line in lines[:-1]:
        for number in re.findall(r"\d+", line):
            assert 0 <= int(number) <= config.max_value, problem


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "easy", "minus-times", "plus-minus"])
def test_every_problem_respects_its_config(config):
    problems = generate_split("train", 300, config)
    for problem in problems:
        _check_respects(problem, config)
    counts = {len(solve_lines(p.problem)) - 1 for p in problems}
    assert min(counts) == config.min_steps and max(counts) == config.max_steps  # range is used
    used = {op for p in problems for _, d in parse_problem(p.problem)[0] for op in "+-*" if op in d}
    assert used == set(config.ops)


def test_solve_lines_reproduces_every_generated_solution():
    for config in CONFIGS:
        for problem in generate_split("calibration", 150, config):
            assert solve_lines(problem.problem) == problem.solution.split("\n")
            assert check_answer(problem.problem, problem.answer)


def test_every_generated_solution_line_checks_and_perturbations_do_not():
    for problem in generate_split("test", 150):
        lines = problem.solution.split("\n")
        for index, line in enumerate(lines):
            assert check_step(problem.problem, lines[:index], line), (problem, line)
            assert check_step(problem.problem, lines[:index], line + "\n")
            value = int(line.rsplit("=", 1)[-1] if "=" in line else line.split()[-1])
            head = line[: len(line) - len(str(value))]
            assert not check_step(problem.problem, lines[:index], f"{head}{value + 1}"), (problem, line)


def test_solve_lines_and_check_step_on_a_hand_written_problem():
    assert solve_lines(P) == [B, C, D, "#### 201"]
    two_inputs = "a=7;b=3;c=a*b;d=c-a;?d"
    assert solve_lines(two_inputs) == ["c=7*3=21", "d=21-7=14", "#### 14"]
    assert check_step(two_inputs, [], "c=7*3=21")
    assert not check_step(two_inputs, [], "b=7*3=21")  # b is an input, not a step
    assert check_step(two_inputs, ["c=7*3=21", "d=21-7=14"], "#### 14")
    assert step_values(P, []) == {"a": 42}
    assert step_values(P, [B, "nonsense", "c=25+42=68"]) == {"a": 42, "b": 25, "c": 68}


# ---- check_step on hand-written steps -----------------------------------------------------------

def test_check_step_accepts_right_steps():
    assert check_step(P, [], B)
    assert check_step(P, [B], C)
    assert check_step(P, [B, C], D)
    assert check_step(P, [B, C, D], "#### 201")
    assert check_step(P, [B + "\n", C + "\n"], "  " + D + "\n")  # surrounding whitespace is fine


def test_check_step_rejects_wrong_arithmetic_and_wrong_op():
    assert not check_step(P, [], "b=42-17=26")
    assert not check_step(P, [], "b=42-17=-25")
    assert not check_step(P, [B], "c=25+42=76")
    assert not check_step(P, [B, C], "d=67*3=200")
    assert not check_step(P, [], "b=42+17=59")  # right arithmetic, wrong operation
    assert not check_step(P, [B, C], "d=67+3=70")


def test_check_step_rejects_operands_copied_from_the_wrong_line():
    assert not check_step(P, [B, C], "d=25*3=75")  # b's value where c's belongs
    assert not check_step(P, [B, C], "d=42*3=126")  # a's value (from the problem)
    assert not check_step(P, [B], "c=25+25=50")  # b twice instead of b + a
    assert not check_step(P, [B], "c=42+42=84")
    assert not check_step(P, [], "b=43-17=26")  # a misread from the problem
    assert not check_step(P, [], "b=42-18=24")  # constant misread


def test_check_step_rejects_wrong_variable_name_or_order():
    assert not check_step(P, [], "c=42-17=25")  # b's step under another name
    assert not check_step(P, [], "c=25+42=67")  # c's step before b
    assert not check_step(P, [], "a=42-17=25")
    assert not check_step(P, [B], "b=42-17=25")  # b again
    assert not check_step(P, [B], "d=67*3=201")  # skips c
    assert not check_step(P, [B, C], "e=67*3=201")


@pytest.mark.parametrize("step", [
    "", "b", "b=", "b=42-17", "b=42-17=", "b = 42-17 = 25", "b=42 - 17=25", "B=42-17=25",
    "b=42/17=2", "b=a-17=25", "b=42-17=25=25", "b=42--17=25", "bb=42-17=25",
    "the answer is 25", "####", "#### x", "25",
])
def test_check_step_rejects_malformed_text(step):
    assert not check_step(P, [], step)


def test_check_step_rejects_steps_after_every_variable_is_done():
    done = [B, C, D]
    assert not check_step(P, done, "e=201+1=202")
    assert not check_step(P, done, D)  # d again
    assert not check_step(P, done, "b=42-17=25")
    assert not check_step(P, done + ["#### 201"], "e=201+1=202")


def test_check_step_answer_line_right_wrong_and_premature():
    assert check_step(P, [B, C, D], "#### 201")
    assert check_step(P, [B, C, D], "####201")
    assert not check_step(P, [B, C, D], "#### 200")
    assert not check_step(P, [B, C, D], "#### 67")
    assert not check_step(P, [], "#### 201")  # premature: nothing derived yet
    assert not check_step(P, [B, C], "#### 201")  # premature: d not stated
    assert not check_step(P, [B, C], "#### 67")


def test_check_step_uses_values_as_stated_after_an_earlier_mistake():
    wrong_b = "b=42-17=26"
    assert check_step(P, [wrong_b], "c=26+42=68")  # locally right given the stated b
    assert not check_step(P, [wrong_b], C)  # the true value is not what was stated
    wrong = [wrong_b, "c=26+42=68", "d=68*3=204"]
    assert check_step(P, wrong[:2], wrong[2])
    assert check_step(P, wrong, "#### 204")
    assert not check_step(P, wrong, "#### 201")
    # A wrong operand on c's line (still a stated value) carries into d.
    assert check_step(P, [B, "c=25+25=50"], "d=50*3=150")
    assert not check_step(P, [B, "c=25+25=50"], D)
    # A malformed earlier line states nothing: b is still the next step.
    assert check_step(P, ["b=42-17"], B)


# ---- check_answer ----------------------------------------------------------------------------------

def test_check_answer():
    assert check_answer(P, "201")
    assert check_answer(P, " 201\n")
    assert not check_answer(P, "200")
    assert not check_answer(P, "-201")
    assert not check_answer(P, None)
    for junk in ("", "abc", "201.5", "2 01", "#### 201", "two hundred one", "0x c9"):
        assert not check_answer(P, junk), junk
    assert check_answer("a=7;b=3;c=a*b;d=c-a;?d", "14")


# ---- write_split ---------------------------------------------------------------------------------------

def test_write_split_writes_jsonl_and_params(tmp_path):
    path = tmp_path / "nested" / "dir" / "calibration.jsonl"
    returned = write_split(path, "calibration", 25, EASY_CONFIG)
    assert Path(returned) == path
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    expected = generate_split("calibration", 25, EASY_CONFIG)
    assert rows == [p.to_json() for p in expected]
    assert all(set(row) == {"id", "problem", "solution", "answer"} for row in rows)
    params = json.loads(Path(str(path) + ".params.json").read_text())
    assert params == {"split": "calibration", "n": 25, "seed": SPLIT_SEEDS["calibration"],
                      "config": asdict(EASY_CONFIG)}
    # The parameters are enough to regenerate the file.
    assert generate_split(params["split"], params["n"], TaskConfig(**params["config"])) == expected


def test_write_split_defaults_to_the_default_config(tmp_path):
    path = write_split(tmp_path / "test.jsonl", "test", 3)
    params = json.loads(Path(str(path) + ".params.json").read_text())
    assert params["config"] == asdict(DEFAULT_CONFIG)
    assert params["seed"] == SPLIT_SEEDS["test"]
    assert len(path.read_text().splitlines()) == 3


# ---- validation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"min_steps": 0}, {"min_steps": -1}, {"min_steps": 5, "max_steps": 4}, {"max_steps": 26},
    {"min_steps": 26, "max_steps": 26}, {"max_value": 8}, {"max_value": 0}, {"max_value": -5},
    {"ops": ""}, {"ops": "/"}, {"ops": "+/"}, {"ops": "+-x"}, {"ops": "plus"},
    {"p_previous": -0.01}, {"p_previous": 1.01}, {"p_variable_operand": -1.0},
    {"p_variable_operand": 2.0}, {"p_previous": float("nan")},
])
def test_task_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        TaskConfig(**kwargs)


def test_task_config_accepts_boundary_values():
    TaskConfig(min_steps=1, max_steps=1)
    TaskConfig(min_steps=25, max_steps=25)
    TaskConfig(max_value=9, ops="*", p_previous=0.0, p_variable_operand=1.0)
    TaskConfig(ops="-+", p_previous=1.0, p_variable_operand=0.0)


# ---- parse_problem ---------------------------------------------------------------------------------------

def test_parse_problem_on_a_good_problem():
    definitions, query = parse_problem(P)
    assert definitions == [("a", "42"), ("b", "a-17"), ("c", "b+a"), ("d", "c*3")]
    assert query == "d"
    assert parse_problem(" a=1;b=a+1;?b \n") == ([("a", "1"), ("b", "a+1")], "b")


@pytest.mark.parametrize("problem", [
    "", ";", "?d", "a=42", "a=42;b=a-17", "a=42;b=a-17;d", "a=42;?b;b=a-17",
    "a=42;b=a/17;?b", "a=42;b=a-17-1;?b", "A=42;?A", "ab=42;?ab", "a=-42;?a", "a=4.2;?a",
    "a=;?a", "a=42;b=a-;?b", "a=42;b==a;?b", "a=42,b=a-17,?b", "What is 42-17?",
])
def test_parse_problem_rejects_malformed_problems(problem):
    with pytest.raises(ValueError):
        parse_problem(problem)
    with pytest.raises(ValueError):
        solve_lines(problem)


@pytest.mark.parametrize("problem", ["a=42;b=c+1;?b", "a=42;b=a+1;?z"])
def test_solve_lines_rejects_undefined_variables(problem):
    with pytest.raises(ValueError):
        solve_lines(problem)


# ---- termination ---------------------------------------------------------------------------------------

def test_generation_terminates_for_every_accepted_config():
    """TaskConfig accepts ops without '-', so generation must not spin forever on them."""
    code = (
        "import random, sys\n"
        "from bench.tasks import TaskConfig, generate_problem\n"
        "for ops, max_value in (('+', 9), ('*', 99), ('+*', 20)):\n"
        "    config = TaskConfig(ops=ops, max_value=max_value)\n"
        "    for seed in range(40):\n"
        "        print(ops, max_value, seed, flush=True)\n"
        "        generate_problem(random.Random(seed), config)\n"
        "print('done', flush=True)\n"
    )
    try:
        # A hang guard, not a speed test: it costs time only when generation spins, and the
        # interpreter's start-up alone can take seconds on a busy machine.
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                                text=True, timeout=120)
    except subprocess.TimeoutExpired as error:
        out = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        last = out.strip().splitlines()[-1] if out.strip() else "?"
        pytest.fail(f"generate_problem never returned for (ops, max_value, seed) = {last}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("done")


@pytest.mark.parametrize("split", ["calibration", "test"])
def test_committed_split_files_match_the_generator(split):
    # The JSONL files in bench/data are what users calibrate on from the CLI; they must
    # be exactly the generator's split with the parameters recorded beside them.
    path = Path(__file__).resolve().parents[2] / "bench" / "data" / f"embedded_{split}.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    params = json.loads(Path(str(path) + ".params.json").read_text())
    assert params["split"] == split and params["n"] == len(lines) == 1000
    assert params["config"] == asdict(DEFAULT_CONFIG)
    assert lines == [p.to_json() for p in generate_split(split, len(lines))]
