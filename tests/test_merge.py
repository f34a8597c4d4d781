"""Merging: opt-out equals never merging (bit-identical), order independence, refusals, the
command line, sharded assembly, and Hugging Face export parity."""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flexolmo_jax import checkpoint, convert, merge, router_init, runs
from flexolmo_jax import train as T
from flexolmo_jax.model import Transformer, init_params
from flexolmo_jax.sharding import make_mesh
from flexolmo_jax.train_config import train_config

REPO = pathlib.Path(__file__).resolve().parents[1]
# A vocabulary that fits tiny_hf's conventions (pad/eos inside it) and the corpus tokenizer.
TINY_MODEL = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                  rope_theta=10_000.0, pad_token_id=0, eos_token_id=1)
DOMAINS = ("math", "code", "news")


def _expert_config(corpus_dir, public, name, embeddings, **expert):
  return train_config(dict(
      mode="expert", model_overrides=dict(moe_backend="dense"),
      expert=dict(name=name, public=str(public), router_embeddings=str(embeddings), **expert),
      data=dict(path=corpus_dir, seq_len=16, batch_size=4), optim=dict(lr=1e-2, warmup_steps=0),
      steps=2, log_every=1, eval_every=100, eval_batches=1, checkpoint_every=100,
      mesh=dict(data=1), progress=False, async_checkpoint=False))


def _public_artifact(path, seed):
  config = T.ModelConfig(**TINY_MODEL)
  params = jax.tree.map(np.asarray, init_params(config, jax.random.key(seed)))
  checkpoint.save_params_artifact(path, config, params, "public")
  return path


def _synthetic_expert(corpus_dir, public, name, embeddings, workdir, seed):
  """An expert run in the trainer's layout (setup, then a random step) without compiling it."""
  config = _expert_config(corpus_dir, public, name, embeddings)
  _, trainable, frozen, manifest = T.setup(config)
  rng = np.random.default_rng(seed)
  trainable = {k: np.asarray(v) + 0.05 * rng.normal(size=v.shape).astype(np.float32)
               for k, v in trainable.items()}
  manager = runs.checkpoint_manager(workdir, async_save=False)
  manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(trainable)))
  manager.wait_until_finished()
  manager.close()
  runs.write_public_router(workdir, frozen["public_router"])
  runs.write_manifest(workdir, manifest.replace(step=1))


@pytest.fixture(scope="module")
def setup(corpus_dir, tmp_path_factory):
  """A public artifact, three experts on it (math trained for 2 steps by the trainer, the others
  synthetic), and one expert on another public model."""
  root = tmp_path_factory.mktemp("merge")
  public = _public_artifact(root / "public", seed=0)
  rng = np.random.default_rng(0)
  rows = {d: rng.normal(size=(TINY_MODEL["d_model"],)) for d in ("public",) + DOMAINS}
  router_init.save_embeddings(str(root / "emb.npz"), rows)
  T.train(_expert_config(corpus_dir, public, "math", root / "emb.npz"), str(root / "math"))
  for seed, name in enumerate(DOMAINS[1:]):
    _synthetic_expert(corpus_dir, public, name, root / "emb.npz", root / name, seed)
  runs_ = {name: str(root / name) for name in DOMAINS}
  other = _public_artifact(root / "other_public", seed=1)
  _synthetic_expert(corpus_dir, other, "math", root / "emb.npz", root / "alien", seed=9)
  return {"root": root, "public": public, "experts": runs_, "alien": str(root / "alien")}


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens):
  return Transformer(config).apply({"params": params}, tokens)


TOKENS = jnp.asarray(np.random.default_rng(1).integers(2, 512, (2, 16)), jnp.int32)


def _pairs(setup, names):
  return [(n, setup["experts"][n]) for n in names]


def test_expert_run_stores_its_public_router_row(setup):
  manifest = checkpoint.read_manifest(setup["experts"]["math"])
  row = runs.load_public_router(setup["experts"]["math"], manifest)
  want = np.load(setup["root"] / "emb.npz")["public"]
  np.testing.assert_array_equal(row, np.broadcast_to(want.astype(np.float32), row.shape))


