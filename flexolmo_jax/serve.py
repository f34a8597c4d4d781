"""An HTTP server for a merged FlexOlmo model, where every request names the experts it may use.

  python -m flexolmo_jax.serve --model=DIR --policies=FILE --api_keys=FILE [--port=8000]
  python -m flexolmo_jax.serve add-key --api_keys=FILE --key_id=ID --key_policies=P,... \
      [--key_experts=SUBSET]          # prints the new key once
  python -m flexolmo_jax.serve verify-audit FILE   # checks the audit log's hash chain

Endpoints (JSON bodies; each request names a "policy" from the policies file OR lists "experts"):
  POST /score     {"context": str (default ""), "continuation": str}
                  -> {"logprob", "num_tokens", "greedy", "tokens", "token_logprobs", "policy"}
  POST /generate  {"prompt": str, "max_new_tokens": int, "temperature", "top_k", "top_p", "seed",
                   "stream": bool} -> {"text", "tokens", "policy"}; with "stream": true, newline-
                  delimited JSON: one {"token", "text"} line per token, sent as each chunk of
                  `stream_chunk` tokens is decoded, then {"done": true, "tokens", "text", ...}.
  GET  /health    -> {"status": "ok"} (nothing else: it needs no key)
Each POST endpoint is one entry of ENDPOINTS: the fields it takes, how a body becomes a Job, and
the Engine method that runs a batch of its jobs; the app routes every entry.

Access (flexolmo_jax/api_keys.py): every POST carries `Authorization: Bearer <key>`; a missing or
wrong key gets 401, a policy or expert outside the key's grant 403. Without a keys file the server
needs --insecure_no_auth and listens on loopback only. Requests are also refused for a Host header
outside --allowed_hosts (400: DNS rebinding), a Content-Type other than application/json (415),
non-finite numbers or JSON nested deeper than MAX_JSON_DEPTH (400), more than --max_queue
requests in hand (503), and no answer within --request_timeout_s (504). A stream whose client
disconnects stops at its next chunk.

Requests that arrive within `batch_wait_ms` of each other are run as one batch whatever their
policies: each row carries its own expert mask, so experts a request may not use are excluded
before the router softmax (model.py), and the row's output equals that of a model with those
experts opted out. Batches are padded to `max_batch` rows and power-of-two / multiple-of-16
lengths, so the model compiles once per shape bucket; sampling values are traced, never compiled
in. Sampled generations share the batch's random stream, so they are reproducible for a given
batch, not across batch compositions.

Audit (flexolmo_jax/audit.py): every /score and /generate request, refused or served, appends one
hash-chained JSON line ("event": "request": time, request id, key id, endpoint, status, policy,
experts allowed, experts routed to with token-slot counts), fsynced before the response is sent;
a stream gets a "started" line before its first byte and a "finished" line after its last (or
when the client went away, status 499).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import ipaddress
import json
import math
import os
import re
import signal
import sys
import uuid
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from absl import logging
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from flexolmo_jax import api_keys, cli, policies as policies_lib, runs, scoring
from flexolmo_jax import audit as audit_lib
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import tokenizer as tokenizer_lib
from flexolmo_jax.generate import Sampling, generate
from flexolmo_jax.model import Transformer, routing_counts

PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-request size limits and batching settings."""
  max_body_bytes: int = 64 * 1024
  max_tokens: int = 512  # of a prompt, or of context + continuation
  max_new_tokens: int = 128
  max_batch: int = 8
  batch_wait_ms: float = 5.0
  stream_chunk: int = 4  # tokens a streamed generation advances per batch
  max_queue: int = 64  # requests in hand at once (queued, running or streaming); more get 503
  request_timeout_s: float = 30.0  # deadline of a request, or of a whole stream (504)


