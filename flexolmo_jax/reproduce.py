r"""The small end-to-end reproduction (launch/small_demo.sh runs it): FlexMix-mini -> public model
-> one expert per closed domain, each trained in its own process on its own domain only ->
ablation experts -> merge -> router tuning -> FlexOlmo, baselines, ablations and opt-out scored
by per-domain held-out perplexity -> the routing plot -> results.json / results.md with the
paper's findings checked against the numbers.

  python -m flexolmo_jax.reproduce --workdir=runs [--scale=medium] [--public_steps=300 ...]

The default (small) tier takes about 20 minutes on a quiet 2-core CPU; `--scale=medium` (SCALES)
trains a larger public model longer and each expert for several epochs of its domain, three
times with seeds 0, 1, 2 (about 2 hours; docs/reproduction.md). Flags given explicitly override
the tier's values. Every stage prints progress.

Every stage reuses finished work (a trained run, a merged artifact), so re-running continues.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
from absl import flags

from flexolmo_jax import atomic, baselines, cli, merge, router_init, router_tuning, routing_analysis, runs
from flexolmo_jax import routing_diagnostics, scoring
from flexolmo_jax.data import corpus
from flexolmo_jax.data import pipeline as data_pipeline
from flexolmo_jax.data.config import DataConfig


@dataclasses.dataclass(frozen=True)
class Options:
  """The reproduction's settings (the command's flags)."""
  workdir: str = "runs"
  domains: tuple[str, ...] = corpus.CLOSED_DOMAINS
  public_steps: int = 300
  expert_steps: int = 40
  ablation_domains: tuple[str, ...] = ("math",)
  tune_steps: int = 100
  top_k: int = 4
  btm_top_k: int = 2
  eval_batches: int = 4
  seeds: tuple[int, ...] = (0,)
  # A smaller corpus for quick checks (the notebook's CI run); None keeps data prepare's defaults.
  max_docs_per_domain: int | None = None
  vocab_size: int | None = None
  max_chars_per_domain: int | None = None  # Corpus: None keeps data prepare's default.
  scale: str = "small"  # The tier these settings came from (SCALES).
  public_config: str = "configs/public.py"
  # > 0: each expert (and ablation) trains for this many epochs of its owner's data
  # (expert_steps_for), in place of expert_steps.
  expert_epochs: float = 0.0
  # > 0: an owner's data is the first documents of its domain's train split holding this many
  # tokens (owner_data; data.train_subset of its runs); 0: the whole split.
  expert_tokens: int = 0
  # Non-empty: everything trained (public model, experts, ablations) is trained once per seed,
  # under <workdir>/seed<s>/ (training_dirs); empty: once, with seed 0, directly in <workdir>.
  train_seeds: tuple[int, ...] = ()


# The reproduction's tiers: the Options fields each sets (docs/reproduction.md has the budget).
SCALES = {
    "small": {},
    "medium": dict(public_config="configs/public_medium.py", public_steps=500,
                   expert_epochs=3.0, expert_tokens=65_536, seeds=(0, 1, 2),
                   train_seeds=(0, 1, 2)),
}
# The flags that set Options fields of the same name (workdir also answers to --runs).
_FIELD_FLAGS = ("workdir", "domains", "public_steps", "expert_steps", "ablation_domains",
                "tune_steps", "top_k", "btm_top_k", "eval_batches", "seeds",
                "max_docs_per_domain", "vocab_size", "max_chars_per_domain", "public_config",
                "expert_epochs", "expert_tokens", "train_seeds")


def scaled(scale: str, **overrides) -> Options:
  """The Options of tier `scale` (SCALES), with `overrides` on top."""
  if scale not in SCALES:
    raise ValueError(f"--scale={scale} is not a tier; choose one of {', '.join(SCALES)}")
  return dataclasses.replace(Options(), scale=scale, **{**SCALES[scale], **overrides})


def define_flags() -> None:
  """Flags, defined only when run as a program; each sets the Options field of its name."""
  d = Options()
  flags.DEFINE_string("workdir", d.workdir, "Directory for every artifact and the results; a "
                      "rerun reuses what is finished there.")
  flags.DEFINE_alias("runs", "workdir")  # The name the README used before the --workdir rule.
  flags.DEFINE_list("domains", list(d.domains), "Closed domains (experts).")
  flags.DEFINE_integer("public_steps", d.public_steps, "Public pretraining steps.")
  flags.DEFINE_integer("expert_steps", d.expert_steps, "Steps per expert (and ablation).")
  flags.DEFINE_list("ablation_domains", list(d.ablation_domains),
                    "Domains whose experts are retrained for each ablation.")
  flags.DEFINE_integer("tune_steps", d.tune_steps, "Router-tuning (and BTX router) steps.")
  flags.DEFINE_integer("top_k", d.top_k, "Experts per token at inference (clamped).")
  flags.DEFINE_integer("btm_top_k", d.btm_top_k, "Ensemble members mixed per token by BTM.")
  flags.DEFINE_integer("eval_batches", d.eval_batches, "Test batches (8 x 128 tokens) per domain.")
  flags.DEFINE_list("seeds", [str(x) for x in d.seeds], "Seeds of the seed-dependent stages "
                    "(router tuning with its proxy sets, BTX, prompt routing): each is run per "
                    "seed and the tables show the mean. The first also seeds the random-init "
                    "ablation rows.")
  flags.DEFINE_integer("max_docs_per_domain", None, "Corpus: cap on documents per domain.")
  flags.DEFINE_integer("vocab_size", None, "Corpus: tokenizer vocabulary size.")
  flags.DEFINE_integer("max_chars_per_domain", None, "Corpus: cap on characters per domain.")
  flags.DEFINE_enum("scale", d.scale, list(SCALES), "The reproduction's tier: its settings for "
                    "every flag not given explicitly (docs/reproduction.md).")
  flags.DEFINE_string("public_config", d.public_config, "Config file of the public model.")
  flags.DEFINE_float("expert_epochs", d.expert_epochs, "If > 0: each expert trains this many "
                     "epochs of its domain (steps from its token count) in place of expert_steps.")
  flags.DEFINE_integer("expert_tokens", d.expert_tokens, "If > 0: each owner's data is the first "
                       "documents of its domain's train split holding this many tokens.")
  flags.DEFINE_list("train_seeds", [], "Train the public model, experts and ablations once per "
                    "seed, under WORKDIR/seed<s>/ (empty: once, seed 0, in WORKDIR).")


def options_from_flags() -> Options:
  """The --scale tier's Options with every flag given explicitly on top."""
  f = flags.FLAGS
  given = {}
  for name in _FIELD_FLAGS:
    if f[name].present or (name == "workdir" and f["runs"].present):
      value = f[name].value
      if name in ("seeds", "train_seeds"):
        value = tuple(int(x) for x in value)
      elif isinstance(value, list):
        value = tuple(value)
      given[name] = value
  given.setdefault("workdir", f.workdir)
  return scaled(f.scale, **given)


