"""bench.paired: paired figures over the problems every policy finished."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.paired import PairedError, clairvoyant_frontier, main, paired_figures


def _row(pid: str, policy: str, correct: bool, wall: float, cost: float) -> dict:
    return {"id": pid, "policy": policy, "correct": correct, "wall_seconds": wall, "cost": cost}


def _rows(n: int = 40, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        small_ok, large_ok = bool(rng.random() < 0.2), bool(rng.random() < 0.7)
        rows += [_row(f"p{i}", "small", small_ok, 1.0, 10.0),
                 _row(f"p{i}", "large", large_ok, 2.0, 30.0),
                 # a cascade that is right exactly where large is, at 3/4 of its wall and cost
                 _row(f"p{i}", "cascade", large_ok, 1.5, 22.5)]
    return rows


def test_a_policy_equal_to_large_recovers_the_whole_gap_and_small_none():
    figures = paired_figures(_rows(), n_bootstrap=500)
    policies = figures["policies"]
    assert policies["cascade"]["gap_recovered"] == pytest.approx(1.0)
    assert policies["cascade"]["gap_recovered_ci95"] == pytest.approx([1.0, 1.0])
    assert policies["small"]["gap_recovered"] == pytest.approx(0.0)
    assert policies["cascade"]["wall_ratio"] == pytest.approx(0.75)
    assert policies["cascade"]["cost_ratio"] == pytest.approx(0.75)
    assert policies["small"]["wall_ratio_ci95"] == pytest.approx([0.5, 0.5])


def test_gap_interval_covers_the_point_and_is_paired():
    rows = _rows(60, seed=3)
    # half of large's wins kept: a point estimate near 0.5 whose interval must contain it
    wins = [r["id"] for r in rows if r["policy"] == "large" and r["correct"]]
    keep = set(wins[::2])
    rows += [_row(r["id"], "half", r["id"] in keep or (r["correct"] and r["id"] not in wins), 1.0, 15.0)
             for r in rows if r["policy"] == "small"]
    half = paired_figures(rows, n_bootstrap=2000)["policies"]["half"]
    low, high = half["gap_recovered_ci95"]
    assert low < half["gap_recovered"] < high
    assert 0.2 < half["gap_recovered"] < 0.8


def test_only_problems_every_policy_finished_count():
    rows = _rows(10)
    rows = [r for r in rows if not (r["policy"] == "cascade" and r["id"] in ("p0", "p1", "p2"))]
    figures = paired_figures(rows, n_bootstrap=100)
    assert figures["n_problems"] == 7
    assert figures["problems"] == [f"p{i}" for i in range(3, 10)]


def test_alias_lists_a_policys_rows_under_a_new_name():
    figures = paired_figures(_rows(), aliases={"calibrated@25": "cascade"}, n_bootstrap=100)
    alias = figures["policies"]["calibrated@25"]
    assert alias["rows_of"] == "cascade"
    assert alias["accuracy"] == figures["policies"]["cascade"]["accuracy"]


def test_missing_policy_is_named():
    with pytest.raises(PairedError, match="no graded rows for verify"):
        paired_figures(_rows(), policies=["verify"])


def test_cli_writes_json_and_markdown(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = tmp_path / "paired"
    main([str(run), "--bootstrap", "200", "--target-gap", "0.7", "--target-wall", "0.6", "-o", str(out)])
    text = (tmp_path / "paired.md").read_text()
    saved = json.loads((tmp_path / "paired.json").read_text())
    assert saved["n_problems"] == 40
    # cascade recovers the whole gap but at 0.75x the wall: the target is not met
    assert "| cascade | " in text and text.split("| cascade | ")[1].split("\n")[0].rstrip().endswith("no |")


def test_the_clairvoyant_frontier_routes_only_what_large_alone_solves_cheapest_first():
    from bench.paired import clairvoyant_frontier

    small_ok = np.array([1, 0, 0, 0, 1], bool)
    large_ok = np.array([1, 1, 1, 1, 0], bool)  # large alone solves 1, 2, 3; small alone 4: gap 4 - 2 = 2
    small_wall = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    large_wall = np.array([2.0, 4.0, 2.0, 3.0, 2.0])  # extra seconds of 1, 2, 3: 3, 1, 2
    frontier = clairvoyant_frontier(small_ok, large_ok, small_wall, large_wall)
    total = large_wall.sum()
    expected = [(5 / total, 0.0), (6 / total, 0.5), (8 / total, 1.0), (11 / total, 1.5)]
    assert frontier == pytest.approx(expected)
    assert clairvoyant_frontier(large_ok, small_ok, small_wall, large_wall) == []  # no gap to recover
    # A re-solve decided at the end of small's solve pays small too: extras 2, 4, 3 -> 2, 3, 4.
    resolve = clairvoyant_frontier(small_ok, large_ok, small_wall, large_wall, keeps_small=True)
    expected = [(5 / total, 0.0), (7 / total, 0.5), (10 / total, 1.0), (14 / total, 1.5)]
    assert resolve == pytest.approx(expected)


def test_the_markdown_says_what_a_clairvoyant_router_recovers_within_a_cost_ratio():
    from bench.paired import markdown

    figures = paired_figures(_rows(), n_bootstrap=200)
    route, resolve = (figures["clairvoyant_cost_frontier"][m] for m in ("route", "resolve"))
    assert resolve[0] == route[0] and all(r[0] > q[0] for q, r in zip(route[1:], resolve[1:], strict=True))
    text = markdown(figures, title="t", command="c", target_gap=0.7, target_wall=0.6, target_cost=0.6)
    line = next(x for x in text.splitlines() if x.startswith("By cost"))
    within = {m: max(g for c, g in f if c <= 0.6) for m, f in (("route", route), ("resolve", resolve))}
    assert f"anything: {within['route']:.2f}" in line and f"solve: {within['resolve']:.2f}" in line
    assert "By cost" not in markdown(figures, title="t", command="c", target_gap=0.7, target_wall=0.6)


def test_the_markdown_says_where_the_clairvoyant_router_meets_the_gap_target():
    from bench.paired import markdown

    figures = paired_figures(_rows(), n_bootstrap=200)
    text = markdown(figures, title="t", command="c", target_gap=0.7, target_wall=0.6)
    by = {(r["id"], r["policy"]): r["correct"] for r in _rows()}
    n = figures["n_problems"]
    gap = sum(by[(f"p{i}", "large")] for i in range(n)) - sum(by[(f"p{i}", "small")] for i in range(n))
    # small takes 1 s and large 2 s on every problem: routing k problems takes (n + k) / 2n of large's wall
    reach = (n + np.ceil(0.7 * gap)) / (2 * n)
    assert f"at {reach:.3f}x large's wall" in text and "within 0.6x it recovers" in text


def test_routed_gap_is_the_best_prefix_of_the_order_within_the_ratio():
    from bench.paired import routed_gap

    small_ok = np.array([0, 0, 1, 0, 0], bool)
    large_ok = np.array([1, 1, 0, 0, 1], bool)  # gap 3 - 1 = 2
    small_p, large_p = np.full(5, 1.0), np.full(5, 4.0)  # large total 20
    score = np.array([5.0, 4.0, 3.0, 2.0, 1.0])  # problems in index order
    # Route: each sent problem adds 3. Ratio 0.5 (10): small 5 + 3 sent = 14 > 10, so 1 sent
    # (8): +1 -> 0.5. Ratio 0.7 (14): 3 sent: +1 +1 -1 -> the best prefix is 2 sent: 1.0.
    assert routed_gap(score, small_ok, large_ok, small_p, large_p, 0.5) == 0.5
    assert routed_gap(score, small_ok, large_ok, small_p, large_p, 0.7) == 1.0
    # Ratio 0.6 (12): routing fits 2 (5 + 6), a re-solve, which pays large on top of small,
    # only 1 (5 + 4; 5 + 8 > 12).
    assert routed_gap(score, small_ok, large_ok, small_p, large_p, 0.6) == 1.0
    assert routed_gap(score, small_ok, large_ok, small_p, large_p, 0.6, keeps_small=True) == 0.5
    small_alone_over = np.full(5, 5.0)  # 25 > 10
    assert np.isnan(routed_gap(score, small_ok, large_ok, small_alone_over, large_p, 0.5))


def test_signal_headroom_rises_with_the_signal_and_ends_at_the_clairvoyant():
    from bench.paired import signal_headroom

    rng = np.random.default_rng(1)
    n = 300
    small_ok, large_ok = rng.random(n) < 0.3, rng.random(n) < 0.65
    small_p, large_p = rng.uniform(5, 15, n), rng.uniform(20, 40, n)
    for keeps_small in (False, True):
        headroom = signal_headroom(small_ok, large_ok, small_p, large_p, 0.6, aurocs=(0.5, 0.7, 0.9, 1.0),
                                   draws=100, rng=np.random.default_rng(0), keeps_small=keeps_small,
                                   target_gap=0.3)
        means = [headroom[a][0] for a in (0.5, 0.7, 0.9, 1.0)]
        assert means == sorted(means) and means[0] < means[-1]
        frontier = clairvoyant_frontier(small_ok, large_ok, small_p, large_p, keeps_small=keeps_small)
        assert headroom[1.0][0] == max(g for w, g in frontier if w <= 0.6 + 1e-9)
        assert all(0.0 <= met <= 1.0 for _, met in headroom.values())
    # The synthetic signal has the AUROC asked for (mean over draws; the AUROC of one draw of
    # 300 problems has a standard error near 0.03, so 400 draws pin the mean to about 0.002).
    from scipy.stats import norm

    from calibration import auroc

    label = large_ok & ~small_ok
    draws = [auroc(np.sqrt(2) * norm.ppf(0.8) * label + rng.standard_normal(n), label) for _ in range(400)]
    assert abs(np.mean(draws) - 0.8) < 0.01
    with pytest.raises(ValueError, match="AUROC"):
        signal_headroom(small_ok, large_ok, small_p, large_p, 0.6, aurocs=(0.3,), draws=1, rng=rng)


def test_cli_headroom_says_how_good_a_problem_level_score_must_be(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n=120, seed=3)))
    common = [str(run), "--bootstrap", "200", "--target-gap", "0.5", "--target-wall", "0.8"]
    plain = main([*common, "-o", str(tmp_path / "plain")])
    both = main([*common, "--target-cost", "0.7", "--headroom", "-o", str(tmp_path / "headroom")])
    assert both["policies"] == plain["policies"]  # the headroom draws leave the bootstrap alone
    assert set(both["headroom"]) == {"wall", "cost"} and "headroom" not in plain
    for measure, ratio, price in (("wall", 0.8, "wall_seconds"), ("cost", 0.7, "cost")):
        entry = both["headroom"][measure]
        assert entry["ratio"] == ratio and list(entry["route"]) == ["0.6", "0.7", "0.8", "0.9", "1"]
        rows = _rows(n=120, seed=3)
        pick = {p: np.array([r[price] for r in rows if r["policy"] == p]) for p in ("small", "large")}
        ok = {p: np.array([r["correct"] for r in rows if r["policy"] == p]) for p in ("small", "large")}
        for mode in ("route", "resolve"):
            frontier = clairvoyant_frontier(ok["small"], ok["large"], pick["small"], pick["large"],
                                            keeps_small=mode == "resolve")
            assert entry[mode]["1"][0] == max(g for w, g in frontier if w <= ratio + 1e-9)
            assert entry[mode]["0.6"][0] <= entry[mode]["1"][0]
    text = (tmp_path / "headroom.md").read_text()
    assert "| AUROC | route, wall <= 0.8x | re-solve, wall <= 0.8x | route, cost <= 0.7x |" in text
    assert "share that reach 0.5" in text
    with pytest.raises(SystemExit, match="--headroom needs"):
        main([str(run), "--headroom", "--target-gap", "0.5", "-o", str(tmp_path / "x")])
