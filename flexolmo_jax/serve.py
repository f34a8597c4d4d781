"""An HTTP server for a merged FlexOlmo model, where every request names the experts it may use.

  python -m flexolmo_jax.serve --model=DIR --policies=FILE [--tokenizer=PATH] [--port=8000]

Endpoints (JSON bodies; each request names a "policy" from the policies file OR lists "experts"):
  POST /score     {"context": str (default ""), "continuation": str}
                  -> {"logprob", "num_tokens", "greedy", "tokens", "token_logprobs", "policy"}
  POST /generate  {"prompt": str, "max_new_tokens": int, "temperature", "top_k", "top_p", "seed",
                   "stream": bool} -> {"text", "tokens", "policy"}; with "stream": true, newline-
                  delimited JSON: one {"token", "text"} line per token, sent as each chunk of
                  `stream_chunk` tokens is decoded, then {"done": true, "tokens", "text", ...}.
  GET  /health    -> {"status": "ok", "experts": [...], "policies": {...}}
Each POST endpoint is one entry of ENDPOINTS: the fields it takes, how a body becomes a Job, and
the Engine method that runs a batch of its jobs; the app routes every entry.

Requests that arrive within `batch_wait_ms` of each other are run as one batch whatever their
policies: each row carries its own expert mask, so experts a request may not use are excluded
before the router softmax (model.py), and the row's output equals that of a model with those
experts opted out. Batches are padded to `max_batch` rows and power-of-two / multiple-of-16
lengths, so the model compiles once per shape bucket. Sampled generations share the batch's
random stream, so they are reproducible for a given batch, not across batch compositions.

Every /score and /generate request, refused or served, appends one JSON line to the audit log
(time, endpoint, status, policy, experts allowed, experts routed to with token-slot counts),
written with one os.write on an O_APPEND descriptor and fsynced before the response (for a
stream, its final line) is sent.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app as absl_app
from absl import flags
from absl import logging
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from flexolmo_jax import cli, policies as policies_lib, runs, scoring
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


# ----------------------------------------------------------------------------- audit log


class AuditLog:
  """Appends one JSON line per request; durable (fsynced) before the caller goes on."""

  def __init__(self, path: str | os.PathLike):
    self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def write(self, records: Sequence[dict[str, Any]]) -> None:
    """Writes each record with a single write() (so no line is torn), then one fsync."""
    for record in records:
      line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
      written = os.write(self.fd, line)
      if written != len(line):
        raise OSError(f"audit log: short write ({written} of {len(line)} bytes)")
    os.fsync(self.fd)

  def close(self) -> None:
    os.close(self.fd)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def audit_record(endpoint: str, status: int, job: Job | None, routed=None, error=None,
                 batch: int | None = None) -> dict:
  """The audit line of one request; `batch` numbers the batch a served request ran in."""
  record = {"time": _now(), "endpoint": endpoint, "status": status}
  if batch is not None:
    record["batch"] = batch
  if job is not None:
    record.update(policy=job.policy, experts_allowed=list(job.allowed),
                  experts_routed=routed or {})
  if error is not None:
    record["error"] = error
  return record


# ----------------------------------------------------------------------------- batching


class Batcher:
  """Collects jobs for up to `batch_wait_ms` (at most `max_batch`), runs those of one kind as a
  batch in a worker thread (so the event loop keeps accepting requests), audits it, answers."""

  def __init__(self, engine: Engine, audit: AuditLog, limits: Limits):
    self.engine, self.audit, self.limits = engine, audit, limits
    self.queue: asyncio.Queue = asyncio.Queue()
    # One thread: the device runs one batch at a time anyway, and compiles are not duplicated.
    self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
    self.batches = 0

  async def submit(self, job: Job) -> dict[str, Any]:
    future = asyncio.get_running_loop().create_future()
    await self.queue.put((job, future))
    return await future

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

  def _run_and_audit(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
    results = self.engine.run(jobs)
    self.batches += 1
    self.audit.write([audit_record(j.endpoint, 200, j, res["routed"], batch=self.batches)
                      for j, res in zip(jobs, results) if "routed" in res])
    return results

  async def run(self) -> None:
    """The worker loop: runs until cancelled."""
    loop = asyncio.get_running_loop()
    while True:
      groups = collections.defaultdict(list)
      for job, future in await self._collect():
        groups[job.key].append((job, future))
      for items in groups.values():
        jobs = [job for job, _ in items]
        try:
          results = await loop.run_in_executor(self.executor, self._run_and_audit, jobs)
        except Exception as err:  # pylint: disable=broad-except  (answered per request)
          results = [err] * len(items)
        for (job, future), result in zip(items, results):
          if job.stream:  # `future` is the queue of the stream's chunks.
            future.put_nowait(result)
            if not isinstance(result, Exception) and not result["done"]:
              self.queue.put_nowait((job, future))
            continue
          if future.done():  # The client went away.
            continue
          if isinstance(result, Exception):
            future.set_exception(result)
          else:
            future.set_result(result)


# ----------------------------------------------------------------------------- HTTP


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


class Server:
  """The request handlers: parse and validate, submit to the batcher, audit refusals."""

  def __init__(self, engine: Engine, policies, audit: AuditLog, limits: Limits):
    self.engine, self.policies, self.audit, self.limits = engine, policies, audit, limits
    self.batcher = Batcher(engine, audit, limits)
    self.scorer = scoring.Scorer(engine.config, engine.params, engine.tokenizer)

  async def _body(self, request: Request) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
      raise Refused(413, f"body of {declared} bytes exceeds {self.limits.max_body_bytes}")
    body = b""
    async for chunk in request.stream():
      body += chunk
      if len(body) > self.limits.max_body_bytes:
        raise Refused(413, f"body exceeds {self.limits.max_body_bytes} bytes")
    try:
      data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
      raise Refused(400, f"malformed JSON: {err}") from None
    if not isinstance(data, dict):
      raise Refused(400, "the body must be a JSON object")
    return data

  def _job(self, endpoint: "Endpoint", body: dict) -> Job:
    unknown = sorted(set(body) - endpoint.fields)
    if unknown:
      raise Refused(400, f"unknown field(s) {unknown}; /{endpoint.name} takes "
                    f"{sorted(endpoint.fields)}")
    try:
      label, allowed, mask = policies_lib.resolve(
          self.policies, self.engine.expert_names, policy=body.get("policy"),
          experts=body.get("experts"))
    except policies_lib.PolicyError as err:
      raise Refused(400, str(err)) from None
    job = Job(endpoint.name, label, allowed, mask, [])
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
    try:
      job.sampling = Sampling(float(_field(body, "temperature", (int, float), 0.0)),
                              _field(body, "top_k", int, 0),
                              float(_field(body, "top_p", (int, float), 1.0)))
    except ValueError as err:
      raise Refused(400, str(err)) from None

  async def _refuse(self, endpoint: str, status: int, message: str, job: Job | None):
    await asyncio.to_thread(self.audit.write, [audit_record(endpoint, status, job, error=message)])
    return JSONResponse({"error": message}, status_code=status)

  async def handle(self, endpoint: "Endpoint", request: Request):
    """Answers one POST to `endpoint`: refused (and audited) or run in a batch."""
    job = None
    try:
      body = await self._body(request)
      job = self._job(endpoint, body)
      if job.stream:
        chunks = asyncio.Queue()
        await self.batcher.queue.put((job, chunks))
        return StreamingResponse(self._stream(job, chunks), media_type="application/x-ndjson")
      result = await self.batcher.submit(job)
    except Refused as err:
      return await self._refuse(endpoint.name, err.status, err.message, job)
    except ValueError as err:  # The model refused the request's values.
      return await self._refuse(endpoint.name, 400, str(err), job)
    except Exception as err:  # pylint: disable=broad-except  (the server keeps serving)
      logging.exception("request failed")
      return await self._refuse(endpoint.name, 500, f"internal error: {err}", job)
    result = {k: v for k, v in result.items() if k != "routed"} | {"policy": job.policy}
    return JSONResponse(result)

  async def _stream(self, job: Job, chunks: asyncio.Queue):
    """NDJSON lines: one per token as its chunk is decoded, then the whole result."""
    # A token that ends inside a multi-byte character sends no text until the character is whole.
    decode, tokens, sent = self.engine.tokenizer.decode, [], ""
    while True:
      result = await chunks.get()
      if isinstance(result, Exception):
        message = f"generation failed: {result}"
        await asyncio.to_thread(self.audit.write,
                                [audit_record("generate", 500, job, error=message)])
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
        yield json.dumps({"done": True, "tokens": result["tokens"], "text": result["text"],
                          "policy": job.policy}) + "\n"
        return

  async def health(self, request: Request):
    del request
    return JSONResponse({"status": "ok", "experts": self.engine.expert_names,
                         "policies": {k: list(v) for k, v in self.policies.items()}})


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


def make_app(config: ModelConfig, params, expert_names: Sequence[str], tokenizer, policies,
             audit_path: str | os.PathLike, limits: Limits = Limits()) -> Starlette:
  """The Starlette app serving one merged model; the batching worker runs for the app's life."""
  if not config.is_moe or len(expert_names) != config.num_experts:
    raise ValueError(f"serving needs a merged mixture-of-experts model with one name per expert; "
                     f"got {config.num_experts} experts and names {list(expert_names)}")
  audit = AuditLog(audit_path)
  server = Server(Engine(config, params, expert_names, tokenizer, limits), policies, audit, limits)

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
  return Starlette(routes=routes + [Route("/health", server.health, methods=["GET"])],
                   lifespan=lifespan)


