r"""The small end-to-end reproduction (launch/small_demo.sh runs it): FlexMix-mini -> public model
-> one expert and one dense fine-tune (the BTM and soup members) per closed domain, each trained
in its own process on its own domain only -> ablation experts -> merge -> router tuning ->
FlexOlmo, baselines, ablations and opt-out scored by per-document held-out loss on the same
tokens -> the routing plot -> results.json / results.md with the paper's findings judged from
bootstrap intervals (flexolmo_jax.stats: holds / does not hold / cannot tell).

results.json: "loss" and "perplexity" {model: {domain: value}}, "loss_interval" {model: {domain:
[lo, hi]}}, "average" {model: {"all"/"closed": {"loss", "perplexity" (geometric mean),
"interval"}}}, "opt_out" {removed domain: {domain: perplexity}}, "per_seed_loss", the raw
"document_tokens" {domain: [...]} and "document_nll" {model or "without_<domain>": {domain:
[...]}} the intervals are computed from, "findings" and "settings".

  python -m flexolmo_jax.reproduce --workdir=runs [--scale=medium] [--public_steps=300 ...]

`--scale=medium` (SCALES) trains a larger public model longer and each expert for several epochs
of its domain, three times with seeds 0, 1, 2, and evaluates each seed's models
(docs/reproduction.md). Flags given explicitly override the tier's values. Training runs are
separate processes, --workers of them at a time (run_parallel). Every stage prints progress.

Every stage reuses finished work (a trained run, a merged artifact), so re-running continues.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import numpy as np
from absl import flags

from flexolmo_jax import atomic, baselines, cli, merge, router_init, router_tuning, routing_analysis, runs
from flexolmo_jax import routing_diagnostics, scoring, stats
from flexolmo_jax.data import corpus, load_tokenizer
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
  # Training processes run at once. Two on a 2-core CPU: a run's start-up (imports, tracing,
  # compiling, restoring) is single-threaded and its small-batch steps use both cores poorly;
  # measured: two 60-step expert runs one after the other 53.3 s, side by side 41.0 s.
  workers: int = 2


# The reproduction's tiers: the Options fields each sets (docs/reproduction.md has the budget).
SCALES = {
    "small": {},
    # Sized to the two-hour budget on a 2-core CPU (docs/reproduction.md). With train_seeds the
    # seeded evaluation stages of seed s run once, with s, on seed s's models.
    "medium": dict(public_config="configs/public_medium.py", public_steps=400,
                   expert_epochs=3.0, expert_tokens=40_960, eval_batches=12,
                   train_seeds=(0, 1, 2)),
}
# The flags that set Options fields of the same name (workdir also answers to --runs).
_FIELD_FLAGS = ("workdir", "domains", "public_steps", "expert_steps", "ablation_domains",
                "tune_steps", "top_k", "btm_top_k", "eval_batches", "seeds",
                "max_docs_per_domain", "vocab_size", "max_chars_per_domain", "public_config",
                "expert_epochs", "expert_tokens", "train_seeds", "workers")


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
                    "seed, under WORKDIR/seed<s>/ (empty: once, seed 0, in WORKDIR); each "
                    "seed's models are evaluated with that seed's seeded stages (--seeds unused).")
  flags.DEFINE_integer("workers", d.workers, "Training processes run at once (each one's output "
                       "then goes to WORKDIR/logs/); 1: one after the other, output streamed.")


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
# Below this many test documents a domain's bootstrap has too few distinct resamples to be read.
FEW_DOCUMENTS = 10
_START = time.perf_counter()


def log(message: str) -> None:
  print(f"[{time.perf_counter() - _START:7.1f}s] {message}", flush=True)


def _run(*args: str, output: pathlib.Path | None = None) -> None:
  """Runs one stage in its own process: its output streams through, or with `output` goes to
  that file (runs side by side), whose tail is printed if the stage fails."""
  log("$ " + " ".join(args) + (f"  > {output}" if output else ""))
  if output is None:
    subprocess.run([sys.executable, "-m", *args], check=True)
    return
  output.parent.mkdir(parents=True, exist_ok=True)
  t = time.perf_counter()
  with open(output, "w") as f:
    done = subprocess.run([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT)
  if done.returncode:
    tail = "\n".join(output.read_text().splitlines()[-30:])
    log(f"FAILED (exit {done.returncode}): {output}, last lines:\n{tail}")
    raise subprocess.CalledProcessError(done.returncode, args)
  log(f"finished in {time.perf_counter() - t:.0f}s: {output}")


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


def _output(opts: Options, root: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path | None:
  """Where a training run's output goes: streamed (None) with one worker, else a file under
  WORKDIR/logs named after the run's directory."""
  if opts.workers <= 1:
    return None
  name = "_".join(workdir.relative_to(pathlib.Path(opts.workdir)).parts)
  return pathlib.Path(opts.workdir) / "logs" / f"{name}.log"


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
       f"--config.steps={steps}", f"--config.checkpoint_every={steps}", *extra, *overrides,
       output=_output(opts, root, workdir))


