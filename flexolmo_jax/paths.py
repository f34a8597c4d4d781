"""The one path library: every file the project reads or writes is named by `path(...)`.

`etils.epath` (it comes with Orbax) understands `gs://` and other remote schemes as well as local
paths; a local path behaves exactly like `pathlib.Path`. Where a component needs a local file
system (the workdir's flock, appended metrics, an atomic directory rename), `require_local`
refuses a remote path with a message naming the fix, before any work starts; `pathlib.Path`
would silently turn `gs://bucket/x` into a local directory `gs:/bucket/x`.
"""

from __future__ import annotations

import os

from etils import epath


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as an epath.Path (local or remote)."""
  return epath.Path(p)


def is_remote(p: str | os.PathLike) -> bool:
  """Whether `p` names a remote location (`gs://...`, `s3://...`)."""
  return "://" in str(p)


def require_local(p: str | os.PathLike | None, what: str, why: str) -> None:
  """Raises ValueError if `p` is remote: `what` cannot be there because `why`."""
  if p is not None and is_remote(p):
    raise ValueError(f"{what} {p} is a remote path, which this command cannot use: {why}; "
                     "use a local directory, or the bucket mounted with gcsfuse (launch/tpu.py "
                     "mounts it at /mnt/BUCKET)")


def absolute(p: str | os.PathLike) -> epath.Path:
  """`p` made absolute if local; a remote path as it is (epath's `absolute()` would prefix the
  working directory to `gs://...`)."""
  return path(p) if is_remote(p) else path(os.path.abspath(os.fspath(p)))
