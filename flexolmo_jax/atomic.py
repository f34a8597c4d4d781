"""Writing a results file so that a reader finds the old content or the new, never a part of it:
the content goes to a temporary file beside it, which replaces the file only once complete."""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import IO, Iterator


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: str = "w", **open_args) -> Iterator[IO]:
  """Opens a temporary file beside `path`; when the block ends without an exception, the file,
  flushed to disk, replaces `path` (os.replace); otherwise it is removed and `path` is untouched."""
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
