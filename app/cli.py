"""The `cascade` command line: solve, calibrate, train-router, bench, serve.

The application layer: the one package that imports both `cascade` and `bench`, and the
one that uses argparse. Each subcommand offers only the flags it honours (the shared
groups are in `app.options`); strings become specs there and objects in `cascade.specs`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from transformers.utils import logging as hf_logging

from app.options import (
    add_backend_options,
    add_gate_options,
    add_model_options,
    add_step_options,
    build_runner,
    model_specs_from_args,
    positive_int,
    solve_options,
)
from app.server import add_serve_arguments, run_from_args
from bench import harness
from bench.curve_bench import (
    CURVE_JSON,
    CURVE_MD,
    CURVE_PNG,
    CURVE_SWEEP,
    evaluate_curve,
    write_curve_report,
)
from bench.datasets import load_dataset
from bench.grading import Grader
from bench.progress import progress_printer
from bench.router_data import ExactStepScorer
from calibration import product_grid
from cascade import AdvantageGate, Cascade, CascadeError, ConfidenceGate, ConfigError
from cascade.budget import CURVE_METHODS, calibrate_budget_curve, load_budget_curve
from cascade.calibrate import calibrate, default_thresholds, sweep_file
from cascade.checks import check_budget, check_problem
from cascade.router import collect_router_data, load_router, train_router
from cascade.scorers import LikelihoodScorer, PRMScorer
from cascade.sequence_router import train_sequence_router
from cascade.specs import MODES, ModelSpec, load_model

__all__ = ["bench_command", "build_parser", "main"]

_COLOURS = {"small": "\033[32m", "medium": "\033[33m", "large": "\033[35m"}
_RESET = "\033[0m"
SOLVE_BACKENDS = ("hf", "vllm", "openai", "llamacpp")
BENCH_BACKENDS = ("hf", "vllm", "openai", "llamacpp")
DEFAULT_POLICIES = "small,large,confidence"


def _print_result(result, colour: bool) -> None:
    width = max(len(name) for name in result.tier_names)
    if result.set_aside:  # resolve mode: what the re-solve replaced, then the solve that stands
        solver = result.steps[0].author if result.steps else "?"
        print(f"set aside ({len(result.set_aside)} steps, re-solved by {solver}):")
        for step in result.set_aside:
            print(f"  {step.author.ljust(width)}  {step.text}")
    for step in result.steps:
        tag = step.author.ljust(width)
        if colour:
            tag = _COLOURS.get(step.author, "\033[36m") + tag + _RESET
        confidence = step.confidence.min_prob
        print(f"{tag}  conf={confidence:.2f}  {step.text}")
    cost = result.cost
    per_tier = ", ".join(f"{name}: {u.generated_tokens} tok out / {u.prefill_tokens} in"
                         for name, u in zip(result.tier_names, cost.per_tier, strict=False))
    print(f"answer: {result.answer}")
    print(f"cost: {cost.total:.2f}" + (f" of budget {result.budget:g}" if result.budget is not None else "")
          + f"  escalation rate: {result.escalation_rate:.0%}  ({per_tier})"
          + ("  [hard cap intervened]" if result.cap_intervened else ""))


def _check_output(path: Path, what: str) -> None:
    """Fail before any work when the output file cannot be written where asked."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {str(path)!r}: no directory {str(parent)!r} (create it first)")
    if Path(path).is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a directory; give a file name")


def _solve(args) -> int:
    check_problem(args.problem)  # before loading any model: bad input fails fast
    check_budget(args.budget)
    if args.backend not in SOLVE_BACKENDS:
        raise ConfigError(f"unknown backend {args.backend!r}; valid backends: {', '.join(SOLVE_BACKENDS)}")
    if args.calibration:
        given = [flag for flag, value in (("--small", args.small), ("--large", args.large),
                                          ("--models", args.models), ("--gate", args.gate),
                                          ("--gates", args.gates), ("--threshold", args.threshold),
                                          ("--signal", args.signal), ("--mode", args.mode),
                                          ("--rewrite", args.rewrite), ("--router", args.router),
                                          ("--screen-threshold", args.screen_threshold),
                                          ("--template", args.template), ("--delimiter", args.delimiter))
                 if value is not None]
        if given or args.backend != "hf" or args.isolate:
            given += ["--backend"] * (args.backend != "hf") + ["--isolate"] * args.isolate
            raise ConfigError(f"--calibration names the models and gates itself; it cannot be combined "
                              f"with {', '.join(given)}")
        runner = Cascade.from_calibration(args.calibration)
        specs = [ModelSpec(m["name"]) for m in runner.calibration.models]
        runner.options = solve_options(args, specs)
    else:
        runner = build_runner(args)
    result = runner.solve(args.problem, budget=args.budget)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_result(result, colour=sys.stdout.isatty())
    return 0


