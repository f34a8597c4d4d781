"""Attention implementations (attention.py) against the einsum reference (`xla`): logits and the
gradient of every parameter of a model with grouped-query attention, packed documents of uneven
lengths, a length that is not a multiple of the block, and a padding row; queries that see no key;
KV-cached greedy decoding; memory linear in the length for `chunked`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax import attention
from flexolmo_jax import config as config_lib
from flexolmo_jax import model
from flexolmo_jax.generate import generate

KERNELS = ("chunked", "cudnn", "splash")
TOL = 2e-5
# GQA (4 query heads on 2 kv heads); block 8 does not divide the length 21.
CONFIG = config_lib.tiny(n_heads=4, n_kv_heads=2, attention_block_size=8)


def _batch():
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, CONFIG.vocab_size, (3, 21)).astype(np.int32)
  # Row 0: three packed documents of uneven lengths; row 1: one document and padding (segment 0);
  # row 2: padding only.
  segments = np.zeros((3, 21), np.int32)
  segments[0] = np.repeat([1, 2, 3], [7, 9, 5])
  segments[1, :13] = 1
  positions = np.zeros((3, 21), np.int32)
  for row in range(3):
    for seg in np.unique(segments[row]):
      where = segments[row] == seg
      positions[row, where] = np.arange(where.sum())
  targets = rng.randint(0, CONFIG.vocab_size, (3, 21)).astype(np.int32)
  return tokens, positions, segments, targets


@pytest.fixture(scope="module")
def params():
  # Larger layer weights than init: peaked attention, so a wrong mask cannot hide in averages.
  return jax.tree.map(lambda x: x * 4 if x.ndim > 2 else x,
                      model.init_params(CONFIG, jax.random.key(0)))


def _logits_and_grads(impl, params):
  tokens, positions, segments, targets = _batch()
  apply = lambda p: model.Transformer(CONFIG.replace(attention_impl=impl)).apply(
      {"params": p}, tokens, positions=positions, segment_ids=segments)
  # Mean next-token cross-entropy over every token, padding included: the training loss's scale.
  loss = lambda p: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(apply(p)),
                                                 targets[..., None], -1))
  return jax.jit(lambda p: (apply(p), jax.grad(loss)(p)))(params)


@pytest.fixture(scope="module")
def reference(params):
  return _logits_and_grads("xla", params)


@pytest.mark.parametrize("impl", KERNELS)
def test_model_logits_and_every_gradient_equal_xla(impl, params, reference):
  want_logits, want_grads = reference
  got_logits, got_grads = _logits_and_grads(impl, params)
  np.testing.assert_allclose(got_logits, want_logits, rtol=0, atol=TOL)
  flat_want = jax.tree_util.tree_leaves_with_path(want_grads)
  flat_got = jax.tree.leaves(got_grads)
  assert len(flat_got) == len(flat_want)
  for (path, want), got in zip(flat_want, flat_got):
    assert np.abs(np.asarray(want)).max() > 0, path  # every parameter has a gradient to compare
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("impl", ("chunked", "cudnn"))
def test_cache_offsets_and_queries_that_see_nothing(impl):
  """Queries at slots 6..9 of a 19-slot cache; one query's segment is absent from the keys, one
  query sees only padding keys of its own segment 0, so the first sees nothing and returns 0."""
  rng = np.random.RandomState(1)
  q = jnp.asarray(rng.normal(size=(2, 4, 4, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, 19, 2, 16)), jnp.float32) for _ in range(2))
  kv_seg = jnp.asarray(np.repeat([[0, 1, 0], [1, 2, 0]], [5, 9, 5], axis=1), jnp.int32)
  q_seg = jnp.asarray([[1, 7, 1, 1], [2, 2, 0, 2]], jnp.int32)

  @functools.partial(jax.jit, static_argnums=0)
  def run(impl):
    fn = lambda q, k, v: attention.attend(q, k, v, q_seg, kv_seg, q_offset=jnp.int32(6),
                                          impl=impl, block_size=8)
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))(q, k, v)
    return fn(q, k, v), grads

  (want, want_grads), (got, got_grads) = run("xla"), run(impl)
  assert np.all(np.asarray(want)[0, 1] == 0) and np.abs(np.asarray(want)[0, 0]).max() > 0
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=0, atol=TOL)


@pytest.mark.parametrize("impl", ("xla",) + KERNELS)
def test_cached_greedy_decoding_equals_full_recompute(impl, params):
  cfg = CONFIG.replace(attention_impl=impl)
  prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3] * 17]
  cached = generate(cfg, params, prompts, max_new_tokens=6, stop_at_eos=False)
  full = generate(cfg, params, prompts, max_new_tokens=6, stop_at_eos=False, use_cache=False)
  np.testing.assert_array_equal(cached, full)


def _temp_bytes(impl, length):
  shape = jax.ShapeDtypeStruct((1, length, 4, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
  seg = jax.ShapeDtypeStruct((1, length), jnp.int32)
  loss = lambda q, k, v, s: jnp.sum(attention.attend(q, k, v, s, impl=impl, block_size=64))
  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return step.lower(shape, kv, kv, seg).compile().memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly_with_length():
  # 4x the length: linear temporaries grow at most 4x; xla's score matrix makes its grow ~16x
  # (less, with its linear terms: 9.5x measured).
  chunked = _temp_bytes("chunked", 1024) / _temp_bytes("chunked", 256)
  xla = _temp_bytes("xla", 1024) / _temp_bytes("xla", 256)
  assert chunked <= 4.0 < 8.0 < xla, (chunked, xla)


def test_resolve_and_refusals():
  assert attention.resolve("auto", "float32", "tpu") == "splash"
  assert attention.resolve("auto", "bfloat16", "gpu") == "cudnn"
  assert attention.resolve("auto", "float32", "gpu") == "xla"
  assert attention.resolve("auto", "float32", "cpu") == "chunked"
  assert attention.for_cache("splash") == "xla" and attention.for_cache("chunked") == "chunked"
  with pytest.raises(ValueError, match="attention_impl 'flash' not in"):
    config_lib.tiny(attention_impl="flash")
  x = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="for_cache"):
    attention.attend(x, x, x, jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32),
                     impl="splash")
  with pytest.raises(ValueError, match="init_cache"):
    model.Transformer(CONFIG).apply({"params": model.init_params(CONFIG, jax.random.key(0))},
                                    jnp.zeros((1, 2), jnp.int32), cache_index=0)
