"""The research experiments: the registry and its flags, the public-data mixing of the extension
(public_mix), and the top-k experiment end to end on tiny models."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from flexolmo_jax import baselines, research, router_init, runs, scoring, stats
from flexolmo_jax import train as T
from flexolmo_jax.data import DataConfig, make_pipeline, mix
from flexolmo_jax.train_config import train_config
# The merge tests' tiny public model and synthetic expert runs (the trainer's layout).
from test_merge import TINY_MODEL, _public_artifact, _synthetic_expert


def test_unknown_experiment_is_refused_naming_the_choices():
  with pytest.raises(ValueError, match="unknown experiment 'topkk'; choose one of topk, bias, "
                                       "router_source, ablations, full_moe, public_mix"):
    research.Options(experiment="topkk")
  with pytest.raises(ValueError, match="'three' is neither a positive integer nor 'all'"):
    research.Options(experiment="topk", top_ks=("1", "three"))
  with pytest.raises(ValueError, match=r"--ablation_domains \['poetry'\] are not among"):
    research.Options(experiment="bias", ablation_domains=("poetry",))


def test_command_line_refusal_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "flexolmo_jax.research", "--experiment=nope",
                        f"--workdir={tmp_path}"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "error: unknown experiment 'nope'; choose one of topk, bias, router_source, ablations, "
      "full_moe, public_mix"]


def _cfg(corpus_dir, domains=("math",)):
  return DataConfig(path=corpus_dir, domains=domains, seq_len=16, batch_size=8)


def test_mixed_batches_hold_the_public_share_and_no_other_domain(corpus_dir, monkeypatch):
  read = []
  real = mix.make_pipeline
  monkeypatch.setattr(mix, "make_pipeline", lambda cfg, *a, **k: read.append(cfg.domains) or
                      real(cfg, *a, **k))
  batches = mix.owner_batches(_cfg(corpus_dir), 0.25, 8)
  batch = next(batches)
  assert sorted(read) == [("math",), ("public",)]  # Never another closed domain.
  assert batch["tokens"].shape == (8, 16)
  assert np.sum(batch["loss_mask"][6:]) / np.sum(batch["loss_mask"]) == 0.25
  # The first 6 rows are the owner's pipeline, the last 2 the public one's, as read alone.
  own = next(iter(make_pipeline(_cfg(corpus_dir), "train", batch_size=6)))
  pub = next(iter(make_pipeline(_cfg(corpus_dir, ("public",)), "train", batch_size=2)))
  for key in batch:
    np.testing.assert_array_equal(batch[key], np.concatenate([own[key], pub[key]]))
  # Resuming from the saved state continues with the same batches (fit.py saves it).
  state = batches.get_state()
  expected = next(batches)
  resumed = mix.owner_batches(_cfg(corpus_dir), 0.25, 8)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["tokens"], expected["tokens"])


def test_share_zero_is_the_plain_pipeline_and_bad_shares_are_refused(corpus_dir):
  plain = next(mix.owner_batches(_cfg(corpus_dir), 0.0, 8))
  np.testing.assert_array_equal(
      plain["tokens"], next(iter(make_pipeline(_cfg(corpus_dir), "train", batch_size=8)))["tokens"])
  with pytest.raises(ValueError, match="public_share=0.01 of a 8-row batch is 0 public rows"):
    mix.owner_batches(_cfg(corpus_dir), 0.01, 8)
  base = dict(mode="expert", expert=dict(name="math", public="p", public_share=0.25),
              data=dict(path="d"))
  with pytest.raises(ValueError, match="public_share 1.5 must be in"):
    train_config({**base, "expert": {**base["expert"], "public_share": 1.5}})
  with pytest.raises(ValueError, match="DP accounting counts only the owner's examples"):
    train_config({**base, "dp": dict(enabled=True),
                  "expert": {**base["expert"], "router_source": "public"}})


def _reproduction(root, corpus_dir):
  """A reproduction's layout: data, a tiny public artifact, math and code experts of 1 step."""
  os.symlink(corpus_dir, root / "data")
  _public_artifact(root / "public", 0)
  config, params, _ = runs.load_params(root / "public")
  rng = np.random.default_rng(0)
  router_init.save_embeddings(str(root / "emb.npz"), {
      d: rng.normal(size=(TINY_MODEL["d_model"],)) for d in ("public", "math", "code")})
  for seed, name in enumerate(("math", "code")):
    _synthetic_expert(corpus_dir, root / "public", name, root / "emb.npz", root / "experts" / name,
                      seed)
  return config, params


