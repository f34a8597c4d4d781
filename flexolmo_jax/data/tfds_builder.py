"""A tfds builder for FlexMix-mini that writes array_record (no TensorFlow needed).

It reads a corpus prepared by `python -m flexolmo_jax.data prepare --out=CORPUS` (passed as the
manual dir); one builder config per domain, splits train / validation / test, features `text`
and `tokens` (int32, EOS-terminated). Build and read:

  builder = FlexmixMini(config="news", data_dir=DATA_DIR)
  builder.download_and_prepare(file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=CORPUS))
  source = tfds.data_source("flexmix_mini/news", data_dir=DATA_DIR, split="test")
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from flexolmo_jax.data import corpus


def prepare_tfds(corpus_dir: str, data_dir: str, domains=None) -> list[str]:
  """Builds the tfds version of `domains` (default: all built-in ones); returns their tfds names."""
  names = []
  for domain in domains or (corpus.PUBLIC,) + corpus.CLOSED_DOMAINS:
    builder = FlexmixMini(config=domain, data_dir=data_dir)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=corpus_dir))
    names.append(f"flexmix_mini/{domain}")
  return names


class FlexmixMini(tfds.core.GeneratorBasedBuilder):
  """FlexMix-mini: a public mix and six closed domains, read from a prepared corpus directory."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=d, description=corpus.SOURCE_NOTES[d])
                     for d in (corpus.PUBLIC,) + corpus.CLOSED_DOMAINS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Run `python -m flexolmo_jax.data prepare --out=DIR` and pass "
                                  "DIR as the manual dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        }),
        description="FlexMix-mini, built offline from installable public-domain/CC text.",
    )

  def _split_generators(self, dl_manager):
    root = str(dl_manager.manual_dir)
    return {split: self._generate_examples(root, split) for split in corpus.SPLITS}

  def _generate_examples(self, root, split):
    from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
    domain = self.builder_config.name
    rows = corpus.read_text_split(root, domain, split)
    reader = ArrayRecordReader(corpus.token_paths(root, [domain], split)[0])
    records = reader.read_all()
    reader.close()
    for row, record in zip(rows, records, strict=True):
      yield row["hash"], {"text": row["text"], "tokens": np.frombuffer(record, np.int32)}
