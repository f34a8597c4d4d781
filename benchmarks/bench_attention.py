"""Attention forward+backward time and peak temporary memory per implementation and length.

  python -m benchmarks.bench_attention [--lengths=512,2048,8192 --impls=xla,chunked,cudnn,splash \
      --batch=1 --heads=8 --kv_heads=2 --head_dim=64 --block_size=512 --repeats=3 --max_run_gib=4 \
      --profile_dir=DIR]

Times one jitted `jax.grad` of sum(attention output * a fixed random tensor) with respect to q, k
and v (packed rows of 4 equal documents, causal), after a warm-up call, as the median of
`--repeats` calls ending in `block_until_ready`. Memory is the compiled step's temporary buffer
size (`memory_analysis().temp_size_in_bytes`: XLA's peak for intermediates, excluding inputs and
outputs), read without running; a cell whose temporaries exceed `--max_run_gib` is reported but
not run. Prints every cell as it finishes, then a markdown table. On CPU, `cudnn` is
`jax.nn.dot_product_attention`'s XLA implementation and `splash` runs the Pallas kernel in
interpret mode: neither time says anything about a GPU or TPU.
"""

import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import profiling
from flexolmo_jax import attention
from flexolmo_jax.config import ATTENTION_IMPLS

_LENGTHS = flags.DEFINE_list("lengths", ["512", "2048", "8192"], "Sequence lengths.")
_IMPLS = flags.DEFINE_list("impls", ["xla", "chunked", "cudnn", "splash"], "Implementations.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences per call.")
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "Key/value heads (grouped-query attention).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_BLOCK = flags.DEFINE_integer("block_size", 0, "chunked / splash tile (0: attention's default).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per cell (median reported).")
_MAX_RUN_GIB = flags.DEFINE_float("max_run_gib", 4.0,
                                  "Do not run cells whose temporaries exceed this (GiB).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "q/k/v dtype.")


def _problem(length):
  dtype = jnp.dtype(_DTYPE.value)
  keys = jax.random.split(jax.random.key(0), 4)
  b, h, k, d = _BATCH.value, _HEADS.value, _KV_HEADS.value, _HEAD_DIM.value
  q = jax.random.normal(keys[0], (b, length, h, d), dtype)
  kv = [jax.random.normal(key, (b, length, k, d), dtype) for key in keys[1:3]]
  cotangent = jax.random.normal(keys[3], (b, length, h, d), jnp.float32)
  segments = jnp.broadcast_to(jnp.arange(length) * 4 // length, (b, length)).astype(jnp.int32)
  return (q, *kv, segments, cotangent)


def _step(impl):
  def loss(q, k, v, segments, cotangent):
    out = attention.attend(q, k, v, segments, impl=impl, block_size=_BLOCK.value)
    return jnp.sum(out.astype(jnp.float32) * cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(impl, length):
  """(median ms or None if not run, temporary GiB) of one forward+backward call."""
  args = _problem(length)
  compiled = _step(impl).lower(*args).compile()
  gib = compiled.memory_analysis().temp_size_in_bytes / 2**30
  if gib > _MAX_RUN_GIB.value:
    return None, gib
  jax.block_until_ready(compiled(*args))  # Warm up.
  times = []
  with profiling.trace():
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times), gib


def main(argv):
  del argv
  lengths = [int(n) for n in _LENGTHS.value]
  impls = list(_IMPLS.value)
  for impl in impls:
    if impl not in ATTENTION_IMPLS or impl == "auto":
      raise app.UsageError(f"--impls: {impl!r} is not one of {ATTENTION_IMPLS[1:]}")
  load_before = os.getloadavg()
  cells = {}
  for length in lengths:
    for impl in impls:
      cells[impl, length] = measure(impl, length)
      ms, gib = cells[impl, length]
      timing = "not run" if ms is None else f"{ms:10.1f} ms"
      print(f"# {impl:8s} L={length:5d}: {timing}, temporaries {gib * 1024:9.1f} MiB", flush=True)
  load_after = os.getloadavg()

  print()
  print(f"Attention forward+backward (grad wrt q, k, v), batch {_BATCH.value}, "
        f"{_HEADS.value} query / {_KV_HEADS.value} kv heads, head_dim {_HEAD_DIM.value}, "
        f"{_DTYPE.value}, block {_BLOCK.value or attention.DEFAULT_BLOCK}, median of "
        f"{_REPEATS.value}, {jax.devices()[0].platform} ({os.cpu_count()} cores), "
        f"load avg {load_before[0]:.2f} -> {load_after[0]:.2f}.")
  print()
  header = ["L"] + [f"{i} ms" for i in impls] + [f"{i} MiB" for i in impls]
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---:" for _ in header) + "|")
  for length in lengths:
    row = [str(length)]
    row += ["not run" if cells[i, length][0] is None else f"{cells[i, length][0]:.1f}"
            for i in impls]
    row += [f"{cells[i, length][1] * 1024:.1f}" for i in impls]
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  app.run(main)