def test_topk_end_to_end_on_tiny_models(corpus_dir, tmp_path):
  config, params = _reproduction(tmp_path, corpus_dir)
  opts = research.Options(experiment="topk", workdir=str(tmp_path), out=str(tmp_path / "out"),
                          domains=("math", "code"), expert_steps=1, eval_batches=1)
  report = research.run(opts)
  # k = 4 is clamped to the 3 experts present, which is "all": one row, not two.
  rows = ["public", "flexolmo top-1", "flexolmo top-2", "flexolmo top-3 (all)"]
  assert list(report["loss"]) == list(report["delta"]) == rows
  # The public row's code loss: the public model's token NLL on the test batches, every token
  # after the routing prefix (as the reproduction scores), not the prefix's.
  batches = list(scoring.domain_batches(corpus_dir, "code", "test", batch_size=8, seq_len=128,
                                        max_batches=1))
  nll = scoring.model_scorer(config, params)(batches, per_token=True)["token_nll"]
  keep = [(b["loss_mask"] > 0) & (np.arange(128) >= baselines.PROMPT_TOKENS) for b in batches]
  want = sum(float(n[k].sum()) for n, k in zip(nll, keep)) / sum(int(k.sum()) for k in keep)
  assert report["loss"]["public"]["code"] == pytest.approx(want, rel=1e-5)
  assert report["settings"]["scored_tokens"]["code"] == sum(int(k.sum()) for k in keep)
  loss = report["loss"]
  assert loss["flexolmo top-1"]["math"] != loss["flexolmo top-3 (all)"]["math"]
  domains = ["public", "math", "code"]
  for m in rows:
    assert report["average"][m]["all"]["loss"] == pytest.approx(
        np.mean([loss[m][d] for d in domains]))
    assert report["delta"][m]["loss"] == pytest.approx(
        report["average"][m]["all"]["loss"] - report["average"]["public"]["all"]["loss"])
  # The interval of a row's difference is stats' paired bootstrap on the same numbers, and the
  # verdict is stats' verdict on it.
  boot = stats.bootstrap_losses(report["document_tokens"], report["document_nll"],
                                resamples=2000, seed=0)
  lo, hi = stats.interval(stats.mean_loss(boot["flexolmo top-1"], domains)
                          - stats.mean_loss(boot["public"], domains), 0.95)
  delta = report["delta"]["flexolmo top-1"]
  assert delta["interval"] == pytest.approx([lo, hi], abs=1e-12) and lo < delta["loss"] < hi
  assert delta["verdict"] == {stats.HOLDS: "better", stats.DOES_NOT_HOLD: "worse",
                              stats.CANNOT_TELL: "cannot tell"}[stats.verdict(lo, hi)]
  assert report["delta"]["public"] == {"loss": 0.0, "interval": [0.0, 0.0], "verdict": "reference"}
  text = (tmp_path / "out" / "topk.md").read_text()
  assert text.startswith("# Top-k sweep\n\n**Reduced settings, not the reproduction's: "
                         "expert_steps 1 < 40; eval_batches 1 < 4; "
                         "domains math, code of ")
  assert "Public model (not a training run) steps" in text  # An artifact, as a converted model.
  assert "each row's first 32 tokens" in text
  avg = report["average"]["public"]["all"]["loss"]
  assert f"| public | {loss['public']['public']:.4f} (" in text
  assert f"| {avg:.4f} ({np.exp(avg):.2f}) | +0.0000 |  | reference |" in text
  assert (f"| {delta['loss']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {delta['verdict']} |\n"
          in text.split("| flexolmo top-1 |")[1])
  saved = json.loads((tmp_path / "out" / "topk.json").read_text())
  assert saved["delta"] == json.loads(json.dumps(report["delta"]))
  assert saved["document_nll"] == report["document_nll"]
  assert report["command"] == ("python -m flexolmo_jax.research --experiment=topk --workdir="
                               f"{tmp_path} --out={tmp_path / 'out'} --domains=math,code "
                               "--expert_steps=1 --eval_batches=1")


