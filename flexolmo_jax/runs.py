"""Training-run directories: their layout, the files in them, and loading their parameters.

A run directory (`--workdir`) holds
  manifest.json           kind, model config, provenance, last saved step (manifest.py)
  public_router.npy       expert runs: the public router row r_pub [L, D] it trained against
  checkpoints/<step>/     Orbax items: params, opt_state, data_iter, meta (train_state.py)
  damaged_checkpoints/    steps that failed verification on resume, moved aside
  metrics.jsonl, tb/      logged metrics (JSON lines, TensorBoard events)
  profile/                jax.profiler traces of config.profile_steps (TensorBoard / XProf)
  run.lock                held (flock) by the process training in it, whose pid it names
A DP run's secret noise key lives outside it, in the run's secrets directory (secrets_dir:
WORKDIR.secrets beside it by default, mode 0700), so nothing that reads run directories (merge,
convert, evaluate) can read or copy it.
An expert run's `params` item holds ONLY its expert subtree (experts.py), so it is restorable on
its own and small; merging takes r_pub from public_router.npy, checked against the manifest's
public_router_fingerprint. Orbax writes each step into a temporary directory and renames it when
complete, so a half-written step is never listed.

Runs and artifacts are read from local or remote (`gs://`) paths (paths.py); a run directory is
written only locally (`require_local_workdir`): its lock, appended metrics and owner-only DP key
need a local file system.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import pathlib
import secrets as secrets_lib
import shutil
import socket
import time
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from flexolmo_jax import atomic, checkpoint, distributed, paths
from flexolmo_jax import manifest as manifest_lib
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import init_params
from flexolmo_jax.train_config import EXECUTION_FIELDS, RESUME_MAY_CHANGE

MANIFEST = manifest_lib.FILE
write_manifest = manifest_lib.write  # The run's manifest.json (manifest.py), written atomically.
CHECKPOINTS = "checkpoints"
PUBLIC_ROUTER = "public_router.npy"
METRICS = "metrics.jsonl"
NOISE_KEY_FILE = "dp_noise_key.npy"
LOCK = "run.lock"
PROFILE = "profile"


def write_public_router(workdir: str | os.PathLike, row_LxD) -> None:
  """Stores the public router row an expert run trains against, atomically (temp file + rename)."""
  path = pathlib.Path(workdir) / PUBLIC_ROUTER
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic.replacing(path, "wb") as f:
    np.save(f, np.asarray(row_LxD, np.float32))


def load_public_router(workdir: str | os.PathLike, manifest: dict) -> np.ndarray:
  """The public router row [L, D] of an expert run, checked against its manifest's fingerprint."""
  path = paths.path(workdir) / PUBLIC_ROUTER
  if not path.exists():
    raise FileNotFoundError(f"expert run {workdir} has no {PUBLIC_ROUTER} (trained before it was "
                            "stored?); retrain the expert or restore the file")
  with path.open("rb") as f:
    row = np.load(f)
  found = checkpoint.fingerprint({"r": row})
  if found != manifest.get("public_router_fingerprint"):
    raise ValueError(f"{path}: fingerprint {found} does not match the manifest's "
                     f"public_router_fingerprint {manifest.get('public_router_fingerprint')}")
  return row


def require_local_workdir(workdir: str | os.PathLike) -> None:
  """Refuses a remote training workdir before a run does any work."""
  paths.require_local(workdir, "--workdir", "a run directory holds an flock lock, an appended "
                      "metrics.jsonl, TensorBoard events and an owner-only DP key file, which "
                      "need a local file system")


def checkpoint_manager(workdir, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=True)
  return ocp.CheckpointManager(paths.absolute(workdir) / CHECKPOINTS, options=options)


def is_run_dir(path: str | os.PathLike) -> bool:
  return (paths.path(path) / CHECKPOINTS).is_dir()