class Refused(Exception):
  """A request the server will not run: carries the HTTP status and a message for the client."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


# ----------------------------------------------------------------------------- model functions


def _score_and_route(config: ModelConfig, params, tokens_BxL, targets_BxL, valid_BxL,
                     allowed_BxE):
  """log p(target) [B, L], target is the argmax [B, L], and routed token slots per expert [B, E]
  (top-k slots of nonzero weight over the valid tokens, summed over layers)."""
  logits, state = Transformer(config).apply({"params": params}, tokens_BxL,
                                            expert_mask=allowed_BxE, mutable=["routing"])
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets_BxL[..., None], -1)[..., 0]
  counts_LxBxE = routing_counts(state, valid_BxL)
  return logp, jnp.argmax(logits, -1) == targets_BxL, jnp.sum(counts_LxBxE, 0)


@functools.lru_cache(maxsize=4)
def _jitted_score_and_route(config: ModelConfig):
  return jax.jit(functools.partial(_score_and_route, config))


@dataclasses.dataclass
class Job:
  """One parsed request, waiting for its batch."""
  endpoint: str
  policy: str
  allowed: tuple[str, ...]
  mask_E: np.ndarray
  context: list[int]  # score: context tokens; generate: prompt tokens
  continuation: list[int] = dataclasses.field(default_factory=list)
  max_new_tokens: int = 0
  sampling: Sampling = Sampling()
  seed: int = 0
  stream: bool = False
  generated: list[int] = dataclasses.field(default_factory=list)  # streamed: tokens so far
  request_id: str = ""
  deadline: float = math.inf  # event-loop time
  cancelled: bool = False  # the client is gone: neither run nor answer it again

  @property
  def key(self):
    """Jobs with equal keys can share a batch."""
    if self.endpoint == "score":
      return ("score",)
    return ("generate", self.stream, self.sampling,
            self.seed if self.sampling.temperature else 0)


class Engine:
  """Runs batches of jobs on one model, padded to fixed shape buckets."""

  def __init__(self, config: ModelConfig, params, expert_names: Sequence[str], tokenizer,
               limits: Limits):
    self.config, self.expert_names, self.tokenizer, self.limits = (
        config, list(expert_names), tokenizer, limits)
    self.params = jax.device_put(params)
    self._score_fn = _jitted_score_and_route(config)

  def _route_rows(self, seqs: Sequence[list[int]], masks_BxE):
    """Runs `seqs` (next-token prediction on each) in one padded batch."""
    rows = self.limits.max_batch
    length = scoring.bucket_length(max(len(s) for s in seqs) - 1)
    tokens, targets = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
    valid = np.zeros((rows, length), bool)
    for r, seq in enumerate(seqs):
      n = len(seq) - 1
      tokens[r, :n], targets[r, :n], valid[r, :n] = seq[:-1], seq[1:], True
    return jax.device_get(self._score_fn(self.params, tokens, targets, valid, masks_BxE))

  def _masks(self, jobs: Sequence[Job]) -> np.ndarray:
    masks = np.ones((self.limits.max_batch, len(self.expert_names)), bool)
    for r, job in enumerate(jobs):
      masks[r] = job.mask_E
    return masks

  def _routed(self, counts_E) -> dict[str, int]:
    return {n: int(round(c)) for n, c in zip(self.expert_names, counts_E) if c > 0}

  def run(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Results of one batch of jobs sharing a key, in order; each finished one carries "routed"
    counts (a streamed generation is finished once its last chunk is decoded)."""
    return ENDPOINTS[jobs[0].endpoint].run(self, jobs, self._masks(jobs))

  def score(self, jobs: Sequence[Job], masks) -> list[dict[str, Any]]:
    """The log-likelihood of each job's continuation after its context."""
    logp, is_max, counts = self._route_rows([j.context + j.continuation for j in jobs], masks)
    out = []
    for r, job in enumerate(jobs):
      n, m = len(job.context), len(job.continuation)
      span = slice(n - 1, n - 1 + m)
      out.append({"logprob": float(np.sum(logp[r, span], dtype=np.float64)), "num_tokens": m,
                  "greedy": bool(np.all(is_max[r, span])), "tokens": job.continuation,
                  "token_logprobs": [float(x) for x in logp[r, span]],
                  "routed": self._routed(counts[r])})
    return out

  def generate(self, jobs: Sequence[Job], masks) -> list[dict[str, Any]]:
    """Each job's generation, or for streamed jobs its next chunk."""
    if jobs[0].stream:
      return self._generate_chunk(jobs, masks)
    return self._generate(jobs, masks)

  def _generate(self, jobs: Sequence[Job], masks) -> list[dict[str, Any]]:
    eos = self.tokenizer.eos_id
    longest = max(j.max_new_tokens for j in jobs)
    max_new = min(1 << max(longest - 1, 0).bit_length(), self.limits.max_new_tokens)
    prompts = [j.context for j in jobs] + [[eos]] * (self.limits.max_batch - len(jobs))
    out = generate(self.config, self.params, prompts, max_new_tokens=max_new,
                   sampling=jobs[0].sampling, seed=jobs[0].seed, eos_id=eos,
                   pad_id=self.tokenizer.pad_id, expert_mask=masks, prompt_bucket=PROMPT_BUCKET)
    new = []
    for r, job in enumerate(jobs):
      row = [int(t) for t in out[r, :job.max_new_tokens]]
      new.append(row[:row.index(eos) + 1] if eos in row else row)
    # The routing of a generation is that of its prompt and every generated token fed back in.
    _, _, counts = self._route_rows([j.context + n for j, n in zip(jobs, new)], masks)
    return [{"tokens": n, "text": self.tokenizer.decode(n), "routed": self._routed(counts[r])}
            for r, n in enumerate(new)]

  def _generate_chunk(self, jobs: Sequence[Job], masks) -> list[dict[str, Any]]:
    """The next `stream_chunk` tokens ("new") of each streamed generation. The prompt and the
    tokens so far are prefilled again each chunk: between chunks a job waits in the queue, so it
    shares its batches with newer requests instead of holding a cache slot."""
    eos, chunk = self.tokenizer.eos_id, self.limits.stream_chunk
    prompts = [j.context + j.generated for j in jobs] + [[eos]] * (self.limits.max_batch -
                                                                    len(jobs))
    # A fresh random stream per chunk; equal seeds would reuse the same noise every chunk.
    seed = (jobs[0].seed * 1_000_003 + len(jobs[0].generated)) % 2**31
    out = generate(self.config, self.params, prompts, max_new_tokens=chunk,
                   sampling=jobs[0].sampling, seed=seed, eos_id=eos,
                   pad_id=self.tokenizer.pad_id, expert_mask=masks, prompt_bucket=PROMPT_BUCKET)
    results = []
    for r, job in enumerate(jobs):
      row = [int(t) for t in out[r, :min(chunk, job.max_new_tokens - len(job.generated))]]
      row = row[:row.index(eos) + 1] if eos in row else row
      job.generated = job.generated + row
      results.append({"new": row, "done": eos in row or
                      len(job.generated) >= job.max_new_tokens})
    if any(res["done"] for res in results):
      _, _, counts = self._route_rows([j.context + j.generated for j in jobs], masks)
      for r, (job, res) in enumerate(zip(jobs, results)):
        if res["done"]:
          res.update(tokens=job.generated, text=self.tokenizer.decode(job.generated),
                     routed=self._routed(counts[r]))
    return results


