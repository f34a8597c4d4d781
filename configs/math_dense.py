r"""The dense model fine-tuned on math: the extraction study's "dense" row (docs/method.md, section 6).

The public model with EVERY parameter trained on the math domain, from a fresh optimizer; same
steps, batch and schedule as the math expert (configs/expert_base.py), so the study's rows differ
in what is trained, not in how long.

  python -m flexolmo_jax.train --config=configs/math_dense.py --config.init_from=runs/public
"""

from configs import expert_base, public


def get_config():
  c = public.get_config()  # The public model's architecture: init_from must fit it.
  expert = expert_base.get_config("math")
  c.workdir = "runs/dense/math"
  c.init_from = "runs/public"
  c.data.domains = ("math",)
  c.eval_domains = ("math", "public")
  c.optim = expert.optim
  c.loss.update(dict(z_loss=expert.loss.z_loss))
  for key in ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every"):
    c[key] = expert[key]
  return c
