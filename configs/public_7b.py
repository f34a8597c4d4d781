r"""OLMo-2 7B public pretraining on a TPU pod (the paper's anchor model; docs/method.md, section 3.7).

  python -m flexolmo_jax.train --config=configs/public_7b.py --workdir=gs://BUCKET/public_7b

Most users convert the released OLMo-2 7B instead (python -m flexolmo_jax.convert --from_hf=DIR
--out=DIR) and train experts against it; this config documents the recipe at full size.
"""

import ml_collections

from flexolmo_jax.config import olmo2_7b
from flexolmo_jax.train_config import default_config


def get_config():
  c = default_config()
  c.mode = "public"
  c.workdir = ""
  c.model = ml_collections.ConfigDict(olmo2_7b(remat="full").to_dict())
  c.data.path = "runs/data"
  c.data.domains = ("public",)
  c.data.seq_len = 4096
  c.data.batch_size = 1024
  c.optim.update(dict(
      lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1, decay_embeddings=False))
  c.loss.update(dict(z_loss=1e-5, router_z_loss=0.0, load_balancing=0.0))
  c.steps = 1_000_000
  c.grad_accum = 1
  c.mesh.update({"data": 1, "fsdp": -1})
  c.log_every = 10
  c.eval_every = 1000
  c.checkpoint_every = 1000
  return c
