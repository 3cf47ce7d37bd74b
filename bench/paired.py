"""Paired figures of a benchmark run: each policy against small-only and large-only on the
same problems, with paired bootstrap intervals.

    python -m bench.paired runs/real_pair/gsm8k_test -o runs/real_pair/gsm8k_test/paired
    python -m bench.paired RUN_A RUN_B --alias "calibrated@400=confidence:mean_prob@0.2" -o OUT
    python -m bench.paired RUN --target-gap 0.7 --target-wall 0.6 --target-cost 0.5 --headroom -o OUT

A run may be partial (stopped, to be resumed) or spread over several directories (policies
added in a second run over the same problems): rows are merged by (problem id, policy), and
every figure is over the problems on which *every* listed policy has a graded row, so the
policies are compared on the same problems. Per policy:

- gap recovered = (acc(policy) - acc(small)) / (acc(large) - acc(small)),
- wall ratio = total wall seconds of the policy / those of large (same problems, same run),
- cost ratio = the same for cost,

each with a 95 % percentile interval from resampling the problems (pairs kept together:
one draw picks a problem for every policy at once). Bootstrap draws in which large and
small score the same have no gap to recover and are left out (their number is reported).
`--alias NAME=POLICY` lists POLICY's rows again under NAME: a calibrated policy whose
certified threshold is one of the run's policies runs exactly those steps.

What a target asks of the pair itself: `clairvoyant_frontier` is the gap a router that
knows each problem's outcome in advance recovers at each wall ratio, sending to large
exactly the problems large solves and small does not (fewest extra seconds first) and
everything else to small. When it needs more than the wall target to reach the gap
target, no gate of this pair can meet both on these problems with problem-level routing,
and a step-level cascade, which also pays for the small model's drafts, hardly can either.

And short of clairvoyance: `--headroom` (`signal_headroom`) says what the best threshold on
a problem-level score of AUROC 0.6 ... 0.9 for "large solves it and small does not" would
recover within the wall and cost targets, routing the problem or re-solving it, so that a
pair's frontier comes with the router quality it would take to meet them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["clairvoyant_cost_summary", "clairvoyant_frontier", "clairvoyant_summary", "paired_figures",
           "format_interval", "main", "routed_gap", "signal_headroom"]


HEADROOM_AUROCS = (0.6, 0.7, 0.8, 0.9, 1.0)  # the scores `--headroom` asks about (1: the clairvoyant)


class PairedError(ValueError):
    """The rows cannot be compared as asked (a policy missing, no common problems)."""


def _table(rows: Sequence[dict], policies: Sequence[str]) -> tuple[list[str], dict[str, dict[str, dict]]]:
    by_policy: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row.get("correct") is None:
            continue
        by_policy.setdefault(row["policy"], {}).setdefault(row["id"], row)  # first row counts
    missing = [p for p in policies if p not in by_policy]
    if missing:
        raise PairedError(f"no graded rows for {', '.join(missing)}; "
                          f"the rows hold {', '.join(sorted(by_policy))}")
    common = set.intersection(*(set(by_policy[p]) for p in policies))
    if not common:
        raise PairedError(f"no problem has a graded row for every one of {', '.join(policies)}")
    ids = [i for i in dict.fromkeys(row["id"] for row in rows) if i in common]  # the run's own order
    return ids, by_policy


def clairvoyant_frontier(small_correct: np.ndarray, large_correct: np.ndarray, small_wall: np.ndarray,
                         large_wall: np.ndarray, *, keeps_small: bool = False) -> list[tuple[float, float]]:
    """(ratio vs large, gap recovered) after routing 0, 1, 2, ... problems to large: only
    those large solves and small does not, the fewest extra seconds (or cost units: any
    per-problem measure works) first. A routed problem pays large instead of small, or, with
    `keeps_small`, small's whole solve and then large (a re-solve decided at its end)."""
    small_correct, large_correct = np.asarray(small_correct, bool), np.asarray(large_correct, bool)
    small_wall, large_wall = np.asarray(small_wall, float), np.asarray(large_wall, float)
    gap = int(large_correct.sum()) - int(small_correct.sum())
    if gap <= 0:
        return []
    only_large = np.flatnonzero(large_correct & ~small_correct)
    extra = np.sort(large_wall[only_large] - (0.0 if keeps_small else small_wall[only_large]))
    walls = (small_wall.sum() + np.concatenate([[0.0], np.cumsum(extra)])) / large_wall.sum()
    return [(float(w), k / gap) for k, w in enumerate(walls)]


