"""Named expert policies for serving: which experts a request may route to.

A policies file is JSON; a policy is a list of expert names or an expert subset in the syntax of
flexolmo_jax/subsets.py (`all`, `public+math`, `-news`):

  {"policies": {"public-only": ["public"], "no-news": "-news", "everyone": "all"}}

Every policy must allow "public" (the shared expert every FlexOlmo token can fall back on) and
name only experts the served model holds; both are checked when the file is loaded, so a bad file
stops the server at start-up rather than on some later request. A request's "experts" takes the
same two forms.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np

from flexolmo_jax import subsets

PUBLIC = subsets.PUBLIC


class PolicyError(ValueError):
  """A policies file, or a request's policy / expert list, that cannot be honoured."""


def check_experts(experts, expert_names: Sequence[str], where: str) -> tuple[str, ...]:
  """The experts allowed by `experts` (a list of names, or a subset string such as "-news"), in
  the model's order; refused unless they are known, distinct and include the public expert."""
  if isinstance(experts, str):
    spec = experts
  elif (isinstance(experts, list) and experts and all(isinstance(e, str) for e in experts)
        and not any(e.startswith("-") or "+" in e for e in experts)):
    spec = "+".join(experts)
  else:
    raise PolicyError(f'{where}: experts must be a non-empty list of names or one subset string '
                      f'such as "-news"')
  try:
    allowed = subsets.parse_expert_subset(spec, expert_names)
  except ValueError as err:
    raise PolicyError(f"{where}: {err}") from None
  if PUBLIC not in allowed:
    raise PolicyError(f"{where}: {PUBLIC!r} must always be allowed, got {experts}")
  return allowed


def parse_policies(data, expert_names: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """Validated {policy name: allowed experts} from the decoded JSON of a policies file."""
  if not isinstance(data, dict) or set(data) != {"policies"} or not isinstance(
      data["policies"], dict):
    raise PolicyError('a policies file holds exactly {"policies": {name: [expert, ...], ...}}')
  if not data["policies"]:
    raise PolicyError("the policies file names no policy")
  out = {}
  for name, experts in data["policies"].items():
    if not name.strip():
      raise PolicyError("a policy name is empty")
    out[name] = check_experts(experts, expert_names, f"policy {name!r}")
  return out


def load_policies(path: str | os.PathLike,
                  expert_names: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """Reads and validates a policies file against the served model's expert names."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as err:
    raise PolicyError(f"{path}: not valid JSON ({err})") from None
  try:
    return parse_policies(data, expert_names)
  except PolicyError as err:
    raise PolicyError(f"{path}: {err}") from None


def resolve(policies: Mapping[str, tuple[str, ...]], expert_names: Sequence[str], *,
            policy: str | None = None, experts=None) -> tuple[str, tuple[str, ...], np.ndarray]:
  """(policy label, allowed experts, [E] bool mask) of a request that names a policy OR lists
  experts explicitly (labelled "explicit")."""
  if (policy is None) == (experts is None):
    raise PolicyError('a request names exactly one of "policy" or "experts"')
  if policy is not None:
    if not isinstance(policy, str) or policy not in policies:
      raise PolicyError(f"unknown policy {policy!r}; known policies: {sorted(policies)}")
    label, allowed = policy, policies[policy]
  else:
    label, allowed = "explicit", check_experts(experts, expert_names, "request")
  return label, allowed, np.isin(np.asarray(expert_names), allowed)
