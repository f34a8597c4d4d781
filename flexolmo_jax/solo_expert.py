r"""The "no coordinated training" ablation (docs/method.md, section 6): an owner trains its FFN alone, as
a dense model (the public model with the FFN swapped for its own copy), on its own data only,
never seeing the public expert; the FFN is then merged as an expert like any other.

  python -m flexolmo_jax.solo_expert --config=configs/math_expert.py --workdir=runs/solo/math

Same config, setup (upcycled FFN, router row from the domain, bias at its initial value) and
run-directory layout as flexolmo_jax.train's expert mode, so flexolmo_jax.merge reads the result
unchanged; only the FFN is updated (partition.FFN_ONLY): the router row and bias keep their initial
values, since a dense model has no router to train them. Resumes exactly, like any run (fit.py).
"""

from __future__ import annotations

import dataclasses

from flexolmo_jax import experts, partition, runs
from flexolmo_jax import data as data_lib
from flexolmo_jax import train as train_lib
from flexolmo_jax.fit import fit
from flexolmo_jax.train_config import to_dict, train_config


def train_solo(config, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the owner's FFN alone as a dense model; writes an expert run at
  `workdir`; returns the last metrics (loss, and validation loss per evaluated domain)."""
  runs.require_local_workdir(workdir)
  if config.mode != "expert":
    raise ValueError("the solo ablation trains an owner's expert: use an expert config")
  model_config, trainable, frozen, manifest = train_lib.setup(config)
  dense_config = experts.dense_config(model_config)
  manifest = manifest.replace(ablation="solo", train_config=to_dict(config))
  runs.check_resumable(workdir, manifest)
  runs.write_public_router(workdir, frozen["public_router"])
  # A small dense run in one process, on one device as it always was.
  config = dataclasses.replace(config, mesh={"data": 1})
  data_cfg = config.data.replace(domains=(config.expert.name,))
  _, last = fit(config, workdir, dense_config, partition.FFN_ONLY, trainable, frozen,
                iter(data_lib.make_pipeline(data_cfg, "train")), manifest=manifest,
                eval_domains=(config.expert.name, "public"), label=f"solo {config.expert.name}")
  runs.write_manifest(workdir, manifest.replace(step=config.steps))
  return last


if __name__ == "__main__":
  train_lib.run_single_process(
      "the solo-expert ablation", lambda raw, workdir: train_solo(train_config(raw), workdir))
