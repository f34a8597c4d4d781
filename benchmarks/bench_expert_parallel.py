"""Expert parallelism vs replicated experts: step time, collective bytes, parameter bytes.

  python -m benchmarks.bench_expert_parallel [--devices=8 --batch=16 --seq_len=128 \
      --d_model=256 --ffn=512 --experts=8 --top_k=2 --layers=2 --backend=blocked --repeats=7]

On `--devices` devices (fake CPU devices unless an accelerator is present) it jits one forward +
backward (value_and_grad of the mean next-token cross-entropy, every parameter differentiated)
of a small FlexOlmo model in several layouts:

- "replicated": mesh {data: n}, every device holds every expert (data parallelism only), under
  GSPMD (expert_parallel="none");
- "replicated, shard_map": the same, with any expert_parallel strategy: with an expert axis of
  size 1 each device dispatches its own tokens inside shard_map;
- "gspmd": mesh {expert: n}, experts sharded, expert_parallel="none" (GSPMD decides);
- one row per expert_parallel strategy on mesh {expert: n}; "all_to_all c=1.25" is the capacity-
  limited (dropping) variant. ragged_all_to_all is left out on CPU, where XLA lacks it.

Times are medians of `--repeats` calls, the variants interleaved round by round in one process so
that load changes hit all of them alike. Collective bytes are read from the compiled per-device
HLO (layers unrolled, so every layer's collectives appear): for each all-gather, all-reduce,
reduce-scatter, all-to-all and collective-permute, the bytes one device sends under a ring
algorithm, from its result size and group size (`collective_bytes`).
"""

import os
import re
import statistics
import time

from absl import app
from absl import flags

_DEVICES = flags.DEFINE_integer("devices", 8, "Devices (fake CPU devices on CPU).")
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width.")
_FFN = flags.DEFINE_integer("ffn", 512, "Expert SwiGLU hidden width.")
_EXPERTS = flags.DEFINE_integer("experts", 8, "Experts per layer.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token.")
_LAYERS = flags.DEFINE_integer("layers", 2, "Transformer layers.")
_BACKEND = flags.DEFINE_enum("backend", "blocked", ["dense", "ragged", "blocked"],
                             "Local MoE back end.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per variant (median reported).")

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s+(" + "|".join(COLLECTIVES)
                          + r")(-start|-done)?\((.*)$")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def _group_size(attributes: str) -> int:
  """Members per replica group; 0 when the HLO does not say in a form read here."""
  explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
  if explicit:
    return len(explicit.group(1).split(","))
  iota = re.search(r"replica_groups=\[\d+,(\d+)\]<=", attributes)
  if iota:
    return int(iota.group(1))
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
  if mesh:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    axes = re.findall(r"'(\w+)'", mesh.group(2))
    size = 1
    for axis in axes:
      size *= int(sizes[axis])
    return size
  return 0


# Bytes one device sends, as a multiple of the collective's result size, for groups of g
# (bandwidth-optimal ring algorithms): a reduce-scatter's input is g results.
_SENT_PER_RESULT_BYTE = {
    "all-gather": lambda g: (g - 1) / g,
    "reduce-scatter": lambda g: g - 1,
    "all-reduce": lambda g: 2 * (g - 1) / g,
    "all-to-all": lambda g: (g - 1) / g,
    # Of its output buffer, sized for the worst case: an upper bound.
    "ragged-all-to-all": lambda g: (g - 1) / g,
    "collective-permute": lambda g: 1.0,
}


def collective_bytes(hlo_text: str, num_devices: int) -> dict[str, float]:
  """Bytes one device sends per kind of collective in a compiled (per-device) HLO module.

  Result sizes are read from the HLO and scaled by `_SENT_PER_RESULT_BYTE`. An async pair
  (accelerators) counts once, at its -done, whose result is the collective's, with groups of
  `num_devices` when the -done line does not say. Single-member groups move nothing.
  """
  totals = dict.fromkeys(COLLECTIVES, 0.0)
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match or match.group(3) == "-start":
      continue
    result, kind = match.group(1), match.group(2)
    group = _group_size(match.group(4)) or num_devices
    result_bytes = sum(_DTYPE_BYTES[d] * _prod(dims) for d, dims in _SHAPE.findall(result))
    totals[kind] += result_bytes * _SENT_PER_RESULT_BYTE[kind](group)
  return totals


def _prod(dims: str) -> int:
  size = 1
  for d in filter(None, dims.split(",")):
    size *= int(d)
  return size


