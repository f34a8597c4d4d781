"""Restoring expert artifacts straight onto their expert-parallel shards: the merged parameters
on a mesh with expert axis 4 equal the host merge, and each expert's slice lives on exactly the
devices that own its slot."""

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flexolmo_jax import checkpoint, experts, merge, runs
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import init_params
from flexolmo_jax.sharding import make_mesh

TINY = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
            rope_theta=10_000.0, pad_token_id=0, eos_token_id=1)
NAMES = ("math", "code", "news")


def _expert_run(workdir, public_params, public_fp, name, seed):
  """An expert training run in the trainer's layout: manifest, r_pub and one checkpoint."""
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=(2, TINY["n_layers"], TINY["d_model"])).astype(np.float32)
  expert = experts.upcycle_expert(public_params, rows[1], bias_init=-0.5)
  expert = {k: np.asarray(v) + 0.05 * rng.normal(size=v.shape).astype(np.float32)
            for k, v in expert.items()}
  manager = runs.checkpoint_manager(workdir, async_save=False)
  manager.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(expert)))
  manager.wait_until_finished()
  manager.close()
  public_row = np.full((TINY["n_layers"], TINY["d_model"]), 0.1, np.float32)  # Shared r_pub.
  runs.write_public_router(workdir, public_row)
  config = experts.moe_config(ModelConfig(**TINY), 1, top_k=2, with_bias=True, bias_init=-0.5)
  runs.write_manifest(workdir, {
      "kind": "expert", "name": name, "config": config.to_dict(), "step": 3,
      "public_fingerprint": public_fp,
      "public_router_fingerprint": checkpoint.fingerprint({"r": public_row})})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
  root = tmp_path_factory.mktemp("placement")
  config = ModelConfig(**TINY)
  params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
  manifest = checkpoint.save_params_artifact(root / "public", config, params, "public")
  for seed, name in enumerate(NAMES):
    _expert_run(root / name, params, manifest["fingerprint"], name, seed)
  return str(root / "public"), [(n, str(root / n)) for n in NAMES]


def test_experts_restored_onto_their_slots_equal_the_host_merge(artifacts):
  public, pairs = artifacts
  mesh = make_mesh({"expert": 4, "fsdp": 2})
  config, host, names = merge.assemble(public, pairs)
  config_m, placed, names_m = merge.assemble_on_mesh(public, pairs, mesh)
  assert (config_m, names_m) == (config, names) and config.num_experts == 4
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(host), jax.tree.leaves(placed)):
    np.testing.assert_array_equal(np.asarray(b), a, err_msg=jax.tree_util.keystr(path))

  expert_axis = mesh.axis_names.index("expert")
  for key in ("gate_proj", "down_proj", "router", "expert_bias"):
    stacked = placed["layers"]["mlp"][key]
    assert stacked.sharding.spec[1] == "expert"
    for j in range(4):
      owners = set(np.take(mesh.devices, j, axis=expert_axis).ravel())
      holders = {s.device for s in stacked.addressable_shards
                 if range(*s.index[1].indices(4)) == range(j, j + 1)}
      assert holders == owners, (key, j)  # Expert j on the 2 devices of slot j, nowhere else.
  # Dense weights keep the model's own sharding (embed over fsdp).
  assert placed["embed"].sharding.spec[1] == "fsdp"


def test_two_experts_per_slot_and_unsplit_experts(artifacts):
  public, pairs = artifacts
  _, host, _ = merge.assemble(public, pairs)
  for shape in ({"expert": 2, "fsdp": 4}, {"fsdp": 8}):
    _, placed, _ = merge.assemble_on_mesh(public, pairs, make_mesh(shape))
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(placed)):
      np.testing.assert_array_equal(np.asarray(b), a)


def test_opt_out_and_a_wrong_expert_are_refused_or_skipped(artifacts, tmp_path):
  public, pairs = artifacts
  mesh = make_mesh({"expert": 2, "fsdp": 4})
  config, placed, names = merge.assemble_on_mesh(public, pairs, mesh, opt_out=["code"],
                                                 keep_bias=False)
  assert names == ["public", "math", "news"] and "expert_bias" not in placed["layers"]["mlp"]
  _, host, _ = merge.assemble(public, pairs, opt_out=["code"], keep_bias=False)
  np.testing.assert_array_equal(np.asarray(placed["layers"]["mlp"]["up_proj"]),
                                host["layers"]["mlp"]["up_proj"])
  # An expert whose stored tree lacks a tensor is refused by name before anything is placed.
  bad = tmp_path / "bad"
  manager = runs.checkpoint_manager(bad, async_save=False)
  manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(
      {"router": np.zeros((2, 32), np.float32)})))
  manager.wait_until_finished()
  manager.close()
  for f in (runs.MANIFEST, runs.PUBLIC_ROUTER):
    (bad / f).write_bytes((pathlib.Path(pairs[0][1]) / f).read_bytes())
  with pytest.raises(merge.MergeError, match="expert 'math'.*gate_proj"):
    merge.assemble_on_mesh(public, [("math", str(bad))], mesh)
