"""The reproduction's findings and tables from hand-made per-document losses, and the stage
commands of each tier (no training)."""

import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest

from flexolmo_jax import config as C
from flexolmo_jax import reproduce, stats
from flexolmo_jax.data import pipeline as data_pipeline
from flexolmo_jax.data.config import DataConfig

DOMAINS = ["public", "math", "code"]
TOKENS = [10, 20, 30, 40]
# Each model's document NLLs are loss * tokens * SHAPE, so every model's domain loss is exactly the
# given loss (sum(SHAPE * TOKENS) == sum(TOKENS)) and each resample scales a domain's loss (and a
# difference on it) by the same factor, between 0.9 and 1.2: a nonzero difference keeps its sign.
SHAPE = [1.2, 0.9, 1.0, 1.0]
LOSSES = {
    "public": {"public": 2.0, "math": 3.0, "code": 3.4},
    "flexolmo": {"public": 2.1, "math": 1.5, "code": 1.8},  # Average 1.8 nats.
    "soup_uniform": {"public": 2.5, "math": 2.1, "code": 2.2},
    "soup_weighted": {"public": 2.5, "math": 2.1, "code": 2.2},
    "btm": {"public": 2.0, "math": 1.4, "code": 1.6},  # Average 1.67 < FlexOlmo's.
    "prompt_routing": {"public": 2.1, "math": 1.6, "code": 1.9},
    "flexolmo_ablation_subset": {"public": 2.1, "math": 1.6, "code": 3.0},
    "ablation_solo": {"public": 2.1, "math": 1.9, "code": 3.0},
    "ablation_random_init": {"public": 2.1, "math": 1.6, "code": 3.0},  # Identical: no change.
    "ablation_no_bias": {"public": 2.0, "math": 1.5, "code": 3.0},
    "without_math": {"public": 2.1, "math": 2.9, "code": 1.85},  # Own +1.4, code +0.05.
    "without_code": {"public": 2.1, "math": 2.2, "code": 1.9},  # Own +0.1, math +0.7.
}


def _docs(losses):
  return {d: [v * t * s for t, s in zip(TOKENS, SHAPE)] for d, v in losses.items()}


def _report(**extra_losses):
  nll = {m: _docs(v) for m, v in {**LOSSES, **extra_losses}.items()}
  # BTX: FlexOlmo's total on every domain, but better on some documents and worse on others.
  nll["btx"] = {d: [v + s for v, s in zip(nll["flexolmo"][d], [6.0, -6.0, 6.0, -6.0])]
                for d in DOMAINS}
  report = {"settings": {"public_steps": 3, "expert_steps": {"math": 2, "code": 2}, "top_k": 3,
                         "btm_top_k": 2,
                         "tune_steps": 1, "eval_batches": 1, "ablation_domains": ["math"],
                         "seeds": [0, 1], "unscored_prefix_tokens": 32,
                         "scored_tokens": {d: sum(TOKENS) for d in DOMAINS},
                         "bootstrap": dict(reproduce.BOOTSTRAP)},
            "domains": DOMAINS, "experts": DOMAINS,
            "document_tokens": {d: TOKENS for d in DOMAINS}, "document_nll": nll,
            "per_seed_loss": {"btx": {"0": {"public": 2.0, "math": 1.0, "code": 3.0},
                                      "1": {"public": 2.0, "math": 2.0, "code": 5.0}}},
            "routing": {"png": "routing.png"}, "wall_seconds": 60.0}
  return {**report, **reproduce.losses(report)}


def _findings(report):
  return {f["finding"]: f for f in reproduce.findings(report)}