def _budgets_and_thresholds(args) -> tuple[list[float] | None, list[float]]:
    """calibrate's --budgets (or --budget; None when neither is given) and --thresholds grid."""
    budgets = None
    if args.budgets or args.budget is not None:
        budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else [args.budget]
    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else default_thresholds()
    return budgets, list(thresholds)


def _calibrate(args) -> int:
    _check_output(args.output, "-o")
    problems = [example.problem for example in load_dataset("jsonl", path=args.problems, limit=args.limit)]
    if args.curve:
        return _calibrate_curve(args, problems)
    budgets, thresholds = _budgets_and_thresholds(args)
    if budgets is None:
        raise CascadeError("give --budget or --budgets")
    runner = build_runner(args)
    if args.grid:  # every combination: one threshold per gate, tested along grid paths
        candidates = [tuple(c) for c in product_grid([thresholds] * len(runner.gates)).tolist()]
    else:
        candidates = [(t,) * len(runner.gates) for t in sorted(set(thresholds), reverse=True)]
    # Resumable: every finished problem's sweep row is appended to <out>.sweep.jsonl.
    swept = sweep_file(runner, problems, candidates, Path(str(args.output) + ".sweep.jsonl"),
                       progress=progress_printer("calibrate"),
                       on_resume=lambda n: print(f"resuming: {n} problems already swept", file=sys.stderr))
    result = calibrate(runner, problems, budgets=budgets, alpha=args.alpha, delta=args.delta,
                       method=args.method, objective=args.objective, candidates=candidates,
                       swept=swept, cost_max=args.cost_max)
    result.save(args.output)
    print(result.summary())
    print(f"wrote {args.output}")
    return 0


def _calibrate_curve(args, problems: list[str]) -> int:
    """calibrate --curve: the accuracy-budget curve, every method side by side (cascade.budget).

    The first --fit-problems problems fit the budget-aware gate (label-free: the small model
    alone); the rest are the calibration problems, so nothing certified was fitted on its own
    problems. Without --budgets the grid runs from the small-only to the large-only mean cost
    of a pilot (the first 20 calibration problems run each way)."""
    if args.method != "ltt" or args.objective != "agreement" or args.cost_max is not None or args.grid:
        raise ConfigError("--curve calibrates every method at once (budget-aware, resolve, risk, conformal, "
                          "ltt) and chooses by agreement; drop --method, --objective, --cost-max and --grid")
    n_fit = args.fit_problems
    if len(problems) < n_fit + 2:
        raise ConfigError(f"--curve needs more than --fit-problems {n_fit} problems (those fit the "
                          f"budget-aware gate, at least 2 more are calibrated on); got {len(problems)}")
    budgets, thresholds = _budgets_and_thresholds(args)
    for b in budgets or []:
        check_budget(b)
    runner = build_runner(args)
    if len(runner.models) != 2:
        raise ConfigError(f"--curve calibrates two-tier cascades, got {len(runner.models)} tiers")
    # The problem-level re-solve needs a gate with a resolve mode (confidence, advantage).
    methods = [m for m in CURVE_METHODS
               if m != "resolve" or isinstance(runner.gates[0], (ConfidenceGate, AdvantageGate))]
    curve = calibrate_budget_curve(runner, problems[n_fit:], budgets=budgets, cap_factor=args.cap_factor,
                                   alpha=args.alpha, delta=args.delta, thresholds=thresholds,
                                   budget_thresholds=thresholds,
                                   # without --thresholds the re-solve grid adds the fitted score
                                   # quantiles, fine enough for a certified threshold to use its budget
                                   resolve_thresholds=thresholds if args.thresholds else None,
                                   methods=methods, fit_problems=problems[:n_fit],
                                   progress=progress_printer("calibrate --curve"))
    payload = curve.to_json() | {
        "models": [{"name": m.info.name, "fingerprint": m.info.fingerprint} for m in runner.models],
        "problems": str(args.problems), "fit_problems": n_fit}
    Path(args.output).write_text(json.dumps(payload, indent=1) + "\n")
    print(curve.summary())
    print(f"wrote {args.output}")
    return 0