def routed_gap(score: np.ndarray, small_correct: np.ndarray, large_correct: np.ndarray,
               small_price: np.ndarray, large_price: np.ndarray, ratio: float, *,
               keeps_small: bool = False) -> float:
    """The most gap recovered by sending problems to large in the order of `score` (highest
    first, ties in index order), over every number sent whose total price (seconds, or cost
    units) stays within `ratio` x large's: the best any threshold on that score could do. A
    sent problem pays large instead of small, or, with `keeps_small`, both (a re-solve).
    NaN when small alone is already over the ratio, or when there is no gap."""
    small_correct, large_correct = np.asarray(small_correct, bool), np.asarray(large_correct, bool)
    small_price, large_price = np.asarray(small_price, float), np.asarray(large_price, float)
    gap = int(large_correct.sum()) - int(small_correct.sum())
    order = np.argsort(-np.asarray(score, float), kind="stable")
    gain = np.concatenate([[0], np.cumsum(large_correct[order].astype(int)
                                          - small_correct[order].astype(int))])
    extra = large_price[order] - (0.0 if keeps_small else small_price[order])
    spent = small_price.sum() + np.concatenate([[0.0], np.cumsum(extra)])
    within = spent <= ratio * large_price.sum() + 1e-9
    return float(gain[within].max() / gap) if gap > 0 and within.any() else float("nan")


def signal_headroom(small_correct: np.ndarray, large_correct: np.ndarray, small_price: np.ndarray,
                    large_price: np.ndarray, ratio: float, *, aurocs: Sequence[float], draws: int,
                    rng: np.random.Generator, keeps_small: bool = False,
                    target_gap: float | None = None) -> dict[float, tuple[float, float | None]]:
    """How good a problem-level signal must be: for each AUROC a (for "large solves it and
    small does not"), the mean `routed_gap` within `ratio` over `draws` synthetic signals of
    that AUROC (score = sqrt(2) Phi^-1(a) * label + N(0, 1), label 0/1), and the share of
    draws that reach `target_gap` (None without one). a = 1 is the clairvoyant router
    (`clairvoyant_frontier`), one value."""
    from scipy.stats import norm  # here, so that importing bench.paired stays cheap

    small_correct, large_correct = np.asarray(small_correct, bool), np.asarray(large_correct, bool)
    label = (large_correct & ~small_correct).astype(float)
    out: dict[float, tuple[float, float | None]] = {}
    for a in aurocs:
        if not 0.5 <= a <= 1.0:
            raise ValueError(f"an AUROC in [0.5, 1] is needed, got {a!r}")
        if a == 1.0:
            frontier = clairvoyant_frontier(small_correct, large_correct, small_price, large_price,
                                            keeps_small=keeps_small)
            best = max((g for w, g in frontier if w <= ratio + 1e-9), default=float("nan"))
            out[a] = (best, None if target_gap is None else float(best >= target_gap - 1e-12))
            continue
        shift = np.sqrt(2.0) * norm.ppf(a)
        gaps = np.array([routed_gap(shift * label + rng.standard_normal(len(label)), small_correct,
                                    large_correct, small_price, large_price, ratio, keeps_small=keeps_small)
                         for _ in range(draws)])
        met = None if target_gap is None else float((gaps >= target_gap - 1e-12).mean())
        out[a] = (float(gaps.mean()), met)
    return out