def test_losses_perplexities_and_geometric_averages():
  report = _report()
  assert report["loss"]["flexolmo"] == pytest.approx(LOSSES["flexolmo"], rel=1e-12)
  assert report["perplexity"]["flexolmo"]["math"] == pytest.approx(math.exp(1.5), rel=1e-12)
  avg = report["average"]["flexolmo"]
  assert avg["all"]["loss"] == pytest.approx(1.8, rel=1e-12)
  # The average's perplexity is the geometric mean, exp(1.8) = 6.05, not the arithmetic mean of
  # the perplexities (8.17 + 4.48 + 6.05) / 3 = 6.23.
  assert avg["all"]["perplexity"] == pytest.approx(
      (math.exp(2.1) * math.exp(1.5) * math.exp(1.8)) ** (1 / 3), rel=1e-12)
  lo, hi = avg["closed"]["interval"]
  assert 0.9 * 1.65 <= lo < 1.65 < hi <= 1.2 * 1.65
  assert report["opt_out"]["math"]["math"] == pytest.approx(math.exp(2.9), rel=1e-12)
  assert "without_math" not in report["loss"]


def test_findings_decide_each_claim_from_the_intervals():
  got = _findings(_report())
  every = got["FlexOlmo beats the public model on every closed domain"]
  assert every["verdict"] == stats.HOLDS
  assert every["intervals"]["math"][0] == pytest.approx(-1.5, rel=1e-12)
  assert every["numbers"].startswith("loss difference math -1.500 [")
  soup = got["FlexOlmo beats soup_uniform on average (all domains)"]
  assert soup["verdict"] == stats.HOLDS
  assert soup["difference"] == pytest.approx(1.8 - 6.8 / 3, rel=1e-12)
  assert soup["interval"][0] < soup["difference"] < soup["interval"][1] < 0
  assert soup["numbers"].startswith("perplexity 6.05 vs 9.65 (geometric mean); loss difference "
                                    "-0.467 [")
  assert got["FlexOlmo beats btm on average (all domains)"]["verdict"] == stats.DOES_NOT_HOLD
  assert got["FlexOlmo beats prompt_routing on average (all domains)"]["verdict"] == stats.HOLDS
  btx = got["FlexOlmo beats btx on average (all domains)"]
  assert btx["verdict"] == stats.CANNOT_TELL and btx["interval"][0] < 0 < btx["interval"][1]
  opt = got["removing an expert hurts mainly its own domain"]
  assert opt["verdict"] == stats.DOES_NOT_HOLD  # -code moves math more than code.
  assert opt["intervals"]["math"][1] > 0 > opt["intervals"]["code"][2]
  assert "-math: own loss +1.400, margin over the largest other change +1.350 [" in opt["numbers"]
  assert "-code: own loss +0.100, margin over the largest other change -0.600 [" in opt["numbers"]
  assert got["ablation 'solo' hurts (average over public, math)"]["verdict"] == stats.HOLDS
  assert got["ablation 'no_bias' hurts (average over public, math)"]["verdict"] == \
      stats.DOES_NOT_HOLD
  assert got["ablation 'random_init' hurts (average over public, math)"]["verdict"] == \
      stats.CANNOT_TELL
  assert not any("router tuning" in f for f in got)  # No tuned row, no tuned findings.
  assert not any("dense" in f for f in got)  # Rows absent from the report are not judged.


def test_router_tuned_flexolmo_gets_its_own_findings():
  got = _findings(_report(flexolmo_router_tuned={"public": 2.0, "math": 1.5, "code": 3.5},
                          btm_dense={"public": 2.0, "math": 1.7, "code": 2.0}))
  assert got["FlexOlmo + router tuning beats the public model on every closed domain"][
      "verdict"] == stats.DOES_NOT_HOLD  # code 3.5 vs 3.4.
  assert got["FlexOlmo + router tuning beats btm on average (all domains)"]["verdict"] == \
      stats.DOES_NOT_HOLD
  assert got["FlexOlmo beats btm_dense on average (all domains)"]["verdict"] == stats.HOLDS


