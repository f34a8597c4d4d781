"""Input pipeline throughput on this machine: tokens/s and time to first batch.

  python -m benchmarks.bench_data --corpus=/tmp/fm [--batch_size=8 --seq_len=512 --steps=200]

Prepares the corpus first if `--corpus` does not hold one. The pipeline must produce tokens
faster than a training step consumes them; the printed tokens/s is the number to compare.
"""

import os
import time

from absl import app
from absl import flags

from flexolmo_jax.data import corpus
from flexolmo_jax.data import pipeline
from flexolmo_jax.data.config import DataConfig

_CORPUS = flags.DEFINE_string("corpus", "/tmp/fm", "Prepared corpus directory.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Batch size.")
_SEQ = flags.DEFINE_integer("seq_len", 512, "Sequence length.")
_STEPS = flags.DEFINE_integer("steps", 200, "Batches to time after the first.")
_WORKERS = flags.DEFINE_integer("num_workers", 0, "grain worker processes.")


def main(argv):
  del argv
  if not os.path.exists(os.path.join(_CORPUS.value, "manifest.json")):
    corpus.prepare(_CORPUS.value)
  domains = tuple(corpus.load_manifest(_CORPUS.value)["domains"])
  cfg = DataConfig(path=_CORPUS.value, domains=domains, batch_size=_BATCH.value,
                   seq_len=_SEQ.value, num_workers=_WORKERS.value)
  start = time.perf_counter()
  it = iter(pipeline.make_pipeline(cfg, "train", shard_index=0, shard_count=1))
  next(it)
  first = time.perf_counter() - start
  start = time.perf_counter()
  tokens = sum(next(it)["tokens"].size for _ in range(_STEPS.value))
  rate = tokens / (time.perf_counter() - start)
  print(f"domains: {', '.join(domains)}")
  print(f"batch {_BATCH.value} x seq {_SEQ.value}, workers {_WORKERS.value}")
  print(f"time to first batch: {first:.3f} s")
  print(f"pipeline throughput: {rate:,.0f} tokens/s ({rate / (_BATCH.value * _SEQ.value):,.1f} "
        "batches/s)")


if __name__ == "__main__":
  app.run(main)
