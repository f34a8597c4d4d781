"""The reproduction's findings and tables from hand-made numbers, and the stage commands of
each tier (no training)."""

import dataclasses
import json
import pathlib

import pytest

from flexolmo_jax import config as C
from flexolmo_jax import reproduce
from flexolmo_jax.data import pipeline as data_pipeline
from flexolmo_jax.data.config import DataConfig

DOMAINS = ["public", "math", "code"]


def _report():
  flex = {"public": 10.0, "math": 4.0, "code": 6.0}
  ppl = {"public": {"public": 9.0, "math": 20.0, "code": 30.0}, "flexolmo": flex,
         "soup_uniform": {"public": 12.0, "math": 8.0, "code": 9.0},
         "soup_weighted": {"public": 12.0, "math": 8.0, "code": 9.0},
         "btm": {"public": 9.0, "math": 4.0, "code": 5.0},  # Average 6.0 < FlexOlmo's 6.67.
         "btx": {"public": 11.0, "math": 7.0, "code": 8.0},
         "prompt_routing": {"public": 10.0, "math": 5.0, "code": 7.0},
         "flexolmo_ablation_subset": {"public": 10.0, "math": 4.0},
         "ablation_solo": {"public": 10.0, "math": 6.0},
         "ablation_random_init": {"public": 10.0, "math": 5.0},
         "ablation_no_bias": {"public": 9.0, "math": 4.0}}
  opt_out = {"math": {"public": 10.0, "math": 20.0, "code": 6.6},  # own +400%, code +10%.
             "code": {"public": 10.0, "math": 8.0, "code": 6.6}}  # own +10%, math +100%.
  return {"settings": {"public_steps": 3, "expert_steps": 2, "top_k": 3, "btm_top_k": 2,
                       "tune_steps": 1, "eval_batches": 1, "ablation_domains": ["math"], "seeds": [0, 1],
                       "eval_tokens_per_domain": 1024},
          "domains": DOMAINS, "experts": DOMAINS, "perplexity": ppl, "opt_out": opt_out,
          "per_seed": {"btx": {"0": {"public": 10.0, "math": 6.0, "code": 8.0},
                               "1": {"public": 12.0, "math": 8.0, "code": 8.0}}},
          "routing": {"png": "routing.png"}, "wall_seconds": 60.0}


def test_findings_decide_each_claim_from_the_numbers():
  got = {f["finding"]: (f["holds"], f["numbers"]) for f in reproduce.findings(_report())}
  assert got["FlexOlmo beats the public model on every closed domain"] == (
      True, "math 4.00 vs 20.00, code 6.00 vs 30.00")
  assert got["FlexOlmo beats soup_uniform on average (all domains)"] == (True, "6.67 vs 9.67")
  assert got["FlexOlmo beats btm on average (all domains)"] == (False, "6.67 vs 6.00")
  holds, numbers = got["removing an expert hurts mainly its own domain"]
  assert not holds and "-math: own +400.0%, others at most 10.0%" in numbers
  assert "-code: own +10.0%, others at most 100.0%" in numbers
  assert got["ablation 'solo' hurts (average over public, math)"] == (True, "8.00 vs FlexOlmo 7.00")
  assert got["ablation 'no_bias' hurts (average over public, math)"] == (
      False, "6.50 vs FlexOlmo 7.00")
  assert not any("router tuning" in f for f in got)  # No tuned row, no tuned findings.


def test_router_tuned_flexolmo_gets_its_own_findings():
  report = _report()
  report["perplexity"]["flexolmo_router_tuned"] = {"public": 9.5, "math": 4.0, "code": 5.0}
  got = {f["finding"]: (f["holds"], f["numbers"]) for f in reproduce.findings(report)}
  assert got["FlexOlmo + router tuning beats btm on average (all domains)"] == (False, "6.17 vs 6.00")
  assert got["FlexOlmo + router tuning beats the public model on every closed domain"][0]


def test_markdown_has_every_model_opt_out_row_and_finding():
  report = _report()
  report["findings"] = reproduce.findings(report)
  text = reproduce.markdown(report)
  assert "| flexolmo | 10.00 | 4.00 | 6.00 | 5.00 | 6.67 |" in text
  assert "| flexolmo_ablation_subset | 10.00 | 4.00 |  | 4.00 | 7.00 |" in text
  assert "| without math | 10.00 | 20.00 | 6.60 | 13.30 | 12.20 |" in text
  assert text.count("| yes |") + text.count("| NO |") == len(report["findings"])
  assert "| btx | 8.00 | 9.33 | 8.67 | 0.67 |" in text  # Per-seed averages, mean, std.


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
  monkeypatch.setattr(reproduce, "_run", lambda *args: commands.append(args))
  monkeypatch.setattr(reproduce.runs, "load_params", lambda path: (C.tiny(), None, None))
  reproduce.train_everything(opts)
  return commands


def test_medium_tier_trains_everything_once_per_seed_in_its_own_directory(tmp_path, monkeypatch):
  opts = reproduce.scaled("medium", workdir=str(tmp_path), domains=("math", "code"),
                          ablation_domains=("math",))
  assert opts.train_seeds == opts.seeds == (0, 1, 2) and opts.expert_epochs == 3.0
  assert opts.public_config == "configs/public_medium.py" and opts.expert_tokens > 0
  assert reproduce.training_dirs(opts) == {s: tmp_path / f"seed{s}" for s in (0, 1, 2)}
  commands = _recorded_training(tmp_path, monkeypatch, opts)
  assert commands[0] == ("flexolmo_jax.data", "prepare", f"--out={tmp_path / 'data'}")
  for seed in (0, 1, 2):
    root = tmp_path / f"seed{seed}"
    runs_of_seed = [c for c in commands if any(a.startswith(f"--workdir={root}/") for a in c)]
    public, math_expert, code_expert, solo, random_init, no_bias = runs_of_seed
    assert {"--config=configs/public_medium.py", f"--config.seed={seed}",
            f"--config.data.seed={seed}", "--config.steps=500"} <= set(public)
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
  assert len(commands) == 1 + 3 * 6


def test_small_tier_keeps_its_layout_and_steps(tmp_path, monkeypatch):
  opts = reproduce.scaled("small", workdir=str(tmp_path), domains=("math",),
                          ablation_domains=("math",))
  assert opts == reproduce.Options(workdir=str(tmp_path), domains=("math",),
                                   ablation_domains=("math",))
  assert reproduce.training_dirs(opts) == {0: tmp_path}
  commands = _recorded_training(tmp_path, monkeypatch, opts)
  public, expert = commands[1], commands[2]
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