def test_markdown_has_every_model_opt_out_row_and_finding():
  report = _report()
  report["findings"] = reproduce.findings(report)
  text = reproduce.markdown(report)
  assert "| flexolmo | 2.100 | 1.500 | 1.800 | 1.650 [" in text
  assert "| flexolmo | 8.17 | 4.48 | 6.05 | 5.21 [" in text  # Geometric means: exp(1.65), exp(1.8).
  assert "| 6.05 [" in text.split("| flexolmo | 8.17")[1].split("\n")[0]
  assert "| without math | 8.17 | 18.17 | 6.36 | 10.75 [" in text
  verdicts = (stats.HOLDS, stats.DOES_NOT_HOLD, stats.CANNOT_TELL)
  assert sum(text.count(f"| {v} |") for v in verdicts) == len(report["findings"])
  assert "| btx | 2.000 | 3.000 | 2.500 | 0.500 |" in text  # Per-seed averages, mean, std.
  assert "each row's first 32 tokens" in text and "math 100 (4 documents)" in text


def test_evaluator_scores_every_model_on_the_tokens_after_the_routing_prefix(corpus_dir):
  ev = reproduce.Evaluator(corpus_dir, ["math", "code"], eval_batches=1)

  def scorer(nll_at):  # A stand-in model: NLL 1 wherever nll_at(position) holds.
    def score(batches, per_token=False):
      assert per_token
      cols = nll_at(np.arange(reproduce.EVAL_SEQ))
      return {"token_nll": [b["loss_mask"] * cols for b in batches]}
    return score

  prefix = reproduce.baselines.PROMPT_TOKENS
  after = ev("after", scorer(lambda p: p >= prefix))
  inside = ev("inside", scorer(lambda p: p < prefix))
  for d in ("math", "code"):
    batches = ev.batches[d]
    want = sum(float(b["loss_mask"][:, prefix:].sum()) for b in batches)
    assert after[d].sum() == ev.tokens[d].sum() == want  # Every token after the prefix counts...
    assert not inside[d].any()  # ...and none inside it, whatever a model scores there.
    np.testing.assert_array_equal(after[d], ev.tokens[d])  # Per document, too.
  only = ev("code only", scorer(lambda p: p >= prefix), ["code"])  # research scores subsets.
  assert list(only) == ["code"]
  np.testing.assert_array_equal(only["code"], after["code"])


def _recorded_training(tmp_path, monkeypatch, opts):
  """The stage commands train_everything runs for `opts` (nothing is trained)."""
  data = tmp_path / "data"
  data.mkdir()
  (data / "manifest.json").write_text(json.dumps({"domains": {
      "math": {"train": {"tokens": 10_000}}, "code": {"train": {"tokens": 4_000}}}}))
  if opts.expert_tokens:  # Read from the token records (test_owner_data_...); here: made up.
    monkeypatch.setattr(reproduce, "owner_data", lambda o, d, domain: {
        "math": (7, 10_000), "code": (0, 4_000)}[domain])
  commands = []
  monkeypatch.setattr(reproduce, "_run", lambda *args, output=None: commands.append(args))
  monkeypatch.setattr(reproduce.runs, "load_params", lambda path: (C.tiny(), None, None))
  reproduce.train_everything(opts)
  return commands


