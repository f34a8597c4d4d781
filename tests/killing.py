"""The resume tests' interruption: a child process SIGKILLed right after it logs a given step
(no cleanup, no `finally`, as on a pre-empted machine), and the losses a run logged."""

import json
import os
import pathlib
import signal
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
_KILL_AFTER = """
import os, signal
from flexolmo_jax import runs
_write = runs.Metrics.write
def _write_then_die(self, step, values):
  _write(self, step, values)
  if step == {step}:
    os.kill(os.getpid(), signal.SIGKILL)
runs.Metrics.write = _write_then_die
"""


def run_killed_after(step: int, code: str, *args: str) -> None:
  """Runs `code` (with `args` in sys.argv[1:]) in a child process killed after logging `step`."""
  proc = subprocess.run([sys.executable, "-c", _KILL_AFTER.format(step=step) + code, *args],
                        cwd=REPO, env=os.environ, capture_output=True, text=True, check=False)
  assert proc.returncode == -signal.SIGKILL, f"not killed at step {step}:\n{proc.stderr[-3000:]}"


def _rows(workdir) -> list[dict]:
  return [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]


def losses(workdir) -> dict[int, float]:
  """step -> logged loss, the last record of each step winning (a resumed run re-logs steps)."""
  return {row["step"]: row["loss"] for row in _rows(workdir) if "loss" in row}


def logged_steps(workdir) -> list[int]:
  """Every step record in order: a run resumed from step s logs the steps after s again."""
  return [row["step"] for row in _rows(workdir)]
