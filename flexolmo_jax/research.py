r"""Experiments beyond the small reproduction (issue 19, item 5), one command each; each writes its
table to <out>/<experiment>.md and its numbers to <out>/<experiment>.json (docs/research/README.md).

  python -m flexolmo_jax.reproduce --workdir=runs            # first: public model and experts
  python -m flexolmo_jax.research --experiment=topk --workdir=runs [--out=docs/research]

Experiments (EXPERIMENTS; each trains only what it needs, each run in its own process, under
<workdir>/research/<experiment>/, and reuses the reproduction's artifacts where the setting is
the same):
  topk            FlexOlmo at top-k = 1, 2, 4, all (no training).
  bias            the expert bias's initial value, experts retrained on the ablation domains.
  router_source   the expert's router row: the public model's mean hidden state (the
                  reproduction's experts) vs the MiniLM sentence encoder (flexolmo_jax.embed).
  ablations       every ablation (solo, random_init, no_bias, and the paper's random_init +
                  no_bias) for every expert.
  full_moe        the unrestricted MoE trained on all data (flexolmo_jax.full_moe): the upper
                  reference.
  public_mix      EXTENSION beyond the paper: every owner also trains on a share of public rows
                  (flexolmo_jax/data/mix.py), against plain FlexOlmo.

Every model is scored by the reproduction's evaluator (reproduce.Evaluator: the same test tokens
as the reproduction, each row's routing prefix unscored): mean token loss (nats) and perplexity per
domain, their average over domains in loss (the geometric mean of perplexity), and each row's
difference from the experiment's reference row with its 95% paired bootstrap interval over
documents and a verdict (better / worse / cannot tell, flexolmo_jax.stats).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Callable

import numpy as np
from absl import flags

from flexolmo_jax import atomic, baselines, cli, merge, reproduce, runs, scoring, stats
from flexolmo_jax.data import corpus

TOP_KS = ("1", "2", "4", "all")


@dataclasses.dataclass(frozen=True)
class Options:
  """The experiments' settings (the command's flags)."""
  experiment: str
  workdir: str = "runs"
  out: str = "docs/research"
  domains: tuple[str, ...] = corpus.CLOSED_DOMAINS
  ablation_domains: tuple[str, ...] = ("math",)
  expert_steps: int = reproduce.Options.expert_steps
  eval_batches: int = reproduce.Options.eval_batches
  top_k: int = reproduce.Options.top_k
  top_ks: tuple[str, ...] = TOP_KS
  bias_inits: tuple[float, ...] = (-2.0, -1.0, -0.5, 0.0)
  public_share: float = 0.125  # 2 of 16 rows.
  full_moe_steps: int = 0  # 0: expert_steps x the number of domains (the experts' total).
  seed: int = 0

  def __post_init__(self):
    if self.experiment not in EXPERIMENTS:
      raise ValueError(f"unknown experiment {self.experiment!r}; choose one of "
                       f"{', '.join(EXPERIMENTS)}")
    for k in self.top_ks:
      if k != "all" and not (k.isdigit() and int(k) >= 1):
        raise ValueError(f"--top_ks: {k!r} is neither a positive integer nor 'all'")
    missing = sorted(set(self.ablation_domains) - set(self.domains))
    if missing:
      raise ValueError(f"--ablation_domains {missing} are not among --domains {list(self.domains)}")
    if not 0 < self.public_share < 1:
      raise ValueError(f"--public_share {self.public_share} must be in (0, 1)")


def define_flags() -> None:
  """Flags, defined only when run as a program; each sets the Options field of its name."""
  d = Options(experiment="topk")
  flags.DEFINE_string("experiment", None, f"One of {', '.join(EXPERIMENTS)}.")
  flags.DEFINE_string("workdir", d.workdir, "The reproduction's workdir (data, public model, "
                      "experts); experiments train under <workdir>/research/.")
  flags.DEFINE_string("out", d.out, "Where <experiment>.md and <experiment>.json are written.")
  flags.DEFINE_list("domains", list(d.domains), "Closed domains (experts).")
  flags.DEFINE_list("ablation_domains", list(d.ablation_domains),
                    "Domains whose experts bias and router_source retrain.")
  flags.DEFINE_integer("expert_steps", d.expert_steps, "Steps per retrained expert (as the "
                       "reproduction's, so its experts are reused).")
  flags.DEFINE_integer("eval_batches", d.eval_batches, "Test batches (8 x 128 tokens) per domain.")
  flags.DEFINE_integer("top_k", d.top_k, "Experts per token at inference (clamped).")
  flags.DEFINE_list("top_ks", list(d.top_ks), "topk: the k values ('all' = every expert).")
  flags.DEFINE_list("bias_inits", [str(x) for x in d.bias_inits], "bias: initial values.")
  flags.DEFINE_float("public_share", d.public_share, "public_mix: share of each batch's rows "
                     "drawn from public data.")
  flags.DEFINE_integer("full_moe_steps", d.full_moe_steps, "full_moe: training steps (0: "
                       "expert_steps x the number of domains).")
  flags.DEFINE_integer("seed", d.seed, "Seed of the random router rows (ablations).")
  flags.mark_flag_as_required("experiment")


def options_from_flags() -> Options:
  f = flags.FLAGS
  return Options(experiment=f.experiment, workdir=f.workdir, out=f.out, domains=tuple(f.domains),
                 ablation_domains=tuple(f.ablation_domains), expert_steps=f.expert_steps,
                 eval_batches=f.eval_batches, top_k=f.top_k, top_ks=tuple(f.top_ks),
                 bias_inits=tuple(float(x) for x in f.bias_inits), public_share=f.public_share,
                 full_moe_steps=f.full_moe_steps, seed=f.seed)


# ----------------------------------------------------------------------------- shared parts


class Context:
  """The reproduction's workdir, its evaluator, and each model's per-document NLL sums."""

  def __init__(self, opts: Options):
    self.opts = opts
    self.root = pathlib.Path(opts.workdir)
    self.public = self.root / "public"
    self.data = self.root / "data"
    if not (self.public.exists() and self.data.exists()):
      raise FileNotFoundError(f"no reproduction under {self.root} (it needs public/ and data/): "
                              f"run python -m flexolmo_jax.reproduce --workdir={self.root} first")
    self.domains = ["public", *opts.domains]
    self.evaluator = reproduce.Evaluator(str(self.data), self.domains, opts.eval_batches)
    self.docs: dict[str, dict[str, np.ndarray]] = {}  # {model: {domain: per-document sums}}

  def dir(self, *parts: str) -> pathlib.Path:
    """A path under the experiment's own directory (created)."""
    home = self.root / "research" / self.opts.experiment
    home.mkdir(parents=True, exist_ok=True)
    return home.joinpath(*parts)

  def score(self, name: str, config, params, over=None) -> None:
    """Scores a model on `over` (default: every domain) into the table's row `name`."""
    self.docs[name] = self.evaluator(name, scoring.model_scorer(config, params), over)

  def score_public(self) -> None:
    config, params, _ = runs.load_params(self.public)
    self.score("public", config, params)

  def score_merged(self, name: str, experts: dict[str, str], *, top_k=None, keep_bias=True,
                   over=None) -> None:
    config, params, _ = merge.assemble(self.public, experts, top_k=top_k or self.opts.top_k,
                                       keep_bias=keep_bias)
    self.score(name, config, params, over)

  def experts(self, domains=None) -> dict[str, str]:
    """The reproduction's experts (plain FlexOlmo), which must have trained expert_steps steps
    like every expert an experiment trains."""
    out = {d: self.root / "experts" / d for d in (domains or self.opts.domains)}
    for d, path in out.items():
      step = json.loads((path / runs.MANIFEST).read_text()).get("step") if (
          path / runs.MANIFEST).exists() else None
      if step != self.opts.expert_steps:
        raise ValueError(f"the reproduction's {d} expert at {path} has "
                         f"{'no run' if step is None else f'{step} steps'}, not --expert_steps="
                         f"{self.opts.expert_steps}: run python -m flexolmo_jax.reproduce "
                         f"--workdir={self.root} --expert_steps={self.opts.expert_steps} first, or "
                         "pass the --expert_steps it was run with")
    return {d: str(path) for d, path in out.items()}

  def train_experts(self, path: Callable[[str], pathlib.Path], *overrides: str, domains=None,
                    module: str = "flexolmo_jax.train") -> dict[str, str]:
    """Trains (or reuses) one expert per domain at path(domain), each in its own process, with
    the reproduction's settings and `overrides`."""
    # The small tier's expert runs (one training seed, directly under the workdir), run as the
    # reproduction runs them (reproduce.Options.workers at a time).
    tier = reproduce.Options(workdir=str(self.root), domains=tuple(self.opts.domains),
                             expert_steps=self.opts.expert_steps)
    domains = domains or self.opts.domains
    reproduce.run_parallel(
        [lambda d=d: reproduce._train_expert(tier, self.root, 0, d, path(d), *overrides,  # pylint: disable=protected-access
                                             module=module) for d in domains], tier.workers)
    return {d: str(path(d)) for d in domains}


