"""Serving security: API keys (401 / 403), request hygiene (400 for each bad value, 415, Host, 503,
504), a hash-chained audit log whose edits are found, sampling that never compiles again, and,
against a real server on loopback, a stream stopped on disconnect, SIGHUP log reopening and a
`started` line that survives SIGKILL."""

import http.client
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from starlette.testclient import TestClient

from flexolmo_jax import api_keys, audit, serve
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data.tokenizer import load_tokenizer
from flexolmo_jax.generate import Sampling, filter_logits
from flexolmo_jax.model import init_params
import test_serve

NAMES = test_serve.NAMES
POLICIES = {k: tuple(v) for k, v in test_serve.POLICIES.items()}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
  """alice: two policies, no explicit experts; bob: policy "all", explicit lists within
  public+math. Returns (path, {key id: key})."""
  path = tmp_path_factory.mktemp("keys") / "keys.json"
  secrets = {"alice": api_keys.add_key(path, "alice", ["public-only", "no-news"], None),
             "bob": api_keys.add_key(path, "bob", ["all"], "public+math")}
  return path, secrets


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  config = ModelConfig(**test_serve.MODEL)
  params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
  root = tmp_path_factory.mktemp("tok")
  test_serve.write_byte_tokenizer(root / "tokenizer.json")
  return config, params, load_tokenizer(str(root))


def make_client(model, path, keys_file, **limits):
  config, params, tokenizer = model
  keys = api_keys.Keys(keys_file[0], POLICIES, NAMES) if keys_file else None
  app = serve.make_app(config, params, NAMES, tokenizer, POLICIES, path,
                       serve.Limits(**limits), keys=keys)
  return TestClient(app, base_url="http://localhost")


def post(client, path, body, key=None, **headers):
  headers = {"Content-Type": "application/json", **headers}
  if key:
    headers["Authorization"] = f"Bearer {key}"
  data = body if isinstance(body, (bytes, str)) else json.dumps(body)
  return client.post(path, content=data, headers=headers)


def lines(path):
  return [json.loads(l) for l in path.read_text().splitlines()]


@pytest.fixture()
def client(model, keys_file, tmp_path):
  with make_client(model, tmp_path / "audit.jsonl", keys_file) as c:
    c.audit_path = tmp_path / "audit.jsonl"
    yield c


SCORE = {"policy": "public-only", "continuation": "x"}


def test_missing_or_bad_key_is_401(client, keys_file):
  alice = keys_file[1]["alice"]
  cases = [{}, {"Authorization": alice}, {"Authorization": "Basic " + alice},
           {"Authorization": "Bearer " + alice[:-1] + ("A" if alice[-1] != "A" else "B")},
           {"Authorization": "Bearer carol." + alice.split(".", 1)[1]},
           {"Authorization": "Bearer alice"}]
  for headers in cases:
    got = post(client, "/score", SCORE, **headers)
    assert got.status_code == 401, (headers, got.text)
    assert got.headers["www-authenticate"] == "Bearer" and "Bearer" in got.json()["error"]
  audited = lines(client.audit_path)
  assert [l["status"] for l in audited] == [401] * len(cases)
  assert all(l["key_id"] is None and l["event"] == "request" for l in audited)
  assert len({l["request_id"] for l in audited}) == len(cases)


def test_outside_the_grant_is_403(client, keys_file):
  alice, bob = keys_file[1]["alice"], keys_file[1]["bob"]
  for key, body, message in [
      (alice, {"policy": "all", "continuation": "x"}, "may not use policy 'all'"),
      (alice, {"experts": ["public"], "continuation": "x"}, "may not list experts"),
      (bob, {"policy": "no-news", "continuation": "x"}, "may not use policy 'no-news'"),
      (bob, {"experts": ["public", "news"], "continuation": "x"},
       r"may not use experts \['news'\]"),
      (bob, {"experts": "-math", "continuation": "x"}, r"may not use experts \['news'\]"),
      (bob, {"experts": "all", "prompt": "x"}, "may not use experts")]:
    path = "/generate" if "prompt" in body else "/score"
    got = post(client, path, body, key)
    assert got.status_code == 403, (body, got.text)
    assert re.search(message, got.json()["error"]), got.json()
  # A policy the server does not know is a 400 that lists only the caller's policies.
  got = post(client, "/score", {"policy": "secret", "continuation": "x"}, alice)
  assert got.status_code == 400 and "public-only" in got.json()["error"]
  assert "'all'" not in got.json()["error"]
  audited = lines(client.audit_path)
  assert [l["status"] for l in audited] == [403] * 6 + [400]
  assert [l["key_id"] for l in audited] == ["alice", "alice", "bob", "bob", "bob", "bob", "alice"]


