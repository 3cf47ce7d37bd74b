"""The `cascade` command line. Strings become objects here and nowhere else."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from cascade.errors import CascadeError
from cascade.gates import GATES, make_gate

__all__ = ["main", "progress_printer"]

_COLOURS = {"small": "\033[32m", "medium": "\033[33m", "large": "\033[35m"}
_RESET = "\033[0m"


def _router_from_args(args):
    """The router of --gate advantage (--router FILE). The cascade checks it against the
    models once they are loaded."""
    from cascade.router import load_router

    if getattr(args, "router", None) is None:
        raise CascadeError("--gate advantage needs --router FILE (a router made by cascade train-router)")
    return load_router(args.router)


def gate_from_args(args: argparse.Namespace) -> object | None:
    """The gate that --gate and its settings name (None without --gate); CLI and serve."""
    if args.gate is None:
        if getattr(args, "router", None) is not None and getattr(args, "gates", None) is None:
            raise CascadeError("--router is the router of --gate advantage; give --gate advantage")
        return None
    options = {}
    if args.threshold is not None:
        options["threshold"] = args.threshold
    if args.gate == "confidence":
        options.update(signal=args.signal, mode=args.mode)
    screen_threshold = getattr(args, "screen_threshold", None)
    if args.gate == "advantage":
        options["router"] = _router_from_args(args)
    elif args.gate == "verify" and (screen_threshold is not None or getattr(args, "router", None) is not None):
        if screen_threshold is None:
            raise CascadeError("--gate verify with --router screens drafts: give --screen-threshold S too")
        options.update(screen=_router_from_args(args), screen_threshold=screen_threshold)
    elif getattr(args, "router", None) is not None:
        raise CascadeError(f"--router is the router of --gate advantage (or the screen of --gate verify), "
                           f"not of --gate {args.gate}")
    if screen_threshold is not None and args.gate != "verify":
        raise CascadeError(f"--screen-threshold is a setting of --gate verify, not of --gate {args.gate}")
    if getattr(args, "rewrite", None) is not None:
        if args.gate != "verify":
            raise CascadeError(f"--rewrite is a setting of --gate verify, not of --gate {args.gate}")
        options["rewrite"] = args.rewrite
    return make_gate(args.gate, **options)


def _gates_from_args(args, gate) -> list | None:
    """--gates NAME[@T],NAME[@T],...: one gate per position of an N-model cascade."""
    spec = getattr(args, "gates", None)
    if spec is None:
        return None
    if gate is not None:
        raise CascadeError("give --gate or --gates, not both")
    if args.threshold is not None:
        raise CascadeError("--threshold sets the threshold of --gate; with --gates write NAME@THRESHOLD "
                           "(e.g. --gates confidence@0.3,confidence@0.5)")
    gates, router = [], None
    for item in spec.split(","):
        name, at, value = item.strip().partition("@")
        options: dict = {}
        if at:
            try:
                options["threshold"] = float(value)
            except ValueError:
                raise CascadeError(f"bad threshold in --gates item {item!r}: {value!r} is not a number") from None
        if name == "confidence":
            options.update(signal=args.signal, mode=args.mode)
        if name == "advantage":
            router = router or _router_from_args(args)  # one router file, read once, for every advantage gate
            options["router"] = router
        gates.append(make_gate(name, **options))
    return gates


def _model_count(args) -> int:
    """How many models the model options name (before loading any)."""
    return len(args.models.split(",")) if args.models else 2


def _print_result(result, colour: bool) -> None:
    width = max(len(name) for name in result.tier_names)
    for step in result.steps:
        tag = step.author.ljust(width)
        if colour:
            tag = _COLOURS.get(step.author, "\033[36m") + tag + _RESET
        confidence = step.confidence.min_prob
        print(f"{tag}  conf={confidence:.2f}  {step.text}")
    cost = result.cost
    per_tier = ", ".join(f"{name}: {u.generated_tokens} tok out / {u.prefill_tokens} in"
                         for name, u in zip(result.tier_names, cost.per_tier))
    print(f"answer: {result.answer}")
    print(f"cost: {cost.total:.2f}" + (f" of budget {result.budget:g}" if result.budget is not None else "")
          + f"  escalation rate: {result.escalation_rate:.0%}  ({per_tier})"
          + ("  [hard cap intervened]" if result.cap_intervened else ""))


def _build_cascade(args, gate):
    import cascade
    from cascade.runtime import Cascade, SolveOptions

    models = [m.strip() for m in args.models.split(",")] if args.models else None
    gates = _gates_from_args(args, gate)
    isolate = getattr(args, "isolate", False)
    if gates is not None and len(gates) != _model_count(args) - 1:
        n = _model_count(args)
        raise CascadeError(f"--gates names {len(gates)} gate(s) for {n} models; {n} models need {n - 1} "
                           "(one between each model and the next)")
    if models and any(m.startswith("embedded:") for m in models):
        if not all(m.startswith("embedded:") for m in models) or args.small or args.large:
            raise CascadeError("embedded:<tier> models cannot be mixed with other models; "
                               f"got --models {args.models}")
        tiers = tuple(m.split(":", 1)[1] for m in models)
        runner = cascade.embedded_cascade(None if gates else gate, tiers=tiers, gates=gates, isolate=isolate)
    elif models or args.small or args.large:
        if models and (args.small or args.large):
            raise CascadeError("give --models or --small/--large, not both")
        paths = models or [args.small, args.large]
        if any(p is None for p in paths):
            raise CascadeError("--small and --large go together")
        options = SolveOptions(max_steps=args.max_steps or 32, max_step_tokens=args.max_step_tokens or 256)
        runner = Cascade.from_pretrained(models=paths, gate=None if gates else gate, gates=gates,
                                         step_delimiter=args.delimiter,
                                         prompt_template=getattr(args, "prompt_template", None),
                                         options=options, isolate=isolate)
    else:
        runner = cascade.embedded_cascade(None if gates else gate, gates=gates, isolate=isolate)
    if getattr(args, "draft_ahead", False):
        runner.options = dataclasses.replace(runner.options, draft_ahead=True)
    return runner


def progress_printer(label: str, unit: str = "problems"):
    """A progress callback (done, total) that prints a bar, elapsed time and an ETA to stderr."""
    started = time.time()
    width = 20

    def report(done: int, total: int) -> None:
        elapsed = time.time() - started
        eta = f"{elapsed / done * (total - done):.0f}s" if done else "?"
        end = "\n" if done == total else ""
        filled = width * done // total if total else width
        bar = "#" * filled + "-" * (width - filled)
        percent = 100 * done // total if total else 100
        print(f"\r{label}: {done}/{total} {unit} [{bar}] {percent}%, {elapsed:.0f}s elapsed, eta {eta}   ",
              end=end, file=sys.stderr, flush=True)
    return report


def _solve(args) -> int:
    from cascade.checks import check_budget, check_problem
    from cascade.runtime import Cascade

    check_problem(args.problem)  # before loading any model: bad input fails fast
    check_budget(args.budget)
    if args.calibration:
        runner = Cascade.from_calibration(args.calibration)
    else:
        runner = _build_cascade(args, gate_from_args(args))
    result = runner.solve(args.problem, budget=args.budget)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_result(result, colour=sys.stdout.isatty())
    return 0


def _calibrate(args) -> int:
    from bench.datasets import load_dataset
    from calibration import product_grid
    from cascade.calibrate import calibrate, default_thresholds, sweep_file

    problems = [example.problem for example in load_dataset("jsonl", path=args.problems, limit=args.limit)]
    runner = _build_cascade(args, gate_from_args(args))
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else [args.budget]
    if budgets == [None]:
        raise CascadeError("give --budget or --budgets")
    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else default_thresholds()
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


_SCORERS = ("exact", "large-likelihood", "prm:PATH")


def _scorer_from_args(args, runner):
    """--scorer: exact (the embedded task's checker), large-likelihood, prm:PATH."""
    from cascade.scorers import LikelihoodScorer, PRMScorer

    if args.scorer == "exact":
        from bench.router_data import ExactStepScorer

        return ExactStepScorer()
    if args.scorer == "large-likelihood":
        return LikelihoodScorer(runner.models[1])
    if args.scorer.startswith("prm:") and len(args.scorer) > 4:
        return PRMScorer.from_pretrained(args.scorer[4:], format=args.prm_format, step_tag=args.step_tag)
    raise CascadeError(f"unknown scorer {args.scorer!r}; choose one of {', '.join(_SCORERS)}")


def _train_router(args) -> int:
    from bench.datasets import load_dataset
    from cascade.router import collect_router_data, train_router

    if args.scorer not in ("exact", "large-likelihood") and not args.scorer.startswith("prm:"):
        raise CascadeError(f"unknown scorer {args.scorer!r}; choose one of {', '.join(_SCORERS)}")
    problems = [example.problem for example in load_dataset("jsonl", path=args.problems, limit=args.limit)]
    runner = _build_cascade(args, None)
    if len(runner.models) != 2:
        raise CascadeError(f"train-router trains a router for one small/large pair; got {len(runner.models)} models")
    scorer = _scorer_from_args(args, runner)
    reader = None
    if args.reader is not None:
        from cascade.runtime import _load_named

        reader = _load_named(args.reader)
    data_path = args.data or Path(str(args.output) + ".data.jsonl")  # resumable: rows appended
    dataset = collect_router_data(runner.models[0], runner.models[1], problems, scorer, data_path,
                                  projection_dim=args.projection_dim, projection_seed=args.seed,
                                  max_steps=runner.options.max_steps,
                                  max_step_tokens=runner.options.max_step_tokens,
                                  skip_perfect=args.tau >= 0,  # a perfect draft cannot be beaten by > tau
                                  reader=reader, progress=progress_printer("train-router"))
    npz = dataset.save(Path(data_path).with_suffix(".npz"))
    if args.router_model == "sequence":
        from cascade.sequence_router import train_sequence_router

        router = train_sequence_router(dataset, tau=args.tau, holdout=args.holdout, seed=args.seed,
                                       epochs=args.epochs)
    else:
        router = train_router(dataset, tau=args.tau, holdout=args.holdout, seed=args.seed)
    router.save(args.output)
    print(router.summary())
    print(f"wrote {args.output} (dataset: {data_path}, {npz}; {len(dataset)} steps)")
    return 0


def _bench_command(args) -> str:
    """The bench command as given (flags with a value), for run.json and the summaries;
    a value with control characters (--delimiter "\\n") is written $'\\n' (bash quoting)."""
    import shlex

    def quote(value: str) -> str:
        if value.isprintable():
            return shlex.quote(value)
        return "$'" + value.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"

    parts = ["cascade", "bench"]
    for flag, value in (("--dataset", args.dataset), ("--path", args.path), ("--policies", args.policies),
                        ("--calibration", args.calibration),
                        *(("--router", router) for router in args.router or ()),
                        ("--threshold", args.threshold),
                        ("--budget", args.budget), ("--limit", args.limit), ("--backend", args.backend),
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
    from bench import harness
    from bench.datasets import load_dataset

    if args.backend not in _BENCH_BACKENDS:
        raise CascadeError(f"unknown backend {args.backend!r}; valid backends: {', '.join(_BENCH_BACKENDS)}")
    if args.backend == "openai" and not args.endpoints:
        raise CascadeError("--backend openai needs --endpoints URL[,URL...] once per model, cheapest first "
                           "(e.g. --endpoints http://127.0.0.1:8000 --endpoints http://127.0.0.1:8001)")
    if args.backend != "openai" and (args.endpoints or args.served_models):
        raise CascadeError("--endpoints and --served-models are for --backend openai")
    if args.gate is not None or args.gates is not None:
        raise CascadeError("bench names its gates with --policies (e.g. small,large,confidence@0.3; "
                           "confidence@0.3/0.5 for one threshold per gate), not --gate/--gates")
    threshold = 0.5 if args.threshold is None else args.threshold
    command = _bench_command(args)  # as given: before the template fills in its delimiter
    _apply_template(args)
    # Everything that can be checked without models fails before any is loaded.
    harness.parse_policies(args.policies, dataset=args.dataset, threshold=threshold,
                           calibration=args.calibration, budget=args.budget, router=args.router)
    examples = load_dataset(args.dataset, args.limit, args.path)
    runner = _bench_cascade(args)
    summary = harness.run_benchmark(
        runner, args.dataset, out_dir=args.output, policies=args.policies, limit=args.limit,
        path=args.path, budget=args.budget, calibration=args.calibration, threshold=threshold,
        signal=args.signal, mode=args.mode, examples=examples, command=command,
        use_math_verify=not args.no_math_verify, router=args.router)
    print((Path(args.output) / harness.SUMMARY_MD).read_text())
    print(f"wrote {args.output}: {summary['n_rows']} result rows, {harness.SUMMARY_JSON}, "
          f"{harness.SUMMARY_MD}, {', '.join(harness.PLOT_FILES)}")
    return 0


_BENCH_BACKENDS = ("hf", "vllm", "openai")


def _external_models(args) -> bool:
    """Do the model options name models other than the shipped embedded pair?"""
    models = [m.strip() for m in args.models.split(",")] if args.models else []
    return bool(args.small or args.large or any(not m.startswith("embedded:") for m in models))


def _bench_cascade(args):
    """The cascade `bench` runs on: `_build_cascade` for --backend hf; for vllm / openai
    the same model paths (or the embedded pair's directories), delimiter, prompt template
    and step limits, served by a `decoding.VLLMBackend` / `decoding.OpenAIBackend`."""
    if args.backend == "hf":
        return _build_cascade(args, None)
    if args.isolate:
        raise CascadeError(f"--isolate runs HF models in processes of their own; --backend {args.backend} "
                           "engines run outside this process already")
    import cascade
    import decoding
    from cascade.runtime import Cascade, SolveOptions

    if _external_models(args):
        paths = [m.strip() for m in args.models.split(",")] if args.models else [args.small, args.large]
        if any(p is None for p in paths):
            raise CascadeError("--small and --large go together")
        names = [str(p) for p in paths]
        options = SolveOptions(max_steps=args.max_steps or 32, max_step_tokens=args.max_step_tokens or 256)
    else:
        tiers = [m.split(":", 1)[1] for m in args.models.split(",")] if args.models else ["small", "large"]
        paths = [cascade.embedded_path(t) for t in tiers]
        names = [f"embedded:{t}" for t in tiers]  # as the hf path names them: calibrations match
        options = SolveOptions(max_steps=args.max_steps or cascade.EMBEDDED_MAX_STEPS,
                               max_step_tokens=args.max_step_tokens or cascade.EMBEDDED_MAX_STEP_TOKENS)
    common = {"step_delimiter": args.delimiter, "prompt_template": getattr(args, "prompt_template", None)}
    if args.backend == "vllm":
        shares = ([float(x) for x in args.gpu_memory.split(",")] if args.gpu_memory
                  else [0.9 / len(paths)] * len(paths))
        if len(shares) != len(paths):
            raise CascadeError(f"--gpu-memory gives {len(shares)} fractions for {len(paths)} models")
        models = [decoding.VLLMBackend.from_pretrained(p, name=n, dtype=args.dtype, gpu_memory_utilization=g,
                                                       max_model_len=args.max_model_len, **common)
                  for p, n, g in zip(paths, names, shares)]
    else:
        if len(args.endpoints) != len(paths):
            raise CascadeError(f"--endpoints is given {len(args.endpoints)} time(s) for {len(paths)} models: "
                               "once per model, cheapest first")
        served = [m.strip() for m in args.served_models.split(",")] if args.served_models else names
        if len(served) != len(paths):
            raise CascadeError(f"--served-models names {len(served)} models for {len(paths)}")
        api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
        models = [decoding.OpenAIBackend.from_model_dir(p, [u.strip() for u in urls.split(",")], m, name=n,
                                                        api_key=api_key, **common)
                  for p, urls, m, n in zip(paths, args.endpoints, served, names)]
    return Cascade(models=models, options=options)


def _apply_template(args) -> None:
    """--template: the prompt format and (unless --delimiter is given) the step delimiter."""
    from bench.prompts import get_template

    external = _external_models(args)
    name = args.template or ("chat" if external else "embedded")
    template = get_template(name)
    if not external and name != "embedded":
        raise CascadeError(f"--template {name} needs --small/--large (or --models); the embedded pair "
                           "only reads its own prompt (--template embedded)")
    if external and name == "embedded":
        raise CascadeError("--template embedded is the shipped pair's own prompt; leave out --small/--large "
                           "to use the embedded pair")
    args.prompt_template = template.format
    if args.delimiter is None:
        args.delimiter = template.delimiter


def _add_model_options(parser: argparse.ArgumentParser, router: bool = True) -> None:
    parser.add_argument("--small", help="small model: local path or hub id")
    parser.add_argument("--large", help="large model: local path or hub id")
    parser.add_argument("--models", help="comma-separated models, cheapest first (N tiers)")
    parser.add_argument("--delimiter", default="\n\n", help="step delimiter for --small/--large")
    parser.add_argument("--isolate", action="store_true",
                        help="hf backend: run every model above the first in a process of its own "
                             "(decoding.ProcessBackend), so concurrent requests use a core per model")
    parser.add_argument("--gate", choices=sorted(GATES), default=None)
    parser.add_argument("--gates", default=None,
                        help="one gate per position, comma-separated NAME[@THRESHOLD] (N models need "
                             "N - 1), e.g. confidence@0.3,confidence@0.5")
    parser.add_argument("--threshold", type=float, default=None)
    if router:  # (bench names its routers itself; train-router writes one)
        parser.add_argument("--router", default=None, type=Path,
                            help="--gate advantage: its router file (cascade train-router); refused for "
                                 "models it was not trained for. With --gate verify: the screen")
        parser.add_argument("--screen-threshold", type=float, default=None,
                            help="--gate verify --router FILE: verify only drafts the router gives "
                                 "P(large better) >= this")
    parser.add_argument("--signal", default="min_prob", help="confidence signal of --gate confidence")
    parser.add_argument("--mode", default="speculate", choices=["route", "speculate"])
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--max-step-tokens", type=int, default=None)
    parser.add_argument("--rewrite", choices=["step", "token"], default=None,
                        help="--gate verify: a rejected draft is rewritten by the large model "
                             "(step, the default) or corrected at its first wrong token (token)")
    parser.add_argument("--draft-ahead", action="store_true",
                        help="the small model drafts the next step while the large one verifies "
                             "(SolveOptions.draft_ahead; saves time with --isolate)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade", description="Step-level model cascades.")
    commands = parser.add_subparsers(dest="command", required=True)
    solve = commands.add_parser("solve", help="solve one problem and print its trace")
    solve.add_argument("problem", help="problem text (embedded default: e.g. 'a=17;b=a*3;?b')")
    solve.add_argument("--budget", type=float, default=None, help="hard cap in cost units")
    _add_model_options(solve)
    solve.add_argument("--calibration", help="a calibration file: thresholds looked up by --budget")
    solve.add_argument("--json", action="store_true", help="print the whole Result as JSON")
    solve.set_defaults(run=_solve)

    calib = commands.add_parser("calibrate", help="certify gate thresholds on unlabeled problems")
    calib.add_argument("--problems", required=True, help="JSONL with a 'problem' field per line")
    calib.add_argument("--limit", type=int, default=None, help="use the first N problems")
    calib.add_argument("--budget", type=float, default=None, help="budget in cost units")
    calib.add_argument("--budgets", default=None, help="comma-separated grid of budgets")
    calib.add_argument("--alpha", type=float, default=0.1, help="allowed P(cost > budget)")
    calib.add_argument("--delta", type=float, default=0.05, help="LTT: allowed failure probability")
    calib.add_argument("--method", default="ltt", choices=["ltt", "conformal", "risk"])
    calib.add_argument("--objective", default="agreement", choices=["agreement", "max_escalation", "min_cost"])
    calib.add_argument("--thresholds", default=None, help="comma-separated threshold grid")
    calib.add_argument("--grid", action="store_true",
                       help="N-model cascades: candidates are every combination of --thresholds, one "
                            "per gate (default: the same threshold at every gate)")
    calib.add_argument("--cost-max", type=float, default=None, help="method risk: cost upper bound")
    calib.add_argument("-o", "--output", required=True, type=Path, help="calibration JSON to write")
    _add_model_options(calib)
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
    router.add_argument("--limit", type=int, default=None, help="use the first N problems")
    router.add_argument("--holdout", type=float, default=0.2, help="held-out fraction of the problems")
    router.add_argument("--router-model", default="logistic", choices=["logistic", "sequence"],
                        help="logistic: regression on the draft's summary features; sequence: a small "
                             "bi-GRU over the draft's tokens plus those features (cascade.sequence_router)")
    router.add_argument("--epochs", type=int, default=8, help="training passes of the sequence router")
    router.add_argument("--reader", default=None,
                        help="a model cheaper than the large one (path, hub id or embedded:<tier>) whose "
                             "log-probabilities of each draft the router also reads")
    router.add_argument("--projection-dim", type=int, default=16, help="hidden-state projection size")
    router.add_argument("--seed", type=int, default=0, help="projection and held-out split seed")
    router.add_argument("--data", type=Path, default=None,
                        help="collected rows (JSONL, resumable; default <output>.data.jsonl)")
    router.add_argument("-o", "--output", required=True, type=Path, help="router file to write (.pt)")
    _add_model_options(router, router=False)
    router.set_defaults(run=_train_router)

    bench = commands.add_parser("bench", help="benchmark gate policies on a dataset (resumable)")
    bench.add_argument("--dataset", default="embedded",
                       help="embedded, gsm8k, math500, aime24, aime25, jsonl (with --path) "
                            "or hf:<id>[:<config>]")
    bench.add_argument("--path", default=None, help="the JSONL file of --dataset jsonl")
    bench.add_argument("--policies", default="small,large,confidence",
                       help="comma-separated: small, large, confidence[@T], verify[@T], advantage[@T] (with "
                            "--router), advantage:NAME[@T] (with --router NAME=FILE), oracle (embedded "
                            "only), calibrated (with --calibration and --budget)")
    bench.add_argument("--calibration", default=None, help="calibration file of the 'calibrated' policy")
    bench.add_argument("--router", action="append", default=None, metavar="[NAME=]FILE",
                       help="router file of the 'advantage' policies (train-router); NAME=FILE for the "
                            "'advantage:NAME' policies, repeatable to run routers side by side")
    bench.add_argument("--budget", type=float, default=None, help="hard cap per problem, in cost units")
    bench.add_argument("--limit", type=int, default=None, help="the first N problems")
    bench.add_argument("--backend", default="hf",
                       help="hf: transformers in this process; vllm: an in-process vLLM engine per model; "
                            "openai: OpenAI-compatible servers (--endpoints)")
    bench.add_argument("--endpoints", action="append", default=None, metavar="URL[,URL...]",
                       help="--backend openai: base URLs of one model's servers (several = replicas, round "
                            "robin); give it once per model, cheapest first")
    bench.add_argument("--served-models", default=None,
                       help="--backend openai: comma-separated served model names (default: the model "
                            "paths as given, which is what `vllm serve PATH` serves them as)")
    bench.add_argument("--api-key-env", default=None,
                       help="--backend openai: the environment variable holding the API key")
    bench.add_argument("--dtype", default="auto", help="--backend vllm: weight dtype (auto, bfloat16, ...)")
    bench.add_argument("--gpu-memory", default=None,
                       help="--backend vllm: comma-separated GPU memory fraction per model "
                            "(default: 0.9 split evenly)")
    bench.add_argument("--max-model-len", type=int, default=4096,
                       help="--backend vllm: tokens of prompt + solution one request may hold")
    bench.add_argument("--template", default=None,
                       help="prompt template of --small/--large: qwen25-math-cot, plain, chat (the "
                            "tokenizer's chat template; default) or embedded (the shipped pair); sets the "
                            "step delimiter unless --delimiter is given")
    bench.add_argument("--no-math-verify", action="store_true",
                       help="grade math answers by normalized comparison only")
    bench.add_argument("-o", "--output", required=True, type=Path,
                       help="output directory (re-run the same command to resume)")
    _add_model_options(bench, router=False)  # --threshold: of confidence/verify named without @T (default 0.5)
    bench.set_defaults(run=_bench, delimiter=None)  # None: the --template's delimiter

    from cascade.server import add_serve_arguments, run_from_args

    serve = commands.add_parser("serve", help="serve the cascade as an OpenAI-compatible model over HTTP")
    _add_model_options(serve)
    add_serve_arguments(serve)
    serve.set_defaults(run=run_from_args, delimiter=None)  # None: "\n\n", or the embedded pair's own
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would drown the trace
    try:
        return args.run(args)
    except (CascadeError, ValueError) as error:
        print(f"cascade {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
