r"""The math expert trained with DP-SGD (flexolmo_jax/dp.py); epsilon goes into its manifest.

  python -m flexolmo_jax.train --config=configs/math_expert_dp.py

Its router row starts as the public row (public data only) and is trained under DP-SGD with the
rest of the expert; a row embedded from the math data would be released unaccounted, so it is
refused. To start from the owner's proxy set (public documents) instead:
  python -m flexolmo_jax.router_tuning select --data=runs/data --domain=math --out=runs/proxies.json
  ... --config.expert.router_source=proxies --config.expert.router_proxies=runs/proxies.json
The secret noise key is kept in runs/experts/math_dp.secrets/ (config.secrets_dir).
"""

import ml_collections

from configs import expert_base


def get_config():
  c = expert_base.get_config("math")
  c.workdir = "runs/experts/math_dp"
  c.expert.router_source = "public"
  # clip_norm C bounds each sequence's gradient; noise std sigma * C on the summed gradient.
  c.dp = ml_collections.ConfigDict(dict(enabled=True, clip_norm=1.0, noise_multiplier=1.0,
                                        delta=1e-5))
  return c
