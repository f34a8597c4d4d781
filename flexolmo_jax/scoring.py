"""Log-likelihood scoring of continuations, and perplexity, with jitted forwards on padded shapes.

The evaluation side's one place for held-out domain batches (`domain_batches`) and per-domain loss
(`perplexity`, `score_domains`): evaluate, the baselines, the sweep and the reproduction all
score through it. A `BatchScorer` maps pipeline batches to {"nll", "perplexity", "tokens"} (and
with per_token=True each token's NLL, from which reproduce builds per-document losses); a model
is one (`model_scorer`), and so is every baseline (flexolmo_jax.baselines).

Scoring follows lm-evaluation-harness: trailing whitespace of the context moves to the start of
the continuation, the pair is tokenized as one string, and the continuation tokens are those after
the context's own tokens. Requests are sorted by length and batched into rows right-padded to a
power-of-two bucket, so one compiled function serves every request of a bucket; right padding is
invisible to real tokens (attention is causal and routing is per token, without capacity limits).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import DataConfig, make_pipeline
from flexolmo_jax.model import Transformer

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Scored:
  """The log-likelihood of one continuation given its context."""
  logprob: float  # sum over continuation tokens of log p(token | everything before it)
  num_tokens: int
  num_chars: int  # characters of the continuation text as given (before whitespace moves)
  greedy: bool  # every continuation token is the model's argmax

  @property
  def per_token(self) -> float:
    return self.logprob / self.num_tokens

  @property
  def per_char(self) -> float:
    return self.logprob / max(self.num_chars, 1)


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
  """The padded length for a row of `n` tokens: the next power of two, at least `minimum`."""
  return max(minimum, 1 << max(n - 1, 0).bit_length())


def full_expert_mask(expert_mask, batch: int):
  """An [E] expert mask broadcast to [batch, E] (a [batch, E] one as it is), or None."""
  if expert_mask is None:
    return None
  mask = jnp.asarray(expert_mask, bool)
  return jnp.broadcast_to(mask, (batch, mask.shape[-1]))


def target_logprobs(config: ModelConfig, params, tokens_BxL, targets_BxL, expert_mask_E=None,
                    positions_BxL=None, segment_ids_BxL=None):
  """log p(target) at every position [B, L] and whether the target is the argmax [B, L]."""
  logits = Transformer(config).apply(
      {"params": params}, tokens_BxL, positions=positions_BxL, segment_ids=segment_ids_BxL,
      expert_mask=full_expert_mask(expert_mask_E, tokens_BxL.shape[0]))
  logp_BxLxV = jax.nn.log_softmax(logits, axis=-1)
  target_logp = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return target_logp, jnp.argmax(logits, axis=-1) == targets_BxL


@functools.lru_cache(maxsize=8)
def jitted_target_logprobs(config: ModelConfig):
  # Cached per config, so scorers of one model share compiled buckets.
  return jax.jit(functools.partial(target_logprobs, config))


class Scorer:
  """Scores (context, continuation) pairs with one model.

  `expert_mask` [E] bool restricts every request to the given experts (opt-out at inference).
  Contexts longer than `max_len` lose their oldest tokens; the continuation is always kept whole.
  """

  def __init__(self, config: ModelConfig, params, tokenizer, *, batch_size: int = 8,
               max_len: int = 2048, expert_mask=None):
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.batch_size, self.max_len = batch_size, max_len
    self.expert_mask = None if expert_mask is None else np.asarray(expert_mask, bool)
    self._logprobs = jitted_target_logprobs(config)

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of the context and of the continuation, tokenized together."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.tokenizer.encode(context + continuation)
    # With no context there is nothing to condition the first token on: EOS stands in for the
    # end of a previous document.
    ctx = self.tokenizer.encode(context) if context else []
    if not ctx or whole[:len(ctx)] != ctx or len(whole) == len(ctx):
      ctx = ctx or [self.tokenizer.eos_id]
      return ctx, self.tokenizer.encode(continuation)
    return ctx, whole[len(ctx):]

  def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[Scored]:
    """The log-likelihood of each continuation given its context, in request order."""
    rows = []
    for context, continuation in requests:
      ctx, cont = self.encode_pair(context, continuation)
      if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
      if len(cont) > self.max_len:
        raise ValueError(f"continuation of {len(cont)} tokens exceeds max_len {self.max_len}")
      seq = (ctx + cont)[-(self.max_len + 1):]
      rows.append((seq, len(cont), len(continuation)))
    out: list[Scored | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      length = bucket_length(len(rows[chunk[0]][0]) - 1)
      tokens = np.zeros((self.batch_size, length), np.int32)
      targets = np.zeros((self.batch_size, length), np.int32)
      for r, i in enumerate(chunk):
        seq = rows[i][0]
        tokens[r, :len(seq) - 1], targets[r, :len(seq) - 1] = seq[:-1], seq[1:]
      logp, is_max = jax.device_get(self._logprobs(self.params, tokens, targets, self.expert_mask))
      for r, i in enumerate(chunk):
        seq, n_cont, n_chars = rows[i]
        span = slice(len(seq) - 1 - n_cont, len(seq) - 1)
        out[i] = Scored(float(np.sum(logp[r, span], dtype=np.float64)), n_cont, n_chars,
                        bool(np.all(is_max[r, span])))
    return out


def token_nll(config: ModelConfig, params, batch, expert_mask=None):
  """[B, L] next-token NLL of one pipeline batch, 0 where loss_mask is 0, with an [E] or per-row
  [B, E] expert mask: the evaluation step every per-domain loss is built from."""
  logp, _ = target_logprobs(config, params, batch["tokens"], batch["targets"], expert_mask,
                            batch["positions"], batch["segment_ids"])
  return -logp * batch["loss_mask"].astype(jnp.float32)


@functools.lru_cache(maxsize=8)
def jitted_token_nll(config: ModelConfig):
  """token_nll of `config`, jitted once per config."""
  return jax.jit(functools.partial(token_nll, config))


def pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Pads a short final batch with empty rows (loss_mask 0) so it reuses the compiled shape."""
  have = next(iter(batch.values())).shape[0]
  return {k: np.concatenate([v, np.zeros((rows - have,) + v.shape[1:], v.dtype)]) if have < rows
          else v for k, v in batch.items()}


