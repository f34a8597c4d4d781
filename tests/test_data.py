"""FlexMix-mini data: corpus integrity, tokenizers, the grain pipeline, bad input."""

import io
import json
import os
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flexolmo_jax.data import corpus
from flexolmo_jax.data import math_gen
from flexolmo_jax.data import pipeline
from flexolmo_jax.data import sources
from flexolmo_jax.data import tokenizer as tokenizer_lib
from flexolmo_jax.data.config import DataConfig, data_config

from conftest import SMALL
ALL_DOMAINS = (corpus.PUBLIC,) + corpus.CLOSED_DOMAINS


@pytest.fixture(scope="session")
def tok(corpus_dir):
  return tokenizer_lib.load_tokenizer(corpus_dir)


def _cfg(corpus_dir, **kw):
  return DataConfig(path=corpus_dir, **{"domains": ("public", "news"), "seq_len": 64,
                                        "batch_size": 4, **kw})


def _pipe(cfg, **kw):
  return pipeline.make_pipeline(cfg, "train", shard_index=0, shard_count=1, **kw)


# Corpus integrity.

def test_splits_and_domains_are_disjoint_by_hash(corpus_dir):
  owner = {}
  for domain in ALL_DOMAINS:
    for split in corpus.SPLITS:
      rows = corpus.read_text_split(corpus_dir, domain, split)
      assert rows, (domain, split)
      for row in rows:
        h = corpus.normalized_hash(row["text"])
        assert h == row["hash"]
        assert h not in owner, f"{domain}/{split} shares a document with {owner[h]}"
        owner[h] = (domain, split)


def test_manifest_matches_files(corpus_dir, tok):
  manifest = corpus.load_manifest(corpus_dir)
  assert set(manifest["domains"]) == set(ALL_DOMAINS)
  assert manifest["tokenizer"]["sha256"] == corpus.file_sha256(tok.path)
  for domain in ALL_DOMAINS:
    for split in corpus.SPLITS:
      entry = manifest["domains"][domain][split]
      rows = corpus.read_text_split(corpus_dir, domain, split)
      assert entry["documents"] == len(rows)
      assert entry["characters"] == sum(len(r["text"]) for r in rows)
      assert entry["text_sha256"] == corpus.file_sha256(
          os.path.join(corpus_dir, "text", domain, f"{split}.jsonl"))
      path = corpus.token_paths(corpus_dir, [domain], split)[0]
      assert entry["tokens_sha256"] == corpus.file_sha256(path)


def test_tokenizer_round_trips_every_domain_test_split(corpus_dir, tok):
  from array_record.python.array_record_module import ArrayRecordReader
  assert (tok.pad_id, tok.eos_id) == (0, 1)
  for domain in ALL_DOMAINS:
    rows = corpus.read_text_split(corpus_dir, domain, "test")
    reader = ArrayRecordReader(corpus.token_paths(corpus_dir, [domain], "test")[0])
    records = reader.read_all()
    reader.close()
    assert len(records) == len(rows)
    for row, record in zip(rows, records):
      ids = np.frombuffer(record, np.int32)
      assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
      assert tok.decode(ids[:-1]) == row["text"], domain
      assert tok.decode(tok.encode(row["text"])) == row["text"], domain


def test_round_trip_whitespace_and_unseen_characters(tok):
  text = "def f(x):\n\tif x:\n        return  x  \r\n\n\n# ünïcødé → 漢字 🙂 \u2028 ▁ end  "
  ids = tok.encode(text)
  assert tok.decode(ids) == text


def test_math_generator_is_seeded():
  assert math_gen.generate(50, seed=3) == math_gen.generate(50, seed=3)
  assert math_gen.generate(50, seed=3) != math_gen.generate(50, seed=4)
  for doc in math_gen.generate(200, seed=0):
    assert doc.startswith("Problem: ") and "\nSolution:\n" in doc and "\nAnswer: " in doc