EVAL_BATCH, EVAL_SEQ = 8, 128
_START = time.perf_counter()


def log(message: str) -> None:
  print(f"[{time.perf_counter() - _START:7.1f}s] {message}", flush=True)


def _run(*args: str) -> None:
  """Runs one stage in its own process (output streams through)."""
  log("$ " + " ".join(args))
  subprocess.run([sys.executable, "-m", *args], check=True)


def _finished(workdir: pathlib.Path, steps: int) -> bool:
  path = workdir / runs.MANIFEST
  return path.exists() and json.loads(path.read_text()).get("step", 0) >= steps


# Expert training batches (configs/expert_base.py): tokens per step = batch x sequence length.
EXPERT_BATCH, EXPERT_SEQ = 16, 128
ABLATIONS = ("solo", "random_init", "no_bias")


def training_dirs(opts: Options) -> dict[int, pathlib.Path]:
  """seed -> the directory holding that seed's trained models: public/, experts/<domain>/,
  ablations/<solo|random_init|no_bias>/<domain>/ (and ablations/random_rows.npz). Without
  train_seeds: {0: workdir}, the small tier's layout; with them: {s: workdir/seed<s>}. The
  corpus is workdir/data for every seed."""
  root = pathlib.Path(opts.workdir)
  if not opts.train_seeds:
    return {0: root}
  return {s: root / f"seed{s}" for s in opts.train_seeds}


