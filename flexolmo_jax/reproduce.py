r"""The small end-to-end reproduction (launch/small_demo.sh runs it): FlexMix-mini -> public model
-> one expert per closed domain, each trained in its own process on its own domain only ->
ablation experts -> merge -> router tuning -> FlexOlmo, baselines, ablations and opt-out scored
by per-domain held-out perplexity -> the routing plot -> results.json / results.md with the
paper's findings checked against the numbers.

  python -m flexolmo_jax.reproduce --runs=runs [--public_steps=300 --expert_steps=40 --seeds=0,1,2 ...]

The defaults take about 20 minutes on a quiet 2-core CPU; every stage prints progress.

Every stage reuses finished work (a trained run, a merged artifact), so re-running continues.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from flexolmo_jax import baselines, merge, router_init, router_tuning, routing_analysis, runs
from flexolmo_jax import scoring
from flexolmo_jax.data import corpus, load_manifest, load_tokenizer

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags, defined only when run as a program."""
  flags.DEFINE_string("runs", "runs", "Directory for every artifact and the results.")
  flags.DEFINE_list("domains", list(corpus.CLOSED_DOMAINS), "Closed domains (experts).")
  flags.DEFINE_integer("public_steps", 300, "Public pretraining steps.")
  flags.DEFINE_integer("expert_steps", 40, "Steps per expert (and ablation).")
  flags.DEFINE_list("ablation_domains", ["math"],
                    "Domains whose experts are retrained for each ablation.")
  flags.DEFINE_integer("tune_steps", 100, "Router-tuning (and BTX router) steps.")
  flags.DEFINE_integer("top_k", 4, "Experts per token at inference (clamped).")
  flags.DEFINE_integer("btm_top_k", 2, "Ensemble members mixed per token by BTM.")
  flags.DEFINE_integer("eval_batches", 4, "Test batches (8 x 128 tokens) per domain.")
  flags.DEFINE_list("seeds", ["0"], "Seeds of the seed-dependent stages (router tuning with its "
                    "proxy sets, BTX, prompt routing): each is run per seed and the tables show "
                    "the mean. The first also seeds the random-init ablation rows.")
  # A smaller corpus for quick checks (the notebook's CI run); None keeps data prepare's defaults.
  flags.DEFINE_integer("max_docs_per_domain", None, "Corpus: cap on documents per domain.")
  flags.DEFINE_integer("vocab_size", None, "Corpus: tokenizer vocabulary size.")


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


def _train_expert(root, domain, workdir, *overrides, module="flexolmo_jax.train"):
  if _finished(workdir, FLAGS.expert_steps):
    log(f"reusing {workdir}")
    return
  _run(module, f"--config=configs/{domain}_expert.py", f"--workdir={workdir}",
       f"--config.data.path={root / 'data'}", f"--config.expert.public={root / 'public'}",
       f"--config.steps={FLAGS.expert_steps}", f"--config.eval_every={FLAGS.expert_steps}",
       f"--config.checkpoint_every={FLAGS.expert_steps}", *overrides)


def train_everything(root: pathlib.Path) -> None:
  """Data, public model, experts and ablation experts, each in its own process."""
  corpus_flags = [f"--{k}={getattr(FLAGS, k)}" for k in ("max_docs_per_domain", "vocab_size")
                  if getattr(FLAGS, k) is not None]
  _run("flexolmo_jax.data", "prepare", f"--out={root / 'data'}", *corpus_flags)
  if _finished(root / "public", FLAGS.public_steps):
    log("reusing the public model")
  else:
    _run("flexolmo_jax.train", "--config=configs/public.py", f"--workdir={root / 'public'}",
         f"--config.data.path={root / 'data'}", f"--config.steps={FLAGS.public_steps}")
  for domain in FLAGS.domains:
    _train_expert(root, domain, root / "experts" / domain)
  emb = root / "ablations" / "random_rows.npz"
  if not emb.exists():
    config, _, _ = runs.load_params(root / "public")
    rng = np.random.default_rng(_seeds()[0])
    rows = {d: config.init_std * rng.normal(size=(config.n_layers, config.d_model))
            for d in ["public"] + FLAGS.ablation_domains}
    emb.parent.mkdir(parents=True, exist_ok=True)
    router_init.save_embeddings(str(emb), rows)
  for domain in FLAGS.ablation_domains:
    _train_expert(root, domain, root / "ablations" / "solo" / domain,
                  module="flexolmo_jax.solo_expert")
    _train_expert(root, domain, root / "ablations" / "random_init" / domain,
                  f"--config.expert.router_embeddings={emb}")
    _train_expert(root, domain, root / "ablations" / "no_bias" / domain,
                  "--config.expert.bias=false")


class Evaluator:
  """Per-domain test perplexity of any model, on batches read once."""

  def __init__(self, data: str, domains):
    self.domains = list(domains)
    self.batches = {d: baselines.domain_batches(data, d, "test", batch_size=EVAL_BATCH,
                                                seq_len=EVAL_SEQ, max_batches=FLAGS.eval_batches)
                    for d in self.domains}

  def __call__(self, name, score) -> dict[str, float]:
    """`score(batches) -> {"perplexity": ...}` on every domain; logs and returns perplexities."""
    t = time.perf_counter()
    out = {d: score(self.batches[d])["perplexity"] for d in self.domains}
    log(f"{name}: " + " ".join(f"{d} {v:.2f}" for d, v in out.items())
        + f" ({time.perf_counter() - t:.0f}s)")
    return out


