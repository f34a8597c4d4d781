r"""The evaluation sweep: models x expert subsets x tasks, and baselines, resumable, spread over
hosts.

  python -m launch.sweep --data=runs/data --workdir=runs/sweep \
      --models=flexolmo=runs/merged,public=runs/public \
      --subsets=all,public,public+math,-math --tasks=perplexity,mc [--baselines=soup_uniform,btm]

A subset is `all`, names joined by `+` (the experts allowed; `public` is expert 0), or `-name`
(every expert but that one: opt-out, exactly as if it had never been merged): the syntax of
flexolmo_jax/subsets.py. Dense models only get the `all` cell. Each baseline of --baselines
(flexolmo_jax.baselines) is built from every merged model of --models and scored on the
perplexity task, as the model "<model>/<baseline>". Each cell (model, baseline, subset, task) has
a stable id: a hash of the model's manifest, the subset, the task and the evaluation options, so
a finished cell is never recomputed, and a changed model or option makes new cells. Results are
appended, one record per finished cell, to results.jsonl and (one row per metric) results.csv
under --workdir; summary.md tabulates every finished cell. On a pod (run on every host with
--distributed) each host takes the cells whose id hashes to its index (--host_index/--host_count,
default jax.process_index()/process_count()) and appends to results.host<i>.jsonl / .csv, so hosts
never write the same file; the summary reads them all.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import time
from typing import Sequence

import jax
from absl import app, flags

from flexolmo_jax import atomic, baselines, cli, distributed, evaluate, progress, runs, subsets
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import load_manifest, load_tokenizer
from flexolmo_jax.data import tokenizer as tokenizer_lib

SUMMARY_METRICS = ("acc", "acc_per_token", "acc_per_char", "exact_match", "pass@1")


@dataclasses.dataclass(frozen=True)
class Cell:
  model: str
  path: str
  subset: str
  task: str
  id: str
  baseline: str = ""  # a flexolmo_jax.baselines name: the baseline built from the model at path


def _manifest_hash(path: str) -> str:
  manifest = pathlib.Path(path) / runs.MANIFEST
  if not manifest.exists():
    raise FileNotFoundError(f"{path} holds no model ({runs.MANIFEST} missing)")
  return hashlib.sha256(manifest.read_bytes()).hexdigest()


def make_cells(models: Sequence[tuple[str, str]], subsets_: Sequence[str], tasks: Sequence[str],
               options: dict, baseline_names: Sequence[str] = (),
               baseline_options: baselines.Options = baselines.Options()) -> list[Cell]:
  """Every (model, subset, task) cell with its stable id (dense models get only `all`), then a
  perplexity cell per baseline and merged model; every subset is checked against the model's
  experts first."""
  cells = []
  for name, path in models:
    manifest = json.loads((pathlib.Path(path) / runs.MANIFEST).read_text())
    experts = evaluate.expert_names(ModelConfig.from_dict(manifest["config"]), manifest)
    for subset in subsets_ if experts else ():
      subsets.parse_expert_subset(subset, experts)  # A typo stops the sweep before it starts.
    for subset in (subsets_ if experts else [s for s in subsets_ if s == subsets.ALL]):
      for task in tasks:
        key = json.dumps([_manifest_hash(path), subset, task, options], sort_keys=True)
        cells.append(Cell(name, path, subset, task, hashlib.sha256(key.encode()).hexdigest()[:16]))
    for baseline in (baseline_names if experts else ()):
      baselines.get(baseline)  # Refuses an unknown name before anything runs.
      key = json.dumps([_manifest_hash(path), subsets.ALL, "perplexity", options, baseline,
                        dataclasses.asdict(baseline_options)], sort_keys=True)
      cells.append(Cell(f"{name}/{baseline}", path, subsets.ALL, "perplexity",
                        hashlib.sha256(key.encode()).hexdigest()[:16], baseline))
  return cells


def mine(cells: Sequence[Cell], host_index: int, host_count: int) -> list[Cell]:
  """The cells this host runs: those whose id hashes to its index."""
  return [c for c in cells if int(c.id, 16) % host_count == host_index]


def finished_ids(out: str) -> set[str]:
  """Ids of every cell recorded by any host under `out`."""
  done = set()
  for path in glob.glob(os.path.join(out, "results*.jsonl")):
    with open(path, encoding="utf-8") as f:
      done |= {json.loads(line)["id"] for line in f if line.strip()}
  return done


def flatten(metrics: dict, prefix: str = "") -> dict:
  """{"math/perplexity": 3.2, ...} from evaluate's nested per-task metrics (numbers only)."""
  out = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(flatten(value, name + "/"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[name] = value
  return out


def _append(out: str, suffix: str, record: dict) -> None:
  with open(os.path.join(out, f"results{suffix}.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")
  csv_path = os.path.join(out, f"results{suffix}.csv")
  new = not os.path.exists(csv_path)
  with open(csv_path, "a", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    if new:
      writer.writerow(["id", "model", "subset", "task", "metric", "value"])
    for metric, value in record["metrics"].items():
      writer.writerow([record["id"], record["model"], record["subset"], record["task"], metric,
                       value])


def run(cells: Sequence[Cell], *, data: str, out: str, domains: Sequence[str], split: str,
        host_index: int = 0, host_count: int = 1,
        baseline_options: baselines.Options = baselines.Options(), **eval_options) -> list[str]:
  """Evaluates this host's unfinished cells (each model loaded once) into `out`; returns their
  ids."""
  os.makedirs(out, exist_ok=True)
  suffix = "" if host_count == 1 else f".host{host_index}"
  done = finished_ids(out)
  todo = [c for c in mine(cells, host_index, host_count) if c.id not in done]
  print(f"host {host_index}/{host_count}: {len(todo)} cells to run, "
        f"{len(cells) - len(todo)} finished or on other hosts", flush=True)
  tokenizer = load_tokenizer(data)
  computed = []
  bar = progress.bar(desc="sweep", total=len(todo), unit="cell")
  for path in dict.fromkeys(c.path for c in todo):
    config, params, manifest = runs.load_params(path)
    tokenizer_lib.check_matches(manifest, load_manifest(data), model=path)
    names = evaluate.expert_names(config, manifest)
    for cell in (c for c in todo if c.path == path):
      start = time.perf_counter()
      baseline = baselines.get(cell.baseline, baseline_options) if cell.baseline else None
      results = evaluate.evaluate(config, params, tokenizer, [cell.task],
                                  out_dir=os.path.join(out, "cells", cell.id), data_root=data,
                                  domains=domains, split=split,
                                  expert_mask=subsets.expert_mask(cell.subset, names),
                                  names=names, baseline=baseline, **eval_options)
      record = {**dataclasses.asdict(cell), "split": split, "host": host_index,
                "seconds": round(time.perf_counter() - start, 2),
                "metrics": flatten(results[cell.task])}
      _append(out, suffix, record)
      computed.append(cell.id)
      bar.update(1)
      print(f"[{len(computed)}/{len(todo)}] {cell.model} {cell.subset} {cell.task} "
            f"({record['seconds']:.1f}s)", flush=True)
  bar.close()
  return computed


def summary(out: str) -> str:
  """summary.md over every host's records: per task, one row per (model, subset)."""
  records = []
  for path in sorted(glob.glob(os.path.join(out, "results*.jsonl"))):
    with open(path, encoding="utf-8") as f:
      records += [json.loads(line) for line in f if line.strip()]
  lines = ["# Evaluation sweep", ""]
  for task in dict.fromkeys(r["task"] for r in records):
    rows = [r for r in records if r["task"] == task]
    keys = sorted({k for r in rows for k in r["metrics"]
                   if k.endswith("perplexity") or k.split("/")[-1] in SUMMARY_METRICS})
    lines += [f"## {task}", "", "| model | subset | " + " | ".join(keys) + " |",
              "|---" * (len(keys) + 2) + "|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["subset"])):
      cells = [f"{r['metrics'][k]:.4g}" if k in r["metrics"] else "" for k in keys]
      lines.append(f"| {r['model']} | {r['subset']} | " + " | ".join(cells) + " |")
    lines.append("")
  text = "\n".join(lines)
  atomic.write_text(pathlib.Path(out, "summary.md"), text)
  return text


def _pairs(items: Sequence[str]) -> list[tuple[str, str]]:
  pairs = []
  for item in items:
    name, sep, path = item.partition("=")
    if not sep:
      raise ValueError(f"--models entry {item!r} is not name=DIR")
    pairs.append((name, path))
  return pairs


def define_flags() -> None:
  """Flags, defined only when run as a program."""
  flags.DEFINE_list("models", None, "name=DIR,... (runs or params artifacts).")
  flags.DEFINE_list("subsets", [subsets.ALL], "Expert subsets: all, a+b, -name.")
  flags.DEFINE_string("tasks", "perplexity", "evaluate's task names, comma-separated.")
  flags.DEFINE_list("baselines", [], f"Baselines built from each merged model, scored on "
                    f"perplexity: {', '.join(baselines.NAMES)}.")
  flags.DEFINE_string("data", None, "The prepared corpus.")
  flags.DEFINE_string("workdir", None, "Results directory, shared by every host; a rerun "
                      "computes only the cells not finished there.")
  flags.DEFINE_alias("out", "workdir")  # The name the README used before the --workdir rule.
  flags.DEFINE_list("domains", [], "Domains for perplexity/mc (default: all).")
  flags.DEFINE_enum("split", "test", ["validation", "test"], "Held-out split.")
  flags.DEFINE_integer("batch_size", 8, "Rows per forward pass.")
  flags.DEFINE_integer("seq_len", 512, "Row length for perplexity and routing.")
  flags.DEFINE_integer("mc_items", 200, "Items per domain multiple-choice task.")
  flags.DEFINE_integer("btm_top_k", baselines.Options.btm_top_k, "btm: members mixed per token.")
  flags.DEFINE_integer("tune_steps", baselines.Options.tune_steps, "btx: router steps.")
  flags.DEFINE_integer("seed", baselines.Options.seed, "btx / prompt_routing: seed.")
  flags.DEFINE_integer("host_index", None, "This host's index (default: jax.process_index()).")
  flags.DEFINE_integer("host_count", None, "Hosts (default: jax.process_count()).")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (a multi-host "
                    "pod), so the host index and count come from JAX.")
  flags.mark_flags_as_required(["models", "data", "workdir"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.default_verbosity()
  f = flags.FLAGS
  if f.distributed:
    distributed.initialize(True)  # Also reads JAX_NUM_PROCESSES / JAX_PROCESS_ID (multi-node GPU).
  host_index = jax.process_index() if f.host_index is None else f.host_index
  host_count = jax.process_count() if f.host_count is None else f.host_count
  domains = f.domains or sorted(load_manifest(f.data)["domains"])
  tasks = evaluate.parse_tasks(f.tasks, domains)
  options = dict(batch_size=f.batch_size, seq_len=f.seq_len, mc_items=f.mc_items)
  baseline_options = baselines.Options(f.btm_top_k, f.tune_steps, f.seed)
  cells = make_cells(_pairs(f.models), f.subsets, tasks,
                     {**options, "split": f.split, "domains": domains, "data": f.data},
                     f.baselines, baseline_options)
  run(cells, data=f.data, out=f.workdir, domains=domains, split=f.split, host_index=host_index,
      host_count=host_count, baseline_options=baseline_options, **options)
  print(summary(f.workdir))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
