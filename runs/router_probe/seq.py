# Draft-token sequence router: per token [embed(id), logprob, entropy, pos] -> GRU -> logit
import json, sys, math, random, time, torch, numpy as np
from calibration import auroc
torch.manual_seed(0); random.seed(0); torch.set_num_threads(1)
rows = [json.loads(l) for l in open("runs/router_probe/train5k.jsonl")]
def ex(rs):
    out = []
    for r in rs:
        for k, s in enumerate(r["steps"]):
            out.append((s["ids"] or [0], s["lps"] or [0.0], s["ents"] or [0.0], k, 0 if s["ok"] else 1, s["min_prob"]))
    return out
NTR = int(sys.argv[3]) if len(sys.argv) > 3 else 4000
tr, te = ex(rows[:NTR]), ex(rows[4000:])
yte = np.array([e[4] for e in te]); mpte = np.array([e[5] for e in te])
def pack(b):
    L = max(len(e[0]) for e in b)
    ids = torch.zeros(len(b), L, dtype=torch.long); num = torch.zeros(len(b), L, 4); lens = torch.tensor([len(e[0]) for e in b])
    for j, e in enumerate(b):
        n = len(e[0]); ids[j, :n] = torch.tensor(e[0])
        num[j, :n, 0] = torch.tensor(e[1]).clamp(min=-20) ; num[j, :n, 1] = torch.tensor(e[2]); num[j, :n, 2] = torch.arange(n) / 12; num[j, :n, 3] = e[3] / 8
    return ids, num, lens, torch.tensor([e[4] for e in b], dtype=torch.float32)
H = int(sys.argv[1]) if len(sys.argv) > 1 else 64
class M(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.emb = torch.nn.Embedding(64, 16); s.inp = torch.nn.Linear(20, H)
        s.gru = torch.nn.GRU(H, H, batch_first=True, bidirectional=True); s.out = torch.nn.Linear(2 * H, 1)
    def forward(s, ids, num, lens):
        x = torch.relu(s.inp(torch.cat([s.emb(ids), num], -1)))
        p = torch.nn.utils.rnn.pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=False)
        y, _ = s.gru(p); y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, batch_first=True)
        mask = (torch.arange(y.shape[1])[None] < lens[:, None]).float()[..., None]
        pooled = (y * mask).sum(1) / lens[:, None]; mx = (y + (mask - 1) * 1e4).max(1).values
        return s.out(torch.relu(mx)).squeeze(-1)
m = M(); opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01)
pw = torch.tensor((1 - np.mean([e[4] for e in tr])) / np.mean([e[4] for e in tr]))
thr_m = np.sort(-mpte[yte == 1])[int(0.015 * (yte == 1).sum())]
print("min_prob AUROC", auroc(-mpte, yte), "esc@recall.985", (-mpte >= thr_m).mean(), "oracle", yte.mean())
t0 = time.time()
for ep in range(int(sys.argv[2]) if len(sys.argv) > 2 else 8):
    random.shuffle(tr)
    for s in range(0, len(tr), 128):
        ids, num, lens, y = pack(tr[s:s+128])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(ids, num, lens), y, pos_weight=pw)
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        z = torch.cat([m(*pack(te[s:s+512])[:3]) for s in range(0, len(te), 512)]).numpy()
    thr = np.sort(z[yte == 1])[int(0.015 * (yte == 1).sum())]
    print(f"ep {ep} AUROC {auroc(z, yte):.4f} esc@recall.985 {(z >= thr).mean():.3f} {time.time()-t0:.0f}s", flush=True)
