"""`--profile_dir`, shared by the benchmarks: a jax.profiler trace of the timed calls (open it
with TensorBoard's profile plugin or XProf), like training's `--config.profile_steps`."""

import contextlib

import jax
from absl import flags

PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "Write a jax.profiler trace of the timed "
                                  "calls here (TensorBoard profile plugin / XProf).")


def trace():
  """A jax.profiler trace into --profile_dir, or nothing when it is empty."""
  if not PROFILE_DIR.value:
    return contextlib.nullcontext()
  return jax.profiler.trace(PROFILE_DIR.value)
