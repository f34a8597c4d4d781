"""Evaluates a model: per-domain perplexity, multiple-choice and generation tasks, HumanEval, and
routing analysis; writes results.json and results.md (plus samples and the routing heatmap).

  python -m flexolmo_jax.evaluate --model=DIR --data=CORPUS --out=DIR \
      --tasks=perplexity,mc,humaneval,routing,file:arc.jsonl [--expert_mask=public+math]
  python -m flexolmo_jax.evaluate --model=MERGED --data=CORPUS --out=DIR --baseline=soup_uniform

--expert_mask takes an expert subset (all, public+math, -code: flexolmo_jax/subsets.py);
--baseline scores one of flexolmo_jax.baselines, built from the merged --model, by perplexity.

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
(acc_per_token) and per character (acc_per_char), as OLMES does. A new kind of task is one entry
in TASKS.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable, Sequence

import numpy as np
from absl import flags

from flexolmo_jax import atomic, baselines, cli, codegen, eval_tasks, paths, progress
from flexolmo_jax import routing_analysis, runs, scoring, subsets
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import load_manifest
from flexolmo_jax.data import tokenizer as tokenizer_lib

def expert_names(config: ModelConfig, manifest: dict | None = None) -> list[str]:
  """The experts' names: from the model manifest when it lists them, else public, expert_1, ..."""
  names = (manifest or {}).get("expert_names")
  if names and len(names) == config.num_experts:
    return list(names)
  return ["public"] + [f"expert_{i}" for i in range(1, config.num_experts)] if config.is_moe else []


def run_multiple_choice(scorer: scoring.Scorer, items: Sequence[eval_tasks.Item]) -> dict:
  """Accuracy of choosing the choice of highest log-likelihood: raw, per token and per char."""
  requests = [(item.prompt, choice) for item in items for choice in item.choices]
  # Scored in chunks only to report progress; each request's score does not depend on the others.
  chunk = 256
  bar = progress.bar(desc="multiple choice", total=len(requests), unit="choice")
  scores = []
  for start in range(0, len(requests), chunk):
    scores += scorer.loglikelihood(requests[start:start + chunk])
    bar.update(len(requests[start:start + chunk]))
  bar.close()
  scored = iter(scores)
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


# ----------------------------------------------------------------------------- the task registry


