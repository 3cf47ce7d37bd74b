"""Combine runs/real_pair/measurements_<model>.json into measurements.json, adding a second
grade that separates a wrong answer from a format failure.

The instruction the models got says `End with "The answer is N."`; the Qwen models
sometimes copy it literally ("The answer is N.") after computing a number. `format_failures`
counts problems whose stated answer is not a number; `accuracy_if_format_fixed` grades those
by the last number written before the final line instead (an estimate of what a prompt
without the placeholder letter would score, not a result of one).

    python runs/real_pair/combine.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.grading import grade, parse_number  # noqa: E402

HERE = Path(__file__).parent
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number_before_final_line(text: str) -> str | None:
    body = text.rstrip().rsplit("\n", 1)[0]
    numbers = NUMBER.findall(body)
    return numbers[-1].replace(",", "") if numbers else None


def main() -> int:
    combined = {}
    for path in sorted(HERE.glob("measurements_*.json")):
        summary = json.loads(path.read_text())
        key = summary["model"]
        rows = [json.loads(line) for line in (HERE / f"records_{key}.jsonl").read_text().splitlines() if line]
        failures = fixed = 0
        for row in rows:
            if row["correct"]:
                fixed += 1
                continue
            if row["predicted"] is None or parse_number(row["predicted"]) is None:
                failures += 1
                guess = last_number_before_final_line(row["text"])
                fixed += bool(guess is not None and grade(f"The answer is {guess}.", row["answer"], "gsm8k"))
        summary["format_failures"] = failures
        summary["accuracy_if_format_fixed"] = fixed / len(rows)
        summary["correct_if_format_fixed"] = fixed
        combined[key] = summary
    (HERE / "measurements.json").write_text(json.dumps(combined, indent=2) + "\n")
    for key, s in combined.items():
        print(f"| {key} | {s['problems']} | {s['correct']} ({s['accuracy']:.0%}) | {s['format_failures']} | "
              f"{s['correct_if_format_fixed']} | {s['mean_generated_tokens']:.0f} | {s['decode_ms_per_token']:.0f} | "
              f"{s['prefill_ms_per_token']:.0f} | {s['seconds_per_problem']:.0f} | {s['step_prefill_tokens_per_step']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
