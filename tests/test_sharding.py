"""Mesh construction and logical-axis shardings; a sharded forward equals the 1-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flexolmo_jax import config as C
from flexolmo_jax import model as M
from flexolmo_jax import sharding as S


def test_make_mesh_fills_one_axis_and_refuses_bad_shapes():
  mesh = S.make_mesh({"data": 2, "fsdp": -1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
  assert S.make_mesh({"data": 2}).devices.size == 2  # An explicit small mesh takes the first ones.
  with pytest.raises(ValueError, match="needs 12 devices"):
    S.make_mesh({"data": 3, "fsdp": 4})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    S.make_mesh({"dp": 8})


def test_logical_sharding_drops_axes_that_do_not_divide():
  mesh = S.make_mesh({"fsdp": 2, "expert": 4})
  assert S.logical_sharding((4, 64, 96), ("expert", "embed", "mlp"), mesh).spec == P(
      "expert", "fsdp", "tensor")
  assert S.logical_sharding((3, 63), ("expert", "embed"), mesh).spec == P(None, None)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 8}, {"data": 2, "expert": 2, "tensor": 2}])
def test_sharded_forward_equals_single_device(mesh_shape):
  config = C.tiny(num_experts=4, top_k=2, moe_backend="ragged")
  params = M.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 128, jnp.int32)
  want = M.Transformer(config).apply({"params": params}, tokens)
  mesh = S.make_mesh(mesh_shape)
  shardings = S.tree_shardings(params, M.logical_axes(config), mesh)
  params = jax.device_put(params, shardings)
  tokens = jax.device_put(tokens, S.batch_sharding(mesh))
  fwd = jax.jit(lambda p, t: M.Transformer(config).apply({"params": p}, t))
  got = fwd(params, tokens)
  assert len(params["layers"]["mlp"]["gate_proj"].sharding.device_set) == 8
  np.testing.assert_allclose(got, want, atol=1e-5)