# Pipeline.

def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_format(corpus_dir, tok):
  # Short documents (math problems), so rows hold document ends and starts.
  batch = next(iter(_pipe(_cfg(corpus_dir, domains=("public", "math")))))
  assert set(batch) == {"tokens", "targets", "segment_ids", "positions", "loss_mask"}
  for k, v in batch.items():
    assert v.shape == (4, 64), k
  seg, pos, toks, tgt = batch["segment_ids"], batch["positions"], batch["tokens"], batch["targets"]
  np.testing.assert_array_equal(batch["loss_mask"], (seg != 0).astype(np.float32))
  for row in range(4):
    for t in range(63):
      if seg[row, t] != 0 and seg[row, t + 1] == seg[row, t]:
        assert pos[row, t + 1] == pos[row, t] + 1
        assert tgt[row, t] == toks[row, t + 1]  # next token of the same document
      elif seg[row, t + 1] != 0:
        assert pos[row, t + 1] == 0 and seg[row, t + 1] == seg[row, t] + 1  # a new document
    assert seg[row, 0] == 1 and pos[row, 0] == 0
  # A document's last input predicts EOS; EOS is never an input.
  assert (toks[seg != 0] != tok.eos_id).all()
  assert (tgt == tok.eos_id).any()


def test_pipeline_is_deterministic(corpus_dir):
  cfg = _cfg(corpus_dir)
  a, b = iter(_pipe(cfg)), iter(_pipe(cfg))
  for _ in range(3):
    _assert_same(next(a), next(b))
  other = next(iter(_pipe(cfg, seed=cfg.seed + 1)))
  assert not np.array_equal(other["tokens"], next(iter(_pipe(cfg)))["tokens"])


def test_pipeline_resumes_mid_epoch_with_identical_batches(corpus_dir):
  cfg = _cfg(corpus_dir)
  it = iter(_pipe(cfg))
  for _ in range(5):
    next(it)
  state = pipeline.iterator_state_to_json(it)
  json.loads(state)  # plain JSON, storable next to an Orbax checkpoint
  expected = [next(it) for _ in range(3)]
  resumed = iter(_pipe(cfg))
  pipeline.iterator_state_from_json(resumed, state)
  for want in expected:
    _assert_same(want, next(resumed))


def test_host_shards_split_the_documents(corpus_dir):
  cfg = _cfg(corpus_dir, domains=("news",), batch_size=1, shuffle=False)
  manifest = corpus.load_manifest(corpus_dir)["domains"]["news"]["train"]
  inputs = manifest["tokens"] - manifest["documents"]  # every document has len - 1 input tokens
  firsts, total = [], 0
  for shard in range(2):
    batches = list(pipeline.make_pipeline(cfg, "train", shard_index=shard, shard_count=2,
                                          num_epochs=1))
    total += sum(int(b["loss_mask"].sum()) for b in batches)
    firsts.append(batches[0]["tokens"])
  assert total == inputs
  assert not np.array_equal(firsts[0], firsts[1])


def test_packed_segments_are_isolated_in_the_model(corpus_dir, tok):
  from flexolmo_jax import config as model_config
  from flexolmo_jax import model as model_lib
  batch = next(iter(_pipe(_cfg(corpus_dir, domains=("math",), seq_len=128, batch_size=2))))
  row = int(np.argmax((batch["segment_ids"].max(axis=1))))
  seg, pos, toks = (batch[k][row:row + 1] for k in ("segment_ids", "positions", "tokens"))
  assert seg.max() >= 2, "need a row with at least two documents"
  in_doc2 = seg[0] == 2
  assert pos[0][in_doc2][0] == 0
  cfg = model_config.tiny(vocab_size=tok.vocab_size)
  net = model_lib.Transformer(cfg)
  params = net.init(jax.random.PRNGKey(0), jnp.asarray(toks))["params"]
  apply = jax.jit(lambda t, p, s: net.apply({"params": params}, t, positions=p, segment_ids=s))
  packed = apply(jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(seg))
  doc2 = toks[:, in_doc2]
  alone = apply(jnp.asarray(doc2), jnp.arange(doc2.shape[1])[None], jnp.ones_like(doc2))
  np.testing.assert_allclose(np.asarray(packed)[0, in_doc2], np.asarray(alone)[0],
                             rtol=1e-5, atol=1e-5)
  # Changing document 1 leaves document 2 untouched.
  other = np.where(seg == 1, (toks + 7) % tok.vocab_size, toks)
  moved = apply(jnp.asarray(other), jnp.asarray(pos), jnp.asarray(seg))
  np.testing.assert_array_equal(np.asarray(moved)[0, in_doc2], np.asarray(packed)[0, in_doc2])