def test_medium_tier_trains_everything_once_per_seed_in_its_own_directory(tmp_path, monkeypatch):
  opts = reproduce.scaled("medium", workdir=str(tmp_path), domains=("math", "code"),
                          ablation_domains=("math",))
  assert opts.train_seeds == (0, 1, 2) and opts.expert_epochs == 3.0 and opts.workers == 2
  assert opts.public_config == "configs/public_medium.py" and opts.expert_tokens > 0
  assert reproduce.training_dirs(opts) == {s: tmp_path / f"seed{s}" for s in (0, 1, 2)}
  commands = _recorded_training(tmp_path, monkeypatch, opts)  # Two workers: any order...
  assert commands[0] == ("flexolmo_jax.data", "prepare", f"--out={tmp_path / 'data'}")
  for seed in (0, 1, 2):
    root = tmp_path / f"seed{seed}"
    by_dir = {next(a for a in c if a.startswith("--workdir=")): c for c in commands[1:]}
    public, math_expert, code_expert, math_dense, code_dense, solo, random_init, no_bias = (
        by_dir[f"--workdir={root / sub}"] for sub in (
            "public", "experts/math", "experts/code", "dense/math", "dense/code",
            "ablations/solo/math", "ablations/random_init/math", "ablations/no_bias/math"))
    # ...but a seed's public model before any run on it.
    assert all(commands.index(public) < commands.index(c) for c in by_dir.values()
               if c is not public and any(str(root) + "/" in a for a in c))
    assert {"--config=configs/public_medium.py", f"--config.seed={seed}",
            f"--config.data.seed={seed}", "--config.steps=400"} <= set(public)
    assert {f"--workdir={root / 'experts' / 'math'}", f"--config.expert.public={root / 'public'}",
            "--config.steps=15",  # ceil(3 epochs x 10000 tokens / (16 x 128)).
            "--config.optim.warmup_steps=1", "--config.eval_every=3", "--config.log_every=3",
            f"--config.data.seed={seed}", "--config.eval_domains=('public', 'math', 'code')",
            "--config.data.train_subset={'math': 7}"} <= set(math_expert)
    assert "--config.steps=6" in code_expert  # ceil(3 x 4000 / 2048).
    assert not any("train_subset" in a for a in code_expert)  # Its whole split is smaller.
    assert "--config.data.train_subset={'math': 7}" in solo + random_init + no_bias
    assert solo[0] == "flexolmo_jax.solo_expert"
    assert not any(a.startswith("--config.eval_domains") for a in solo)  # Dense: no routing.
    assert f"--config.expert.router_embeddings={root / 'ablations' / 'random_rows.npz'}" in random_init
    assert "--config.expert.bias=false" in no_bias
    assert (root / "ablations" / "random_rows.npz").exists()
    # The BTM and soup members: the public model fine-tuned on the owner's data, expert-long.
    assert {"--config=configs/dense_base.py:math,public_medium",
            f"--config.init_from={root / 'public'}",
            "--config.steps=15", "--config.data.train_subset={'math': 7}",
            f"--config.seed={seed}"} <= set(math_dense)
    assert "--config=configs/dense_base.py:code,public_medium" in code_dense
  assert len(commands) == 1 + 3 * 8


def test_small_tier_keeps_its_layout_and_steps(tmp_path, monkeypatch):
  opts = reproduce.scaled("small", workdir=str(tmp_path), domains=("math",),
                          ablation_domains=("math",))
  assert opts == reproduce.Options(workdir=str(tmp_path), domains=("math",),
                                   ablation_domains=("math",))
  assert reproduce.training_dirs(opts) == {0: tmp_path}
  commands = _recorded_training(tmp_path, monkeypatch, opts)
  public = commands[1]  # Before every run on it; those run two at a time, in any order.
  expert = next(c for c in commands if f"--workdir={tmp_path / 'experts' / 'math'}" in c)
  assert public == ("flexolmo_jax.train", "--config=configs/public.py",
                    f"--workdir={tmp_path / 'public'}", f"--config.data.path={tmp_path / 'data'}",
                    "--config.steps=300")
  assert {f"--workdir={tmp_path / 'experts' / 'math'}", "--config.steps=40",
          "--config.eval_every=40", "--config.checkpoint_every=40"} <= set(expert)
  assert not any("seed" in a or "warmup" in a for a in expert)


def test_unknown_scale_is_refused_naming_the_tiers():
  with pytest.raises(ValueError, match="choose one of small, medium"):
    reproduce.scaled("large")


