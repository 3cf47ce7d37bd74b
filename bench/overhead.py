"""Per-step overhead of the runtime against bare `generate`, on the embedded models.

    python -m bench.overhead --n 100 --out bench/results/overhead

For each problem, interleaved: the cascade with one tier writing every step (step
machine, delimiter detection, confidence signals, cost ledger, KV bookkeeping), then
`model.generate` producing the same number of tokens greedily with its own KV cache in
one call. The difference, per step, is what the runtime costs on top of decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.provenance import package_commit
from bench.tasks import generate_split
from cascade import AlwaysLarge, AlwaysSmall, embedded_cascade

__all__ = ["main"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--out", default="bench/results/overhead")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (same for both paths)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    problems = [p.problem for p in generate_split("test", args.n)]
    report = {"command": "python -m bench.overhead " + " ".join(argv or []), "commit": package_commit(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "n": args.n, "threads": args.threads,
              "load_average_before": os.getloadavg()[0], "tiers": {}}
    for tier, gate in (("small", AlwaysSmall()), ("large", AlwaysLarge())):
        runner = embedded_cascade(gate)
        backend = runner.models[0 if tier == "small" else 1]
        runner.solve(problems[0])  # warm-up
        cascade_seconds = bare_seconds = 0.0
        steps = tokens = 0
        for problem in problems:
            begin = time.perf_counter()
            result = runner.solve(problem)
            cascade_seconds += time.perf_counter() - begin
            generated = sum(u.generated_tokens for u in result.cost.per_tier)
            ids = torch.tensor([backend._encode(backend.render_prompt(problem)[0])])
            begin = time.perf_counter()
            with torch.no_grad():
                backend.model.generate(ids, max_new_tokens=generated, min_new_tokens=generated,
                                       do_sample=False, pad_token_id=0)
            bare_seconds += time.perf_counter() - begin
            steps += len(result.steps)
            tokens += generated
        report["tiers"][tier] = {
            "steps": steps, "tokens": tokens,
            "cascade_ms_per_token": 1000 * cascade_seconds / tokens,
            "generate_ms_per_token": 1000 * bare_seconds / tokens,
            "overhead_ms_per_step": 1000 * (cascade_seconds - bare_seconds) / steps,
            "overhead_fraction": (cascade_seconds - bare_seconds) / bare_seconds,
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Runtime overhead vs bare generate ({args.n} test problems, batch 1, greedy)", "",
             f"Command: `{report['command']}`  ", f"Commit: `{report['commit']}`, {report['date']}", "",
             "| model | steps | tokens | cascade ms/token | generate ms/token | "
             "overhead ms/step | overhead |",
             "|---|---|---|---|---|---|---|"]
    for tier, r in report["tiers"].items():
        lines.append(f"| {tier} | {r['steps']} | {r['tokens']} | {r['cascade_ms_per_token']:.2f} | "
                     f"{r['generate_ms_per_token']:.2f} | {r['overhead_ms_per_step']:.2f} | "
                     f"{r['overhead_fraction']:+.0%} |")
    report["load_average_after"] = os.getloadavg()[0]
    lines += ["", f"torch threads: {args.threads}; 1-minute load average {report['load_average_before']:.1f} "
              f"before, {report['load_average_after']:.1f} after (2-core machine)."]
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(report, out / "overhead.png")
    print("\n".join(lines))
    return report


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = list(report["tiers"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    width = 0.38
    for offset, key, label in ((-width / 2, "cascade_ms_per_token", "cascade runtime"),
                               (width / 2, "generate_ms_per_token", "bare generate")):
        ax.bar([i + offset for i in range(len(tiers))], [report["tiers"][t][key] for t in tiers],
               width, label=label)
    ax.set_xticks(range(len(tiers)), tiers)
    ax.set_ylabel("ms per generated token")
    ax.set_title(f"Runtime overhead, {report['n']} problems, batch 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