def owner_data(opts: Options, data: pathlib.Path, domain: str) -> tuple[int, int]:
  """(documents, tokens) an expert of `domain` trains on: with expert_tokens, the first
  documents of the domain's train split that hold at least that many tokens (its runs'
  data.train_subset); otherwise, or when the split is smaller, all of it (documents 0)."""
  if opts.expert_tokens > 0:
    records = data_pipeline.documents(DataConfig(path=str(data), domains=(domain,)), "train")
    tokens = 0
    for i in range(len(records)):
      tokens += len(records[i]) // 4  # int32 ids, EOS included.
      if tokens >= opts.expert_tokens:
        return i + 1, tokens
  return 0, corpus.load_manifest(str(data))["domains"][domain]["train"]["tokens"]


def expert_steps_for(opts: Options, tokens: int) -> int:
  """An expert's training steps: expert_steps, or with expert_epochs that many epochs of its
  owner's `tokens` in EXPERT_BATCH x EXPERT_SEQ batches."""
  if opts.expert_epochs <= 0:
    return opts.expert_steps
  return max(1, math.ceil(opts.expert_epochs * tokens / (EXPERT_BATCH * EXPERT_SEQ)))


def expert_data_flags(opts: Options, domain: str) -> tuple[list[str], int]:
  """(the --config flags that give a run on `domain` its owner's data, the steps of one expert
  run on it); every run trained on an owner's data (experts, ablations) uses both."""
  data = pathlib.Path(opts.workdir) / "data"
  documents, tokens = owner_data(opts, data, domain)
  flags_ = [f"--config.data.path={data}"]
  if documents:
    subset = {domain: documents}
    flags_.append(f"--config.data.train_subset={subset!r}")
  return flags_, expert_steps_for(opts, tokens)


# Validation batches per domain of an expert run's evaluations (loss and routing diagnostics).
DIAGNOSTIC_BATCHES = 2


