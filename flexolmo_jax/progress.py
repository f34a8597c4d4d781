"""Progress bars for the long commands: tqdm on stderr with a count, a rate and an ETA.

On a terminal the bar redraws in place. Written to a log file or a pipe (a TPU VM's nohup log,
CI), carriage-return redraws would pile up into one unreadable line, so each update becomes its own
line and updates come at most every LOG_INTERVAL seconds. A bar appears only once its work has
taken DELAY seconds, so quick steps (merging two tiny experts) add no lines to a log.
`--verbosity=-2` (errors only) or quieter turns the bars off, like every other message below that
level.
"""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

import tqdm
from absl import logging

T = TypeVar("T")

LOG_INTERVAL = 10.0  # seconds between progress lines when stderr is not a terminal
DELAY = 2.0  # seconds before a bar first shows


class _Lines:
  """A stderr stand-in for tqdm that turns every redraw into one whole line."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> None:
    text = text.replace("\r", "").strip()
    if text:
      self._stream.write(text + "\n")

  def flush(self) -> None:
    self._stream.flush()


def enabled() -> bool:
  """Whether bars are shown: absl's verbosity is WARNING (the commands' default) or louder."""
  return logging.get_verbosity() >= logging.WARNING


def bar(iterable: Iterable[T] | None = None, *, desc: str, total: float | None = None,
        unit: str = "it", unit_scale: bool = False, leave: bool = True) -> "tqdm.tqdm[T]":
  """A tqdm bar on stderr (see the module docstring); use it as tqdm: iterate or .update(n)."""
  stream = sys.stderr
  terminal = hasattr(stream, "isatty") and stream.isatty()
  return tqdm.tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, leave=leave,
                   file=stream if terminal else _Lines(stream),
                   mininterval=0.1 if terminal else LOG_INTERVAL,
                   delay=DELAY, dynamic_ncols=terminal, disable=not enabled())