_SCORERS = ("exact", "large-likelihood", "prm:PATH")


def _scorer_from_args(args, runner):
    """--scorer: exact (the embedded task's checker), large-likelihood, prm:PATH."""
    if args.scorer == "exact":
        return ExactStepScorer()
    if args.scorer == "large-likelihood":
        return LikelihoodScorer(runner.models[1])
    if args.scorer.startswith("prm:") and len(args.scorer) > 4:
        return PRMScorer.from_pretrained(args.scorer[4:], format=args.prm_format, step_tag=args.step_tag)
    raise CascadeError(f"unknown scorer {args.scorer!r}; choose one of {', '.join(_SCORERS)}")


def _train_router(args) -> int:
    if args.scorer not in ("exact", "large-likelihood") and not args.scorer.startswith("prm:"):
        raise CascadeError(f"unknown scorer {args.scorer!r}; choose one of {', '.join(_SCORERS)}")
    _check_output(args.output, "-o")
    problems = [example.problem for example in load_dataset("jsonl", path=args.problems, limit=args.limit)]
    runner = build_runner(args, gates=False)
    if len(runner.models) != 2:
        raise CascadeError(f"train-router trains a router for one small/large pair; got {len(runner.models)} "
                           "models")
    scorer = _scorer_from_args(args, runner)
    reader = None if args.reader is None else load_model(ModelSpec(args.reader))
    data_path = args.data or Path(str(args.output) + ".data.jsonl")  # resumable: rows appended
    dataset = collect_router_data(runner.models[0], runner.models[1], problems, scorer, data_path,
                                  projection_dim=args.projection_dim, projection_seed=args.seed,
                                  max_steps=runner.options.max_steps,
                                  max_step_tokens=runner.options.max_step_tokens,
                                  skip_perfect=args.tau >= 0,  # a perfect draft cannot be beaten by > tau
                                  reader=reader, progress=progress_printer("train-router"))
    npz = dataset.save(Path(data_path).with_suffix(".npz"))
    if args.router_model == "sequence":
        router = train_sequence_router(dataset, tau=args.tau, holdout=args.holdout, seed=args.seed,
                                       epochs=args.epochs)
    else:
        router = train_router(dataset, tau=args.tau, holdout=args.holdout, seed=args.seed)
    router.save(args.output)
    print(router.summary())
    print(f"wrote {args.output} (dataset: {data_path}, {npz}; {len(dataset)} steps)")
    return 0


def bench_command(args: argparse.Namespace) -> str:
    """The bench command as given (flags with a value), for run.json and the summaries;
    a value with control characters (--delimiter "\\n") is written $'\\n' (bash quoting)."""
    def quote(value: str) -> str:
        if value.isprintable():
            return shlex.quote(value)
        return "$'" + value.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"

    parts = ["cascade", "bench"]
    for flag, value in (("--dataset", args.dataset), ("--path", args.path), ("--policies", args.policies),
                        ("--calibration", args.calibration),
                        *(("--router", router) for router in args.router or ()),
                        ("--threshold", args.threshold),
                        ("--budget", args.budget), ("--limit", args.limit), ("--start", args.start),
                        # the default, hf, is left out: .gguf files run on llamacpp under it
                        ("--backend", None if args.backend == "hf" else args.backend),
                        ("--template", args.template),
                        *(("--endpoints", urls) for urls in args.endpoints or ()),
                        ("--served-models", args.served_models), ("--api-key-env", args.api_key_env),
                        *((("--dtype", args.dtype), ("--gpu-memory", args.gpu_memory),
                           ("--max-model-len", args.max_model_len)) if args.backend == "vllm" else ()),
                        ("--small", args.small), ("--large", args.large), ("--models", args.models),
                        ("--delimiter", args.delimiter), ("--signal", args.signal), ("--mode", args.mode),
                        ("--max-steps", args.max_steps), ("--max-step-tokens", args.max_step_tokens),
                        ("-o", args.output)):
        if value is not None:
            parts += [flag, quote(str(value))]
    for flag, on in (("--no-math-verify", args.no_math_verify), ("--isolate", args.isolate),
                     ("--draft-ahead", args.draft_ahead)):
        if on:
            parts.append(flag)
    return " ".join(parts)


