r"""Shared base of the closed-domain expert configs (docs/method.md, section 3: coordinated training).

Each configs/<domain>_expert.py calls get_config(domain). The public model is `expert.public`:
a public training run (configs/public.py) or a converted OLMo-2 checkpoint.
"""

from flexolmo_jax.train_config import default_config


def get_config(domain: str):
  c = default_config()
  c.mode = "expert"
  c.workdir = f"runs/experts/{domain}"
  c.expert.update(dict(
      name=domain, public="runs/public", router_embeddings="", embed_batches=8,
      bias=True, bias_init=-0.5, top_k=2))
  c.model_overrides.update(dict(moe_backend="dense"))  # top-2 of 2: dense.
  c.data.path = "runs/data"
  c.data.seq_len = 128
  c.data.batch_size = 16
  # docs/method.md, section 3.5: peak 9e-4, with warmup scaled to the short run.
  c.optim.update(dict(lr=9e-4, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.0))
  c.loss.update(dict(z_loss=1e-5, router_z_loss=1e-3, load_balancing=0.0))
  c.steps = 100
  c.log_every = 20
  c.eval_every = 50
  c.eval_batches = 4
  c.checkpoint_every = 50
  return c
