"""The one training loop: sharding, checkpoint/resume with the data-iterator state, metrics,
progress bar, NaN guard and the DP noise key, for every kind of run (partition.py).

A killed run resumes from its last complete checkpoint, data iterator included, and reproduces
the uninterrupted run exactly. On SIGTERM (a preemption notice) the run saves a checkpoint at the
step it is on and exits with status 0 (`Preempted`), so a supervisor that restarts it resumes
exactly and loses nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from flexolmo_jax import distributed, objective, precision, routing_diagnostics, runs, sharding
from flexolmo_jax import train_state, xla_options
from flexolmo_jax import data as data_lib
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.manifest import Manifest
from flexolmo_jax.partition import Partition
from flexolmo_jax.train_config import TrainConfig


class NonFiniteError(RuntimeError):
  """The loss, gradient norm or parameters became NaN or Inf."""


class Preempted(SystemExit):
  """SIGTERM arrived; the step it came at is saved. Exit status 0: resuming continues exactly."""

  def __init__(self, step: int):
    super().__init__(0)
    self.step = step


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[list]:
  """A list that SIGTERM appends to while the block runs (handlers live on the main thread;
  elsewhere it stays empty)."""
  flag = []
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: flag.append(True))
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def _sigterm_seen(flag: list) -> bool:
  """Whether any host was sent SIGTERM (all hosts must save the same step together)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.array([bool(flag)]))))


def on_mesh(mesh, fn):
  """`fn` called with `mesh` set, so that the model's expert-parallel shard_map finds it."""
  def call(*args):
    with jax.set_mesh(mesh):
      return fn(*args)
  return call


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _non_finite(what: str, step: int, manager, workdir) -> NonFiniteError:
  return NonFiniteError(
      f"non-finite {what} at step {step}; the last good checkpoint (step "
      f"{manager.latest_step()}) in {workdir} is kept. Lower optim.lr, check the data, or "
      "resume from it after changing the config")


def evaluate_domains(data_cfg, eval_fn, trainable, frozen, domains: Sequence[str],
                     eval_batches: int, batch_sharding, row_change_LxD=None) -> dict[str, float]:
  """Validation loss per domain over up to eval_batches batches of its validation split, and,
  when eval_fn returns routing sums (objective.make_eval_step's diagnose_expert), the routing
  diagnostics (routing_diagnostics.metrics, with the router row's change `row_change_LxD`).

  On several hosts every host must run the same number of steps with full batches (each step
  is one global computation), so the split repeats and exactly eval_batches batches are read.
  """
  multi_host = jax.process_count() > 1
  out = {}
  for domain in domains:
    cfg = data_cfg.replace(domains=(domain,), shuffle=False)
    total, count, sums = 0.0, 0.0, None
    batches = iter(data_lib.make_pipeline(
        cfg, "validation", num_epochs=None if multi_host else 1,
        drop_remainder=multi_host, batch_size=distributed.host_batch_size(cfg.batch_size)))
    for _, batch in zip(range(eval_batches), batches):
      batch = (distributed.global_batch(batch, batch_sharding) if multi_host
               else {k: jnp.asarray(v) for k, v in batch.items()})
      loss_sum, n, routing = eval_fn(trainable, frozen, batch)
      total, count = total + float(loss_sum), count + float(n)
      sums = routing if sums is None else jax.tree.map(jnp.add, sums, routing)
    if count:
      out[f"val_loss/{domain}"] = total / count
    if sums:
      out.update(routing_diagnostics.metrics(domain, jax.device_get(sums), row_change_LxD))
  return out