def _train_dense(opts: Options, root, seed, domain):
  """The paper's BTM and soup member for `domain`: every parameter of the public model fine-tuned
  on the owner's data, for as many steps as its expert."""
  data_flags, steps = expert_data_flags(opts, domain)
  workdir = root / "dense" / domain
  if _finished(workdir, steps):
    log(f"reusing {workdir}")
    return
  # The public model's config gives the architecture (configs/dense_base.py).
  public = pathlib.Path(opts.public_config).stem
  arg = domain if public == "public" else f"{domain},{public}"
  _run("flexolmo_jax.train", f"--config=configs/dense_base.py:{arg}", f"--workdir={workdir}",
       *data_flags, f"--config.init_from={root / 'public'}", f"--config.steps={steps}",
       f"--config.eval_every={steps}", f"--config.checkpoint_every={steps}",
       *_seed_flags(opts, seed), output=_output(opts, root, workdir))


def _seed_flags(opts: Options, seed: int) -> list[str]:
  return [f"--config.seed={seed}", f"--config.data.seed={seed}"] if opts.train_seeds else []


def _train_public(opts: Options, root: pathlib.Path, seed: int) -> None:
  if _finished(root / "public", opts.public_steps):
    log(f"reusing the public model in {root / 'public'}")
    return
  _run("flexolmo_jax.train", f"--config={opts.public_config}", f"--workdir={root / 'public'}",
       f"--config.data.path={pathlib.Path(opts.workdir) / 'data'}",
       f"--config.steps={opts.public_steps}", *_seed_flags(opts, seed),
       output=_output(opts, root, root / "public"))


def random_rows(path: pathlib.Path, public: pathlib.Path, domains, seed: int) -> pathlib.Path:
  """Random router rows N(0, init_std^2) [n_layers, d_model] for `domains` (the random-init
  ablation's), drawn with `seed` into `path` once (kept on disk: reruns reuse them)."""
  if not path.exists():
    config, _, _ = runs.load_params(public)
    rng = np.random.default_rng(seed)
    rows = {d: config.init_std * rng.normal(size=(config.n_layers, config.d_model))
            for d in domains}
    path.parent.mkdir(parents=True, exist_ok=True)
    router_init.save_embeddings(str(path), rows)
  return path


def _random_rows(opts: Options, root: pathlib.Path, seed: int) -> pathlib.Path:
  return random_rows(root / "ablations" / "random_rows.npz", root / "public",
                     ("public",) + opts.ablation_domains,
                     seed if opts.train_seeds else opts.seeds[0])


