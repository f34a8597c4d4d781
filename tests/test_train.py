"""Training: frozen public weights, trainable-only optimizer state, exact resume after SIGKILL,
1 vs 8 devices, the NaN guard, and bad input."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import killing
from flexolmo_jax import checkpoint, objective, partition, runs
from flexolmo_jax import config as C
from flexolmo_jax import train as T
from flexolmo_jax.data import DataError
from flexolmo_jax.manifest import Manifest
from flexolmo_jax.model import Transformer
from flexolmo_jax.train_config import to_dict, train_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                  rope_theta=10_000.0, pad_token_id=0, eos_token_id=1)


def _public_config(corpus_dir, **overrides):
  raw = dict(mode="public", model=TINY_MODEL,
             data=dict(path=corpus_dir, domains=("public",), seq_len=32, batch_size=8),
             optim=dict(lr=3e-3, warmup_steps=5, weight_decay=0.1), steps=40, log_every=1,
             eval_every=20, eval_batches=2, checkpoint_every=20, progress=False,
             async_checkpoint=False)
  raw.update(overrides)
  return train_config(raw)


def _expert_config(corpus_dir, public_dir, **overrides):
  raw = dict(mode="expert", expert=dict(name="math", public=str(public_dir), embed_batches=2),
             model_overrides=dict(moe_backend="dense"),
             data=dict(path=corpus_dir, seq_len=32, batch_size=8),
             optim=dict(lr=3e-3, warmup_steps=5), steps=30, log_every=1, eval_every=30,
             eval_batches=2, checkpoint_every=10, progress=False, async_checkpoint=False)
  raw.update(overrides)
  return train_config(raw)


def _metrics(workdir):
  """step -> metrics, the last record of each step winning (a resumed run re-logs steps)."""
  rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
  return {row["step"]: row for row in rows}


@pytest.fixture(scope="module")
def public_dir(corpus_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("public")
  T.train(_public_config(corpus_dir), str(workdir))
  return workdir


def test_public_pretraining_learns(public_dir):
  metrics = _metrics(public_dir)
  assert metrics[40]["loss"] < metrics[1]["loss"] - 0.5
  assert metrics[40]["val_loss/public"] < metrics[0]["val_loss/public"]
  config, params, manifest = runs.load_params(public_dir)
  assert manifest["kind"] == "public" and manifest["step"] == 40
  assert params["embed"].shape == (512, 32) and not config.is_moe


def test_expert_step_freezes_public_and_optimizes_only_the_expert(corpus_dir, public_dir):
  config = _expert_config(corpus_dir, public_dir)
  model_config, trainable, frozen, _ = T.setup(config)
  frozen_before = jax.tree.map(np.array, frozen)
  tx, schedule = objective.make_optimizer(config, trainable)
  opt_state = tx.init(trainable)
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  # AdamW moments for the trainable expert only: 2x its parameters (+ scalar step counters).
  assert size(trainable) < size(frozen) / 3
  assert 2 * size(trainable) <= size(opt_state) <= 2 * size(trainable) + 8
  step = jax.jit(objective.make_train_step(config, model_config, partition.EXPERT, tx, schedule))
  state = {"params": trainable, "opt_state": opt_state, "step": jnp.int32(0)}
  batches = iter(T.data_lib.make_pipeline(T._domain_data(config), "train"))
  for _ in range(3):
    state, metrics = step(state, frozen, {k: jnp.asarray(v) for k, v in next(batches).items()})
  assert np.isfinite(float(metrics["loss"]))
  for after, before in zip(jax.tree.leaves(frozen), jax.tree.leaves(frozen_before)):
    np.testing.assert_array_equal(np.asarray(after), before)  # Bit-identical.
  assert not np.array_equal(state["params"]["gate_proj"], trainable["gate_proj"])
  assert not np.array_equal(state["params"]["router"], trainable["router"])


def test_expert_training_beats_public_on_its_domain(corpus_dir, public_dir, tmp_path):
  T.train(_expert_config(corpus_dir, public_dir), str(tmp_path / "math"))
  metrics = _metrics(tmp_path / "math")
  # Step 0 evaluates the upcycled model, whose output equals the public model's exactly.
  assert metrics[30]["val_loss/math"] < metrics[0]["val_loss/math"] - 0.05
  config, expert, manifest = runs.load_params(tmp_path / "math")
  assert manifest["kind"] == "expert" and manifest["name"] == "math"
  assert sorted(expert) == ["down_proj", "expert_bias", "gate_proj", "router", "up_proj"]
  _, public_params, _ = runs.load_params(public_dir)
  assert manifest["public_fingerprint"] == checkpoint.fingerprint(public_params)


def test_expert_run_logs_routing_diagnostics_on_every_eval_domain(corpus_dir, public_dir,
                                                                  tmp_path):
  domains = ("math", "public", "code")
  T.train(_expert_config(corpus_dir, public_dir, steps=4, eval_every=2, checkpoint_every=4,
                         eval_domains=domains), str(tmp_path / "math"))
  metrics = _metrics(tmp_path / "math")
  for step in (0, 2, 4):
    for d in domains:
      for name in ("new_expert_prob", "topk_share", "row_cos"):
        per_layer = [metrics[step][f"diag/{d}/{name}/layer_{i}"] for i in range(2)]
        assert metrics[step][f"diag/{d}/{name}"] == pytest.approx(np.mean(per_layer))
      assert metrics[step][f"diag/{d}/topk_share"] == 1.0  # Top-2 of 2: always chosen.
      assert 0.0 < metrics[step][f"diag/{d}/new_expert_prob"] < 1.0
      # The row starts where it was initialised (cosine 0), then moves.
      assert (metrics[step][f"diag/{d}/row_cos"] == 0.0) == (step == 0)
  assert not any(k.startswith("diag/") for k in metrics[1])  # Only with evaluations.


def test_upcycled_model_equals_public_model(corpus_dir, public_dir):
  config = _expert_config(corpus_dir, public_dir, expert=dict(
      name="math", public=str(public_dir), embed_batches=1, bias=False))
  model_config, trainable, frozen, _ = T.setup(config)
  tokens = jnp.arange(64, dtype=jnp.int32).reshape(2, 32)
  full = partition.EXPERT.join(trainable, frozen)
  got = Transformer(model_config).apply({"params": full}, tokens)
  want = Transformer(model_config.replace(num_experts=0, expert_bias=False)).apply(
      {"params": frozen["public"]}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)  # Top-2 of 2 identical experts: weights sum to 1.


@pytest.mark.slow
def test_eight_devices_match_one(corpus_dir, tmp_path):
  results = {}
  for name, mesh in (("one", {"data": 1}), ("eight", {"data": 2, "fsdp": 4})):
    config = _public_config(corpus_dir, steps=4, eval_every=100, checkpoint_every=100, mesh=mesh)
    T.train(config, str(tmp_path / name))
    results[name] = _metrics(tmp_path / name)
  for step in range(1, 5):
    np.testing.assert_allclose(results["eight"][step]["loss"], results["one"][step]["loss"],
                               rtol=2e-5)


def _cli(workdir, corpus_dir, steps, extra=()):
  model = [f"--config.model.{k}={v}" for k, v in TINY_MODEL.items()]
  return [sys.executable, "-m", "flexolmo_jax.train", "--config=configs/public.py",
          f"--workdir={workdir}", f"--config.data.path={corpus_dir}", "--config.data.seq_len=32",
          "--config.data.batch_size=8", f"--config.steps={steps}", "--config.log_every=1",
          "--config.eval_every=1000", "--config.checkpoint_every=3", "--config.progress=False",
          *model, *extra]


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_uninterrupted_run(corpus_dir, tmp_path):
  # One device; a shared compilation cache so the second and third processes skip compiling.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  # 40 steps, killed from step 7 on: a tiny step takes milliseconds, and a run of 12 once
  # finished between two polls on a loaded machine.
  steps = 40
  subprocess.run(_cli(tmp_path / "straight", corpus_dir, steps), cwd=REPO, env=env, check=True,
                 capture_output=True)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cli(killed, corpus_dir, steps), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    path = killed / "metrics.jsonl"
    if path.exists() and max((json.loads(l)["step"] for l in path.read_text().splitlines() if l),
                             default=0) >= 7:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _metrics(killed) and max(_metrics(killed)) < steps, "the run finished before it was killed"
  subprocess.run(_cli(killed, corpus_dir, steps), cwd=REPO, env=env, check=True,
                 capture_output=True)
  want, got = _metrics(tmp_path / "straight"), _metrics(killed)
  for step in range(1, steps + 1):
    assert got[step]["loss"] == want[step]["loss"], f"step {step} differs after resume"


@pytest.mark.slow
def test_nan_stops_run_and_keeps_last_good_checkpoint(corpus_dir, tmp_path):
  config = _public_config(corpus_dir, steps=30, checkpoint_every=1, eval_every=100,
                          optim=dict(lr=1e12, warmup_steps=0, clip_norm=1e30))
  with pytest.raises(T.NonFiniteError, match="non-finite loss"):
    T.train(config, str(tmp_path))
  config_dir, params, manifest = runs.load_params(tmp_path)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  assert manifest["step"] < 30


def test_bad_input_is_refused_and_writes_nothing(corpus_dir, public_dir, tmp_path):
  with pytest.raises(KeyError, match=r"optim\.lr_peak.*did you mean lr"):
    train_config({"mode": "public", "model": TINY_MODEL, "data": {"path": corpus_dir},
                  "optim": {"lr_peak": 1.0}})
  with pytest.raises(KeyError, match=r"stepz.*did you mean steps"):
    train_config({"mode": "public", "model": TINY_MODEL, "data": {"path": corpus_dir},
                  "stepz": 3})
  workdir = tmp_path / "never"
  with pytest.raises(FileNotFoundError, match="no model at"):
    T.train(_expert_config(corpus_dir, tmp_path / "missing_public"), str(workdir))
  with pytest.raises(DataError, match="astrology"):
    T.train(_expert_config(corpus_dir, public_dir, expert=dict(name="astrology",
                                                                public=str(public_dir))),
            str(workdir))
  with pytest.raises(ValueError, match="vocab_size"):
    T.train(_public_config(corpus_dir, model={**TINY_MODEL, "vocab_size": 100}), str(workdir))
  assert not workdir.exists()


def test_public_checkpoint_that_does_not_fit_its_config_is_refused(public_dir):
  config, params, _ = runs.load_params(public_dir)
  params["layers"]["attn"]["q_proj"] = params["layers"]["attn"]["q_proj"][:, :, :8]
  with pytest.raises(ValueError, match=r"layers/attn/q_proj has shape \(2, 32, 8\).*\(2, 32, 32\)"):
    runs.check_shapes(config, params, public_dir)


def test_unknown_command_line_override_names_the_nearest_keys():
  from flexolmo_jax.train_config import check_override_keys  # pylint: disable=g-import-not-at-top
  check_override_keys(["--config.optim.lr=1", "--config.mesh.fsdp=2", "--workdir=x"])
  with pytest.raises(KeyError, match=r"config\.optim\.lr_peak \(did you mean lr"):
    check_override_keys(["--config.optim.lr_peak=1"])
  with pytest.raises(KeyError, match=r"config\.stepz \(did you mean steps"):
    check_override_keys(["--config.stepz=1"])


def test_resume_check_ignores_execution_settings_but_not_the_architecture(tmp_path):
  cfg = C.tiny(num_experts=2, top_k=2).to_dict()
  old = {"kind": "expert", "name": "math", "config": {k: v for k, v in cfg.items()
                                                      if k != "expert_parallel"}}
  (tmp_path / runs.MANIFEST).write_text(json.dumps(old))
  faster = {**old, "config": {**cfg, "moe_backend": "blocked", "expert_parallel": "allgather",
                              "remat": "full"}}
  runs.check_resumable(tmp_path, faster)  # A field added later, or a new back end: same run.
  with pytest.raises(ValueError, match="holds another run.*use a new --workdir"):
    runs.check_resumable(tmp_path, {**old, "config": {**cfg, "d_model": cfg["d_model"] * 2}})
  with pytest.raises(ValueError, match="name differs"):
    runs.check_resumable(tmp_path, {**faster, "name": "code"})


@pytest.mark.slow
def test_nan_guard_checks_the_parameters_before_a_save(corpus_dir, tmp_path):
  # lr overflows float32: step 1's loss and gradient are finite, the parameters after it are not.
  config = _public_config(corpus_dir, steps=3, checkpoint_every=1, eval_every=100,
                          optim=dict(lr=1e39, warmup_steps=0))
  with pytest.raises(T.NonFiniteError, match="non-finite parameters .* at step 1"):
    T.train(config, str(tmp_path))
  with pytest.raises(ValueError, match="no complete checkpoint"):
    runs.load_params(tmp_path)


def test_resume_refuses_changed_training_settings_naming_them(corpus_dir, tmp_path):
  config = _expert_config(corpus_dir, tmp_path / "public",
                          expert=dict(name="math", public=str(tmp_path / "public"),
                                      router_source="public"),
                          dp=dict(enabled=True, noise_multiplier=1.0))
  manifest = Manifest(
      kind="expert", name="math", config=C.tiny(num_experts=2).to_dict(),
      train_config=to_dict(config), data_manifest_hash="abc")
  runs.write_manifest(tmp_path, manifest)
  faster = to_dict(dataclasses.replace(config, mesh={"data": 2}, log_every=5, progress=True))
  runs.check_resumable(tmp_path, manifest.replace(train_config=faster))  # How it runs: allowed.
  noisier = to_dict(dataclasses.replace(config, dp=dataclasses.replace(config.dp,
                                                                         noise_multiplier=2.0)))
  with pytest.raises(ValueError, match=r"dp\.noise_multiplier 1\.0 -> 2\.0.*new --workdir"):
    runs.check_resumable(tmp_path, manifest.replace(train_config=noisier))
  changed = r"data_manifest_hash 'abc' -> 'def'; optim\.lr 0\.003 -> 0\.1"
  with pytest.raises(ValueError, match=changed):
    runs.check_resumable(tmp_path, manifest.replace(data_manifest_hash="def", train_config=to_dict(
        dataclasses.replace(config, optim=dataclasses.replace(config.optim, lr=0.1)))))


@pytest.mark.slow
def test_sigterm_saves_the_step_exits_zero_and_resumes_exactly(corpus_dir, tmp_path):
  config = _public_config(corpus_dir, steps=8, eval_every=100, checkpoint_every=100,
                          async_checkpoint=True)
  T.train(config, str(tmp_path / "straight"))
  status = killing.run_signalled_after(
      5, signal.SIGTERM, "import json, sys\nfrom flexolmo_jax import train as T\n"
      "from flexolmo_jax.train_config import train_config\n"
      "T.train(train_config(json.loads(sys.argv[1])), sys.argv[2])",
      json.dumps(to_dict(config)), str(tmp_path / "stopped"))
  assert status == 0
  manager = runs.checkpoint_manager(tmp_path / "stopped")
  assert manager.latest_step() == 5  # Saved at the step it was on.
  manager.close()
  T.train(config, str(tmp_path / "stopped"))
  assert killing.logged_steps(tmp_path / "stopped").count(5) == 1  # Nothing was redone.
  assert killing.losses(tmp_path / "stopped") == killing.losses(tmp_path / "straight")


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_step(corpus_dir, tmp_path, caplog):
  config = _public_config(corpus_dir, steps=6, eval_every=100, checkpoint_every=2)
  T.train(config, str(tmp_path))
  want = killing.losses(tmp_path)
  data = max((p for p in (tmp_path / "checkpoints" / "6" / "params").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)  # Zero 64 bytes inside the tensors.
  data.write_bytes(bytes(raw))
  T.train(config, str(tmp_path))
  assert "checkpoint step 6" in caplog.text and "falling back" in caplog.text
  assert killing.logged_steps(tmp_path).count(5) == 2  # Resumed from step 4, redid 5 and 6.
  assert killing.losses(tmp_path) == want
  assert (tmp_path / "damaged_checkpoints" / "6").is_dir()
  assert runs.load_params(tmp_path)[2]["step"] == 6
