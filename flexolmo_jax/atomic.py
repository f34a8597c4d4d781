"""Writing a results file so that a reader finds the old content or the new, never a part of it:
the content goes to a temporary file beside it, which replaces the file only once complete."""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import IO, Iterator

from flexolmo_jax import paths


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: str = "w", **open_args) -> Iterator[IO]:
  """Opens a temporary file beside `path`; when the block ends without an exception, the file,
  flushed to disk, replaces `path` (os.replace); otherwise it is removed and `path` is untouched.
  A remote `path` (gs://) is written directly: an object store publishes an object only once its
  upload completes, which is already all or nothing."""
  if paths.is_remote(path):
    with paths.path(path).open(mode, **open_args) as f:
      yield f
    return
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    with open(tmp, mode, **open_args) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  with replacing(path, "w", encoding="utf-8") as f:
    f.write(text)
