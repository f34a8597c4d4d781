"""The eval sweep launcher: cells and stable ids, subsets as expert masks, hosts split the cells,
and a second run recomputes nothing."""

import json

import jax
import numpy as np
import pytest

from flexolmo_jax import checkpoint, subsets
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import init_params
from launch import sweep

TINY = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
            rope_theta=10_000.0, pad_token_id=0, eos_token_id=1)
DOMAINS = ["math", "code"]
OPTIONS = dict(batch_size=4, seq_len=32, mc_items=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep_models")
  moe = ModelConfig(**TINY, num_experts=3, top_k=2)
  checkpoint.save_params_artifact(root / "moe", moe, jax.tree.map(
      np.asarray, init_params(moe, jax.random.key(0))), "merged",
      extra_manifest={"expert_names": ["public", "math", "code"]})
  dense = ModelConfig(**TINY)
  checkpoint.save_params_artifact(root / "dense", dense, jax.tree.map(
      np.asarray, init_params(dense, jax.random.key(1))), "public")
  return [("flex", str(root / "moe")), ("public", str(root / "dense"))]


def test_cells_ids_subsets_and_hosts(models):
  cells = sweep.make_cells(models, ["all", "public+math", "-code"], ["perplexity", "mc_math"],
                           OPTIONS)
  assert len(cells) == 3 * 2 + 1 * 2  # The dense model gets only the `all` cells.
  assert len({c.id for c in cells}) == len(cells)
  again = sweep.make_cells(models, ["all", "public+math", "-code"], ["perplexity", "mc_math"],
                           OPTIONS)
  assert [c.id for c in again] == [c.id for c in cells]
  other = sweep.make_cells(models, ["all"], ["perplexity"], {**OPTIONS, "seq_len": 64})
  assert other[0].id not in {c.id for c in cells}
  split = [sweep.mine(cells, i, 3) for i in range(3)]
  assert sorted(c.id for part in split for c in part) == sorted(c.id for c in cells)
  names = ["public", "math", "code"]
  assert subsets.expert_mask("all", names) is None
  assert subsets.parse_expert_subset("public+math", names) == ("public", "math")
  assert subsets.parse_expert_subset("-code", names) == ("public", "math")
  with pytest.raises(ValueError, match="cannot drop"):
    subsets.parse_expert_subset("-public", names)


def test_bad_subset_and_unknown_baseline_refused_before_running(models):
  with pytest.raises(ValueError, match=r"unknown expert\(s\) \['news'\]"):
    sweep.make_cells(models, ["all", "-news"], ["perplexity"], OPTIONS)
  with pytest.raises(ValueError, match="unknown baseline 'soup'; baselines: soup_uniform"):
    sweep.make_cells(models, ["all"], ["perplexity"], OPTIONS, ["soup"])


def test_baseline_cells_only_for_merged_models_and_keep_model_ids(models):
  plain = sweep.make_cells(models, ["all"], ["perplexity"], OPTIONS)
  cells = sweep.make_cells(models, ["all"], ["perplexity"], OPTIONS, ["soup_uniform", "btm"])
  assert [c.id for c in cells if not c.baseline] == [c.id for c in plain]
  extra = [c for c in cells if c.baseline]
  assert [(c.model, c.subset, c.task) for c in extra] == [
      ("flex/soup_uniform", "all", "perplexity"), ("flex/btm", "all", "perplexity")]
  other = sweep.make_cells(models, ["all"], ["perplexity"], OPTIONS, ["btm"],
                           sweep.baselines.Options(btm_top_k=3))
  assert other[-1].id != extra[-1].id  # A changed baseline option makes a new cell.


@pytest.mark.slow
def test_sweep_is_resumable_and_summarised(models, corpus_dir, tmp_path):
  cells = sweep.make_cells(models, ["all", "-code"], ["perplexity"], OPTIONS)
  out = str(tmp_path / "out")
  first = sweep.run(cells[:2], data=corpus_dir, out=out, domains=DOMAINS, split="test", **OPTIONS)
  assert first == [c.id for c in cells[:2]]
  rest = sweep.run(cells, data=corpus_dir, out=out, domains=DOMAINS, split="test", **OPTIONS)
  assert rest == [cells[2].id]  # Only the cell not run before.
  assert sweep.run(cells, data=corpus_dir, out=out, domains=DOMAINS, split="test", **OPTIONS) == []
  records = [json.loads(line) for line in open(f"{out}/results.jsonl")]
  assert [r["id"] for r in records] == [c.id for c in cells]
  by_subset = {(r["model"], r["subset"]): r["metrics"] for r in records}
  assert (by_subset[("flex", "all")]["math/perplexity"]
          != by_subset[("flex", "-code")]["math/perplexity"])
  rows = open(f"{out}/results.csv").read().splitlines()
  assert rows[0] == "id,model,subset,task,metric,value" and len(rows) > 3
  text = sweep.summary(out)
  assert "| flex | -code |" in text and "math/perplexity" in text