def test_owner_data_is_the_first_documents_holding_the_token_budget(corpus_dir):
  opts = reproduce.Options(workdir="unused", expert_tokens=500)
  data = pathlib.Path(corpus_dir)
  documents, tokens = reproduce.owner_data(opts, data, "math")
  records = data_pipeline.documents(DataConfig(path=corpus_dir, domains=("math",)), "train")
  sizes = [len(records[i]) // 4 for i in range(len(records))]
  assert sum(sizes[:documents]) == tokens >= 500 > sum(sizes[:documents - 1])
  whole = json.loads((data / "manifest.json").read_text())["domains"]["math"]["train"]["tokens"]
  assert reproduce.owner_data(reproduce.Options(), data, "math") == (0, whole)
  assert reproduce.owner_data(dataclasses.replace(opts, expert_tokens=10 * whole), data,
                              "math") == (0, whole)


def test_training_seeds_are_evaluated_in_their_own_directories_and_averaged(
    corpus_dir, tmp_path, monkeypatch):
  (tmp_path / "data").symlink_to(corpus_dir)
  opts = reproduce.Options(workdir=str(tmp_path), domains=("math", "code"), eval_batches=1,
                           train_seeds=(3, 5), seeds=(0,))
  called = []

  def evaluate_models(opts_, ev, root, seeds):
    called.append((root, seeds))
    shift = {3: 0.0, 5: 2.0}[seeds[0]]  # Seed 5's models lose 2 nats more per document.
    docs = {m: {d: np.full(len(ev.tokens[d]), base + shift) for d in ev.batches}
            for m, base in (("public", 10.0), ("flexolmo", 8.0), ("btx", 9.0))}
    return docs, {"btx": {str(seeds[0]): docs["btx"]}}, (C.tiny(), None, ["public"])

  monkeypatch.setattr(reproduce, "evaluate_models", evaluate_models)
  monkeypatch.setattr(reproduce.routing_analysis, "domain_shares", lambda *a, **k: None)
  monkeypatch.setattr(reproduce.routing_analysis, "write_report",
                      lambda *a, **k: {"png": "routing.png"})
  report = reproduce.evaluate_everything(opts)
  # Each seed's models from its own directory, its seeded stages with that seed only.
  assert called == [(tmp_path / "seed3", (3,)), (tmp_path / "seed5", (5,))]
  assert report["settings"]["seeds"] == report["settings"]["train_seeds"] == [3, 5]
  for d in ("public", "math", "code"):
    assert report["document_nll"]["flexolmo"][d] == [9.0] * len(report["document_tokens"][d])
    tokens = sum(report["document_tokens"][d])
    n = len(report["document_tokens"][d])
    for seed, shift in (("3", 0.0), ("5", 2.0)):
      assert report["per_seed_loss"]["public"][seed][d] == pytest.approx(
          n * (10.0 + shift) / tokens)
  report["findings"] = reproduce.findings(report)
  beats_btx = next(f for f in report["findings"]
                   if f["finding"] == "FlexOlmo beats btx on average (all domains)")
  # Each seed's own difference is printed beside the interval over documents.
  each = [stats.mean_loss(report["per_seed_loss"]["flexolmo"][s], report["domains"])
          - stats.mean_loss(report["per_seed_loss"]["btx"][s], report["domains"]) for s in "35"]
  assert beats_btx["numbers"].endswith(f"; per seed {each[0]:+.3f}, {each[1]:+.3f}")
  assert each[0] < 0 and each[1] < 0


def test_run_parallel_waits_for_dependencies_and_stops_at_the_first_failure():
  import threading
  import time as time_
  events, lock = [], threading.Lock()

  def job(name, seconds=0.0, fail=False):
    def run():
      time_.sleep(seconds)
      if fail:
        raise RuntimeError(f"{name} failed")
      with lock:
        events.append(name)
    return run

  # Job 2 waits for the slow job 0 although a worker is free for it after job 1.
  reproduce.run_parallel([job("public", 0.3), job("other"), job("on public")], 2, {2: 0})
  assert events.index("on public") > events.index("public")
  events.clear()
  # One worker: the failure is raised and nothing after it starts.
  with pytest.raises(RuntimeError, match="first failed"):
    reproduce.run_parallel([job("first", fail=True), job("second"), job("third")], 1)
  assert events == []