# ----------------------------------------------------------------------------- experiments


def topk(ctx: Context) -> dict:
  """FlexOlmo with k experts per token, k in opts.top_ks (clamped to the experts present)."""
  ctx.score_public()
  n = len(ctx.opts.domains) + 1
  done = set()
  for k in ctx.opts.top_ks:
    value = n if k == "all" else min(int(k), n)
    if value in done:
      continue
    done.add(value)
    ctx.score_merged(f"flexolmo top-{value}" + (" (all)" if value == n else ""), ctx.experts(),
                     top_k=value)
  return {"title": "Top-k sweep", "reference": "public",
          "about": f"FlexOlmo (public + {n - 1} experts) with k experts per token; the paper's "
                   "Table 7 sweeps k = 1, 2, 4, all. No training: the reproduction's experts."}


def bias(ctx: Context) -> dict:
  """Experts retrained on the ablation domains with each initial value of the expert bias."""
  ablated = list(ctx.opts.ablation_domains)
  over = ["public", *ablated]
  ctx.score_public()
  default = reproduce_default_bias()
  for value in ctx.opts.bias_inits:
    if value == default:  # The reproduction's own experts.
      experts = ctx.experts(ablated)
    else:
      experts = ctx.train_experts(lambda d, v=value: ctx.dir(f"{v:g}", d),
                                  f"--config.expert.bias_init={value}", domains=ablated)
    ctx.score_merged(f"bias_init {value:g}" + (" (default)" if value == default else ""),
                     experts, over=over)
  return {"title": "Expert bias: initial value", "reference": "public",
          "about": f"FlexOlmo of public + the {', '.join(ablated)} expert(s), each trained with "
                   "the expert bias starting at the given value (it is applied as min(b, 0), "
                   "docs/method.md, section 3, item 6); scored on " + ", ".join(over) + "."}


