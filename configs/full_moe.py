r"""The unrestricted-MoE upper reference: a merged FlexOlmo model, every parameter trained on every
domain's data (flexolmo_jax/full_moe.py; docs/research/full_moe.md).

  python -m flexolmo_jax.full_moe --config=configs/full_moe.py \
      --config.init_from=runs/research/full_moe/merged --workdir=runs/research/full_moe/run
"""

from flexolmo_jax.data import corpus
from flexolmo_jax.train_config import default_config


def get_config():
  c = default_config()
  c.mode = "public"  # Every parameter trains (partition.PUBLIC).
  c.workdir = "runs/research/full_moe/run"
  c.init_from = "runs/research/full_moe/merged"
  c.data.path = "runs/data"
  c.data.domains = ("public",) + corpus.CLOSED_DOMAINS  # Sampled in proportion to their size.
  c.data.seq_len = 128
  c.data.batch_size = 16
  # The method's expert recipe (docs/method.md, section 3, item 5) on the whole model, plus the
  # usual MoE load-balancing loss (OLMoE's 0.01): unlike expert training, nothing here keeps the
  # experts apart, so without it one expert can take every token.
  c.optim.update(dict(lr=9e-4, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.0))
  c.loss.update(dict(z_loss=1e-5, router_z_loss=1e-3, load_balancing=1e-2))
  c.steps = 200
  c.log_every = 20
  c.eval_every = 100
  c.eval_batches = 4
  c.checkpoint_every = 100
  return c
