"""Decode throughput and its memory-bandwidth roofline: flexolmo_jax's KV-cached `generate`, its
full recomputation, and transformers' `generate` (eager and sdpa attention) on the same weights.

  python -m benchmarks.bench_generate --sizes=tiny,25m,100m --batches=1,4,16 --prompts=64,512 \
      --new=64,256 [--impls=cache,recompute,hf_eager,hf_sdpa --recompute_max_len=640 \
      --dtype=float32 --repeats=1 --json=out.json]

Model per size: a FlexOlmo with 2 experts, top-2 of 2, no expert bias, float32; random weights
(stacked weights x4, as tests/test_generate.py does, so greedy choices are not near-ties) written
with `convert.save_hf` and loaded by `FlexOlmoForCausalLM.from_pretrained`, so both libraries
decode the same weights. Prompts are random tokens, all of the full prompt length; greedy, no
eos stop, every row generates exactly `new` tokens.

tokens/s: batch x new / wall time of one whole `generate` call (prefill included), best of
--repeats after one warm-up call each (compilation excluded). "same" checks the greedy tokens of every
implementation against the KV-cache decoder's.

Roofline (KV cache only): a step must read every weight it multiplies by once (embedding rows
aside; lm_head and both experts included) plus the filled part of the KV cache (mean over the
steps: prompt + new / 2 slots). step ms = (time(new) - time(1 new)) / (new - 1), i.e. prefill
excluded; achieved GB/s = bytes per step / step time; peak GB/s = the best of a timed
jnp.sum over a 512 MiB float32 array, timed between the decoders' calls in this same process;
"x bound" = step time / (bytes / peak), 1.0 being as fast as memory allows (a model whose bytes
fit in the CPU caches can go below 1). Timed calls rotate over the decoders (and the bandwidth
probe), so that the load of a shared machine hits them alike.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from flexolmo_jax import convert, model
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.generate import generate

_SIZES = flags.DEFINE_list("sizes", ["tiny", "25m", "100m"], "Model sizes: tiny, 25m, 100m.")
_BATCHES = flags.DEFINE_list("batches", ["1", "4", "16"], "Batch sizes.")
_PROMPTS = flags.DEFINE_list("prompts", ["64", "512"], "Prompt lengths.")
_NEW = flags.DEFINE_list("new", ["64", "256"], "New tokens per sequence.")
_IMPLS = flags.DEFINE_list("impls", ["cache", "recompute", "hf_eager", "hf_sdpa"],
                           "Decoders: cache, recompute (ours), hf_eager, hf_sdpa (transformers).")
_RECOMPUTE_MAX = flags.DEFINE_integer(
    "recompute_max_len", 640, "Skip full recomputation when prompt + new exceeds this (it costs "
    "a whole forward per token); 0: never skip.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "flexolmo_jax serving dtype (weights, activations and KV cache); "
                           "transformers always runs float32.")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch intra-op threads for transformers (0: torch's default, one per "
    "core). On a machine shared with other jobs, 1 thread ran transformers' generate up to 10x "
    "faster than 2 (docs/performance.md); measure on a quiet machine with the default.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed calls per decoder (best is kept).")
_JSON = flags.DEFINE_string("json", "", "Also write the rows to this JSON file.")

SIZES = {
    "tiny": dict(vocab_size=8192, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=192),
    "25m": dict(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, n_kv_heads=6,
                ffn_hidden=1024),
    "100m": dict(vocab_size=8192, d_model=768, n_layers=8, n_heads=12, n_kv_heads=12,
                 ffn_hidden=2048),
}
IMPL_NAMES = {"cache": "flexolmo_jax KV cache", "recompute": "flexolmo_jax full recompute",
              "hf_eager": "transformers eager", "hf_sdpa": "transformers sdpa"}


def _model(size):
  config = ModelConfig(**SIZES[size], rope_theta=10_000.0, num_experts=2, top_k=2,
                       pad_token_id=1, eos_token_id=2)
  params = model.init_params(config, jax.random.key(0))
  # Larger weights than init: peaked next-token distributions, so float32 rounding differences
  # between the libraries cannot flip a greedy choice.
  return config, jax.tree.map(lambda x: x * 4 if x.ndim > 2 else x, params)


class Bandwidth:
  """Best GB/s seen of a jitted sum over a 512 MiB float32 array (read once); `probe` is timed
  between the decoders' calls, so the peak is taken under the same load as they are."""

  def __init__(self):
    self.x = jnp.ones((128 * 1024 * 1024,), jnp.float32)
    self.total = jax.jit(jnp.sum)
    self.total(self.x).block_until_ready()
    self.peak = 0.0
    for _ in range(3):
      self.probe()

  def probe(self):
    seconds = _timed(lambda: self.total(self.x).block_until_ready())
    self.peak = max(self.peak, self.x.nbytes / seconds / 1e9)


