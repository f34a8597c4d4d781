r"""The extraction study's memorisation setting: the closed-domain models see a small, known set of
math documents for many epochs, so that memorisation, and so extraction, can happen at this small
model size (it does for the dense fine-tune; measured in docs/privacy_study.md).

One preset per row of the study, all on the first SUBSET math training documents with the same
steps, batch and schedule (config string: dense | expert | dp):

  python -m flexolmo_jax.train --config=configs/privacy_memorise.py:dense
  python -m flexolmo_jax.train --config=configs/privacy_memorise.py:expert
  python -m flexolmo_jax.train --config=configs/privacy_memorise.py:dp
  python -m flexolmo_jax.privacy --data=runs/data --public=runs/public \
      --dense=runs/privacy/dense --expert=runs/privacy/expert --dp_expert=runs/privacy/dp \
      --train_docs=32 --generate=64 --out=runs/privacy/study

The public model (configs/public.py) never sees math. Paths: --config.data.path,
--config.init_from (dense) or --config.expert.public (expert, dp), --workdir.
"""

import ml_collections

from configs import expert_base, math_dense

SUBSET = 32  # Documents: about 4.5k tokens, 9 batches of 4 x 128 tokens per epoch.
STEPS = 300  # About 33 epochs over the subset.


def get_config(kind: str = "expert"):
  if kind == "dense":
    c = math_dense.get_config()
  elif kind in ("expert", "dp"):
    c = expert_base.get_config("math")
  else:
    raise ValueError(f"config string must be dense, expert or dp; got {kind!r}")
  c.workdir = f"runs/privacy/{kind}"
  c.data.train_subset = ml_collections.ConfigDict({"math": SUBSET})
  c.data.batch_size = 4
  c.steps = STEPS
  c.optim.warmup_steps = 30
  # The study's measured setting (docs/privacy_study.md): 3x the method's expert peak, taken
  # when configs/expert_base.py had it; kept so the study reruns as documented.
  c.optim.lr = 2.7e-3
  c.log_every = 50
  c.eval_every = STEPS
  c.eval_batches = 2
  c.checkpoint_every = STEPS
  if kind == "dp":
    # Same clipping and noise as configs/math_expert_dp.py; epsilon goes into the manifest.
    c.dp = ml_collections.ConfigDict(dict(enabled=True, clip_norm=1.0, noise_multiplier=1.0,
                                          delta=1e-5))
    c.expert.router_source = "public"  # Not the math data: that row would be unaccounted.
  return c
