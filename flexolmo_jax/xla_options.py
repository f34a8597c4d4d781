"""XLA compiler options given to individual jitted functions (docs/performance.md, "XLA:CPU
options").

On CPU, XLA routes matrix multiplies to YNNPACK by default. For large multiplies oneDNN's GEMM
is faster on this project's x86 machines (2048 x 768 x 2048 float32: 307-340 GFLOP/s against
270-294; whole steps with 2,048 tokens: 100m forward 7% and expert training 3% faster, d256 6%
and 6%, 25m 5-9%), and it is the library PyTorch's CPU GEMMs use. For small ones it is slower
(tiny, d_model 64: forward 24% slower at 2 x 128, 11% at 8 x 256; 25m at 2 x 128: 5-9%), and for
decoding's few-row products several times slower (16 x [768, 4096] at one row: 66 ms against
8 ms). So the option is given per jitted function through `jax.jit(..., compiler_options=...)`,
never process-wide through XLA_FLAGS, only to training and evaluation steps whose shapes are
known to be large (for_gemms), and only when the default backend is the CPU. Float32 stays
float32: only the GEMM kernel changes, so results move by float rounding only.

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
# Where oneDNN measured faster: at least this many tokens per call and this model width.
MIN_TOKENS, MIN_D_MODEL = 2048, 256


def for_gemms(d_model: int, tokens: int) -> dict | None:
  """compiler_options for a function whose matrix multiplies have `tokens` rows and `d_model`
  columns or more (a training or evaluation step): oneDNN GEMMs on CPU where they measured
  faster, else None (XLA's defaults). Call it where the function is jitted, not at import: it
  initialises the backend."""
  choice = os.environ.get(ENV, "onednn")
  if choice not in ("onednn", "xla"):
    raise ValueError(f"{ENV}={choice!r}: use 'onednn' (the default) or 'xla'")
  if (choice == "xla" or jax.default_backend() != "cpu" or tokens < MIN_TOKENS
      or d_model < MIN_D_MODEL):
    return None
  return dict(ONEDNN_GEMMS)
