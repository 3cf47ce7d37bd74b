# Probe: does the small model's per-token hidden state (every draft token, one layer) help a
# sequence router beyond ids/logprobs/entropies? Teacher-forced: one forward pass of the small
# model per trajectory (prompt + its own steps), hidden states sliced per step.
# usage: python runs/router_probe/hidden.py LAYER(-1 = none) [epochs]
import json, sys, time, numpy as np, torch
torch.set_num_threads(1); torch.manual_seed(0)
from decoding import HFBackend
from cascade.embedded import embedded_path
from cascade.router import load_router_data, heldout_split
from calibration import auroc
LAYER = int(sys.argv[1]); EPOCHS = int(sys.argv[2]) if len(sys.argv) > 2 else 8
d = load_router_data("runs/router5k/data.npz")
cache = "runs/router_probe/hidden_states.npz"
try:
    H = np.load(cache)["h"]
except FileNotFoundError:
    small = HFBackend.from_pretrained(embedded_path("small"), step_delimiter="\n", name="embedded:small")
    rows = [json.loads(l) for l in open("runs/router5k/data.jsonl")][1:]
    per_layer = []
    t = time.time()
    for r in rows:
        prompt, add = small.render_prompt(r["problem"])
        ids = small._encode(prompt, add)
        spans = []
        for s in r["steps"]:
            n = len(s["token_ids"]); spans.append((len(ids), n)); ids = ids + s["token_ids"]
            if s["small"] == "" or not s["token_ids"]: pass
            # a step ending at max tokens gets a delimiter appended by the runtime
            if n and small.tokenizer.decode(s["token_ids"][-1:]) != "\n" and s is not r["steps"][-1]:
                ids = ids + small._encode("\n")
        with torch.no_grad():
            out = small.model(torch.tensor([ids]), output_hidden_states=True)
        hs = torch.stack(out.hidden_states)[:, 0].numpy()  # (layers+1, T, 64)
        for start, n in spans:
            per_layer.append(hs[:, start - 1:start - 1 + n] if n else np.zeros((hs.shape[0], 0, hs.shape[2])))
    print("forward", time.time() - t, flush=True)
    H = np.concatenate([p for p in per_layer], axis=1)  # (L+1, total_tokens, 64), aligned with d.token_ids
    assert H.shape[1] == len(d.token_ids), (H.shape, len(d.token_ids))
    np.savez(cache, h=H.astype(np.float32))
labels, held = heldout_split(d, tau=0.0, holdout=0.2, seed=0)
train_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)
y_all = torch.tensor(labels, dtype=torch.float32)
mean, std = d.features[~held].mean(0), d.features[~held].std(0) + 1e-9
S = torch.tensor((d.features - mean) / std, dtype=torch.float32)
HD = 0 if LAYER < 0 else H.shape[2]
if HD:
    Hl = H[LAYER]; hm, hsd = Hl.mean(0), Hl.std(0) + 1e-6; Hl = (Hl - hm) / hsd
W = 64
class Net(torch.nn.Module):
    def __init__(s):
        super().__init__(); s.emb = torch.nn.Embedding(64, 16); s.inp = torch.nn.Linear(16 + 3 + HD, W)
        s.gru = torch.nn.GRU(W, W, batch_first=True, bidirectional=True)
        s.head = torch.nn.Sequential(torch.nn.Linear(2 * W + S.shape[1], W), torch.nn.ReLU(), torch.nn.Linear(W, 1))
    def forward(s, ids, num, lens, sc):
        x = torch.relu(s.inp(torch.cat([s.emb(ids), num], -1)))
        p = torch.nn.utils.rnn.pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=False)
        y, _ = s.gru(p); y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=ids.shape[1])
        pad = torch.arange(ids.shape[1])[None] >= lens[:, None]
        return s.head(torch.cat([torch.relu(y.masked_fill(pad[..., None], -1e4).max(1).values), sc], -1)).squeeze(-1)
off = d.token_offsets
def batch(rows):
    lens = [max(1, off[i + 1] - off[i]) for i in rows]; L = max(lens)
    ids = torch.zeros(len(rows), L, dtype=torch.long); num = torch.zeros(len(rows), L, 3 + HD)
    for j, i in enumerate(rows):
        a, b = off[i], off[i + 1]; n = b - a
        if not n: continue
        ids[j, :n] = torch.from_numpy(d.token_ids[a:b])
        num[j, :n, 0] = torch.from_numpy(np.maximum(d.token_logprobs[a:b], -20)).float()
        num[j, :n, 1] = torch.from_numpy(d.token_entropies[a:b]).float()
        num[j, :n, 2] = torch.arange(n) / 16
        if HD: num[j, :n, 3:] = torch.from_numpy(Hl[a:b])
    return ids, num, torch.tensor(lens), S[rows]
net = Net(); opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)
pw = torch.tensor((1 - labels[~held].mean()) / labels[~held].mean())
rng = np.random.default_rng(0); y = labels[held]
t = time.time()
for ep in range(EPOCHS):
    net.train()
    for st in range(0, len(train_rows), 128):
        rows = rng.permutation(train_rows)[:0] if False else None
    order = rng.permutation(train_rows)
    for st in range(0, len(order), 128):
        rows = order[st:st + 128]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(*batch(rows)), y_all[rows], pos_weight=pw)
        opt.zero_grad(); loss.backward(); opt.step()
    net.eval()
    with torch.no_grad():
        z = torch.cat([net(*batch(held_rows[s:s + 512])) for s in range(0, len(held_rows), 512)]).numpy()
    r = {rec: float((z >= np.sort(z[y])[int((1 - rec) * y.sum())]).mean()) for rec in (0.95, 0.985, 0.995)}
    print(f"layer {LAYER} ep {ep} AUROC {auroc(z, y):.4f} esc {r} {time.time() - t:.0f}s", flush=True)