def _bench(args) -> int:
    if args.backend not in BENCH_BACKENDS:
        raise CascadeError(f"unknown backend {args.backend!r}; valid backends: {', '.join(BENCH_BACKENDS)}")
    if args.curve is not None:
        return _bench_curve(args)
    threshold = 0.5 if args.threshold is None else args.threshold
    command = bench_command(args)  # as given
    model_specs_from_args(args)  # backend, endpoint and template errors before anything else
    # Everything that can be checked without models fails before any is loaded.
    harness.parse_policies(args.policies, dataset=args.dataset, threshold=threshold,
                           calibration=args.calibration, budget=args.budget, router=args.router)
    examples = load_dataset(args.dataset, args.limit, args.path)
    runner = build_runner(args, gates=False)  # every backend: one place sets models, limits, draft-ahead
    summary = harness.run_benchmark(
        runner, args.dataset, out_dir=args.output, policies=args.policies, limit=args.limit,
        start=args.start or 0, path=args.path, budget=args.budget, calibration=args.calibration,
        threshold=threshold,
        signal=args.signal or "min_prob", mode=args.mode or "speculate", examples=examples, command=command,
        use_math_verify=not args.no_math_verify, router=args.router)
    print((Path(args.output) / harness.SUMMARY_MD).read_text())
    print(f"wrote {args.output}: {summary['n_rows']} result rows, {harness.SUMMARY_JSON}, "
          f"{harness.SUMMARY_MD}, {', '.join(harness.PLOT_FILES)}")
    return 0


