"""The resume tests' interruptions: a child process sent SIGKILL (no cleanup, no `finally`, as
on a machine that dies) or SIGTERM (a preemption notice) right after it logs a given step; and
the losses a run logged."""

import json
import os
import pathlib
import signal
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
_SIGNAL_AFTER = """
import os
from flexolmo_jax import runs
_write = runs.Metrics.write
def _write_then_signal(self, step, values):
  _write(self, step, values)
  if step == {step}:
    os.kill(os.getpid(), {signal})
runs.Metrics.write = _write_then_signal
"""


def run_signalled_after(step: int, sig: signal.Signals, code: str, *args: str) -> int:
  """Runs `code` (with `args` in sys.argv[1:]) in a child process sent `sig` right after it
  logs `step`; returns its exit status."""
  prelude = _SIGNAL_AFTER.format(step=step, signal=int(sig))
  proc = subprocess.run([sys.executable, "-c", prelude + code, *args], cwd=REPO, env=os.environ,
                        capture_output=True, text=True, check=False)
  assert proc.returncode in (0, -sig), f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
  return proc.returncode


def run_killed_after(step: int, code: str, *args: str) -> None:
  """Runs `code` in a child process SIGKILLed right after it logs `step`."""
  assert run_signalled_after(step, signal.SIGKILL, code, *args) == -signal.SIGKILL


def _rows(workdir) -> list[dict]:
  return [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]


def losses(workdir) -> dict[int, float]:
  """step -> logged loss, the last record of each step winning (a resumed run re-logs steps)."""
  return {row["step"]: row["loss"] for row in _rows(workdir) if "loss" in row}


def logged_steps(workdir) -> list[int]:
  """Every step record in order: a run resumed from step s logs the steps after s again."""
  return [row["step"] for row in _rows(workdir)]