def paired_figures(rows: Sequence[dict], *, policies: Sequence[str] | None = None, small: str = "small",
                   large: str = "large", aliases: dict[str, str] | None = None, n_bootstrap: int = 10_000,
                   seed: int = 0, headroom: dict[str, float] | None = None, target_gap: float | None = None,
                   headroom_draws: int = 200) -> dict:
    """Per-policy paired figures over the problems every policy finished (see the module doc).

    headroom: {"wall" or "cost": ratio vs large}: also say, by `signal_headroom`, how much of
    the gap a problem-level score of each AUROC in HEADROOM_AUROCS recovers within each ratio,
    routing or re-solving (`target_gap`: the share of draws that reach it)."""
    aliases = dict(aliases or {})
    names = list(dict.fromkeys(policies or [r["policy"] for r in rows if r.get("correct") is not None]))
    for target in aliases.values():
        if target not in names:
            names.append(target)
    for anchor in (small, large):
        if anchor not in names:
            names.insert(0, anchor)
    ids, by_policy = _table(rows, names)
    shown = names + [a for a in aliases if a not in names]

    def column(policy: str, field: str) -> np.ndarray:
        cells = by_policy[aliases.get(policy, policy)]
        return np.array([float(cells[i][field]) for i in ids])

    correct = {p: column(p, "correct") for p in shown}
    wall = {p: column(p, "wall_seconds") for p in shown}
    cost = {p: column(p, "cost") for p in shown}
    rng = np.random.default_rng(seed)
    n = len(ids)
    draws = rng.integers(0, n, size=(n_bootstrap, n))
    acc_small, acc_large = correct[small][draws].mean(axis=1), correct[large][draws].mean(axis=1)
    gap = acc_large - acc_small
    has_gap = gap != 0
    out: dict = {"n_problems": n, "problems": ids, "small": small, "large": large, "aliases": aliases,
                 "n_bootstrap": n_bootstrap, "seed": seed, "draws_without_gap": int((~has_gap).sum()),
                 "policies": {}}

    def interval(values: np.ndarray) -> list[float] | None:
        values = values[np.isfinite(values)]
        if not len(values):
            return None
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]

    point_gap = correct[large].mean() - correct[small].mean()
    out["clairvoyant_frontier"] = clairvoyant_frontier(correct[small], correct[large],
                                                       wall[small], wall[large])
    out["clairvoyant_cost_frontier"] = {
        mode: clairvoyant_frontier(correct[small], correct[large], cost[small], cost[large],
                                   keeps_small=mode == "resolve") for mode in ("route", "resolve")}
    for p in shown:
        acc = correct[p][draws].mean(axis=1)
        recovered = np.where(has_gap, (acc - acc_small) / np.where(has_gap, gap, 1.0), np.nan)
        wall_ratio = wall[p][draws].sum(axis=1) / wall[large][draws].sum(axis=1)
        cost_ratio = cost[p][draws].sum(axis=1) / cost[large][draws].sum(axis=1)
        out["policies"][p] = {
            "rows_of": aliases.get(p, p),
            "accuracy": float(correct[p].mean()), "n_correct": int(correct[p].sum()),
            "gap_recovered": (float((correct[p].mean() - correct[small].mean()) / point_gap)
                              if point_gap else None),
            "gap_recovered_ci95": interval(recovered),
            "wall_ratio": float(wall[p].sum() / wall[large].sum()), "wall_ratio_ci95": interval(wall_ratio),
            "cost_ratio": float(cost[p].sum() / cost[large].sum()), "cost_ratio_ci95": interval(cost_ratio),
            "mean_wall_seconds": float(wall[p].mean()), "mean_cost": float(cost[p].mean()),
        }
    if headroom:
        prices = {"wall": wall, "cost": cost}
        generator = np.random.default_rng([seed, 1])  # its own stream: the bootstrap is unchanged
        out["headroom"] = {}
        for measure, ratio in headroom.items():
            if measure not in prices:
                raise PairedError(f"headroom is measured in 'wall' or 'cost', got {measure!r}")
            entry: dict = {"ratio": float(ratio), "draws": headroom_draws, "target_gap": target_gap}
            for mode in ("route", "resolve"):
                found = signal_headroom(correct[small], correct[large], prices[measure][small],
                                        prices[measure][large], ratio, aurocs=HEADROOM_AUROCS,
                                        draws=headroom_draws, rng=generator, keeps_small=mode == "resolve",
                                        target_gap=target_gap)
                entry[mode] = {f"{a:g}": list(value) for a, value in found.items()}
            out["headroom"][measure] = entry
    return out


def format_interval(value: float | None, ci: list[float] | None) -> str:
    """`0.17 (-0.04 to 0.38)`: a figure and its interval, "-" when there is no figure."""
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" ({ci[0]:.2f} to {ci[1]:.2f})" if ci else "")


