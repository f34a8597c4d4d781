"""Params artifacts: exact round trip, stable fingerprints, atomic writes, refusals; manifest
versions; the run-directory lock; training-state checksums and the fallback they drive."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from flexolmo_jax import checkpoint, runs, train_state
from flexolmo_jax import config as config_lib
from flexolmo_jax import manifest as manifest_lib


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"embed": rng.normal(size=(8, 4)).astype(np.float32),
          "layers": {"w": rng.normal(size=(2, 4, 3)).astype(jnp.bfloat16)}}


def test_round_trip_is_exact(tmp_path):
  config, params = config_lib.tiny(), _tree()
  manifest = checkpoint.save_params_artifact(tmp_path / "a", config, params, "public",
                                             extra_manifest={"source": "test"})
  loaded_config, loaded, loaded_manifest = checkpoint.load_params_artifact(tmp_path / "a")
  assert loaded_config == config and loaded_manifest == manifest
  assert manifest["source"] == "test" and manifest["fingerprint"] == checkpoint.fingerprint(params)
  for key, value in checkpoint.flatten(params).items():
    got = checkpoint.flatten(loaded)[key]
    assert got.dtype == value.dtype
    np.testing.assert_array_equal(got, value)


def test_fingerprint_depends_on_values_names_and_dtypes():
  base = checkpoint.fingerprint(_tree())
  assert checkpoint.fingerprint(_tree()) == base
  assert checkpoint.fingerprint(_tree(seed=1)) != base
  renamed = {"embedding": _tree()["embed"], "layers": _tree()["layers"]}
  assert checkpoint.fingerprint(renamed) != base
  recast = {**_tree(), "embed": _tree()["embed"].astype(np.float64)}
  assert checkpoint.fingerprint(recast) != base


def test_existing_artifact_is_never_overwritten(tmp_path):
  checkpoint.save_params_artifact(tmp_path / "a", config_lib.tiny(), _tree(), "public")
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    checkpoint.save_params_artifact(tmp_path / "a", config_lib.tiny(), _tree(1), "public")
  assert [p.name for p in tmp_path.iterdir()] == ["a"]  # No temporary directory left behind.


def test_incomplete_directory_is_refused(tmp_path):
  checkpoint.save_params_artifact(tmp_path / "a", config_lib.tiny(), _tree(), "public")
  (tmp_path / "a" / "manifest.json").unlink()
  with pytest.raises(ValueError, match="incomplete"):
    checkpoint.load_params_artifact(tmp_path / "a")


def test_modified_artifact_is_refused(tmp_path):
  checkpoint.save_params_artifact(tmp_path / "a", config_lib.tiny(), _tree(), "public")
  manifest_path = tmp_path / "a" / "manifest.json"
  manifest = json.loads(manifest_path.read_text())
  manifest_path.write_text(json.dumps({**manifest, "fingerprint": "0" * 64}))
  with pytest.raises(ValueError, match="does not match"):
    checkpoint.load_params_artifact(tmp_path / "a")


def test_unknown_kind_is_refused(tmp_path):
  with pytest.raises(ValueError, match="kind"):
    checkpoint.save_params_artifact(tmp_path / "a", config_lib.tiny(), _tree(), "shared")


def test_manifest_versions_today_and_unknown(tmp_path):
  """A manifest without a version (written before the field) reads as version 1 and keeps every
  key through a read and a write; an unknown version is refused, naming it and the fix."""
  old = {"kind": "expert", "config": {"d_model": 8}, "name": "math", "expert_names": ["a"],
         "written_by": "a later tool"}
  (tmp_path / manifest_lib.FILE).write_text(json.dumps(old))
  read = manifest_lib.read(tmp_path)
  assert read.version == 1 and read.name == "math" and read.expert_names == ["a"]
  assert read.extra == {"written_by": "a later tool"}
  manifest_lib.write(tmp_path, read.replace(step=3))
  assert json.loads((tmp_path / manifest_lib.FILE).read_text()) == {**old, "version": 1, "step": 3}
  (tmp_path / manifest_lib.FILE).write_text(json.dumps({**old, "version": 99}))
  with pytest.raises(ValueError, match="manifest version 99 is not one this flexolmo_jax reads"):
    checkpoint.read_manifest(tmp_path)


def test_a_locked_run_directory_refuses_a_second_run_until_its_holder_dies(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom flexolmo_jax import runs\n"
       "with runs.locked(sys.argv[1]):\n  print('locked', flush=True)\n  time.sleep(600)",
       str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(ValueError, match=rf"in use by another run \(pid {holder.pid} on .*"
                                         "use another --workdir"):
      with runs.locked(tmp_path):
        pass
  finally:
    holder.kill()
    holder.wait()
  with runs.locked(tmp_path):  # The dead holder's lock file is taken over.
    assert (tmp_path / runs.LOCK).read_text().startswith(f"pid {os.getpid()} on ")


def test_training_state_checksums_catch_changed_or_swapped_values_under_any_sharding():
  x = jnp.arange(16, dtype=jnp.float32).reshape(8, 2)
  (base,) = train_state.checksums([x])
  mesh = jax.make_mesh((8,), ("data",))
  sharded_x = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  (sharded,) = train_state.checksums([sharded_x])
  assert int(sharded) == int(base)
  assert int(train_state.checksums([x.at[3, 1].set(7.5)])[0]) != int(base)
  assert int(train_state.checksums([x[::-1]])[0]) != int(base)  # Same values, other places.


def test_a_step_that_fails_its_checksums_falls_back_to_the_previous_one(tmp_path, caplog):
  state = {"params": {"w": jnp.arange(6.0)}, "opt_state": {"m": jnp.ones(3, jnp.bfloat16)},
           "step": jnp.int32(0)}
  manager = runs.checkpoint_manager(tmp_path, async_save=False)
  train_state.save(manager, 1, state, ["one"])
  train_state.save(manager, 2, {**state, "params": {"w": jnp.arange(6.0) + 1}}, ["two"])
  meta = tmp_path / runs.CHECKPOINTS / "2" / "meta" / "metadata"
  saved = json.loads(meta.read_text())
  saved["checksums"][0] += 1  # As if a tensor had been altered on disk.
  meta.write_text(json.dumps(saved))
  step, restored, position = train_state.restore_latest(manager, tmp_path, state)
  assert (step, position) == (1, "one")
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(6.0))
  assert "step 2" in caplog.text and "do not match the checksums" in caplog.text
  assert (tmp_path / train_state.DAMAGED / "2").is_dir() and manager.all_steps() == [1]
  manager.close()
