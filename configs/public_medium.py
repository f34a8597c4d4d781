r"""The medium tier's public model (`bash launch/small_demo.sh --scale=medium`): wider than
configs/public.py and trained longer, on the same FlexMix-mini public mix.

  python -m flexolmo_jax.data prepare --out=runs/data      # once
  python -m flexolmo_jax.train --config=configs/public_medium.py --workdir=runs/public
"""

import ml_collections

from configs import public
from flexolmo_jax.config import ModelConfig


def get_config():
  c = public.get_config()
  c.model = ml_collections.ConfigDict(ModelConfig(
      vocab_size=8192, d_model=192, n_layers=4, n_heads=6, n_kv_heads=6, ffn_hidden=512,
      rope_theta=10_000.0, pad_token_id=0, eos_token_id=1, moe_backend="blocked").to_dict())
  # OLMo-2 recipe (docs/method.md, section 3.7), as configs/public.py; 500 steps of 16 x 128
  # tokens are about 1.5 epochs of the public train split (docs/reproduction.md, the budget).
  c.steps = 500
  c.eval_every = 250
  c.checkpoint_every = 250
  return c
