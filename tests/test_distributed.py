"""Multi-host training: when jax.distributed is initialized, and a real two-process run on CPU
(4 devices each, one global mesh of 8) that checkpoints, resumes, and writes its files once."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from flexolmo_jax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_initialize_only_for_multi_process_launches():
  assert distributed.initialize_kwargs(False, {}) is None
  assert distributed.initialize_kwargs(True, {}) == {}  # --distributed: JAX detects the rest.
  assert distributed.initialize_kwargs(False, {"SLURM_NTASKS": "1"}) is None
  assert distributed.initialize_kwargs(False, {"SLURM_NTASKS": "4"}) == {}
  assert distributed.initialize_kwargs(False, {"OMPI_COMM_WORLD_SIZE": "2"}) == {}
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "1"}
  assert distributed.initialize_kwargs(False, env) == {
      "coordinator_address": "10.0.0.2:1234", "num_processes": 2, "process_id": 1}


def test_one_process_helpers_are_the_plain_ones():
  assert distributed.is_primary() and distributed.host_batch_size(8) == 8
  assert not distributed.initialize(False)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_hosts(corpus_dir, workdir, steps):
  port = _free_port()
  args = [sys.executable, "-m", "flexolmo_jax.train", "--config=configs/public.py",
          f"--workdir={workdir}", f"--config.data.path={corpus_dir}",
          "--config.model.vocab_size=512", "--config.model.d_model=32",
          "--config.model.n_layers=2", "--config.model.n_heads=2", "--config.model.n_kv_heads=2",
          "--config.model.ffn_hidden=64", "--config.data.seq_len=32", "--config.data.batch_size=8",
          f"--config.steps={steps}", "--config.log_every=1", "--config.eval_every=2",
          "--config.eval_batches=2", "--config.checkpoint_every=2", "--config.progress=false"]
  procs = []
  for i in range(2):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
    procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


@pytest.mark.slow
def test_two_process_training_resumes_exactly_and_writes_once(corpus_dir, tmp_path):
  _run_two_hosts(corpus_dir, tmp_path / "straight", 4)
  workdir = tmp_path / "run"
  _run_two_hosts(corpus_dir, workdir, 2)
  outs = _run_two_hosts(corpus_dir, workdir, 4)
  finals = []
  for out in outs:
    assert "resumed from step 2" in out
    final = json.loads(out.strip().splitlines()[-1])
    final.pop("tokens_per_sec")
    finals.append(final)
  assert finals[0] == finals[1]  # Every host computed the same global step.
  assert finals[0]["tokens"] == 8 * 32  # The global batch: 4 rows from each host.
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # Written by the primary host only.
  assert json.loads((workdir / "manifest.json").read_text())["step"] == 4
  # Each host resumed its own data position: steps 3-4 equal the uninterrupted run's.
  ref = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
  for got, want in zip(rows[3:], ref[3:]):
    assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"]