def _host_value(x) -> np.ndarray:
  """A (possibly sharded over several hosts) array's whole value on this host."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _dp_key(workdir: pathlib.Path, secrets_dir: str):
  """The run's secret DP noise key: the primary host reads (or creates) it; every host uses
  its copy."""
  primary = distributed.is_primary()
  secrets = runs.secrets_dir(workdir, secrets_dir)
  key_data = (jax.random.key_data(runs.dp_noise_key(workdir, secrets)) if primary
              else np.zeros(2, np.uint32))
  return jax.random.wrap_key_data(distributed.from_primary(np.asarray(key_data)),
                                  impl="threefry2x32")


def fit(config: TrainConfig, workdir: str | os.PathLike, *args, **kwargs
        ) -> tuple[Any, dict[str, float]]:
  """Trains (or resumes) a partition's trainable tree for config.steps steps; see `_fit` for
  the arguments. The run holds `workdir`'s lock (runs.locked) throughout.

  Returns (the trained trainable tree, the last logged metrics as floats).
  """
  runs.require_local_workdir(workdir)  # Also callers' check, before their setup's work.
  with contextlib.ExitStack() as stack:
    # On a pod the workdir is shared and one host writes files: the primary holds the lock.
    if distributed.is_primary():
      stack.enter_context(runs.locked(workdir))
    terminated = stack.enter_context(_sigterm_flag())
    return _fit(config, pathlib.Path(workdir), *args, terminated=terminated, **kwargs)


def _fit(config: TrainConfig, workdir: pathlib.Path, model_config: ModelConfig, part: Partition,
         trainable, frozen, batches, *, manifest: Manifest, terminated: list,
         eval_domains: Sequence[str] = (), label: str = "train") -> tuple[Any, dict[str, float]]:
  """Trains `trainable` on host `batches` (a grain iterator) under `part` with `frozen`;
  writes `manifest` (with the resumed step), checkpoints and metrics to `workdir`, validation
  loss on `eval_domains` at the start, every eval_every steps and at the end. Stops, saved,
  at the first step after `terminated` becomes non-empty."""
  workdir.mkdir(parents=True, exist_ok=True)
  primary = distributed.is_primary()
  mesh = sharding.make_mesh(config.mesh)
  trainable, frozen = precision.apply(config, trainable, frozen)
  tx, schedule = objective.make_optimizer(config, trainable, part.fixed)
  trainable_axes, frozen_axes = part.axes(model_config, trainable)
  trainable = distributed.put(trainable, sharding.tree_shardings(trainable, trainable_axes, mesh))
  if frozen is not None:
    frozen = distributed.put(frozen, sharding.tree_shardings(frozen, frozen_axes, mesh))
  state = jax.jit(lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.int32(0)})(trainable)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = sharding.batch_sharding(mesh)
  dp_key = _dp_key(workdir, config.secrets_dir) if config.dp.enabled else None
  gemm_options = xla_options.for_gemms(model_config.d_model,
                                       config.data.batch_size * config.data.seq_len)
  step_fn = on_mesh(mesh, jax.jit(
      objective.make_train_step(config, model_config, part, tx, schedule, dp_key),
      in_shardings=(state_shardings, None, batch_sharding),
      out_shardings=(state_shardings, None), donate_argnums=0, compiler_options=gemm_options))
  # Expert runs log the new expert's routing diagnostics (routing_diagnostics.py) with every
  # evaluation; its router row's change is measured from the row it started from.
  diagnose = part.name == "expert"
  initial_row = _host_value(trainable["router"]) if diagnose else None
  eval_fn = on_mesh(mesh, jax.jit(
      objective.make_eval_step(model_config, part,
                               model_config.num_experts - 1 if diagnose else None),
      out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
      compiler_options=gemm_options))
  evaluate = lambda params: evaluate_domains(
      config.data, eval_fn, params, frozen, eval_domains, config.eval_batches, batch_sharding,
      _host_value(params["router"]) - initial_row if diagnose else None)

  manager = runs.checkpoint_manager(workdir, keep=config.keep_checkpoints,
                                    async_save=config.async_checkpoint)
  start, restored, data_state = train_state.restore_latest(manager, workdir, state)
  if start:
    state = restored
    data_lib.iterator_state_from_json(batches, data_state)
    print(f"resumed from step {start} in {workdir}", flush=True)
  if primary:
    runs.write_manifest(workdir, manifest.replace(step=start))

  metrics_out = runs.Metrics(workdir)
  last: dict[str, Any] = {}
  if start == 0:
    last = evaluate(state["params"])
    metrics_out.write(0, last)
  bar = tqdm.tqdm(total=config.steps, initial=start, disable=not config.progress,
                  desc=label, unit="step", file=sys.stdout)
  tokens_since, time_since = 0.0, time.perf_counter()
  profile, tracing = config.profile_range, False
  try:
    for step in range(start + 1, config.steps + 1):
      if profile and step == max(profile[0], start + 1) and step <= profile[1]:
        jax.profiler.start_trace(str(workdir / runs.PROFILE))
        tracing = True
      host_batch = next(batches)
      # Counted on the host, no sync (scaled by the host count: hosts see similar counts).
      tokens_since += float(np.sum(host_batch["loss_mask"])) * jax.process_count()
      state, metrics = step_fn(state, frozen, distributed.global_batch(host_batch, batch_sharding))
      # One transfer per step: the NaN guard needs the loss and gradient norm.
      loss, grad_norm = map(float, jax.device_get((metrics["loss"], metrics["grad_norm"])))
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise _non_finite(f"loss ({loss}) or gradient norm", step, manager, workdir)
      if tracing and step == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        tracing = False
        print(f"profile of steps {config.profile_steps} in {workdir / runs.PROFILE} (open with "
              "TensorBoard's profile plugin or XProf)", flush=True)
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.3f}")
      if step % config.log_every == 0 or step == config.steps:
        elapsed = time.perf_counter() - time_since
        last = {k: np.asarray(v) for k, v in metrics.items()}
        last["tokens_per_sec"] = tokens_since / max(elapsed, 1e-9)
        tokens_since, time_since = 0.0, time.perf_counter()
        if step % config.eval_every == 0 or step == config.steps:
          last.update(evaluate(state["params"]))
        metrics_out.write(step, last)
      stop = _sigterm_seen(terminated)
      if step % config.checkpoint_every == 0 or step == config.steps or stop:
        # A finite gradient can still overflow the parameters: never save those.
        if not bool(_all_finite(state["params"])):
          raise _non_finite("parameters (after a finite loss and gradient)", step, manager,
                            workdir)
        # Each host reads its own documents, so each has its own iterator position.
        train_state.save(manager, step, state,
                        distributed.gather_strings(data_lib.iterator_state_to_json(batches)))
      if stop and step < config.steps:
        print(f"SIGTERM: saved step {step} in {workdir}; rerun the command to resume", flush=True)
        raise Preempted(step)
  finally:
    if tracing:  # The run stopped inside the profiled steps.
      jax.profiler.stop_trace()
    bar.close()
    manager.wait_until_finished()
    manager.close()
    metrics_out.close()
  return state["params"], {k: float(np.mean(v)) for k, v in last.items()}
