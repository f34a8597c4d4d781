"""Multi-process (multi-host) JAX: when to call jax.distributed.initialize, and the few
helpers training needs to run the same program on every host.

jax.distributed.initialize() is called when the command asks for it (train.py --distributed,
which launch/tpu.py and launch/gpu.py pass) or when the environment shows a multi-process
launch:
  JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID)   any cluster, set by hand or by
                                                                  launch/gpu.py for multi-node
  SLURM_NTASKS > 1 (srun)                                         SLURM, detected by JAX itself
  OMPI_COMM_WORLD_SIZE > 1 (mpirun)                               Open MPI, detected by JAX itself
On a Cloud TPU pod slice JAX finds the coordinator and process ids from the TPU metadata, so
`--distributed` alone is enough. JAX_LOCAL_DEVICE_IDS (read by JAX) pins a process to some GPUs.
A single process never initializes: everything below then reduces to the one-host behaviour.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

# Variables whose presence (with more than one process) means a multi-process launch.
ENV_TRIGGERS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def initialize_kwargs(requested: bool, environ: Mapping[str, str] | None = None) -> dict | None:
  """The arguments for jax.distributed.initialize, or None when this is a one-process run."""
  env = os.environ if environ is None else environ
  if "JAX_COORDINATOR_ADDRESS" in env:
    kwargs = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
    for key, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
      if key in env:
        kwargs[name] = int(env[key])
    return kwargs
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if int(env.get(key, "1")) > 1:
      return {}  # JAX's own cluster detection reads the rest.
  return {} if requested else None


def initialize(requested: bool = False) -> bool:
  """Calls jax.distributed.initialize when asked or launched multi-process; True if it did.

  Must run before anything touches a JAX backend.
  """
  kwargs = initialize_kwargs(requested)
  if kwargs is None or jax.distributed.is_initialized():
    return False
  jax.distributed.initialize(**kwargs)
  return True


def is_primary() -> bool:
  """Whether this process writes the run's own files (manifests, metrics, secrets)."""
  return jax.process_index() == 0


def host_batch_size(global_batch: int) -> int:
  """Rows each host's pipeline yields so that all hosts together make `global_batch`."""
  hosts = jax.process_count()
  if global_batch % hosts:
    raise ValueError(f"data.batch_size ({global_batch}) must be a multiple of the number of "
                     f"hosts ({hosts}): it is the global batch, split evenly over hosts")
  return global_batch // hosts


def global_batch(host_batch, batch_sharding: jax.sharding.NamedSharding):
  """One global array per field from each host's rows (hosts hold consecutive row blocks)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x),
                      host_batch)


def put(tree, shardings):
  """Host (or one-device) arrays onto shardings that may span hosts; every host must pass the
  same values, and each builds only its own shards."""
  if jax.process_count() == 1:
    return jax.tree.map(jax.device_put, tree, shardings)
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(
      np.shape(x), s, lambda index, x=x: np.asarray(x[index])), tree, shardings)


def gather_strings(text: str) -> list[str]:
  """Every host's `text`, in process order, on every host (e.g. each host's data-iterator
  state, which the primary saves in the checkpoint)."""
  if jax.process_count() == 1:
    return [text]
  data = np.frombuffer(text.encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size]))).ravel()
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [bytes(row[:n]).decode() for row, n in zip(rows, lengths)]


def from_primary(x: np.ndarray) -> np.ndarray:
  """`x` as the primary host has it, on every host (e.g. a secret created by the primary)."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.broadcast_one_to_all(x))
