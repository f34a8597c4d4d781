"""Router rows for expert training (docs/method.md, section 4).

Owners exchange only vectors: an embeddings file is a .npz holding one array per domain, each
[D] (the same row in every layer, as with an off-the-shelf embedder of width d_model) or [L, D].
The fallback, when no file is given, embeds documents with the public model itself: the mean,
over documents, of the L2-normalised mean FFN input of each layer (the paper's weaker ablation).
"""

from __future__ import annotations

import functools
import os
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax import atomic
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import Transformer


def load_embeddings(path: str, domains: Iterable[str], num_layers: int, d_model: int):
  """{domain: [L, D] float32} from an embeddings .npz, checking names and widths."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"router embeddings file {path} does not exist")
  with np.load(path) as data:
    available = sorted(data.files)
    rows = {}
    for domain in domains:
      if domain not in data.files:
        raise KeyError(f"router embeddings {path} have no row for {domain!r}; it holds {available}")
      row = np.asarray(data[domain], np.float32)
      if row.shape not in ((d_model,), (num_layers, d_model)):
        raise ValueError(f"router embedding {domain!r} in {path} has shape {row.shape}; expected "
                         f"({d_model},) or ({num_layers}, {d_model}) for this public model "
                         "(project embeddings of another width with a shared projection)")
      rows[domain] = np.broadcast_to(row, (num_layers, d_model)).copy()
  return rows


def save_embeddings(path: str, rows: dict[str, np.ndarray]) -> None:
  """Writes an embeddings .npz atomically."""
  with atomic.replacing(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v, np.float32) for k, v in rows.items()})


@functools.partial(jax.jit, static_argnums=0)
def _unit_mean_ffn_inputs(config: ModelConfig, params, batch):
  """Per layer, the sum over sequences of each L2-normalised mean FFN input, and the count."""
  _, state = Transformer(config).apply(
      {"params": params}, batch["tokens"], positions=batch["positions"],
      segment_ids=batch["segment_ids"], mutable=["intermediates"])
  (h_LxBxTxD,) = state["intermediates"]["layers"]["ffn_input"]
  mask = batch["loss_mask"][None, :, :, None]
  mean_LxBxD = jnp.sum(h_LxBxTxD * mask, 2) / jnp.maximum(jnp.sum(mask, 2), 1.0)
  unit = mean_LxBxD / jnp.maximum(jnp.linalg.norm(mean_LxBxD, axis=-1, keepdims=True), 1e-6)
  return jnp.sum(unit, axis=1), mean_LxBxD.shape[1]


def mean_hidden_embedding(config: ModelConfig, params, batches: Iterable[dict]) -> np.ndarray:
  """[L, D]: per layer, the mean over sequences of each sequence's L2-normalised mean FFN input."""
  params = jax.device_put(params)
  total, count = 0.0, 0
  for batch in batches:
    summed, n = _unit_mean_ffn_inputs(config, params, {k: jnp.asarray(v) for k, v in batch.items()})
    total, count = total + np.asarray(summed), count + n
  if not count:
    raise ValueError("no batches to embed: the data source is empty")
  return (total / count).astype(np.float32)
