import json, sys, math, random, time, torch, numpy as np
from transformers import AutoTokenizer, LlamaConfig, LlamaModel, AutoModelForCausalLM
from cascade.embedded import embedded_path
from calibration import auroc
torch.manual_seed(0); random.seed(0)
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2)
tok = AutoTokenizer.from_pretrained(embedded_path("small"))
rows = [json.loads(l) for l in open("runs/router_probe/train5k.jsonl")]
def examples(rs):
    X, y, mp = [], [], []
    for r in rs:
        for s in r["steps"]:
            ids = tok(r["problem"] + "\n" + s["context"] + s["draft"], add_special_tokens=False)["input_ids"]
            X.append(ids); y.append(0 if s["ok"] else 1); mp.append(s["min_prob"])
    return X, np.array(y), np.array(mp)
Xtr, ytr, mptr = examples(rows[:4000]); Xte, yte, mpte = examples(rows[4000:])
print("train", len(Xtr), ytr.mean(), "test", len(Xte), yte.mean(), "maxlen", max(map(len, Xtr)))
print("min_prob AUROC", auroc(-mpte, yte))
kind = sys.argv[1]; hidden = int(sys.argv[2]); layers = int(sys.argv[3])
if kind == "init":
    lm = AutoModelForCausalLM.from_pretrained(embedded_path("small"), dtype=torch.float32)
    body = lm.model
else:
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden*3, num_hidden_layers=layers,
                      num_attention_heads=max(2, hidden//32), num_key_value_heads=max(2, hidden//32), max_position_embeddings=512)
    body = LlamaModel(cfg)
head = torch.nn.Linear(body.config.hidden_size, 1)
params = list(body.parameters()) + list(head.parameters())
print("params", sum(p.numel() for p in params))
opt = torch.optim.AdamW(params, lr=float(sys.argv[5]) if len(sys.argv) > 5 else 1e-3, weight_decay=0.01)
pos_w = torch.tensor((1 - ytr.mean()) / ytr.mean())
def batch(X, idx):
    L = max(len(X[i]) for i in idx)
    ids = torch.zeros(len(idx), L, dtype=torch.long); mask = torch.zeros(len(idx), L, dtype=torch.long)
    for j, i in enumerate(idx):
        ids[j, :len(X[i])] = torch.tensor(X[i]); mask[j, :len(X[i])] = 1
    return ids, mask, torch.tensor([len(X[i]) - 1 for i in idx])
def logits(ids, mask, last):
    h = body(input_ids=ids, attention_mask=mask).last_hidden_state
    return head(h[torch.arange(len(last)), last]).squeeze(-1)
def evaluate():
    body.eval(); out = []
    with torch.no_grad():
        for s in range(0, len(Xte), 256):
            out.append(logits(*batch(Xte, list(range(s, min(len(Xte), s+256))))))
    body.train(); z = torch.cat(out).numpy()
    return z
epochs = int(sys.argv[6]) if len(sys.argv) > 6 else 3
total = epochs * math.ceil(len(Xtr) / 64); step = 0; t0 = time.time()
for ep in range(epochs):
    order = list(range(len(Xtr))); random.shuffle(order)
    for s in range(0, len(order), 64):
        idx = order[s:s+64]; ids, mask, last = batch(Xtr, idx)
        lr_scale = min(1, step / 100) * 0.5 * (1 + math.cos(math.pi * step / total))
        for g in opt.param_groups: g["lr"] = g.setdefault("base", g["lr"]) * lr_scale
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(ids, mask, last), torch.tensor(ytr[idx], dtype=torch.float32), pos_weight=pos_w)
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); step += 1
    z = evaluate()
    # TPR at FPR / escalation needed for recall 0.985
    order_ = np.sort(z[yte == 1]); thr = order_[int(0.015 * len(order_))]
    esc = (z >= thr).mean()
    thr_m = np.sort(-mpte[yte == 1])[int(0.015 * (yte == 1).sum())]
    print(f"epoch {ep} loss {loss.item():.3f} AUROC {auroc(z, yte):.4f} esc@recall.985 {esc:.3f} (min_prob {(-mpte >= thr_m).mean():.3f}, oracle {yte.mean():.3f}) {time.time()-t0:.0f}s", flush=True)
np.save(f"runs/router_probe/z_{kind}_{hidden}_{layers}.npy", z)