@dataclasses.dataclass(frozen=True)
class Context:
  """Everything a task runs with: one model (or a baseline's scorer) and the evaluation options."""
  config: ModelConfig
  params: Any
  tokenizer: Any
  out_dir: str
  data_root: str | None
  domains: Sequence[str]
  split: str
  expert_mask: np.ndarray | None
  names: Sequence[str]
  batch_size: int
  max_len: int
  seq_len: int
  mc_items: int
  max_new_tokens: int
  humaneval_limit: int | None
  timeout: float
  score_batches: scoring.BatchScorer  # the model's, or a baseline's
  allow_unsandboxed_code: bool = False

  def batches(self, domain: str):
    """The domain's held-out batches, with a progress bar (its total estimated from the
    manifest's token count)."""
    tokens = load_manifest(self.data_root)["domains"][domain][self.split]["tokens"]
    return progress.bar(scoring.domain_batches(self.data_root, domain, self.split,
                                               batch_size=self.batch_size, seq_len=self.seq_len),
                        desc=f"{domain} ({self.split})", unit="batch",
                        total=-(-tokens // (self.batch_size * self.seq_len)))


@dataclasses.dataclass(frozen=True)
class Task:
  """A kind of task: how it is named, whether it reads the corpus, and how it runs. `run(ctx,
  name)` gets the task's full name (e.g. "mc_math", "file:arc.jsonl") and returns its metrics."""
  usage: str
  needs_data: bool
  run: Callable[[Context, str], dict]
  takes_path: bool = False  # named KIND:PATH


def _perplexity(ctx: Context, name: str) -> dict:
  del name
  return scoring.score_domains(ctx.score_batches, {d: ctx.batches(d) for d in ctx.domains})


def _routing(ctx: Context, name: str) -> dict:
  del name
  by_domain = {d: routing_analysis.domain_shares(
      ctx.config, ctx.params, ctx.data_root, [d], split=ctx.split, batch_size=ctx.batch_size,
      seq_len=ctx.seq_len, expert_mask=ctx.expert_mask)[d]
               for d in progress.bar(ctx.domains, desc="routing", unit="domain")}
  paths = routing_analysis.write_report(by_domain, ctx.names, ctx.out_dir)
  return {"tokens": {d: v["tokens"] for d, v in by_domain.items()}, **paths}


def _humaneval(ctx: Context, name: str) -> dict:
  problems = codegen.load_humaneval()[:ctx.humaneval_limit]
  result = codegen.evaluate_humaneval(ctx.config, ctx.params, ctx.tokenizer, problems=problems,
                                      max_new_tokens=ctx.max_new_tokens, timeout=ctx.timeout,
                                      batch_size=ctx.batch_size, max_len=ctx.max_len,
                                      expert_mask=ctx.expert_mask, data_root=ctx.data_root,
                                      allow_unsandboxed=ctx.allow_unsandboxed_code)
  return _with_samples_file(result, ctx.out_dir, name)


def _load_items(ctx: Context, name: str) -> list[eval_tasks.Item]:
  kind, _, path = name.partition(":")
  if name.startswith("mc_"):
    return eval_tasks.domain_mc_task(ctx.data_root, name[3:], ctx.split, num_items=ctx.mc_items)
  if kind == "file":
    return eval_tasks.load_jsonl(path)
  return eval_tasks.CONVERTERS[kind](path)


def _items(ctx: Context, name: str) -> dict:
  """Multiple-choice items scored by log-likelihood, generation items by greedy decoding."""
  items = _load_items(ctx, name)
  mc = [i for i in items if i.is_multiple_choice]
  gen = [i for i in items if not i.is_multiple_choice]
  result = {}
  if mc:
    scorer = scoring.Scorer(ctx.config, ctx.params, ctx.tokenizer, batch_size=ctx.batch_size,
                            max_len=ctx.max_len, expert_mask=ctx.expert_mask)
    result = run_multiple_choice(scorer, mc)
  if gen:
    result.update(run_generation(ctx.config, ctx.params, ctx.tokenizer, gen,
                                 max_new_tokens=ctx.max_new_tokens, batch_size=ctx.batch_size,
                                 max_len=ctx.max_len, expert_mask=ctx.expert_mask))
    result = _with_samples_file(result, ctx.out_dir, name)
  return result


# A new kind of task is one entry here, keyed by task_kind: the task's name, "mc" for
# mc_<domain>, or KIND for KIND:PATH.
TASKS: dict[str, Task] = {
    "perplexity": Task("perplexity", True, _perplexity),
    "mc": Task("mc_<domain>", True, _items),
    "humaneval": Task("humaneval", False, _humaneval),
    "routing": Task("routing", True, _routing),
    "file": Task("file:PATH", False, _items, takes_path=True),
    **{kind: Task(f"{kind}:PATH", False, _items, takes_path=True)
       for kind in eval_tasks.CONVERTERS},
}
# Tasks a baseline can run: baselines are scored by per-domain perplexity (flexolmo_jax.baselines).
BASELINE_TASKS = ("perplexity",)


def task_kind(name: str) -> str:
  """The TASKS key of a task name."""
  if ":" in name:
    return name.split(":", 1)[0]
  return "mc" if name.startswith("mc_") else name


def parse_tasks(spec: str, domains: Sequence[str]) -> list[str]:
  """The task names in `spec`, with `mc` expanded to every domain; unknown names are refused with
  the valid ones."""
  tasks = []
  for name in (t.strip() for t in spec.split(",") if t.strip()):
    task = TASKS.get(task_kind(name))
    if name == "mc":
      tasks += [f"mc_{d}" for d in domains]
    elif task is not None and task.takes_path == (":" in name) and (
        not name.startswith("mc_") or name[3:] in domains):
      tasks.append(name)
    else:
      valid = [u for kind, t in TASKS.items()
               for u in (["mc"] + [f"mc_{d}" for d in domains] if kind == "mc" else [t.usage])]
      raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(valid)}")
  if not tasks:
    raise ValueError("--tasks names no task")
  return list(dict.fromkeys(tasks))


def evaluate(config: ModelConfig, params, tokenizer, tasks: Sequence[str], *, out_dir: str,
             data_root: str | None = None, domains: Sequence[str] = (), split: str = "test",
             expert_mask=None, names: Sequence[str] = (), batch_size: int = 8,
             max_len: int = 1024, seq_len: int = 512, mc_items: int = 200,
             max_new_tokens: int = 256, humaneval_limit: int | None = None,
             timeout: float = 10.0, baseline: baselines.Baseline | None = None,
             allow_unsandboxed_code: bool = False) -> dict:
  """Runs `tasks` (names as parse_tasks returns them) and returns {task: metrics}; samples of
  generation tasks and the routing report are written under `out_dir`. With `baseline`, the
  merged model (config, params, names) is the baseline's parts, and the baseline is scored."""
  needs_data = [t for t in tasks if TASKS[task_kind(t)].needs_data]
  if (needs_data or baseline) and not data_root:
    raise ValueError(f"{needs_data or ['a baseline']} need a prepared corpus: pass --data")
  score_batches = scoring.model_scorer(config, params, expert_mask)
  if baseline is not None:
    other = [t for t in tasks if t not in BASELINE_TASKS]
    if other or expert_mask is not None or len(names) != config.num_experts or not names:
      raise ValueError(f"baseline {baseline.name} needs a merged model with its expert names, "
                       f"every expert, and only the tasks {list(BASELINE_TASKS)} (got tasks "
                       f"{list(tasks)})")
    score_batches = baseline.build(baselines.Parts.from_merged(config, params, names, data_root))
  paths.path(out_dir).mkdir(parents=True, exist_ok=True)
  ctx = Context(config, params, tokenizer, out_dir, data_root, list(domains), split, expert_mask,
                list(names), batch_size, max_len, seq_len, mc_items, max_new_tokens,
                humaneval_limit, timeout, score_batches, allow_unsandboxed_code)
  if "routing" in tasks and not config.is_moe:
    raise ValueError("the routing task needs a mixture-of-experts model; this one is dense")
  return {task: TASKS[task_kind(task)].run(ctx, task)
          for task in progress.bar(tasks, desc="evaluate", unit="task")}


def _slug(task: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", task).strip("_")


def _with_samples_file(result: dict, out_dir: str, task: str) -> dict:
  """Moves a result's samples into <out_dir>/<task>_samples.jsonl."""
  path = paths.path(out_dir) / f"{_slug(task)}_samples.jsonl"
  with atomic.replacing(path, encoding="utf-8") as f:
    for sample in result.pop("samples"):
      f.write(json.dumps(sample, ensure_ascii=False) + "\n")
  return {**result, "samples_file": str(path)}


def markdown(report: dict) -> str:
  """A results table: one row per task and metric."""
  built = f"baseline {report['baseline']} built from " if report.get("baseline") else ""
  lines = [f"# Evaluation of {built}{report['model']}", "",
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
  """Writes results.json and results.md under `out_dir` (local or remote, paths.py), atomically."""
  out = paths.path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  atomic.write_text(out / "results.json", json.dumps(report, indent=1, sort_keys=False))
  atomic.write_text(out / "results.md", markdown(report))
  return {"json": str(out / "results.json"), "md": str(out / "results.md")}


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
  flags.DEFINE_string("expert_mask", subsets.ALL, "Experts allowed: all, public+math or -code "
                      "(flexolmo_jax/subsets.py).")
  flags.DEFINE_enum("baseline", None, list(baselines.NAMES), "Score this baseline, built from "
                    "the merged --model, instead of the model (tasks: perplexity).")
  flags.DEFINE_integer("btm_top_k", baselines.Options.btm_top_k, "--baseline=btm: members "
                       "mixed per token.")
  flags.DEFINE_integer("tune_steps", baselines.Options.tune_steps, "--baseline=btx: router steps.")
  flags.DEFINE_integer("seed", baselines.Options.seed, "--baseline=btx / prompt_routing: seed.")
  flags.DEFINE_integer("batch_size", 8, "Rows per forward pass.")
  flags.DEFINE_integer("max_len", 1024, "Longest scored/generated sequence (tokens).")
  flags.DEFINE_integer("seq_len", 512, "Row length for perplexity and routing.")
  flags.DEFINE_integer("mc_items", 200, "Items per domain multiple-choice task.")
  flags.DEFINE_integer("max_new_tokens", 256, "Generation length limit.")
  flags.DEFINE_integer("humaneval_limit", None, "Only the first N HumanEval problems.")
  flags.DEFINE_float("timeout", 10.0, "Seconds per sandboxed HumanEval program.")
  flags.DEFINE_bool("allow_unsandboxed_code", False,
                    "Run HumanEval's generated code even where it cannot be isolated (never as "
                    "root); see docs/sandbox.md.")
  flags.mark_flags_as_required(["model", "out"])


def main(argv):
  del argv
  cli.default_verbosity()
  f = flags.FLAGS
  config, params, manifest = runs.load_params(f.model)
  names = expert_names(config, manifest)
  mask = subsets.expert_mask(f.expert_mask, names)
  baseline = None if f.baseline is None else baselines.get(
      f.baseline, baselines.Options(f.btm_top_k, f.tune_steps, f.seed))
  domains = f.domains or (sorted(load_manifest(f.data)["domains"]) if f.data else [])
  tasks = parse_tasks(f.tasks, domains)
  tokenizer = tokenizer_lib.for_model(f.model, manifest, data_root=f.data, override=f.tokenizer)
  if f.data:  # Perplexity and routing read the corpus's own token ids.
    tokenizer_lib.check_matches(manifest, load_manifest(f.data), model=f.model)
  if tokenizer.vocab_size > config.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                     f"{config.vocab_size}; pass the model's own tokenizer with --tokenizer")
  results = evaluate(config, params, tokenizer, tasks, out_dir=f.out, data_root=f.data,
                     domains=domains, split=f.split, expert_mask=mask, names=names,
                     batch_size=f.batch_size, max_len=f.max_len, seq_len=f.seq_len,
                     mc_items=f.mc_items, max_new_tokens=f.max_new_tokens,
                     humaneval_limit=f.humaneval_limit, timeout=f.timeout,
                     baseline=baseline, allow_unsandboxed_code=f.allow_unsandboxed_code)
  report = {"model": f.model, "baseline": f.baseline, "data": f.data, "split": f.split,
            "experts": names,
            "allowed_experts": [] if mask is None else [n for n, m in zip(names, mask) if m],
            "config": config.to_dict(), "tasks": results}
  written = write_results(report, f.out)
  print(markdown(report))
  print(f"wrote {written['json']} and {written['md']}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
