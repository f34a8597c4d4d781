"""The command-line conventions: the user's --verbosity wins over the quiet default, and no command
forces a logging level of its own."""

import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PROGRAM = ("from absl import app, logging\n"
           "from flexolmo_jax import cli\n"
           "def main(argv):\n"
           "  cli.default_verbosity()\n"
           "  logging.info('INFO-LINE')\n"
           "  logging.warning('WARNING-LINE')\n"
           "app.run(main)\n")


def _stderr(*args):
  done = subprocess.run([sys.executable, "-c", PROGRAM, *args], capture_output=True, text=True,
                        cwd=REPO, check=True)
  return done.stderr


def test_warnings_by_default_and_the_users_verbosity_wins():
  quiet = _stderr()
  assert "WARNING-LINE" in quiet and "INFO-LINE" not in quiet
  for flag in ("--verbosity=0", "-v=1"):
    assert "INFO-LINE" in _stderr(flag)
  assert "WARNING-LINE" not in _stderr("--verbosity=-2")


def test_no_command_sets_its_own_level():
  forcing = [str(p.relative_to(REPO)) for folder in ("flexolmo_jax", "launch")
             for p in (REPO / folder).rglob("*.py")
             if p.name != "cli.py" and re.search(r"set_verbosity\(", p.read_text())]
  assert forcing == []