def _bench_curve(args) -> int:
    """bench --curve: every certified point of a curve file and the oracle on labelled problems."""
    given = [flag for flag, value in (("--policies", args.policies != DEFAULT_POLICIES),
                                      ("--calibration", args.calibration), ("--budget", args.budget),
                                      ("--threshold", args.threshold), ("--signal", args.signal),
                                      ("--mode", args.mode), ("--start", args.start)) if value]
    if given:
        raise ConfigError(f"--curve runs the curve's own policies at its budgets; drop {', '.join(given)}")
    command = bench_command(argparse.Namespace(**(vars(args) | {"policies": None}))) \
        + f" --curve {shlex.quote(args.curve)}"
    model_specs_from_args(args)  # backend, endpoint and template errors before anything else
    examples = load_dataset(args.dataset, args.limit, args.path)
    runner = build_runner(args, gates=False)
    if len(runner.models) != 2:
        raise ConfigError(f"--curve measures a two-tier curve, got {len(runner.models)} models")
    curve = load_budget_curve(args.curve, models=runner.models,
                              routers=lambda file: load_router(file, models=runner.models))
    pair = " -> ".join(m.info.name for m in runner.models)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    with Grader(use_math_verify=not args.no_math_verify) as grader:  # resumable: rows kept in -o
        report = evaluate_curve(runner, examples, curve, grader=grader, pair=pair, command=command,
                                progress=progress_printer("bench --curve"),
                                checkpoint=Path(args.output) / CURVE_SWEEP)
    out = write_curve_report(report, args.output)
    print((out / CURVE_MD).read_text())
    print(f"wrote {out}: {CURVE_JSON}, {CURVE_MD}, {CURVE_PNG}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade", description="Step-level model cascades.")
    commands = parser.add_subparsers(dest="command", required=True)
    solve = commands.add_parser("solve", help="solve one problem and print its trace")
    solve.add_argument("problem", help="problem text (embedded default: e.g. 'a=17;b=a+38;?b')")
    solve.add_argument("--budget", type=float, default=None, help="hard cap in cost units")
    add_model_options(solve)
    add_backend_options(solve, SOLVE_BACKENDS)
    add_gate_options(solve)
    add_step_options(solve)
    solve.add_argument("--calibration", help="a calibration file: its models and gates, thresholds looked up "
                       "by --budget (not combined with model or gate flags)")
    solve.add_argument("--json", action="store_true", help="print the whole Result as JSON")
    solve.set_defaults(run=_solve)

    calib = commands.add_parser("calibrate", help="certify gate thresholds on unlabeled problems")
    calib.add_argument("--problems", required=True, help="JSONL with a 'problem' field per line")
    calib.add_argument("--limit", type=positive_int, default=None, help="use the first N problems")
    calib.add_argument("--budget", type=float, default=None, help="budget in cost units")
    calib.add_argument("--budgets", default=None, help="comma-separated grid of budgets")
    calib.add_argument("--alpha", type=float, default=0.1, help="allowed P(cost > budget)")
    calib.add_argument("--delta", type=float, default=0.05, help="LTT: allowed failure probability")
    calib.add_argument("--method", default="ltt", choices=["ltt", "conformal", "risk"])
    calib.add_argument("--objective", default="agreement",
                       choices=["agreement", "max_escalation", "min_cost"])
    calib.add_argument("--thresholds", default=None, help="comma-separated threshold grid")
    calib.add_argument("--grid", action="store_true",
                       help="N-model cascades: candidates are every combination of --thresholds, one "
                            "per gate (default: the same threshold at every gate)")
    calib.add_argument("--cost-max", type=float, default=None, help="method risk: cost upper bound")
    calib.add_argument("--curve", action="store_true",
                       help="the accuracy-budget curve: at each budget (--budgets, default a grid from "
                            "small-only to large-only cost), the policy each method certifies (budget-aware "
                            "under a hard cap, one threshold by risk control, conformal, LTT) and its "
                            "agreement with the large model")
    calib.add_argument("--fit-problems", type=positive_int, default=20,
                       help="--curve: the first N problems fit the budget-aware gate (the rest calibrate)")
    calib.add_argument("--cap-factor", type=float, default=3.0,
                       help="--curve: the budget-aware policy runs each request under the hard cap "
                            "cap-factor x budget")
    calib.add_argument("-o", "--output", required=True, type=Path, help="calibration JSON to write")
    add_model_options(calib)
    add_gate_options(calib, threshold=False)  # the thresholds are what calibration chooses
    add_step_options(calib)
    calib.set_defaults(run=_calibrate)

    router = commands.add_parser("train-router", help="train an advantage router (when is the large "
                                 "model's step meaningfully better?)")
    router.add_argument("--problems", required=True, help="JSONL of training problems ('problem' field)")
    router.add_argument("--scorer", required=True, help="step scorer: exact (embedded task), "
                        "large-likelihood, or prm:PATH (a process reward model, local path or hub id)")
    router.add_argument("--prm-format", default="auto", choices=["auto", "step-tag", "reward-head"])
    router.add_argument("--step-tag", default=None, help="the step tag of a step-tag PRM")
    router.add_argument("--tau", type=float, default=0.0,
                        help="label = score(large) - score(small) > tau")
    router.add_argument("--limit", type=positive_int, default=None, help="use the first N problems")
    router.add_argument("--holdout", type=float, default=0.2, help="held-out fraction of the problems")
    router.add_argument("--router-model", default="logistic", choices=["logistic", "sequence"],
                        help="logistic: regression on the draft's summary features; sequence: a small "
                             "bi-GRU over the draft's tokens plus those features (cascade.sequence_router)")
    router.add_argument("--epochs", type=positive_int, default=8,
                        help="training passes of the sequence router")
    router.add_argument("--reader", default=None,
                        help="a model cheaper than the large one (path, hub id or embedded:<tier>) whose "
                             "log-probabilities of each draft the router also reads")
    router.add_argument("--projection-dim", type=positive_int, default=16,
                        help="hidden-state projection size")
    router.add_argument("--seed", type=int, default=0, help="projection and held-out split seed")
    router.add_argument("--data", type=Path, default=None,
                        help="collected rows (JSONL, resumable; default <output>.data.jsonl)")
    router.add_argument("-o", "--output", required=True, type=Path, help="router file to write (.pt)")
    add_model_options(router)  # no gate flags: the router is trained on every step, whatever a gate says
    add_step_options(router, draft_ahead=False)
    router.set_defaults(run=_train_router)

    bench = commands.add_parser("bench", help="benchmark gate policies on a dataset (resumable)")
    bench.add_argument("--dataset", default="embedded",
                       help="embedded, gsm8k, math500, aime24, aime25, jsonl (with --path) "
                            "or hf:<id>[:<config>]")
    bench.add_argument("--path", default=None, help="the JSONL file of --dataset jsonl")
    bench.add_argument("--policies", default=DEFAULT_POLICIES,
                       help="comma-separated: small, large, confidence[:SIGNAL][:MODE][@T], verify[@T], "
                            "verify-ahead, verify-fix, advantage[@T] (with --router), advantage:NAME[@T] "
                            "(with --router NAME=FILE), verify:NAME=S[@T] (screened), oracle (embedded "
                            "only), calibrated (with --calibration and --budget) or calibrated@B (its own "
                            "budget B, cost units; several side by side); T1/T2 for one "
                            "threshold per gate")
    bench.add_argument("--calibration", default=None, help="calibration file of the 'calibrated' policy")
    bench.add_argument("--curve", default=None, metavar="FILE",
                       help="instead of --policies: an accuracy-budget curve (cascade calibrate --curve); "
                            "every method's certified policy at every budget measured side by side, with "
                            "the label-using oracle, into curve.json, curve.md and budget_curve.png")
    bench.add_argument("--router", action="append", default=None, metavar="[NAME=]FILE",
                       help="router file of the 'advantage' policies (train-router); NAME=FILE for the "
                            "'advantage:NAME' policies, repeatable to run routers side by side")
    bench.add_argument("--threshold", type=float, default=None,
                       help="threshold of the policies named without @T (default 0.5)")
    bench.add_argument("--signal", default=None, help="signal of the confidence policies (default min_prob)")
    bench.add_argument("--mode", default=None, choices=MODES,
                       help="mode of the confidence policies (default speculate)")
    bench.add_argument("--budget", type=float, default=None, help="hard cap per problem, in cost units")
    bench.add_argument("--limit", type=positive_int, default=None, help="the first N problems")
    bench.add_argument("--start", type=positive_int, default=None,
                       help="skip the first K of them (a second process runs problems K.. of the same "
                            "dataset into its own directory; bench.paired merges the directories)")
    add_model_options(bench)
    add_backend_options(bench, BENCH_BACKENDS)
    add_step_options(bench)
    bench.add_argument("--no-math-verify", action="store_true",
                       help="grade math answers by normalized comparison only")
    bench.add_argument("-o", "--output", required=True, type=Path,
                       help="output directory (re-run the same command to resume)")
    bench.set_defaults(run=_bench)

    serve = commands.add_parser("serve", help="serve the cascade as an OpenAI-compatible model over HTTP")
    add_model_options(serve)
    add_gate_options(serve, gates=False)  # one gate for every position
    add_step_options(serve)
    add_serve_arguments(serve)
    serve.set_defaults(run=run_from_args)
    return parser


