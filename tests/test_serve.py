"""Serving, against a real server on loopback: requests under different policies batched together
equal separately opted-out models (outputs and routing), every bad request gets its 4xx and the
server keeps serving, and the audit log holds one complete line per request after SIGKILL."""

import http.client
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from flexolmo_jax import checkpoint, merge, policies, scoring, serve
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data.tokenizer import load_tokenizer
from flexolmo_jax.generate import generate
from flexolmo_jax.model import init_params

REPO = pathlib.Path(__file__).resolve().parents[1]
NAMES = ["public", "math", "news"]
MODEL = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
             rope_theta=10_000.0, pad_token_id=0, eos_token_id=1, num_experts=3, top_k=2,
             expert_bias=True, expert_bias_init=-0.1)
POLICIES = {"public-only": ["public"], "no-news": ["public", "math"],
            "all": ["public", "math", "news"]}
LIMITS = ["--max_batch=8", "--batch_wait_ms=300", "--max_body_bytes=2048", "--max_tokens=48",
          "--max_new_tokens=8"]


def write_byte_tokenizer(path):
  """A byte-level tokenizer.json (pad 0, eos 1, then the 256 bytes): no training needed."""
  # pylint: disable-next=g-import-not-at-top
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  vocab = {"<|pad|>": 0, "<|endoftext|>": 1}
  vocab.update({c: i + 2 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.save(str(path))


def make_model_dir(root):
  """A tiny merged artifact (random weights, biased router) with a tokenizer beside it."""
  config = ModelConfig(**MODEL)
  params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
  # Spread the router rows so every expert wins some tokens.
  params["layers"]["mlp"]["router"] = params["layers"]["mlp"]["router"] * 50
  path = root / "merged"
  checkpoint.save_params_artifact(path, config, params, "merged", {"expert_names": NAMES})
  write_byte_tokenizer(path / "tokenizer.json")
  return path, config, params


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def request(port, method, path, body=None, raw=None, timeout=60):
  """(status, decoded JSON or text) of one request on a fresh connection."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
  resp = conn.getresponse()
  text = resp.read().decode()
  conn.close()
  try:
    return resp.status, json.loads(text)
  except json.JSONDecodeError:
    return resp.status, text


def start_server(port, args, *, timeout=60, capture=True):
  """`python -m flexolmo_jax.serve --port=PORT *args`, returned once /health answers."""
  pipe = subprocess.PIPE if capture else None
  proc = subprocess.Popen([sys.executable, "-m", "flexolmo_jax.serve", f"--port={port}", *args],
                          cwd=REPO, stdout=pipe, stderr=subprocess.STDOUT if capture else None)
  deadline = time.time() + timeout
  while True:
    try:
      if request(port, "GET", "/health", timeout=2)[0] == 200:
        return proc
    except OSError:
      pass
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      pytest.fail("server did not start: "
                  + (proc.stdout.read().decode()[-3000:] if capture else "see its output"))
    time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve")
  model_dir, config, params = make_model_dir(root)
  (root / "policies.json").write_text(json.dumps({"policies": POLICIES}))
  port, audit = free_port(), root / "audit.jsonl"
  proc = start_server(port, [f"--model={model_dir}", f"--policies={root / 'policies.json'}",
                             f"--audit_log={audit}", "--insecure_no_auth", *LIMITS])
  state = {"port": port, "proc": proc, "audit": audit, "config": config, "params": params,
           "tokenizer": load_tokenizer(str(model_dir)), "audited": 0}
  yield state
  if proc.poll() is None:
    proc.kill()
  proc.wait()


def audited(server, status, body, path="/score", raw=None):
  """Sends an audited request, counts it, and waits for its closing audit line (a stream's comes
  just after its last byte)."""
  got = request(server["port"], "POST", path, body, raw)
  server["audited"] += 1
  deadline = time.time() + 10
  while len(audit_lines(server)) < server["audited"] and time.time() < deadline:
    time.sleep(0.05)
  assert got[0] == status, got
  return got[1]


def audit_lines(server):
  """The audit lines that close a request (a stream's "started" lines left out)."""
  lines = [json.loads(line) for line in server["audit"].read_text().splitlines()]
  return [line for line in lines if line["event"] != "started"]


SCORES = [("public-only", "The sum of 2 and 3", " is 5."), ("no-news", "Breaking: ", "rain."),
          ("all", "", "def f(x): return x"), ("all", "Once upon", " a time")]
GENERATIONS = [("public-only", "Hello"), ("no-news", "x = "), ("all", "Today the")]


def _opted_out(server, policy):
  drop = [n for n in NAMES if n not in POLICIES[policy]]
  if not drop:
    return server["config"], server["params"], NAMES
  return merge.opt_out(server["config"], server["params"], NAMES, drop)


@pytest.mark.slow
def test_mixed_policies_in_one_batch_equal_opted_out_models(server):
  results = {}

  def send(i, path, body):
    results[i] = request(server["port"], "POST", path, body)

  bodies = [("/score", {"policy": p, "context": c, "continuation": x}) for p, c, x in SCORES]
  bodies += [("/generate", {"policy": p, "prompt": t, "max_new_tokens": 6}) for p, t in
             GENERATIONS]
  threads = [threading.Thread(target=send, args=(i, *b)) for i, b in enumerate(bodies)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  server["audited"] += len(bodies)
  assert all(results[i][0] == 200 for i in results), results

  lines = audit_lines(server)[-len(bodies):]
  score_lines = [l for l in lines if l["endpoint"] == "score"]
  # All four score requests, under three policies, ran as one batch.
  assert len({l["batch"] for l in score_lines}) == 1
  assert {l["policy"] for l in score_lines} == {"public-only", "no-news", "all"}

  tok = server["tokenizer"]
  for i, (policy, context, continuation) in enumerate(SCORES):
    config, params, kept = _opted_out(server, policy)
    ctx, cont = scoring.Scorer(config, params, tok).encode_pair(context, continuation)
    seq = np.asarray([ctx + cont], np.int32)
    # The opted-out model, with no mask: its log-probabilities and its top-k choices.
    logp, is_max, counts = serve._jitted_score_and_route(config)(
        params, seq[:, :-1], seq[:, 1:], np.ones_like(seq[:, 1:], bool),
        np.ones((1, len(kept)), bool))
    span = slice(len(ctx) - 1, seq.shape[1] - 1)
    got = results[i][1]
    assert got["policy"] == policy and got["tokens"] == cont
    np.testing.assert_allclose(got["token_logprobs"], logp[0, span], rtol=1e-5, atol=1e-5)
    assert got["greedy"] == bool(np.all(is_max[0, span]))
    want_routed = {n: int(round(c)) for n, c in zip(kept, np.asarray(counts[0])) if c > 0}
    line = next(l for l in score_lines if l["experts_allowed"] == list(POLICIES[policy])
                and sum(l["experts_routed"].values()) == sum(want_routed.values()))
    assert line["experts_routed"] == want_routed
    assert set(line["experts_routed"]) <= set(POLICIES[policy])

  for j, (policy, prompt) in enumerate(GENERATIONS):
    config, params, _ = _opted_out(server, policy)
    want = generate(config, params, [tok.encode(prompt)], max_new_tokens=6, eos_id=tok.eos_id,
                    pad_id=tok.pad_id)[0].tolist()
    got = results[len(SCORES) + j][1]
    if tok.eos_id in want:
      want = want[:want.index(tok.eos_id) + 1]
    assert got["tokens"] == want and got["text"] == tok.decode(want)


@pytest.mark.slow
def test_stream_yields_the_same_tokens(server):
  # 7 tokens arrive in two chunks (stream_chunk 4), each batched again with whatever is queued.
  body = {"experts": ["public", "news"], "prompt": "Hello", "max_new_tokens": 7}
  plain = audited(server, 200, body, "/generate")
  streamed = audited(server, 200, {**body, "stream": True}, "/generate")
  lines = [json.loads(l) for l in streamed.splitlines()]
  assert lines[-1]["done"] and lines[-1]["tokens"] == plain["tokens"]
  assert [l["token"] for l in lines[:-1]] == plain["tokens"]
  assert "".join(l["text"] for l in lines[:-1]) == plain["text"] == lines[-1]["text"]
  line = audit_lines(server)[-1]
  assert line["status"] == 200 and line["experts_allowed"] == ["public", "news"]
  assert sum(line["experts_routed"].values()) == sum(audit_lines(server)[-2][
      "experts_routed"].values())


@pytest.mark.slow
def test_sampled_generation_reproducible_for_a_seed(server):
  body = {"policy": "no-news", "prompt": "Once", "max_new_tokens": 8, "temperature": 0.8,
          "top_k": 20, "seed": 3}
  first = audited(server, 200, body, "/generate")
  assert 1 <= len(first["tokens"]) <= 8
  assert audited(server, 200, body, "/generate")["tokens"] == first["tokens"]


BAD = [
    (400, "/score", b"{not json"),
    (400, "/score", b"[1, 2]"),
    (400, "/score", {"policy": "secret", "continuation": "x"}),
    (400, "/score", {"experts": ["public", "medical"], "continuation": "x"}),
    (400, "/score", {"experts": ["math"], "continuation": "x"}),
    (400, "/score", {"policy": "all", "experts": ["public"], "continuation": "x"}),
    (400, "/score", {"continuation": "x"}),
    (400, "/score", {"policy": "all", "continuation": "x", "temperature": 1}),
    (400, "/score", {"policy": "all", "continuation": 5}),
    (400, "/score", {"policy": "all"}),
    (413, "/score", {"policy": "all", "continuation": "y" * 100}),
    (413, "/generate", {"policy": "all", "prompt": "z" * 3000}),
    (400, "/generate", {"policy": "all", "prompt": "a", "max_new_tokens": 9}),
    (400, "/generate", {"policy": "all", "prompt": "a", "max_new_tokens": True}),
    (400, "/generate", {"policy": "all", "prompt": "a", "top_p": 0}),
]


@pytest.mark.parametrize("status,path,body", BAD)
@pytest.mark.slow
def test_bad_request_refused_then_served(server, status, path, body):
  raw = body if isinstance(body, bytes) else None
  got = audited(server, status, None if raw else body, path, raw)
  assert isinstance(got, dict) and got["error"]
  line = audit_lines(server)[-1]
  assert line["status"] == status and line["error"] == got["error"]
  ok = audited(server, 200, {"policy": "public-only", "continuation": " ok"})
  assert ok["num_tokens"] == 3


@pytest.mark.slow
def test_unknown_policy_message_lists_known(server):
  got = audited(server, 400, {"policy": "secret", "continuation": "x"})
  assert "public-only" in got["error"] and "no-news" in got["error"]
  got = audited(server, 400, {"experts": ["public", "medical"], "continuation": "x"})
  assert "medical" in got["error"] and "news" in got["error"]


@pytest.mark.slow
def test_audit_log_complete_after_sigkill(server):
  threads = [threading.Thread(target=request, args=(server["port"], "POST", "/score",
                                                    {"policy": "no-news", "continuation": "k"}))
             for _ in range(5)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  server["audited"] += len(threads)
  os.kill(server["proc"].pid, signal.SIGKILL)
  server["proc"].wait()
  raw = server["audit"].read_bytes()
  assert raw.endswith(b"\n")
  lines = [json.loads(l) for l in raw.decode().splitlines()]
  lines = [l for l in lines if l["event"] != "started"]
  assert len(lines) == server["audited"]
  for line in lines:
    assert {"time", "endpoint", "status"} <= set(line)
    if line["status"] == 200:
      assert line["experts_routed"] and set(line["experts_routed"]) <= set(
          line["experts_allowed"])


def test_policies_file_validated(tmp_path):
  path = tmp_path / "p.json"
  path.write_text(json.dumps({"policies": POLICIES}))
  assert policies.load_policies(path, NAMES)["no-news"] == ("public", "math")
  for bad, message in [({"policies": {"x": ["public", "legal"]}}, "legal"),
                       ({"policies": {"x": ["math"]}}, "must always be allowed"),
                       ({"policies": {"x": ["public", "public"]}}, "twice"),
                       ({"policies": {}}, "no policy"), ({"rules": {}}, "exactly")]:
    path.write_text(json.dumps(bad))
    with pytest.raises(policies.PolicyError, match=message):
      policies.load_policies(path, NAMES)
  path.write_text("{oops")
  with pytest.raises(policies.PolicyError, match="not valid JSON"):
    policies.load_policies(path, NAMES)
  _, allowed, mask = policies.resolve({"a": ("public",)}, NAMES, experts=["public", "news"])
  assert allowed == ("public", "news") and mask.tolist() == [True, False, True]


def test_policies_take_the_subset_syntax(tmp_path):
  path = tmp_path / "p.json"
  path.write_text(json.dumps({"policies": {"no-news": "-news", "everyone": "all",
                                           "math": "public+math"}}))
  assert policies.load_policies(path, NAMES) == {
      "no-news": ("public", "math"), "everyone": ("public", "math", "news"),
      "math": ("public", "math")}
  for bad, message in [("-public", "cannot drop 'public'"), ("math", "must always be allowed"),
                       ("public,math", r"join names with '\+'"), (["public", "-news"], "one subset")]:
    with pytest.raises(policies.PolicyError, match=message):
      policies.check_experts(bad, NAMES, "request")
  _, allowed, mask = policies.resolve({}, NAMES, experts="-math")
  assert allowed == ("public", "news") and mask.tolist() == [True, False, True]


def test_the_app_routes_every_endpoint_of_the_table(tmp_path, monkeypatch):
  echo = serve.Endpoint("echo", frozenset({"policy", "experts"}), lambda server, body, job: None,
                        lambda engine, jobs, masks: [{"routed": {}} for _ in jobs])
  monkeypatch.setitem(serve.ENDPOINTS, "echo", echo)
  config = ModelConfig(**MODEL)
  app = serve.make_app(config, init_params(config, jax.random.key(0)), NAMES, None,
                       {"all": tuple(NAMES)}, tmp_path / "audit.jsonl", keys=None)
  assert {(r.path, tuple(sorted(r.methods))) for r in app.routes} == {
      ("/score", ("POST",)), ("/generate", ("POST",)), ("/echo", ("POST",)),
      ("/health", ("GET", "HEAD"))}
