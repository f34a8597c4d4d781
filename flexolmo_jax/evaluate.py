"""Evaluates a model: per-domain perplexity, multiple-choice and generation tasks, HumanEval, and
routing analysis; writes results.json and results.md (plus samples and the routing heatmap).

  python -m flexolmo_jax.evaluate --model=DIR --data=CORPUS --out=DIR \
      --tasks=perplexity,mc,humaneval,routing,file:arc.jsonl [--expert_mask=public,math]

Tasks (comma-separated):
  perplexity      exp(mean next-token NLL) on each domain's held-out split (--split)
  mc_<domain>     multiple choice built from the domain's held-out documents: a passage's true
                  continuation among continuations of other passages; `mc` means every domain
  humaneval       greedy pass@1 on the packaged HumanEval problems, run sandboxed
  routing         the share of tokens routed to each expert, per layer and domain (MoE only)
  file:PATH       a task file in the JSONL format of flexolmo_jax/eval_tasks.py
  <format>:PATH   a public benchmark file converted on the fly: mmlu (CSV file or directory),
                  arc, hellaswag or gsm8k (JSONL), zero-shot
Multiple-choice tasks report accuracy by the summed log-likelihood (acc), per token
(acc_per_token) and per character (acc_per_char), as OLMES does.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Sequence

import numpy as np
from absl import app
from absl import flags
from absl import logging

from flexolmo_jax import codegen
from flexolmo_jax import eval_tasks
from flexolmo_jax import routing_analysis
from flexolmo_jax import runs
from flexolmo_jax import scoring
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import DataConfig, DataError, load_manifest, make_pipeline
from flexolmo_jax.data import tokenizer as tokenizer_lib

_BUILTIN = ("perplexity", "mc", "humaneval", "routing")


def expert_names(config: ModelConfig, manifest: dict | None = None) -> list[str]:
  """The experts' names: from the model manifest when it lists them, else public, expert_1, ..."""
  names = (manifest or {}).get("expert_names")
  if names and len(names) == config.num_experts:
    return list(names)
  return ["public"] + [f"expert_{i}" for i in range(1, config.num_experts)] if config.is_moe else []


def parse_expert_mask(spec: str, names: Sequence[str]) -> np.ndarray | None:
  """An [E] bool mask from comma-separated expert names or indices; "" means every expert."""
  if not spec:
    return None
  if not names:
    raise ValueError("--expert_mask needs a mixture-of-experts model; this one is dense")
  mask = np.zeros(len(names), bool)
  for part in (p.strip() for p in spec.split(",") if p.strip()):
    if part.isdigit() and int(part) < len(names):
      mask[int(part)] = True
    elif part in names:
      mask[list(names).index(part)] = True
    else:
      raise ValueError(f"--expert_mask: unknown expert {part!r}; experts: "
                       f"{', '.join(f'{i}={n}' for i, n in enumerate(names))}")
  if not mask.any():
    raise ValueError("--expert_mask allows no expert")
  return mask


def parse_tasks(spec: str, domains: Sequence[str]) -> list[str]:
  """The task names in `spec`, with `mc` expanded to every domain; unknown names are refused with
  the valid ones."""
  tasks = []
  for name in (t.strip() for t in spec.split(",") if t.strip()):
    prefix = name.split(":", 1)[0]
    if name == "mc":
      tasks += [f"mc_{d}" for d in domains]
    elif name in _BUILTIN or (name.startswith("mc_") and name[3:] in domains):
      tasks.append(name)
    elif ":" in name and (prefix == "file" or prefix in eval_tasks.CONVERTERS):
      tasks.append(name)
    else:
      valid = list(_BUILTIN) + [f"mc_{d}" for d in domains] + ["file:PATH"] + [
          f"{f}:PATH" for f in eval_tasks.CONVERTERS]
      raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(valid)}")
  if not tasks:
    raise ValueError("--tasks names no task")
  return list(dict.fromkeys(tasks))


def run_multiple_choice(scorer: scoring.Scorer, items: Sequence[eval_tasks.Item]) -> dict:
  """Accuracy of choosing the choice of highest log-likelihood: raw, per token and per char."""
  requests = [(item.prompt, choice) for item in items for choice in item.choices]
  scored = iter(scorer.loglikelihood(requests))
  hits = {"acc": 0, "acc_per_token": 0, "acc_per_char": 0}
  for item in items:
    choices = [next(scored) for _ in item.choices]
    for metric, value in (("acc", lambda s: s.logprob), ("acc_per_token", lambda s: s.per_token),
                          ("acc_per_char", lambda s: s.per_char)):
      hits[metric] += int(np.argmax([value(s) for s in choices]) == item.gold)
  return {**{k: v / len(items) for k, v in hits.items()}, "items": len(items),
          "chance": float(np.mean([1 / len(item.choices) for item in items]))}


def _last_number(text: str) -> str | None:
  numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
  return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def answer_matches(item: eval_tasks.Item, generation: str) -> bool:
  """Whether a generation answers a generation item ("exact" or "number" match)."""
  if item.match == "number":
    got = _last_number(generation)
    try:
      return got is not None and float(got) == float(item.answer.replace(",", ""))
    except ValueError:
      return got == item.answer.strip()
  return generation.strip() == item.answer.strip()


