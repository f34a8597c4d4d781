"""Expert subsets: the one syntax every command uses to say which experts a model may route to.

  all            every expert
  public+math    exactly the experts named (joined by `+`)
  -code          every expert but those named (`-code+news` drops two): opt-out, exactly as if
                 they had never been merged (docs/method.md, section 5)

Names are the model's expert names (its manifest's `expert_names`; `public` is expert 0). The
public expert cannot be opted out: every FlexOlmo token can fall back on it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ALL = "all"
PUBLIC = "public"


def parse_expert_subset(spec: str, names: Sequence[str]) -> tuple[str, ...]:
  """The experts `spec` allows, in the model's order; ValueError names the problem and the fix."""
  names = list(names)
  spec = spec.strip()
  if not spec:
    raise ValueError(f"empty expert subset; write {ALL!r}, names joined by '+' "
                     "(e.g. public+math) or '-name' (opt out)")
  if "," in spec:
    raise ValueError(f"expert subset {spec!r}: join names with '+', not ',' (e.g. "
                     f"{spec.replace(',', '+')})")
  if not names:
    if spec == ALL:
      return ()
    raise ValueError(f"expert subset {spec!r} needs a mixture-of-experts model; this one is dense "
                     f"(use {ALL!r})")
  if spec == ALL:
    return tuple(names)
  drop = spec.startswith("-")
  listed = [p.strip() for p in spec.lstrip("-").split("+")]
  unknown = [p for p in listed if p not in names]
  if unknown:
    raise ValueError(f"expert subset {spec!r}: unknown expert(s) {unknown}; the model has "
                     f"{names} (or write {ALL!r})")
  twice = sorted({p for p in listed if listed.count(p) > 1})
  if twice:
    raise ValueError(f"expert subset {spec!r}: {twice} listed twice")
  if drop and PUBLIC in listed:
    raise ValueError(f"expert subset {spec!r}: cannot drop {PUBLIC!r}, the expert every token "
                     f"falls back on; name the experts to keep instead (e.g. {'+'.join(names[1:2])})")
  return tuple(n for n in names if (n in listed) != drop)


def expert_mask(spec: str, names: Sequence[str]) -> np.ndarray | None:
  """The [E] bool mask of `spec` for a model's forward pass, or None when every expert is allowed
  (no restriction at all: also what a dense model takes)."""
  allowed = parse_expert_subset(spec, names)
  if len(allowed) == len(names):
    return None
  return np.isin(np.asarray(names), allowed)