def _runs_on_public(opts: Options, root: pathlib.Path, seed: int) -> list:
  """Every training run of one seed that starts from its public model, as callables: experts,
  dense fine-tunes (the BTM and soup members), then the ablation experts."""
  jobs = [lambda d=d: _train_expert(opts, root, seed, d, root / "experts" / d)
          for d in opts.domains]
  jobs += [lambda d=d: _train_dense(opts, root, seed, d) for d in opts.domains]
  for d in opts.ablation_domains:
    jobs += [
        lambda d=d: _train_expert(opts, root, seed, d, root / "ablations" / "solo" / d,
                                  module="flexolmo_jax.solo_expert"),
        lambda d=d: _train_expert(opts, root, seed, d, root / "ablations" / "random_init" / d,
                                  f"--config.expert.router_embeddings="
                                  f"{_random_rows(opts, root, seed)}"),
        lambda d=d: _train_expert(opts, root, seed, d, root / "ablations" / "no_bias" / d,
                                  "--config.expert.bias=false")]
  return jobs


def run_parallel(jobs, workers: int, after: dict[int, int] | None = None) -> None:
  """Runs the callables `jobs`, `workers` at a time, started in list order; job i first waits for
  job after[i] (an earlier one: finished or running in another worker, so nothing deadlocks).
  The first failure cancels every job not yet started and is raised."""
  after = after or {}
  pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
  futures, failed = [], threading.Event()

  def run(i):
    if failed.is_set():  # A worker may take the next job before the failure is seen below.
      return
    try:
      if i in after:
        futures[after[i]].result()
      jobs[i]()
    except BaseException:
      failed.set()
      raise

  try:
    for i in range(len(jobs)):
      futures.append(pool.submit(run, i))
    done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
    for f in futures:
      if f in done and f.exception() is not None:
        raise f.exception()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def train_everything(opts: Options) -> None:
  """Data, then per training seed (training_dirs) the public model and every run on it
  (_runs_on_public), each in its own process, opts.workers at a time; a run waits only for its
  own seed's public model."""
  data = pathlib.Path(opts.workdir) / "data"
  corpus_flags = [f"--{k}={getattr(opts, k)}"
                  for k in ("max_docs_per_domain", "vocab_size", "max_chars_per_domain")
                  if getattr(opts, k) is not None]
  _run("flexolmo_jax.data", "prepare", f"--out={data}", *corpus_flags)
  dirs = training_dirs(opts)
  jobs = [lambda s=s, root=root: _train_public(opts, root, s) for s, root in dirs.items()]
  after = {}
  for public, (s, root) in enumerate(dirs.items()):
    for job in _runs_on_public(opts, root, s):
      after[len(jobs)] = public
      jobs.append(job)
  run_parallel(jobs, opts.workers, after)


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
  """Per-document test losses of any model or baseline, on batches read once, on the same scored
  tokens for every model: each row's first baselines.PROMPT_TOKENS tokens are dropped from every
  model's losses, because prompt routing reads them to choose its expert (see baselines)."""

  def __init__(self, data: str, domains, eval_batches: int):
    self.batches = {d: list(scoring.domain_batches(data, d, "test", batch_size=EVAL_BATCH,
                                                   seq_len=EVAL_SEQ, max_batches=eval_batches))
                    for d in domains}
    eos = load_tokenizer(data).eos_id
    self.ids = {d: stats.document_ids(b, eos) for d, b in self.batches.items()}
    after_prompt = np.arange(EVAL_SEQ) >= baselines.PROMPT_TOKENS
    self.keep = {d: [(x["loss_mask"] > 0) & after_prompt for x in b]
                 for d, b in self.batches.items()}
    self.num_docs, self.docs, self.tokens = {}, {}, {}
    for d in self.batches:
      self.num_docs[d] = 1 + max(int(i.max()) for i in self.ids[d])
      counts = stats.document_sums([k.astype(np.float64) for k in self.keep[d]], self.ids[d],
                                   self.keep[d], self.num_docs[d])
      self.docs[d] = counts > 0  # Documents with a scored token (not all inside a prefix).
      self.tokens[d] = counts[self.docs[d]]
      if len(self.tokens[d]) < FEW_DOCUMENTS:
        log(f"{d}: only {len(self.tokens[d])} test documents in {eval_batches} batches; its "
            "bootstrap intervals understate the uncertainty (raise --eval_batches)")

  def __call__(self, name, score: scoring.BatchScorer, domains=None) -> dict[str, np.ndarray]:
    """Scores `domains` (default: every domain); logs the losses; returns each domain's
    per-document NLL sums (in the order of self.tokens)."""
    t = time.perf_counter()
    sums = {}
    for d in domains or self.batches:
      rows = score(self.batches[d], per_token=True)["token_nll"]
      sums[d] = stats.document_sums(rows, self.ids[d], self.keep[d], self.num_docs[d])[self.docs[d]]
    log(f"{name}: " + " ".join(f"{d} {_loss(v, self.tokens[d]):.3f}" for d, v in sums.items())
        + f" nats ({time.perf_counter() - t:.0f}s)")
    return sums