# Owners' data, idempotence, tfds, Hugging Face tokenizer.json.

def test_owner_directory_becomes_a_domain(corpus_dir, tmp_path):
  news_doc = corpus.read_text_split(corpus_dir, "news", "train")[0]["text"]
  owner = tmp_path / "legal"
  owner.mkdir()
  for i in range(12):
    (owner / f"case{i}.txt").write_text(f"Case {i}: the court held that clause {i} is void.\n")
  with open(owner / "more.jsonl", "w") as f:
    for i in range(12):
      f.write(json.dumps({"body": f"Contract {i} binds both parties until {2000 + i}."}) + "\n")
    f.write(json.dumps({"body": news_doc}) + "\n")  # already in news: must be dropped
  cfg = _cfg(corpus_dir, domains=("legal",), owner_dirs={"legal": str(owner)},
             text_field="body", seq_len=32, batch_size=2)
  batch = next(iter(_pipe(cfg)))
  assert batch["tokens"].shape == (2, 32)
  entry = corpus.load_manifest(corpus_dir)["domains"]["legal"]
  assert entry["dedup"]["duplicates_dropped"] == 1
  assert sum(entry[s]["documents"] for s in corpus.SPLITS) == 24
  with redirect_stdout(io.StringIO()):
    corpus.prepare(corpus_dir, SMALL)  # a re-run keeps the owner's domain in the manifest
  assert corpus.load_manifest(corpus_dir)["domains"]["legal"] == entry


def test_prepare_reuses_parts_and_rebuilds_incomplete_ones(tmp_path):
  root = str(tmp_path / "c")
  opts = corpus.BuildOptions(max_docs_per_domain=12, vocab_size=400, math_docs=40)
  with redirect_stdout(io.StringIO()):
    corpus.prepare(root, opts)
  shard = corpus.token_paths(root, ["code"], "test")[0]
  mtime = os.stat(shard).st_mtime_ns
  log = io.StringIO()
  with redirect_stdout(log):
    corpus.prepare(root, opts)
  assert "tokenizer: reused" in log.getvalue() and " built" not in log.getvalue()
  assert os.stat(shard).st_mtime_ns == mtime
  # A crash after writing a shard but before its marker: the shard must not count as complete.
  os.remove(os.path.splitext(shard)[0] + ".done")
  with open(shard, "ab") as f:
    f.write(b"torn")
  log = io.StringIO()
  with redirect_stdout(log):
    corpus.prepare(root, opts)
  assert "code: train reused, validation reused, test built" in log.getvalue()
  assert os.path.exists(os.path.splitext(shard)[0] + ".done")
  manifest = corpus.load_manifest(root)
  assert manifest["domains"]["code"]["test"]["tokens_sha256"] == corpus.file_sha256(shard)