def _variants():
  n = _DEVICES.value
  yield "replicated", {"data": n}, {}
  yield "replicated, shard_map", {"data": n}, dict(expert_parallel="allgather")
  yield "gspmd", {"expert": n}, {}
  yield "allgather", {"expert": n}, dict(expert_parallel="allgather")
  yield "all_to_all", {"expert": n}, dict(expert_parallel="all_to_all")
  yield "all_to_all c=1.25", {"expert": n}, dict(expert_parallel="all_to_all",
                                                 expert_capacity_factor=1.25)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu":
    yield "ragged_all_to_all", {"expert": n}, dict(expert_parallel="ragged_all_to_all")


def _build(mesh_shape, overrides):
  """(jitted step under its mesh, args, collective bytes, per-device parameter bytes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flexolmo_jax import config as C  # pylint: disable=g-import-not-at-top
  from flexolmo_jax import model as M  # pylint: disable=g-import-not-at-top
  from flexolmo_jax import sharding as S  # pylint: disable=g-import-not-at-top

  config = C.tiny(vocab_size=512, d_model=_D_MODEL.value, n_layers=_LAYERS.value, n_heads=4,
                  n_kv_heads=4, ffn_hidden=_FFN.value, num_experts=_EXPERTS.value,
                  top_k=_TOP_K.value, moe_backend=_BACKEND.value, scan_layers=False, **overrides)
  mesh = S.make_mesh(mesh_shape)
  params = M.init_params(config, jax.random.key(0))
  params = jax.device_put(params, S.tree_shardings(params, M.logical_axes(config), mesh))
  tokens = jax.random.randint(jax.random.key(1), (_BATCH.value, _SEQ.value + 1), 0, 512)
  tokens = jax.device_put(tokens.astype(jnp.int32), S.batch_sharding(mesh))

  def loss(p, t):
    logits = M.Transformer(config).apply({"params": p}, t[:, :-1])
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, t[:, 1:, None], axis=-1)[..., 0]
    return jnp.mean(log_z - target)

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
  param_bytes = sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(params))
  return (compiled, (params, tokens), collective_bytes(compiled.as_text(), mesh.devices.size),
          param_bytes)


def main(argv):
  del argv
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_DEVICES.value}")
  import jax  # pylint: disable=g-import-not-at-top  (after XLA_FLAGS)

  variants = list(_variants())
  built = {}
  for name, mesh_shape, overrides in variants:
    built[name] = _build(mesh_shape, overrides)
    jax.block_until_ready(built[name][0](*built[name][1]))  # Warm up.
    print(f"# compiled {name}", flush=True)
  load_before = os.getloadavg()
  times = {name: [] for name, _, _ in variants}
  for _ in range(_REPEATS.value):
    for name, _, _ in variants:
      step, args = built[name][0], built[name][1]
      start = time.perf_counter()
      jax.block_until_ready(step(*args))
      times[name].append((time.perf_counter() - start) * 1e3)
  load_after = os.getloadavg()

  ms = {name: statistics.median(t) for name, t in times.items()}
  base = "replicated"
  print()
  print(f"Forward+backward of a {_LAYERS.value}-layer FlexOlmo, d_model {_D_MODEL.value}, "
        f"{_EXPERTS.value} experts (ffn {_FFN.value}), top-{_TOP_K.value}, {_BACKEND.value} back "
        f"end, batch {_BATCH.value}x{_SEQ.value}, float32, on {_DEVICES.value} "
        f"{jax.devices()[0].platform} devices ({os.cpu_count()} cores), median of "
        f"{_REPEATS.value}, load avg {load_before[0]:.1f} -> {load_after[0]:.1f}. Bytes per "
        "device per step, sent (ring model).")
  print()
  kinds = [k for k in COLLECTIVES if any(built[n][2][k] for n in built)]
  header = (["layout", "ms", "vs replicated"] + [f"{k} MB" for k in kinds]
            + ["collectives MB", "params MB / device"])
  print("| " + " | ".join(header) + " |")
  print("|---|" + "|".join("---:" for _ in header[1:]) + "|")
  for name, _, _ in variants:
    _, _, coll, param_bytes = built[name]
    cells = [name, f"{ms[name]:.1f}", f"{ms[name] / ms[base]:.2f}x"]
    cells += [f"{coll[k] / 1e6:.2f}" for k in kinds]
    cells += [f"{sum(coll.values()) / 1e6:.2f}", f"{param_bytes / 1e6:.2f}"]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