def test_merge_places_public_and_experts(setup):
  config, params, names = merge.assemble(setup["public"], _pairs(setup, DOMAINS))
  assert names == ["public", *DOMAINS]
  assert (config.num_experts, config.top_k, config.expert_bias) == (4, 2, True)
  _, public, _ = runs.load_params(setup["public"])
  mlp = params["layers"]["mlp"]
  np.testing.assert_array_equal(mlp["gate_proj"][:, 0], public["layers"]["mlp"]["gate_proj"])
  for j, name in enumerate(DOMAINS, 1):
    _, expert, _ = runs.load_params(setup["experts"][name])
    for key in ("gate_proj", "up_proj", "down_proj", "router", "expert_bias"):
      np.testing.assert_array_equal(mlp[key][:, j], expert[key], err_msg=f"{name}/{key}")
  np.testing.assert_array_equal(params["embed"], public["embed"])


def test_opting_out_equals_never_merging(setup):
  config, params, names = merge.assemble(setup["public"], _pairs(setup, DOMAINS))
  out_config, out_params, out_names = merge.opt_out(config, params, names, ["code"])
  direct_config, direct_params, direct_names = merge.assemble(
      setup["public"], _pairs(setup, ("math", "news")))
  at_load = merge.assemble(setup["public"], _pairs(setup, DOMAINS), opt_out=["code"])
  assert out_names == direct_names == at_load[2] == ["public", "math", "news"]
  assert out_config == direct_config == at_load[0]
  want = np.asarray(_forward(direct_config, direct_params, TOKENS))
  np.testing.assert_array_equal(np.asarray(_forward(out_config, out_params, TOKENS)), want)
  np.testing.assert_array_equal(np.asarray(_forward(at_load[0], at_load[1], TOKENS)), want)
  # Opting code out changes the output: the expert really took part.
  assert not np.array_equal(np.asarray(_forward(config, params, TOKENS)), want)


def test_merge_is_independent_of_expert_order(setup):
  config, params, names = merge.assemble(setup["public"], _pairs(setup, DOMAINS))
  order = ("news", "math", "code")
  config2, params2, names2 = merge.assemble(setup["public"], _pairs(setup, order))
  assert config2 == config
  perm = [names.index(n) for n in names2]
  for key, value in params["layers"]["mlp"].items():
    np.testing.assert_array_equal(params2["layers"]["mlp"][key], value[:, perm], err_msg=key)
  np.testing.assert_allclose(_forward(config2, params2, TOKENS), _forward(config, params, TOKENS),
                             rtol=1e-6, atol=1e-6)


def test_top_k_clamped_and_bias_dropped(setup):
  config, params, _ = merge.assemble(setup["public"], _pairs(setup, ("math",)), top_k=7,
                                     keep_bias=False)
  assert (config.num_experts, config.top_k, config.expert_bias) == (2, 2, False)
  assert "expert_bias" not in params["layers"]["mlp"]
  config, _, names = merge.opt_out(*merge.assemble(setup["public"], _pairs(setup, DOMAINS),
                                                   top_k=4), ["math", "code"])
  assert (config.num_experts, config.top_k, names) == (2, 2, ["public", "news"])


