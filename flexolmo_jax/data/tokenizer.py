"""Tokenizers behind one small interface: this project's sentencepiece model, or a Hugging Face
`tokenizer.json` from disk (the released FlexOlmo checkpoints' dolma2 tokenizer).

Id conventions of the trained sentencepiece model: pad 0, eos 1, unk 2, no BOS. Every document is
encoded as its tokens followed by one EOS (see `encode_document`).

Identity: a tokenizer's fingerprint is the sha256 of its file (`tokenizer.json` or `*.model`).
Data manifests record it under tokenizer.sha256 and model manifests under
`tokenizer_fingerprint`; `check_matches` is the one check every command runs before it feeds
token ids to a model, because ids from another tokenizer are valid integers that mean other text.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
_META = "\u2581"  # sentencepiece's whitespace symbol


# A model manifest's key for the fingerprint of the tokenizer it was trained or converted with,
# and for the path of that tokenizer when it does not sit in the model directory (training runs).
FINGERPRINT_KEY = "tokenizer_fingerprint"
PATH_KEY = "tokenizer_path"
# Tokenizer files, in the order a directory is searched for the tokenizer itself.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
# The files that travel with a Hugging Face tokenizer (and the generation settings and chat
# template that go with it) when a checkpoint is converted either way.
HF_COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "vocab.json", "merges.txt", "generation_config.json",
                      "chat_template.jinja", "chat_template.json")


class TokenizerMismatchError(ValueError):
  """Token ids from one tokenizer would be fed to a model trained with another."""


class Tokenizer(Protocol):
  """What the data pipeline and generation need from a tokenizer."""

  path: str
  fingerprint: str
  vocab_size: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


def encode_document(tok: Tokenizer, text: str) -> np.ndarray:
  """Token ids of one document followed by EOS, as int32."""
  return np.asarray(tok.encode(text) + [tok.eos_id], dtype=np.int32)


class SentencePieceTokenizer:
  """A sentencepiece model file (`*.model`)."""

  def __init__(self, path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.path = path
    self.fingerprint = fingerprint(path)
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id()

    # Sentencepiece writes spaces as U+2581, so a literal U+2581 in the text would decode as a
    # space. It is encoded as its three UTF-8 byte pieces instead, which decode verbatim.
    self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode("utf-8")]

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text], num_threads=1)[0]

  def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
    """Encodes many texts at once in sentencepiece's own threads (much faster than a loop)."""
    threads = num_threads or (os.cpu_count() or 1)
    out = self._sp.encode(texts, num_threads=threads)
    for i, text in enumerate(texts):
      if _META in text:
        parts = self._sp.encode(text.split(_META), num_threads=threads)
        out[i] = [t for j, part in enumerate(parts) for t in (self._meta_ids if j else []) + part]
    return out

  def decode(self, ids: Sequence[int]) -> str:
    # A model's vocabulary may be padded past the tokenizer's (8192 vs a 512-piece corpus
    # tokenizer): ids in the padding have no text, and sentencepiece would raise on them.
    return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (e.g. dolma2), read from disk with the `tokenizers` library.

  eos and pad are looked up by name in the vocabulary ("<|endoftext|>" and "<|pad|>" for dolma2)
  unless given; a missing eos is an error, since every document needs one.
  """

  def __init__(self, path: str, eos_token: str | None = None, pad_token: str | None = None):
    from tokenizers import Tokenizer as _HFTok  # pylint: disable=g-import-not-at-top
    self.path = path
    self.fingerprint = fingerprint(path)
    self._tok = _HFTok.from_file(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    eos_candidates = [eos_token] if eos_token else ["<|endoftext|>", "</s>", "<eos>", "<|eos|>"]
    pad_candidates = [pad_token] if pad_token else ["<|pad|>", "<pad>", "[PAD]"]
    self.eos_id = self._first_id(eos_candidates)
    if self.eos_id is None:
      raise ValueError(f"{path}: none of the eos tokens {eos_candidates} is in the vocabulary; "
                       "name it with eos_token=...")
    pad = self._first_id(pad_candidates)
    self.pad_id = self.eos_id if pad is None else pad

  def _first_id(self, names: Iterable[str]) -> int | None:
    for name in names:
      i = self._tok.token_to_id(name)
      if i is not None:
        return i
    return None

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
    """Encodes many texts at once (the tokenizers library parallelises internally)."""
    del num_threads
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def tokenizer_file(path: str | os.PathLike) -> str:
  """The tokenizer file `path` names: itself, or in a directory `tokenizer.model` then
  `tokenizer.json`."""
  path = str(path)
  if os.path.isdir(path):
    for name in TOKENIZER_FILES:
      if os.path.exists(os.path.join(path, name)):
        return os.path.join(path, name)
    raise FileNotFoundError(f"{path} holds neither tokenizer.model nor tokenizer.json.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Tokenizer file {path} does not exist.")
  return path


def fingerprint(path: str | os.PathLike) -> str:
  """sha256 of the tokenizer file `path` names (a file, or a directory holding one)."""
  h = hashlib.sha256()
  with open(tokenizer_file(path), "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def load_tokenizer(path: str) -> SentencePieceTokenizer | HFTokenizer:
  """Loads `*.model` (sentencepiece) or `tokenizer.json` (Hugging Face); a directory is searched
  for `tokenizer.model` then `tokenizer.json`. The result carries `.fingerprint`."""
  path = tokenizer_file(path)
  if path.endswith(".json"):
    return HFTokenizer(path)
  with open(path, "rb") as f:
    head = f.read(1)
  if head == b"{":
    raise ValueError(f"{path} looks like JSON: name it *.json to load it as a Hugging Face "
                     "tokenizer.json.")
  return SentencePieceTokenizer(path)


def model_tokenizer_path(model_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> str | None:
  """The tokenizer that travels with a model: a tokenizer file in its directory (converted and
  merged artifacts carry one), else the file its manifest names (training runs), else None."""
  for name in TOKENIZER_FILES:
    if (pathlib.Path(model_dir) / name).exists():
      return str(pathlib.Path(model_dir) / name)
  recorded = manifest.get(PATH_KEY)
  return recorded if recorded and os.path.exists(recorded) else None


def manifest_entry(tok: Tokenizer) -> dict[str, str]:
  """The model-manifest keys that record which tokenizer a model was trained or converted with."""
  return {FINGERPRINT_KEY: tok.fingerprint, PATH_KEY: str(pathlib.Path(tok.path).absolute())}


def for_model(model_dir: str | os.PathLike, manifest: Mapping[str, Any], *,
              override: str | None = None, data_root: str | None = None):
  """The tokenizer to use with the model at `model_dir`, checked against its manifest: `override`
  when given, else the one that travels with the model, else the corpus tokenizer of
  `data_root`."""
  path = override or model_tokenizer_path(model_dir, manifest) or data_root
  if not path:
    raise FileNotFoundError(f"{model_dir} carries no tokenizer: pass --tokenizer=PATH (or --data, "
                            "a corpus holds its tokenizer)")
  tok = load_tokenizer(path)
  check_matches(manifest, tok, model=str(model_dir))
  return tok


def _fingerprint_of(source: Any) -> tuple[str | None, str]:
  """(fingerprint, description) of a tokenizer, a data manifest or a model manifest."""
  if isinstance(source, Mapping):
    if FINGERPRINT_KEY in source:
      return source[FINGERPRINT_KEY], f"the {source.get('kind', 'model')} model's tokenizer"
    data_tok = source.get("tokenizer")
    if isinstance(data_tok, Mapping):
      return data_tok.get("sha256"), "the corpus tokenizer"
    return None, "unrecorded"
  return getattr(source, "fingerprint", None), f"the tokenizer {getattr(source, 'path', source)}"


def check_matches(model_manifest: Mapping[str, Any], other: Any, *, model: str = "the model",
                  fix: str = "") -> None:
  """Refuses to pair a model with token ids from another tokenizer.

  `other`: a loaded tokenizer, a data manifest (its tokenizer.sha256) or another model manifest.
  Passes when either side recorded no fingerprint (artifacts made before fingerprints existed).
  """
  want = model_manifest.get(FINGERPRINT_KEY)
  found, what = _fingerprint_of(other)
  if want is None or found is None or want == found:
    return
  own = model_manifest.get(PATH_KEY) or model
  fix = fix or (f"use the model's own tokenizer ({own}; evaluate and serve pick it when no "
                "--tokenizer is given), or prepare the data with it: python -m flexolmo_jax.data "
                f"prepare --tokenizer={own} --out=DIR")
  raise TokenizerMismatchError(f"tokenizer mismatch: {model} expects tokenizer {want} but {what} "
                               f"is {found}; {fix}")


def _training_lines(docs: Iterable[str], max_line_bytes: int) -> Iterator[str]:
  # Sentencepiece trains on "sentences" and skips any longer than max_sentence_length, so documents
  # are fed line by line (newline itself is a user symbol, so it needs no training data).
  for doc in docs:
    for line in doc.split("\n"):
      if line and len(line.encode("utf-8")) <= max_line_bytes:
        yield line


def train_sentencepiece(docs: Iterable[str], out_path: str, vocab_size: int, seed: int = 0,
                        max_lines: int = 2_000_000) -> SentencePieceTokenizer:
  """Trains a BPE sentencepiece model that round-trips any text exactly, and writes it atomically.

  Exactness: no normalisation, no whitespace collapsing, no dummy prefix, whitespace-only pieces
  allowed (code indentation), newline and tab as their own symbols, unknown characters as bytes.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  # Sentencepiece's own sampling RNG is not exposed as a trainer field; seeding it globally makes
  # `shuffle_input_sentence` (and so the trained model) reproducible.
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  max_line_bytes = 4192
  spm.SentencePieceTrainer.train(
      sentence_iterator=_training_lines(docs, max_line_bytes),
      model_writer=model,
      model_type="bpe",
      vocab_size=vocab_size,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      byte_fallback=True,
      user_defined_symbols=["\n", "\t"],
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      character_coverage=0.9995,
      input_sentence_size=max_lines,
      shuffle_input_sentence=True,
      max_sentence_length=max_line_bytes,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
  )
  tmp = out_path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(model.getvalue())
  os.replace(tmp, out_path)
  return SentencePieceTokenizer(out_path)

