"""Loopback load test of the policy server: requests/s and p50 / p99 latency at the tiny size.

  python -m benchmarks.bench_serve [--clients=8 --requests=160 --new=8 --batch_wait_ms=5]

Starts `python -m flexolmo_jax.serve` on a tiny random merged model (tests/test_serve.py's, three
experts), warms every shape bucket up, then `--clients` threads send `--requests` requests in
all, round-robin over the policies, to /score, to /generate (greedy, `--new` tokens), and to
/generate with "stream": true (latency to the last line); prints a markdown table. Bounded: each request times out after 60 s and the server is killed at
the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import test_serve  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXTS = ["The sum of 2 and 3 is 5.", "def f(x): return x + 1", "Breaking news: rain today."]


def _body(endpoint, i, new):
  policy = list(test_serve.POLICIES)[i % len(test_serve.POLICIES)]
  if endpoint == "score":
    return {"policy": policy, "context": "Q: ", "continuation": TEXTS[i % len(TEXTS)]}
  return {"policy": policy, "prompt": TEXTS[i % len(TEXTS)], "max_new_tokens": new,
          "stream": endpoint == "stream"}


def _load(port, endpoint, clients, requests, new):
  """(requests/s, p50 ms, p99 ms) of `requests` requests from `clients` concurrent clients."""
  def one(i):
    start = time.perf_counter()
    path = "/score" if endpoint == "score" else "/generate"
    status, reply = test_serve.request(port, "POST", path, _body(endpoint, i, new))
    if status != 200:
      raise RuntimeError(f"{endpoint} request {i}: {status} {reply}")
    return time.perf_counter() - start

  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    latencies = np.asarray(list(pool.map(one, range(requests))))
  wall = time.perf_counter() - start
  return requests / wall, 1e3 * np.percentile(latencies, 50), 1e3 * np.percentile(latencies, 99)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--clients", type=int, default=8)
  parser.add_argument("--requests", type=int, default=160)
  parser.add_argument("--new", type=int, default=8)
  parser.add_argument("--batch_wait_ms", type=float, default=5.0)
  args = parser.parse_args()

  root = pathlib.Path(tempfile.mkdtemp(prefix="bench_serve"))
  model_dir, _, _ = test_serve.make_model_dir(root)
  (root / "policies.json").write_text(json.dumps({"policies": test_serve.POLICIES}))
  port = test_serve.free_port()
  proc = subprocess.Popen(
      [sys.executable, "-m", "flexolmo_jax.serve", f"--model={model_dir}",
       f"--policies={root / 'policies.json'}", f"--audit_log={root / 'audit.jsonl'}",
       f"--port={port}", f"--max_batch={args.clients}", f"--batch_wait_ms={args.batch_wait_ms}",
       f"--max_new_tokens={max(args.new, 1)}"], cwd=REPO)
  try:
    deadline = time.time() + 120
    while True:
      try:
        if test_serve.request(port, "GET", "/health", timeout=2)[0] == 200:
          break
      except OSError:
        if time.time() > deadline or proc.poll() is not None:
          raise SystemExit("the server did not start") from None
        time.sleep(0.2)
    rows = []
    for endpoint in ("score", "generate", "stream"):
      _load(port, endpoint, args.clients, 3 * args.clients, args.new)  # Warm-up: compiles.
      rps, p50, p99 = _load(port, endpoint, args.clients, args.requests, args.new)
      rows.append(f"| {endpoint} | {args.clients} | {args.requests} | {rps:.1f} | {p50:.1f} | "
                  f"{p99:.1f} |")
  finally:
    proc.kill()
    proc.wait()
  print("| endpoint | clients | requests | requests/s | p50 ms | p99 ms |")
  print("|---|---|---|---|---|---|")
  print("\n".join(rows))


if __name__ == "__main__":
  main()
