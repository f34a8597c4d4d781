"""Training-run directories: a manifest plus Orbax checkpoints, and loading their parameters.

A run directory (`--workdir`) holds
  manifest.json           kind (public / expert), model config, provenance, last saved step
  public_router.npy       expert runs: the public router row r_pub [L, D] it trained against
  checkpoints/<step>/     Orbax items: params, opt_state, data_iter, meta
An expert run's `params` item holds ONLY its expert subtree (experts.py), so it is restorable on
its own and small; merging takes r_pub from public_router.npy, checked against the manifest's
public_router_fingerprint. Orbax writes each step into a
temporary directory and renames it when complete, so a half-written step is never listed.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from flexolmo_jax import checkpoint
from flexolmo_jax.config import ModelConfig

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
PUBLIC_ROUTER = "public_router.npy"


def write_manifest(workdir: str | os.PathLike, manifest: dict) -> None:
  """Writes the run manifest atomically (temp file + rename)."""
  path = pathlib.Path(workdir) / MANIFEST
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def write_public_router(workdir: str | os.PathLike, row_LxD) -> None:
  """Stores the public router row an expert run trains against, atomically (temp file + rename)."""
  path = pathlib.Path(workdir) / PUBLIC_ROUTER
  tmp = path.with_suffix(".npy.tmp")
  with open(tmp, "wb") as f:
    np.save(f, np.asarray(row_LxD, np.float32))
  os.replace(tmp, path)


def load_public_router(workdir: str | os.PathLike, manifest: dict) -> np.ndarray:
  """The public router row [L, D] of an expert run, checked against its manifest's fingerprint."""
  path = pathlib.Path(workdir) / PUBLIC_ROUTER
  if not path.exists():
    raise FileNotFoundError(f"expert run {workdir} has no {PUBLIC_ROUTER} (trained before it was "
                            "stored?); retrain the expert or restore the file")
  row = np.load(path)
  found = checkpoint.fingerprint({"r": row})
  if found != manifest.get("public_router_fingerprint"):
    raise ValueError(f"{path}: fingerprint {found} does not match the manifest's "
                     f"public_router_fingerprint {manifest.get('public_router_fingerprint')}")
  return row


def checkpoint_manager(workdir, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=True)
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / CHECKPOINTS, options=options)


def is_run_dir(path: str | os.PathLike) -> bool:
  return (pathlib.Path(path) / CHECKPOINTS).is_dir()


def load_params(path: str | os.PathLike) -> tuple[ModelConfig, dict, dict]:
  """(config, params, manifest) of a run directory (latest complete step) or a params artifact
  (written by flexolmo_jax.convert or flexolmo_jax.merge). Arrays come back on the host."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"no model at {path}: train one (python -m flexolmo_jax.train --config=configs/public.py "
        f"--workdir={path}) or convert a Hugging Face checkpoint (python -m flexolmo_jax.convert "
        f"--from_hf=DIR --out={path})")
  if not is_run_dir(path):
    return checkpoint.load_params_artifact(path)
  manifest = checkpoint.read_manifest(path)
  manager = ocp.CheckpointManager(path.absolute() / CHECKPOINTS)
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"run {path} has no complete checkpoint yet; let it train past its first "
                     "checkpoint (checkpoint_every) or point at another model")
  restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  manager.close()
  params = jax.tree.map(np.asarray, restored["params"])
  config = ModelConfig.from_dict(manifest["config"])
  if manifest.get("kind") != "expert":  # An expert run stores only its expert subtree.
    check_shapes(config, params, path)
  return config, params, {**manifest, "step": step}


def restore_params_sharded(path: str | os.PathLike, abstract_tree) -> tuple[dict, int]:
  """(params, step) of a run directory's latest checkpoint, restored by Orbax straight onto the
  devices that `abstract_tree`'s ShapeDtypeStructs name in their `sharding` (each host reads
  only its own shards; nothing passes through one host's memory).

  Every tensor of `abstract_tree` must be stored with its shape and dtype. Stored tensors it
  does not name (an expert bias the merge drops) are read replicated and discarded, since the
  restore reads the whole stored tree.
  """
  path = pathlib.Path(path)
  manager = ocp.CheckpointManager(path.absolute() / CHECKPOINTS,
                                  item_handlers={"params": ocp.StandardCheckpointHandler()})
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"run {path} has no complete checkpoint yet")
  stored = checkpoint.flatten(dict(manager.item_metadata(step)["params"]))
  want = checkpoint.flatten(abstract_tree)
  describe = lambda x: (tuple(x.shape), np.dtype(x.dtype)) if x is not None else None
  bad = sorted(k for k in want if describe(want[k]) != describe(stored.get(k)))
  if bad:
    raise ValueError(f"{path}: stored parameters do not match at {bad}: " + "; ".join(
        f"{k} stored {describe(stored.get(k))}, expected {describe(want[k])}" for k in bad))
  some = next(iter(want.values())).sharding
  replicated = jax.sharding.NamedSharding(some.mesh, jax.sharding.PartitionSpec())
  target = {**{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
               for k, v in stored.items()}, **want}
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(checkpoint.unflatten(target))))
  manager.close()
  flat = checkpoint.flatten(restored["params"])
  return checkpoint.unflatten({k: flat[k] for k in want}), step


def check_shapes(config: ModelConfig, params, where,
                 hint: str = "the checkpoint does not match its manifest") -> None:
  """Refuses parameters that do not fit `config`, naming the first mismatching tensor."""
  from flexolmo_jax import convert  # pylint: disable=g-import-not-at-top  (avoids a cycle)
  want = convert.param_shapes(config)
  got = {k: tuple(v.shape) for k, v in checkpoint.flatten(params).items()}
  for key in sorted(set(want) | set(got)):
    if want.get(key) != got.get(key):
      raise ValueError(f"{where}: parameter {key} has shape {got.get(key)} but its config "
                       f"expects {want.get(key)}; {hint}")