def test_tfds_builder_reads_back_with_data_source(corpus_dir, tmp_path):
  import tensorflow_datasets as tfds
  from flexolmo_jax.data import tfds_builder
  names = tfds_builder.prepare_tfds(corpus_dir, str(tmp_path), ["math"])
  source = tfds.data_source(names[0], data_dir=str(tmp_path), split="test")
  rows = corpus.read_text_split(corpus_dir, "math", "test")
  got = sorted(source[i]["text"].decode() for i in range(len(source)))
  assert got == sorted(r["text"] for r in rows)


def test_hf_tokenizer_json_loads_from_disk(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
  hf = Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  hf.train_from_iterator(math_gen.generate(200, seed=1), trainer)
  path = str(tmp_path / "tokenizer.json")
  hf.save(path)
  tok = tokenizer_lib.load_tokenizer(path)
  assert isinstance(tok, tokenizer_lib.HFTokenizer)
  assert (tok.eos_id, tok.pad_id) == (0, 1)
  text = "Problem: Solve  x^2 - 4 = 0.\n\tdone ü"
  assert tok.decode(tok.encode(text)) == text
  ids = tokenizer_lib.encode_document(tok, text)
  assert ids.dtype == np.int32 and ids[-1] == tok.eos_id


# Bad input: each error names the problem and the fix.

def test_empty_directory(tmp_path):
  with pytest.raises(sources.DataError, match="no .txt or .jsonl files"):
    sources.read_text_dir(str(tmp_path))


def test_unreadable_file(tmp_path):
  os.symlink(tmp_path / "missing", tmp_path / "gone.txt")
  with pytest.raises(sources.DataError, match=r"Cannot read .*gone\.txt"):
    sources.read_text_dir(str(tmp_path))


def test_invalid_utf8_names_file_and_offset(tmp_path):
  (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
  with pytest.raises(sources.DataError, match=r"bad\.txt is not valid UTF-8: byte offset 3"):
    sources.read_text_dir(str(tmp_path))


def test_missing_text_field_names_line(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text here"}\n')
  with pytest.raises(sources.DataError, match=r"a\.jsonl:2: no text field 'text'.*\['body'\]"):
    sources.read_text_dir(str(tmp_path))


def test_unknown_domain_lists_available(corpus_dir):
  with pytest.raises(sources.DataError, match=r"Unknown domain 'medical'.*'code'.*'public'"):
    _pipe(_cfg(corpus_dir, domains=("medical",)))


def test_empty_after_dedup(corpus_dir, tmp_path):
  news_doc = corpus.read_text_split(corpus_dir, "news", "train")[0]["text"]
  (tmp_path / "copy.txt").write_text(news_doc.upper())  # same document after normalisation
  with pytest.raises(sources.DataError, match="no documents left"):
    corpus.add_domain(corpus_dir, "copycat", sources.read_text_dir(str(tmp_path)))


def test_unprepared_corpus(tmp_path):
  with pytest.raises(sources.DataError, match="prepare --out="):
    _pipe(_cfg(str(tmp_path)))


def test_data_config_refuses_unknown_keys():
  cd = ml_collections.ConfigDict({"path": "/x", "domains": ["news"], "seq_length": 128})
  with pytest.raises(KeyError, match="seq_length.*did you mean seq_len"):
    data_config(cd)
  cfg = data_config({"path": "/x", "domains": "news", "owner_dirs": {"legal": "/d"}})
  assert cfg.domains == ("news",) and cfg.owner_dirs == {"legal": "/d"}


def test_sentencepiece_decode_skips_ids_past_its_vocabulary(tmp_path):
  """A model padded past its tokenizer can emit ids the tokenizer lacks: they decode to nothing."""
  from flexolmo_jax.data import tokenizer as tokenizer_lib
  text = "\n".join(f"line {i}: the quick brown fox {i * 7}" for i in range(400))
  tok = tokenizer_lib.train_sentencepiece([text], str(tmp_path / "sp.model"), vocab_size=300)
  ids = tok.encode("the quick brown fox")
  assert tok.decode(ids + [tok.vocab_size, tok.vocab_size + 50]) == tok.decode(ids)