def _train_expert(opts: Options, root, seed, domain, workdir, *overrides,
                  module="flexolmo_jax.train"):
  data_flags, steps = expert_data_flags(opts, domain)
  if _finished(workdir, steps):
    log(f"reusing {workdir}")
    return
  extra = [f"--config.eval_every={steps}"]
  if opts.expert_epochs > 0:
    # Warmup a tenth of the run (the small tier's config: 30 of 40 steps); four evaluations,
    # so that the routing diagnostics draw a curve (fit evaluates only on logged steps).
    every = max(1, steps // 4)
    extra = [f"--config.optim.warmup_steps={max(1, steps // 10)}",
             f"--config.eval_every={every}", f"--config.log_every={every}"]
  if opts.train_seeds:
    extra += [f"--config.seed={seed}", f"--config.data.seed={seed}"]
  if module == "flexolmo_jax.train":
    # Routing diagnostics on every domain's validation text (routing_diagnostics.py): the
    # researcher's view; the run still trains on its own domain only.
    extra += [f"--config.eval_domains={('public', *opts.domains)!r}",
              f"--config.eval_batches={DIAGNOSTIC_BATCHES}"]
  _run(module, f"--config=configs/{domain}_expert.py", f"--workdir={workdir}", *data_flags,
       f"--config.expert.public={root / 'public'}",
       f"--config.steps={steps}", f"--config.checkpoint_every={steps}", *extra, *overrides)


def train_everything(opts: Options) -> None:
  """Data, then per training seed (training_dirs) the public model, experts and ablation
  experts, each in its own process."""
  data = pathlib.Path(opts.workdir) / "data"
  corpus_flags = [f"--{k}={getattr(opts, k)}"
                  for k in ("max_docs_per_domain", "vocab_size", "max_chars_per_domain")
                  if getattr(opts, k) is not None]
  _run("flexolmo_jax.data", "prepare", f"--out={data}", *corpus_flags)
  for seed, root in training_dirs(opts).items():
    seed_flags = ([f"--config.seed={seed}", f"--config.data.seed={seed}"] if opts.train_seeds
                  else [])
    if _finished(root / "public", opts.public_steps):
      log(f"reusing the public model in {root / 'public'}")
    else:
      _run("flexolmo_jax.train", f"--config={opts.public_config}",
           f"--workdir={root / 'public'}", f"--config.data.path={data}",
           f"--config.steps={opts.public_steps}", *seed_flags)
    for domain in opts.domains:
      _train_expert(opts, root, seed, domain, root / "experts" / domain)
    emb = root / "ablations" / "random_rows.npz"
    if not emb.exists():
      config, _, _ = runs.load_params(root / "public")
      rng = np.random.default_rng(seed if opts.train_seeds else opts.seeds[0])
      rows = {d: config.init_std * rng.normal(size=(config.n_layers, config.d_model))
              for d in ("public",) + opts.ablation_domains}
      emb.parent.mkdir(parents=True, exist_ok=True)
      router_init.save_embeddings(str(emb), rows)
    for domain in opts.ablation_domains:
      _train_expert(opts, root, seed, domain, root / "ablations" / "solo" / domain,
                    module="flexolmo_jax.solo_expert")
      _train_expert(opts, root, seed, domain, root / "ablations" / "random_init" / domain,
                    f"--config.expert.router_embeddings={emb}")
      _train_expert(opts, root, seed, domain, root / "ablations" / "no_bias" / domain,
                    "--config.expert.bias=false")


def plot_routing_diagnostics(opts: Options) -> dict[str, str]:
  """One routing-diagnostics plot (routing_diagnostics.plot) per trained expert and ablation
  expert with diagnostics, into <workdir>/results/routing_diagnostics/; returns
  {"seed<s>/<experts|ablation>/<domain>": png path}."""
  out_dir = pathlib.Path(opts.workdir) / "results" / "routing_diagnostics"
  plots = {}
  for seed, root in training_dirs(opts).items():
    runs_with_diagnostics = [("experts", d, root / "experts" / d) for d in opts.domains]
    runs_with_diagnostics += [(label, d, root / "ablations" / label / d)
                              for label in ABLATIONS if label != "solo"
                              for d in opts.ablation_domains]
    for label, domain, workdir in runs_with_diagnostics:
      name = f"seed{seed}/{label}/{domain}"
      plots[name] = routing_diagnostics.plot(
          workdir / runs.METRICS, out_dir / f"seed{seed}_{label}_{domain}.png",
          title=f"Routing diagnostics: {domain} expert ({label}, seed {seed}), mean over layers")
  log(f"routing diagnostics: {len(plots)} plots in {out_dir}")
  return plots


class Evaluator:
  """Per-domain test perplexity of any model or baseline, on batches read once."""

  def __init__(self, data: str, domains, eval_batches: int):
    self.batches = {d: list(scoring.domain_batches(data, d, "test", batch_size=EVAL_BATCH,
                                                   seq_len=EVAL_SEQ, max_batches=eval_batches))
                    for d in domains}

  def __call__(self, name, score: scoring.BatchScorer) -> dict[str, float]:
    """Scores every domain; logs and returns the perplexities."""
    t = time.perf_counter()
    scores = scoring.score_domains(score, self.batches)
    out = {d: scores[d]["perplexity"] for d in self.batches}
    log(f"{name}: " + " ".join(f"{d} {v:.2f}" for d, v in out.items())
        + f" ({time.perf_counter() - t:.0f}s)")
    return out


# The models whose training or routing depends on the seed; each is evaluated once per seed.
SEEDED = ("flexolmo_router_tuned", "btx", "prompt_routing")


def seeded_models(opts: Options, ev: Evaluator, parts: baselines.Parts,
                  seed: int) -> dict[str, dict[str, float]]:
  """Router tuning (fresh proxy sets), BTX and prompt routing with one seed."""
  config, params, _ = parts.merged
  tune_cfg = baselines.tune_config(parts.data, opts.tune_steps, seed)
  log(f"seed {seed}: proxy sets, then router tuning on them + a public slice")
  proxies = {d: router_tuning.select_proxies(parts.data, d, 200, seed=seed) for d in opts.domains}
  records = router_tuning.tuning_documents(parts.data, proxies, tune_cfg.public_slice, seed)
  tuned, _ = router_tuning.train_router(config, params, records, tune_cfg)
  out = {"flexolmo_router_tuned": ev(f"flexolmo + router tuning (seed {seed})",
                                     scoring.model_scorer(config, tuned))}
  options = baselines.Options(btm_top_k=opts.btm_top_k, tune_steps=opts.tune_steps, seed=seed)
  log(f"seed {seed}: BTX, random router rows trained on public data")
  for name in ("btx", "prompt_routing"):
    out[name] = ev(f"{name} (seed {seed})", baselines.get(name, options).build(parts))
  return out


def evaluate_everything(opts: Options) -> dict:
  """Every model's per-domain perplexity, the routing report, and the run settings."""
  root = pathlib.Path(opts.workdir)
  data = str(root / "data")
  domains = ["public", *opts.domains]
  ev = Evaluator(data, domains, opts.eval_batches)
  experts = {d: str(root / "experts" / d) for d in opts.domains}
  config, params, names = merge.assemble(root / "public", experts, top_k=opts.top_k)
  ppl = {}
  pub_config, pub_params, _ = runs.load_params(root / "public")
  parts = baselines.Parts((pub_config, pub_params), (config, params, tuple(names)), data)
  ppl["public"] = ev("public", scoring.model_scorer(pub_config, pub_params))
  ppl["flexolmo"] = ev("flexolmo", scoring.model_scorer(config, params))
  options = baselines.Options(btm_top_k=opts.btm_top_k, tune_steps=opts.tune_steps)
  for name in ("soup_uniform", "soup_weighted", "btm"):
    label = f"btm (top-{opts.btm_top_k})" if name == "btm" else name
    ppl[name] = ev(label, baselines.get(name, options).build(parts))

  per_seed = {label: {} for label in SEEDED}
  for seed in opts.seeds:
    for label, values in seeded_models(opts, ev, parts, seed).items():
      per_seed[label][str(seed)] = values
  for label, by_seed in per_seed.items():
    ppl[label] = {d: float(np.mean([v[d] for v in by_seed.values()])) for d in domains}

  ablated = {d: experts[d] for d in opts.ablation_domains}
  ppl["flexolmo_ablation_subset"] = ev(
      "flexolmo on the ablation domains",
      scoring.model_scorer(*merge.assemble(root / "public", ablated, top_k=opts.top_k)[:2]))
  for label in ("solo", "random_init", "no_bias"):
    paths = {d: str(root / "ablations" / label / d) for d in opts.ablation_domains}
    c, p, _ = merge.assemble(root / "public", paths, top_k=opts.top_k,
                             keep_bias=label != "no_bias")
    ppl[f"ablation_{label}"] = ev(f"ablation {label}", scoring.model_scorer(c, p))

  opt_out = {}
  for d in opts.domains:
    c, p, _ = merge.opt_out(config, params, names, [d])
    opt_out[d] = ev(f"opt out {d}", scoring.model_scorer(c, p))

  log("routing analysis")
  shares = routing_analysis.domain_shares(config, params, data, domains, batch_size=EVAL_BATCH,
                                          seq_len=EVAL_SEQ, max_batches=opts.eval_batches)
  plot = routing_analysis.write_report(shares, names, str(root / "results"))
  settings = {k: getattr(opts, k) for k in (
      "public_steps", "expert_steps", "btm_top_k", "tune_steps", "eval_batches")}
  settings["ablation_domains"] = list(opts.ablation_domains)
  settings["seeds"] = list(opts.seeds)
  settings["top_k"] = config.top_k  # As clamped to the experts present.
  settings["eval_tokens_per_domain"] = EVAL_BATCH * EVAL_SEQ * opts.eval_batches
  return {"settings": settings, "domains": domains, "experts": names, "perplexity": ppl,
          "per_seed": per_seed, "opt_out": opt_out, "routing": plot}


def _avg(values: dict, domains) -> float:
  return float(np.mean([values[d] for d in domains]))


def findings(report: dict) -> list[dict]:
  """Each of the paper's findings, whether it holds here, and the numbers that decide it."""
  ppl, closed = report["perplexity"], report["domains"][1:]
  everything = report["domains"]
  pub = ppl["public"]
  out = []
  for label, name in (("flexolmo", "FlexOlmo"), ("flexolmo_router_tuned", "FlexOlmo + router tuning")):
    if label not in ppl:
      continue
    flex = ppl[label]
    out.append({"finding": f"{name} beats the public model on every closed domain",
                "holds": all(flex[d] < pub[d] for d in closed),
                "numbers": ", ".join(f"{d} {flex[d]:.2f} vs {pub[d]:.2f}" for d in closed)})
    for base in ("soup_uniform", "soup_weighted", "btm", "btx", "prompt_routing"):
      out.append({"finding": f"{name} beats {base} on average (all domains)",
                  "holds": _avg(flex, everything) < _avg(ppl[base], everything),
                  "numbers": f"{_avg(flex, everything):.2f} vs {_avg(ppl[base], everything):.2f}"})
  flex = ppl["flexolmo"]
  own = []
  for d, values in report["opt_out"].items():
    rise = {e: values[e] / flex[e] - 1 for e in everything}
    own.append((d, rise[d], max(abs(v) for e, v in rise.items() if e != d)))
  out.append({"finding": "removing an expert hurts mainly its own domain",
              "holds": all(r > o for _, r, o in own),
              "numbers": ", ".join(f"-{d}: own +{100 * r:.1f}%, others at most {100 * o:.1f}%"
                                   for d, r, o in own)})
  subset = ["public"] + report["settings"]["ablation_domains"]
  base = _avg(ppl["flexolmo_ablation_subset"], subset)
  for label in ("solo", "random_init", "no_bias"):
    value = _avg(ppl[f"ablation_{label}"], subset)
    out.append({"finding": f"ablation '{label}' hurts (average over {', '.join(subset)})",
                "holds": value > base, "numbers": f"{value:.2f} vs FlexOlmo {base:.2f}"})
  return out


def markdown(report: dict) -> str:
  """The results table, opt-out table and findings as markdown."""
  domains, ppl = report["domains"], report["perplexity"]
  head = "| model | " + " | ".join(domains) + " | avg closed | avg all |"
  rule = "|---" * (len(domains) + 3) + "|"

  def row(name, values):
    cells = [f"{values[d]:.2f}" if d in values else "" for d in domains]
    closed = [d for d in domains[1:] if d in values]
    return (f"| {name} | " + " | ".join(cells) + f" | {_avg(values, closed):.2f} | "
            f"{_avg(values, [d for d in domains if d in values]):.2f} |")

  s = report["settings"]
  lines = ["# FlexOlmo small reproduction", "",
           f"Test perplexity per domain ({s['eval_tokens_per_domain']} tokens each); public model "
           f"{s['public_steps']} steps, experts {s['expert_steps']} steps, top-{s['top_k']} of "
           f"{len(report['experts'])} experts, seeds {s['seeds']} (seeded rows: mean); wall time "
           f"{report['wall_seconds'] / 60:.1f} min.", "", head, rule]
  lines += [row(name, values) for name, values in ppl.items()]
  if len(s["seeds"]) > 1:
    lines += ["", "Seed spread of the seeded models (average over all domains):", "",
              "| model | " + " | ".join(f"seed {x}" for x in s["seeds"]) + " | mean | std |",
              "|---" * (len(s["seeds"]) + 3) + "|"]
    for label, by_seed in report["per_seed"].items():
      avgs = [_avg(v, domains) for v in by_seed.values()]
      lines.append(f"| {label} | " + " | ".join(f"{a:.2f}" for a in avgs)
                   + f" | {np.mean(avgs):.2f} | {np.std(avgs):.2f} |")
  lines += ["", "Opt-out (FlexOlmo with one expert removed):", "", head, rule]
  lines += [row(f"without {d}", v) for d, v in report["opt_out"].items()]
  lines += ["", "## Findings", "", "| finding | holds here | numbers |", "|---|---|---|"]
  lines += [f"| {f['finding']} | {'yes' if f['holds'] else 'NO'} | {f['numbers']} |"
            for f in report["findings"]]
  lines += ["", f"Routing: {report['routing']['png']}", ""]
  return "\n".join(lines)


def use_compilation_cache(root: pathlib.Path) -> None:
  """Every expert (and ablation) run compiles the same step for the same shapes: a persistent
  XLA cache shared by all stage processes (through the environment) compiles it once."""
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax_cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def reproduce(opts: Options) -> dict:
  """Trains (or reuses) everything under opts.workdir, scores it, and writes
  <workdir>/results/results.{json,md}; returns the report."""
  root = pathlib.Path(opts.workdir)
  use_compilation_cache(root)
  train_everything(opts)
  diagnostics = plot_routing_diagnostics(opts)
  report = evaluate_everything(opts)
  report["routing_diagnostics"] = diagnostics
  report["wall_seconds"] = time.perf_counter() - _START
  report["findings"] = findings(report)
  out = root / "results"
  os.makedirs(out, exist_ok=True)
  atomic.write_text(out / "results.json", json.dumps(report, indent=1) + "\n")
  atomic.write_text(out / "results.md", markdown(report))
  print(markdown(report))
  log(f"done: {out / 'results.md'}, {out / 'results.json'}")
  return report


def main(argv):
  del argv
  cli.default_verbosity()
  opts = options_from_flags()
  try:
    runs.require_local_workdir(opts.workdir)  # It trains there.
  except ValueError as err:
    sys.exit(f"error: {err}")
  reproduce(opts)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