@pytest.mark.slow  # About 20 s: two training runs compile.
def test_an_owner_trains_with_public_rows_and_the_full_moe_trains_everything(corpus_dir, tmp_path):
  _reproduction(tmp_path, corpus_dir)
  run = dict(data=dict(path=corpus_dir, seq_len=16, batch_size=4), optim=dict(warmup_steps=0),
             steps=1, log_every=1, eval_every=100, eval_batches=1, checkpoint_every=100,
             mesh=dict(data=1), progress=False, async_checkpoint=False)
  T.train(train_config(dict(run, mode="expert", model_overrides=dict(moe_backend="dense"),
                            expert=dict(name="math", public=str(tmp_path / "public"),
                                        router_embeddings=str(tmp_path / "emb.npz"),
                                        public_share=0.25))), str(tmp_path / "mixed"))
  manifest = json.loads((tmp_path / "mixed" / runs.MANIFEST).read_text())
  assert manifest["step"] == 1 and manifest["train_config"]["expert"]["public_share"] == 0.25

  from flexolmo_jax import full_moe, merge  # pylint: disable=g-import-not-at-top
  merge.merge_to_dir(tmp_path / "public", {d: str(tmp_path / "experts" / d) for d in
                                           ("math", "code")}, tmp_path / "merged", top_k=2)
  full_moe.train_full_moe(dict(run, init_from=str(tmp_path / "merged"),
                               data=dict(run["data"], domains=("public", "math", "code"))),
                          str(tmp_path / "full"))
  before_config, before, _ = runs.load_params(tmp_path / "merged")
  config, after, manifest = runs.load_params(tmp_path / "full")
  assert config == before_config and manifest["kind"] == "merged"
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
  assert all(jax.tree.leaves(changed))  # Every parameter trains, the public expert's too.


def _dry_run(monkeypatch, root, experiment, **options):
  """Runs an experiment with training and scoring recorded, not done: (runs, merged rows)."""
  trained, merged = [], {}
  monkeypatch.setattr(research.reproduce, "_run",
                      lambda *args, output=None: trained.append(args))
  monkeypatch.setattr(research.Context, "score_public", lambda self: None)
  monkeypatch.setattr(research.Context, "score_merged",
                      lambda self, name, experts, *, top_k=None, keep_bias=True, over=None:
                      merged.__setitem__(name, (experts, keep_bias, over)))
  opts = research.Options(experiment=experiment, workdir=str(root), domains=("math", "code"),
                          ablation_domains=("math",), expert_steps=1, eval_batches=1, **options)
  research.EXPERIMENTS[experiment](research.Context(opts))
  return trained, merged


def _runs(trained):
  """{workdir: (trainer module, the run's own flags)} of recorded trainer runs (without the flags
  every expert run of the reproduction gets, routing diagnostics on every domain included)."""
  common = ("--config=", "--workdir=", "--config.data.path=", "--config.expert.public=",
            "--config.steps=1", "--config.eval_every=1", "--config.checkpoint_every=1",
            "--config.eval_domains=", "--config.eval_batches=")
  return {next(a for a in args if a.startswith("--workdir="))[10:]:
          (args[0], tuple(a for a in args[1:] if not a.startswith(common))) for args in trained}