def _loss(sums, tokens) -> float:
  """A domain's mean token loss from its documents' NLL sums and token counts."""
  return float(np.sum(sums) / np.sum(tokens))


# The models whose training or routing depends on the seed; each is evaluated once per seed.
SEEDED = ("flexolmo_router_tuned", "btx", "prompt_routing")
# Baselines scored beside FlexOlmo; the *_dense ones average or ensemble dense fine-tunes.
UNSEEDED_BASELINES = ("soup_uniform", "soup_weighted", "btm", "soup_dense_uniform",
                      "soup_dense_weighted", "btm_dense")
BASELINES = UNSEEDED_BASELINES + SEEDED[1:]
BOOTSTRAP = {"resamples": 2000, "seed": 0, "level": 0.95}


def seeded_models(opts: Options, ev: Evaluator, parts: baselines.Parts,
                  seed: int) -> dict[str, dict[str, np.ndarray]]:
  """Router tuning (fresh proxy sets), BTX and prompt routing (on the same proxy sets) with one
  seed: each one's per-document NLL sums."""
  config, params, _ = parts.merged
  tune_cfg = baselines.tune_config(parts.data, opts.tune_steps, seed)
  log(f"seed {seed}: proxy sets, then router tuning on them + a public slice")
  proxies = {d: router_tuning.select_proxies(parts.data, d, 200, seed=seed) for d in opts.domains}
  records = router_tuning.tuning_documents(parts.data, proxies, tune_cfg.public_slice, seed)
  tuned, _ = router_tuning.train_router(config, params, records, tune_cfg)
  out = {"flexolmo_router_tuned": ev(f"flexolmo + router tuning (seed {seed})",
                                     scoring.model_scorer(config, tuned))}
  options = baselines.Options(btm_top_k=opts.btm_top_k, tune_steps=opts.tune_steps, seed=seed,
                              proxies=proxies)
  log(f"seed {seed}: BTX, random router rows trained on public data; prompt routing trained on "
      "the proxy sets")
  for name in ("btx", "prompt_routing"):
    out[name] = ev(f"{name} (seed {seed})", baselines.get(name, options).build(parts))
  return out


