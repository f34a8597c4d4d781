r"""The small public model, pretrained on FlexMix-mini's public mix on a CPU in a few minutes.

  python -m flexolmo_jax.data prepare --out=runs/data      # once
  python -m flexolmo_jax.train --config=configs/public.py --workdir=runs/public
"""

import ml_collections

from flexolmo_jax.config import ModelConfig
from flexolmo_jax.train_config import default_config


def get_config():
  c = default_config()
  c.mode = "public"
  c.workdir = "runs/public"
  c.model = ml_collections.ConfigDict(ModelConfig(
      vocab_size=8192, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_hidden=384,
      rope_theta=10_000.0, pad_token_id=0, eos_token_id=1, moe_backend="blocked").to_dict())
  c.data.path = "runs/data"
  c.data.domains = ("public",)
  c.data.seq_len = 128
  c.data.batch_size = 16
  # OLMo-2 recipe (docs/method.md, section 3.7), with warmup scaled to the short run.
  c.optim.update(dict(
      lr=3e-3, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.1, decay_embeddings=False))
  c.loss.update(dict(z_loss=1e-5, router_z_loss=0.0, load_balancing=0.0))
  c.steps = 300
  c.log_every = 20
  c.eval_every = 100
  c.eval_batches = 4
  c.checkpoint_every = 100
  return c
