"""How sure a held-out comparison is: per-document losses, the bootstrap over documents, and the
three-way verdict of a claim.

A domain's loss is the mean token NLL (nats) over its scored tokens: the ratio of summed document
NLLs to summed document token counts. Averages over domains are taken in loss, so the average's
perplexity exp(mean loss) is the geometric mean of the domains' perplexities (an arithmetic mean of
perplexities is dominated by the worst domains).

The unit of sampling is the document: tokens of one document are not independent draws. The
bootstrap resamples each domain's documents with replacement, independently per domain, and uses
the SAME resample for every model on that domain, so a difference between two models is paired
(document difficulty cancels). Every resampled loss is a ratio of sums, like the loss itself.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

HOLDS, DOES_NOT_HOLD, CANNOT_TELL = "holds", "does not hold", "cannot tell"


def document_ids(batches: Iterable[Mapping[str, np.ndarray]], eos_id: int) -> list[np.ndarray]:
  """[B, L] document index of every loss-masked token of `batches` (-1 elsewhere).

  The evaluation pipeline (scoring.domain_batches: unshuffled, concatenate-and-split packing) lays
  a split's documents out in order, row after row, and every document's last target is EOS, so a
  token's document is the number of EOS targets before it. A segment change inside a row must
  follow an EOS target; packing that breaks this is refused rather than mislabelled."""
  out, seen = [], 0
  for batch in batches:
    scored = np.asarray(batch["loss_mask"]) > 0
    segments = np.asarray(batch["segment_ids"])
    ends = (np.asarray(batch["targets"]) == eos_id) & scored
    both = scored[:, 1:] & scored[:, :-1]
    if np.any(both & (segments[:, 1:] != segments[:, :-1]) & ~ends[:, :-1]):
      raise ValueError("document_ids: a document starts without the previous one ending in EOS; "
                       "these batches are not an unshuffled evaluation split")
    flat_ends = ends.reshape(-1).astype(np.int64)
    before = seen + np.cumsum(flat_ends) - flat_ends
    out.append(np.where(scored, before.reshape(scored.shape), -1))
    seen += int(flat_ends.sum())
  return out


def document_sums(values: Sequence[np.ndarray], ids: Sequence[np.ndarray],
                  keep: Sequence[np.ndarray], num_docs: int) -> np.ndarray:
  """[num_docs] float64: per document, the sum of `values` [B, L] over tokens where `keep`."""
  total = np.zeros(num_docs)
  for v, i, k in zip(values, ids, keep):
    k = np.asarray(k, bool) & (i >= 0)
    total += np.bincount(i[k], weights=np.asarray(v, np.float64)[k], minlength=num_docs)
  return total


def resample_counts(num_docs: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
  """[resamples, num_docs]: how often each document is drawn in each bootstrap resample (num_docs
  draws with replacement)."""
  return rng.multinomial(num_docs, np.full(num_docs, 1.0 / num_docs), size=resamples)


def bootstrap_losses(tokens: Mapping[str, Sequence[float]],
                     nll: Mapping[str, Mapping[str, Sequence[float]]], *, resamples: int = 2000,
                     seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
  """{model: {domain: [resamples] loss}}: each model's domain loss on bootstrap resamples of the
  domain's documents. `tokens[domain]` holds each document's scored token count and
  `nll[model][domain]` its summed NLL, on the same documents for every model. Domains are
  resampled independently (in sorted order, from one seeded generator); models share them."""
  rng = np.random.default_rng(seed)
  counts = {d: resample_counts(len(tokens[d]), resamples, rng) for d in sorted(tokens)}
  denominators = {d: counts[d] @ np.asarray(tokens[d], np.float64) for d in counts}
  return {m: {d: counts[d] @ np.asarray(v, np.float64) / denominators[d]
              for d, v in by_domain.items()} for m, by_domain in nll.items()}


def mean_loss(losses: Mapping[str, float], domains: Sequence[str]):
  """The average over `domains` of their losses (each domain counts once); with resampled losses
  [R] per domain, the average of each resample."""
  return sum(losses[d] for d in domains) / len(domains)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
  """The percentile interval holding `level` of the bootstrap samples."""
  tail = 50.0 * (1.0 - level)
  lo, hi = np.percentile(np.asarray(samples, np.float64), [tail, 100.0 - tail])
  return float(lo), float(hi)


def verdict(lo: float, hi: float, side: int = -1) -> str:
  """Whether a claim "the value is below 0" (side -1) or "above 0" (side +1) holds on the interval
  [lo, hi]: holds if the whole interval is on the claimed side, does not hold if the whole
  interval is on the other side, cannot tell otherwise (the interval reaches 0)."""
  if side not in (-1, 1):
    raise ValueError(f"verdict: side must be -1 (claim < 0) or +1 (claim > 0), not {side}")
  lo, hi = (lo, hi) if side == 1 else (-hi, -lo)
  return HOLDS if lo > 0 else DOES_NOT_HOLD if hi < 0 else CANNOT_TELL


def every(verdicts: Iterable[str]) -> str:
  """The verdict on "each of these claims holds": holds if each holds, does not hold if any does
  not, cannot tell otherwise."""
  verdicts = list(verdicts)
  if all(v == HOLDS for v in verdicts):
    return HOLDS
  return DOES_NOT_HOLD if DOES_NOT_HOLD in verdicts else CANNOT_TELL