BAD_VALUES = [
    ('{"policy": "all", "prompt": "a", "temperature": NaN}', "non-finite number NaN"),
    ('{"policy": "all", "prompt": "a", "temperature": Infinity}', "non-finite number Infinity"),
    ('{"policy": "all", "prompt": "a", "top_p": -Infinity}', "non-finite number -Infinity"),
    ('{"policy": "all", "prompt": "a", "temperature": 1e999}', "non-finite number 1e999"),
    ('{"policy": "all", "prompt": "a", "temperature": -0.5}', "temperature"),
    ('{"policy": "all", "prompt": "a", "top_k": 1000000000000000000000000000000}', "top_k"),
    ('{"policy": "all", "prompt": "a", "top_k": -1}', "top_k"),
    ('{"policy": "all", "prompt": "a", "top_k": 513}', r"top_k must lie in \[0, 512\]"),
    ('{"policy": "all", "prompt": "a", "top_p": 1.5}', "top_p"),
    ('{"policy": "all", "prompt": "a", "seed": -1}', "seed"),
    ('{"policy": "all", "prompt": "a", "max_new_tokens": 1000000000000000000000}',
     "max_new_tokens"),
    ('{"policy": "all", "prompt": "a", "experts": ' + "[" * 20000 + "]" * 20000 + "}",
     "nested deeper"),
    ('{"policy": "all", "prompt": "a", "seed": [[[[[[[[1]]]]]]]]}', "nested deeper"),
    ('{"policy": "all", "prompt": "[[[[[[[[[[[[", "top_p": "]]]]"}', "wrong type"),
]


@pytest.mark.parametrize("body,message", BAD_VALUES, ids=range(len(BAD_VALUES)))
def test_each_bad_value_is_400(model, tmp_path, body, message):
  with make_client(model, tmp_path / "a.jsonl", None, max_body_bytes=100_000) as c:
    got = post(c, "/generate", body)
  assert got.status_code == 400, got.text
  assert re.search(message, got.json()["error"]), got.json()
  assert lines(tmp_path / "a.jsonl")[0]["status"] == 400


def test_content_type_host_and_health(client, keys_file):
  alice = keys_file[1]["alice"]
  for content_type in ["text/plain", "application/x-www-form-urlencoded", None]:
    headers = {"Authorization": f"Bearer {alice}"}
    if content_type:
      headers["Content-Type"] = content_type
    got = client.post("/score", content=json.dumps(SCORE), headers=headers)
    assert got.status_code == 415 and "application/json" in got.json()["error"]
  # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host.
  got = post(client, "/score", SCORE, alice, Host="evil.example")
  assert got.status_code == 400 and got.text == "Invalid host header"
  assert client.get("/health", headers={"Host": "evil.example"}).status_code == 400
  got = client.get("/health")
  assert got.status_code == 200 and got.json() == {"status": "ok"}
  assert [l["status"] for l in lines(client.audit_path)] == [415] * 3


