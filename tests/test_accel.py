"""Mixed precision (bfloat16 compute, float32 master weights), profiling, and remote paths."""

import contextlib
import glob
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils.epath import testing as epath_testing

from flexolmo_jax import attention, checkpoint, convert, evaluate, objective, partition, paths
from flexolmo_jax import precision
from flexolmo_jax import runs
from flexolmo_jax import manifest as manifest_lib
from flexolmo_jax import config as C
from flexolmo_jax import train as T
from flexolmo_jax.manifest import Manifest
from flexolmo_jax.model import Transformer, init_params
from flexolmo_jax.train_config import train_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                  rope_theta=10_000.0, pad_token_id=0, eos_token_id=1)
# Over 50 steps of the tiny model below, bfloat16 compute stays within this absolute distance of
# the float32 loss at every step (measured: see docs/precision.md).
BF16_LOSS_TOLERANCE = 0.05


def _losses(dtype: str, steps: int = 50):
  """Per-step losses of a public run of a tiny model computing in `dtype` from float32 master
  weights, on a fixed batch stream; and the final state."""
  model_config = C.tiny(dtype=dtype)
  config = train_config(dict(mode="public", model=model_config.to_dict(), steps=steps,
                             data=dict(seq_len=32, batch_size=4),
                             optim=dict(lr=3e-3, warmup_steps=5)))
  params, _ = precision.apply(config, init_params(model_config, jax.random.key(0)), None)
  tx, schedule = objective.make_optimizer(config, params)
  step = objective.make_train_step(config, model_config, partition.PUBLIC, tx, schedule)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
  # A learnable stream: 8 fixed sequences, 4 per step, repeated.
  seqs = np.random.default_rng(0).integers(3, model_config.vocab_size, size=(8, 33)).astype(np.int32)
  rows = seqs[(np.arange(4)[None] + 4 * np.arange(steps)[:, None]) % 8]
  batches = dict(tokens=rows[..., :-1], targets=rows[..., 1:],
                 positions=np.broadcast_to(np.arange(32, dtype=np.int32), (steps, 4, 32)),
                 segment_ids=np.ones((steps, 4, 32), np.int32),
                 loss_mask=np.ones((steps, 4, 32), np.float32))
  run = jax.jit(lambda state, batches: jax.lax.scan(
      lambda s, b: (lambda out: (out[0], out[1]["ce"]))(step(s, None, b)), state, batches))
  state, losses = run(state, {k: jnp.asarray(v) for k, v in batches.items()})
  return np.asarray(losses), state


def test_bfloat16_training_follows_float32_losses():
  f32, _ = _losses("float32")
  bf16, state = _losses("bfloat16")
  assert f32[-1] < f32[0] - 1.0  # The run learns, so the comparison covers a moving loss.
  np.testing.assert_allclose(bf16, f32, atol=BF16_LOSS_TOLERANCE, rtol=0)
  # Master weights and AdamW moments stay float32 under bfloat16 compute.
  for leaf in jax.tree.leaves((state["params"], state["opt_state"])):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32


def test_precision_policy_casts_the_trained_tree_to_master_and_the_frozen_tree_to_storage():
  config = train_config(dict(mode="public", model=C.tiny().to_dict(), data={},
                              frozen_dtype="bfloat16"))
  trainable = {"w": np.ones(3, jnp.bfloat16), "n": np.arange(3, dtype=np.int32)}
  frozen = {"public": {"w": np.ones(3, np.float32)}}
  t, f = precision.apply(config, trainable, frozen)
  assert (t["w"].dtype, t["n"].dtype, f["public"]["w"].dtype) == (
      np.float32, np.int32, jnp.bfloat16)
  keep = train_config(dict(mode="public", model=C.tiny().to_dict(), data={}))
  assert precision.apply(keep, trainable, frozen)[1]["public"]["w"].dtype == np.float32


@pytest.mark.parametrize("bad", ["2", "3:1", "0:2", "a:b"])
def test_bad_profile_steps_are_refused(bad):
  with pytest.raises(ValueError, match="profile_steps"):
    train_config(dict(mode="public", model=C.tiny().to_dict(), data={}, profile_steps=bad))


@pytest.mark.slow  # A 3-step training run with evaluation and a checkpoint: ~12 s of CPU.
def test_profile_steps_leave_a_trace_in_the_workdir_and_master_weights_stay_float32(
    corpus_dir, tmp_path):
  config = train_config(dict(
      mode="public", model=dict(TINY_MODEL, dtype="bfloat16"),
      data=dict(path=corpus_dir, domains=("public",), seq_len=32, batch_size=8), steps=3,
      log_every=1, eval_every=3, eval_batches=1, checkpoint_every=3, progress=False,
      async_checkpoint=False, profile_steps="1:2"))
  T.train(config, str(tmp_path))
  traces = glob.glob(str(tmp_path / runs.PROFILE / "**" / "*.xplane.pb"), recursive=True)
  assert traces and all(os.path.getsize(t) > 0 for t in traces)
  _, params, _ = runs.load_params(tmp_path)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}


