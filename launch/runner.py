"""Runs launcher commands, or with dry_run only prints them (tests check the printed commands).

Every command is a list of arguments (never a shell string), printed as `$ <shlex-joined>` so
that a dry run can be pasted into a terminal as is.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence


class Runner:
  """Executes commands; `dry_run` prints them and answers queries from `dry_answers`: key ->
  the answers to successive queries, the last one repeating (so a dry run walks one path)."""

  def __init__(self, dry_run: bool, *, out=None,
               dry_answers: Mapping[str, Sequence[str]] | None = None,
               sleep: Callable[[float], None] = time.sleep):
    self.dry_run = dry_run
    self.out = out or sys.stdout
    self._answers = {k: list(v) for k, v in (dry_answers or {}).items()}
    self._sleep = sleep

  def _show(self, cmd: Sequence[str], env: Mapping[str, str] | None) -> None:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    print("$ " + (prefix + " " if prefix else "") + shlex.join(cmd), file=self.out, flush=True)

  def run(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
          check: bool = False) -> int:
    """Runs `cmd` (output streams through); returns its exit code."""
    self._show(cmd, env)
    if self.dry_run:
      return 0
    rc = subprocess.run(list(cmd), env={**os.environ, **(env or {})}, check=False).returncode
    if check and rc:
      raise RuntimeError(f"command failed with exit code {rc}: {shlex.join(cmd)}")
    return rc

  def query(self, cmd: Sequence[str], answer_key: str) -> str:
    """Runs `cmd` and returns its stripped stdout ('' when it fails); in a dry run, prints it
    and returns dry_answers[answer_key]."""
    self._show(cmd, None)
    if self.dry_run:
      answers = self._answers.get(answer_key) or [""]
      return answers.pop(0) if len(answers) > 1 else answers[0]
    done = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else ""

  def parallel(self, cmds: Sequence[tuple[Sequence[str], Mapping[str, str] | None]]) -> list[int]:
    """Starts every command at once (one per host) and waits for all; their exit codes."""
    for cmd, env in cmds:
      self._show(cmd, env)
    if self.dry_run:
      return [0] * len(cmds)
    procs = [subprocess.Popen(list(cmd), env={**os.environ, **(env or {})}) for cmd, env in cmds]
    return [p.wait() for p in procs]

  def sleep(self, seconds: float) -> None:
    if not self.dry_run:
      self._sleep(seconds)
