"""Hugging Face conversion: logit parity with transformers (float32, eager attention), round
trips through save_hf and the params artifact, both expert layouts, and refusals of bad input."""

import functools
import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flexolmo_jax import checkpoint
from flexolmo_jax import convert
from flexolmo_jax.model import Transformer
import tiny_hf

ATOL = 1e-4  # Max abs logit difference vs transformers; observed ~5e-6.
REPO = pathlib.Path(__file__).resolve().parents[1]

# name -> (moe, HF config overrides).
CASES = {
    "olmo2_dense": (False, {"head_dim": 32}),  # A head_dim that is not d_model // n_heads.
    "flexolmo_gqa_top2": (True, {}),
    "flexolmo_top_k_all": (True, {"num_experts_per_tok": 4}),
    # At eps 0.5 the post-FFN norm no longer divides out the routing weights' scale, so a
    # renormalised top-k or a softmax after top-k shows in the logits (docs/method.md, section 1).
    "flexolmo_large_eps": (True, {"rms_norm_eps": 0.5}),
    "flexolmo_norm_topk": (True, {"norm_topk_prob": True, "rms_norm_eps": 0.5}),
}
# Every back end on the two cases that stress routing; the other cases on the dense oracle
# (test_moe.py shows the back ends equal the oracle at every k, so this keeps the file fast).
MOE_PARITY = ([(name, backend) for name in ("flexolmo_gqa_top2", "flexolmo_large_eps")
               for backend in ("dense", "ragged", "blocked")]
              + [("flexolmo_top_k_all", "dense"), ("flexolmo_norm_topk", "dense")])


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
  """name -> (directory, HF model) for every case, each saved once with save_pretrained."""
  made = {}
  for seed, (name, (moe, overrides)) in enumerate(CASES.items()):
    path = tmp_path_factory.mktemp(name)
    made[name] = (path, tiny_hf.write_tiny_hf_checkpoint(path, moe=moe, seed=seed, **overrides))
  return made


@pytest.fixture(scope="module")
def tokens():
  return tiny_hf.random_tokens(vocab_size=128, batch=2, length=16)


@functools.partial(jax.jit, static_argnums=0)  # Static config: equal configs share one compile.
def _forward(config, params, tokens):
  return Transformer(config).apply({"params": params}, tokens)


def _logits(config, params, tokens):
  return np.asarray(_forward(config, params, jnp.asarray(tokens, jnp.int32)))


def _max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _assert_trees_equal(a, b):
  flat_a, flat_b = checkpoint.flatten(a), checkpoint.flatten(b)
  assert sorted(flat_a) == sorted(flat_b)
  for key in flat_a:
    assert flat_a[key].dtype == flat_b[key].dtype, key
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


# ----------------------------------------------------------------------------------------------
# Parity with transformers.


def test_dense_parity(hf_checkpoints, tokens):
  path, reference = hf_checkpoints["olmo2_dense"]
  config, params = convert.load_hf(path)
  assert not config.is_moe and (config.rope_theta, config.resolved_head_dim) == (10_000.0, 32)
  diff = _max_diff(_logits(config, params, tokens), tiny_hf.hf_logits(reference, tokens))
  assert diff < ATOL, diff


@pytest.mark.parametrize("name,backend", MOE_PARITY)
def test_moe_parity(hf_checkpoints, tokens, name, backend):
  path, reference = hf_checkpoints[name]
  config, params = convert.load_hf(path)
  hf = reference.config
  assert (config.num_experts, config.top_k, config.norm_topk_prob, config.n_kv_heads) == (
      hf.num_experts, hf.num_experts_per_tok, hf.norm_topk_prob, hf.num_key_value_heads)
  config = config.replace(moe_backend=backend)
  diff = _max_diff(_logits(config, params, tokens), tiny_hf.hf_logits(reference, tokens))
  assert diff < ATOL, diff