def load_params(path: str | os.PathLike) -> tuple[ModelConfig, dict, dict]:
  """(config, params, manifest) of a run directory (latest complete step) or a params artifact
  (written by flexolmo_jax.convert or flexolmo_jax.merge), local or remote (`gs://`). Arrays come
  back on the host."""
  path = paths.path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"no model at {path}: train one (python -m flexolmo_jax.train --config=configs/public.py "
        f"--workdir={path}) or convert a Hugging Face checkpoint (python -m flexolmo_jax.convert "
        f"--from_hf=DIR --out={path})")
  if not is_run_dir(path):
    return checkpoint.load_params_artifact(path)
  manifest = checkpoint.read_manifest(path)
  manager = ocp.CheckpointManager(paths.absolute(path) / CHECKPOINTS)
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
  path = paths.path(path)
  manager = ocp.CheckpointManager(paths.absolute(path) / CHECKPOINTS,
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
  abstract = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
  want = {k: tuple(v.shape) for k, v in checkpoint.flatten(abstract).items()}
  got = {k: tuple(v.shape) for k, v in checkpoint.flatten(params).items()}
  for key in sorted(set(want) | set(got)):
    if want.get(key) != got.get(key):
      raise ValueError(f"{where}: parameter {key} has shape {got.get(key)} but its config "
                       f"expects {want.get(key)}; {hint}")


def check_resumable(workdir: str | os.PathLike, manifest: manifest_lib.Manifest | dict) -> None:
  """Refuses to resume a workdir that belongs to a different run."""
  if not (paths.path(workdir) / MANIFEST).exists():
    return
  old, manifest = manifest_lib.read(workdir), manifest_lib.of(manifest)
  for key in ("kind", "name", "config", "public_fingerprint", "init_fingerprint"):
    before, now = getattr(old, key), getattr(manifest, key)
    if key == "config":  # How the model executes may change between sessions; what it is may not.
      before, now = _architecture(before), _architecture(now)
    if before != now:
      raise ValueError(f"{workdir} holds another run ({key} differs: {before!r} vs {now!r}); "
                       "use a new --workdir")
  changed = _changed_settings(old, manifest)
  if changed:
    raise ValueError(f"{workdir} was started with other settings: " + "; ".join(
        f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) + ". A resumed run may change "
        f"only {', '.join(RESUME_MAY_CHANGE)}; restore the others or use a new --workdir")


def _changed_settings(old: manifest_lib.Manifest, new: manifest_lib.Manifest) -> dict:
  """dotted key -> (before, now) of the training settings and data that differ. Keys only one
  side has (a setting added since the run started) are not compared."""
  flat = lambda m: {k.replace("/", "."): v for k, v in checkpoint.flatten(json.loads(json.dumps(
      {"data_manifest_hash": m.data_manifest_hash, **(m.train_config or {})}))).items()
                    if v is not None}
  before, now = flat(old), flat(new)
  may_change = lambda key: any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)
  return {k: (before[k], now[k]) for k in sorted(set(before) & set(now))
          if before[k] != now[k] and not may_change(k)}


def _architecture(config_dict):
  if config_dict is None:
    return None
  full = ModelConfig.from_dict(config_dict).to_dict()  # Fields added since the run started get defaults.
  return {k: v for k, v in full.items() if k not in EXECUTION_FIELDS}


@contextlib.contextmanager
def locked(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds `workdir`'s lock for the block; a second run on it is refused, naming the holder.

  The lock is an flock, which the OS drops when its holder dies, so the lock file a killed run
  leaves behind is taken over by the next run, never mistaken for a live one.
  """
  path = pathlib.Path(workdir) / LOCK
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a+", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      raise ValueError(f"{workdir} is in use by another run ({f.read().strip() or 'unknown'}); "
                       "wait for it to end or stop it, or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    yield  # Closing the file releases the lock.


class Metrics:
  """TensorBoard event files plus a metrics.jsonl that tests and scripts can read; written by
  the primary host only (every host computes the same global metrics)."""

  def __init__(self, workdir: str | os.PathLike):
    self._enabled = distributed.is_primary()
    if not self._enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))
    self._jsonl = open(pathlib.Path(workdir) / METRICS, "a", encoding="utf-8")

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self._enabled:
      return
    flat = {}
    for k, v in values.items():
      v = np.asarray(v)
      if v.ndim == 0:
        flat[k] = float(v)
      else:
        flat.update({f"{k}/{i}": float(x) for i, x in enumerate(v.ravel())})
    for k, v in flat.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": step, **flat}) + "\n")
    self._jsonl.flush()

  def close(self):
    if self._enabled:
      self._tb.close()
      self._jsonl.close()


def secrets_dir(workdir: str | os.PathLike, configured: str = "") -> pathlib.Path:
  """The run's secrets directory: `configured` (config.secrets_dir), or WORKDIR.secrets beside
  the run directory. Refused inside the run directory, which merge and convert read."""
  run = pathlib.Path(workdir).absolute()
  path = pathlib.Path(configured).absolute() if configured else run.with_name(run.name + ".secrets")
  if path == run or run in path.parents:
    raise ValueError(f"config.secrets_dir={configured} lies inside the run directory {workdir}, "
                     "which merge and convert read; choose a directory outside it")
  return path


def dp_noise_key(workdir: str | os.PathLike, secrets: str | os.PathLike) -> jax.Array:
  """The run's secret DP noise key, from `secrets`/dp_noise_key.npy, created from the OS's
  randomness when the run starts.

  Noise drawn from a known seed could be subtracted again, so the key is neither the config's
  seed nor in the manifest; it lives in a file only the owner can read, and a resumed run reuses it
  (so resuming stays exact): a run with checkpoints but no key is refused rather than continued
  with other noise. A key an earlier version left in the run directory is moved out of it.
  """
  secrets, workdir = pathlib.Path(secrets), pathlib.Path(workdir)
  secrets.mkdir(mode=0o700, parents=True, exist_ok=True)
  path, legacy = secrets / NOISE_KEY_FILE, workdir / NOISE_KEY_FILE
  if legacy.exists() and not path.exists():
    shutil.move(legacy, path)
  if not path.exists():
    steps = workdir / CHECKPOINTS
    if steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir()):
      raise ValueError(f"{workdir} holds checkpoints of a DP run but {path} is missing; restore "
                       "the key there (or set config.secrets_dir to where it is), or use a new "
                       "--workdir")
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
      np.save(f, np.frombuffer(secrets_lib.token_bytes(8), np.uint32))
    os.replace(tmp, path)
  return jax.random.wrap_key_data(np.load(path), impl="threefry2x32")