def test_full_queue_is_503_and_deadline_is_504(model, tmp_path, monkeypatch):
  started, release = threading.Event(), threading.Event()

  def run(engine, jobs, masks):
    del engine, masks
    started.set()
    release.wait(30)
    return [{"routed": {"public": 1}} for _ in jobs]

  monkeypatch.setitem(serve.ENDPOINTS, "block", serve.Endpoint(
      "block", frozenset({"policy", "experts"}), lambda server, body, job: None, run))
  path = tmp_path / "a.jsonl"
  with make_client(model, path, None, max_queue=1, request_timeout_s=1.0) as c:
    first = {}
    thread = threading.Thread(target=lambda: first.update(r=post(c, "/block", {"policy": "all"})))
    thread.start()
    assert started.wait(30)
    got = post(c, "/block", {"policy": "all"})
    assert got.status_code == 503 and "--max_queue" in got.json()["error"]
    assert got.headers["retry-after"] == "1"
    thread.join()
    assert first["r"].status_code == 504 and "--request_timeout_s" in first["r"].json()["error"]
    release.set()
    # The slot is free again and the worker still serves.
    assert post(c, "/block", {"policy": "all"}).status_code == 200
  assert [l["status"] for l in lines(path)] == [503, 504, 200]


def test_audit_chain_verifies_and_an_edit_is_found(client, keys_file, tmp_path):
  alice = keys_file[1]["alice"]
  for body in [SCORE, {"policy": "all", "continuation": "x"}, {"policy": "x"}]:
    post(client, "/score", body, alice)
  post(client, "/score", SCORE)
  path = client.audit_path
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert audit.verify(path) == (4, None)
  raw = path.read_text().splitlines()
  assert [json.loads(l)["seq"] for l in raw] == [1, 2, 3, 4]
  # Hide the 403: the edited line no longer hashes to the next line's "prev".
  edited = raw[1].replace('"status": 403', '"status": 200')
  assert edited != raw[1]
  tampered = tmp_path / "tampered.jsonl"
  tampered.write_text("\n".join([raw[0], edited, *raw[2:]]) + "\n")
  n, problem = audit.verify(tampered)
  assert n == 2 and "changed" in problem
  tampered.write_text("\n".join([raw[0], *raw[2:]]) + "\n")  # A line dropped.
  assert audit.verify(tampered)[0] == 2
  tampered.write_text("\n".join(raw[:3]) + "\n" + raw[3][:-5])  # A torn last line.
  assert audit.verify(tampered) == (4, "the line is incomplete (no newline)")


def test_audit_reopen_continues_the_chain(tmp_path):
  path = tmp_path / "audit.jsonl"
  log = audit.AuditLog(path)
  log.write([{"n": 1}, {"n": 2}])
  os.rename(path, tmp_path / "audit.1")
  log.request_reopen()
  log.write([{"n": 3}])
  log.close()
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert audit.verify(tmp_path / "audit.1") == (2, None)
  assert audit.verify(path) == (1, None)
  last = (tmp_path / "audit.1").read_bytes().splitlines()[-1]
  assert lines(path)[0]["prev"] == audit.line_hash(last) and lines(path)[0]["seq"] == 3
  # Opening an existing log continues its numbering and chain; a wider mode is narrowed.
  os.chmod(path, 0o644)
  audit.AuditLog(path).write([{"n": 4}])
  assert audit.verify(path) == (2, None) and stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_keys_file_validated(tmp_path):
  path = tmp_path / "keys.json"
  api_keys.add_key(path, "alice", ["no-news"], None)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert "alice." not in path.read_text()  # Only the salted hash is stored.
  with pytest.raises(ValueError, match="exists already"):
    api_keys.add_key(path, "alice", ["no-news"], None)
  with pytest.raises(ValueError, match="letters, digits"):
    api_keys.add_key(path, "../x", ["no-news"], None)
  with pytest.raises(ValueError, match="unknown policies"):
    api_keys.Keys(path, {"all": tuple(NAMES)}, NAMES)
  api_keys.add_key(path, "bob", [], "public+legal")
  with pytest.raises(ValueError, match="legal"):
    api_keys.Keys(path, POLICIES, NAMES)


def test_sampling_values_are_traced_and_capped():
  traced = Sampling(0.7, 10**30, 0.9).traced(512)
  assert traced.top_k == 512 and traced.top_k.dtype == np.int32
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  filtered = jax.jit(filter_logits)
  for sampling, kept in [(Sampling(1.0, top_p=0.8), [True, True, False, False]),
                         (Sampling(1.0, top_k=3), [True, True, True, False]),
                         # top-p on the renormalised top-k: 0.5 / 0.8 >= 0.6 leaves one token.
                         (Sampling(1.0, top_k=2, top_p=0.6), [True, False, False, False]),
                         (Sampling(0.5, top_k=10**9), [True] * 4)]:
    got = filtered(logits, sampling.traced(4))
    assert np.isfinite(np.asarray(got)).tolist() == [kept], sampling
  assert filtered._cache_size() == 1  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="finite"):
    Sampling(float("nan"))


