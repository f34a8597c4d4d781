"""Every shell command in README.md and docs/*.md runs as written on the tiny built-in setup.

The blocks are the fenced ```bash / ```sh / ```shell blocks of README.md and docs/*.md, found
afresh on every run, so a rewritten page is covered without editing this file. A block is left
out only by an explicit marker on the line before its fence, with the reason:

  <!-- docs-test: skip (needs the released 7B checkpoints) -->

Fast checks (default suite): every block either runs or carries a marker with a reason; a block
that runs holds no placeholder (`OLMO2_DIR`, `[--optional]` flags, `...`); and no untagged fenced
block is a command, which would escape this test.

Slow (one test per block, in document order): each block runs with `bash -euo pipefail` in one
scratch directory shared by all blocks, where the repository's files are linked, so relative paths
such as `configs/public.py` resolve and outputs (`runs/`, `hf_tiny/`) land outside the checkout.
Blocks that read `runs/data`, `runs/public` or `runs/experts/<math|code>` get them from a fixture
that builds them at the smallest settings (a 40-document corpus, a 4-step public model, 2-step
experts) with the project's own commands.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELLS = ("bash", "sh", "shell")
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<reason>.*)\)\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
# Placeholders a reader must replace: CAPITALISED names ending in _DIR / _PATH / _FILE (a shell
# variable, $NAME, is fine), optional flags in brackets, and elided arguments.
PLACEHOLDER = re.compile(r"(?<![$\w{])[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*_(?:DIR|PATH|FILE)\b"
                         r"|\[--|\s\.\.\.(?:\s|$)")
COMMAND = re.compile(r"^\s*(?:python3?|bash|pip|curl)\s", re.M)
# What the runs/ fixture provides, and the blocks that need it.
NEEDS_RUNS = re.compile(r"(?<![\w/.-])runs/(?:data|public|experts)\b")


@dataclasses.dataclass(frozen=True)
class Block:
  page: pathlib.Path
  line: int
  lang: str
  body: str
  skip_reason: str | None

  @property
  def id(self) -> str:
    return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(pages=PAGES) -> list[Block]:
  """Every fenced block of `pages`, with the skip reason from the line before its fence."""
  out = []
  for page in pages:
    text = page.read_text(encoding="utf-8")
    for match in FENCE.finditer(text):
      before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
      marker = SKIP.search(before)
      reason = marker.group("reason").strip() if marker else None
      if page.name == "README.md" and len(out_of(page, out)) < 2:
        # The README opens with exactly its two commands (no marker before them): the full
        # reproduction (about 20 minutes; tests/test_reproduce.py and the notebook's CI run cover
        # it small) and the test command, which is CI's own (.ci/run).
        reason = "the README's opening command, run by CI or covered small"
      out.append(Block(page, text.count("\n", 0, match.start()) + 1, match.group("lang"),
                       match.group("body"), reason))
  return out


def out_of(page: pathlib.Path, found: list[Block]) -> list[Block]:
  return [b for b in found if b.page == page]


SHELL_BLOCKS = [b for b in blocks() if b.lang in SHELLS]
RUNNABLE = [b for b in SHELL_BLOCKS if b.skip_reason is None]


def test_the_pages_have_shell_blocks_and_some_run():
  assert len(SHELL_BLOCKS) >= 5 and RUNNABLE


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.id)
def test_block_runs_or_says_why_not(block):
  if block.skip_reason is not None:
    assert block.skip_reason, f"{block.id}: a skip marker needs a reason in its brackets"
    return
  found = PLACEHOLDER.findall(block.body)
  assert not found, (f"{block.id} holds placeholders {found}: write a command that runs, or put "
                     "<!-- docs-test: skip (why) --> on the line before the fence")


def test_untagged_blocks_are_not_commands():
  untagged = [b.id for b in blocks() if not b.lang and COMMAND.search(b.body)]
  assert not untagged, f"command blocks without a ```bash tag escape this test: {untagged}"


def test_block_parsing(tmp_path):
  source = tmp_path / "page.md"
  source.write_text("intro\n<!-- docs-test: skip (needs a TPU VM (v5e)) -->\n```bash\necho a\n```\n\n"
                    "```sh\necho b\n```\n```\nplain\n```\n")
  found = blocks([source])
  assert [(b.line, b.lang, b.body, b.skip_reason) for b in found] == [
      (3, "bash", "echo a\n", "needs a TPU VM (v5e)"), (7, "sh", "echo b\n", None), (10, "", "plain\n", None)]
  assert PLACEHOLDER.findall("--public=OLMO2_DIR --x=$OLMO2_DIR [--a=b] all ... --dry_run") == [
      "OLMO2_DIR", "[--", " ... "]
  assert NEEDS_RUNS.search("--data=runs/data") and NEEDS_RUNS.search("cp -r runs/experts/math x")
  assert not NEEDS_RUNS.search("--workdir=/shared/runs/public --out=runs_tiny/data")


# ------------------------------------------------------------------------------------ slow runs


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run(script: str, cwd: pathlib.Path, what: str) -> None:
  result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=900, check=False)
  if result.returncode:
    pytest.fail(f"{what} exited {result.returncode}\n--- stdout (tail)\n{result.stdout[-3000:]}"
                f"\n--- stderr (tail)\n{result.stderr[-4000:]}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """A scratch directory with every top-level entry of the repository linked into it."""
  root = tmp_path_factory.mktemp("docs")
  for entry in REPO.iterdir():
    if not entry.name.startswith(".") and entry.name not in (".git", "runs", "runs_notebook"):
      (root / entry.name).symlink_to(entry)
  return root


@pytest.fixture(scope="module")
def tiny_runs(workspace):
  """runs/data, runs/public and runs/experts/{math,code} at the smallest settings."""
  small = "--config.data.path=runs/data"
  expert = f"{small} --config.steps=2 --config.eval_every=2 --config.checkpoint_every=2"
  _run(f"""
python -m flexolmo_jax.data prepare --out=runs/data --max_docs_per_domain=40 --vocab_size=512
python -m flexolmo_jax.train --config=configs/public.py --workdir=runs/public {small} \
    --config.steps=4 --config.eval_every=4 --config.checkpoint_every=4
python -m flexolmo_jax.train --config=configs/math_expert.py --workdir=runs/experts/math {expert} \
    --config.expert.public=runs/public
python -m flexolmo_jax.train --config=configs/code_expert.py --workdir=runs/experts/code {expert} \
    --config.expert.public=runs/public
""", workspace, "the runs/ fixture")
  return workspace


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_block_runs_as_written(block, workspace, request):
  if NEEDS_RUNS.search(block.body):
    request.getfixturevalue("tiny_runs")
  _run(block.body, workspace, block.id)
