"""A tamper-evident audit log: one JSON line per event, numbered and hash-chained.

Each line carries "seq" (1, 2, ...) and "prev", the SHA-256 of the previous line's bytes (64
zeros before the first line), so an edited, inserted, dropped or reordered line breaks the chain
at that point; `verify` (`python -m flexolmo_jax.serve verify-audit FILE`) finds the first break.
The chain shows edits by anyone who cannot rewrite every later line; copy the last line's hash
elsewhere now and then to pin it against someone who can.

Lines are written with one os.write each on an O_APPEND descriptor (no torn lines) and fsynced
before the writer goes on. The file is created with mode 0600. `reopen()` (the server calls it on
SIGHUP, at the next write) opens the path again after a log rotation; the chain continues across
files, so the first line of a rotated file carries the last hash of the one before.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any, Sequence

GENESIS = "0" * 64


def line_hash(line: bytes) -> str:
  """The hash the next line carries as "prev": of the line's bytes without its newline."""
  return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _last_line(fd: int) -> bytes | None:
  size = os.fstat(fd).st_size
  if not size:
    return None
  block = min(size, 1 << 16)
  tail = os.pread(fd, block, size - block)
  lines = tail.rstrip(b"\n").split(b"\n")
  if len(lines) < 2 and block < size:
    raise ValueError("audit log: last line longer than 64 KiB; start a new log file")
  return lines[-1]


class AuditLog:
  """Appends hash-chained JSON lines; thread-safe; durable (fsynced) before `write` returns."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self.lock = threading.Lock()
    self.reopen_requested = False
    self.seq, self.prev = 0, GENESIS
    self.fd = self._open()
    last = _last_line(self.fd)
    if last is not None:  # Continue the chain of an existing log.
      try:
        self.seq, self.prev = int(json.loads(last)["seq"]), line_hash(last)
      except (ValueError, KeyError, TypeError):
        raise ValueError(f"audit log {self.path}: its last line is not a chained audit line; "
                         f"check it with verify-audit or start a new file") from None

  def _open(self) -> int:
    fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)  # Also when the file existed with a wider mode.
    return fd

  def write(self, records: Sequence[dict[str, Any]]) -> None:
    """Numbers, chains and appends each record (one write() each), then fsyncs once."""
    with self.lock:
      if self.reopen_requested:
        self.reopen_requested = False
        os.close(self.fd)
        self.fd = self._open()
      for record in records:
        self.seq += 1
        line = json.dumps({**record, "seq": self.seq, "prev": self.prev},
                          sort_keys=True).encode("utf-8")
        written = os.write(self.fd, line + b"\n")
        if written != len(line) + 1:
          raise OSError(f"audit log: short write ({written} of {len(line) + 1} bytes)")
        self.prev = line_hash(line)
      os.fsync(self.fd)

  def request_reopen(self) -> None:
    """Reopen the path at the next write (safe to call from a signal handler)."""
    self.reopen_requested = True

  def close(self) -> None:
    with self.lock:
      os.close(self.fd)


def verify(path: str | os.PathLike) -> tuple[int, str | None]:
  """(lines checked, None) if the chain holds, else (number of the first broken line, why).

  A file whose first line has seq 1 must start at the genesis hash; a rotated file (first seq
  above 1) is checked from its first line on."""
  prev, seq = None, None
  n = 0
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      if not raw.endswith(b"\n"):
        return n, "the line is incomplete (no newline)"
      try:
        record = json.loads(raw)
        got_seq, got_prev = record["seq"], record["prev"]
      except (ValueError, KeyError, TypeError):
        return n, "not a chained audit line (JSON with seq and prev)"
      if prev is None:
        if got_seq == 1 and got_prev != GENESIS:
          return n, "the first line (seq 1) does not start at the genesis hash"
      elif got_seq != seq + 1:
        return n, f"seq {got_seq} follows seq {seq}: a line is missing or out of order"
      elif got_prev != prev:
        return n - 1, "its hash does not match the next line's prev: the line was changed"
      prev, seq = line_hash(raw), got_seq
  return n, None
