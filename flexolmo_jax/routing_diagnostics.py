"""Routing diagnostics of an expert run, written with every evaluation (fit.py) and plotted.

For each evaluation domain, over the real tokens of its validation batches, of the expert being
trained (expert index 1 of the {public, new} MoE):

  diag/<domain>/new_expert_prob   mean router probability (softmax over all experts, before top-k)
  diag/<domain>/topk_share        fraction of tokens for which the expert is among the top-k
  diag/<domain>/row_cos           cosine between the change of its router row (now minus at
                                  step 0) and the domain's mean router input (the FFN input h);
                                  0 while the row has not moved

each the mean over layers, with the per-layer values under `.../layer_<i>`. The probabilities and
decisions are the ones the model sows (model.routing_probs, model.routing_counts), and h the FFN
input it sows for router initialisation, all from the evaluation's own forward pass.

Why these: an expert trained only on its own domain is always the better of the two experts
there, so its router row can grow along the direction every hidden state shares and win every
domain's tokens once merged (docs/reproduction.md). A row_cos near 1 on every domain, with
new_expert_prob rising on the public and other domains, shows that happening during training.
"""

from __future__ import annotations

import json
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from flexolmo_jax import paths
from flexolmo_jax.model import routing_counts, routing_probs

NAMES = ("new_expert_prob", "topk_share", "row_cos")


def batch_sums(state, valid_BxL, expert: int) -> dict:
  """Sums over one batch's valid tokens of `expert`'s probability and top-k membership per layer
  ([L]), of the router input ([L, D]), and the token count; `state` is that of a forward pass
  with mutable=["routing", "intermediates"]."""
  valid = jnp.asarray(valid_BxL, jnp.float32)
  (h_NxBxLxD,) = state["intermediates"]["layers"]["ffn_input"]
  return {"prob": jnp.sum(routing_probs(state, valid)[:, :, expert], axis=1),
          "routed": jnp.sum(routing_counts(state, valid)[:, :, expert], axis=1),
          "hidden": jnp.einsum("nbld,bl->nd", h_NxBxLxD.astype(jnp.float32), valid),
          "tokens": jnp.sum(valid)}


def row_cosine(a_LxD, b_LxD) -> np.ndarray:
  """[L] cosine between matching rows; 0 where either row is zero (an unmoved router row)."""
  a, b = np.asarray(a_LxD, np.float64), np.asarray(b_LxD, np.float64)
  norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
  dots = np.sum(a * b, axis=-1)
  return np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)


def metrics(domain: str, sums: Mapping[str, np.ndarray], row_change_LxD) -> dict[str, float]:
  """The diagnostics of `domain` (the keys in this module's docstring) from its summed
  batch_sums and the router row's change since step 0."""
  tokens = float(sums["tokens"])
  per_layer = {"new_expert_prob": np.asarray(sums["prob"]) / tokens,
               "topk_share": np.asarray(sums["routed"]) / tokens,
               "row_cos": row_cosine(row_change_LxD, sums["hidden"])}
  out = {}
  for name in NAMES:
    values = per_layer[name]
    out[f"diag/{domain}/{name}"] = float(np.mean(values))
    out.update({f"diag/{domain}/{name}/layer_{i}": float(v) for i, v in enumerate(values)})
  return out


def read(metrics_path) -> tuple[list[str], dict[str, dict[str, tuple[list[int], list[float]]]]]:
  """(domains, {name: {domain: (steps, layer-mean values)}}) from a run's metrics.jsonl; a step
  logged twice (a resumed run) keeps its last record."""
  rows = {}
  with paths.path(metrics_path).open(encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      rows[row["step"]] = row
  domains = sorted({k.split("/")[1] for row in rows.values() for k in row
                    if k.startswith("diag/") and k.count("/") == 2})
  series = {name: {d: ([], []) for d in domains} for name in NAMES}
  for step in sorted(rows):
    for name in NAMES:
      for d in domains:
        value = rows[step].get(f"diag/{d}/{name}")
        if value is not None:
          series[name][d][0].append(step)
          series[name][d][1].append(value)
  return domains, series


def plot(metrics_path, out_png, title: str = "") -> str:
  """Writes a PNG of the three diagnostics (layer means) against steps, one line per domain,
  from an expert run's metrics.jsonl; returns its path. Raises if the run logged none."""
  # The Figure class directly, not pyplot: no global backend state (routing_analysis.py).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  domains, series = read(metrics_path)
  if not domains:
    raise ValueError(f"{metrics_path} holds no diag/ metrics; they are written by expert runs "
                     "(python -m flexolmo_jax.train with an expert config)")
  fig = Figure(layout="constrained", figsize=(13, 3.6))
  axes = fig.subplots(1, len(NAMES))
  labels = {"new_expert_prob": "new expert's mean router probability",
            "topk_share": "share of tokens with the new expert in the top-k",
            "row_cos": "cos(router row change, mean router input)"}
  for ax, name in zip(axes, NAMES):
    for d in domains:
      steps, values = series[name][d]
      ax.plot(steps, values, marker="o", markersize=3, label=d)
    ax.set_title(labels[name], fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[-1].legend(fontsize=8, title="validation domain", title_fontsize=8)
  fig.suptitle(title or "Routing diagnostics (mean over layers)", fontsize=10)
  out = paths.path(out_png)
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.open("wb") as f:
    fig.savefig(f, format="png", dpi=110)
  return str(out)