def reproduce_default_bias() -> float:
  from configs import expert_base  # pylint: disable=g-import-not-at-top (the repository's configs)
  return float(expert_base.get_config("math").expert.bias_init)


def router_source(ctx: Context) -> dict:
  """The expert's router row from the public model's mean hidden state vs from MiniLM."""
  ablated = list(ctx.opts.ablation_domains)
  over = ["public", *ablated]
  ctx.score_public()
  ctx.score_merged("public model's mean hidden state (default)", ctx.experts(ablated), over=over)
  emb = ctx.dir("minilm.npz")
  have = _npz_rows(emb)
  for d in ["public", *ablated]:
    if d not in have:
      reproduce._run("flexolmo_jax.embed", f"--data={ctx.data}", f"--domain={d}",  # pylint: disable=protected-access
                     "--embedder=minilm", f"--public={ctx.public}", f"--out={emb}")
  experts = ctx.train_experts(lambda d: ctx.dir("minilm", d),
                              f"--config.expert.router_embeddings={emb}", domains=ablated)
  ctx.score_merged("MiniLM sentence encoder", experts, over=over)
  return {"title": "Router row source", "reference": "public",
          "about": "The expert's router row (and the public row) from the public model's own "
                   "mean FFN input over the owner's training batches (the reproduction's "
                   "fallback) vs from all-MiniLM-L6-v2 over 1000 sampled documents projected to "
                   "d_model by the shared projection (python -m flexolmo_jax.embed; docs/method.md, "
                   f"section 4). FlexOlmo of public + {', '.join(ablated)}; scored on "
                   + ", ".join(over) + "."}


