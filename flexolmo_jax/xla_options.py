"""XLA compiler options given to individual jitted functions (docs/performance.md, "XLA:CPU
options").

On CPU, XLA routes matrix multiplies to YNNPACK by default. For the large multiplies of
training, evaluation and scoring (thousands of rows), oneDNN's GEMM is faster on this project's
x86 machines (measured: 2048 x 768 x 2048 float32 at 307-340 GFLOP/s against 270-294; a 100m
forward 14% and expert-training step 3% faster, d256 20% and 7%), and it is the library
PyTorch's CPU GEMMs use. For decoding's few-row multiplies oneDNN is several times slower
(16 x [768, 4096] at one row: 66 ms against 8 ms), so the option is set per jitted function
through `jax.jit(..., compiler_options=...)`, never process-wide through XLA_FLAGS, and only
when the default backend is the CPU (GPUs and TPUs never get it). Float32 stays float32: only
the GEMM kernel changes, so results move by float rounding only (parity tests unchanged).

FLEXOLMO_CPU_GEMMS=xla in the environment turns it off (YNNPACK everywhere).
"""

from __future__ import annotations

import os

import jax

ENV = "FLEXOLMO_CPU_GEMMS"
# LIBRARY_FUSION_TYPE_DOT (dots fused with their neighbours) crashed with an illegal
# instruction compiling the d256 training step; individual dots are what was measured.
ONEDNN_GEMMS = {"xla_cpu_use_onednn": True,
                "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def large_gemms() -> dict | None:
  """compiler_options for a function dominated by many-row matrix multiplies (training steps,
  forward passes over whole sequences); None (XLA's defaults) off CPU or when disabled.
  Call it where the function is jitted, not at import: it initialises the backend."""
  choice = os.environ.get(ENV, "onednn")
  if choice not in ("onednn", "xla"):
    raise ValueError(f"{ENV}={choice!r}: use 'onednn' (the default) or 'xla'")
  if choice == "xla" or jax.default_backend() != "cpu":
    return None
  return dict(ONEDNN_GEMMS)
