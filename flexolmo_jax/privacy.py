"""Training-data extraction study (docs/method.md, section 6): how much of a closed domain a model leaks.

  python -m flexolmo_jax.privacy --data=DIR --domain=math --public=DIR --expert=DIR \
      [--dense=DIR] [--dp_expert=DIR] [--train_docs=N] --out=DIR

For each training document of the domain with at least prefix + generate tokens: feed its first
`prefix` tokens, sample `samples` continuations of `generate` tokens (top-k 50, top-p 0.95,
temperature 1.0 by default), and compare each with the true continuation by normalised Levenshtein
similarity on tokens. A document is extracted when some sample reaches `threshold` (0.9). The
extraction rate comes with a Wilson 95% interval. Models: the public model; FlexOlmo = public +
the domain's expert; the same with the expert opted out (expert_mask); optionally a dense model
fine-tuned on the domain (configs/math_dense.py) and FlexOlmo with a DP-trained expert. Writes
results.json and results.md.

`--train_docs=N` probes only the first N training documents: the memorisation setting, where the
closed-domain runs trained on exactly those (data.train_subset, configs/privacy_memorise.py); the
study refuses runs whose manifest records another subset, so a table never mixes settings.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Sequence

import numpy as np
from absl import flags

from flexolmo_jax import atomic, checkpoint, cli, merge, progress, runs, subsets
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import corpus
from flexolmo_jax.data import tokenizer as tokenizer_lib
from flexolmo_jax.generate import Sampling, generate


def levenshtein(a: Sequence, b: Sequence) -> int:
  """Edit distance (insert, delete, substitute; unit costs) between two sequences."""
  a, b = np.asarray(a), np.asarray(b)
  cols = np.arange(len(b) + 1)
  row = cols.copy()
  for i in range(1, len(a) + 1):
    # Deletion and substitution are vectorised; the insertion chain along the row is a running
    # minimum of (cost - column) shifted back by the column.
    best = np.empty_like(row)
    best[0] = i
    best[1:] = np.minimum(row[1:] + 1, row[:-1] + (b != a[i - 1]))
    row = np.minimum.accumulate(best - cols) + cols
  return int(row[-1])


def similarity(a: Sequence, b: Sequence) -> float:
  """1 - levenshtein(a, b) / max(len(a), len(b)); 1.0 for two empty sequences."""
  longest = max(len(a), len(b))
  return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
  """Wilson score interval for a binomial proportion (95% by default)."""
  if trials <= 0:
    raise ValueError("the Wilson interval needs at least one trial")
  p = successes / trials
  denom = 1 + z * z / trials
  center = (p + z * z / (2 * trials)) / denom
  half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
  return max(0.0, center - half), min(1.0, center + half)


def extraction(config: ModelConfig, params, documents: Sequence[Sequence[int]], *, prefix: int,
               length: int, samples: int, sampling: Sampling, threshold: float, seed: int = 0,
               expert_mask=None, batch_docs: int = 8, desc: str = "extraction") -> dict:
  """Extraction rate of `documents` (token lists of >= prefix + length tokens) under one model.

  `expert_mask` [E] bool applies to every sequence (opt-out). Returns the rate, counts, Wilson
  interval and each document's best similarity.
  """
  if not documents:
    raise ValueError("no documents to test: every document is shorter than prefix + generate")
  best = []
  bar = progress.bar(desc=desc, total=len(documents), unit="doc")
  for start in range(0, len(documents), batch_docs):
    chunk = documents[start:start + batch_docs]
    prompts = [list(doc[:prefix]) for doc in chunk for _ in range(samples)]
    mask = None if expert_mask is None else np.tile(np.asarray(expert_mask, bool), (len(prompts), 1))
    # Extraction compares whole continuations, so eos does not stop sampling.
    out = generate(config, params, prompts, max_new_tokens=length, sampling=sampling,
                   seed=seed + start, stop_at_eos=False, expert_mask=mask, prompt_bucket=prefix)
    for d, doc in enumerate(chunk):
      truth = doc[prefix:prefix + length]
      best.append(max(similarity(out[d * samples + s], truth) for s in range(samples)))
    bar.update(len(chunk))
  bar.close()
  extracted = int(sum(b >= threshold for b in best))
  low, high = wilson_interval(extracted, len(best))
  return {"rate": extracted / len(best), "extracted": extracted, "documents": len(best),
          "ci95": [low, high], "best_similarity": best}


def load_documents(data: str, domain: str, *, min_tokens: int, limit: int, first: int = 0,
                   split: str = "train") -> list[list[int]]:
  """Token ids of up to `limit` documents of `domain`'s `split` with >= min_tokens tokens, taken
  from the first `first` documents of the split (0: the whole split)."""
  tok = corpus.corpus_tokenizer(data)
  rows = corpus.read_text_split(data, domain, split)
  docs = []
  for row in rows[:first] if first else rows:
    ids = tok.encode(row["text"])
    if len(ids) >= min_tokens:
      docs.append(ids)
      if len(docs) == limit:
        break
  return docs


def flexolmo_model(public: str, expert_dir: str) -> tuple[ModelConfig, dict, dict]:
  """(config, params, the expert's manifest) of the public model with one trained expert merged
  in, by merge.assemble (which refuses an expert trained on another public model)."""
  manifest = checkpoint.read_manifest(expert_dir)
  if manifest.get("kind") != "expert":
    raise ValueError(f"{expert_dir} is not an expert run (manifest kind {manifest.get('kind')!r})")
  config, params, _ = merge.assemble(public, {manifest["name"]: expert_dir})
  return config, params, manifest


def check_subset(manifest: dict, where: str, domain: str, train_docs: int) -> None:
  """Refuses a closed-domain run whose training subset of `domain` (data.train_subset in its
  manifest) is not the `train_docs` documents probed (0: the whole domain). Params artifacts carry
  no training config and are taken as given."""
  data = manifest.get("train_config", {}).get("data")
  if data is None:
    return
  trained = data.get("train_subset", {}).get(domain, 0)
  if trained != train_docs:
    said = lambda n: f"the first {n} {domain} documents" if n else f"all {domain} documents"
    raise ValueError(f"{where} was trained on {said(trained)} but the study probes "
                     f"{said(train_docs)}; pass --train_docs={trained} or the runs of the other "
                     "setting")


def dense_model(path: str, domain: str, train_docs: int) -> tuple[ModelConfig, dict]:
  """(config, params) of the dense model fine-tuned on the domain (configs/math_dense.py)."""
  config, params, manifest = runs.load_params(path)
  if config.is_moe or manifest.get("kind") == "expert":
    raise ValueError(f"{path} is not a dense model; --dense needs the public model fine-tuned on "
                     f"{domain} (python -m flexolmo_jax.train --config=configs/math_dense.py)")
  check_subset(manifest, path, domain, train_docs)
  return config, params


def run_study(*, data: str, domain: str, public: str, expert: str, out: str, dense: str = "",
              dp_expert: str = "", num_docs: int = 10_000, prefix: int = 32, length: int = 256,
              samples: int = 10, sampling: Sampling = Sampling(1.0, 50, 0.95),
              threshold: float = 0.9, seed: int = 0, train_docs: int = 0,
              batch_docs: int = 8, split: str = "train") -> dict:
  """Runs the study for every given model; writes results.json and results.md under `out`.

  Rows in the paper's order: public, dense fine-tuned (if given), FlexOlmo with the expert, the
  expert opted out, FlexOlmo with the DP expert (if given). `split="validation"` is the control:
  documents no run trained on, so what is "extracted" there is what the domain makes predictable,
  not memorised (`train_docs` then only checks the runs' setting).
  """
  docs = load_documents(data, domain, min_tokens=prefix + length, limit=num_docs,
                        first=train_docs if split == "train" else 0, split=split)
  if not docs:
    raise ValueError(f"no {domain} {split} document has {prefix + length} tokens; lower "
                     "--prefix or --generate")
  public_config, public_params, public_manifest = runs.load_params(public)
  tokenizer_lib.check_matches(public_manifest, corpus.load_manifest(data), model=public)
  if public_config.is_moe:
    raise ValueError(f"{public} holds a mixture of experts; --public needs the dense public model")
  moe_config, moe_params, moe_manifest = flexolmo_model(public, expert)
  tokenizer_lib.check_matches(moe_manifest, corpus.load_manifest(data), model=expert)
  check_subset(moe_manifest, expert, domain, train_docs)
  models = [("public", public_config, public_params, None, None)]
  if dense:
    models.append((f"dense fine-tuned on {domain}", *dense_model(dense, domain, train_docs),
                   None, None))
  models += [(f"FlexOlmo (public + {domain})", moe_config, moe_params, None, None),
             (f"FlexOlmo, {domain} opted out", moe_config, moe_params,
              subsets.expert_mask(f"-{domain}", ["public", domain]), None)]
  if dp_expert:
    dp_config, dp_params, dp_manifest = flexolmo_model(public, dp_expert)
    if "dp" not in dp_manifest:
      raise ValueError(f"{dp_expert} was not trained with DP-SGD (no dp record in its manifest)")
    check_subset(dp_manifest, dp_expert, domain, train_docs)
    models.append((f"FlexOlmo (public + DP {domain})", dp_config, dp_params, None,
                   dp_manifest["dp"]))
  rows = []
  for name, config, params, mask, dp_record in models:
    result = extraction(config, params, docs, prefix=prefix, length=length, samples=samples,
                        sampling=sampling, threshold=threshold, seed=seed, expert_mask=mask,
                        batch_docs=batch_docs, desc=name)
    rows.append({"model": name, **result,
                 "mean_best_similarity": float(np.mean(result["best_similarity"])),
                 "epsilon": None if dp_record is None else dp_record["epsilon"],
                 "delta": None if dp_record is None else dp_record["delta"]})
  results = {"domain": domain, "documents_available": len(docs), "requested_documents": num_docs,
             "train_docs": train_docs, "split": split,
             "protocol": {"prefix": prefix, "generate": length, "samples": samples,
                          "temperature": sampling.temperature, "top_k": sampling.top_k,
                          "top_p": sampling.top_p, "threshold": threshold, "seed": seed},
             "rows": rows}
  out_dir = pathlib.Path(out)
  out_dir.mkdir(parents=True, exist_ok=True)
  atomic.write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
  atomic.write_text(out_dir / "results.md", format_table(results))
  return results


def format_table(results: dict) -> str:
  """The study's markdown table."""
  p = results["protocol"]
  split = results.get("split", "train")
  if split != "train":
    what = f"{results['domain']} {split} documents (a control: no run trained on them)"
  elif results.get("train_docs"):
    what = (f"of the first {results['train_docs']} (the closed-domain runs' training subset) "
            f"{results['domain']} training documents")
  else:
    what = f"{results['domain']} training documents"
  lines = [f"Extraction on {results['documents_available']} {what} (prefix {p['prefix']}, "
           f"generate {p['generate']}, {p['samples']} samples, "
           f"top-k {p['top_k']}, top-p {p['top_p']}, T {p['temperature']}, similarity >= "
           f"{p['threshold']})", "",
           "| model | extracted | documents | rate | 95% CI (Wilson) | mean best similarity "
           "| DP epsilon |",
           "|---|---|---|---|---|---|---|"]
  for r in results["rows"]:
    eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f} (delta {r['delta']:g})"
    mean = r.get("mean_best_similarity", float(np.mean(r["best_similarity"])))
    lines.append(f"| {r['model']} | {r['extracted']} | {r['documents']} | {100 * r['rate']:.2f}% "
                 f"| [{100 * r['ci95'][0]:.2f}%, {100 * r['ci95'][1]:.2f}%] | {mean:.3f} | {eps} |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line

def define_flags():
  """Defines the command-line flags; only when run as a program, so importing this module
  next to other commands' flags never clashes."""
  flags.DEFINE_string("data", None, "Prepared corpus (python -m flexolmo_jax.data prepare).")
  flags.DEFINE_string("domain", "math", "The closed domain whose training documents are probed.")
  flags.DEFINE_string("public", None, "The dense public model (run directory or artifact).")
  flags.DEFINE_string("expert", None, "The domain's expert run directory.")
  flags.DEFINE_string("dense", "", "Optional: the public model fine-tuned on the domain "
                      "(configs/math_dense.py, or configs/privacy_memorise.py:dense).")
  flags.DEFINE_string("dp_expert", "", "Optional: the domain's expert trained with DP-SGD.")
  flags.DEFINE_string("out", None, "Output directory for results.json and results.md.")
  flags.DEFINE_integer("num_docs", 10_000, "Documents to probe (fewer if fewer are long enough).")
  flags.DEFINE_integer("prefix", 32, "Prompt tokens taken from each document.")
  flags.DEFINE_integer("generate", 256, "Tokens generated and compared with the true continuation.")
  flags.DEFINE_integer("samples", 10, "Sampled continuations per document.")
  flags.DEFINE_integer("top_k", 50, "Top-k sampling (0 = off).")
  flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
  flags.DEFINE_float("threshold", 0.9, "Similarity at which a document counts as extracted.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("train_docs", 0, "Probe only the first N training documents: the subset "
                       "the memorisation runs trained on (configs/privacy_memorise.py); 0 = all.")
  flags.DEFINE_enum("split", "train", ["train", "validation", "test"], "Documents probed: the "
                    "training split, or a control split no run trained on.")
  flags.DEFINE_integer("batch_docs", 8, "Documents per generate call (each with all its samples).")
  flags.mark_flags_as_required(["data", "public", "expert", "out"])


def main(argv):
  del argv
  cli.default_verbosity()
  f = flags.FLAGS
  results = run_study(data=f.data, domain=f.domain, public=f.public, expert=f.expert, out=f.out,
                      dense=f.dense, dp_expert=f.dp_expert, num_docs=f.num_docs, prefix=f.prefix,
                      length=f.generate, samples=f.samples,
                      sampling=Sampling(f.temperature, f.top_k, f.top_p),
                      threshold=f.threshold, seed=f.seed, train_docs=f.train_docs,
                      batch_docs=f.batch_docs, split=f.split)
  print(format_table(results), end="")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