def run_generation(config, params, tokenizer, items: Sequence[eval_tasks.Item], *,
                   max_new_tokens: int, batch_size: int, max_len: int, expert_mask=None) -> dict:
  """Exact-match accuracy of greedy answers to generation items, with the samples."""
  generations: dict[int, str] = {}
  by_stop: dict[tuple[str, ...], list[int]] = {}
  for i, item in enumerate(items):
    by_stop.setdefault(item.stop, []).append(i)
  for stop, indices in by_stop.items():
    texts = codegen.greedy_generate(config, params, tokenizer, [items[i].prompt for i in indices],
                                    max_new_tokens=max_new_tokens, stop=stop,
                                    batch_size=batch_size, max_len=max_len,
                                    expert_mask=expert_mask)
    generations.update(zip(indices, texts))
  samples = [{"id": item.id, "generation": generations[i], "answer": item.answer,
              "correct": answer_matches(item, generations[i])} for i, item in enumerate(items)]
  return {"exact_match": sum(s["correct"] for s in samples) / len(samples), "items": len(samples),
          "samples": samples}


def _load_items(task: str, root: str | None, split: str, mc_items: int) -> list[eval_tasks.Item]:
  kind, _, path = task.partition(":")
  if task.startswith("mc_"):
    return eval_tasks.domain_mc_task(root, task[3:], split, num_items=mc_items)
  if kind == "file":
    return eval_tasks.load_jsonl(path)
  return eval_tasks.CONVERTERS[kind](path)


def _domain_batches(root: str, domain: str, split: str, batch_size: int, seq_len: int):
  cfg = DataConfig(path=root, domains=(domain,), shuffle=False, seq_len=seq_len,
                   batch_size=batch_size)
  return iter(make_pipeline(cfg, split, num_epochs=1, drop_remainder=False, shard_index=0,
                            shard_count=1))


def evaluate(config: ModelConfig, params, tokenizer, tasks: Sequence[str], *, out_dir: str,
             data_root: str | None = None, domains: Sequence[str] = (), split: str = "test",
             expert_mask=None, names: Sequence[str] = (), batch_size: int = 8,
             max_len: int = 1024, seq_len: int = 512, mc_items: int = 200,
             max_new_tokens: int = 256, humaneval_limit: int | None = None,
             timeout: float = 10.0) -> dict:
  """Runs `tasks` (names as parse_tasks returns them) and returns {task: metrics}; samples of
  generation tasks and the routing report are written under `out_dir`."""
  needs_data = [t for t in tasks if t in ("perplexity", "routing") or t.startswith("mc_")]
  if needs_data and not data_root:
    raise ValueError(f"tasks {needs_data} need a prepared corpus: pass --data")
  if "routing" in tasks and not config.is_moe:
    raise ValueError("the routing task needs a mixture-of-experts model; this one is dense")
  os.makedirs(out_dir, exist_ok=True)
  scorer = scoring.Scorer(config, params, tokenizer, batch_size=batch_size, max_len=max_len,
                          expert_mask=expert_mask)
  results = {}
  for task in tasks:
    if task == "perplexity":
      per_domain = {d: scoring.perplexity(config, params,
                                          _domain_batches(data_root, d, split, batch_size, seq_len),
                                          expert_mask=expert_mask) for d in domains}
      mean_nll = float(np.mean([r["nll"] for r in per_domain.values()]))
      results[task] = {**per_domain, "average": {"nll": mean_nll, "perplexity": float(np.exp(mean_nll))}}
    elif task == "routing":
      by_domain = routing_analysis.domain_shares(config, params, data_root, domains, split=split,
                                                 batch_size=batch_size, seq_len=seq_len,
                                                 expert_mask=expert_mask)
      paths = routing_analysis.write_report(by_domain, names, out_dir)
      results[task] = {"tokens": {d: v["tokens"] for d, v in by_domain.items()}, **paths}
    elif task == "humaneval":
      problems = codegen.load_humaneval()[:humaneval_limit]
      result = codegen.evaluate_humaneval(config, params, tokenizer, problems=problems,
                                          max_new_tokens=max_new_tokens, timeout=timeout,
                                          batch_size=batch_size, max_len=max_len,
                                          expert_mask=expert_mask, data_root=data_root)
      results[task] = _with_samples_file(result, out_dir, task)
    else:
      items = _load_items(task, data_root, split, mc_items)
      mc = [i for i in items if i.is_multiple_choice]
      gen = [i for i in items if not i.is_multiple_choice]
      result = run_multiple_choice(scorer, mc) if mc else {}
      if gen:
        result.update(run_generation(config, params, tokenizer, gen, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, max_len=max_len,
                                     expert_mask=expert_mask))
        result = _with_samples_file(result, out_dir, task)
      results[task] = result
  return results


