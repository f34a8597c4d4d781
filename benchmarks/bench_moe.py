"""MoE layer forward+backward time per dispatch back end, as the number of experts grows.

  python -m benchmarks.bench_moe [--tokens=4096 --d_model=512 --ffn=1024 --top_k=2 \
      --experts=2,4,8,16 --backends=dense,ragged,blocked --repeats=5]

Times one jitted `jax.value_and_grad` of sum(moe output) with respect to the input, the router
and the three expert weight stacks (routing via `moe.route`, then `moe.dispatch`), after a
warm-up call, as the median of `--repeats` calls ending in `block_until_ready`. Prints a markdown
table: one row per expert count, milliseconds per back end and each back end's ratio to its time
at the smallest expert count. At fixed top-k, "blocked" (and "ragged" on accelerators) should
stay flat in E; "dense" computes every expert and grows linearly.
"""

import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from flexolmo_jax import moe

_TOKENS = flags.DEFINE_integer("tokens", 4096, "Tokens per call.")
_D_MODEL = flags.DEFINE_integer("d_model", 512, "Model width.")
_FFN = flags.DEFINE_integer("ffn", 1024, "Expert SwiGLU hidden width.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token.")
_EXPERTS = flags.DEFINE_list("experts", ["2", "4", "8", "16"], "Expert counts to time.")
_BACKENDS = flags.DEFINE_list("backends", ["dense", "ragged", "blocked"], "Dispatch back ends.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per cell (median reported).")
_BLOCK = flags.DEFINE_integer("block_size", 0, "Rows per block for 'blocked' (0: automatic).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation/weight dtype.")


def _problem(num_experts, seed=0):
  dtype = jnp.dtype(_DTYPE.value)
  d, f = _D_MODEL.value, _FFN.value
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (_TOKENS.value, d), dtype)
  router = jax.random.normal(keys[1], (num_experts, d), jnp.float32) * d ** -0.5
  weights = (jax.random.normal(keys[2], (num_experts, d, f), dtype) * d ** -0.5,
             jax.random.normal(keys[3], (num_experts, d, f), dtype) * d ** -0.5,
             jax.random.normal(keys[4], (num_experts, f, d), dtype) * f ** -0.5)
  return x, router, weights


def _step(backend):
  def loss(x, router, weights):
    routing = moe.route(x, router, _TOP_K.value)
    y = moe.dispatch(x, routing, *weights, backend=backend, block_size=_BLOCK.value)
    return jnp.sum(y.astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def time_cell(backend, num_experts):
  """Median milliseconds of one forward+backward call."""
  args = _problem(num_experts)
  step = _step(backend)
  jax.block_until_ready(step(*args))  # Compile and warm up.
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def main(argv):
  del argv
  experts = [int(e) for e in _EXPERTS.value]
  backends = list(_BACKENDS.value)
  for e in experts:
    if not 1 <= _TOP_K.value <= e:
      raise app.UsageError(f"top_k={_TOP_K.value} needs at least that many experts, got {e}")
  load_before = os.getloadavg()
  ms = {}
  for backend in backends:
    for e in experts:
      ms[backend, e] = time_cell(backend, e)
      print(f"# {backend:8s} E={e:3d}: {ms[backend, e]:10.1f} ms", flush=True)
  load_after = os.getloadavg()

  base = experts[0]
  print()
  print(f"MoE forward+backward, {_TOKENS.value} tokens, d_model {_D_MODEL.value}, "
        f"ffn {_FFN.value}, top-{_TOP_K.value}, {_DTYPE.value}, median of {_REPEATS.value}, "
        f"{jax.devices()[0].platform} ({os.cpu_count()} cores), "
        f"load avg {load_before[0]:.2f} -> {load_after[0]:.2f}"
        + (f", block_size {_BLOCK.value}" if _BLOCK.value else "") + ".")
  print()
  header = ["E"] + [f"{b} ms" for b in backends] + [f"{b} / E={base}" for b in backends]
  print("| " + " | ".join(header) + " |")
  print("|" + "|".join("---:" for _ in header) + "|")
  for e in experts:
    cells = [str(e)] + [f"{ms[b, e]:.1f}" for b in backends]
    cells += [f"{ms[b, e] / ms[b, base]:.2f}x" for b in backends]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
