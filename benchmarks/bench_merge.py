"""Time to assemble a merged model from N expert checkpoints vs reading the same bytes from disk.

  python -m benchmarks.bench_merge [--experts=4 --d_model=512 --ffn_hidden=1536 --n_layers=8]
      [--dir=/tmp/bench_merge]

Writes a public params artifact and N expert runs in the trainer's layout (manifest.json,
public_router.npy, checkpoints/<step>/params), then times, in this order: reading every file
of those checkpoints (plain Python reads, 16 MiB chunks), restoring each with Orbax alone
(`runs.load_params`, the public fingerprint verified), and `merge.assemble` (the same restores
plus checks and stacking into preallocated arrays). All read from the page cache after the first
pass; assemble / restore is the cost of merging itself, restore / read that of Orbax.
"""

import os
import pathlib
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

from flexolmo_jax import checkpoint, experts, merge, runs
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import init_params

_N = flags.DEFINE_integer("experts", 4, "Expert checkpoints to merge.")
_D = flags.DEFINE_integer("d_model", 512, "Model width.")
_F = flags.DEFINE_integer("ffn_hidden", 1536, "FFN width.")
_L = flags.DEFINE_integer("n_layers", 8, "Layers.")
_DIR = flags.DEFINE_string("dir", "/tmp/bench_merge", "Scratch directory (replaced).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (best is reported).")


def _write(root: pathlib.Path, n: int) -> tuple[str, list[tuple[str, str]]]:
  config = ModelConfig(vocab_size=8192, d_model=_D.value, n_layers=_L.value, n_heads=8,
                       n_kv_heads=8, ffn_hidden=_F.value)
  public = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
  manifest = checkpoint.save_params_artifact(root / "public", config, public, "public")
  router = np.random.default_rng(0).normal(size=(config.n_layers, config.d_model))
  router = router.astype(np.float32)
  moe = experts.moe_config(config, 1, top_k=2, with_bias=True, bias_init=-0.5)
  pairs = []
  for j in range(n):
    name, workdir = f"e{j}", root / f"e{j}"
    expert = experts.upcycle_expert(public, router + j, bias_init=-0.5)
    expert = jax.tree.map(lambda x, j=j: np.asarray(x) + 0.01 * j, expert)
    manager = runs.checkpoint_manager(workdir, async_save=False)
    manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(expert)))
    manager.wait_until_finished()
    manager.close()
    runs.write_public_router(workdir, router)
    runs.write_manifest(workdir, {
        "kind": "expert", "name": name, "config": moe.to_dict(), "step": 1,
        "public_fingerprint": manifest["fingerprint"],
        "public_router_fingerprint": checkpoint.fingerprint({"r": router})})
    pairs.append((name, str(workdir)))
  return str(root / "public"), pairs


def _read_all(paths) -> int:
  total = 0
  for path in paths:
    for file in sorted(pathlib.Path(path).rglob("*")):
      if file.is_file():
        with open(file, "rb") as f:
          while chunk := f.read(16 << 20):
            total += len(chunk)
  return total


def _best(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = pathlib.Path(_DIR.value)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  public, pairs = _write(root, _N.value)
  paths = [os.path.join(public, "params")] + [os.path.join(p, "checkpoints") for _, p in pairs]
  nbytes = _read_all(paths)
  read_s = _best(lambda: _read_all(paths), _REPEATS.value)
  assemble_s = _best(lambda: merge.assemble(public, pairs), _REPEATS.value)
  # The same checkpoints restored by Orbax alone, nothing stacked: what assembly cannot beat.
  restore_s = _best(lambda: [runs.load_params(p) for p in [public] + [p for _, p in pairs]],
                    _REPEATS.value)
  config, params, names = merge.assemble(public, pairs)
  merged_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  print(f"{len(names) - 1} experts + public: {nbytes / 2**20:.0f} MiB on disk, merged model "
        f"{merged_bytes / 2**20:.0f} MiB ({config.num_experts} experts, d {config.d_model}, "
        f"ffn {config.ffn_hidden}, {config.n_layers} layers)")
  print(f"read the bytes:              {read_s:6.3f} s  ({nbytes / 2**30 / read_s:.2f} GiB/s)")
  print(f"Orbax restore only:          {restore_s:6.3f} s  ({restore_s / read_s:.2f}x read)")
  print(f"merge.assemble:              {assemble_s:6.3f} s  ({assemble_s / read_s:.2f}x read, "
        f"{assemble_s / restore_s:.2f}x restore)")


if __name__ == "__main__":
  app.run(main)
