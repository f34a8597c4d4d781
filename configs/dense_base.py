r"""A dense fine-tune of the public model on one domain: the paper's BTM and soup members
(docs/method.md, section 6) and the extraction study's "dense" row.

The public model with EVERY parameter trained on the domain, from a fresh optimizer; same steps,
batch and schedule as that domain's expert (configs/expert_base.py), so dense and expert rows
differ in what is trained, not in how long. The domain is the config argument, optionally
followed by the public model's config module when it is not configs/public.py:

  python -m flexolmo_jax.train --config=configs/dense_base.py:code --config.init_from=runs/public
  python -m flexolmo_jax.train --config=configs/dense_base.py:code,public_medium ...
"""

import importlib

from configs import expert_base


def get_config(arg: str = "math"):
  domain, _, public_config = arg.partition(",")
  # The public model's architecture: init_from must fit it.
  c = importlib.import_module(f"configs.{public_config or 'public'}").get_config()
  expert = expert_base.get_config(domain)
  c.workdir = f"runs/dense/{domain}"
  c.init_from = "runs/public"
  c.data.domains = (domain,)
  c.eval_domains = (domain, "public")
  c.optim = expert.optim
  c.loss.update(dict(z_loss=expert.loss.z_loss))
  for key in ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every"):
    c[key] = expert[key]
  return c
