"""Loopback load test of the policy server with API keys: good, bad and slow clients at once.

  python -m benchmarks.bench_serve [--clients=8 --requests=160 --new=8 --batch_wait_ms=5 \
      --bad_clients=2 --slow_clients=2 --slow_body_s=1]

Starts `python -m flexolmo_jax.serve --api_keys=...` on a tiny random merged model (tests/
test_serve.py's, three experts), warms every shape bucket up, then per endpoint (/score, /generate
greedy with `--new` tokens, /generate streamed: latency to the last line) runs at once:
- `--clients` good clients sending `--requests` requests in all, round-robin over the policies;
- `--bad_clients` clients sending, in turn, no key (401), a wrong secret for a real key id (401,
  one scrypt on the server each) and a policy outside their key's grant (403);
- `--slow_clients` clients that send half a body, wait `--slow_body_s`, then the rest (200).
Prints requests/s, p50 and p99 for the good clients, the bad and slow counts, and checks that the
audit log holds one closing line per request sent (and a `started` line per stream) with an intact
hash chain. Bounded: each request times out after 60 s; the server is stopped at the end.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import itertools
import json
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags
import numpy as np

from flexolmo_jax import api_keys, audit, cli

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import test_serve  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
TEXTS = ["The sum of 2 and 3 is 5.", "def f(x): return x + 1", "Breaking news: rain today."]

FLAGS = flags.FLAGS
flags.DEFINE_integer("clients", 8, "Concurrent good clients (also the server's --max_batch).")
flags.DEFINE_integer("requests", 160, "Good requests per endpoint.")
flags.DEFINE_integer("new", 8, "Tokens per generation.")
flags.DEFINE_float("batch_wait_ms", 5.0, "The server's --batch_wait_ms.")
flags.DEFINE_integer("bad_clients", 2, "Concurrent clients sending 401 / 403 requests.")
flags.DEFINE_integer("slow_clients", 2, "Concurrent clients that upload their body slowly.")
flags.DEFINE_float("slow_body_s", 1.0, "How long a slow client pauses inside its body.")


def _body(endpoint, i, new):
  policy = list(test_serve.POLICIES)[i % len(test_serve.POLICIES)]
  if endpoint == "score":
    return {"policy": policy, "context": "Q: ", "continuation": TEXTS[i % len(TEXTS)]}
  return {"policy": policy, "prompt": TEXTS[i % len(TEXTS)], "max_new_tokens": new,
          "stream": endpoint == "stream"}


def _send(port, endpoint, body, authorization=None, pause_s=0.0):
  """The status of one request on a fresh connection (its whole body read); with `pause_s`, the
  body is sent in two halves that far apart."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
  data = json.dumps(body).encode()
  conn.putrequest("POST", "/score" if endpoint == "score" else "/generate")
  conn.putheader("Content-Type", "application/json")
  conn.putheader("Content-Length", str(len(data)))
  if authorization:
    conn.putheader("Authorization", authorization)
  conn.endheaders()
  conn.send(data[:len(data) // 2])
  time.sleep(pause_s)
  conn.send(data[len(data) // 2:])
  resp = conn.getresponse()
  resp.read()
  conn.close()
  return resp.status


class Counter:
  """Thread-safe counts of requests sent, by kind."""

  def __init__(self):
    self.lock, self.counts = threading.Lock(), {}

  def add(self, kind, endpoint, status):
    with self.lock:
      self.counts[(kind, endpoint, status)] = self.counts.get((kind, endpoint, status), 0) + 1

  def total(self, kind=None, endpoint=None, status=None):
    return sum(n for key, n in self.counts.items()
               if all(want in (None, got) for want, got in zip((kind, endpoint, status), key)))


def _load(port, endpoint, keys, counter, new):
  """(requests/s, p50 ms, p99 ms) of the good clients while bad and slow clients run."""
  stop = threading.Event()
  good, narrow = f"Bearer {keys['good']}", f"Bearer {keys['narrow']}"
  wrong = f"Bearer good.{'x' * 43}"

  def bad_client(worker):
    for i in itertools.count(worker):
      if stop.is_set():
        return
      auth, policy = [(None, "all"), (wrong, "all"), (narrow, "all")][i % 3]
      status = _send(port, endpoint, {**_body(endpoint, i, new), "policy": policy}, auth)
      if status not in (401, 403):
        raise RuntimeError(f"bad client got {status}")
      counter.add("bad", endpoint, status)

  def slow_client(worker):
    for i in itertools.count(worker):
      if stop.is_set():
        return
      status = _send(port, endpoint, _body(endpoint, i, new), good, FLAGS.slow_body_s)
      if status != 200:
        raise RuntimeError(f"slow client got {status}")
      counter.add("slow", endpoint, status)

  def one(i):
    start = time.perf_counter()
    status = _send(port, endpoint, _body(endpoint, i, new), good)
    if status != 200:
      raise RuntimeError(f"{endpoint} request {i}: {status}")
    counter.add("good", endpoint, status)
    return time.perf_counter() - start

  with concurrent.futures.ThreadPoolExecutor(FLAGS.bad_clients + FLAGS.slow_clients) as others:
    background = [others.submit(bad_client, w) for w in range(FLAGS.bad_clients)]
    background += [others.submit(slow_client, w) for w in range(FLAGS.slow_clients)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(FLAGS.clients) as pool:
      latencies = np.asarray(list(pool.map(one, range(FLAGS.requests))))
    wall = time.perf_counter() - start
    stop.set()
    for f in background:
      f.result()
  return (FLAGS.requests / wall, 1e3 * np.percentile(latencies, 50),
          1e3 * np.percentile(latencies, 99))


def main(argv):
  del argv
  cli.default_verbosity()
  root = pathlib.Path(tempfile.mkdtemp(prefix="bench_serve"))
  model_dir, _, _ = test_serve.make_model_dir(root)
  (root / "policies.json").write_text(json.dumps({"policies": test_serve.POLICIES}))
  keys = {"good": api_keys.add_key(root / "keys.json", "good", list(test_serve.POLICIES), "all"),
          "narrow": api_keys.add_key(root / "keys.json", "narrow", ["public-only"], None)}
  port, log = test_serve.free_port(), root / "audit.jsonl"
  proc = test_serve.start_server(
      port, [f"--model={model_dir}", f"--policies={root / 'policies.json'}",
             f"--api_keys={root / 'keys.json'}", f"--audit_log={log}",
             f"--max_batch={FLAGS.clients}", f"--batch_wait_ms={FLAGS.batch_wait_ms}",
             f"--max_new_tokens={max(FLAGS.new, 1)}"], timeout=120, capture=False)
  counter = Counter()
  try:
    rows = []
    for endpoint in ("score", "generate", "stream"):
      for i in range(3 * FLAGS.clients):  # Warm-up: compiles every bucket.
        counter.add("warm-up", endpoint, _send(port, endpoint, _body(endpoint, i, FLAGS.new),
                                               f"Bearer {keys['good']}"))
      before = {k: counter.total(k) for k in ("bad", "slow")}
      rps, p50, p99 = _load(port, endpoint, keys, counter, FLAGS.new)
      rows.append(f"| {endpoint} | {FLAGS.clients} | {FLAGS.requests} | {rps:.1f} | {p50:.1f} | "
                  f"{p99:.1f} | {counter.total('bad') - before['bad']} | "
                  f"{counter.total('slow') - before['slow']} |")
  finally:
    # SIGTERM: uvicorn finishes the requests in hand, so a stream's `finished` line, written
    # just after its last byte, is not cut off.
    proc.terminate()
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  lines = [json.loads(l) for l in log.read_text().splitlines()]
  closing = [l for l in lines if l["event"] != "started"]
  started = [l for l in lines if l["event"] == "started"]
  print("| endpoint | good clients | good requests | requests/s | p50 ms | p99 ms | "
        "bad requests (401/403) | slow requests |")
  print("|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  streams = counter.total(endpoint="stream", status=200)
  print(f"\nrequests sent: {counter.total()} (401: {counter.total(status=401)}, 403: "
        f"{counter.total(status=403)}, 200: {counter.total(status=200)}, of them streams: "
        f"{streams}); audit log: {len(closing)} closing lines, {len(started)} started lines, "
        f"chain check {audit.verify(log)}")
  if len(closing) != counter.total() or len(started) != streams:
    raise SystemExit("the audit log does not hold one closing line per request and one started "
                     "line per stream")


if __name__ == "__main__":
  app.run(main)
