"""End to end on the shipped embedded pair: loading, solving, determinism, examples."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cascade
from bench.tasks import EASY_CONFIG, check_answer, generate_problem
from cascade.embedded import EMBEDDED_DELIMITER, embedded_path
from decoding import HFBackend

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tier", ["small", "medium", "large"])
def test_shipped_weights_load_through_the_standard_path(tier):
    backend = HFBackend.from_pretrained(embedded_path(tier), step_delimiter=EMBEDDED_DELIMITER)
    assert backend.info.num_parameters > 50_000
    assert backend.render_prompt("a=1;?a")[0] == "<s>a=1;?a\n"


def test_large_model_solves_easy_problems():
    rng = random.Random(123)
    problems = [generate_problem(rng, EASY_CONFIG) for _ in range(8)]
    runner = cascade.embedded_cascade(cascade.AlwaysLarge())
    results = runner.solve_many([p.problem for p in problems])
    assert sum(check_answer(p.problem, r.answer) for p, r in zip(problems, results, strict=False)) >= 7


def test_embedded_trio_solves_with_the_medium_tier():
    # The shipped medium model (issue 11): with a gate that always escalates from the small
    # tier and never from the medium one, the medium model writes every step, and its
    # answers are right (it reached 300/300 on the test split).
    rng = random.Random(7)
    problems = [generate_problem(rng, EASY_CONFIG) for _ in range(8)]
    runner = cascade.embedded_cascade(tiers=("small", "medium", "large"),
                                      gates=[cascade.AlwaysLarge(), cascade.AlwaysSmall()])
    results = runner.solve_many([p.problem for p in problems])
    assert all(s.author == "medium" for r in results for s in r.steps)
    assert sum(check_answer(p.problem, r.answer) for p, r in zip(problems, results, strict=False)) >= 7


def test_default_solve_is_deterministic_and_within_budget():
    problem = "a=17;b=a+38;c=b-25;d=c+a;?d"
    first = cascade.solve(problem, budget=300).to_json()
    second = cascade.solve(problem, budget=300).to_json()

    def without_timing(result: dict) -> dict:
        for step in result["steps"]:
            for usage in step["usage"]:
                usage.pop("seconds")
        for usage in result["cost"]["per_tier"]:
            usage.pop("seconds")
        return result

    assert without_timing(first) == without_timing(second)
    assert first["cost"]["total"] <= 300
    assert first["answer"] is not None
    # b = 17+38 = 55, c = 55-25 = 30, d = 30+17 = 47: the large model alone gets it right.
    assert cascade.solve(problem, gate=cascade.AlwaysLarge()).answer == "47"


def test_tight_budget_is_a_hard_cap():
    problem = "a=17;b=a+38;c=b-25;d=c+a;e=d-9;?e"
    for budget in (0, 5, 20, 40):
        result = cascade.solve(problem, budget=budget, gate=cascade.AlwaysLarge())
        assert result.cost.total <= budget
    assert cascade.solve(problem, budget=5, gate=cascade.AlwaysLarge()).cap_intervened


# Each example's work is bounded by its arguments (problem counts, thresholds, steps), not
# by the clock: the suite runs on busy 2-core machines where the same work takes many times
# longer (calibrate.py at --n 30 with 11 thresholds failed a 300 s limit on a busy machine,
# and had not finished after 16 minutes at load ~15; at load ~20, --n 12 with 3 thresholds
# took 9.7 minutes for 3 CPU minutes). The timeout below is only a hang guard: it costs time
# only when an example hangs.
EXAMPLE_HANG_GUARD_S = 1800


@pytest.mark.parametrize("script,args", [
    ("solve.py", ["a=5;b=a+7;?b", "--budget", "200"]),
    ("calibrate.py", ["--n", "6", "--budget", "60", "--alpha", "0.3", "--delta", "0.3",
                      "--thresholds", "1,0.5,0"]),
    ("benchmark.py", ["--limit", "4", "--out", "{tmp}/bench", "--policies", "small,large,confidence@0.5"]),
    ("train_router.py", ["--n", "40"]),
    ("serve.py", ["a=5;b=a+7;?b", "--budget", "200"]),
    ("budget_curve.py", ["--n", "12", "--budget", "40", "--stream", "6", "--thresholds", "1,0.3,0.15,0.05"]),
])
def test_examples_run(script, args, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = subprocess.run([sys.executable, str(REPO / "examples" / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=EXAMPLE_HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()


# Example problems in the docs: "a=17;b=a+38;c=b-25;?c" and the like (at least one derived variable).
_EXAMPLE = re.compile(r"[a-z]=\d+(?:;[a-z]=[a-z0-9]+[-+*][a-z0-9]+)+;\?[a-z]")



def _documented_examples() -> dict[str, list[str]]:
    files = [REPO / "README.md", REPO / "docs" / "embedded-model-card.md", REPO / "bench" / "tasks.py",
             *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "cascade").glob("*.py")),
             *sorted((REPO / "app").glob("*.py")), *sorted((REPO / "examples").glob("*.py"))]
    found: dict[str, list[str]] = {}
    for path in files:
        name = str(path.relative_to(REPO))
        if not path.exists():
            continue
        for problem in _EXAMPLE.findall(path.read_text()):
            found.setdefault(problem, []).append(name)
    return found


def test_every_documented_example_is_answered_right():
    # Every example problem the docs show is one the shipped pair answers right, solved
    # the way the docs show it (cascade.solve with the default gate). Issue 19: the
    # package docstring's "a=17;b=a*3;c=b-25;?c" answered 2 (right: 26).
    examples = _documented_examples()
    assert "a=17;b=a+38;c=b-25;?c" in examples and "a=42;b=a-17;c=b+a;?c" in examples  # the scan works
    results = cascade.embedded_cascade().solve_many(list(examples))
    wrong = {p: (r.answer, where) for (p, where), r in zip(examples.items(), results, strict=False)
             if not check_answer(p, r.answer)}
    assert not wrong, f"documented examples answered wrong (answer, files): {wrong}"


def test_documented_examples_stay_inside_the_training_format():
    # The model card's format: + and - only, at most 6 derived variables
    # (bench.tasks.DEFAULT_CONFIG); a "*" example would be answered wrong (issue 19).
    from bench.tasks import DEFAULT_CONFIG, parse_problem

    for problem, where in _documented_examples().items():
        definitions, _ = parse_problem(problem)
        derived = [d for _, d in definitions if not d.isdigit()]
        assert "*" not in problem and len(derived) <= DEFAULT_CONFIG.max_steps, (problem, where)
