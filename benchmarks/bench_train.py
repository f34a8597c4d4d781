"""Training throughput and memory: public pretraining vs expert training vs full fine-tuning,
beside the input pipeline's rate (input must never limit training).

  python -m benchmarks.bench_train --corpus=runs/data [--sizes=tiny,small --steps=5]

Memory is the compiled step's own accounting (arguments + outputs + temporaries - donated
aliases, from `compiled.memory_analysis()`), which is exact and repeatable on any backend.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from flexolmo_jax import experts, model
from flexolmo_jax import objective, partition
from flexolmo_jax.data import DataConfig, make_pipeline
from flexolmo_jax.train_config import train_config

_CORPUS = flags.DEFINE_string("corpus", "runs/data", "Prepared corpus (python -m flexolmo_jax.data prepare).")
_SIZES = flags.DEFINE_list("sizes", ["tiny", "small"], "Model sizes to measure.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after warm-up.")

SIZES = {
    "tiny": dict(vocab_size=8192, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=192),
    "small": dict(vocab_size=8192, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=384),
}
BATCH, SEQ = 16, 128


def _config(mode, size):
  raw = dict(mode=mode, data=dict(path=_CORPUS.value, seq_len=SEQ, batch_size=BATCH),
             optim=dict(warmup_steps=1), steps=100)
  if mode == "public":
    raw["model"] = {**SIZES[size], "moe_backend": "dense"}
  else:
    raw["expert"] = dict(name="math", public="unused")
  return train_config(raw)


def _batch():
  ones = jnp.ones((BATCH, SEQ), jnp.int32)
  return {"tokens": ones, "targets": ones, "segment_ids": ones, "loss_mask": ones.astype(jnp.float32),
          "positions": jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (BATCH, SEQ))}


def _measure(config, model_config, trainable, frozen):
  tx, schedule = objective.make_optimizer(config, trainable)
  trainable = jax.tree.map(jnp.copy, trainable)  # The step donates its state; keep the caller's.
  state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0)}
  step = jax.jit(objective.make_train_step(config, model_config, partition.BY_MODE[config.mode], tx,
                                         schedule), donate_argnums=0)
  batch = _batch()
  compiled = step.lower(state, frozen, batch).compile()
  mem = compiled.memory_analysis()
  peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes \
      - mem.alias_size_in_bytes
  state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, frozen, batch)
  jax.block_until_ready(metrics)
  return BATCH * SEQ * _STEPS.value / (time.perf_counter() - start), peak


def _pipeline_rate():
  cfg = DataConfig(path=_CORPUS.value, domains=("math",), batch_size=BATCH, seq_len=SEQ)
  it = iter(make_pipeline(cfg, "train", shard_index=0, shard_count=1))
  next(it)
  start = time.perf_counter()
  tokens = sum(next(it)["tokens"].size for _ in range(50))
  return tokens / (time.perf_counter() - start)


def main(argv):
  del argv
  rows = []
  for size in _SIZES.value:
    public_cfg = _config("public", size)
    public = model.init_params(public_cfg.model, jax.random.key(0))
    rows.append((size, "public pretraining", *_measure(public_cfg, public_cfg.model, public, None)))
    expert_cfg = _config("expert", size)
    moe_cfg = experts.moe_config(public_cfg.model, 1, top_k=2, with_bias=True, bias_init=-0.5)
    router = jnp.zeros((public_cfg.model.n_layers, public_cfg.model.d_model))
    expert = experts.upcycle_expert(public, router, bias_init=-0.5)
    frozen = {"public": public, "public_router": router}
    rows.append((size, "expert training", *_measure(expert_cfg, moe_cfg, expert, frozen)))
    # Full fine-tuning of the same 2-expert model: every parameter trained.
    full_cfg = dataclasses.replace(public_cfg, model=moe_cfg)
    full = experts.assemble_moe(public, router, [expert], with_bias=True)
    rows.append((size, "full fine-tuning (same MoE)", *_measure(full_cfg, moe_cfg, full, None)))
  pipeline_rate = _pipeline_rate()
  print(f"batch {BATCH} x seq {SEQ}, {jax.devices()[0].platform}, {_STEPS.value} timed steps\n")
  print("| size | run | tokens/s | step memory (MiB) | memory vs full fine-tuning |")
  print("|---|---|---|---|---|")
  for i, (size, name, rate, peak) in enumerate(rows):
    full_peak = rows[i - i % 3 + 2][3]
    print(f"| {size} | {name} | {rate:,.0f} | {peak / 2**20:,.1f} | {peak / full_peak:.2f}x |")
  train_rate = max(r[2] for r in rows)
  print(f"\ninput pipeline: {pipeline_rate:,.0f} tokens/s = {pipeline_rate / train_rate:,.0f}x the "
        "fastest training step above")


if __name__ == "__main__":
  app.run(main)