def test_ablations_train_every_ablation_for_every_expert(corpus_dir, tmp_path, monkeypatch):
  _reproduction(tmp_path, corpus_dir)
  trained, merged = _dry_run(monkeypatch, tmp_path, "ablations")
  emb = tmp_path / "research" / "ablations" / "random_rows.npz"
  rows = f"--config.expert.router_embeddings={emb}"
  want = {}
  for d in ("math", "code"):
    want[f"{tmp_path}/ablations/solo/{d}"] = ("flexolmo_jax.solo_expert", ())
    want[f"{tmp_path}/research/ablations/random_init/{d}"] = ("flexolmo_jax.train", (rows,))
    want[f"{tmp_path}/ablations/no_bias/{d}"] = ("flexolmo_jax.train",
                                                 ("--config.expert.bias=false",))
    want[f"{tmp_path}/research/ablations/random_init_no_bias/{d}"] = (
        "flexolmo_jax.train", (rows, "--config.expert.bias=false"))
  assert _runs(trained) == want
  assert {name: keep for name, (_, keep, _) in merged.items()} == {
      "flexolmo": True, "ablation solo": True, "ablation random_init": True,
      "ablation no_bias": False, "ablation random_init_no_bias": False}
  with np.load(emb) as data:
    assert sorted(data.files) == ["code", "math", "public"]
    assert data["math"].shape == (TINY_MODEL["n_layers"], TINY_MODEL["d_model"])


def test_bias_and_public_mix_train_what_they_vary(corpus_dir, tmp_path, monkeypatch):
  _reproduction(tmp_path, corpus_dir)
  trained, merged = _dry_run(monkeypatch, tmp_path, "bias", bias_inits=(-1.0, -0.5))
  # -0.5 is the configs' default: the reproduction's own math expert, not retrained.
  assert _runs(trained) == {f"{tmp_path}/research/bias/-1/math": (
      "flexolmo_jax.train", ("--config.expert.bias_init=-1.0",))}
  assert merged["bias_init -0.5 (default)"] == (
      {"math": f"{tmp_path}/experts/math"}, True, ["public", "math"])
  trained, merged = _dry_run(monkeypatch, tmp_path, "public_mix", public_share=0.25)
  assert _runs(trained) == {f"{tmp_path}/research/public_mix/share_0.25/{d}": (
      "flexolmo_jax.train", ("--config.expert.public_share=0.25",)) for d in ("math", "code")}
  assert list(merged) == ["flexolmo", "flexolmo + public share 0.25 (extension)"]


def test_experiments_refuse_experts_of_another_length(corpus_dir, tmp_path, monkeypatch):
  _reproduction(tmp_path, corpus_dir)
  with pytest.raises(ValueError, match=r"math expert at .* has 1 steps, not --expert_steps=40: "
                                       r"run python -m flexolmo_jax.reproduce"):
    research.topk(research.Context(research.Options(
        experiment="topk", workdir=str(tmp_path), domains=("math", "code"), eval_batches=1)))


def test_router_source_embeds_with_minilm_then_trains_on_those_rows(corpus_dir, tmp_path,
                                                                     monkeypatch):
  _reproduction(tmp_path, corpus_dir)
  trained, merged = _dry_run(monkeypatch, tmp_path, "router_source")
  emb = tmp_path / "research" / "router_source" / "minilm.npz"
  embeds = [args for args in trained if args[0] == "flexolmo_jax.embed"]
  assert [a for args in embeds for a in args if a.startswith("--domain=")] == [
      "--domain=public", "--domain=math"]
  assert all("--embedder=minilm" in args and f"--out={emb}" in args for args in embeds)
  assert _runs(trained[2:]) == {f"{tmp_path}/research/router_source/minilm/math": (
      "flexolmo_jax.train", (f"--config.expert.router_embeddings={emb}",))}
  assert list(merged) == ["public model's mean hidden state (default)", "MiniLM sentence encoder"]
