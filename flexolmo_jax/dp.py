"""DP-SGD for an owner's expert: per-example clipping, Gaussian noise, and privacy accounting.

Per step (Abadi et al. 2016): the gradient of each example's own loss with respect to the
trainable expert subtree (never the frozen public model), each clipped to global L2 norm
`clip_norm`, summed, plus N(0, (noise_multiplier * clip_norm)^2) per coordinate, divided by the
batch size. Accounting: the RDP accountant of the `dp-accounting` package for the
Poisson-subsampled Gaussian mechanism with sampling probability batch_size / num_examples.

What is protected is one EXAMPLE: a packed training sequence of seq_len tokens (a document longer
than that spans several examples, so its own guarantee is correspondingly weaker). The input
pipeline shuffles and takes fixed-size batches rather than Poisson sampling; reporting the
Poisson-subsampled epsilon for it is the usual approximation, and the manifest says so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

def per_example_grads(loss_fn, trainable, batch):
  """((loss, aux), grads) of `loss_fn(trainable, example) -> (loss, aux)` for each example of
  `batch` (a tree whose leaves carry the batch axis first); every output leaf gets a leading batch
  axis. Each example keeps a batch axis of size 1, so `loss_fn` sees the usual [1, ...] shapes."""
  def one(example):
    example = jax.tree.map(lambda x: x[None], example)
    return jax.value_and_grad(loss_fn, has_aux=True)(trainable, example)
  return jax.vmap(one)(batch)


def clip_and_sum(grads_B, clip_norm: float):
  """Sum over the batch axis of each example's gradient clipped to global L2 norm `clip_norm`.

  Returns (summed tree, per-example norms before clipping [B]).
  """
  sq = sum(jnp.sum(g.astype(jnp.float32).reshape(g.shape[0], -1) ** 2, axis=1)
           for g in jax.tree.leaves(grads_B))
  norms_B = jnp.sqrt(sq)
  scale_B = jnp.minimum(1.0, clip_norm / jnp.maximum(norms_B, 1e-12))
  summed = jax.tree.map(
      lambda g: jnp.tensordot(scale_B, g.astype(jnp.float32), axes=1).astype(g.dtype), grads_B)
  return summed, norms_B


def noisy_mean(summed, rng, *, clip_norm: float, noise_multiplier: float, batch_size):
  """(sum + N(0, (noise_multiplier * clip_norm)^2)) / batch_size, leaf by leaf."""
  leaves, treedef = jax.tree.flatten(summed)
  keys = jax.random.split(rng, len(leaves))
  std = noise_multiplier * clip_norm
  noisy = [(g.astype(jnp.float32) + std * jax.random.normal(k, g.shape, jnp.float32)) / batch_size
           for g, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, [n.astype(g.dtype) for n, g in zip(noisy, leaves)])


def private_grads(loss_fn, trainable, microbatches, rng, *, clip_norm: float,
                  noise_multiplier: float):
  """The DP-SGD gradient of one step, and each example's (loss, aux).

  `microbatches`: leaves [A, B/A, ...]; per-example gradients are computed one microbatch at a
  time (memory grows with B/A, not B), clipped and summed; the noise is added once to the total.
  """
  def accumulate(total, microbatch):
    values, grads = per_example_grads(loss_fn, trainable, microbatch)
    summed, _ = clip_and_sum(grads, clip_norm)
    return jax.tree.map(jnp.add, total, summed), values

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  summed, values = jax.lax.scan(accumulate, zeros, microbatches)
  batch_size = np.prod(jax.tree.leaves(microbatches)[0].shape[:2])
  grads = noisy_mean(summed, rng, clip_norm=clip_norm, noise_multiplier=noise_multiplier,
                     batch_size=batch_size)
  flat = jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), values)
  return grads, flat


def epsilon(*, sampling_prob: float, noise_multiplier: float, steps: int, delta: float) -> float:
  """Epsilon at `delta` after `steps` Poisson-subsampled Gaussian steps (RDP accountant)."""
  import dp_accounting  # pylint: disable=g-import-not-at-top
  if not 0.0 < sampling_prob <= 1.0:
    raise ValueError(f"sampling probability must lie in (0, 1], got {sampling_prob}")
  if not 0.0 < delta < 1.0:
    raise ValueError(f"delta must lie in (0, 1), got {delta}")
  if steps == 0:
    return 0.0
  accountant = dp_accounting.rdp.RdpAccountant()
  accountant.compose(dp_accounting.PoissonSampledDpEvent(
      sampling_prob, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
  return float(accountant.get_epsilon(delta))


def report(config_dp, *, batch_size: int, num_examples: int, steps: int) -> dict:
  """The manifest's record of a DP run: epsilon at delta after `steps`, and how it was computed."""
  q = min(batch_size / max(num_examples, 1), 1.0)
  return {
      "epsilon": epsilon(sampling_prob=q, noise_multiplier=config_dp.noise_multiplier,
                         steps=steps, delta=config_dp.delta),
      "delta": config_dp.delta, "noise_multiplier": config_dp.noise_multiplier,
      "clip_norm": config_dp.clip_norm, "steps": steps, "sampling_prob": q,
      "num_examples": num_examples,
      "accountant": "RDP, Poisson-subsampled Gaussian (dp-accounting)",
      "unit": "one packed training sequence (seq_len tokens)",
      "note": "batches are shuffled fixed-size batches; Poisson sampling is assumed for accounting",
  }
