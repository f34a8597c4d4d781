"""What every command line of the project shares.

Conventions: absl flags; `--workdir` names a directory a command resumes from, `--out` an
artifact or results directory it writes; expert subsets in flexolmo_jax.subsets' syntax.
"""

from __future__ import annotations

from absl import flags
from absl import logging


def default_verbosity() -> None:
  """Log warnings and up unless the user passed --verbosity (or -v).

  absl's app.run raises the level to INFO when --verbosity is absent, and Orbax logs every file
  it reads or writes at INFO; call this first in main().
  """
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
