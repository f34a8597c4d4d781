"""Training-run directories: a manifest plus Orbax checkpoints, and loading their parameters.

A run directory (`--workdir`) holds
  manifest.json           kind (public / expert), model config, provenance, last saved step
  checkpoints/<step>/     Orbax items: params, opt_state, data_iter, meta
An expert run's `params` item holds ONLY its expert subtree (experts.py) plus the public router
row it trained with, so it is restorable on its own and small. Orbax writes each step into a
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


def write_manifest(workdir: str | os.PathLike, manifest: dict) -> None:
  """Writes the run manifest atomically (temp file + rename)."""
  path = pathlib.Path(workdir) / MANIFEST
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


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
  return ModelConfig.from_dict(manifest["config"]), params, {**manifest, "step": step}
