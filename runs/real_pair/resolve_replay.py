"""Issue 19 on the real pair: the problem-level re-solve (resolve mode), certified label-free on
unlabeled GSM8K train problems and checked on the test problems, replayed from recorded runs.

Pair Qwen2.5-Coder-0.5B-Instruct -> 1.5B-Instruct (Q4_K_M GGUF, llama.cpp, one core each).
Why a replay is exact in its decisions: a resolve-mode gate at threshold t re-solves a problem
iff the small model's own solve has a step scoring >= t, and a speculate-mode cascade at the
same t runs the small model's very steps up to its first escalation. So a problem is re-solved
at t iff the recorded `confidence:mean_prob@t` run escalated anywhere. Its cost is bounded by
the small model's whole solve plus the large model's (`small` and `large` rows): the runtime
stops the small model at its first doubted step, so the replayed cost and wall clock are upper
bounds, and a guarantee certified on upper bounds holds for the real costs.

Calibration: the 60 unlabeled train problems of `runs/real_pair/train/calibration_risk.json`'s
sweep (columns t = 1.0, 0.25, 0.2, 0.15 and the large model's reference run), conformal risk
control with every request under the hard cap 3 x B (`calibration.select_risk_control`,
cost_max = the cap): E[cost] <= B. A replayed request whose bound passes the cap counts the cap
as its cost and as wrong. Test: the main run's rows (`runs/real_pair/gsm8k_test`) and, where
they exist, the runtime's own resolve-mode rows (`runs/real_pair/gsm8k_test_resolve`), which
give the real cost and wall clock of t = 0.2 and 0.25.

    python runs/real_pair/resolve_replay.py   # writes bench/results/real_pair_gsm8k/resolve_replay.{json,md}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.harness import RESULTS_FILE, load_results
from bench.provenance import package_commit
from calibration import CalibrationError, replay_pacer, select_risk_control

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ROOT / "runs/real_pair/train/calibration_risk.json.sweep.jsonl"
MAIN = ROOT / "runs/real_pair/gsm8k_test"
RESOLVE = ROOT / "runs/real_pair/gsm8k_test_resolve"
OUT = ROOT / "bench/results/real_pair_gsm8k/resolve_replay"
THRESHOLDS = (1.0, 0.25, 0.2, 0.15)  # the sweep's columns, cheapest first
BUDGETS = (150.0, 200.0, 250.0, 300.0, 350.0, 400.0, 450.0)
CAP_FACTOR = 3.0
PACED_STEP, PACED_ORDERS = 2.0, 300


def policy_of(t: float, mode: str = "") -> str:
    return "small" if t >= 1.0 else f"confidence:mean_prob{mode}@{t:g}"


def rows_by_policy(run: Path) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    if (run / RESULTS_FILE).exists():
        for row in load_results(run / RESULTS_FILE):
            if row.get("error") is None:
                out.setdefault(row["policy"], {})[row["id"]] = row
    return out


def main() -> dict:
    lines = SWEEP.read_text().splitlines()
    header, sweep = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    assert [c[0] for c in header["candidates"]] == list(THRESHOLDS), header["candidates"]
    small_cost = np.array([r["costs"][0] for r in sweep])
    large_cost = np.array([r["reference_cost"] for r in sweep])
    resolved = np.array([[e > 0 for e in r["escalation"]] for r in sweep])  # (n, K)
    bound = small_cost[:, None] + resolved * large_cost[:, None]

    main_rows, resolve_rows = rows_by_policy(MAIN), rows_by_policy(RESOLVE)
    policies = ["small", "large", *(policy_of(t) for t in THRESHOLDS[1:])]
    ids = sorted(set.intersection(*(set(main_rows[p]) for p in policies)), key=lambda i: int(i.rsplit("-", 1)[1]))
    test = {p: main_rows[p] for p in policies}
    s_cost = np.array([test["small"][i]["cost"] for i in ids])
    l_cost = np.array([test["large"][i]["cost"] for i in ids])
    s_wall = np.array([test["small"][i]["wall_seconds"] for i in ids])
    l_wall = np.array([test["large"][i]["wall_seconds"] for i in ids])
    s_ok = np.array([bool(test["small"][i]["correct"]) for i in ids])
    l_ok = np.array([bool(test["large"][i]["correct"]) for i in ids])
    gap = l_ok.mean() - s_ok.mean()
    result = {"command": "python runs/real_pair/resolve_replay.py", "commit": package_commit(),
              "pair": ["Qwen2.5-Coder-0.5B-Instruct Q4_K_M", "Qwen2.5-Coder-1.5B-Instruct Q4_K_M"],
              "n_calibration": len(sweep), "n_test": len(ids), "cap_factor": CAP_FACTOR,
              "test_small_accuracy": float(s_ok.mean()), "test_large_accuracy": float(l_ok.mean()),
              "test_large_mean_cost": float(l_cost.mean()), "test_small_wall_x_large": float(s_wall.sum() / l_wall.sum()),
              "thresholds": [], "budgets": []}

    # Per problem and threshold: did the recorded run at t escalate (t = 1: never)?
    escalated = np.stack([np.zeros(len(ids), dtype=bool)] + [
        np.array([test[policy_of(t)][i]["escalation_rate"] > 0 for i in ids]) for t in THRESHOLDS[1:]], axis=1)

    def replay(t: float, cap: float | None = None) -> dict:
        esc = escalated[:, THRESHOLDS.index(t)]
        cost = s_cost + esc * l_cost
        ok = np.where(esc, l_ok, s_ok)
        if cap is not None:
            ok = ok & (cost <= cap)
            cost = np.minimum(cost, cap)
        return {"threshold": t, "resolved": float(esc.mean()), "accuracy": float(ok.mean()),
                "gap_recovered": float((ok.mean() - s_ok.mean()) / gap), "mean_cost_bound": float(cost.mean()),
                "wall_bound_x_large": float((s_wall + esc * l_wall).sum() / l_wall.sum())}

    for t in THRESHOLDS:
        row = replay(t)
        runtime = resolve_rows.get(policy_of(t, ":resolve"), {})
        common = [i for i in ids if i in runtime]
        if common:
            pick = np.array([ids.index(i) for i in common])
            ok = np.array([bool(runtime[i]["correct"]) for i in common])
            wall = np.array([runtime[i]["wall_seconds"] for i in common])
            row["runtime"] = {
                "n": len(common), "accuracy": float(ok.mean()),
                "replayed_accuracy_same_problems": float(np.where(
                    np.array([test[policy_of(t)][i]["escalation_rate"] > 0 for i in common]),
                    l_ok[pick], s_ok[pick]).mean()),
                "resolved": float(np.mean([len(runtime[i].get("set_aside", [])) > 0
                                           or runtime[i]["escalation_rate"] >= 1.0 for i in common])),
                "mean_cost": float(np.mean([runtime[i]["cost"] for i in common])),
                "mean_cost_bound_same_problems": float((s_cost[pick] + np.array(
                    [test[policy_of(t)][i]["escalation_rate"] > 0 for i in common]) * l_cost[pick]).mean()),
                "wall_x_large": float(wall.sum() / l_wall[pick].sum())}
        result["thresholds"].append(row)

    for budget in BUDGETS:
        cap = CAP_FACTOR * budget
        capped = np.minimum(bound, cap)
        item = {"budget": budget, "budget_x_large_test": budget / float(l_cost.mean()), "cap": cap}
        try:
            chosen = select_risk_control(capped, budget, np.arange(len(THRESHOLDS)), cost_max=cap).index
            t = THRESHOLDS[chosen]
            item.update(threshold=t, calibration_mean_cost_bound=float(capped[:, chosen].mean()),
                        test=replay(t, cap))
            item["kept"] = item["test"]["mean_cost_bound"] <= budget
        except CalibrationError as error:
            item["reason"] = str(error)
        result["budgets"].append(item)

    # Paced (calibration.BudgetPacer, as `curve.paced("resolve", B)` serves it): from the certified
    # threshold, moved along the four as requests finish, in the test problems' order and over
    # random orders. The replayed pacer observes the cost bounds; a live one sees the real costs
    # (no higher), so its ceiling holds for them too.
    rng = np.random.default_rng(0)
    orders = [np.arange(len(ids))] + [rng.permutation(len(ids)) for _ in range(PACED_ORDERS)]
    for item in result["budgets"]:
        cap = item["cap"]
        costs = np.minimum(s_cost[:, None] + escalated * l_cost[:, None], cap)
        correct = np.where(escalated, l_ok[:, None], s_ok[:, None]) & (s_cost[:, None] + escalated
                                                                        * l_cost[:, None] <= cap)
        walls = s_wall[:, None] + escalated * l_wall[:, None]
        start = THRESHOLDS.index(item["threshold"]) if "threshold" in item else 0
        runs, rows = [], np.arange(len(ids))
        for order in orders:
            chosen, pacer = replay_pacer(costs, item["budget"], step=PACED_STEP, start=float(start), order=order)
            runs.append((pacer.mean_cost, correct[rows, chosen].mean(), pacer.bound(),
                         walls[rows, chosen].sum() / l_wall.sum()))
        runs = np.array(runs)
        gaps = (runs[:, 1] - s_ok.mean()) / gap
        item["paced"] = {"step": PACED_STEP, "start_threshold": THRESHOLDS[start],
                         "in_order": {"mean_cost_bound": float(runs[0, 0]), "accuracy": float(runs[0, 1]),
                                      "gap_recovered": float(gaps[0]), "ceiling": float(runs[0, 2]),
                                      "wall_bound_x_large": float(runs[0, 3])},
                         "random_orders": {"orders": PACED_ORDERS, "gap_recovered_mean": float(gaps[1:].mean()),
                                           "gap_recovered_5_95": [float(q) for q in np.percentile(gaps[1:], [5, 95])],
                                           "mean_cost_bound_mean": float(runs[1:, 0].mean()),
                                           "mean_cost_bound_max": float(runs[1:, 0].max()),
                                           "wall_bound_x_large_mean": float(runs[1:, 3].mean()),
                                           "ceiling_held": bool((runs[:, 0] <= runs[:, 2] + 1e-9).all())}}

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["# Re-solve (resolve mode) on the real pair, GSM8K: replayed, certified label-free", "",
          f"Pair Qwen2.5-Coder-0.5B -> 1.5B-Instruct Q4_K_M (llama.cpp, one core each). Test: {len(ids)} GSM8K test "
          f"problems, small alone {s_ok.mean():.3f} (wall {result['test_small_wall_x_large']:.2f}x), large alone "
          f"{l_ok.mean():.3f} at mean cost {l_cost.mean():.1f}. Costs and wall clock of the replay are upper bounds "
          f"(the small model's whole solve; the runtime stops it at its first doubted step). Command: "
          f"`{result['command']}` at `{result['commit'][:7]}`.", "",
          "## Each threshold on the test problems", "",
          "| t | re-solved | accuracy (gap recovered) | mean cost <= | wall <= (x large) | runtime rows: n, accuracy "
          "(replayed on the same problems), mean cost (bound), wall (x large) |", "|---|---|---|---|---|---|"]
    for row in result["thresholds"]:
        r = row.get("runtime")
        runtime = (f"{r['n']}, {r['accuracy']:.3f} ({r['replayed_accuracy_same_problems']:.3f}), {r['mean_cost']:.1f} "
                   f"({r['mean_cost_bound_same_problems']:.1f}), {r['wall_x_large']:.3f}x" if r else "-")
        md.append(f"| {row['threshold']:g} | {row['resolved']:.2f} | {row['accuracy']:.3f} ({row['gap_recovered']:.2f}) | "
                  f"{row['mean_cost_bound']:.1f} | {row['wall_bound_x_large']:.3f} | {runtime} |")
    md += ["", f"## Certified on {len(sweep)} unlabeled train problems: E[cost] <= B, every request under the cap "
           f"{CAP_FACTOR:g} x B", "",
           "| B (x large-only, test) | certified t | calibration mean cost <= | test accuracy (gap recovered) | "
           "test mean cost <= | kept | test wall <= (x large) |", "|---|---|---|---|---|---|---|"]
    for item in result["budgets"]:
        if "threshold" not in item:
            md.append(f"| {item['budget']:g} ({item['budget_x_large_test']:.2f}x) | none certified | - | - | - | - | - |")
            continue
        t = item["test"]
        md.append(f"| {item['budget']:g} ({item['budget_x_large_test']:.2f}x) | {item['threshold']:g} | "
                  f"{item['calibration_mean_cost_bound']:.1f} | {t['accuracy']:.3f} ({t['gap_recovered']:.2f}) | "
                  f"{t['mean_cost_bound']:.1f} | {'yes' if item['kept'] else 'NO'} | {t['wall_bound_x_large']:.3f} |")
    md += ["", f"## Paced from the certified threshold (step {PACED_STEP:g}): the running mean cost held at B", "",
           "| B (x large-only, test) | in order: accuracy (gap recovered), mean cost <= (ceiling), wall <= (x large) | "
           f"{PACED_ORDERS} random orders: gap recovered mean (5-95 %), mean cost <= mean (max), wall <= mean, "
           "ceiling held |", "|---|---|---|"]
    for item in result["budgets"]:
        o, r = item["paced"]["in_order"], item["paced"]["random_orders"]
        low, high = r["gap_recovered_5_95"]
        md.append(f"| {item['budget']:g} ({item['budget_x_large_test']:.2f}x) | {o['accuracy']:.3f} "
                  f"({o['gap_recovered']:.2f}), {o['mean_cost_bound']:.1f} ({o['ceiling']:.1f}), "
                  f"{o['wall_bound_x_large']:.3f} | {r['gap_recovered_mean']:.2f} ({low:.2f}-{high:.2f}), "
                  f"{r['mean_cost_bound_mean']:.1f} ({r['mean_cost_bound_max']:.1f}), "
                  f"{r['wall_bound_x_large_mean']:.3f}, {'yes' if r['ceiling_held'] else 'NO'} |")
    OUT.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