def _slug(task: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", task).strip("_")


def _with_samples_file(result: dict, out_dir: str, task: str) -> dict:
  """Moves a result's samples into <out_dir>/<task>_samples.jsonl."""
  path = os.path.join(out_dir, f"{_slug(task)}_samples.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    for sample in result.pop("samples"):
      f.write(json.dumps(sample, ensure_ascii=False) + "\n")
  return {**result, "samples_file": path}


def markdown(report: dict) -> str:
  """A results table: one row per task and metric."""
  lines = [f"# Evaluation of {report['model']}", "",
           f"split: {report['split']}; experts: {', '.join(report['experts']) or 'dense'}"
           + (f"; allowed: {', '.join(report['allowed_experts'])}" if report["allowed_experts"]
              else ""), "", "| task | metric | value |", "| --- | --- | --- |"]
  for task, metrics in report["tasks"].items():
    for key, value in metrics.items():
      if isinstance(value, dict):
        lines += [f"| {task}/{key} | {k} | {_fmt(v)} |" for k, v in value.items()]
      else:
        lines.append(f"| {task} | {key} | {_fmt(value)} |")
  return "\n".join(lines) + "\n"


def _fmt(value) -> str:
  return f"{value:.4f}" if isinstance(value, float) else str(value)


def write_results(report: dict, out_dir: str) -> dict[str, str]:
  """Writes results.json and results.md under `out_dir`."""
  paths = {"json": os.path.join(out_dir, "results.json"), "md": os.path.join(out_dir, "results.md")}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, sort_keys=False)
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write(markdown(report))
  return paths


# ----------------------------------------------------------------------------- command line

def define_flags():
  """Defines the command-line flags; only when run as a program, so importing this module
  next to other commands' flags never clashes."""
  flags.DEFINE_string("model", None, "Model: a training run or a params artifact directory.")
  flags.DEFINE_string("data", None, "Prepared corpus (python -m flexolmo_jax.data prepare).")
  flags.DEFINE_string("tasks", "perplexity,mc", "Comma-separated tasks (see module doc).")
  flags.DEFINE_string("out", None, "Output directory for results.json / results.md.")
  flags.DEFINE_string("tokenizer", None,
                      "tokenizer.model / tokenizer.json or a directory holding one "
                      "(default: the tokenizer that travels with the model, else --data's).")
  flags.DEFINE_list("domains", None, "Domains for perplexity/routing (default: all).")
  flags.DEFINE_enum("split", "test", ["validation", "test"], "Held-out split.")
  flags.DEFINE_string("expert_mask", "", "Experts allowed (names or indices).")
  flags.DEFINE_integer("batch_size", 8, "Rows per forward pass.")
  flags.DEFINE_integer("max_len", 1024, "Longest scored/generated sequence (tokens).")
  flags.DEFINE_integer("seq_len", 512, "Row length for perplexity and routing.")
  flags.DEFINE_integer("mc_items", 200, "Items per domain multiple-choice task.")
  flags.DEFINE_integer("max_new_tokens", 256, "Generation length limit.")
  flags.DEFINE_integer("humaneval_limit", None, "Only the first N HumanEval problems.")
  flags.DEFINE_float("timeout", 10.0, "Seconds per sandboxed HumanEval program.")
  flags.mark_flags_as_required(["model", "out"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO.
  try:
    config, params, manifest = runs.load_params(flags.FLAGS.model)
    names = expert_names(config, manifest)
    mask = parse_expert_mask(flags.FLAGS.expert_mask, names)
    domains = flags.FLAGS.domains or (sorted(load_manifest(flags.FLAGS.data)["domains"]) if flags.FLAGS.data else [])
    tasks = parse_tasks(flags.FLAGS.tasks, domains)
    tokenizer = tokenizer_lib.for_model(flags.FLAGS.model, manifest, data_root=flags.FLAGS.data,
                                        override=flags.FLAGS.tokenizer)
    if flags.FLAGS.data:  # Perplexity and routing read the corpus's own token ids.
      tokenizer_lib.check_matches(manifest, load_manifest(flags.FLAGS.data), model=flags.FLAGS.model)
    if tokenizer.vocab_size > config.vocab_size:
      raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                       f"{config.vocab_size}; pass the model's own tokenizer with --tokenizer")
    results = evaluate(config, params, tokenizer, tasks, out_dir=flags.FLAGS.out, data_root=flags.FLAGS.data,
                       domains=domains, split=flags.FLAGS.split, expert_mask=mask, names=names,
                       batch_size=flags.FLAGS.batch_size, max_len=flags.FLAGS.max_len, seq_len=flags.FLAGS.seq_len,
                       mc_items=flags.FLAGS.mc_items, max_new_tokens=flags.FLAGS.max_new_tokens,
                       humaneval_limit=flags.FLAGS.humaneval_limit, timeout=flags.FLAGS.timeout)
  except (ValueError, FileNotFoundError, DataError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
  report = {"model": flags.FLAGS.model, "data": flags.FLAGS.data, "split": flags.FLAGS.split,
            "experts": names,
            "allowed_experts": [] if mask is None else [n for n, m in zip(names, mask) if m],
            "config": config.to_dict(), "tasks": results}
  paths = write_results(report, flags.FLAGS.out)
  print(markdown(report))
  print(f"wrote {paths['json']} and {paths['md']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
