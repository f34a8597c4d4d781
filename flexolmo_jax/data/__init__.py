"""FlexMix-mini data: offline corpus, tokenizers, grain input pipelines, tfds builder.

Build the corpus with `python -m flexolmo_jax.data prepare --out=DIR`; read it with
`make_pipeline(DataConfig(path=DIR, domains=(...)), "train")`. See pipeline.py for the batch format.
"""

from flexolmo_jax.data.config import DataConfig, data_config, default_config
from flexolmo_jax.data.corpus import BuildOptions, add_domain, load_manifest, prepare
from flexolmo_jax.data.pipeline import (iterator_state_from_json, iterator_state_to_json,
                                        make_pipeline)
from flexolmo_jax.data.sources import DataError
from flexolmo_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BuildOptions", "DataConfig", "DataError", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer",
    "add_domain", "data_config", "default_config", "iterator_state_from_json",
    "iterator_state_to_json", "load_manifest", "load_tokenizer", "make_pipeline", "prepare",
]