def test_large_eps_case_detects_wrong_renormalisation(hf_checkpoints, tokens):
  """The parity tests above have power: flipping top-k renormalisation moves logits by >> ATOL."""
  path, _ = hf_checkpoints["flexolmo_large_eps"]
  config, params = convert.load_hf(path)
  right = _logits(config, params, tokens)
  wrong = _logits(config.replace(norm_topk_prob=True), params, tokens)
  assert _max_diff(right, wrong) > 100 * ATOL


# ----------------------------------------------------------------------------------------------
# Layouts: sharded files, fused experts, dtypes, old config styles.


def test_sharded_checkpoint_loads_the_same(hf_checkpoints, tmp_path):
  path, reference = hf_checkpoints["flexolmo_gqa_top2"]
  reference.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  _assert_trees_equal(convert.load_hf(tmp_path)[1], convert.load_hf(path)[1])


def _fuse_experts(tensors, config):
  """Rewrites per-expert tensors into transformers' in-memory fused layout (gate rows first)."""
  fused = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
  for layer in range(config.n_layers):
    experts = lambda name, layer=layer: [
        tensors[f"model.layers.{layer}.mlp.experts.{e}.{name}.weight"]
        for e in range(config.num_experts)]
    gate_up = [np.concatenate(pair) for pair in zip(experts("gate_proj"), experts("up_proj"))]
    fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = np.stack(gate_up)
    fused[f"model.layers.{layer}.mlp.experts.down_proj"] = np.stack(experts("down_proj"))
  return fused


def test_fused_expert_layout_loads_the_same(hf_checkpoints, tmp_path):
  path, _ = hf_checkpoints["flexolmo_gqa_top2"]
  config, params = convert.load_hf(path)
  tensors = load_file(path / "model.safetensors")
  save_file(_fuse_experts(tensors, config), tmp_path / "model.safetensors",
            metadata={"format": "pt"})
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  _assert_trees_equal(convert.load_hf(tmp_path)[1], params)


