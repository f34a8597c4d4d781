"""The expert-training step of a ~1B FlexOlmo per attention implementation: tokens/s, MFU, peak
memory. Run by benchmarks/accel_check.sh on a GPU or TPU; `--size=tiny` runs it on a CPU.

  python -m benchmarks.bench_accel [--size=1b --seq_len=4096 --batch=4 --steps=5 \
      --impls=xla,chunked,cudnn --dtype=bfloat16 --remat=full --peak_tflops=N --profile_dir=DIR]

The step is the one training runs (objective.make_train_step over partition.EXPERT): a public
OLMo-2 model frozen, one expert (FFN, router row, bias per layer) trained, top-2 of 2, with the
precision policy of docs/precision.md (compute in --dtype, float32 master weights and AdamW
moments). One device, no mesh. Tokens/s is over --steps calls after a warm-up call. MFU is model
FLOPs (below) per second over the device's peak (`--peak_tflops`, or a table of known chips;
none on CPU): per token, 2 FLOPs per multiply-add, counting the forward matmuls (attention
projections, both experts, LM head) twice (forward and activation gradients), the causal
attention scores and values three times (forward, and a backward of twice the work), and each
trained weight once more for its gradient; rematerialisation is not counted (it is hardware,
not model, FLOPs). Peak memory is the device's `peak_bytes_in_use`
where it reports one (GPU, TPU: the process's maximum so far, so accel_check.sh runs one
implementation per process), else the compiled step's arguments + outputs + temporaries.
"""

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import profiling
from flexolmo_jax import experts, objective, partition, precision
from flexolmo_jax import config as config_lib
from flexolmo_jax.model import init_params
from flexolmo_jax.train_config import train_config

SIZES = {
    # OLMo-2 1B's shape (the public model); the step trains one expert of it.
    "1b": dict(vocab_size=100_352, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16,
               ffn_hidden=8192),
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128),
}
# Dense bfloat16 peak TFLOP/s per chip, by a substring of jax's device_kind (vendor figures).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6": 918.0}

_SIZE = flags.DEFINE_enum("size", "1b", list(SIZES), "Public model size.")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch", 4, "Sequences per step.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step.")
_IMPLS = flags.DEFINE_list("impls", [], "Attention implementations (default: those the "
                           "platform runs natively: xla, chunked, and cudnn on GPU or splash on TPU).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
_REMAT = flags.DEFINE_enum("remat", "full", list(config_lib.REMAT_POLICIES), "Rematerialisation.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (0: from the table "
                           "of known chips; none on CPU).")


def default_impls(platform: str) -> list[str]:
  return ["xla", "chunked"] + {"gpu": ["cudnn"], "tpu": ["splash"]}.get(platform, [])


def model_flops_per_token(c: config_lib.ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token of the expert step (see the module docstring)."""
  h, dh, kv = c.n_heads, c.resolved_head_dim, c.n_kv_heads
  attn_proj = c.d_model * (h * dh + 2 * kv * dh) + h * dh * c.d_model
  ffn = 3 * c.d_model * c.ffn_hidden
  weight_macs = c.n_layers * (attn_proj + 2 * ffn) + c.d_model * c.vocab_size
  # Scores and values, causal: each token meets on average half the sequence.
  attention_macs = c.n_layers * 2 * h * dh * seq_len / 2
  trained = c.n_layers * (ffn + c.d_model + 1)  # The expert's FFN, router row and bias.
  # Forward and activation gradients through every weight; attention's backward is twice its
  # forward; weight gradients for the trained expert only.
  return 2 * (2 * weight_macs + 3 * attention_macs + trained)


def _peak_tflops(device) -> float:
  if _PEAK.value:
    return _PEAK.value
  return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in device.device_kind.lower()), 0.0)


def _problem(public_config):
  key = jax.random.key(0)
  public = jax.jit(lambda k: init_params(public_config, k))(key)
  row = jax.random.normal(key, (public_config.n_layers, public_config.d_model)) * 0.02
  expert = jax.jit(lambda p, r: experts.upcycle_expert(p, r, bias_init=-0.5))(public, row)
  frozen = {"public": public, "public_router": row}
  tokens = jax.random.randint(key, (_BATCH.value, _SEQ.value + 1), 3, public_config.vocab_size)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
           "segment_ids": jnp.ones((_BATCH.value, _SEQ.value), jnp.int32),
           "loss_mask": jnp.ones((_BATCH.value, _SEQ.value), jnp.float32),
           "positions": jnp.broadcast_to(jnp.arange(_SEQ.value, dtype=jnp.int32),
                                         (_BATCH.value, _SEQ.value))}
  return expert, frozen, batch


def measure(impl: str, public_config, expert, frozen, batch) -> dict:
  """tokens/s, model TFLOP/s and peak bytes of the expert step with attention `impl`."""
  config = train_config(dict(mode="expert", expert=dict(name="mine", public="unused"),
                             data=dict(seq_len=_SEQ.value, batch_size=_BATCH.value),
                             optim=dict(warmup_steps=1), steps=100))
  step_config = experts.moe_config(public_config, 1, top_k=2, with_bias=True,
                                   bias_init=-0.5).replace(
      dtype=_DTYPE.value, remat=_REMAT.value, attention_impl=impl, moe_backend="dense")
  trainable, frozen = precision.apply(config, jax.tree.map(jnp.copy, expert), frozen)
  tx, schedule = objective.make_optimizer(config, trainable)
  state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0)}
  step = jax.jit(objective.make_train_step(config, step_config, partition.EXPERT, tx, schedule),
                 donate_argnums=0)
  compiled = step.lower(state, frozen, batch).compile()
  state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready(metrics)
  with profiling.trace():
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - start
  tokens = _BATCH.value * _SEQ.value * _STEPS.value
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    peak, source = stats["peak_bytes_in_use"], "device"
  else:
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    source = "compiled"
  return {"tokens_per_sec": tokens / seconds, "loss": float(metrics["loss"]),
          "tflops": tokens * model_flops_per_token(step_config, _SEQ.value) / seconds / 1e12,
          "peak_gib": peak / 2**30, "peak_source": source}


def main(argv):
  del argv
  device = jax.devices()[0]
  public_config = config_lib.ModelConfig(**SIZES[_SIZE.value], rope_theta=500_000.0)
  impls = _IMPLS.value or default_impls(device.platform)
  peak = _peak_tflops(device)
  expert, frozen, batch = _problem(public_config)
  print(f"expert step, {_SIZE.value} public model, batch {_BATCH.value} x {_SEQ.value}, "
        f"{_DTYPE.value} compute, float32 master weights, remat {_REMAT.value}, on "
        f"{device.device_kind} ({device.platform}); peak {peak or 'unknown'} TFLOP/s")
  print("| attention | tokens/s | model TFLOP/s | MFU | peak GiB | loss |")
  print("|---|---:|---:|---:|---:|---:|")
  for impl in impls:
    try:
      r = measure(impl, public_config, expert, frozen, batch)
    except Exception as err:  # pylint: disable=broad-except
      # One implementation failing (out of memory, not supported here) must not hide the others.
      print(f"| {impl} | failed: {type(err).__name__}: {str(err).splitlines()[0][:160]} |||||",
            flush=True)
      continue
    mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "n/a"
    print(f"| {impl} | {r['tokens_per_sec']:.0f} | {r['tflops']:.3g} | {mfu} | "
          f"{r['peak_gib']:.3g} ({r['peak_source']}) | {r['loss']:.3f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