def step_bytes(config, params, batch, prompt, new, itemsize):
  """Bytes a decode step must read: matmul weights (all experts, lm_head) + mean filled cache."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  weights = sum(x.size for path, x in leaves if "embed" != getattr(path[0], "key", None))
  weights += batch * config.d_model  # The embedding rows of the step's tokens.
  slots = prompt + new / 2
  cache = 2 * config.n_layers * batch * slots * config.n_kv_heads * config.resolved_head_dim
  return (weights + cache) * itemsize


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _hf_runner(hf_dir, attn, prompts, new):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  if _TORCH_THREADS.value:
    torch.set_num_threads(_TORCH_THREADS.value)
  hf = transformers.FlexOlmoForCausalLM.from_pretrained(hf_dir, attn_implementation=attn,
                                                        dtype=torch.float32).eval()
  tokens = torch.as_tensor(prompts, dtype=torch.long)
  # No end-of-sequence token, as ours runs (stop_at_eos=False): `new` tokens per row, and eos is
  # an ordinary token. (min_new_tokens would instead forbid eos, a different greedy choice.)
  hf.generation_config.eos_token_id = None

  def run():
    with torch.inference_mode():
      out = hf.generate(tokens, do_sample=False, max_new_tokens=new,
                        attention_mask=torch.ones_like(tokens), pad_token_id=1)
    return out[:, prompts.shape[1]:].numpy()
  return run


def bench_size(size, bandwidth):
  config, params = _model(size)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, "hf")
    if any(i.startswith("hf_") for i in _IMPLS.value):
      convert.save_hf(config, params, hf_dir)
    ours_config, ours_params = config, params
    if _DTYPE.value != "float32":
      ours_config = config.replace(dtype=_DTYPE.value, param_dtype=_DTYPE.value)
      ours_params = jax.tree.map(lambda x: x.astype(_DTYPE.value), params)
    itemsize = jnp.dtype(_DTYPE.value).itemsize
    for batch in map(int, _BATCHES.value):
      for prompt in map(int, _PROMPTS.value):
        prompts = np.random.default_rng(0).integers(3, config.vocab_size, (batch, prompt))
        for new in map(int, _NEW.value):
          ours = lambda n, cache: generate(ours_config, ours_params, prompts.tolist(),
                                           max_new_tokens=n, stop_at_eos=False, use_cache=cache,
                                           prompt_bucket=prompt)
          row = dict(size=size, batch=batch, prompt=prompt, new=new, dtype=_DTYPE.value,
                     seconds={}, tokens_per_s={}, same={})
          runners = {}
          for impl in _IMPLS.value:
            if impl == "recompute" and 0 < _RECOMPUTE_MAX.value < prompt + new:
              continue
            if impl.startswith("hf_"):
              runners[impl] = _hf_runner(hf_dir, impl[3:], prompts, new)
            else:
              runners[impl] = lambda cache=(impl == "cache"): ours(new, cache)
          if "cache" in runners:
            runners["prefill"] = lambda: ours(1, True)
          # Warm-up (compilation), then the timed calls in rotation, so that a change of load on
          # this shared machine hits every decoder alike; best of --repeats.
          outs = {impl: np.asarray(fn()) for impl, fn in runners.items()}
          best = {impl: float("inf") for impl in runners}
          for _ in range(_REPEATS.value):
            for impl, fn in runners.items():
              best[impl] = min(best[impl], _timed(fn))
              bandwidth.probe()
          prefill = best.pop("prefill", None)
          for impl, seconds in best.items():
            row["seconds"][impl] = seconds
            row["tokens_per_s"][impl] = batch * new / seconds
            print(f"  {size} b{batch} p{prompt} n{new} {impl}: {seconds:.3f} s", flush=True)
          if "cache" in outs:
            row["same"] = {k: bool(np.array_equal(v, outs["cache"])) for k, v in outs.items()
                           if k != "prefill"}
            step = (row["seconds"]["cache"] - prefill) / max(new - 1, 1)
            nbytes = step_bytes(config, params, batch, prompt, new, itemsize)
            if _DTYPE.value != "float32":
              # Accuracy of the serving dtype: greedy tokens equal to float32 decoding's.
              exact = generate(config, params, prompts.tolist(), max_new_tokens=new,
                               stop_at_eos=False, prompt_bucket=prompt)
              row["agree_float32"] = float(np.mean(exact == outs["cache"]))
              first = np.argmax(np.concatenate([exact != outs["cache"], np.ones((batch, 1), bool)],
                                               1), axis=1)
              row["first_diff_mean"] = float(np.mean(first))
            row.update(step_ms=1e3 * step, step_mb=nbytes / 1e6, achieved_gbs=nbytes / step / 1e9)
          rows.append(row)
  return rows


def table(rows):
  impls = [i for i in IMPL_NAMES if any(i in r["tokens_per_s"] for r in rows)]
  head = (["size", "batch", "prompt", "new"] + [f"{IMPL_NAMES[i]} tok/s" for i in impls]
          + ["cache / best transformers", "same tokens", "step ms", "MB/step", "GB/s",
             "x bound"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    rate = r["tokens_per_s"]
    hf = [rate[i] for i in ("hf_eager", "hf_sdpa") if i in rate]
    cells = [r["size"], r["batch"], r["prompt"], r["new"]]
    cells += [f"{rate[i]:,.1f}" if i in rate else "skipped" for i in impls]
    cells.append(f"{rate['cache'] / max(hf):.2f}x" if hf and "cache" in rate else "-")
    cells.append("yes" if r["same"] and all(r["same"].values()) else
                 ", ".join(k for k, v in r["same"].items() if not v) + " differ")
    if "step_ms" in r:
      cells += [f"{r['step_ms']:.1f}", f"{r['step_mb']:.0f}", f"{r['achieved_gbs']:.1f}",
                f"{r['x_bound']:.2f}"]
    else:
      cells += ["-"] * 4
    lines.append("| " + " | ".join(map(str, cells)) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  for size in _SIZES.value:
    if size not in SIZES:
      raise app.UsageError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
  for impl in _IMPLS.value:
    if impl not in IMPL_NAMES:
      raise app.UsageError(f"unknown decoder {impl!r}; choose from {sorted(IMPL_NAMES)}")
  bandwidth = Bandwidth()
  load = os.getloadavg()
  rows = []
  for size in _SIZES.value:
    rows += bench_size(size, bandwidth)
  peak = bandwidth.peak
  for r in rows:
    if "step_ms" in r:
      r.update(peak_gbs=peak, x_bound=r["step_ms"] / 1e3 / (r["step_mb"] * 1e6 / (peak * 1e9)))
  load_after = os.getloadavg()
  print(f"\nflexolmo_jax {_DTYPE.value}, transformers float32; greedy; best of {_REPEATS.value}; "
        f"{os.cpu_count()} CPUs, torch threads {_TORCH_THREADS.value or 'default'}; measured peak read bandwidth {peak:.1f} GB/s; 1-min load "
        f"average {load[0]:.1f} before, {load_after[0]:.1f} after\n")
  print(table(rows))
  for r in rows:
    if "agree_float32" in r:
      print(f"{r['size']} b{r['batch']} p{r['prompt']} n{r['new']} {r['dtype']}: "
            f"{100 * r['agree_float32']:.1f}% of greedy tokens equal float32's; first "
            f"difference at token {r['first_diff_mean']:.1f} on average ({r['new']}: none)")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(dict(peak_gbs=peak, load_before=load, load_after=load_after, rows=rows), f,
                indent=1)


if __name__ == "__main__":
  app.run(main)