def evaluate_models(opts: Options, ev: Evaluator, root: pathlib.Path, seeds) -> tuple:
  """Every model trained under `root` (one training seed's directory) and every baseline built
  from them, with the seeded stages run once per seed in `seeds`: ({model: {domain: per-document
  NLL sums}} with the seeded models' sums averaged over `seeds`, {seeded model: {seed: sums}},
  the merged FlexOlmo (config, params, names))."""
  data, domains = str(pathlib.Path(opts.workdir) / "data"), list(ev.batches)
  experts = {d: str(root / "experts" / d) for d in opts.domains}
  config, params, names = merge.assemble(root / "public", experts, top_k=opts.top_k)
  docs = {}
  pub_config, pub_params, _ = runs.load_params(root / "public")
  dense = tuple((d, *runs.load_params(root / "dense" / d)[:2]) for d in opts.domains)
  parts = baselines.Parts((pub_config, pub_params), (config, params, tuple(names)), data, dense)
  docs["public"] = ev("public", scoring.model_scorer(pub_config, pub_params))
  docs["flexolmo"] = ev("flexolmo", scoring.model_scorer(config, params))
  options = baselines.Options(btm_top_k=opts.btm_top_k, tune_steps=opts.tune_steps)
  for name in UNSEEDED_BASELINES:
    label = f"{name} (top-{opts.btm_top_k})" if name.startswith("btm") else name
    docs[name] = ev(label, baselines.get(name, options).build(parts))

  per_seed = {label: {} for label in SEEDED}
  for seed in seeds:
    for label, sums in seeded_models(opts, ev, parts, seed).items():
      per_seed[label][str(seed)] = sums
  for label, by_seed in per_seed.items():  # The seeds' mean loss: the mean of their sums.
    docs[label] = _mean_over_seeds(by_seed, domains)

  ablated = {d: experts[d] for d in opts.ablation_domains}
  docs["flexolmo_ablation_subset"] = ev(
      "flexolmo on the ablation domains",
      scoring.model_scorer(*merge.assemble(root / "public", ablated, top_k=opts.top_k)[:2]))
  for label in ABLATIONS:
    paths = {d: str(root / "ablations" / label / d) for d in opts.ablation_domains}
    c, p, _ = merge.assemble(root / "public", paths, top_k=opts.top_k,
                             keep_bias=label != "no_bias")
    docs[f"ablation_{label}"] = ev(f"ablation {label}", scoring.model_scorer(c, p))

  for d in opts.domains:
    c, p, _ = merge.opt_out(config, params, names, [d])
    docs[f"without_{d}"] = ev(f"opt out {d}", scoring.model_scorer(c, p))
  return docs, per_seed, (config, params, names)


def _mean_over_seeds(by_seed: dict, domains) -> dict[str, np.ndarray]:
  return {d: np.mean([v[d] for v in by_seed.values()], axis=0) for d in domains}


def evaluate_everything(opts: Options) -> dict:
  """Every model's per-document, per-domain losses, the routing report, and the run settings.
  With training seeds every model is evaluated in each seed's directory (its seeded stages with
  that seed); the report's sums are the seeds' mean and per_seed_loss holds each seed's losses."""
  root = pathlib.Path(opts.workdir)
  data = str(root / "data")
  domains = ["public", *opts.domains]
  ev = Evaluator(data, domains, opts.eval_batches)
  if opts.train_seeds:
    per_seed, merged = {}, None
    for seed, path in training_dirs(opts).items():
      log(f"evaluating the models of training seed {seed} ({path})")
      docs_of_seed, _, merged_of_seed = evaluate_models(opts, ev, path, (seed,))
      merged = merged or merged_of_seed  # Routing is analysed on the first seed's FlexOlmo.
      for label, sums in docs_of_seed.items():
        per_seed.setdefault(label, {})[str(seed)] = sums
    docs = {label: _mean_over_seeds(by_seed, domains) for label, by_seed in per_seed.items()}
  else:
    docs, per_seed, merged = evaluate_models(opts, ev, root, opts.seeds)
  config, params, names = merged

  log("routing analysis")
  shares = routing_analysis.domain_shares(config, params, data, domains, batch_size=EVAL_BATCH,
                                          seq_len=EVAL_SEQ, max_batches=opts.eval_batches)
  plot = routing_analysis.write_report(shares, names, str(root / "results"))
  settings = {k: getattr(opts, k) for k in (
      "scale", "public_steps", "btm_top_k", "tune_steps", "eval_batches")}
  settings["expert_steps"] = {d: expert_data_flags(opts, d)[1] for d in opts.domains}
  settings["ablation_domains"] = list(opts.ablation_domains)
  settings["seeds"] = list(opts.train_seeds or opts.seeds)
  settings["train_seeds"] = list(opts.train_seeds)
  settings["top_k"] = config.top_k  # As clamped to the experts present.
  settings["unscored_prefix_tokens"] = baselines.PROMPT_TOKENS
  settings["scored_tokens"] = {d: int(ev.tokens[d].sum()) for d in domains}
  settings["bootstrap"] = dict(BOOTSTRAP)
  per_seed_loss = {label: {seed: {d: _loss(v[d], ev.tokens[d]) for d in domains}
                           for seed, v in by_seed.items()} for label, by_seed in per_seed.items()}
  report = {"settings": settings, "domains": domains, "experts": names,
            "document_tokens": {d: ev.tokens[d].tolist() for d in domains},
            "document_nll": {m: {d: v.tolist() for d, v in by_d.items()}
                             for m, by_d in docs.items()},
            "per_seed_loss": per_seed_loss, "routing": plot}
  return {**report, **losses(report)}


