r"""The academic data owner's expert, trained against the frozen public model.

  python -m flexolmo_jax.train --config=configs/academic_expert.py
"""

from configs import expert_base


def get_config():
  return expert_base.get_config("academic")