# ----------------------------------------------------------------------------- with the model


@pytest.fixture(scope="module")
def model_client(model, keys_file, tmp_path_factory):
  path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
  with make_client(model, path, keys_file, max_new_tokens=8, batch_wait_ms=1) as c:
    c.audit_path = path
    yield c


@pytest.mark.slow
def test_new_sampling_values_never_compile(model_client, keys_file):
  bob = keys_file[1]["bob"]
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if "backend_compile" in event:
      compiles.append(event)

  def sample(temperature, top_p, top_k, seed):
    got = post(model_client, "/generate", {"policy": "all", "prompt": "Hello", "max_new_tokens": 8,
                                           "temperature": temperature, "top_p": top_p,
                                           "top_k": top_k, "seed": seed}, bob)
    assert got.status_code == 200, got.text
    return got.json()["tokens"]

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    sample(0.7, 0.9, 0, 0)  # Warm-up: compiles the decode and routing buckets.
    assert compiles, "the listener saw no compile at all"
    compiles.clear()
    outputs = [sample(0.5 + 0.01 * i, 0.5 + 0.025 * i, i * 20, i) for i in range(20)]
    assert compiles == []
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len({tuple(o) for o in outputs}) > 1  # The values did reach the sampler.


@pytest.mark.slow
def test_stream_audited_started_then_finished(model_client, keys_file):
  got = post(model_client, "/generate", {"experts": ["public", "math"], "prompt": "Hi",
                                         "max_new_tokens": 6, "stream": True},
             keys_file[1]["bob"])
  assert got.status_code == 200
  final = json.loads(got.text.splitlines()[-1])
  rid = got.headers["x-request-id"]
  mine = [l for l in lines(model_client.audit_path) if l["request_id"] == rid]
  assert [l["event"] for l in mine] == ["started", "finished"]
  assert mine[1]["status"] == 200 and mine[1]["key_id"] == "bob"
  assert sum(mine[1]["experts_routed"].values()) > 0
  assert set(mine[1]["experts_routed"]) <= {"public", "math"} and final["done"]
  assert audit.verify(model_client.audit_path)[1] is None


# ----------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def live(tmp_path_factory, keys_file):
  """A server with keys whose streams are slow (one token per batch, 300 ms batch wait)."""
  root = tmp_path_factory.mktemp("live")
  model_dir, _, _ = test_serve.make_model_dir(root)
  (root / "policies.json").write_text(json.dumps({"policies": test_serve.POLICIES}))
  port, path = test_serve.free_port(), root / "audit.jsonl"
  proc = test_serve.start_server(
      port, [f"--model={model_dir}", f"--policies={root / 'policies.json'}",
             f"--api_keys={keys_file[0]}", f"--audit_log={path}", "--max_new_tokens=64",
             "--stream_chunk=1", "--batch_wait_ms=300"], timeout=90)
  yield {"port": port, "proc": proc, "audit": path, "key": keys_file[1]["bob"]}
  if proc.poll() is None:
    proc.kill()
  proc.wait()


def open_stream(live, max_new_tokens=64):
  """A streamed generation with its first token line read: (connection, response, request id)."""
  conn = http.client.HTTPConnection("127.0.0.1", live["port"], timeout=120)
  conn.request("POST", "/generate", body=json.dumps(
      {"policy": "all", "prompt": "Once", "max_new_tokens": max_new_tokens, "stream": True}),
               headers={"Content-Type": "application/json",
                        "Authorization": f"Bearer {live['key']}"})
  resp = conn.getresponse()
  assert resp.status == 200
  assert "token" in json.loads(resp.readline())
  return conn, resp, resp.getheader("X-Request-Id")