# ----------------------------------------------------------------------------- remote paths

@contextlib.contextmanager
def _fake_bucket(root):
  """gs://BUCKET/... served from root/BUCKET/... through epath's backend (no network)."""
  local = lambda p: str(p).replace("gs://", f"{root}/", 1)
  one = lambda fn, p, *a, **k: fn(local(p), *a, **k)
  two = lambda fn, p, dst, *a, **k: fn(local(p), local(dst), *a, **k)
  with epath_testing.mock_epath(open=one, exists=one, isdir=one, listdir=one, makedirs=one,
                                mkdir=one, remove=one, stat=one, rename=two, replace=two, copy=two):
    yield


def test_remote_training_workdir_is_refused_before_any_work(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = train_config(dict(mode="public", model=TINY_MODEL,
                             data=dict(path=str(tmp_path / "no_corpus"), domains=("public",))))
  with pytest.raises(ValueError, match=r"--workdir gs://bucket/run is a remote path.*flock"):
    T.train(config, "gs://bucket/run")
  assert not list(tmp_path.iterdir())  # No local "gs:" directory, nothing else either.


@pytest.mark.parametrize("module,args", [
    ("merge", ["--public={none}", "--experts=a={none}", "--out=gs://bucket/merged"]),
    ("convert", ["--from_hf={none}", "--out=gs://bucket/merged"]),
])
def test_remote_artifact_output_is_refused_before_any_work(module, args, tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", f"flexolmo_jax.{module}",
       *(a.format(none=tmp_path / "none") for a in args)],
      cwd=tmp_path, capture_output=True, text=True, timeout=120,
      env={**os.environ, "PYTHONPATH": str(REPO)})
  assert out.returncode != 0  # Each command's own error status.
  assert "gs://bucket/merged is a remote path" in out.stderr, out.stderr
  assert not list(tmp_path.iterdir())


def test_files_that_travel_with_a_model_are_copied_from_a_bucket(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "served/b/model").mkdir(parents=True)
  (tmp_path / "served/b/model/tokenizer.json").write_text('{"model": "bpe"}')
  with _fake_bucket(tmp_path / "served"):
    files = convert.carried_files("gs://b/model")
    checkpoint.save_params_artifact(tmp_path / "art", C.tiny(), {"w": np.ones(2, np.float32)},
                                    "public", files=files)
  assert list(files) == ["tokenizer.json"]
  assert (tmp_path / "art/tokenizer.json").read_text() == '{"model": "bpe"}'
  assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "served"]


def test_evaluation_results_and_manifests_are_written_through_the_path_library(tmp_path,
                                                                               monkeypatch):
  monkeypatch.chdir(tmp_path)
  bucket = tmp_path / "served"
  report = {"model": "m", "baseline": None, "split": "test", "experts": [],
            "allowed_experts": [], "tasks": {"perplexity": {"ppl": 1.5}}}
  with _fake_bucket(bucket):
    written = evaluate.write_results(report, "gs://b/eval")
    paths.path("gs://b/run").mkdir(parents=True)  # A bucket needs none; the fake does.
    manifest_lib.write("gs://b/run", Manifest(kind="public", config=C.tiny().to_dict()))
    back = manifest_lib.read("gs://b/run")
  assert written["json"] == "gs://b/eval/results.json"
  assert json.loads((bucket / "b/eval/results.json").read_text()) == report
  assert "| perplexity | ppl | 1.5000 |" in (bucket / "b/eval/results.md").read_text()
  assert back.kind == "public" and (bucket / "b/run/manifest.json").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]  # No "gs:" directory.


def test_paths_keep_remote_names_and_make_local_ones_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(paths.absolute("gs://b/x") / "m.json") == "gs://b/x/m.json"
  assert str(paths.absolute("rel")) == str(tmp_path / "rel")
  assert paths.is_remote("gs://b") and not paths.is_remote("/tmp/gs:")


# ----------------------------------------------------------------------------- default attention

def test_auto_attention_on_cpu_is_xla_within_one_block_and_chunked_above():
  assert C.tiny().attention_impl == "auto"
  assert attention.resolve("auto", "float32", "cpu", length=512) == "xla"
  assert attention.resolve("auto", "float32", "cpu", length=513) == "chunked"
  assert attention.resolve("auto", "float32", "cpu", length=64, block_size=32) == "chunked"
  assert attention.resolve("auto", "float32", "tpu", length=64) == "splash"
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 21)), jnp.int32)
  params = init_params(C.tiny(), jax.random.key(0))
  logits = lambda **kw: np.asarray(Transformer(C.tiny(**kw)).apply({"params": params}, tokens))
  # Bit-identical to the implementation auto stands for at this length and block.
  np.testing.assert_array_equal(logits(), logits(attention_impl="xla"))
  np.testing.assert_array_equal(logits(attention_block_size=8),
                                logits(attention_impl="chunked", attention_block_size=8))
