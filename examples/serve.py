"""Start `cascade serve` on the embedded pair, query it with the official `openai` client
(a plain completion, then a streamed one, step by step), and stop it.

    python examples/serve.py "a=17;b=a+38;c=b-25;?c" --budget 300
"""

import argparse
import signal
import socket
import subprocess
import sys
import time

import httpx
from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("problem", nargs="?", default="a=17;b=a+38;c=b-25;d=c+a;?d")
parser.add_argument("--budget", type=float, default=300.0, help="hard cap, large-token equivalents")
args = parser.parse_args()

with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
url = f"http://127.0.0.1:{port}"
try:
    for _ in range(600):  # the models load first
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    response = client.completions.create(model="stepcascade", prompt=args.problem,
                                         extra_body={"budget": args.budget})
    summary = response.model_extra["cascade"]
    for step in summary["steps"]:
        print(f"{step['author']:>5}  cost {step['cost']:6.2f}  {step['text']}")
    print(f"answer {summary['answer']}  cost {summary['cost']:.2f} of {summary['budget']:g}  "
          f"escalation rate {summary['escalation_rate']:.0%}  usage {response.usage}")
    print("streamed:")
    for chunk in client.completions.create(model="stepcascade", prompt=args.problem, stream=True,
                                           extra_body={"budget": args.budget}):
        step = (chunk.model_extra.get("cascade") or {}).get("step")
        if step is not None:
            print(f"  {step['author']:>5}  {step['text']}", flush=True)
finally:
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=60)
