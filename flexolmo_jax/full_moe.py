r"""The unrestricted-MoE upper reference (docs/research/full_moe.md): a merged FlexOlmo model whose
every parameter (all experts' FFNs, all router rows and biases, attention, embeddings) is trained
jointly on every domain's data, as if one party held all of it. FlexOlmo's owners may not do
this; the paper reports it as the reference a data-sharing MoE would reach.

  python -m flexolmo_jax.merge --public=runs/public --experts=math=runs/experts/math,... \
      --out=runs/research/full_moe/merged
  python -m flexolmo_jax.full_moe --config=configs/full_moe.py \
      --config.init_from=runs/research/full_moe/merged --workdir=runs/research/full_moe/run

The training core already allows it: partition.PUBLIC trains the whole tree and the objective
adds the router z-loss and load balancing for any MoE; this module is only the setup (the MoE
from `config.init_from`, every domain's data). The result is a run directory that
runs.load_params reads like any model.
"""

from __future__ import annotations


import jax
import numpy as np

from flexolmo_jax import checkpoint, partition, runs
from flexolmo_jax import data as data_lib
from flexolmo_jax import train as train_lib
from flexolmo_jax.fit import fit
from flexolmo_jax.manifest import Manifest
from flexolmo_jax.train_config import to_dict, train_config


def train_full_moe(raw: dict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) every parameter of the MoE at raw["init_from"] on raw's data domains;
  returns the last metrics."""
  runs.require_local_workdir(workdir)
  if not raw.get("init_from"):
    raise ValueError("config.init_from must name a merged model (python -m flexolmo_jax.merge "
                     "--out=DIR); the unrestricted MoE starts from it")
  model_config, params, source = runs.load_params(raw["init_from"])
  if not model_config.is_moe:
    raise ValueError(f"config.init_from={raw['init_from']} holds a dense model; the unrestricted "
                     "MoE starts from a merged FlexOlmo model (python -m flexolmo_jax.merge)")
  config = train_config({**raw, "mode": "public", "model": model_config.to_dict()})
  data_lib.pipeline.ensure_domains(config.data)
  manifest = Manifest(
      kind="merged", config=model_config.to_dict(), init_from=str(config.init_from),
      init_fingerprint=checkpoint.fingerprint(params), expert_names=source.get("expert_names"),
      train_config=to_dict(config), versions=checkpoint.library_versions(),
      **train_lib._tokenizer_check(model_config, config.data.path))  # pylint: disable=protected-access
  runs.check_resumable(workdir, manifest)
  params = jax.tree.map(lambda x: np.asarray(x, model_config.param_dtype), params)
  _, last = fit(config, workdir, model_config, partition.PUBLIC, params, None,
                iter(data_lib.make_pipeline(config.data, "train")), manifest=manifest,
                eval_domains=config.data.domains, label="unrestricted moe")
  runs.write_manifest(workdir, manifest.replace(step=config.steps))
  return last


if __name__ == "__main__":
  train_lib.run_single_process("the unrestricted-MoE reference", train_full_moe)