def markdown(figures: dict, *, title: str, command: str, target_gap: float | None = None,
             target_wall: float | None = None, target_cost: float | None = None) -> str:
    """The figures as a Markdown table, with a target column when target_gap is given."""
    lines = [f"# {title}", "", f"Command: `{command}`  ",
             f"{figures['n_problems']} problems on which every policy below has a graded row; 95 % intervals "
             f"from {figures['n_bootstrap']} paired bootstrap draws of the problems "
             f"({figures['draws_without_gap']} draws with no small-to-large gap left out of the gap column).",
             "", "| policy | correct | accuracy | gap recovered (95 % CI) | wall vs large (95 % CI) | "
             "cost vs large (95 % CI) | mean wall s | mean cost |" + (" target met |" if target_gap else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if target_gap else "")]
    for name, p in figures["policies"].items():
        label = name if p["rows_of"] == name else f"{name} (= {p['rows_of']})"
        row = (f"| {label} | {p['n_correct']}/{figures['n_problems']} | {p['accuracy']:.3f} | "
               f"{format_interval(p['gap_recovered'], p['gap_recovered_ci95'])} | "
               f"{format_interval(p['wall_ratio'], p['wall_ratio_ci95'])} | "
               f"{format_interval(p['cost_ratio'], p['cost_ratio_ci95'])} | "
               f"{p['mean_wall_seconds']:.1f} | {p['mean_cost']:.1f} |")
        if target_gap:
            met = _target_met(p, target_gap, target_wall)
            row += f" {'yes' if met else 'no'} |"
        lines.append(row)
    if target_gap:
        lines += ["", f"Target: gap recovered >= {target_gap:g} and wall <= {target_wall:g}x large, "
                      "both held by the 95 % interval (its lower end for the gap, its upper end for the "
                      "wall ratio)."]
        line = clairvoyant_summary(figures, target_gap, target_wall)
        if line:
            lines += ["", line]
    if target_gap and target_cost is not None:
        line = clairvoyant_cost_summary(figures, target_gap, target_cost)
        if line:
            lines += ["", line]
    if figures.get("headroom"):
        lines += ["", headroom_table(figures["headroom"])]
    return "\n".join(lines)


