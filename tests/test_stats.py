"""The document bootstrap, averages in loss and the three-way verdict, against hand computations;
document ids against the evaluation split's own documents."""

import math

import grain
import numpy as np
import pytest

from flexolmo_jax import scoring, stats
from flexolmo_jax.data import corpus, load_tokenizer


def test_two_document_bootstrap_matches_the_hand_enumerated_distribution():
  # Document A: 1 token, NLL 2; document B: 2 tokens, NLL 6. A resample of two documents is AA
  # (loss 4/2 = 2, probability 1/4), AB (8/3, 1/2) or BB (12/4 = 3, 1/4): the 95% percentile
  # interval runs from the AA loss to the BB loss.
  got = stats.bootstrap_losses({"d": [1, 2]}, {"m": {"d": [2.0, 6.0]}}, resamples=2000, seed=0)
  samples = got["m"]["d"]
  assert set(np.round(samples, 12)) == {2.0, round(8 / 3, 12), 3.0}
  assert abs(np.mean(np.isclose(samples, 8 / 3)) - 0.5) < 0.05
  assert abs(np.mean(samples == 2.0) - 0.25) < 0.05
  assert stats.interval(samples) == (2.0, 3.0)


def test_bootstrap_is_the_explicit_loop_over_resampled_documents():
  rng = np.random.default_rng(3)
  tokens = {"b": rng.integers(1, 50, 7).tolist(), "a": rng.integers(1, 50, 5).tolist()}
  nll = {m: {d: (rng.uniform(1, 4, len(t)) * t).tolist() for d, t in tokens.items()}
         for m in ("x", "y")}
  got = stats.bootstrap_losses(tokens, nll, resamples=50, seed=11)
  draws = np.random.default_rng(11)
  for d in ("a", "b"):  # Domains draw in sorted order from one generator.
    counts = stats.resample_counts(len(tokens[d]), 50, draws)
    for r in range(50):
      chosen = np.repeat(np.arange(len(tokens[d])), counts[r])  # The documents of resample r.
      assert len(chosen) == len(tokens[d])
      for m in ("x", "y"):
        want = sum(nll[m][d][i] for i in chosen) / sum(tokens[d][i] for i in chosen)
        assert got[m][d][r] == pytest.approx(want, rel=1e-12)
  samples = got["x"]["a"] - got["y"]["a"]
  lo, hi = stats.interval(samples)
  ordered = np.sort(samples)  # numpy's linear percentile on 50 samples: 2.5% sits at rank 1.225.
  assert lo == pytest.approx(ordered[1] + 0.225 * (ordered[2] - ordered[1]), rel=1e-12)
  assert hi == pytest.approx(ordered[47] + 0.775 * (ordered[48] - ordered[47]), rel=1e-12)


def test_paired_difference_cancels_document_difficulty():
  # y is x plus 0.5 nats on every token: every paired resample differs by exactly 0.5, however
  # unequal the documents (an unpaired bootstrap would spread).
  tokens = {"d": [3, 10, 4, 20]}
  x = [9.0, 5.0, 30.0, 20.0]
  got = stats.bootstrap_losses(tokens, {"x": {"d": x},
                                        "y": {"d": [v + 0.5 * t for v, t in zip(x, tokens["d"])]}})
  np.testing.assert_allclose(got["y"]["d"] - got["x"]["d"], 0.5, rtol=1e-12)
  assert np.ptp(got["x"]["d"]) > 0.5


def test_average_over_domains_in_loss_is_the_geometric_mean_of_perplexity():
  losses = {"a": math.log(4.0), "b": math.log(16.0), "c": math.log(1000.0)}
  mean = stats.mean_loss(losses, ["a", "b", "c"])
  assert math.exp(mean) == pytest.approx((4.0 * 16.0 * 1000.0) ** (1 / 3), rel=1e-12)  # 40
  assert math.exp(stats.mean_loss(losses, ["a", "b"])) == pytest.approx(8.0, rel=1e-12)
  resampled = {"a": np.array([1.0, 2.0]), "b": np.array([3.0, 6.0])}
  np.testing.assert_array_equal(stats.mean_loss(resampled, ["a", "b"]), [2.0, 4.0])


def test_verdict_is_decided_by_where_the_interval_lies():
  assert stats.verdict(-0.3, -0.1) == stats.HOLDS  # Claim: below 0.
  assert stats.verdict(0.1, 0.3) == stats.DOES_NOT_HOLD
  assert stats.verdict(-0.1, 0.2) == stats.CANNOT_TELL
  assert stats.verdict(0.0, 0.0) == stats.CANNOT_TELL
  assert stats.verdict(0.1, 0.3, side=1) == stats.HOLDS  # Claim: above 0.
  assert stats.verdict(-0.3, -0.1, side=1) == stats.DOES_NOT_HOLD
  assert stats.verdict(-0.1, 0.2, side=1) == stats.CANNOT_TELL
  with pytest.raises(ValueError, match="side must be"):
    stats.verdict(0.0, 1.0, side=0)
  assert stats.every([stats.HOLDS, stats.HOLDS]) == stats.HOLDS
  assert stats.every([stats.HOLDS, stats.CANNOT_TELL]) == stats.CANNOT_TELL
  assert stats.every([stats.CANNOT_TELL, stats.DOES_NOT_HOLD, stats.HOLDS]) == stats.DOES_NOT_HOLD


def test_document_ids_follow_eos_across_rows():
  eos = 1
  batch = {  # Document 0 ends in row 0; document 1 runs on into row 1, then padding.
      "targets": np.array([[5, 6, 1, 7, 8, 9], [4, 1, 0, 0, 0, 0]]),
      "segment_ids": np.array([[1, 1, 1, 2, 2, 2], [1, 1, 0, 0, 0, 0]]),
      "loss_mask": np.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], np.float32)}
  np.testing.assert_array_equal(stats.document_ids([batch, batch], eos)[1],
                                [[2, 2, 2, 3, 3, 3], [3, 3, -1, -1, -1, -1]])
  sums = stats.document_sums([np.ones((2, 6))], stats.document_ids([batch], eos),
                             [np.ones((2, 6), bool)], 2)
  np.testing.assert_array_equal(sums, [3, 5])
  bad = {**batch, "targets": np.array([[5, 6, 7, 7, 8, 9], [4, 1, 0, 0, 0, 0]])}
  with pytest.raises(ValueError, match="not an unshuffled evaluation split"):
    stats.document_ids([bad], eos)


@pytest.mark.parametrize("domain", ["math", "code"])
def test_document_ids_recover_the_split_documents(corpus_dir, domain):
  (path,) = corpus.token_paths(corpus_dir, [domain], "test")
  source = grain.sources.ArrayRecordDataSource([path])
  lengths = [len(np.frombuffer(source[i], np.int32)) - 1 for i in range(len(source))]
  batches = list(scoring.domain_batches(corpus_dir, domain, "test", batch_size=4, seq_len=32))
  ids = stats.document_ids(batches, load_tokenizer(corpus_dir).eos_id)
  keep = [b["loss_mask"] > 0 for b in batches]
  counts = stats.document_sums([k.astype(float) for k in keep], ids, keep, len(lengths))
  np.testing.assert_array_equal(counts, lengths)  # Every scored token of document i has id i.