# The models whose training or routing depends on the seed; each is evaluated once per seed.
SEEDED = ("flexolmo_router_tuned", "btx", "prompt_routing")


def _seeds() -> list[int]:
  return [int(s) for s in FLAGS.seeds]


def seeded_models(ev, data, config, params, names, seed) -> dict[str, dict[str, float]]:
  """Router tuning (fresh proxy sets), BTX and prompt routing with one seed."""
  tune_cfg = router_tuning.RouterTuningConfig(
      merged="", data=data, proxies="", out="", steps=FLAGS.tune_steps,
      warmup_steps=min(100, FLAGS.tune_steps // 3), seed=seed, log_every=FLAGS.tune_steps)
  log(f"seed {seed}: proxy sets, then router tuning on them + a public slice")
  proxies = {d: router_tuning.select_proxies(data, d, 200, seed=seed) for d in FLAGS.domains}
  records = router_tuning.tuning_documents(data, proxies, tune_cfg.public_slice, seed)
  tuned, _ = router_tuning.train_router(config, params, records, tune_cfg)
  out = {"flexolmo_router_tuned": ev(f"flexolmo + router tuning (seed {seed})",
                                     _plain(config, tuned))}
  log(f"seed {seed}: BTX, random router rows trained on public data")
  out["btx"] = ev(f"btx (seed {seed})", _plain(*baselines.btx(config, params, data, tune_cfg)))
  router = baselines.train_prompt_router(data, names, seed=seed)
  tokenizer = load_tokenizer(data)
  two = config.replace(top_k=2)
  out["prompt_routing"] = ev(f"prompt routing (seed {seed})",
                             lambda b: baselines.prompt_routing_perplexity(
                                 two, params, names, router, tokenizer, b))
  return out


def _plain(config, params, mask=None):
  return lambda b: scoring.perplexity(config, params, b, expert_mask=mask)


def _mask(names, allowed):
  return np.array([n in allowed for n in names])


def evaluate_everything(root: pathlib.Path) -> dict:
  """Every model's per-domain perplexity, the routing report, and the run settings."""
  data = str(root / "data")
  domains = ["public"] + FLAGS.domains
  ev = Evaluator(data, domains)
  experts = {d: str(root / "experts" / d) for d in FLAGS.domains}
  config, params, names = merge.assemble(root / "public", experts, top_k=FLAGS.top_k)
  ppl = {}
  pub_config, pub_params, _ = runs.load_params(root / "public")
  ppl["public"] = ev("public", _plain(pub_config, pub_params))
  ppl["flexolmo"] = ev("flexolmo", _plain(config, params))

  tokens = load_manifest(data)["domains"]
  token_weights = [tokens[n]["train"]["tokens"] for n in names]
  for label, weights in (("soup_uniform", None), ("soup_weighted", token_weights)):
    ppl[label] = ev(label, _plain(*baselines.soup_from_merged(config, params, weights)))
  members = [(pub_config, pub_params, None)] + [
      (config.replace(top_k=2), params, _mask(names, {"public", d})) for d in FLAGS.domains]
  ppl["btm"] = ev(f"btm (top-{FLAGS.btm_top_k})",
                  lambda b: baselines.btm_perplexity(members, b, top_k=FLAGS.btm_top_k))

  per_seed = {label: {} for label in SEEDED}
  for seed in _seeds():
    for label, values in seeded_models(ev, data, config, params, names, seed).items():
      per_seed[label][str(seed)] = values
  for label, by_seed in per_seed.items():
    ppl[label] = {d: float(np.mean([v[d] for v in by_seed.values()])) for d in domains}

  ablated = {d: experts[d] for d in FLAGS.ablation_domains}
  ppl["flexolmo_ablation_subset"] = ev(
      "flexolmo on the ablation domains",
      _plain(*merge.assemble(root / "public", ablated, top_k=FLAGS.top_k)[:2]))
  for label in ("solo", "random_init", "no_bias"):
    paths = {d: str(root / "ablations" / label / d) for d in FLAGS.ablation_domains}
    c, p, _ = merge.assemble(root / "public", paths, top_k=FLAGS.top_k,
                             keep_bias=label != "no_bias")
    ppl[f"ablation_{label}"] = ev(f"ablation {label}", _plain(c, p))

  opt_out = {}
  for d in FLAGS.domains:
    c, p, _ = merge.opt_out(config, params, names, [d])
    opt_out[d] = ev(f"opt out {d}", _plain(c, p))

  log("routing analysis")
  shares = routing_analysis.domain_shares(config, params, data, domains, batch_size=EVAL_BATCH,
                                          seq_len=EVAL_SEQ, max_batches=FLAGS.eval_batches)
  plot = routing_analysis.write_report(shares, names, str(root / "results"))
  settings = {k: getattr(FLAGS, k) for k in (
      "public_steps", "expert_steps", "btm_top_k", "tune_steps", "eval_batches",
      "ablation_domains")}
  settings["seeds"] = _seeds()
  settings["top_k"] = config.top_k  # As clamped to the experts present.
  settings["eval_tokens_per_domain"] = EVAL_BATCH * EVAL_SEQ * FLAGS.eval_batches
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


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = pathlib.Path(FLAGS.runs)
  use_compilation_cache(root)
  train_everything(root)
  report = evaluate_everything(root)
  report["wall_seconds"] = time.perf_counter() - _START
  report["findings"] = findings(report)
  out = root / "results"
  os.makedirs(out, exist_ok=True)
  (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
  (out / "results.md").write_text(markdown(report))
  print(markdown(report))
  log(f"done: {out / 'results.md'}, {out / 'results.json'}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