def _npz_rows(path: pathlib.Path) -> set[str]:
  if not path.exists():
    return set()
  with np.load(path) as data:
    return set(data.files)


ABLATIONS = ("solo", "random_init", "no_bias", "random_init_no_bias")


def ablations(ctx: Context) -> dict:
  """Every ablation for every expert, each merged over all domains, against FlexOlmo."""
  ctx.score_public()
  ctx.score_merged("flexolmo", ctx.experts())
  emb = reproduce.random_rows(ctx.dir("random_rows.npz"), ctx.public, ctx.domains, ctx.opts.seed)
  setups = {  # label: (run directory of a domain, trainer flags, trainer module)
      # Solo and no-bias experts are the reproduction's ablations, trained the same way; reused.
      "solo": (lambda d: ctx.root / "ablations" / "solo" / d, (), "flexolmo_jax.solo_expert"),
      "random_init": (lambda d: ctx.dir("random_init", d),
                      (f"--config.expert.router_embeddings={emb}",), "flexolmo_jax.train"),
      "no_bias": (lambda d: ctx.root / "ablations" / "no_bias" / d,
                  ("--config.expert.bias=false",), "flexolmo_jax.train"),
      "random_init_no_bias": (lambda d: ctx.dir("random_init_no_bias", d),
                              (f"--config.expert.router_embeddings={emb}",
                               "--config.expert.bias=false"), "flexolmo_jax.train"),
  }
  for label in ABLATIONS:
    path, overrides, module = setups[label]
    experts = ctx.train_experts(path, *overrides, module=module)
    ctx.score_merged(f"ablation {label}", experts, keep_bias="no_bias" not in label)
  return {"title": "Ablations for every expert", "reference": "flexolmo",
          "about": "Each ablation applied to every expert, merged over all domains "
                   "(docs/method.md, section 6): solo = no coordinated training (FFN trained alone "
                   "as a dense model); random_init = random router rows (public row too) instead "
                   "of domain embeddings; no_bias = no expert bias; random_init_no_bias = both, "
                   "the paper's combined ablation."}


def full_moe(ctx: Context) -> dict:
  """The unrestricted MoE: the merged model, every parameter trained on every domain."""
  ctx.score_public()
  ctx.score_merged("flexolmo", ctx.experts())
  merged, run = ctx.dir("merged"), ctx.dir("run")
  if not merged.exists():
    merge.merge_to_dir(ctx.public, ctx.experts(), merged, top_k=ctx.opts.top_k)
  steps = ctx.opts.full_moe_steps or ctx.opts.expert_steps * len(ctx.opts.domains)
  if reproduce._finished(run, steps):  # pylint: disable=protected-access
    reproduce.log(f"reusing {run}")
  else:
    reproduce._run("flexolmo_jax.full_moe", "--config=configs/full_moe.py", f"--workdir={run}",  # pylint: disable=protected-access
                   f"--config.init_from={merged}", f"--config.data.path={ctx.data}",
                   f"--config.data.domains={tuple(ctx.domains)!r}", f"--config.steps={steps}",
                   f"--config.eval_every={steps}", f"--config.checkpoint_every={steps}")
  config, params, _ = runs.load_params(run)
  ctx.score("unrestricted MoE (all data)", config, params)
  return {"title": "Unrestricted MoE (upper reference)", "reference": "flexolmo",
          "about": f"The merged FlexOlmo model with every parameter then trained jointly on every "
                   f"domain's data for {steps} steps (as many as all experts together), top-"
                   f"{min(ctx.opts.top_k, len(ctx.domains))}, with load balancing "
                   "(configs/full_moe.py): what a data-sharing MoE reaches from the same start."}


