"""Generation: cached decoding equals full recomputation and transformers' greedy `generate`;
seeded sampling is reproducible; top-k 1 is greedy; eos stops a sequence; per-sequence opt-out."""

import jax
import numpy as np
import pytest
import torch

from flexolmo_jax import config as config_lib
from flexolmo_jax import convert, model
from flexolmo_jax.generate import Sampling, filter_logits, generate
import tiny_hf

# Ragged prompts: left padding inside a 16-token bucket, positions counted per sequence.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3] * 17]


@pytest.fixture(scope="module", params=["dense", "moe"])
def tiny_model(request):
  moe = request.param == "moe"
  cfg = config_lib.tiny(**(dict(num_experts=3, top_k=2, expert_bias=True, expert_bias_init=-0.1)
                           if moe else {}))
  params = model.init_params(cfg, jax.random.key(0))
  # Larger weights than init: peaked distributions, so greedy ties cannot hide a bug.
  params = jax.tree.map(lambda x: x * 4 if x.ndim > 2 else x, params)
  return cfg, params


def _full_recompute_greedy(cfg, params, prompt, steps, expert_mask=None):
  """Argmax of a full forward over the whole unpadded sequence, one token at a time."""
  apply = jax.jit(lambda p, t, m: model.Transformer(cfg).apply({"params": p}, t, expert_mask=m))
  tokens = list(prompt)
  for _ in range(steps):
    logits = apply(params, np.asarray([tokens], np.int32), expert_mask)
    tokens.append(int(np.argmax(logits[0, -1])))
  return tokens[len(prompt):]


@pytest.mark.slow
def test_cached_greedy_equals_full_recompute(tiny_model):
  cfg, params = tiny_model
  out = generate(cfg, params, PROMPTS, max_new_tokens=10, stop_at_eos=False)
  assert out.shape == (3, 10)
  for row, prompt in zip(out, PROMPTS):
    assert row.tolist() == _full_recompute_greedy(cfg, params, prompt, 10)
  # The in-jit recompute path (used by the benchmark) agrees as well.
  np.testing.assert_array_equal(
      out, generate(cfg, params, PROMPTS, max_new_tokens=10, stop_at_eos=False, use_cache=False))


@pytest.mark.slow
def test_expert_mask_per_sequence(tiny_model):
  cfg, params = tiny_model
  if not cfg.is_moe:
    pytest.skip("opt-out needs experts")
  mask = np.array([[True, False, True], [True, True, True], [True, False, False]])
  out = generate(cfg, params, PROMPTS, max_new_tokens=8, stop_at_eos=False, expert_mask=mask)
  for row, prompt, m in zip(out, PROMPTS, mask):
    assert row.tolist() == _full_recompute_greedy(cfg, params, prompt, 8, m[None])


@pytest.mark.slow
def test_sampling_seeded_and_top_k_one_is_greedy(tiny_model):
  cfg, params = tiny_model
  hot = Sampling(temperature=1.0, top_k=50, top_p=0.95)
  a = generate(cfg, params, PROMPTS, max_new_tokens=12, sampling=hot, seed=7, stop_at_eos=False)
  b = generate(cfg, params, PROMPTS, max_new_tokens=12, sampling=hot, seed=7, stop_at_eos=False)
  c = generate(cfg, params, PROMPTS, max_new_tokens=12, sampling=hot, seed=8, stop_at_eos=False)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  greedy = generate(cfg, params, PROMPTS, max_new_tokens=12, stop_at_eos=False)
  top1 = generate(cfg, params, PROMPTS, max_new_tokens=12, sampling=Sampling(1.0, top_k=1),
                  seed=3, stop_at_eos=False)
  np.testing.assert_array_equal(top1, greedy)


def test_eos_stops_and_pads(tiny_model):
  cfg, params = tiny_model
  free = generate(cfg, params, PROMPTS, max_new_tokens=10, stop_at_eos=False)
  eos = int(free[0, 3])  # Make the 4th token of sequence 0 the end of sequence.
  out = generate(cfg, params, PROMPTS, max_new_tokens=10, eos_id=eos, pad_id=0)
  for row, ref in zip(out, free):
    hits = np.flatnonzero(ref == eos)
    stop = hits[0] + 1 if hits.size else len(ref)
    assert row[:stop].tolist() == ref[:stop].tolist()
    assert (row[stop:] == 0).all()
  assert (out[0, 4:] == 0).all()


def test_filter_logits_top_p():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
  kept = np.isfinite(np.asarray(filter_logits(logits, Sampling(1.0, top_p=0.8))))
  assert kept.tolist() == [[True, True, False, False]]
  kept = np.isfinite(np.asarray(filter_logits(logits, Sampling(1.0, top_p=0.1))))
  assert kept.tolist() == [[True, False, False, False]]
  kept = np.isfinite(np.asarray(filter_logits(logits, Sampling(1.0, top_k=3))))
  assert kept.tolist() == [[True, True, True, False]]


def test_bad_input(tiny_model):
  cfg, params = tiny_model
  with pytest.raises(ValueError, match="at least one token"):
    generate(cfg, params, [[1, 2], []], max_new_tokens=4)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(cfg, params, [[1, 2]], max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    Sampling(1.0, top_p=0.0)
  with pytest.raises(ValueError, match="vocabulary"):
    generate(cfg, params, [[1, 2]], max_new_tokens=4, eos_id=cfg.vocab_size)


@pytest.mark.parametrize("moe", [True, False], ids=["flexolmo", "olmo2"])
def test_greedy_matches_transformers_generate(tmp_path, moe):
  hf = tiny_hf.write_tiny_hf_checkpoint(tmp_path, moe=moe, seed=3)
  cfg, params = convert.load_hf(tmp_path)
  prompts = tiny_hf.random_tokens(cfg.vocab_size, batch=3, length=9, seed=1)
  new = 24
  with torch.no_grad():
    ref = hf.generate(torch.as_tensor(prompts, dtype=torch.long), max_new_tokens=new,
                      do_sample=False, attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                      pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)
  ref = ref[:, prompts.shape[1]:].numpy()
  ref = np.pad(ref, ((0, 0), (0, new - ref.shape[1])), constant_values=cfg.pad_token_id)
  ours = generate(cfg, params, prompts.tolist(), max_new_tokens=new)
  np.testing.assert_array_equal(ours, ref)
