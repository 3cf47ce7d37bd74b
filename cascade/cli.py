"""The `cascade` command line. Strings become objects here and nowhere else."""

from __future__ import annotations

import argparse
import json
import sys

from cascade.errors import CascadeError
from cascade.gates import GATES, make_gate

__all__ = ["main"]

_COLOURS = {"small": "\033[32m", "medium": "\033[33m", "large": "\033[35m"}
_RESET = "\033[0m"


def _gate_from_args(args) -> object | None:
    if args.gate is None:
        return None
    options = {}
    if args.threshold is not None:
        options["threshold"] = args.threshold
    if args.gate == "confidence":
        options.update(signal=args.signal, mode=args.mode)
    return make_gate(args.gate, **options)


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


def _solve(args) -> int:
    import cascade
    from cascade.runtime import Cascade, SolveOptions

    gate = _gate_from_args(args)
    models = args.models.split(",") if args.models else None
    if models or args.small or args.large:
        if models and (args.small or args.large):
            raise CascadeError("give --models or --small/--large, not both")
        paths = models or [args.small, args.large]
        if any(p is None for p in paths):
            raise CascadeError("--small and --large go together")
        options = SolveOptions(max_steps=args.max_steps or 32, max_step_tokens=args.max_step_tokens or 256)
        runner = Cascade.from_pretrained(models=paths, gate=gate, step_delimiter=args.delimiter,
                                         options=options)
    else:
        runner = cascade.embedded_cascade(gate)
    result = runner.solve(args.problem, budget=args.budget)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_result(result, colour=sys.stdout.isatty())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade", description="Step-level model cascades.")
    commands = parser.add_subparsers(dest="command", required=True)
    solve = commands.add_parser("solve", help="solve one problem and print its trace")
    solve.add_argument("problem", help="problem text (embedded default: e.g. 'a=17;b=a*3;?b')")
    solve.add_argument("--budget", type=float, default=None, help="hard cap in cost units")
    solve.add_argument("--small", help="small model: local path or hub id")
    solve.add_argument("--large", help="large model: local path or hub id")
    solve.add_argument("--models", help="comma-separated models, cheapest first (N tiers)")
    solve.add_argument("--delimiter", default="\n\n", help="step delimiter for --small/--large")
    solve.add_argument("--gate", choices=sorted(GATES), default=None)
    solve.add_argument("--threshold", type=float, default=None)
    solve.add_argument("--signal", default="min_prob", help="confidence signal of --gate confidence")
    solve.add_argument("--mode", default="speculate", choices=["route", "speculate"])
    solve.add_argument("--max-steps", type=int, default=None)
    solve.add_argument("--max-step-tokens", type=int, default=None)
    solve.add_argument("--json", action="store_true", help="print the whole Result as JSON")
    solve.set_defaults(run=_solve)
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