# ----------------------------------------------------------------------------- batching


class Batcher:
  """Collects jobs for up to `batch_wait_ms` (at most `max_batch`), runs those of one kind as a
  batch in a worker thread (so the event loop keeps accepting requests), answers. Jobs whose
  client has gone (deadline passed, stream closed) are dropped instead of run."""

  def __init__(self, engine: Engine, limits: Limits):
    self.engine, self.limits = engine, limits
    # Unbounded: admission (Server.pending) bounds it, and running streams queue again here.
    self.queue: asyncio.Queue = asyncio.Queue()
    # One thread: the device runs one batch at a time anyway, and compiles are not duplicated.
    self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
    self.batches = 0

  async def _collect(self):
    items = [await self.queue.get()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + self.limits.batch_wait_ms / 1000
    while len(items) < self.limits.max_batch:
      timeout = deadline - loop.time()
      if timeout <= 0:
        break
      try:
        items.append(await asyncio.wait_for(self.queue.get(), timeout))
      except asyncio.TimeoutError:
        break
    return items

  def _run(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
    results = self.engine.run(jobs)
    self.batches += 1
    return [res | {"batch": self.batches} for res in results]

  async def run(self) -> None:
    """The worker loop: runs until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
      groups = collections.defaultdict(list)
      for job, future in await self._collect():
        # A stream's `future` is the queue of its chunks; a plain one is done once abandoned.
        if not job.cancelled and (job.stream or not future.done()):
          groups[job.key].append((job, future))
      for items in groups.values():
        jobs = [job for job, _ in items]
        try:
          results = await loop.run_in_executor(self.executor, self._run, jobs)
        except Exception as err:  # pylint: disable=broad-except  (answered per request)
          results = [err] * len(items)
        for (job, future), result in zip(items, results):
          if job.stream:
            future.put_nowait(result)
            if not (isinstance(result, Exception) or result["done"] or job.cancelled):
              self.queue.put_nowait((job, future))
          elif not future.done():
            if isinstance(result, Exception):
              future.set_exception(result)
            else:
              future.set_result(result)


# ----------------------------------------------------------------------------- HTTP

MAX_JSON_DEPTH = 8  # A request body is a flat object; this leaves room and no more.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _json_depth(body: bytes) -> int:
  """The deepest nesting of [ and { outside strings, found without recursion."""
  text = np.frombuffer(_JSON_STRING.sub(b'""', body), np.uint8)
  step = np.isin(text, np.frombuffer(b"[{", np.uint8)).astype(np.int64) - np.isin(
      text, np.frombuffer(b"]}", np.uint8))
  return int(np.max(np.cumsum(step), initial=0))


def _non_finite(constant: str):
  raise Refused(400, f"non-finite number {constant} in the body; send finite numbers")


def _finite_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    _non_finite(text)
  return value


def _field(body: dict, name: str, kind, default=None, required=False):
  if name not in body:
    if required:
      raise Refused(400, f"missing field {name!r}")
    return default
  value = body[name]
  ok = isinstance(value, kind) and not (kind in (int, (int, float)) and isinstance(value, bool))
  if not ok:
    raise Refused(400, f"field {name!r} has the wrong type ({type(value).__name__})")
  return value


class _Stream(StreamingResponse):
  """A streamed response that calls `on_close` once it ends however it ends: after the last byte,
  on a client disconnect (which cancels it), or before its first byte if it never starts."""

  def __init__(self, content, on_close: Callable[[], None], headers: dict[str, str]):
    super().__init__(content, media_type="application/x-ndjson", headers=headers)
    self.on_close = on_close

  async def __call__(self, scope, receive, send):
    try:
      await super().__call__(scope, receive, send)
    finally:
      self.on_close()


class Server:
  """The request handlers: authenticate, parse and validate, authorize, admit, submit to the
  batcher, audit."""

  def __init__(self, engine: Engine, policies, audit: audit_lib.AuditLog, limits: Limits,
               keys: api_keys.Keys | None):
    self.engine, self.policies, self.audit, self.limits, self.keys = (
        engine, policies, audit, limits, keys)
    self.batcher = Batcher(engine, limits)
    self.scorer = scoring.Scorer(engine.config, engine.params, engine.tokenizer)
    self.pending = 0  # Admitted requests not yet answered (queued, running or streaming).

  async def _grant(self, request: Request) -> api_keys.Grant | None:
    """The caller's grant; None without a keys file (--insecure_no_auth: everything allowed)."""
    if self.keys is None:
      return None
    grant = await asyncio.to_thread(self.keys.authenticate, request.headers.get("authorization"))
    if grant is None:
      raise Refused(401, "missing or invalid API key; send 'Authorization: Bearer <key>'")
    return grant

  async def _body(self, request: Request) -> dict:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
      raise Refused(415, f"Content-Type must be application/json, got {content_type or 'none'!r}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
      raise Refused(413, f"body of {declared} bytes exceeds {self.limits.max_body_bytes}")
    body = b""
    async for chunk in request.stream():
      body += chunk
      if len(body) > self.limits.max_body_bytes:
        raise Refused(413, f"body exceeds {self.limits.max_body_bytes} bytes")
    if _json_depth(body) > MAX_JSON_DEPTH:
      raise Refused(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
      data = json.loads(body, parse_constant=_non_finite, parse_float=_finite_float)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
      raise Refused(400, f"malformed JSON: {err}") from None
    if not isinstance(data, dict):
      raise Refused(400, "the body must be a JSON object")
    return data

  def _job(self, endpoint: "Endpoint", body: dict, grant: api_keys.Grant | None,
           request_id: str) -> Job:
    unknown = sorted(set(body) - endpoint.fields)
    if unknown:
      raise Refused(400, f"unknown field(s) {unknown}; /{endpoint.name} takes "
                    f"{sorted(endpoint.fields)}")
    policy, experts = body.get("policy"), body.get("experts")
    visible = self.policies
    if grant is not None:
      if isinstance(policy, str) and policy in self.policies and policy not in grant.policies:
        raise Refused(403, f"key {grant.key_id!r} may not use policy {policy!r}; it may use "
                      f"{sorted(grant.policies)}")
      if experts is not None and grant.experts is None:
        raise Refused(403, f"key {grant.key_id!r} may not list experts; name one of its "
                      f"policies {sorted(grant.policies)}")
      visible = {name: v for name, v in self.policies.items() if name in grant.policies}
    try:
      label, allowed, mask = policies_lib.resolve(visible, self.engine.expert_names,
                                                  policy=policy, experts=experts)
    except policies_lib.PolicyError as err:
      raise Refused(400, str(err)) from None
    if grant is not None and experts is not None and not set(allowed) <= grant.experts:
      raise Refused(403, f"key {grant.key_id!r} may not use experts "
                    f"{sorted(set(allowed) - grant.experts)}; its expert lists stay within "
                    f"{[n for n in self.engine.expert_names if n in grant.experts]}")
    job = Job(endpoint.name, label, allowed, mask, [], request_id=request_id)
    endpoint.parse(self, body, job)
    return job

  def parse_score(self, body: dict, job: Job) -> None:
    """A /score body: the context and continuation, tokenized together."""
    limit = self.limits.max_tokens
    context = _field(body, "context", str, "")
    continuation = _field(body, "continuation", str, required=True)
    job.context, job.continuation = self.scorer.encode_pair(context, continuation)
    if not job.continuation:
      raise Refused(400, "the continuation encodes to no tokens")
    if len(job.context) + len(job.continuation) > limit:
      raise Refused(413, f"context + continuation is {len(job.context) + len(job.continuation)}"
                    f" tokens; the limit is {limit}")

  def parse_generate(self, body: dict, job: Job) -> None:
    """A /generate body: the prompt, length, sampling and streaming options."""
    limit = self.limits.max_tokens
    prompt = _field(body, "prompt", str, required=True)
    job.context = self.engine.tokenizer.encode(prompt) or [self.engine.tokenizer.eos_id]
    if len(job.context) > limit:
      raise Refused(413, f"prompt is {len(job.context)} tokens; the limit is {limit}")
    job.max_new_tokens = _field(body, "max_new_tokens", int, min(32, self.limits.max_new_tokens))
    if not 1 <= job.max_new_tokens <= self.limits.max_new_tokens:
      raise Refused(400, f"max_new_tokens must lie in [1, {self.limits.max_new_tokens}]")
    job.stream = _field(body, "stream", bool, False)
    job.seed = _field(body, "seed", int, 0)
    if not 0 <= job.seed < 2**31:
      raise Refused(400, "seed must lie in [0, 2**31)")
    vocab = self.engine.config.vocab_size
    top_k = _field(body, "top_k", int, 0)
    if not 0 <= top_k <= vocab:
      raise Refused(400, f"top_k must lie in [0, {vocab}] (0 = off; the vocabulary size keeps "
                    f"every token)")
    try:
      job.sampling = Sampling(float(_field(body, "temperature", (int, float), 0.0)), top_k,
                              float(_field(body, "top_p", (int, float), 1.0)))
    except (ValueError, OverflowError) as err:
      raise Refused(400, str(err)) from None

  def _record(self, endpoint: str, status: int | None, request_id: str,
              grant: api_keys.Grant | None, job: Job | None, event: str, routed=None,
              error=None, batch: int | None = None) -> dict:
    """One audit line; `batch` numbers the batch a served request ran in."""
    record = {"time": _now(), "event": event, "request_id": request_id, "endpoint": endpoint,
              "key_id": None if grant is None else grant.key_id}
    if status is not None:
      record["status"] = status
    if batch is not None:
      record["batch"] = batch
    if job is not None:
      record.update(policy=job.policy, experts_allowed=list(job.allowed),
                    experts_routed=routed or {})
    if error is not None:
      record["error"] = error
    return record

  async def handle(self, endpoint: "Endpoint", request: Request):
    """Answers one POST to `endpoint`: refused, or run in a batch; audited either way."""
    request_id = uuid.uuid4().hex
    grant = job = None
    admitted = streaming = False  # A stream, once started, leaves the queue through _Stream.
    try:
      grant = await self._grant(request)
      job = self._job(endpoint, await self._body(request), grant, request_id)
      if self.pending >= self.limits.max_queue:
        raise Refused(503, f"the server has {self.pending} requests in hand (--max_queue); "
                      f"retry shortly")
      self.pending += 1
      admitted = True
      job.deadline = asyncio.get_running_loop().time() + self.limits.request_timeout_s
      if job.stream:
        response = await self._start_stream(job, grant)
        streaming = True
        return response
      future = asyncio.get_running_loop().create_future()
      await self.batcher.queue.put((job, future))
      try:
        result = await asyncio.wait_for(future, self.limits.request_timeout_s)
      except asyncio.TimeoutError:
        raise Refused(504, f"no answer within {self.limits.request_timeout_s} s "
                      f"(--request_timeout_s)") from None
      status, error = 200, None
    except Refused as err:
      status, error = err.status, err.message
    except ValueError as err:  # The model refused the request's values.
      status, error = 400, str(err)
    except Exception as err:  # pylint: disable=broad-except  (the server keeps serving)
      logging.exception("request failed")
      status, error = 500, f"internal error: {err}"
    finally:
      if admitted and not streaming:
        self.pending -= 1
    routed, batch = (result["routed"], result["batch"]) if status == 200 else (None, None)
    await asyncio.to_thread(self.audit.write, [self._record(
        endpoint.name, status, request_id, grant, job, "request", routed, error, batch)])
    headers = {"X-Request-Id": request_id}
    if status == 401:
      headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
      headers["Retry-After"] = "1"
    if status != 200:
      return JSONResponse({"error": error}, status_code=status, headers=headers)
    result = {k: v for k, v in result.items() if k not in ("routed", "batch")}
    return JSONResponse(result | {"policy": job.policy}, headers=headers)

  async def _start_stream(self, job: Job, grant: api_keys.Grant | None):
    """Audits `started`, queues the stream, and returns its response; `finished` is audited when
    the response ends (after its last byte, or on disconnect, which also stops the job)."""
    await asyncio.to_thread(self.audit.write, [self._record(
        "generate", None, job.request_id, grant, job, "started")])
    chunks = asyncio.Queue()
    await self.batcher.queue.put((job, chunks))
    outcome = {"status": 499, "error": "the client disconnected", "routed": None, "batch": None}

    def finish():
      if job.cancelled:
        return
      job.cancelled = True  # Stops a stream still running from being queued again.
      self.pending -= 1
      # Synchronous: this runs while the response task may be cancelled.
      self.audit.write([self._record("generate", outcome["status"], job.request_id, grant, job,
                                     "finished", outcome["routed"], outcome["error"],
                                     outcome["batch"])])

    return _Stream(self._stream(job, chunks, outcome), finish, {"X-Request-Id": job.request_id})

  async def _stream(self, job: Job, chunks: asyncio.Queue, outcome: dict):
    """NDJSON lines: one per token as its chunk is decoded, then the whole result; records how
    it ended in `outcome`."""
    # A token that ends inside a multi-byte character sends no text until the character is whole.
    decode, tokens, sent = self.engine.tokenizer.decode, [], ""
    loop = asyncio.get_running_loop()
    while True:
      try:
        result = await asyncio.wait_for(chunks.get(), max(job.deadline - loop.time(), 0))
      except asyncio.TimeoutError:
        result = Refused(504, f"stream not done within {self.limits.request_timeout_s} s "
                         f"(--request_timeout_s)")
      if isinstance(result, Exception):
        status = result.status if isinstance(result, Refused) else 500
        message = result.message if isinstance(result, Refused) else \
            f"generation failed: {result}"
        outcome.update(status=status, error=message)
        yield json.dumps({"error": message}) + "\n"
        return
      for i, token in enumerate(result["new"]):
        tokens.append(token)
        text = decode(tokens)
        final = result["done"] and i + 1 == len(result["new"])
        piece = "" if text.endswith("\ufffd") and not final else text[len(sent):]
        sent += piece
        yield json.dumps({"token": token, "text": piece}) + "\n"
      if result["done"]:
        outcome.update(status=200, error=None, routed=result["routed"], batch=result["batch"])
        yield json.dumps({"done": True, "tokens": result["tokens"], "text": result["text"],
                          "policy": job.policy}) + "\n"
        return

  async def health(self, request: Request):
    """Says only that the server is up: nothing about experts, policies or keys."""
    del request
    return JSONResponse({"status": "ok"})


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


@dataclasses.dataclass(frozen=True)
class Endpoint:
  """One POST endpoint, /<name>: the body fields it takes, how a body becomes a Job (raising
  Refused), and how the engine runs a batch of its jobs."""
  name: str
  fields: frozenset[str]
  parse: Callable[[Server, dict, Job], None]
  run: Callable[[Engine, Sequence[Job], np.ndarray], list[dict[str, Any]]]


# A new endpoint is one entry here (plus its Job.key if its jobs batch differently).
ENDPOINTS = {e.name: e for e in (
    Endpoint("score", frozenset({"policy", "experts", "context", "continuation"}),
             Server.parse_score, Engine.score),
    Endpoint("generate", frozenset({"policy", "experts", "prompt", "max_new_tokens",
                                    "temperature", "top_k", "top_p", "seed", "stream"}),
             Server.parse_generate, Engine.generate),
)}

LOOPBACK = ("localhost", "127.0.0.1", "[::1]")


def make_app(config: ModelConfig, params, expert_names: Sequence[str], tokenizer, policies,
             audit_path: str | os.PathLike, limits: Limits = Limits(), *,
             keys: api_keys.Keys | None, allowed_hosts: Sequence[str] = LOOPBACK) -> Starlette:
  """The Starlette app serving one merged model; the batching worker runs for the app's life.
  `keys` None serves without authentication (every policy and expert list allowed); requests
  whose Host header is not in `allowed_hosts` get 400 (DNS rebinding). `app.state.audit` is the
  audit log."""
  if not config.is_moe or len(expert_names) != config.num_experts:
    raise ValueError(f"serving needs a merged mixture-of-experts model with one name per expert; "
                     f"got {config.num_experts} experts and names {list(expert_names)}")
  audit = audit_lib.AuditLog(audit_path)
  server = Server(Engine(config, params, expert_names, tokenizer, limits), policies, audit, limits,
                  keys)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    worker = asyncio.create_task(server.batcher.run())
    try:
      yield
    finally:
      worker.cancel()
      server.batcher.executor.shutdown(wait=True)
      audit.close()

  routes = [Route(f"/{e.name}", functools.partial(server.handle, e), methods=["POST"])
            for e in ENDPOINTS.values()]
  application = Starlette(
      routes=routes + [Route("/health", server.health, methods=["GET"])], lifespan=lifespan,
      middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))])
  application.state.audit = audit
  return application


# ----------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS
COMMANDS = ("serve", "add-key", "verify-audit")


def define_flags() -> None:
  """Flags, defined only when run as a program."""
  flags.DEFINE_string("model", None, "A merged params artifact (its manifest names the experts).")
  flags.DEFINE_string("policies", None, 'JSON policies file: {"policies": {name: [expert,...]}}.')
  flags.DEFINE_string("api_keys", None, "JSON keys file (write it with the add-key command); "
                      "every request then needs 'Authorization: Bearer <key>'.")
  flags.DEFINE_bool("insecure_no_auth", False, "Serve without API keys (every policy and expert "
                    "list open to anyone who can connect); loopback addresses only.")
  flags.DEFINE_list("allowed_hosts", list(LOOPBACK), "Host header names accepted (others: 400); "
                    "on a network address, add the names clients use.")
  flags.DEFINE_string("tokenizer", None, "Tokenizer file or directory (default: the tokenizer that "
                      "travels with --model).")
  flags.DEFINE_string("audit_log", "audit.jsonl", "The audit log, appended to (mode 0600); "
                      "reopened on SIGHUP.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
  flags.DEFINE_integer("port", 8000, "Port to listen on.")
  flags.DEFINE_integer("max_batch", Limits.max_batch, "Rows per batch.")
  flags.DEFINE_float("batch_wait_ms", Limits.batch_wait_ms, "How long a batch waits to fill.")
  flags.DEFINE_integer("max_body_bytes", Limits.max_body_bytes, "Largest request body.")
  flags.DEFINE_integer("max_tokens", Limits.max_tokens, "Most prompt / scored tokens a request.")
  flags.DEFINE_integer("max_new_tokens", Limits.max_new_tokens, "Most generated tokens a request.")
  flags.DEFINE_integer("stream_chunk", Limits.stream_chunk, "Tokens a streamed generation "
                       "advances per batch.")
  flags.DEFINE_integer("max_queue", Limits.max_queue, "Most requests in hand at once (queued, "
                       "running or streaming); more get 503.")
  flags.DEFINE_float("request_timeout_s", Limits.request_timeout_s, "Deadline of a request (of a "
                     "whole stream); past it: 504.")
  flags.DEFINE_string("key_id", None, "add-key: the new key's id (letters, digits, _ and -).")
  flags.DEFINE_list("key_policies", [], "add-key: the policies the key may use.")
  flags.DEFINE_string("key_experts", None, "add-key: the experts the key's explicit expert lists "
                      "may stay within (an expert subset, e.g. public+math); default: none.")


def add_key_main() -> None:
  """`add-key`: appends a key to --api_keys and prints the key, once."""
  if not FLAGS.api_keys or not FLAGS.key_id:
    cli.fail("add-key needs --api_keys=FILE and --key_id=ID (and --key_policies and/or "
             "--key_experts)")
  try:
    key = api_keys.add_key(FLAGS.api_keys, FLAGS.key_id, FLAGS.key_policies, FLAGS.key_experts)
  except (ValueError, OSError) as err:
    cli.fail(str(err))
  print(key)
  print(f"(key {FLAGS.key_id!r} added to {FLAGS.api_keys}; the key is shown only now: store it)",
        file=sys.stderr)


def verify_audit_main(path: str) -> None:
  """`verify-audit FILE`: checks the hash chain; exit 1 at the first broken line."""
  try:
    lines, problem = audit_lib.verify(path)
  except OSError as err:
    cli.fail(f"cannot read {path}: {err.strerror}")
  if problem:
    print(f"{path}: line {lines}: {problem}")
    raise SystemExit(1)
  print(f"{path}: {lines} lines, hash chain intact")


def _is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def serve_main() -> None:
  """Serves --model until interrupted."""
  import uvicorn  # pylint: disable=g-import-not-at-top  (only the server needs it)
  for name in ("model", "policies"):
    if not FLAGS[name].value:
      cli.fail(f"--{name} is required")
  if bool(FLAGS.api_keys) == FLAGS.insecure_no_auth:
    cli.fail("pass --api_keys=FILE (make keys with `python -m flexolmo_jax.serve add-key`) or, "
             "for a server only this machine can reach, --insecure_no_auth; not both")
  if FLAGS.insecure_no_auth and not _is_loopback(FLAGS.host):
    cli.fail(f"--insecure_no_auth serves only on loopback addresses; --host={FLAGS.host} is not "
             "one (use 127.0.0.1, or --api_keys)")
  cli.default_verbosity()
  try:
    config, params, manifest = runs.load_params(FLAGS.model)
    if "expert_names" not in manifest:
      raise ValueError(f"{FLAGS.model} is not a merged model (its manifest names no experts)")
    names = manifest["expert_names"]
    policies = policies_lib.load_policies(FLAGS.policies, names)
    keys = api_keys.Keys(FLAGS.api_keys, policies, names) if FLAGS.api_keys else None
    tokenizer = tokenizer_lib.for_model(FLAGS.model, manifest, override=FLAGS.tokenizer)
    limits = Limits(FLAGS.max_body_bytes, FLAGS.max_tokens, FLAGS.max_new_tokens,
                    FLAGS.max_batch, FLAGS.batch_wait_ms, FLAGS.stream_chunk, FLAGS.max_queue,
                    FLAGS.request_timeout_s)
    application = make_app(config, params, names, tokenizer, policies, FLAGS.audit_log, limits,
                           keys=keys, allowed_hosts=FLAGS.allowed_hosts)
  except (ValueError, OSError) as err:
    cli.fail(str(err))
  # Log rotation: the handler only flags it; the next write reopens (no lock taken in a handler).
  signal.signal(signal.SIGHUP, lambda *_: application.state.audit.request_reopen())
  uvicorn.run(application, host=FLAGS.host, port=FLAGS.port, log_level="warning")


def main(argv: Sequence[str]) -> None:
  command, args = (argv[1], argv[2:]) if len(argv) > 1 else ("serve", [])
  if command not in COMMANDS:
    cli.fail(f"unknown command {command!r}; commands: {', '.join(COMMANDS)} (default serve)")
  if command == "verify-audit":
    if len(args) != 1:
      cli.fail("usage: python -m flexolmo_jax.serve verify-audit FILE")
    verify_audit_main(args[0])
    return
  if args:
    cli.fail(f"unexpected arguments: {args}")
  if command == "add-key":
    add_key_main()
  else:
    serve_main()


if __name__ == "__main__":
  define_flags()
  cli.run(main)
