# Feasibility: small model greedy trajectories + exact step labels (+ min_prob), batched.
import json, sys, math, torch
from decoding import HFBackend, StepRequest
from cascade.embedded import embedded_path, EMBEDDED_DELIMITER
from bench.tasks import generate_split, check_step
from cascade.answer import extract_answer
torch.set_num_threads(1)
n = int(sys.argv[1]); out = sys.argv[2]
small = HFBackend.from_pretrained(embedded_path("small"), step_delimiter="\n", name="embedded:small")
probs = [p.problem for p in generate_split("train", n)]
B = 64
with open(out, "w") as f:
    for start in range(0, n, B):
        batch = probs[start:start+B]
        ctx = {i: "" for i in range(len(batch))}
        steps = {i: [] for i in range(len(batch))}
        active = list(range(len(batch)))
        for k in range(16):
            if not active: break
            reqs = [StepRequest(f"r{start+i}", batch[i], ctx[i], 24) for i in active]
            outs = small.next_steps(reqs)
            nxt = []
            for i, o in zip(active, outs):
                text = o.text[:-1] if o.text.endswith("\n") else o.text
                lines = [l for l in ctx[i].split("\n") if l]
                ok = check_step(batch[i], lines, text.strip())
                minp = min(math.exp(l) for l in o.logprobs) if o.logprobs else 1.0
                steps[i].append({"context": ctx[i], "draft": o.text, "ok": bool(ok), "min_prob": minp,
                                 "mean_lp": sum(o.logprobs)/max(1,len(o.logprobs)), "ids": list(o.token_ids), "lps": list(o.logprobs), "ents": list(o.entropies)})
                ctx[i] += o.text if o.text.endswith("\n") else o.text + "\n"
                if o.stop_reason == "eos" or extract_answer(text) is not None or not o.text:
                    small.release(f"r{start+i}")
                else:
                    nxt.append(i)
            active = nxt
        for i in range(len(batch)):
            small.release(f"r{start+i}")
            f.write(json.dumps({"problem": batch[i], "steps": steps[i]}) + "\n")
        print(start + len(batch), flush=True)