def domain_batches(root: str, domain: str, split: str, *, batch_size: int, seq_len: int,
                   max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """A domain's held-out split of a prepared corpus as pipeline batches, in order, at most
  `max_batches` of them; a short last batch is padded with empty rows (loss_mask 0), so every
  batch reuses one compiled shape."""
  cfg = DataConfig(path=root, domains=(domain,), shuffle=False, seq_len=seq_len,
                   batch_size=batch_size)
  batches = make_pipeline(cfg, split, num_epochs=1, drop_remainder=False, shard_index=0,
                          shard_count=1)
  return (pad_rows(b, batch_size) for b in itertools.islice(batches, max_batches))


def nll_result(total: float, count: float) -> dict[str, float]:
  """{"nll": mean NLL, "perplexity": exp(mean), "tokens": count} from a summed NLL."""
  if not count:
    raise ValueError("perplexity: the batches hold no scored tokens")
  mean = total / count
  return {"nll": mean, "perplexity": math.exp(mean), "tokens": int(count)}


class TokenTotals:
  """Accumulates per-token NLLs ([B, L] per batch, 0 off the loss mask) in float64 into a
  nll_result; with `per_token`, the result also holds "token_nll": the arrays themselves, one per
  batch (reproduce builds per-document losses from them)."""

  def __init__(self, per_token: bool):
    self.total, self.count, self.rows = 0.0, 0.0, [] if per_token else None

  def add(self, token_nll_BxL, loss_mask_BxL) -> None:
    nll = np.asarray(token_nll_BxL, np.float64)
    self.total += float(np.sum(nll))
    self.count += float(np.sum(loss_mask_BxL))
    if self.rows is not None:
      self.rows.append(nll)

  def result(self) -> dict:
    out = nll_result(self.total, self.count)
    return out if self.rows is None else {**out, "token_nll": self.rows}


def perplexity(config: ModelConfig, params, batches: Iterable[Mapping[str, np.ndarray]], *,
               expert_mask=None, per_token: bool = False) -> dict:
  """Mean next-token NLL over every loss-masked token of `batches` (pipeline batches, see
  flexolmo_jax.data.pipeline), its perplexity exp(NLL), and the token count (and with
  `per_token`, each token's NLL: TokenTotals)."""
  fn = jitted_token_nll(config)
  mask = None if expert_mask is None else np.asarray(expert_mask, bool)
  totals, rows = TokenTotals(per_token), None
  for batch in batches:
    rows = rows or batch["tokens"].shape[0]
    have = batch["tokens"].shape[0]
    totals.add(jax.device_get(fn(params, pad_rows(batch, rows), mask))[:have], batch["loss_mask"])
  return totals.result()


# score(batches) -> {"nll", "perplexity", "tokens", ...}; score(batches, per_token=True) adds
# "token_nll" (TokenTotals).
BatchScorer = Callable[..., dict]


def model_scorer(config: ModelConfig, params, expert_mask=None) -> BatchScorer:
  """The BatchScorer of one model (restricted to `expert_mask`'s experts when given)."""
  return functools.partial(perplexity, config, params, expert_mask=expert_mask)


def score_domains(score: BatchScorer,
                  batches: Mapping[str, Iterable[Mapping[str, np.ndarray]]]) -> dict[str, dict]:
  """{domain: score(its batches)} and "average": the mean over domains of their NLL (each domain
  counts once, whatever its size) with its perplexity."""
  per_domain = {d: score(b) for d, b in batches.items()}
  mean_nll = float(np.mean([r["nll"] for r in per_domain.values()]))
  return {**per_domain, "average": {"nll": mean_nll, "perplexity": math.exp(mean_nll)}}