def losses(report: dict) -> dict:
  """From the report's per-document sums: "loss" and "perplexity" {model: {domain: value}},
  "loss_interval" {model: {domain: [lo, hi]}}, "average" {model: {"all"/"closed": {"loss",
  "perplexity", "interval"}}} (averages over domains in loss: the perplexity is the geometric
  mean), and "opt_out" {domain removed: {domain: perplexity}}."""
  tokens, nll = report["document_tokens"], report["document_nll"]
  boot = bootstrap(report)
  level = report["settings"]["bootstrap"]["level"]
  loss = {m: {d: _loss(v, tokens[d]) for d, v in by_d.items()} for m, by_d in nll.items()}
  average = {}
  for m, by_d in loss.items():
    groups = {"all": [d for d in report["domains"] if d in by_d],
              "closed": [d for d in report["domains"][1:] if d in by_d]}
    average[m] = {g: _mean_with_interval(by_d, boot[m], ds, level)
                  for g, ds in groups.items() if ds}
  models = {m: v for m, v in loss.items() if not m.startswith("without_")}
  return {"loss": models,
          "perplexity": {m: {d: math.exp(v) for d, v in by_d.items()}
                         for m, by_d in models.items()},
          "loss_interval": {m: {d: list(stats.interval(boot[m][d], level)) for d in by_d}
                            for m, by_d in models.items()},
          "average": average,
          "opt_out": {m[len("without_"):]: {d: math.exp(v) for d, v in by_d.items()}
                      for m, by_d in loss.items() if m.startswith("without_")}}


def _mean_with_interval(loss, boot, domains, level) -> dict:
  mean = stats.mean_loss(loss, domains)
  return {"loss": mean, "perplexity": math.exp(mean),
          "interval": list(stats.interval(stats.mean_loss(boot, domains), level))}


def bootstrap(report: dict) -> dict[str, dict[str, np.ndarray]]:
  """{model: {domain: [resamples] loss}} from a report's per-document sums and its settings."""
  b = report["settings"]["bootstrap"]
  return stats.bootstrap_losses(report["document_tokens"], report["document_nll"],
                                resamples=b["resamples"], seed=b["seed"])


