"""On-disk parameter artifacts: an Orbax save of the parameter tree plus a JSON manifest.

Layout of an artifact directory:
  params/         Orbax StandardCheckpointer save of the nested parameter dict
  manifest.json   {"version", "kind", "config", "fingerprint", "versions", ...extra} (manifest.py)

The manifest is written last and the whole directory is renamed into place, so a directory
without manifest.json is an interrupted write and is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from flexolmo_jax import manifest as manifest_lib
from flexolmo_jax import paths
from flexolmo_jax.config import ModelConfig

KINDS = ("public", "expert", "merged")
MANIFEST = manifest_lib.FILE
PARAMS = "params"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """The leaves of a nested dict keyed by their '/'-joined paths."""
  flat = {}
  for name, value in params.items():
    path = f"{prefix}{name}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, path + "/"))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The nested dict whose `flatten` is `flat`."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, name = path.split("/")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = value
  return tree


def fingerprint(params: Mapping[str, Any]) -> str:
  """A stable sha256 hex digest over every leaf's path, dtype, shape and bytes (sorted by path).

  Leaves are fetched to host one at a time, so hashing never holds a second copy of the tree.
  """
  digest = hashlib.sha256()
  for path, leaf in sorted(flatten(params).items()):
    array = np.ascontiguousarray(np.asarray(leaf))
    header = f"{path}|{array.dtype.name}|{','.join(map(str, array.shape))}\n"
    digest.update(header.encode())
    # Bytes are hashed little-endian so the digest does not depend on the host.
    digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
  return digest.hexdigest()


def require_local_artifact(path: str | os.PathLike) -> None:
  """Refuses a remote output artifact directory (before a command does any work)."""
  paths.require_local(path, "artifact directory", "an artifact is written into a temporary "
                      "directory that is renamed when complete, and object stores have no rename")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling directory that is renamed to `path` only if the block succeeds.

  `path` may be absent or an empty directory (rename replaces an empty one); anything else is
  refused, so a finished artifact is never overwritten or mixed with another. A remote `path`
  is refused (object stores have no directory rename).
  """
  require_local_artifact(path)
  path = pathlib.Path(path).absolute()
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise FileExistsError(f"{path} exists and is not an empty directory; refusing to overwrite it")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def library_versions() -> dict[str, str]:
  """Versions of the libraries whose numerics or formats an artifact depends on."""
  import flax  # pylint: disable=g-import-not-at-top

  return {"jax": jax.__version__, "flax": flax.__version__, "orbax": ocp.__version__,
          "numpy": np.__version__}


def save_params_artifact(path: str | os.PathLike, config: ModelConfig, params: Mapping[str, Any],
                         kind: str, extra_manifest: Mapping[str, Any] | None = None,
                         files: Mapping[str, str | os.PathLike] | None = None) -> dict:
  """Writes `params` and a manifest to a new directory `path`, atomically; returns the manifest.

  `files` (name in the artifact -> source path) are copied in too: the tokenizer and generation
  settings that travel with a model.
  """
  if kind not in KINDS:
    raise ValueError(f"artifact kind {kind!r} not in {KINDS}")
  manifest = {"kind": kind, "config": config.to_dict(), "fingerprint": fingerprint(params),
              "versions": library_versions()}
  clash = set(manifest) & set(extra_manifest or {})
  if clash:
    raise ValueError(f"extra_manifest may not override {sorted(clash)}")
  manifest = manifest_lib.of({**manifest, **(extra_manifest or {})})
  with atomic_directory(path) as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / PARAMS, dict(params))
    checkpointer.wait_until_finished()
    checkpointer.close()
    for name, source in (files or {}).items():
      paths.path(source).copy(paths.path(tmp) / name)
    manifest_lib.write(tmp, manifest)
  return manifest.to_dict()


def read_manifest(path: str | os.PathLike) -> dict:
  """The manifest of the artifact or run at `path`, as a dict; refuses a directory left by an
  interrupted write, and a manifest version this package does not read."""
  path = paths.path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"no artifact directory at {path}")
  manifest_path = path / MANIFEST
  if not manifest_path.exists():
    raise ValueError(f"{path} has no {MANIFEST}: it is incomplete (an interrupted write?) "
                     "or not a flexolmo_jax artifact")
  return manifest_lib.read(path).to_dict()


def load_params_artifact(path: str | os.PathLike, *, verify: bool = True
                         ) -> tuple[ModelConfig, dict, dict]:
  """Reads an artifact written by `save_params_artifact`: (config, params, manifest).

  Parameters come back as host numpy arrays in their saved dtypes. With `verify`, the
  fingerprint is recomputed and must match the manifest, so a corrupted or edited artifact is
  refused (hashing reads every byte: about a minute for a 7x7B model).
  """
  path = paths.absolute(path)
  manifest = read_manifest(path)
  config = ModelConfig.from_dict(manifest["config"])
  checkpointer = ocp.StandardCheckpointer()
  params = checkpointer.restore(path / PARAMS)
  checkpointer.close()
  params = jax.tree.map(np.asarray, params)
  if not verify:
    return config, params, manifest
  found = fingerprint(params)
  if found != manifest["fingerprint"]:
    raise ValueError(f"{path}: parameter fingerprint {found} does not match the manifest's "
                     f"{manifest['fingerprint']}; the artifact is corrupted or was modified")
  return config, params, manifest
