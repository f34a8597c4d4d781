"""The one expert-subset syntax: all, a+b, -a; every refusal names the problem."""

import numpy as np
import pytest

from flexolmo_jax import subsets

NAMES = ["public", "math", "code", "news"]


@pytest.mark.parametrize("spec,allowed", [
    ("all", ("public", "math", "code", "news")),
    ("public", ("public",)),
    ("news+public", ("public", "news")),  # In the model's order, whatever the spec's.
    ("math", ("math",)),
    ("-code", ("public", "math", "news")),
    ("-code+news", ("public", "math")),
    (" -math ", ("public", "code", "news")),
])
def test_each_syntax(spec, allowed):
  assert subsets.parse_expert_subset(spec, NAMES) == allowed


def test_mask_is_none_when_every_expert_is_allowed():
  assert subsets.expert_mask("all", NAMES) is None
  np.testing.assert_array_equal(subsets.expert_mask("-news+math", NAMES),
                                [True, False, True, False])
  np.testing.assert_array_equal(subsets.expert_mask("public+code", NAMES),
                                [True, False, True, False])
  assert subsets.expert_mask("all", []) is None  # A dense model takes every expert it has.


@pytest.mark.parametrize("spec,message", [
    ("", "empty expert subset"),
    ("public,math", r"join names with '\+', not ','.*public\+math"),
    ("public+legal", r"unknown expert\(s\) \['legal'\]; the model has \['public', 'math'"),
    ("-", r"unknown expert\(s\) \[''\]"),
    ("math+math", r"\['math'\] listed twice"),
    ("-public", "cannot drop 'public'"),
    ("-math+public", "cannot drop 'public'"),
])
def test_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    subsets.parse_expert_subset(spec, NAMES)


def test_a_dense_model_takes_only_all():
  assert subsets.parse_expert_subset("all", []) == ()
  with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
    subsets.parse_expert_subset("public", [])
