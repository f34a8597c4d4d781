"""Command line: build FlexMix-mini.

  python -m flexolmo_jax.data prepare --out=DIR [--seed=0] [--vocab_size=8192 | --tokenizer=PATH]
      [--max_docs_per_domain=N] [--max_chars_per_domain=3000000]
      [--owner=NAME=DIR ...] [--text_field=text]

Builds the corpus, trains the tokenizer on the public mix (or, with --tokenizer, uses that one:
a model's tokenizer.json, a directory holding one, or a sentencepiece *.model), writes token shards and the manifest,
then adds each --owner directory (.txt / .jsonl files) as a closed domain, and prints the token
counts per domain and split. Re-running reuses every complete part.
"""

import dataclasses
import os
import time

from absl import app
from absl import flags

from flexolmo_jax import cli
from flexolmo_jax.data import corpus

_OUT = flags.DEFINE_string("out", None, "Directory of the prepared corpus.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for subsetting, splitting, math problems, tokenizer.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Sentencepiece vocabulary size.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenize with this tokenizer (tokenizer.json, "
                                 "a directory holding one, or a sentencepiece *.model) instead of "
                                 "training one: the tokenizer of the model the data will train.")
_MAX_DOCS = flags.DEFINE_integer("max_docs_per_domain", None, "Cap on documents per domain.")
_MAX_CHARS = flags.DEFINE_integer("max_chars_per_domain", 3_000_000,
                                  "Cap on characters per domain.")
_OWNER = flags.DEFINE_multi_string("owner", [], "NAME=DIR: add an owner's .txt/.jsonl directory "
                                   "as closed domain NAME.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSON field holding the text in .jsonl.")


def main(argv):
  if len(argv) != 2 or argv[1] != "prepare":
    raise app.UsageError("usage: python -m flexolmo_jax.data prepare --out=DIR [flags]")
  cli.default_verbosity()
  if not _OUT.value:
    raise app.UsageError("--out=DIR is required.")
  owners = [_owner(spec) for spec in _OWNER.value]  # All checked before anything is written.
  start = time.time()
  opts = _options()
  corpus.prepare(_OUT.value, opts)
  for name, path, docs in owners:
    corpus.add_domain(_OUT.value, name, docs, seed=opts.seed)
    print(f"{name}: added from {path}", flush=True)
  print(corpus.format_table(corpus.load_manifest(_OUT.value)))
  print(f"prepared {_OUT.value} in {time.time() - start:.1f} s")


def _options() -> corpus.BuildOptions:
  """The build options: an existing corpus keeps the ones it was built with (so adding an owner's
  directory never rebuilds it, nor retrains its tokenizer), except flags given explicitly."""
  given = {flag.name: flag.value for flag in (_SEED, _VOCAB, _MAX_DOCS, _MAX_CHARS, _TOKENIZER)}
  manifest = os.path.join(_OUT.value, "manifest.json")
  if not os.path.exists(manifest):
    return corpus.BuildOptions(**given)  # Flag names are the field names.
  recorded = corpus.load_manifest(_OUT.value).get("options", {})
  explicit = {name: value for name, value in given.items() if flags.FLAGS[name].present}
  known = {f.name for f in dataclasses.fields(corpus.BuildOptions)}
  return corpus.BuildOptions(**{**{k: v for k, v in recorded.items() if k in known},
                                **explicit})


def _owner(spec: str) -> tuple[str, str, list[str]]:
  """(name, directory, documents) of an --owner=NAME=DIR; a bad name, a missing or empty
  directory or an unreadable file is refused here, before the corpus is built."""
  name, sep, path = spec.partition("=")
  if not sep or not name or not path:
    raise app.UsageError(f"--owner={spec}: expected NAME=DIR")
  cli.check_name(name, f"--owner={spec}: domain")
  return name, path, corpus.documents_from_spec({"dir": path, "text_field": _TEXT_FIELD.value})


if __name__ == "__main__":
  cli.run(main)