def _diff(text: str, est: float, lo: float, hi: float) -> str:
  return f"{text}{est:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def findings(report: dict) -> list[dict]:
  """Each of the paper's findings, its verdict from the 95% bootstrap interval of the loss
  difference that decides it (stats.verdict: holds / does not hold / cannot tell), and the
  numbers. Differences are in mean token loss (nats), paired over the same documents."""
  closed, everything = report["domains"][1:], report["domains"]
  tokens = report["document_tokens"]
  loss = {m: {d: _loss(v, tokens[d]) for d, v in by_d.items()}
          for m, by_d in report["document_nll"].items()}
  boot, level = bootstrap(report), report["settings"]["bootstrap"]["level"]

  def diff(a, b, domains):
    """(estimate, lo, hi) of mean_loss(a) - mean_loss(b) over `domains`."""
    est = stats.mean_loss(loss[a], domains) - stats.mean_loss(loss[b], domains)
    samples = stats.mean_loss(boot[a], domains) - stats.mean_loss(boot[b], domains)
    return (est, *stats.interval(samples, level))

  per_seed = report.get("per_seed_loss", {})

  def seeds_text(a, b, domains):
    """Each training seed's own difference, where both models were trained once per seed."""
    if not report["settings"].get("train_seeds") or a not in per_seed or b not in per_seed:
      return ""
    each = [stats.mean_loss(per_seed[a][x], domains) - stats.mean_loss(per_seed[b][x], domains)
            for x in per_seed[a]]
    return "; per seed " + ", ".join(f"{e:+.3f}" for e in each)

  out = []
  for label, name in (("flexolmo", "FlexOlmo"), ("flexolmo_router_tuned", "FlexOlmo + router tuning")):
    if label not in loss:
      continue
    per = {d: diff(label, "public", [d]) for d in closed}
    out.append({"finding": f"{name} beats the public model on every closed domain",
                "verdict": stats.every(stats.verdict(lo, hi) for _, lo, hi in per.values()),
                "intervals": {d: list(v) for d, v in per.items()},
                "numbers": "loss difference " + ", ".join(_diff(f"{d} ", *v)
                                                          for d, v in per.items())
                           + seeds_text(label, "public", closed).replace("per seed",
                                                                         "closed average per seed")})
    for base in (b for b in BASELINES if b in loss):
      est, lo, hi = diff(label, base, everything)
      geo = lambda m: math.exp(stats.mean_loss(loss[m], everything))
      out.append({"finding": f"{name} beats {base} on average (all domains)",
                  "verdict": stats.verdict(lo, hi), "difference": est, "interval": [lo, hi],
                  "numbers": f"perplexity {geo(label):.2f} vs {geo(base):.2f} (geometric mean); "
                             + _diff("loss difference ", est, lo, hi)
                             + seeds_text(label, base, everything)})
  own = {}
  for d in closed:
    if f"without_{d}" not in loss:
      continue
    # The claim: the loss rise on d itself exceeds the largest change on any other domain.
    rise = lambda source, e: source[f"without_{d}"][e] - source["flexolmo"][e]
    margin = lambda source, largest: rise(source, d) - largest(
        [abs(rise(source, e)) for e in everything if e != d])
    samples = margin(boot, lambda xs: np.max(np.stack(xs), axis=0))
    own[d] = (rise(loss, d), margin(loss, max), *stats.interval(samples, level))
  if own:
    out.append({"finding": "removing an expert hurts mainly its own domain",
                "verdict": stats.every(stats.verdict(lo, hi, side=1)
                                       for _, _, lo, hi in own.values()),
                "intervals": {d: list(v[1:]) for d, v in own.items()},
                "numbers": ", ".join(_diff(f"-{d}: own loss {r:+.3f}, margin over the largest "
                                           "other change ", est, lo, hi)
                                     for d, (r, est, lo, hi) in own.items())})
  subset = ["public"] + report["settings"]["ablation_domains"]
  for label in ("solo", "random_init", "no_bias"):
    if f"ablation_{label}" not in loss:
      continue
    est, lo, hi = diff(f"ablation_{label}", "flexolmo_ablation_subset", subset)
    out.append({"finding": f"ablation '{label}' hurts (average over {', '.join(subset)})",
                "verdict": stats.verdict(lo, hi, side=1), "difference": est, "interval": [lo, hi],
                "numbers": _diff("loss difference vs FlexOlmo ", est, lo, hi)
                           + seeds_text(f"ablation_{label}", "flexolmo_ablation_subset", subset)})
  return out