def test_bfloat16_checkpoint(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top

  reference_bf16 = tiny_hf.random_hf_model(moe=True, seed=1).to(torch.bfloat16)
  reference_bf16.save_pretrained(tmp_path / "hf")
  config, params = convert.load_hf(tmp_path / "hf")
  assert config.param_dtype == "bfloat16" and params["embed"].dtype == jnp.bfloat16
  want = reference_bf16.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(params["embed"].astype(np.float32), want)
  config32, params32 = convert.load_hf(tmp_path / "hf", dtype="float32")
  assert config32.param_dtype == "float32" and params32["embed"].dtype == np.float32
  # Writing bfloat16 back gives bit-identical tensors to what transformers saved.
  convert.save_hf(config, params, tmp_path / "ours")
  theirs, ours = load_file(tmp_path / "hf" / "model.safetensors"), load_file(
      tmp_path / "ours" / "model.safetensors")
  assert sorted(theirs) == sorted(ours)
  for key in theirs:
    assert ours[key].dtype == theirs[key].dtype, key
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_old_style_config_fields():
  old = dict(model_type="flex_olmo", vocab_size=128, hidden_size=64, intermediate_size=96,
             num_hidden_layers=2, num_attention_heads=4, rope_theta=1234.0, rope_scaling=None,
             torch_dtype="bfloat16", num_experts=3, num_experts_per_tok=3, eos_token_id=[2, 5])
  config = convert.config_from_hf(old)
  assert (config.rope_theta, config.param_dtype, config.n_kv_heads) == (1234.0, "bfloat16", 4)
  assert (config.num_experts, config.top_k, config.eos_token_id) == (3, 3, 2)
  absent = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
  assert convert.config_from_hf(absent).rope_theta == 500_000.0
  assert convert.config_from_hf({**absent, "model_type": "olmo2"}).rope_theta == 10_000.0


# ----------------------------------------------------------------------------------------------
# save_hf and the artifact round trips.


@pytest.mark.parametrize("name", ["olmo2_dense", "flexolmo_gqa_top2"])
def test_save_hf_reloads_in_transformers(hf_checkpoints, tokens, tmp_path, name):
  path, reference = hf_checkpoints[name]
  config, params = convert.load_hf(path)
  convert.save_hf(config, params, tmp_path / "out")
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  assert written["model_type"] == ("flex_olmo" if config.is_moe else "olmo2")
  assert written["rope_parameters"] == {"rope_theta": config.rope_theta, "rope_type": "default"}
  assert written["rope_theta"] == config.rope_theta and written["dtype"] == "float32"
  reloaded = tiny_hf.load_reference(tmp_path / "out")
  assert type(reloaded) is type(reference)
  diff = _max_diff(tiny_hf.hf_logits(reloaded, tokens), tiny_hf.hf_logits(reference, tokens))
  assert diff == 0.0, diff
  _assert_trees_equal(convert.load_hf(tmp_path / "out")[1], params)


def test_sharded_save_hf(hf_checkpoints, tokens, tmp_path):
  path, reference = hf_checkpoints["flexolmo_gqa_top2"]
  config, params = convert.load_hf(path)
  convert.save_hf(config, params, tmp_path, max_shard_size="20KB", expert_names=list("pabc"))
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1 and all((tmp_path / s).stat().st_size <= 40_000 for s in shards)
  assert convert.load_hf_expert_names(tmp_path) == list("pabc")
  reloaded = tiny_hf.load_reference(tmp_path)
  assert _max_diff(tiny_hf.hf_logits(reloaded, tokens), tiny_hf.hf_logits(reference, tokens)) == 0
  _assert_trees_equal(convert.load_hf(tmp_path)[1], params)


def test_artifact_round_trip(hf_checkpoints, tmp_path):
  path, _ = hf_checkpoints["flexolmo_gqa_top2"]
  config, params = convert.load_hf(path)
  convert.save_hf(config, params, tmp_path / "hf", expert_names=["public", "a", "b", "c"])
  manifest = convert.hf_to_artifact(tmp_path / "hf", tmp_path / "artifact")
  assert manifest["kind"] == "merged" and manifest["source"] == f"hf:{tmp_path / 'hf'}"
  assert manifest["expert_names"] == ["public", "a", "b", "c"]
  assert manifest["fingerprint"] == checkpoint.fingerprint(params)
  loaded_config, loaded, _ = checkpoint.load_params_artifact(tmp_path / "artifact")
  assert loaded_config == config
  _assert_trees_equal(loaded, params)
  convert.artifact_to_hf(tmp_path / "artifact", tmp_path / "back")
  assert convert.load_hf_expert_names(tmp_path / "back") == ["public", "a", "b", "c"]
  _assert_trees_equal(convert.load_hf(tmp_path / "back")[1], params)


def test_command_line_both_directions(hf_checkpoints, tokens, tmp_path):
  path, reference = hf_checkpoints["olmo2_dense"]
  env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  run = lambda *args: subprocess.run([sys.executable, "-m", "flexolmo_jax.convert", *args],
                                     env=env, cwd=REPO, check=True, capture_output=True)
  run(f"--from_hf={path}", f"--out={tmp_path / 'artifact'}")
  assert checkpoint.read_manifest(tmp_path / "artifact")["kind"] == "public"
  run(f"--to_hf={tmp_path / 'artifact'}", f"--out={tmp_path / 'hf'}")
  reloaded = tiny_hf.load_reference(tmp_path / "hf")
  assert _max_diff(tiny_hf.hf_logits(reloaded, tokens), tiny_hf.hf_logits(reference, tokens)) == 0


def test_expert_bias_is_refused_unless_dropped(hf_checkpoints, tmp_path, caplog):
  path, _ = hf_checkpoints["flexolmo_gqa_top2"]
  config, params = convert.load_hf(path)
  config = config.replace(expert_bias=True)
  bias = np.zeros((config.n_layers, config.num_experts), np.float32)
  params = {**params, "layers": {**params["layers"], "mlp": {**params["layers"]["mlp"],
                                                              "expert_bias": bias}}}
  with pytest.raises(convert.HFCheckpointError, match="drop_expert_bias"):
    convert.save_hf(config, params, tmp_path / "refused")
  assert not (tmp_path / "refused").exists()
  with caplog.at_level(logging.WARNING):
    convert.save_hf(config, params, tmp_path / "zero", drop_expert_bias=True)  # min(0, 0) = 0.
    assert "differ" not in caplog.text
    bias[1, 2] = -0.5
    convert.save_hf(config, params, tmp_path / "negative", drop_expert_bias=True)
    assert "differ" in caplog.text
  _, reloaded = convert.load_hf(tmp_path / "negative")
  assert "expert_bias" not in reloaded["layers"]["mlp"]


# ----------------------------------------------------------------------------------------------
# Bad input.


def _copy_checkpoint(source, target):
  target.mkdir(parents=True, exist_ok=True)
  for item in source.iterdir():
    (target / item.name).write_bytes(item.read_bytes())
  return target


def test_other_architecture_is_refused(hf_checkpoints, tmp_path):
  path, _ = hf_checkpoints["olmo2_dense"]
  target = _copy_checkpoint(path, tmp_path)
  hf = json.loads((target / "config.json").read_text())
  (target / "config.json").write_text(json.dumps({**hf, "model_type": "llama"}))
  with pytest.raises(convert.HFCheckpointError, match="'llama'.*olmo2, flex_olmo"):
    convert.load_hf(target)


@pytest.mark.parametrize("field,value,match", [
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("attention_bias", True, "attention_bias"),
    ("hidden_act", "gelu", "'gelu'"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, "'yarn'"),
])
def test_unsupported_config_is_refused(field, value, match):
  hf = tiny_hf.hf_config(moe=True).to_dict()
  with pytest.raises(convert.HFCheckpointError, match=match):
    convert.config_from_hf({**hf, field: value})


def test_missing_shard_is_named(hf_checkpoints, tmp_path):
  path, reference = hf_checkpoints["flexolmo_gqa_top2"]
  reference.save_pretrained(tmp_path, max_shard_size="20KB")
  (tmp_path / "model-00002-of-00015.safetensors").unlink()
  with pytest.raises(FileNotFoundError,
                     match=r"model-00002-of-00015\.safetensors.*model\.safetensors\.index\.json"):
    convert.load_hf(tmp_path)


def test_missing_tensor_is_named_with_its_shape(hf_checkpoints, tmp_path):
  path, _ = hf_checkpoints["flexolmo_gqa_top2"]
  tensors = load_file(path / "model.safetensors")
  del tensors["model.layers.1.mlp.experts.3.down_proj.weight"]
  _copy_checkpoint(path, tmp_path)
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(convert.HFCheckpointError,
                     match=r"model\.layers\.1\.mlp\.experts\.3\.down_proj\.weight.*\[64, 96\]"):
    convert.load_hf(tmp_path)


def test_wrong_shape_is_named_with_both_shapes(hf_checkpoints, tmp_path):
  path, _ = hf_checkpoints["flexolmo_gqa_top2"]
  tensors = load_file(path / "model.safetensors")
  tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
  _copy_checkpoint(path, tmp_path)
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(convert.HFCheckpointError,
                     match=r"k_proj\.weight has shape \[64, 64\], expected \[32, 64\]"):
    convert.load_hf(tmp_path)


def test_save_hf_refuses_a_tree_that_does_not_fit_the_config(hf_checkpoints, tmp_path):
  path, _ = hf_checkpoints["flexolmo_gqa_top2"]
  config, params = convert.load_hf(path)
  with pytest.raises(convert.HFCheckpointError,
                     match=r"layers/mlp/\w+ has shape \(2, 4, .*expected \(2, 5, "):
    convert.save_hf(config.replace(num_experts=5), params, tmp_path / "out")
