"""Progress bars: off a terminal every update is a whole line (logs stay readable), with the
count, total and ETA; below WARNING verbosity they are silent."""

import io

from absl import logging

from flexolmo_jax import progress


def test_off_a_terminal_each_update_is_one_line(monkeypatch):
  stream = io.StringIO()
  monkeypatch.setattr("sys.stderr", stream)
  monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
  monkeypatch.setattr(progress, "DELAY", 0.0)
  assert list(progress.bar(range(3), desc="docs", unit="doc")) == [0, 1, 2]
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue() and len(lines) >= 2
  assert lines[0].startswith("docs:") and "0/3" in lines[0]
  assert "3/3" in lines[-1] and "doc/s" in lines[-1]
  assert "<" in lines[-1]  # elapsed<remaining: the ETA


def test_quiet_below_warning(monkeypatch):
  stream = io.StringIO()
  monkeypatch.setattr("sys.stderr", stream)
  monkeypatch.setattr(progress, "DELAY", 0.0)
  old = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    assert not progress.enabled()
    assert list(progress.bar(range(3), desc="quiet")) == [0, 1, 2]
  finally:
    logging.set_verbosity(old)
  assert stream.getvalue() == ""


def test_quick_work_shows_no_bar(monkeypatch):
  stream = io.StringIO()
  monkeypatch.setattr("sys.stderr", stream)
  monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
  assert list(progress.bar(range(3), desc="quick")) == [0, 1, 2]  # well under DELAY
  assert stream.getvalue() == ""
