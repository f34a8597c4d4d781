r"""Train and evaluate on a Cloud TPU VM or pod slice, restarting after preemption.

  python -m launch.tpu all --name=flex --zone=us-east5-a --accelerator_type=v5p-64 --spot \
      --repo=https://github.com/YOU/flexolmo_jax.git --bucket=my-bucket --config=configs/math_expert.py \
      --train_args="--config.expert.public=/mnt/my-bucket/public --config.data.path=/mnt/my-bucket/data" \
      --eval_args="--models=flex=/mnt/my-bucket/runs/math --data=/mnt/my-bucket/data --out=/mnt/my-bucket/eval"
  python -m launch.tpu all ... --dry_run      # print every command, run none

Actions: create (queued resource), install (clone + pip on every worker, mount the bucket),
train, eval, delete, and `all`: the watch loop. The loop reads the queued resource's state;
when ACTIVE it installs and runs the train command on all workers at once (one process per
host, `--distributed`); when the slice is preempted (SUSPENDED / FAILED, or gone) it deletes
and recreates it, reinstalls, and runs the same train command again, which resumes from the
workdir's last complete checkpoint (train.py restores it, data iterator included). The workdir
must therefore outlive the VMs: it lives in a GCS bucket mounted with gcsfuse at /mnt/<bucket>.
After training succeeds, the eval command (launch/sweep.py, spread over hosts) runs, then the
slice is deleted unless --keep.
"""

from __future__ import annotations

import shlex
import sys
from typing import Sequence

from absl import app, flags

from flexolmo_jax import cli
from launch.runner import Runner

FLAGS = flags.FLAGS
ACTIONS = ("create", "install", "train", "eval", "delete", "all")
GONE = ("SUSPENDED", "FAILED", "")  # Preempted spot slices end SUSPENDED; "" = no such resource.
REPO_DIR = "~/flexolmo_jax"
# gcsfuse from Google's apt repository (TPU VM images do not ship it).
GCSFUSE_INSTALL = (
    "(command -v gcsfuse >/dev/null || (echo 'deb https://packages.cloud.google.com/apt "
    "gcsfuse-'$(lsb_release -cs)' main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list && "
    "curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && "
    "sudo apt-get update -q && sudo apt-get install -yq gcsfuse))")


def define_flags() -> None:
  flags.DEFINE_string("name", None, "TPU node and queued-resource name.")
  flags.DEFINE_string("zone", None, "Zone, e.g. us-east5-a.")
  flags.DEFINE_string("project", None, "GCP project (default: gcloud's).")
  flags.DEFINE_string("accelerator_type", "v5p-8", "TPU type, e.g. v4-32, v5p-64, v5litepod-256.")
  flags.DEFINE_string("runtime_version", "v2-alpha-tpuv5", "TPU VM software version.")
  flags.DEFINE_bool("spot", False, "Spot (preemptible) capacity; the watch loop recreates it.")
  flags.DEFINE_string("repo", None, "Git URL of the flexolmo_jax repository to clone.")
  flags.DEFINE_string("branch", "main", "Branch or tag to check out.")
  flags.DEFINE_string("bucket", None, "GCS bucket mounted at /mnt/<bucket> on every worker.")
  flags.DEFINE_string("config", None, "Training config file (configs/*.py).")
  flags.DEFINE_string("workdir", None, "Run directory (default /mnt/<bucket>/runs/<name>).")
  flags.DEFINE_string("train_args", "", "More train.py arguments (--config.x=y ...).")
  flags.DEFINE_string("eval_args", "", "launch/sweep.py arguments; empty: no evaluation.")
  flags.DEFINE_integer("poll_seconds", 60, "Seconds between queued-resource state checks.")
  flags.DEFINE_integer("max_failures", 3, "Train failures on a healthy slice before giving up.")
  flags.DEFINE_bool("keep", False, "Keep the slice after evaluation.")
  flags.DEFINE_bool("dry_run", False, "Print every command instead of running it.")


