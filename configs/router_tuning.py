r"""Router tuning of a merged model (docs/method.md, section 5): router rows and biases only.

  # Each owner, once: pick public documents that look like its data (only their ids are shared).
  python -m flexolmo_jax.router_tuning select --data=runs/data --domain=math --out=runs/proxies.json
  # The model builder:
  python -m flexolmo_jax.router_tuning tune --config=configs/router_tuning.py
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.merged = "runs/merged"  # python -m flexolmo_jax.merge --out=runs/merged ...
  c.data = "runs/data"  # The corpus the proxy sets were selected on.
  c.proxies = "runs/proxies.json"
  c.out = "runs/merged_router_tuned"
  c.public_slice = 500  # Public training documents added to the proxy sets.
  # AdamW lr 2e-3, weight decay 0.1, 100 warmup steps, router z-loss 1e-3 (top-k = all experts).
  c.lr = 2e-3
  c.weight_decay = 0.1
  c.warmup_steps = 100
  c.router_z_loss = 1e-3
  c.clip_norm = 1.0
  c.steps = 300
  c.seq_len = 128
  c.batch_size = 16
  c.seed = 0
  c.log_every = 50
  c.checkpoint_every = 100
  c.workdir = ""  # Checkpoints, so a killed run resumes; default: OUT.run.
  return c
