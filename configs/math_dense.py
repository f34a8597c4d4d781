r"""The dense model fine-tuned on math: the extraction study's "dense" row (docs/method.md, section 6).

configs/dense_base.py for the math domain:

  python -m flexolmo_jax.train --config=configs/math_dense.py --config.init_from=runs/public
"""

from configs import dense_base


def get_config():
  return dense_base.get_config("math")