def markdown(report: dict) -> str:
  """The loss and perplexity tables, opt-out table and findings as markdown."""
  domains, loss, avg = report["domains"], report["loss"], report["average"]

  def head(last):
    return ["| model | " + " | ".join(domains) + f" | {last} closed | {last} all |",
            "|---" * (len(domains) + 3) + "|"]

  def avg_cell(m, group, key):
    a = avg[m].get(group)
    if a is None:
      return ""
    lo, hi = a["interval"]
    return (f"{a['loss']:.3f} [{lo:.3f}, {hi:.3f}]" if key == "loss"
            else f"{a['perplexity']:.2f} [{math.exp(lo):.2f}, {math.exp(hi):.2f}]")

  def row(name, m, values, fmt, key):
    cells = [fmt.format(values[d]) if d in values else "" for d in domains]
    return (f"| {name} | " + " | ".join(cells)
            + f" | {avg_cell(m, 'closed', key)} | {avg_cell(m, 'all', key)} |")

  s = report["settings"]
  tokens = ", ".join(f"{d} {n} ({len(report['document_tokens'][d])} documents)"
                     for d, n in s["scored_tokens"].items())
  steps = sorted(set(s["expert_steps"].values()))
  steps = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
  seeded = ("every trained model trained and evaluated once per seed; rows: mean of the seeds' "
            "losses" if s.get("train_seeds") else "seeded rows: mean of the seeds' losses")
  lines = [f"# FlexOlmo {s.get('scale', 'small')} reproduction", "",
           f"Public model {s['public_steps']} steps, experts and dense fine-tunes "
           f"{steps} steps, top-{s['top_k']} of {len(report['experts'])} experts, "
           f"seeds {s['seeds']} ({seeded}); wall time "
           f"{report['wall_seconds'] / 60:.1f} min. Every model is scored on the same test tokens "
           f"(each row's first {s['unscored_prefix_tokens']} tokens, prompt routing's prefix, are "
           f"not scored): {tokens}. Averages over domains are taken in loss (their perplexity is "
           f"the geometric mean); brackets: {100 * s['bootstrap']['level']:.0f}% bootstrap "
           f"interval over documents ({s['bootstrap']['resamples']} resamples; a domain with few "
           f"documents gets a narrow interval that understates its uncertainty).", "",
           "Mean test token loss (nats):", "", *head("avg")]
  lines += [row(m, m, v, "{:.3f}", "loss") for m, v in loss.items()]
  lines += ["", "Test perplexity:", "", *head("geo-mean")]
  lines += [row(m, m, v, "{:.2f}", "perplexity") for m, v in report["perplexity"].items()]
  if len(s["seeds"]) > 1:
    lines += ["", "Seed spread (each seed's loss averaged over all domains; the brackets above are "
              "over documents only):", "",
              "| model | " + " | ".join(f"seed {x}" for x in s["seeds"]) + " | mean | std |",
              "|---" * (len(s["seeds"]) + 3) + "|"]
    for label, by_seed in report["per_seed_loss"].items():
      avgs = [stats.mean_loss(v, domains) for v in by_seed.values()]
      lines.append(f"| {label} | " + " | ".join(f"{a:.3f}" for a in avgs)
                   + f" | {np.mean(avgs):.3f} | {np.std(avgs):.3f} |")
  lines += ["", "Opt-out (FlexOlmo with one expert removed), perplexity:", "", *head("geo-mean")]
  lines += [row(f"without {d}", f"without_{d}", v, "{:.2f}", "perplexity")
            for d, v in report["opt_out"].items()]
  lines += ["", "## Findings", "", "| finding | verdict | numbers (nats, 95% interval) |",
            "|---|---|---|"]
  lines += [f"| {f['finding']} | {f['verdict']} | {f['numbers']} |" for f in report["findings"]]
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
