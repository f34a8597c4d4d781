"""FlexMix-mini data: offline corpus, tokenizers, grain input pipelines, tfds builder."""
