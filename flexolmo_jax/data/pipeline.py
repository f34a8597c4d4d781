"""The grain input pipeline: token shards -> host shard -> seeded shuffle -> pack -> batch.

Batches are dicts of numpy arrays, each [batch_size, seq_len]:
  tokens      int32    input token ids (0 = padding)
  targets     int32    the next token of the same document (every document ends with EOS)
  segment_ids int32    1, 2, ... per document within a row, 0 on padding
  positions   int32    position within the document, restarting at 0 at each document start (and
                       at the start of a row that continues a document split across rows)
  loss_mask   float32  1.0 where `targets` is a real next token, 0.0 on padding

Packing is concatenate-and-split (OLMo style): documents are concatenated and cut at seq_len; a cut
document continues at the start of a later row. Targets are formed per document BEFORE packing, so
no target ever crosses a document boundary and no token is lost at a cut.

Determinism and resumption: the order is a pure function of (config, seed, shard). Iterator state
is `it.get_state()` / `it.set_state(state)`; `iterator_state_to_json` / `iterator_state_from_json`
turn it into a JSON string to store next to an Orbax checkpoint (e.g. as an `ocp.args.JsonSave`
item), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import numpy as np

from flexolmo_jax.data import corpus
from flexolmo_jax.data import sources
from flexolmo_jax.data.config import DataConfig


def ensure_domains(cfg: DataConfig) -> None:
  """Adds any owner domain named in `cfg.domains` that the corpus does not hold yet; an unknown
  domain is an error that lists the available ones."""
  manifest = corpus.load_manifest(cfg.path)
  available = sorted(set(manifest["domains"]) | set(cfg.owner_dirs) | set(cfg.tfds_domains))
  for name in cfg.domains:
    if name in manifest["domains"]:
      continue
    if name in cfg.owner_dirs:
      spec = {"dir": cfg.owner_dirs[name], "text_field": cfg.text_field}
    elif name in cfg.tfds_domains:
      spec = {"tfds_name": cfg.tfds_domains[name], "tfds_data_dir": cfg.tfds_data_dir,
              "text_field": cfg.text_field}
    else:
      raise sources.DataError(f"Unknown domain {name!r}; available: {available}. Name an owner's "
                              "directory for it in owner_dirs (or a tfds dataset in tfds_domains).")
    corpus.add_domain(cfg.path, name, corpus.documents_from_spec(spec), seed=cfg.seed)


def documents(cfg: DataConfig, split: str) -> grain.MapDataset:
  """The token records (document ids + EOS, int32 bytes) of `split` for `cfg.domains`, in corpus
  order, each domain cut to its `train_subset` size on the train split."""
  paths = corpus.token_paths(cfg.path, cfg.domains, split)
  limits = [cfg.train_subset.get(d, 0) if split == "train" else 0 for d in cfg.domains]
  if not any(limits):  # One source over every file: the order (and iterator state) of old runs.
    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
  parts = [grain.MapDataset.source(grain.sources.ArrayRecordDataSource([path]))
           for path in paths]
  parts = [ds[:limit] if limit else ds for ds, limit in zip(parts, limits)]
  return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)


def _next_token_pairs(record: bytes) -> dict[str, np.ndarray]:
  ids = np.frombuffer(record, dtype=np.int32)
  return {"inputs": ids[:-1], "targets": ids[1:]}


def _to_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  segment_ids = packed["inputs_segment_ids"].astype(np.int32)
  return {
      "tokens": packed["inputs"].astype(np.int32),
      "targets": packed["targets"].astype(np.int32),
      "segment_ids": segment_ids,
      "positions": packed["inputs_positions"].astype(np.int32),
      "loss_mask": (segment_ids != 0).astype(np.float32),
  }


def _default_shard() -> tuple[int, int]:
  import jax  # pylint: disable=g-import-not-at-top  (only needed for the multi-host default)
  return jax.process_index(), jax.process_count()


def make_pipeline(cfg: DataConfig, split: str = "train", *, seed: int | None = None,
                  batch_size: int | None = None, seq_len: int | None = None,
                  shard_index: int | None = None, shard_count: int | None = None,
                  num_epochs: int | None | str = "config",
                  drop_remainder: bool = True) -> grain.IterDataset:
  """The batched dataset of `split` for `cfg.domains`; `iter(...)` it to get batches.

  Keyword arguments override the config. Evaluation passes drop_remainder=False so that a small
  validation split still yields its last, smaller batch. Each host reads only documents
  shard_index, shard_index + shard_count, ... (default: jax.process_index()/process_count()).
  """
  seed = cfg.seed if seed is None else seed
  batch_size = batch_size or cfg.batch_size
  seq_len = seq_len or cfg.seq_len
  num_epochs = cfg.num_epochs if num_epochs == "config" else num_epochs
  if shard_index is None or shard_count is None:
    shard_index, shard_count = _default_shard()
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count}).")
  ensure_domains(cfg)
  ds = documents(cfg, split)
  ds = ds[shard_index::shard_count]
  if len(ds) == 0:
    raise sources.DataError(f"Shard {shard_index} of {shard_count} of {list(cfg.domains)}/{split} "
                            f"holds no documents (under {cfg.path}).")
  if cfg.shuffle:
    ds = ds.shuffle(seed=seed)
  # repeat() after shuffle reshuffles every epoch with a seed derived from the epoch number.
  ds = ds.repeat(num_epochs) if num_epochs != 1 else ds
  ds = ds.map(_next_token_pairs).to_iter_dataset()
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len})
  ds = ds.batch(batch_size, drop_remainder=drop_remainder).map(_to_batch)
  if cfg.num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return ds


def iterator_state_to_json(it: grain.DatasetIterator) -> str:
  """The iterator's position as a JSON string, to save with a training checkpoint."""
  return json.dumps(_jsonable(it.get_state()), sort_keys=True)


def iterator_state_from_json(it: grain.DatasetIterator, state_json: str) -> None:
  """Moves a fresh iterator of the same pipeline to the position saved by iterator_state_to_json."""
  it.set_state(_from_jsonable(json.loads(state_json)))


# grain states are nested dicts/lists of ints, strings, and occasionally bytes or tuples; bytes are
# tagged so they survive the JSON round trip.
def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, bytes):
    return {"__bytes__": x.hex()}
  if isinstance(x, np.generic):
    return x.item()
  return x


def _from_jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    if set(x) == {"__bytes__"}:
      return bytes.fromhex(x["__bytes__"])
    return {k: _from_jsonable(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_jsonable(v) for v in x]
  return x