class Tpu:
  """The gcloud commands for one queued resource / TPU node."""

  def __init__(self, name: str, zone: str, project: str | None = None):
    self.name, self.zone, self.project = name, zone, project

  def _where(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

  def create(self, accelerator_type: str, runtime_version: str, spot: bool) -> list[str]:
    return (["gcloud", "compute", "tpus", "queued-resources", "create", self.name,
             f"--node-id={self.name}", f"--accelerator-type={accelerator_type}",
             f"--runtime-version={runtime_version}"] + self._where()
            + (["--spot"] if spot else []))

  def state(self) -> list[str]:
    return (["gcloud", "compute", "tpus", "queued-resources", "describe", self.name]
            + self._where() + ["--format=value(state.state)"])

  def delete(self) -> list[str]:
    return (["gcloud", "compute", "tpus", "queued-resources", "delete", self.name]
            + self._where() + ["--force", "--quiet"])

  def ssh_all(self, command: str) -> list[str]:
    """`command` on every worker of the slice at once."""
    return (["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name] + self._where()
            + ["--worker=all", f"--command={command}"])


def install_command(repo: str, branch: str, bucket: str | None) -> str:
  steps = [f"(test -d {REPO_DIR} || git clone {shlex.quote(repo)} {REPO_DIR})",
           f"cd {REPO_DIR}", f"git fetch origin && git checkout {shlex.quote(branch)} && "
           f"git pull --ff-only origin {shlex.quote(branch)}",
           "pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"]
  if bucket:
    mount = f"/mnt/{bucket}"
    steps += [GCSFUSE_INSTALL, f"sudo mkdir -p {mount} && sudo chown $USER {mount}",
              f"(mountpoint -q {mount} || gcsfuse --implicit-dirs {bucket} {mount})"]
  return " && ".join(steps)


def train_command(config: str, workdir: str, extra: str) -> str:
  return (f"cd {REPO_DIR} && python -m flexolmo_jax.train --config={shlex.quote(config)} "
          f"--workdir={shlex.quote(workdir)} --distributed" + (f" {extra}" if extra else ""))


def eval_command(extra: str) -> str:
  return f"cd {REPO_DIR} && python -m launch.sweep --distributed {extra}"


def watch(runner: Runner, tpu: Tpu, *, create_cmd: Sequence[str], install: str, train: str,
          evaluate: str | None, poll_seconds: int, max_failures: int, keep: bool) -> int:
  """Keeps a slice alive until the train command succeeds, then evaluates; 0 on success."""
  installed, failures = False, 0
  while True:
    state = runner.query(tpu.state(), "state")
    if state in GONE:
      if state:
        print(f"{tpu.name} is {state} (preempted?): recreating it", flush=True)
        runner.run(tpu.delete())
      runner.run(create_cmd)
      installed = False
    elif state == "ACTIVE":
      if not installed:
        if runner.run(tpu.ssh_all(install)):
          runner.sleep(poll_seconds)
          continue
        installed = True
      if runner.run(tpu.ssh_all(train)) == 0:
        break
      if runner.query(tpu.state(), "state") == "ACTIVE":  # A failure, not a preemption.
        failures += 1
        if failures >= max_failures:
          print(f"training failed {failures} times on a healthy slice; giving up", flush=True)
          return 1
      continue  # Re-check the state at once: a preempted slice is recreated, training resumes.
    runner.sleep(poll_seconds)  # Provisioning / waiting for capacity.
  rc = runner.run(tpu.ssh_all(evaluate)) if evaluate else 0
  if not keep:
    runner.run(tpu.delete())
  return rc


def main(argv: Sequence[str]) -> int:
  if len(argv) != 2 or argv[1] not in ACTIONS:
    raise app.UsageError(f"usage: python -m launch.tpu {{{'|'.join(ACTIONS)}}} --name=... "
                         "--zone=... [flags]")
  action = argv[1]
  for required in ("name", "zone"):
    if not getattr(FLAGS, required):
      raise app.UsageError(f"--{required} is required")
  if action in ("install", "all") and not FLAGS.repo:
    raise app.UsageError("--repo (the git URL to clone on the workers) is required to install")
  if action in ("train", "all") and not FLAGS.config:
    raise app.UsageError("--config is required to train")
  workdir = FLAGS.workdir or (f"/mnt/{FLAGS.bucket}/runs/{FLAGS.name}" if FLAGS.bucket else None)
  if action in ("train", "all") and not workdir:
    raise app.UsageError("--workdir or --bucket is required: the run directory must outlive "
                         "preempted VMs")
  # A dry run walks the fresh-start path: no slice yet, then an ACTIVE one.
  runner = Runner(FLAGS.dry_run, dry_answers={"state": ["", "ACTIVE"]})
  tpu = Tpu(FLAGS.name, FLAGS.zone, FLAGS.project)
  create_cmd = tpu.create(FLAGS.accelerator_type, FLAGS.runtime_version, FLAGS.spot)
  install = install_command(FLAGS.repo, FLAGS.branch, FLAGS.bucket)
  evaluate = eval_command(FLAGS.eval_args) if FLAGS.eval_args else None
  if action == "create":
    return runner.run(create_cmd)
  if action == "install":
    return runner.run(tpu.ssh_all(install))
  if action == "train":
    return runner.run(tpu.ssh_all(train_command(FLAGS.config, workdir, FLAGS.train_args)))
  if action == "eval":
    if not evaluate:
      raise app.UsageError("--eval_args is required to evaluate")
    return runner.run(tpu.ssh_all(evaluate))
  if action == "delete":
    return runner.run(tpu.delete())
  return watch(runner, tpu, create_cmd=create_cmd, install=install,
               train=train_command(FLAGS.config, workdir, FLAGS.train_args), evaluate=evaluate,
               poll_seconds=FLAGS.poll_seconds, max_failures=FLAGS.max_failures, keep=FLAGS.keep)


if __name__ == "__main__":
  define_flags()
  cli.run(lambda argv: sys.exit(main(argv)))