def public_mix(ctx: Context) -> dict:
  """EXTENSION: owners also train on a share of public rows; against plain FlexOlmo."""
  share = ctx.opts.public_share
  ctx.score_public()
  ctx.score_merged("flexolmo", ctx.experts())
  experts = ctx.train_experts(lambda d: ctx.dir(f"share_{share:g}", d),
                              f"--config.expert.public_share={share}")
  ctx.score_merged(f"flexolmo + public share {share:g} (extension)", experts)
  return {"title": "EXTENSION (not in the paper): owners train on a share of public data",
          "reference": "flexolmo",
          "about": f"Beyond the paper, aimed at routing that is not domain-selective (issue 19): "
                   f"{share:g} of every expert-training batch's rows are public documents, which "
                   "every owner may use, so its router row also learns to yield to the public "
                   "expert on public text (flexolmo_jax/data/mix.py). The owner still never reads "
                   "another closed domain. Same steps, so the owner sees fewer of its own tokens."}


EXPERIMENTS: dict[str, Callable[[Context], dict]] = {
    "topk": topk, "bias": bias, "router_source": router_source, "ablations": ablations,
    "full_moe": full_moe, "public_mix": public_mix}


# ----------------------------------------------------------------------------- tables


def reduced_settings(opts: Options, public_steps: int | None) -> list[str]:
  """The settings below the reproduction's defaults (a table made with them must say so);
  `public_steps` None: a public model that is not a training run (e.g. a converted one)."""
  d = reproduce.Options()
  out = [f"{name} {have} < {want}" for name, have, want in (
      ("public_steps", public_steps, d.public_steps), ("expert_steps", opts.expert_steps,
                                                        d.expert_steps),
      ("eval_batches", opts.eval_batches, d.eval_batches)) if have is not None and have < want]
  if set(opts.domains) != set(d.domains):
    out.append(f"domains {', '.join(opts.domains)} of {', '.join(d.domains)}")
  return out


# The verdict on "the row's average loss is below the reference row's" (stats.verdict, side -1).
VERDICTS = {stats.HOLDS: "better", stats.DOES_NOT_HOLD: "worse", stats.CANNOT_TELL: "cannot tell"}


def table(report: dict) -> dict:
  """From the report's per-document sums (reproduce.losses): "loss", "perplexity" and
  "loss_interval" {model: {domain: ...}}, "average" {model: {"all"/"closed": {"loss",
  "perplexity", "interval"}}}, and "delta" {model: {"loss", "interval", "verdict"}}: the row's
  average loss minus the reference row's over the row's domains, its paired bootstrap interval,
  and whether the row is better, worse, or cannot be told apart ("reference" for the reference)."""
  out = {k: v for k, v in reproduce.losses(report).items() if k != "opt_out"}
  ref, loss = report["reference"], out["loss"]
  boot, level = reproduce.bootstrap(report), report["settings"]["bootstrap"]["level"]
  out["delta"] = {}
  for m, by_d in loss.items():
    ds = [d for d in report["domains"] if d in by_d]
    lo, hi = stats.interval(stats.mean_loss(boot[m], ds) - stats.mean_loss(boot[ref], ds), level)
    out["delta"][m] = {"loss": stats.mean_loss(by_d, ds) - stats.mean_loss(loss[ref], ds),
                       "interval": [lo, hi],
                       "verdict": "reference" if m == ref else VERDICTS[stats.verdict(lo, hi)]}
  return out


