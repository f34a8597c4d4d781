r"""The math expert trained with DP-SGD (flexolmo_jax/dp.py); epsilon goes into its manifest.

  python -m flexolmo_jax.train --config=configs/math_expert_dp.py
"""

import ml_collections

from configs import expert_base


def get_config():
  c = expert_base.get_config("math")
  c.workdir = "runs/experts/math_dp"
  # clip_norm C bounds each sequence's gradient; noise std sigma * C on the summed gradient.
  c.dp = ml_collections.ConfigDict(dict(enabled=True, clip_norm=1.0, noise_multiplier=1.0,
                                        delta=1e-5))
  return c
