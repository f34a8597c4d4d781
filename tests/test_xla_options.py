"""Per-function XLA options: oneDNN GEMMs for training/scoring on CPU, off by request."""

import jax
import numpy as np
import pytest

from flexolmo_jax import xla_options
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import Transformer, init_params


def test_large_cpu_gemms_get_onednn_and_the_same_logits(monkeypatch):
  monkeypatch.delenv(xla_options.ENV, raising=False)
  options = xla_options.for_gemms(d_model=256, tokens=2048)
  assert options == xla_options.ONEDNN_GEMMS
  # Below the measured threshold (tiny models, short batches) XLA's defaults stay.
  assert xla_options.for_gemms(d_model=128, tokens=4096) is None
  assert xla_options.for_gemms(d_model=512, tokens=256) is None
  config = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       ffn_hidden=128, num_experts=2, top_k=2)
  params = init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, config.vocab_size)
  forward = lambda p, t: Transformer(config).apply({"params": p}, t)
  with_onednn = jax.jit(forward, compiler_options=options)
  assert "__onednn_fusion" in with_onednn.lower(params, tokens).compile().as_text()
  default = jax.jit(forward)
  assert "__onednn_fusion" not in default.lower(params, tokens).compile().as_text()
  np.testing.assert_allclose(with_onednn(params, tokens), default(params, tokens),
                             rtol=1e-5, atol=1e-5)


def test_env_turns_it_off_and_rejects_unknown_values(monkeypatch):
  monkeypatch.setenv(xla_options.ENV, "xla")
  assert xla_options.for_gemms(d_model=768, tokens=4096) is None
  monkeypatch.setenv(xla_options.ENV, "mkl")
  with pytest.raises(ValueError, match="FLEXOLMO_CPU_GEMMS='mkl'.*'onednn'.*'xla'"):
    xla_options.for_gemms(d_model=768, tokens=4096)
