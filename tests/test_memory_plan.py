"""The memory plan: per-device parameter bytes checked by hand on a tiny config, expert-mode
optimizer state = 2 x the trainable expert, clear errors, and the estimate against XLA's own
memory_analysis() of the compiled step."""

import jax
import pytest

from flexolmo_jax import memory_plan, sharding
from flexolmo_jax.config import tiny

# tiny(): vocab 128, d_model 64, 2 layers, 4 heads (head_dim 16), 2 kv heads, ffn 96, float32.
MESH = {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}


def test_param_bytes_by_hand():
  got = memory_plan.estimate(tiny(), "public", memory_plan.abstract_mesh(MESH), batch=8,
                             seq_len=16)
  # Elements per device: each tensor's count over the shards of the dims its rules split
  # (embed -> fsdp 4; vocab, heads, mlp -> tensor 2; layers and norms' layer axis unsplit).
  embed = lm_head = 128 * 64 // 8
  final_norm = 64 // 4
  per_layer = (64 * 64 // 8 + 2 * (64 * 32 // 8) + 64 * 64 // 8  # q, k, v, o projections
               + 64 // 2 + 32 // 2                                # q_norm, k_norm (tensor)
               + 2 * (64 // 4)                                    # post-attn/ffn norms (fsdp)
               + 3 * (64 * 96 // 8))                              # gate, up, down
  assert got["params"] == (embed + lm_head + final_norm + 2 * per_layer) * 4
  assert got["grads"] == got["params"]
  # AdamW: two float32 moments sharded like the parameters, plus two replicated int32 step
  # counts (Adam's and the learning-rate schedule's).
  assert got["optimizer"] == 2 * got["params"] + 8
  assert got["frozen"] == got["assembled"] == 0


def test_expert_mode_optimizer_is_twice_the_trainable_expert():
  mesh = memory_plan.abstract_mesh(MESH)
  got = memory_plan.estimate(tiny(), "expert", mesh, batch=8, seq_len=16)
  L, D, F = 2, 64, 96
  trainable = (3 * L * D * F + L * D + L) * 4  # gate/up/down, router row, bias; float32.
  assert got["trainable_params_total"] == trainable
  assert got["optimizer_total"] == 2 * trainable + 8  # + the two int32 step counts.
  assert got["optimizer"] == 2 * got["params"] + 8
  # The frozen public model: every parameter of the dense model plus r_pub, no optimizer state.
  dense = memory_plan.estimate(tiny(), "public", mesh, batch=8, seq_len=16)
  assert got["frozen"] == dense["params"] + L * D * 4 // 4  # r_pub [L, D]: D over fsdp.
  # Against full fine-tuning of an 8-expert model: about 1/8 of the optimizer state.
  moe = memory_plan.estimate(tiny(num_experts=8, top_k=2), "expert", mesh, batch=8, seq_len=16)
  ratio = moe["full_finetune_optimizer_total"] / moe["optimizer_total"]
  assert moe["full_finetune_experts"] == 8 and 7.5 < ratio < 14


def test_named_plan_and_markdown():
  row = memory_plan.plan("flexolmo_8x7b_top4", "v5p-64", "inference", seq_len=128)
  assert row["devices"] == 32 and row["mesh_shape"] == {"data": 1, "fsdp": 4, "expert": 8,
                                                        "tensor": 1}
  assert row["batch"] == 32  # One sequence per batch shard.
  text = memory_plan.markdown([row])
  assert "| flexolmo_8x7b_top4 | inference | v5p-64 | 32 | 95 | 1,4,8,1 | 32x128 |" in text


def test_unknown_names_are_refused_with_the_valid_ones():
  with pytest.raises(ValueError, match="unknown mesh 'v9-1'; valid meshes: v4-32, v5p-8, v5p-64"):
    memory_plan.plan("tiny", "v9-1", "public")
  with pytest.raises(ValueError, match="valid models: tiny, olmo2_7b"):
    memory_plan.plan("olmo3", "v5p-64", "public")
  with pytest.raises(ValueError, match="has 8 devices; v5p-64 has 32"):
    memory_plan.plan("tiny", "v5p-64", "public", mesh_shape={"fsdp": 8})
  with pytest.raises(ValueError, match="not AXIS=SIZE"):
    memory_plan.parse_mesh_shape("model=4")


def _within_sane_factor(config, mode):
  mesh = sharding.make_mesh(MESH)
  estimate = memory_plan.estimate(config, mode, mesh, batch=8, seq_len=32)
  compiled = memory_plan.compiled_memory(config, mode, mesh, batch=8, seq_len=32)
  state = estimate["params"] + estimate["frozen"] + estimate["optimizer"]
  # The arguments are exactly what the plan says is resident (plus the token batch).
  assert state <= compiled["argument_size_in_bytes"] <= state + 8 * 32 * 5 * 4
  assert 1 / 3 < compiled["peak"] / estimate["total"] < 3, (compiled, estimate)


def test_compiled_forward_matches_the_estimate():
  _within_sane_factor(tiny(remat="full"), "inference")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["public", "expert"])
def test_compiled_train_step_matches_the_estimate(mode):
  _within_sane_factor(tiny(remat="full"), mode)


def test_plan_runs_without_the_devices():
  assert jax.device_count() == 8  # The plan below is for 256 devices: none are needed.
  row = memory_plan.plan("olmo2_7b", "v5e-256", "public", seq_len=256)
  assert row["mesh_shape"]["fsdp"] == 256 and row["params"] > 0
