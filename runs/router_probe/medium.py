# Probe: a router that also reads a cheaper model's likelihood of the draft (the embedded
# medium model, 0.86M params, 1/8 of the large model). Scores every collected step's draft
# under medium given the small model's own context, then fits the logistic router on the
# 22 runtime features + medium's mean and min log-probability. Same labels and held-out
# split as the runtime (heldout_split seed 0). usage: python runs/router_probe/medium.py
import json, math, time, numpy as np, torch
torch.set_num_threads(1)
from dataclasses import replace
from decoding import HFBackend, ScoreRequest
from cascade.embedded import embedded_path
from cascade.router import load_router_data, heldout_split, fit_logistic, train_router, FeatureSpec
from calibration import auroc
d = load_router_data("runs/router5k/data.npz")
cache = "runs/router_probe/medium_scores.npy"
try:
    scores = np.load(cache)
except FileNotFoundError:
    medium = HFBackend.from_pretrained(embedded_path("medium"), step_delimiter="\n", name="embedded:medium")
    rows = [json.loads(l) for l in open("runs/router5k/data.jsonl")][1:]
    out, t = [], time.time()
    for r in rows:
        context = ""
        for s in r["steps"]:
            text = s["small"] + "\n"
            sc = medium.score_steps([ScoreRequest(f"m{r['index']}", r["problem"], context, text)])[0]
            lps = sc.logprobs or (0.0,)
            out.append((float(np.mean(lps)), float(min(lps))))
            context += text
        medium.release(f"m{r['index']}")
    print("scored", len(out), "steps in", round(time.time() - t), "s", flush=True)
    scores = np.array(out)
    np.save(cache, scores)
assert len(scores) == len(d)
labels, held = heldout_split(d, tau=0.0, holdout=0.2, seed=0)
y = labels[held]
def esc(s, recall):
    thr = np.sort(s[y])[int((1 - recall) * y.sum())]
    return float((s >= thr).mean())
for name, feats in (("runtime features (logistic)", d.features),
                    ("medium mean/min logprob only", scores),
                    ("runtime features + medium", np.hstack([d.features, scores]))):
    x = feats
    mean, std = x[~held].mean(0), x[~held].std(0) + 1e-12
    yt = labels[~held]; w = np.where(yt, 0.5 / yt.mean(), 0.5 / (1 - yt.mean()))
    coef, bias = fit_logistic((x[~held] - mean) / std, yt, sample_weight=w)
    p = ((x[held] - mean) / std) @ coef + bias
    print(f"{name:32s} AUROC {auroc(p, y):.4f} esc@.95 {esc(p, .95):.3f} esc@.985 {esc(p, .985):.3f} esc@.995 {esc(p, .995):.3f}")
print("oracle", round(float(y.mean()), 3), "| -medium min logprob alone: AUROC",
      round(auroc(-scores[held][:, 1], y), 4), "esc@.985", round(esc(-scores[held][:, 1], .985), 3))
