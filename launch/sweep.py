r"""The evaluation sweep: models x expert subsets x tasks, resumable, spread over hosts.

  python -m launch.sweep --data=runs/data --out=runs/sweep \
      --models=flexolmo=runs/merged,public=runs/public \
      --subsets=all,public,public+math,-math --tasks=perplexity,mc

A subset is `all`, names joined by `+` (the experts allowed; `public` is expert 0), or `-name`
(every expert but that one: opt-out, exactly as if it had never been merged). Dense models only
get the `all` cell. Each cell (model, subset, task) has a stable id: a hash of the model's
manifest, the subset, the task and the evaluation options, so a finished cell is never
recomputed, and a changed model or option makes new cells. Results are appended, one record per
finished cell, to results.jsonl and (one row per metric) results.csv; summary.md tabulates every
finished cell. On a pod (run on every host with --distributed) each host takes the cells whose id hashes to its index
(--host_index/--host_count, default jax.process_index()/process_count()) and appends to
results.host<i>.jsonl / .csv, so hosts never write the same file; the summary reads them all.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Sequence

import jax
from absl import logging

from flexolmo_jax import distributed, evaluate, runs
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


def _manifest_hash(path: str) -> str:
  manifest = pathlib.Path(path) / runs.MANIFEST
  if not manifest.exists():
    raise FileNotFoundError(f"{path} holds no model ({runs.MANIFEST} missing)")
  return hashlib.sha256(manifest.read_bytes()).hexdigest()


def make_cells(models: Sequence[tuple[str, str]], subsets: Sequence[str], tasks: Sequence[str],
               options: dict) -> list[Cell]:
  """Every (model, subset, task) cell with its stable id; dense models get only `all`."""
  cells = []
  for name, path in models:
    manifest = json.loads((pathlib.Path(path) / runs.MANIFEST).read_text())
    is_moe = manifest.get("config", {}).get("num_experts", 0) > 0
    for subset in (subsets if is_moe else [s for s in subsets if s == "all"]):
      for task in tasks:
        key = json.dumps([_manifest_hash(path), subset, task, options], sort_keys=True)
        cells.append(Cell(name, path, subset, task, hashlib.sha256(key.encode()).hexdigest()[:16]))
  return cells


def mine(cells: Sequence[Cell], host_index: int, host_count: int) -> list[Cell]:
  """The cells this host runs: those whose id hashes to its index."""
  return [c for c in cells if int(c.id, 16) % host_count == host_index]


def subset_mask(subset: str, names: Sequence[str]) -> str:
  """The evaluate --expert_mask spec of a subset ("" allows every expert)."""
  if subset == "all":
    return ""
  if subset.startswith("-"):
    drop = subset[1:]
    if drop not in names or drop == "public":
      raise ValueError(f"subset {subset!r}: cannot drop {drop!r}; experts: {list(names)}")
    return ",".join(n for n in names if n != drop)
  return ",".join(subset.split("+"))


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
        host_index: int = 0, host_count: int = 1, **eval_options) -> list[str]:
  """Evaluates this host's unfinished cells (each model loaded once); returns their ids."""
  os.makedirs(out, exist_ok=True)
  suffix = "" if host_count == 1 else f".host{host_index}"
  done = finished_ids(out)
  todo = [c for c in mine(cells, host_index, host_count) if c.id not in done]
  print(f"host {host_index}/{host_count}: {len(todo)} cells to run, "
        f"{len(cells) - len(todo)} finished or on other hosts", flush=True)
  tokenizer = load_tokenizer(data)
  computed = []
  for path in dict.fromkeys(c.path for c in todo):
    config, params, manifest = runs.load_params(path)
    tokenizer_lib.check_matches(manifest, load_manifest(data), model=path)
    names = evaluate.expert_names(config, manifest)
    for cell in (c for c in todo if c.path == path):
      start = time.perf_counter()
      mask = evaluate.parse_expert_mask(subset_mask(cell.subset, names), names)
      results = evaluate.evaluate(config, params, tokenizer, [cell.task],
                                  out_dir=os.path.join(out, "cells", cell.id), data_root=data,
                                  domains=domains, split=split, expert_mask=mask, names=names,
                                  **eval_options)
      record = {**dataclasses.asdict(cell), "split": split, "host": host_index,
                "seconds": round(time.perf_counter() - start, 2),
                "metrics": flatten(results[cell.task])}
      _append(out, suffix, record)
      computed.append(cell.id)
      print(f"[{len(computed)}/{len(todo)}] {cell.model} {cell.subset} {cell.task} "
            f"({record['seconds']:.1f}s)", flush=True)
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
  pathlib.Path(out, "summary.md").write_text(text)
  return text


def _pairs(spec: str) -> list[tuple[str, str]]:
  pairs = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, path = item.partition("=")
    if not sep:
      raise SystemExit(f"error: --models entry {item!r} is not name=DIR")
    pairs.append((name, path))
  return pairs


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", required=True, help="name=DIR,... (runs or params artifacts)")
  p.add_argument("--subsets", default="all", help="all, a+b, -name; comma-separated")
  p.add_argument("--tasks", default="perplexity", help="evaluate's task names, comma-separated")
  p.add_argument("--data", required=True, help="the prepared corpus")
  p.add_argument("--out", required=True, help="results directory (shared by every host)")
  p.add_argument("--domains", default="", help="domains for perplexity/mc (default: all)")
  p.add_argument("--split", default="test", choices=["validation", "test"])
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=512)
  p.add_argument("--mc_items", type=int, default=200)
  p.add_argument("--host_index", type=int, default=None)
  p.add_argument("--host_count", type=int, default=None)
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() first (a multi-host pod), so the host "
                      "index and count come from JAX")
  args = p.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  if args.distributed:
    distributed.initialize(True)  # Also reads JAX_NUM_PROCESSES / JAX_PROCESS_ID (multi-node GPU).
  host_index = jax.process_index() if args.host_index is None else args.host_index
  host_count = jax.process_count() if args.host_count is None else args.host_count
  domains = args.domains.split(",") if args.domains else sorted(load_manifest(args.data)["domains"])
  tasks = evaluate.parse_tasks(args.tasks, domains)
  options = dict(batch_size=args.batch_size, seq_len=args.seq_len, mc_items=args.mc_items)
  cells = make_cells(_pairs(args.models), args.subsets.split(","), tasks,
                     {**options, "split": args.split, "domains": domains, "data": args.data})
  run(cells, data=args.data, out=args.out, domains=domains, split=args.split,
      host_index=host_index, host_count=host_count, **options)
  print(summary(args.out))


if __name__ == "__main__":
  main(sys.argv[1:])
