"""A training run's checkpoints: {params, opt_state} with every host's data-iterator position,
checksummed when saved and verified when restored.

Resuming takes the newest step that restores and matches its checksums; a newer step that does
not (a disk error, a half-copied directory) is moved to `damaged_checkpoints/` with a warning and
the previous complete step is used, so the run continues exactly from there.
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from flexolmo_jax import distributed

DAMAGED = "damaged_checkpoints"


@jax.jit
def checksums(tree):
  """Per leaf, the position-weighted sum of its bits in wrapping uint32 arithmetic: exact under
  any sharding or reduction order, and changed by any altered, lost or swapped value."""
  def one(x):
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()
    return jnp.sum(bits * jnp.arange(1, bits.size + 1, dtype=jnp.uint32), dtype=jnp.uint32)
  return [one(x) for x in jax.tree.leaves(tree)]


def _sums(state) -> list[int]:
  return [int(c) for c in jax.device_get(checksums(
      {"params": state["params"], "opt_state": state["opt_state"]}))]


def save(manager: ocp.CheckpointManager, step: int, state, data_iter_states: list[str]) -> None:
  """Checkpoints a training state {params, opt_state, step} with its checksums and every host's
  data-iterator position (JSON items are written by the primary alone, so it saves every host's)."""
  data_iter = {"state": data_iter_states[0],
               **({"per_host": data_iter_states} if len(data_iter_states) > 1 else {})}
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state["params"]),
      opt_state=ocp.args.StandardSave(state["opt_state"]),
      meta=ocp.args.JsonSave({"step": step, "checksums": _sums(state)}),
      data_iter=ocp.args.JsonSave(data_iter)))


def _restore(manager, step: int, state_template):
  """(state, saved data_iter) of `step`; raises if it does not restore or match its checksums."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract["params"]),
      opt_state=ocp.args.StandardRestore(abstract["opt_state"]),
      meta=ocp.args.JsonRestore(), data_iter=ocp.args.JsonRestore()))
  state = {"params": restored["params"], "opt_state": restored["opt_state"],
           "step": jnp.int32(step)}
  want = restored["meta"].get("checksums")  # Absent in checkpoints saved before checksums.
  if want is not None and _sums(state) != want:
    raise ValueError("its tensors do not match the checksums saved with them")
  return state, restored["data_iter"]


def restore_latest(manager: ocp.CheckpointManager, workdir: str | os.PathLike, state_template):
  """(step, state, this host's data-iterator JSON) of the newest verified checkpoint; (0, None,
  None) when there is none. Damaged newer steps are moved aside with a warning."""
  damaged = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, saved = _restore(manager, step, state_template)
    except Exception as err:  # pylint: disable=broad-except  (whatever a damaged step raises)
      logging.warning("checkpoint step %d in %s cannot be used (%s); falling back to the "
                      "previous complete step", step, workdir, str(err).splitlines()[0])
      damaged.append(step)
      continue
    _move_aside(manager, workdir, damaged)
    return step, state, _host_position(saved, step)
  if damaged:
    raise ValueError(f"no checkpoint in {workdir} can be restored (steps {damaged}); see the "
                     "warnings above, or move checkpoints/ aside to start over")
  return 0, None, None


def _move_aside(manager, workdir, steps) -> None:
  """Moves damaged steps out of checkpoints/ (kept for inspection) so the run saves them anew."""
  if not steps:
    return
  if distributed.is_primary():
    aside = pathlib.Path(workdir) / DAMAGED
    aside.mkdir(exist_ok=True)
    for step in steps:
      os.replace(pathlib.Path(manager.directory) / str(step), aside / str(step))
  manager.reload()


def _host_position(saved, step: int) -> str:
  hosts = len(saved.get("per_host", [None]))
  if hosts != jax.process_count():
    raise ValueError(f"step {step} was saved by {hosts} host(s) and this run has "
                     f"{jax.process_count()}; each host's data position cannot be carried over: "
                     "resume with the same number of hosts")
  return saved["per_host"][jax.process_index()] if hosts > 1 else saved["state"]
