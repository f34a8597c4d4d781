"""Routing analysis: the share of token slots each expert receives, per layer and per domain,
written as JSON and as a heatmap PNG (one panel per layer, domains x experts).

The model's sown `router_stats/load` counts every token slot of a batch, padding included, so the
shares here count the per-token routing decisions the model sows (`model.routing_counts`) over
real tokens only. On a batch without padding the two agree exactly
(tests/test_routing_analysis.py).
"""

from __future__ import annotations

import functools
import json
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax import paths, scoring
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import Transformer, routing_counts


def _slot_counts(config: ModelConfig, params, batch, expert_mask_E):
  """[L, E] top-k slots per expert over the real (segment_ids != 0) tokens of one batch."""
  tokens, segment_ids = batch["tokens"], batch["segment_ids"]
  _, state = Transformer(config).apply(
      {"params": params}, tokens, positions=batch["positions"], segment_ids=segment_ids,
      expert_mask=scoring.full_expert_mask(expert_mask_E, tokens.shape[0]), mutable=["routing"])
  return jnp.sum(routing_counts(state, segment_ids != 0), axis=1)


@functools.lru_cache(maxsize=8)
def _jitted_slot_counts(config: ModelConfig):
  return jax.jit(functools.partial(_slot_counts, config))


def routing_shares(config: ModelConfig, params, batches: Iterable[Mapping[str, np.ndarray]], *,
                   expert_mask=None) -> tuple[np.ndarray, int]:
  """([L, E] share of routed token slots per layer, each row summing to 1; real tokens seen)."""
  if not config.is_moe:
    raise ValueError("routing analysis needs a mixture-of-experts model; this one is dense")
  fn = _jitted_slot_counts(config)
  mask = None if expert_mask is None else np.asarray(expert_mask, bool)
  counts, tokens, rows = np.zeros((config.n_layers, config.num_experts)), 0, None
  for batch in batches:
    rows = rows or batch["tokens"].shape[0]
    batch = scoring.pad_rows(batch, rows)
    counts += np.asarray(fn(params, batch, mask), np.float64)
    tokens += int(np.sum(batch["segment_ids"] != 0))
  if not tokens:
    raise ValueError("routing analysis: the batches hold no tokens")
  return counts / counts.sum(axis=1, keepdims=True), tokens


def domain_shares(config: ModelConfig, params, data_root: str, domains: Sequence[str], *,
                  split: str = "test", batch_size: int = 8, seq_len: int = 512,
                  max_batches: int | None = None, expert_mask=None) -> dict[str, dict]:
  """{domain: {"shares": [L, E], "tokens": n}} over each domain's held-out split."""
  out = {}
  for domain in domains:
    batches = scoring.domain_batches(data_root, domain, split, batch_size=batch_size,
                                     seq_len=seq_len, max_batches=max_batches)
    shares, tokens = routing_shares(config, params, batches, expert_mask=expert_mask)
    out[domain] = {"shares": shares, "tokens": tokens}
  return out


def write_report(by_domain: Mapping[str, Mapping], expert_names: Sequence[str],
                 out_dir: str) -> dict[str, str]:
  """Writes routing.json and routing.png under `out_dir`; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  out = paths.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  domains = list(by_domain)
  shares_DxLxE = np.stack([np.asarray(by_domain[d]["shares"]) for d in domains])
  num_layers, num_experts = shares_DxLxE.shape[1:]
  if len(expert_names) != num_experts:
    raise ValueError(f"{len(expert_names)} expert names for {num_experts} experts")
  json_path, png_path = out / "routing.json", out / "routing.png"
  with json_path.open("w", encoding="utf-8") as f:
    json.dump({"experts": list(expert_names), "domains": domains, "layers": num_layers,
               "tokens": {d: int(by_domain[d]["tokens"]) for d in domains},
               "shares": {d: shares_DxLxE[i].tolist() for i, d in enumerate(domains)},
               "description": "shares[domain][layer][expert]: fraction of that domain's routed "
                              "token slots (top-k per token) going to the expert"},
              f, indent=1)

  cols = min(4, num_layers)
  rows = -(-num_layers // cols)
  fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(
      1.0 + cols * (0.5 * num_experts + 1.5), 0.8 + rows * (0.35 * len(domains) + 1.2)))
  for layer, ax in enumerate(axes.flat):
    if layer >= num_layers:
      ax.axis("off")
      continue
    image = ax.imshow(shares_DxLxE[:, layer], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_title(f"layer {layer}", fontsize=9)
    ax.set_xticks(range(num_experts), expert_names, rotation=60, fontsize=7)
    ax.set_yticks(range(len(domains)), domains if layer % cols == 0 else [""] * len(domains),
                  fontsize=7)
  fig.colorbar(image, ax=axes, shrink=0.8, label="share of routed tokens")
  fig.suptitle("Expert share of routed tokens, per layer (rows: evaluation domain)")
  with png_path.open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)
  return {"json": str(json_path), "png": str(png_path)}