# Flags a subcommand does not offer, which users bring from another one: what to do instead.
_NOT_OFFERED = {
    ("bench", "--gate"): "bench names its gates with --policies (e.g. small,large,confidence@0.3; "
                         "confidence@0.3/0.5 for one threshold per gate), not --gate/--gates",
    ("bench", "--gates"): "bench names its gates with --policies (e.g. small,large,confidence@0.3; "
                          "confidence@0.3/0.5 for one threshold per gate), not --gate/--gates",
    ("bench", "--rewrite"): "bench names token fixes as the policy verify-fix",
    ("train-router", "--gate"): "train-router reads every step of both models, whatever a gate would "
                                "decide: it takes no gate, threshold or rewrite",
    ("train-router", "--threshold"): "train-router reads every step of both models, whatever a gate would "
                                     "decide: it takes no gate, threshold or rewrite",
    ("train-router", "--rewrite"): "train-router reads every step of both models, whatever a gate would "
                                   "decide: it takes no gate, threshold or rewrite",
    ("serve", "--gates"): "serve takes one --gate for every position",
}


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # a flag this subcommand does not offer: say so, and what it takes instead
        flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
        hints = [_NOT_OFFERED[(args.command, f)] for f in flags if (args.command, f) in _NOT_OFFERED]
        print(f"cascade {args.command}: error: unrecognized arguments: {' '.join(unknown)}"
              + (f"; {hints[0]}" if hints else f" (see cascade {args.command} --help)"), file=sys.stderr)
        return 2
    hf_logging.disable_progress_bar()  # weight-loading bars would drown the trace
    try:
        return args.run(args)
    except (CascadeError, ValueError) as error:
        print(f"cascade {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
