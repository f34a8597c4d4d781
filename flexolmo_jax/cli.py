"""What every command line of the project shares.

Conventions: absl flags; `--workdir` names a directory a command resumes from, `--out` an
artifact or results directory it writes; expert subsets in flexolmo_jax.subsets' syntax.

Bad input (a flag absl refuses, a usage error, a missing file, an unknown config key, an invalid
name, empty data) ends a command with ONE line, `error: <the problem and the fix>`, and exit
status 2, never a traceback: run `main` with `cli.run(main)`, or call `cli.fail(message)`. The
exception types counted as bad input are INPUT_ERRORS (every project error that means bad
input subclasses ValueError) plus what a command adds; `--verbosity=1` also logs the traceback.
Commands refuse before they write, and write results atomically (flexolmo_jax.atomic), so a
refused or failed run leaves nothing half written.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, NoReturn, Sequence

from absl import app
from absl import flags
from absl import logging

INPUT_ERRORS = (ValueError, KeyError, OSError, app.UsageError)
# Domain, owner and expert names become file and directory names.
NAME = re.compile(r"[A-Za-z0-9_-]+")


def default_verbosity() -> None:
  """Log warnings and up unless the user passed --verbosity (or -v).

  absl's app.run raises the level to INFO when --verbosity is absent, and Orbax logs every file
  it reads or writes at INFO; call this first in main().
  """
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def fail(problem: str | BaseException) -> NoReturn:
  """Ends the command on bad input: `error: <problem>` on stderr, one line, exit status 2."""
  if isinstance(problem, KeyError) and problem.args:  # str() of a KeyError adds quotes.
    problem = problem.args[0]
  message = " ".join(str(problem).split()) or type(problem).__name__
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(2)


def check_name(name: str, what: str, error: type[ValueError] = ValueError) -> str:
  """`name` if it can be a file or directory name; `error` naming the rule otherwise."""
  if not isinstance(name, str) or not NAME.fullmatch(name):
    raise error(f"{what} {name!r} is not a valid name: names become file and directory names, "
                "so they must match [A-Za-z0-9_-]+ (letters, digits, _ and -); rename it")
  return name


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with an unknown, malformed or missing flag reported by `fail`."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    fail(err)


def run(main: Callable[[list[str]], object], errors: tuple[type[BaseException], ...] = ()) -> None:
  """absl's app.run(main), with bad input (a flag absl refuses, or an exception of INPUT_ERRORS
  or `errors` raised by main) reported by `fail`."""
  def guarded(argv):
    try:
      return main(argv)
    except (*INPUT_ERRORS, *errors) as err:
      logging.debug("the refused input's traceback:", exc_info=True)  # --verbosity=1 shows it.
      fail(err)
  app.run(guarded, flags_parser=parse_flags)
