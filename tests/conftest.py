"""Test setup: 8 fake CPU devices for sharding tests, float32 everywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM's expensive passes dominate compile time for tiny test models and do not change results.
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

import io  # pylint: disable=g-import-not-at-top,wrong-import-position
from contextlib import redirect_stdout  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from flexolmo_jax.data import corpus  # pylint: disable=g-import-not-at-top,wrong-import-position

SMALL = corpus.BuildOptions(max_docs_per_domain=50, vocab_size=512, math_docs=200)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
  """A small FlexMix-mini (50 documents per domain, vocab 512), built once per test session."""
  root = str(tmp_path_factory.mktemp("flexmix"))
  with redirect_stdout(io.StringIO()):
    corpus.prepare(root, SMALL)
  return root
