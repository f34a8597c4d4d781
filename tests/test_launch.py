"""TPU and GPU launchers: the exact commands a dry run prints (running none of them), and the
watch loop's restart after preemption."""

import io
import pathlib
import subprocess
import sys

import pytest

from launch import gpu, runner, tpu

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = "gcloud compute tpus"


@pytest.fixture
def no_subprocess(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"a dry run started a process: {args}")
  for name in ("run", "Popen", "call", "check_call", "check_output"):
    monkeypatch.setattr(subprocess, name, refuse)


def _lines(out: io.StringIO) -> list[str]:
  return out.getvalue().strip().splitlines()


def test_tpu_watch_dry_run_prints_the_fresh_start(no_subprocess):
  out = io.StringIO()
  run = runner.Runner(True, out=out, dry_answers={"state": ["", "ACTIVE"]})
  node = tpu.Tpu("flex", "us-east5-a", "proj")
  rc = tpu.watch(run, node, create_cmd=node.create("v5p-64", "v2-alpha-tpuv5", True),
                 install=tpu.install_command("https://x/repo.git", "main", None),
                 train=tpu.train_command("configs/public.py", "/mnt/b/runs/flex", "--config.steps=9"),
                 evaluate=tpu.eval_command("--models=f=/mnt/b/runs/flex"), poll_seconds=60,
                 max_failures=3, keep=False)
  where = "--zone=us-east5-a --project=proj"
  describe = f"$ {TPU} queued-resources describe flex {where} '--format=value(state.state)'"
  assert rc == 0
  assert _lines(out) == [
      describe,
      f"$ {TPU} queued-resources create flex --node-id=flex --accelerator-type=v5p-64 "
      f"--runtime-version=v2-alpha-tpuv5 {where} --spot",
      describe,
      f"$ {TPU} tpu-vm ssh flex {where} --worker=all '--command=(test -d ~/flexolmo_jax || git "
      "clone https://x/repo.git ~/flexolmo_jax) && cd ~/flexolmo_jax && git fetch origin && git "
      "checkout main && git pull --ff-only origin main && pip install -q -r requirements.txt "
      "'\"'\"'jax[tpu]==0.10.2'\"'\"''",
      f"$ {TPU} tpu-vm ssh flex {where} --worker=all '--command=cd ~/flexolmo_jax && python -m "
      "flexolmo_jax.train --config=configs/public.py --workdir=/mnt/b/runs/flex --distributed "
      "--config.steps=9'",
      f"$ {TPU} tpu-vm ssh flex {where} --worker=all '--command=cd ~/flexolmo_jax && python -m "
      "launch.sweep --distributed --models=f=/mnt/b/runs/flex'",
      f"$ {TPU} queued-resources delete flex {where} --force --quiet",
  ]


class _Scripted(runner.Runner):
  """A dry runner whose train command fails while the slice is being preempted."""

  def __init__(self, train_codes):
    super().__init__(True, out=io.StringIO(),
                     dry_answers={"state": ["ACTIVE", "SUSPENDED", "SUSPENDED",
                                                    "WAITING_FOR_RESOURCES", "ACTIVE"]})
    self.train_codes = list(train_codes)

  def run(self, cmd, *, env=None, check=False):
    super().run(cmd, env=env)
    return self.train_codes.pop(0) if "flexolmo_jax.train" in cmd[-1] else 0


def test_tpu_watch_recreates_a_preempted_slice_and_resumes(no_subprocess):
  run = _Scripted([1, 0])  # Preempted mid-run, then the same command finishes (resuming).
  node = tpu.Tpu("flex", "z")
  rc = tpu.watch(run, node, create_cmd=node.create("v4-32", "rt", True), install="INSTALL",
                 train="TRAIN flexolmo_jax.train", evaluate=None, poll_seconds=1,
                 max_failures=1, keep=True)
  verbs = [line.split()[5] if "queued-resources" in line else line.split("--command=")[-1]
           for line in _lines(run.out)]
  assert rc == 0
  assert verbs == ["describe", "INSTALL", "TRAIN flexolmo_jax.train'", "describe",  # preempted
                   "describe", "delete", "create", "describe", "describe",  # provisioning
                   "INSTALL", "TRAIN flexolmo_jax.train'"]  # the same command: it resumes


def test_gpu_commands_single_and_multi_node(no_subprocess):
  one = gpu.per_host([], 8476, ".", gpu.train_command("python", "c.py", "/w", "", False))
  assert one == [(["bash", "-c", "cd . && python -m flexolmo_jax.train --config=c.py "
                   "--workdir=/w"], None)]
  two = gpu.per_host(["a", "b"], 9000, "/repo",
                     gpu.train_command("python", "c.py", "/w", "--config.steps=5", True))
  assert [cmd for cmd, _ in two] == [
      ["ssh", host, f"cd /repo && JAX_COORDINATOR_ADDRESS=a:9000 JAX_NUM_PROCESSES=2 "
       f"JAX_PROCESS_ID={i} python -m flexolmo_jax.train --config=c.py --workdir=/w "
       "--distributed --config.steps=5"] for i, host in enumerate("ab")]
  out = io.StringIO()
  assert gpu.run_job(runner.Runner(True, out=out), two, 2, "training") == 0
  assert _lines(out)[0].startswith("$ ssh a 'cd /repo && JAX_COORDINATOR_ADDRESS=a:9000")


def test_command_lines_dry_run():
  tpu_out = subprocess.run(
      [sys.executable, "-m", "launch.tpu", "train", "--name=n", "--zone=z", "--bucket=b",
       "--config=configs/public.py", "--dry_run"], cwd=REPO, capture_output=True, text=True,
      check=True).stdout
  assert tpu_out == (f"$ {TPU} tpu-vm ssh n --zone=z --worker=all '--command=cd ~/flexolmo_jax "
                     "&& python -m flexolmo_jax.train --config=configs/public.py "
                     "--workdir=/mnt/b/runs/n --distributed'\n")
  gpu_out = subprocess.run(
      [sys.executable, "-m", "launch.gpu", "--config=configs/public.py", "--workdir=/w",
       "--dry_run"], cwd=REPO, capture_output=True, text=True, check=True).stdout
  assert gpu_out == ("$ bash -c 'cd . && python -m flexolmo_jax.train "
                     "--config=configs/public.py --workdir=/w'\n")
  for missing, message in (("--repo=r", "must outlive"), ("--bucket=b", "--repo")):
    bad = subprocess.run([sys.executable, "-m", "launch.tpu", "all", "--name=n", "--zone=z",
                          "--config=c.py", missing, "--dry_run"], cwd=REPO, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and message in bad.stderr