def score_batch(live):
  """The batch number the server gave a fresh /score request (from the audit log)."""
  conn = http.client.HTTPConnection("127.0.0.1", live["port"], timeout=60)
  conn.request("POST", "/score", body=json.dumps({"policy": "all", "continuation": "k"}),
               headers={"Content-Type": "application/json",
                        "Authorization": f"Bearer {live['key']}"})
  resp = conn.getresponse()
  assert resp.status == 200, resp.read()
  rid = resp.getheader("X-Request-Id")
  conn.close()
  return next(l["batch"] for l in lines(live["audit"]) if l["request_id"] == rid)


@pytest.mark.slow
def test_disconnect_stops_the_stream(live):
  conn, resp, rid = open_stream(live)
  resp.close()
  conn.close()
  deadline = time.time() + 30
  while not [l for l in lines(live["audit"]) if l["request_id"] == rid and
             l["event"] == "finished"]:
    assert time.time() < deadline, "no finished line after the disconnect"
    time.sleep(0.1)
  finished = [l for l in lines(live["audit"]) if l["request_id"] == rid][-1]
  assert finished["status"] == 499 and finished["error"] == "the client disconnected"
  # Nothing runs between two score requests 3 s apart: the stream (60+ chunks of >= 300 ms
  # each) is no longer queued.
  first = score_batch(live)
  time.sleep(3)
  assert score_batch(live) == first + 1


@pytest.mark.slow
def test_sighup_reopens_the_log(live):
  rotated = live["audit"].with_suffix(".1")
  os.rename(live["audit"], rotated)
  os.kill(live["proc"].pid, signal.SIGHUP)
  score_batch(live)
  assert stat.S_IMODE(os.stat(live["audit"]).st_mode) == 0o600
  assert audit.verify(rotated)[1] is None and audit.verify(live["audit"]) == (1, None)
  last = rotated.read_bytes().splitlines()[-1]
  assert lines(live["audit"])[0]["prev"] == audit.line_hash(last)


@pytest.mark.slow
def test_sigkill_during_a_stream_leaves_a_started_line(live):
  _, _, rid = open_stream(live)
  os.kill(live["proc"].pid, signal.SIGKILL)
  live["proc"].wait()
  mine = [l for l in lines(live["audit"]) if l["request_id"] == rid]
  assert [l["event"] for l in mine] == ["started"] and mine[0]["key_id"] == "bob"
  assert mine[0]["experts_allowed"] == NAMES
  assert audit.verify(live["audit"])[1] is None


@pytest.mark.slow
def test_command_lines(tmp_path):
  keys = tmp_path / "keys.json"
  run = lambda *args: subprocess.run([sys.executable, "-m", "flexolmo_jax.serve", *args],
                                     cwd=test_serve.REPO, capture_output=True, text=True)
  got = run("add-key", f"--api_keys={keys}", "--key_id=carol", "--key_policies=no-news")
  assert got.returncode == 0, got.stderr
  key = got.stdout.strip()
  assert key.startswith("carol.") and key.split(".", 1)[1] not in keys.read_text()
  grant = api_keys.Keys(keys, POLICIES, NAMES).authenticate(f"Bearer {key}")
  assert grant == api_keys.Grant("carol", frozenset({"no-news"}), None)
  log = audit.AuditLog(tmp_path / "a.jsonl")
  log.write([{"status": 200}, {"status": 403}, {"status": 200}])
  got = run("verify-audit", str(tmp_path / "a.jsonl"))
  assert got.returncode == 0 and "3 lines, hash chain intact" in got.stdout
  text = (tmp_path / "a.jsonl").read_text().replace('"status": 403', '"status": 200')
  (tmp_path / "a.jsonl").write_text(text)
  got = run("verify-audit", str(tmp_path / "a.jsonl"))
  assert got.returncode == 1 and "line 2:" in got.stdout
  got = run("--model=x", "--policies=y")
  assert got.returncode == 2 and "--insecure_no_auth" in got.stderr
  got = run("--model=x", "--policies=y", "--insecure_no_auth", "--host=0.0.0.0")
  assert got.returncode == 2 and "loopback" in got.stderr
