r"""Train (and evaluate) on GPUs: one node with N GPUs, or several nodes over ssh.

  # One node: one process drives every local GPU (no jax.distributed needed).
  python -m launch.gpu --config=configs/public_7b.py --workdir=/shared/runs/public
  # Several nodes: one process per node, rendezvous through JAX_COORDINATOR_ADDRESS (the
  # first host), JAX_NUM_PROCESSES and JAX_PROCESS_ID, read by flexolmo_jax/distributed.py.
  python -m launch.gpu --hosts=gpu-a,gpu-b --config=configs/public_7b.py \
      --workdir=/shared/runs/public --repo_dir=/shared/flexolmo_jax --install
  python -m launch.gpu ... --dry_run     # print every command, run none

The workdir (and, for several nodes, the repository) must sit on a filesystem every node
sees (NFS, Lustre, a mounted bucket). When the job fails (a node lost, an OOM kill) it is
started again, up to --max_restarts times: train.py resumes from the last complete checkpoint,
data iterator included. With --eval_args, launch/sweep.py runs after training on the same
hosts.
"""

from __future__ import annotations

import shlex
import sys
from typing import Sequence

from absl import app, flags

from flexolmo_jax import cli
from launch.runner import Runner

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_list("hosts", [], "Nodes to ssh to, first = coordinator; empty: this machine only.")
  flags.DEFINE_integer("port", 8476, "Coordinator port on the first host.")
  flags.DEFINE_string("repo_dir", ".", "The project checkout (the same path on every node).")
  flags.DEFINE_bool("install", False, "pip install the project's requirements with CUDA jax first.")
  flags.DEFINE_string("config", None, "Training config file (configs/*.py).")
  flags.DEFINE_string("workdir", None, "Run directory on a shared filesystem.")
  flags.DEFINE_string("train_args", "", "More train.py arguments (--config.x=y ...).")
  flags.DEFINE_string("eval_args", "", "launch/sweep.py arguments; empty: no evaluation.")
  flags.DEFINE_string("python", "python", "Python interpreter on the nodes.")
  flags.DEFINE_integer("max_restarts", 3, "Restarts (each resuming) after a failed run.")
  flags.DEFINE_bool("dry_run", False, "Print every command instead of running it.")


def install_command(python: str) -> str:
  return f"{python} -m pip install -q -r requirements.txt 'jax[cuda12]==0.10.2'"


def train_command(python: str, config: str, workdir: str, extra: str, distributed: bool) -> str:
  return (f"{python} -m flexolmo_jax.train --config={shlex.quote(config)} "
          f"--workdir={shlex.quote(workdir)}" + (" --distributed" if distributed else "")
          + (f" {extra}" if extra else ""))


def eval_command(python: str, extra: str, distributed: bool) -> str:
  return f"{python} -m launch.sweep" + (" --distributed" if distributed else "") + f" {extra}"


def per_host(hosts: Sequence[str], port: int, repo_dir: str, command: str, *,
             rendezvous: bool = True):
  """(argv, env) per process: local when there are no hosts, else ssh, with the rendezvous
  variables written into the remote command (ssh does not forward the environment)."""
  if not hosts:
    return [(["bash", "-c", f"cd {shlex.quote(repo_dir)} && {command}"], None)]
  out = []
  for i, host in enumerate(hosts):
    env = (f"JAX_COORDINATOR_ADDRESS={hosts[0]}:{port} JAX_NUM_PROCESSES={len(hosts)} "
           f"JAX_PROCESS_ID={i} " if rendezvous and len(hosts) > 1 else "")
    out.append((["ssh", host, f"cd {shlex.quote(repo_dir)} && {env}{command}"], None))
  return out


def run_job(runner: Runner, procs, max_restarts: int, what: str) -> int:
  """Runs one command per host together; on failure starts them all again (they resume)."""
  for attempt in range(max_restarts + 1):
    codes = runner.parallel(procs)
    if not any(codes):
      return 0
    print(f"{what} failed (exit codes {codes}); attempt {attempt + 1} of {max_restarts + 1}",
          flush=True)
  return 1


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.config or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  runner = Runner(FLAGS.dry_run)
  multi = len(FLAGS.hosts) > 1
  if FLAGS.install:
    if any(runner.parallel(per_host(FLAGS.hosts, FLAGS.port, FLAGS.repo_dir,
                                    install_command(FLAGS.python), rendezvous=False))):
      return 1
  train = train_command(FLAGS.python, FLAGS.config, FLAGS.workdir, FLAGS.train_args, multi)
  if run_job(runner, per_host(FLAGS.hosts, FLAGS.port, FLAGS.repo_dir, train),
             FLAGS.max_restarts, "training"):
    return 1
  if FLAGS.eval_args:
    evaluate = eval_command(FLAGS.python, FLAGS.eval_args, multi)
    return run_job(runner, per_host(FLAGS.hosts, FLAGS.port, FLAGS.repo_dir, evaluate), 0,
                   "evaluation")
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(lambda argv: sys.exit(main(argv)))