def markdown(report: dict) -> str:
  """The experiment's table: loss (nats) and perplexity per domain, the average in loss, and the
  difference from the reference row with its interval and verdict."""
  domains, ref, s = report["domains"], report["reference"], report["settings"]
  lines = [f"# {report['title']}", ""]
  if report["reduced"]:
    lines += [f"**Reduced settings, not the reproduction's: {'; '.join(report['reduced'])}.** "
              "Numbers show that the command runs, not what the method does.", ""]
  docs = {d: len(report["document_tokens"][d]) for d in domains}
  tokens = ", ".join(f"{d} {n} ({docs[d]} documents)" for d, n in s["scored_tokens"].items())
  few = [d for d, n in docs.items() if n < reproduce.FEW_DOCUMENTS]
  b = s["bootstrap"]
  lines += [report["about"], "",
            f"Command: `{report['command']}`. Public model "
            f"{'(not a training run)' if s['public_steps'] is None else s['public_steps']} steps, "
            f"experts {s['expert_steps']} steps, one seed; {report['wall_seconds'] / 60:.1f} min "
            f"after start-up, on {report['machine']}. Scored test tokens (the reproduction's "
            f"evaluator; each row's first {s['unscored_prefix_tokens']} tokens, prompt routing's "
            f"prefix, are not scored): {tokens}.", "",
            "Each cell: mean token loss in nats (perplexity). avg: the mean over the row's "
            "domains of the loss (the geometric mean of perplexity). "
            f"Δ avg: avg loss minus the `{ref}` row's over the same domains (negative: better). "
            f"{100 * b['level']:.0f}% interval: of Δ avg, by a paired bootstrap over documents "
            f"({b['resamples']} resamples, the same documents for every row). Verdict: better "
            "if the whole interval is below 0, worse if above, cannot tell if it reaches 0."
            + (f" **{', '.join(few)}: fewer than {reproduce.FEW_DOCUMENTS} documents; the "
               "intervals understate the uncertainty.**" if few else ""), "",
            "| model | " + " | ".join(domains) + f" | avg | Δ avg | {100 * b['level']:.0f}% "
            "interval | verdict |", "|---" * (len(domains) + 5) + "|"]
  for name, row in report["loss"].items():
    cells = [f"{row[d]:.4f} ({report['perplexity'][name][d]:.2f})" if d in row else ""
             for d in domains]
    avg, delta = report["average"][name]["all"]["loss"], report["delta"][name]
    lo, hi = delta["interval"]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg:.4f} ({math.exp(avg):.2f}) | "
                 f"{delta['loss']:+.4f} | {'' if name == ref else f'[{lo:+.4f}, {hi:+.4f}]'} | "
                 f"{delta['verdict']} |")
  return "\n".join(lines) + "\n"


def command(opts: Options) -> str:
  """The command line that runs `opts` (the flags that differ from the defaults)."""
  default = Options(experiment=opts.experiment)
  parts = ["python -m flexolmo_jax.research", f"--experiment={opts.experiment}",
           f"--workdir={opts.workdir}"]
  for field in dataclasses.fields(Options):
    value = getattr(opts, field.name)
    if field.name not in ("experiment", "workdir") and value != getattr(default, field.name):
      shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(
          value, tuple) else value
      parts.append(f"--{field.name}={shown}")
  return " ".join(parts)


def run(opts: Options) -> dict:
  """Runs one experiment; writes <out>/<experiment>.{md,json}; returns the report."""
  start = time.perf_counter()
  # How busy the machine was: timings on a shared machine are not the method's cost.
  machine = f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the start"
  ctx = Context(opts)
  reproduce.use_compilation_cache(ctx.root)
  report = EXPERIMENTS[opts.experiment](ctx)
  public_steps = json.loads((ctx.public / runs.MANIFEST).read_text()).get("step") if (
      ctx.public / runs.MANIFEST).exists() else None
  tokens = ctx.evaluator.tokens
  report.update(
      experiment=opts.experiment, domains=ctx.domains, command=command(opts),
      reduced=reduced_settings(opts, public_steps), wall_seconds=time.perf_counter() - start,
      machine=machine,
      settings={**dataclasses.asdict(opts), "public_steps": public_steps,
                "unscored_prefix_tokens": baselines.PROMPT_TOKENS,
                "scored_tokens": {d: int(tokens[d].sum()) for d in ctx.domains},
                "bootstrap": dict(reproduce.BOOTSTRAP)},
      # The raw numbers every loss and interval is computed from (as in results.json).
      document_tokens={d: tokens[d].tolist() for d in ctx.domains},
      document_nll={m: {d: v.tolist() for d, v in by_d.items()} for m, by_d in ctx.docs.items()})
  report.update(table(report))
  out = pathlib.Path(opts.out)
  out.mkdir(parents=True, exist_ok=True)
  atomic.write_text(out / f"{opts.experiment}.json", json.dumps(report, indent=1) + "\n")
  atomic.write_text(out / f"{opts.experiment}.md", markdown(report))
  print(markdown(report))
  return report


def main(argv):
  del argv
  cli.default_verbosity()
  opts = options_from_flags()
  runs.require_local_workdir(opts.workdir)  # It trains there.
  run(opts)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
