"""Decode throughput: KV cache vs full recomputation vs transformers' `generate`.

  python -m benchmarks.bench_generate [--batch=4 --prompt=16 --new=64 --repeats=3]

One tiny random FlexOlmo checkpoint (tests/tiny_hf.py shapes), converted with `load_hf`, decoded
greedily by all three; prints a markdown table of generated tokens per second and ratios.
Compilation is excluded (one warm-up call each); the outputs are checked to be identical.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import tiny_hf  # pylint: disable=g-import-not-at-top,wrong-import-position

from flexolmo_jax import convert  # pylint: disable=g-import-not-at-top,wrong-import-position
from flexolmo_jax.generate import generate  # pylint: disable=g-import-not-at-top,wrong-import-position


def _best_time(fn, repeats):
  fn()  # Warm-up: compilation.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return min(times), out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prompt", type=int, default=16)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  torch.set_num_threads(1)
  with tempfile.TemporaryDirectory() as tmp:
    # max_position_embeddings must cover prompt + new for transformers.
    hf = tiny_hf.write_tiny_hf_checkpoint(tmp, moe=True, seed=0,
                                          max_position_embeddings=args.prompt + args.new)
    config, params = convert.load_hf(tmp)
  prompts = tiny_hf.random_tokens(config.vocab_size, args.batch, args.prompt, seed=0)
  run = lambda cache: generate(config, params, prompts.tolist(), max_new_tokens=args.new,
                               stop_at_eos=False, use_cache=cache, prompt_bucket=args.prompt)

  def hf_generate():
    with torch.no_grad():
      out = hf.generate(torch.as_tensor(prompts, dtype=torch.long), do_sample=False,
                        max_new_tokens=args.new, min_new_tokens=args.new,
                        attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                        pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
    return out[:, args.prompt:].numpy()

  results = {}
  for name, fn in (("flexolmo_jax, KV cache", lambda: run(True)),
                   ("flexolmo_jax, full recompute", lambda: run(False)),
                   ("transformers generate (KV cache)", hf_generate)):
    seconds, out = _best_time(fn, args.repeats)
    results[name] = (seconds, np.asarray(out))
  reference = results["flexolmo_jax, KV cache"][1]
  same = {name: bool(np.array_equal(out, reference)) for name, (_, out) in results.items()}
  tokens = args.batch * args.new
  cached = tokens / results["flexolmo_jax, KV cache"][0]
  print(f"batch {args.batch}, prompt {args.prompt}, new {args.new}; tiny FlexOlmo "
        f"(d {config.d_model}, {config.n_layers} layers, {config.num_experts} experts top-"
        f"{config.top_k}); float32 CPU, best of {args.repeats}\n")
  print("| decoder | s | tokens/s | KV cache speed-up | same tokens as KV cache |")
  print("|---|---|---|---|---|")
  for name, (seconds, _) in results.items():
    rate = tokens / seconds
    print(f"| {name} | {seconds:.4f} | {rate:,.0f} | {cached / rate:.2f}x | {same[name]} |")


if __name__ == "__main__":
  main()