# ----------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags, defined only when run as a program."""
  flags.DEFINE_string("model", None, "A merged params artifact (its manifest names the experts).")
  flags.DEFINE_string("policies", None, 'JSON policies file: {"policies": {name: [expert,...]}}.')
  flags.DEFINE_string("tokenizer", None, "Tokenizer file or directory (default: the tokenizer that "
                      "travels with --model).")
  flags.DEFINE_string("audit_log", "audit.jsonl", "The audit log, appended to.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
  flags.DEFINE_integer("port", 8000, "Port to listen on.")
  flags.DEFINE_integer("max_batch", Limits.max_batch, "Rows per batch.")
  flags.DEFINE_float("batch_wait_ms", Limits.batch_wait_ms, "How long a batch waits to fill.")
  flags.DEFINE_integer("max_body_bytes", Limits.max_body_bytes, "Largest request body.")
  flags.DEFINE_integer("max_tokens", Limits.max_tokens, "Most prompt / scored tokens a request.")
  flags.DEFINE_integer("max_new_tokens", Limits.max_new_tokens, "Most generated tokens a request.")
  flags.DEFINE_integer("stream_chunk", Limits.stream_chunk, "Tokens a streamed generation "
                       "advances per batch.")
  flags.mark_flags_as_required(["model", "policies"])


def main(argv: Sequence[str]) -> None:
  import uvicorn  # pylint: disable=g-import-not-at-top  (only the program needs it)
  if len(argv) > 1:
    raise absl_app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.default_verbosity()
  try:
    config, params, manifest = runs.load_params(FLAGS.model)
    if "expert_names" not in manifest:
      raise ValueError(f"{FLAGS.model} is not a merged model (its manifest names no experts)")
    policies = policies_lib.load_policies(FLAGS.policies, manifest["expert_names"])
    tokenizer = tokenizer_lib.for_model(FLAGS.model, manifest, override=FLAGS.tokenizer)
  except (ValueError, FileNotFoundError) as err:
    raise SystemExit(f"error: {err}") from None
  limits = Limits(FLAGS.max_body_bytes, FLAGS.max_tokens, FLAGS.max_new_tokens, FLAGS.max_batch,
                  FLAGS.batch_wait_ms, FLAGS.stream_chunk)
  application = make_app(config, params, manifest["expert_names"], tokenizer, policies,
                         FLAGS.audit_log, limits)
  uvicorn.run(application, host=FLAGS.host, port=FLAGS.port, log_level="warning")


if __name__ == "__main__":
  define_flags()
  absl_app.run(main)