def test_refusals(setup, tmp_path):
  public, experts = setup["public"], setup["experts"]
  with pytest.raises(merge.MergeError, match=r"expert 'math' .*another public model.*"
                     r"public fingerprint is [0-9a-f]{64}, the public model's is [0-9a-f]{64}"):
    merge.assemble(public, [("math", setup["alien"])])
  with pytest.raises(merge.MergeError, match=r"\['math'\] given more than once"):
    merge.assemble(public, "math=" + experts["math"] + ",math=" + experts["code"])
  with pytest.raises(merge.MergeError, match="holds the expert 'code'"):
    merge.assemble(public, [("math", experts["code"])])
  with pytest.raises(merge.MergeError, match=r"cannot opt out \['poetry'\]"):
    merge.assemble(public, [("math", experts["math"])], opt_out=["poetry"])
  bare = tmp_path / "bare"
  (bare / "checkpoints").mkdir(parents=True)
  with pytest.raises(merge.MergeError, match="no manifest.json"):
    merge.assemble(public, [("math", str(bare))])
  # Another architecture (an expert whose manifest claims this public model's fingerprint).
  config = T.ModelConfig(**{**TINY_MODEL, "ffn_hidden": 96})
  fake = tmp_path / "fake_public"
  checkpoint.save_params_artifact(
      fake, config, jax.tree.map(np.asarray, init_params(config, jax.random.key(0))), "public")
  mismatched = tmp_path / "mismatched"
  shutil.copytree(experts["math"], mismatched)
  manifest = json.loads((mismatched / "manifest.json").read_text())
  manifest["public_fingerprint"] = checkpoint.read_manifest(fake)["fingerprint"]
  (mismatched / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(merge.MergeError, match=r"expert 'math' .*ffn_hidden=64 vs 96"):
    merge.assemble(fake, [("math", str(mismatched))])


@pytest.mark.slow
def test_sharded_assembly_matches_host(setup):
  mesh = make_mesh({"expert": 2, "fsdp": 2, "data": -1})
  config, host, _ = merge.assemble(setup["public"], _pairs(setup, ("math", "news", "code")))
  _, sharded, _ = merge.assemble(setup["public"], _pairs(setup, ("math", "news", "code")),
                                 mesh=mesh)
  gate = sharded["layers"]["mlp"]["gate_proj"]
  assert gate.sharding.mesh.shape["expert"] == 2 and len(gate.sharding.device_set) == 8
  for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(np.asarray(b), a)


@pytest.mark.slow
def test_command_line_merge_opt_out_and_hf_export(setup, tmp_path):
  tiny_hf = pytest.importorskip("tiny_hf")
  experts = ",".join(f"{n}={setup['experts'][n]}" for n in DOMAINS)
  base = [sys.executable, "-m", "flexolmo_jax.merge"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run(base + [f"--public={setup['public']}", f"--experts={experts}", "--top_k=4",
                         "--keep_bias=false", f"--out={tmp_path / 'merged'}"],
                 cwd=REPO, check=True, capture_output=True, env=env)
  subprocess.run(base + [f"--merged={tmp_path / 'merged'}", "--opt_out=code",
                         f"--out={tmp_path / 'no_code'}"],
                 cwd=REPO, check=True, capture_output=True, env=env)
  config, params, manifest = checkpoint.load_params_artifact(tmp_path / "no_code")
  assert manifest["kind"] == "merged" and manifest["expert_names"] == ["public", "math", "news"]
  assert manifest["bias"] == "dropped" and config.top_k == 3  # Requested 4, clamped to 3.
  assert sorted(manifest["experts"]) == ["math", "news"]
  direct = merge.assemble(setup["public"], _pairs(setup, ("math", "news")), top_k=4,
                          keep_bias=False)
  assert direct[0] == config
  np.testing.assert_array_equal(_forward(config, params, TOKENS),
                                _forward(direct[0], direct[1], TOKENS))

  convert.artifact_to_hf(tmp_path / "no_code", tmp_path / "hf")
  assert convert.load_hf_expert_names(tmp_path / "hf") == ["public", "math", "news"]
  reference = tiny_hf.load_reference(tmp_path / "hf")
  hf = tiny_hf.hf_logits(reference, np.asarray(TOKENS))
  ours = np.asarray(_forward(config, params, TOKENS))
  assert float(np.max(np.abs(hf - ours))) < 1e-4


@pytest.mark.slow
def test_command_line_refusal_names_the_expert(setup, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "flexolmo_jax.merge", f"--public={setup['public']}",
       f"--experts=math={setup['alien']}", f"--out={tmp_path / 'x'}"],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode != 0
  assert "expert 'math'" in result.stderr and "another public model" in result.stderr
  assert not (tmp_path / "x").exists()
