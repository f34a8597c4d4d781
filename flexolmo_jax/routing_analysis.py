"""Routing analysis: the share of token slots each expert receives, per layer and per domain,
written as JSON and as a heatmap PNG (domains x experts, the share in each cell; one panel per
layer, or the layer mean with its spread for deep models).

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


# Up to this many layers get a panel each; deeper models get one panel of the layer average
# with the spread over layers in every cell (a 32-layer grid of panels is unreadable).
MAX_LAYER_PANELS = 8


def heatmap_figure(shares_DxLxE: np.ndarray, domains: Sequence[str], expert_names: Sequence[str]):
  """The routing heatmap as a matplotlib Figure: rows domains, columns experts, the share in every
  cell, the colour scale spanning the data's own range (shares are often all below 0.4, which a
  fixed 0-1 scale renders uniformly dark). One panel per layer up to MAX_LAYER_PANELS layers,
  else the mean over layers with the min-max spread over layers in each cell."""
  # The Figure class directly, not pyplot: no global backend or figure state, so this works
  # headless and inside a notebook alike.
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  shares_DxLxE = np.asarray(shares_DxLxE, np.float64)
  num_domains, num_layers, num_experts = shares_DxLxE.shape
  if num_layers <= MAX_LAYER_PANELS:
    panels = [(f"layer {i}", shares_DxLxE[:, i], None) for i in range(num_layers)]
  else:
    spread = (shares_DxLxE.min(axis=1), shares_DxLxE.max(axis=1))
    panels = [(f"mean over {num_layers} layers (min-max over layers in brackets)",
               shares_DxLxE.mean(axis=1), spread)]
  values = np.stack([v for _, v, _ in panels])
  vmin, vmax = float(values.min()), float(values.max())
  if vmax - vmin < 1e-6:  # A flat map still needs a non-empty scale.
    vmin, vmax = vmin - 0.01, vmax + 0.01
  cols = min(2, len(panels))  # Two panels a row keep a 7-expert grid readable.
  rows = -(-len(panels) // cols)
  cell_w = 0.9 if panels[0][2] is None else 1.4
  fig = Figure(layout="constrained", figsize=(
      2.0 + cols * (cell_w * num_experts + 1.0), 1.2 + rows * (0.45 * num_domains + 1.4)))
  axes = fig.subplots(rows, cols, squeeze=False)
  cmap = colormaps["viridis"]
  for index, ax in enumerate(axes.flat):
    if index >= len(panels):
      ax.axis("off")
      continue
    title, grid_DxE, spread = panels[index]
    image = ax.imshow(grid_DxE, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(num_experts), list(expert_names), rotation=30, ha="right",
                  rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(num_domains), list(domains) if index % cols == 0 else [""] * num_domains,
                  fontsize=8)
    for d in range(num_domains):
      for e in range(num_experts):
        value = grid_DxE[d, e]
        text = f"{value:.2f}" if spread is None else (
            f"{value:.2f}\n[{spread[0][d, e]:.2f}-{spread[1][d, e]:.2f}]")
        # Dark text on the light end of viridis, white on the dark end.
        light = (value - vmin) / (vmax - vmin) > 0.6
        ax.text(e, d, text, ha="center", va="center", fontsize=7,
                color="black" if light else "white")
  fig.colorbar(image, ax=axes, shrink=0.8, label="share of routed tokens")
  fig.suptitle("Expert share of routed tokens (rows: evaluation domain)", fontsize=10)
  return fig


def write_report(by_domain: Mapping[str, Mapping], expert_names: Sequence[str],
                 out_dir: str) -> dict[str, str]:
  """Writes routing.json and routing.png under `out_dir`; returns their paths."""
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
  fig = heatmap_figure(shares_DxLxE, domains, expert_names)
  with png_path.open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  return {"json": str(json_path), "png": str(png_path)}