def headroom_table(headroom: dict) -> str:
    """`paired_figures(..., headroom=)` as Markdown: a row per AUROC, a column per (mode, ratio)."""
    columns = [(measure, mode) for measure in headroom for mode in ("route", "resolve")]
    first = headroom[columns[0][0]]
    lines = ["How good a problem-level score must be: the gap recovered within each ratio by the best "
             "threshold on a score of the given AUROC for \"large solves it and small does not\" (mean over "
             f"{first['draws']} synthetic scores"
             + (f"; in brackets, the share that reach {first['target_gap']:g}" if first["target_gap"] else "")
             + "; AUROC 1: the clairvoyant router). Route: sent problems go to large instead of small; "
             "re-solve: large solves them again after small.", "",
             "| AUROC | " + " | ".join(f"{'route' if mode == 'route' else 're-solve'}, {measure} <= "
                                      f"{headroom[measure]['ratio']:g}x" for measure, mode in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for a in first["route"]:
        cells = []
        for measure, mode in columns:
            mean, met = headroom[measure][mode][a]
            cells.append(f"{mean:.2f}" + (f" ({met:.0%})" if met is not None and a != "1" else ""))
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def clairvoyant_summary(figures: dict, target_gap: float, target_wall: float | None) -> str:
    """One sentence: the wall ratio at which the clairvoyant router reaches the gap target,
    and the gap it recovers within the wall target ("" when there is no gap)."""
    frontier = figures.get("clairvoyant_frontier") or []
    reach = next((w for w, g in frontier if g >= target_gap - 1e-12), None)
    if reach is None:
        return ""
    line = ("A clairvoyant router (large only on the problems large solves and small does not, "
            f"fewest extra seconds first) recovers {target_gap:g} of the gap at {reach:.3f}x large's wall")
    if target_wall is not None:
        within = max((g for w, g in frontier if w <= target_wall), default=None)
        line += (f"; within {target_wall:g}x it recovers "
                 + (f"{within:.2f}" if within is not None else "nothing (small alone is slower)"))
    return line + "."


def clairvoyant_cost_summary(figures: dict, target_gap: float, target_cost: float) -> str:
    """One sentence: the gap the clairvoyant routers recover within a cost ratio, one sending a
    problem to large instead of small, one re-solving it with large after small's whole solve
    ("" when there is no gap)."""
    frontiers = figures.get("clairvoyant_cost_frontier") or {}
    if not frontiers.get("route"):
        return ""
    parts = []
    for mode, words in (("route", "sends the problems only large solves to large before small writes "
                                  "anything"),
                        ("resolve", "has large re-solve them after small's whole solve")):
        within = max((g for c, g in frontiers[mode] if c <= target_cost), default=None)
        reach = next((c for c, g in frontiers[mode] if g >= target_gap - 1e-12), None)
        parts.append(f"{words}: "
                     + (f"{within:.2f}" if within is not None else "nothing (small alone costs more)")
                     + (f" ({target_gap:g} at {reach:.3f}x)" if reach is not None else ""))
    return (f"By cost, the gap a clairvoyant router recovers within {target_cost:g}x large's cost, if it "
            f"{'; if it '.join(parts)}.")


def _target_met(p: dict, target_gap: float, target_wall: float | None) -> bool:
    gap_ci, wall_ci = p["gap_recovered_ci95"], p["wall_ratio_ci95"]
    wall_ok = target_wall is None or (wall_ci is not None and wall_ci[1] <= target_wall)
    return bool(gap_ci and gap_ci[0] >= target_gap and wall_ok)


def _provenance(run: Path) -> dict:
    """The run's own record (run.json): its command, the commits that wrote rows, its models."""
    entry: dict = {"dir": str(run)}
    header = run / "run.json"
    if header.exists():
        record = json.loads(header.read_text())
        entry["command"] = record.get("command")
        sessions = record.get("sessions", [])
        entry["commits"] = list(dict.fromkeys(s["commit"] for s in sessions if s.get("commit")))
        entry["models"] = [m.get("name") for m in record.get("settings", {}).get("models", [])]
    return entry


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with results.jsonl), merged")
    parser.add_argument("--policies", default=None, help="comma-separated policies to compare (default: all)")
    parser.add_argument("--small", default="small")
    parser.add_argument("--large", default="large")
    parser.add_argument("--alias", action="append", default=[], metavar="NAME=POLICY",
                        help="list POLICY's rows again under NAME (repeatable)")
    parser.add_argument("--bootstrap", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-gap", type=float, default=None, help="e.g. 0.7")
    parser.add_argument("--target-wall", type=float, default=None, help="e.g. 0.6")
    parser.add_argument("--target-cost", type=float, default=None,
                        help="e.g. 0.5: say what a clairvoyant router recovers within this cost ratio")
    parser.add_argument("--headroom", action="store_true",
                        help="also say how good a problem-level score must be to meet the targets given "
                             "(--target-gap with --target-wall and/or --target-cost)")
    parser.add_argument("--title", default="Paired figures")
    parser.add_argument("-o", "--out", required=True, help="writes OUT.json and OUT.md")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    # Only the command line reads run directories: importing the harness (and through it the
    # runtime) here keeps `format_interval` and `paired_figures` cheap for bench.docs_tables.
    from bench.harness import RESULTS_FILE, load_results

    rows: list[dict] = []
    for run in args.runs:
        path = Path(run) / RESULTS_FILE
        if not path.exists():
            raise SystemExit(f"bench.paired: {path} does not exist")
        rows += load_results(path)
    aliases = {}
    for item in args.alias:
        name, sep, target = item.partition("=")
        if not sep or not name or not target:
            raise SystemExit(f"bench.paired: --alias takes NAME=POLICY, got {item!r}")
        aliases[name] = target
    policies = args.policies.split(",") if args.policies else None
    headroom = None
    if args.headroom:
        targets = (("wall", args.target_wall), ("cost", args.target_cost))
        headroom = {measure: ratio for measure, ratio in targets if ratio is not None}
        if args.target_gap is None or not headroom:
            raise SystemExit("bench.paired: --headroom needs --target-gap, and --target-wall and/or "
                             "--target-cost")
    try:
        figures = paired_figures(rows, policies=policies, small=args.small, large=args.large, aliases=aliases,
                                 n_bootstrap=args.bootstrap, seed=args.seed, headroom=headroom,
                                 target_gap=args.target_gap)
    except PairedError as error:
        raise SystemExit(f"bench.paired: {error}") from None
    command = "python -m bench.paired " + shlex.join(argv if argv is not None else sys.argv[1:])
    figures["command"] = command
    figures["targets"] = {"gap": args.target_gap, "wall": args.target_wall, "cost": args.target_cost}
    figures["runs"] = [_provenance(Path(run)) for run in args.runs]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")
    text = markdown(figures, title=args.title, command=command, target_gap=args.target_gap,
                    target_wall=args.target_wall, target_cost=args.target_cost)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return figures


if __name__ == "__main__":
    main()
