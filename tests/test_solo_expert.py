"""The no-coordinated-training ablation: only the FFN trains (dense, alone), the run merges like
any expert, its router row and bias keep their initial values, and it resumes exactly."""

import json

import pytest
import jax
import numpy as np

import killing
from flexolmo_jax import checkpoint, merge, runs, solo_expert
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import init_params
from flexolmo_jax.train_config import train_config

TINY = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
            rope_theta=10_000.0, pad_token_id=0, eos_token_id=1)


@pytest.mark.slow
def test_solo_expert_trains_only_its_ffn_and_merges(corpus_dir, tmp_path):
  config = ModelConfig(**TINY)
  public = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
  checkpoint.save_params_artifact(tmp_path / "public", config, public, "public")
  cfg = train_config(dict(
      mode="expert", model_overrides=dict(moe_backend="dense"),
      expert=dict(name="math", public=str(tmp_path / "public"), embed_batches=1),
      data=dict(path=corpus_dir, seq_len=16, batch_size=4), optim=dict(lr=1e-2, warmup_steps=0),
      steps=3, eval_batches=1, progress=False))
  last = solo_expert.train_solo(cfg, str(tmp_path / "solo"))
  assert np.isfinite(last["loss"]) and "val_loss/math" in last
  _, expert, manifest = runs.load_params(tmp_path / "solo")
  assert manifest["ablation"] == "solo" and manifest["step"] == 3
  assert not np.allclose(expert["up_proj"], public["layers"]["mlp"]["up_proj"])
  np.testing.assert_array_equal(expert["expert_bias"], np.full((2,), -0.5, np.float32))
  merged_config, params, names = merge.assemble(tmp_path / "public",
                                                {"math": str(tmp_path / "solo")})
  assert names == ["public", "math"] and merged_config.num_experts == 2
  np.testing.assert_array_equal(params["layers"]["mlp"]["up_proj"][:, 1], expert["up_proj"])
  np.testing.assert_array_equal(params["layers"]["attn"]["q_proj"],
                                public["layers"]["attn"]["q_proj"])


@pytest.mark.slow
def test_solo_expert_resumes_exactly_after_sigkill(corpus_dir, tmp_path):
  config = ModelConfig(**TINY)
  public = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
  checkpoint.save_params_artifact(tmp_path / "public", config, public, "public")
  raw = dict(mode="expert", model_overrides=dict(moe_backend="dense"),
             expert=dict(name="math", public=str(tmp_path / "public"), embed_batches=1),
             data=dict(path=corpus_dir, seq_len=16, batch_size=4),
             optim=dict(lr=1e-2, warmup_steps=2), steps=8, log_every=1, eval_every=100,
             eval_batches=1, checkpoint_every=3, async_checkpoint=False, progress=False)
  solo_expert.train_solo(train_config(raw), str(tmp_path / "straight"))
  killing.run_killed_after(5, "import json, sys\nfrom flexolmo_jax import solo_expert\n"
                           "from flexolmo_jax.train_config import train_config\n"
                           "solo_expert.train_solo(train_config(json.loads(sys.argv[1])), sys.argv[2])",
                           json.dumps(raw), str(tmp_path / "killed"))
  assert max(killing.losses(tmp_path / "killed")) == 5
  solo_expert.train_solo(train_config(raw), str(tmp_path / "killed"))
  steps = killing.logged_steps(tmp_path / "killed")
  assert steps.count(1) == 1 and steps.count(4) == 2  # Resumed from the step-3 checkpoint.
  want, got = killing.losses(tmp_path / "straight"), killing.losses(tmp_path / "killed")
  assert sorted(got) == list(range(1, 9)) and got == want
  (_, straight, _), (_, resumed, _) = map(runs.load_params, (tmp_path / "straight",
                                                            tmp_path / "killed"))
  for key, value in checkpoint.flatten(straight).items():
    np.testing.assert_array_equal(checkpoint.flatten(resumed)[key], value, err_msg=key)
