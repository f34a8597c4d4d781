"""The paper's baselines (docs/method.md, section 6), built from the same public model and experts
as FlexOlmo and scored like any model, by per-domain held-out perplexity:

  soup_uniform, soup_weighted   model soup: one dense model whose FFN is the average of the public
                   FFN and the experts' FFNs, uniform or weighted by each domain's training tokens
                   (every other tensor is shared by all owners' models)
  btm              Branch-Train-Merge: an ensemble of the owners' models ({public, expert i}, and
                   the public model): at each position, the next-token distributions are mixed with
                   weights softmax(log-likelihood of the document prefix so far) over the top-k
  btx              the merged MoE with its router rows re-initialised at random (no bias), then
                   trained on public data only (router_tuning.train_router)
  prompt_routing   a hashed bag-of-words classifier (one-vs-rest, router_tuning's) sends each
                   sequence, from its first PROMPT_TOKENS tokens, to one expert; the model runs
                   {public, chosen}. It learns only from the owners' proxy sets (public documents
                   labelled by owner), never from closed-domain documents
  soup_dense_uniform, soup_dense_weighted, btm_dense   the paper's members: the soups and BTM over
                   the public model and DENSE fine-tunes of it on each domain (Parts.dense), every
                   parameter averaged / every model a member

Every baseline is a `Baseline`: `get(name, options).build(parts)` returns a
`scoring.BatchScorer`, which evaluate, launch/sweep and reproduce score exactly as they score a
model (scoring.score_domains).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from flexolmo_jax import experts, router_tuning, scoring
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import corpus, load_manifest, load_tokenizer

# ----------------------------------------------------------------------------- the interface


@dataclasses.dataclass(frozen=True)
class Parts:
  """What every baseline is built from: the dense public model, the FlexOlmo model merged from the
  same experts (expert 0 is the public FFN), and the prepared corpus the experts were trained on
  (BTX, prompt routing and the token-weighted soup read it)."""
  public: tuple[ModelConfig, Mapping]
  merged: tuple[ModelConfig, Mapping, tuple[str, ...]]
  data: str
  # Dense fine-tunes of the public model, one per closed domain ((domain, config, params), every
  # parameter trained: configs/dense_base.py), the paper's members for BTM and the soups; only the
  # *_dense baselines read them.
  dense: tuple[tuple[str, ModelConfig, Mapping], ...] = ()

  @classmethod
  def from_merged(cls, config: ModelConfig, params, names: Sequence[str], data: str) -> "Parts":
    """Parts whose public model is the merged model's own expert 0 and shared tensors."""
    dense, _ = experts.dense_public_params(params)
    return cls((dense_config(config), dense), (config, params, tuple(names)), data)


@dataclasses.dataclass(frozen=True)
class Options:
  """Settings of the baselines that have any."""
  btm_top_k: int = 2  # ensemble members mixed per token
  tune_steps: int = 100  # BTX router training steps
  seed: int = 0  # BTX router init and data order, prompt-router documents
  # The owners' proxy sets ({domain: router_tuning.select_proxies(...)}) prompt routing learns
  # from; None: each owner's set is selected here with `seed`, as the owner would on its machine.
  proxies: Mapping[str, Mapping] | None = None


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A model built from Parts, scored like any model: `build(parts)` is its BatchScorer."""
  name: str
  build: Callable[[Parts], scoring.BatchScorer]


def _soup(parts: Parts, options: Options, weighted: bool) -> scoring.BatchScorer:
  del options
  config, params, names = parts.merged
  weights = None
  if weighted:
    tokens = load_manifest(parts.data)["domains"]
    weights = [tokens[n]["train"]["tokens"] for n in names]
  return scoring.model_scorer(*soup_from_merged(config, params, weights))


def _btm(parts: Parts, options: Options) -> scoring.BatchScorer:
  config, params, names = parts.merged
  members = [(*parts.public, None)] + [
      (config.replace(top_k=2), params, np.isin(names, ["public", n])) for n in names[1:]]
  return functools.partial(btm_perplexity, members, top_k=options.btm_top_k)


def tune_config(data: str, steps: int, seed: int) -> router_tuning.RouterTuningConfig:
  """Router training of an in-memory model (BTX, the reproduction's router tuning): the method's
  100 warmup steps, shortened to a third of a short run."""
  return router_tuning.RouterTuningConfig(
      merged="", data=data, proxies="", out="", steps=steps, warmup_steps=min(100, steps // 3),
      seed=seed, log_every=steps)


def _btx(parts: Parts, options: Options) -> scoring.BatchScorer:
  config, params, _ = parts.merged
  cfg = tune_config(parts.data, options.tune_steps, options.seed)
  return scoring.model_scorer(*btx(config, params, parts.data, cfg))


def _prompt_routing(parts: Parts, options: Options) -> scoring.BatchScorer:
  config, params, names = parts.merged
  proxies = options.proxies
  if proxies is None:  # The owners' step (each reads only its own domain), simulated here.
    proxies = {n: router_tuning.select_proxies(parts.data, n, 200, seed=options.seed)
               for n in names[1:]}
  router = train_prompt_router(parts.data, proxies, seed=options.seed)
  return functools.partial(prompt_routing_perplexity, config.replace(top_k=2), params,
                           list(names), router, load_tokenizer(parts.data))


def _dense_members(parts: Parts) -> list[tuple[ModelConfig, Mapping]]:
  if not parts.dense:
    raise ValueError("the *_dense baselines need dense fine-tunes of the public model on each "
                     "domain (Parts.dense); train them with --config=configs/dense_base.py:DOMAIN "
                     "(python -m flexolmo_jax.reproduce does)")
  return [parts.public] + [(c, p) for _, c, p in parts.dense]


def _soup_dense(parts: Parts, options: Options, weighted: bool) -> scoring.BatchScorer:
  del options
  members = _dense_members(parts)
  weights = None
  if weighted:
    tokens = load_manifest(parts.data)["domains"]
    owners = (corpus.PUBLIC, *(d for d, _, _ in parts.dense))
    weights = [tokens[n]["train"]["tokens"] for n in owners]
  return scoring.model_scorer(members[0][0], dense_soup([p for _, p in members], weights))


def _btm_dense(parts: Parts, options: Options) -> scoring.BatchScorer:
  members = [(c, p, None) for c, p in _dense_members(parts)]
  return functools.partial(btm_perplexity, members, top_k=options.btm_top_k)


# A new baseline is one entry here: name -> builder(parts, options) -> scoring.BatchScorer.
BUILDERS: dict[str, Callable[[Parts, Options], scoring.BatchScorer]] = {
    "soup_uniform": functools.partial(_soup, weighted=False),
    "soup_weighted": functools.partial(_soup, weighted=True),
    "btm": _btm,
    "btx": _btx,
    "prompt_routing": _prompt_routing,
    "soup_dense_uniform": functools.partial(_soup_dense, weighted=False),
    "soup_dense_weighted": functools.partial(_soup_dense, weighted=True),
    "btm_dense": _btm_dense,
}
NAMES = tuple(BUILDERS)


def get(name: str, options: Options = Options()) -> Baseline:
  """The baseline called `name`; unknown names are refused with the known ones."""
  if name not in BUILDERS:
    raise ValueError(f"unknown baseline {name!r}; baselines: {', '.join(NAMES)}")
  return Baseline(name, functools.partial(BUILDERS[name], options=options))


dense_config = experts.dense_config  # The name tests and callers of this module use.


# ----------------------------------------------------------------------------- model soup


def _soup_weights(n: int, weights: Sequence[float] | None) -> np.ndarray:
  """`n` weights summing to 1: uniform by default, else `weights` normalised."""
  w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, np.float64)
  if len(w) != n or np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f"soup weights {list(w)} must be {n} non-negative numbers, not all 0")
  return w / w.sum()


def soup_params(public_params, expert_trees: Sequence[Mapping],
                weights: Sequence[float] | None = None):
  """Dense parameters whose FFN is sum_j w_j FFN_j over [public] + experts (w: uniform by default,
  else normalised to sum 1); every other tensor is the public model's."""
  ffns = [public_params["layers"]["mlp"]] + list(expert_trees)
  w = _soup_weights(len(ffns), weights)
  mlp = {k: sum(float(wj) * np.asarray(f[k], np.float64) for wj, f in zip(w, ffns)).astype(
      np.asarray(ffns[0][k]).dtype) for k in experts.FFN_KEYS}
  return {**public_params, "layers": {**public_params["layers"], "mlp": mlp}}


def dense_soup(trees: Sequence[Mapping], weights: Sequence[float] | None = None):
  """The parameter average sum_j w_j theta_j of whole dense models of one architecture (w:
  uniform by default, else normalised to sum 1): the paper's soup of dense fine-tunes."""
  w = _soup_weights(len(trees), weights)
  return jax.tree.map(lambda *xs: sum(float(wj) * np.asarray(x, np.float64)
                                      for wj, x in zip(w, xs)).astype(np.asarray(xs[0]).dtype),
                      *trees)


def soup_from_merged(config: ModelConfig, params, weights: Sequence[float] | None = None):
  """(dense config, soup params) from merged MoE parameters (expert 0 is the public FFN)."""
  dense, _ = experts.dense_public_params(params)
  trees = [experts.extract_expert(params, j) for j in range(1, config.num_experts)]
  return dense_config(config), soup_params(dense, trees, weights)


# ----------------------------------------------------------------------------- Branch-Train-Merge


def prefix_loglik(logp_MxBxL, positions_BxL, mask_BxL):
  """Each member's log-likelihood of the document prefix BEFORE each target: the sum of its
  scored target log-probs at earlier positions of the same document (0 at a document start)."""
  scored = np.where(mask_BxL > 0, logp_MxBxL, 0.0).astype(np.float64)
  inclusive = np.cumsum(scored, axis=-1)
  exclusive = inclusive - scored
  index = np.arange(positions_BxL.shape[-1])
  start_BxL = np.maximum.accumulate(np.where(positions_BxL == 0, index, 0), axis=-1)
  at_start = np.take_along_axis(exclusive, np.broadcast_to(start_BxL, exclusive.shape), axis=-1)
  return exclusive - at_start


def btm_log_weights(prefix_MxBxL, top_k: int):
  """log of the ensemble weights: softmax over the top-k members by prefix log-likelihood (the
  others get weight 0, log -inf); ties keep the lower member index."""
  members = prefix_MxBxL.shape[0]
  k = min(top_k, members)
  rank = np.argsort(np.argsort(-prefix_MxBxL, axis=0, kind="stable"), axis=0, kind="stable")
  logits = np.where(rank < k, prefix_MxBxL, -np.inf)
  return logits - np.logaddexp.reduce(logits, axis=0, keepdims=True)


def mixture_logprobs(log_w_Mx, logp_Mx):
  """log sum_m w_m p_m: mixes members' log-probs (of targets [M, ...] or distributions
  [M, ..., V] with log_w broadcast over V)."""
  return np.logaddexp.reduce(log_w_Mx + logp_Mx, axis=0)


def _target_logprobs(config: ModelConfig, params, batch, expert_mask_E):
  logp, _ = scoring.jitted_target_logprobs(config)(params, batch["tokens"], batch["targets"],
                                                   expert_mask_E, batch["positions"],
                                                   batch["segment_ids"])
  return logp


def btm_perplexity(members: Sequence[tuple[ModelConfig, Mapping, np.ndarray | None]],
                   batches: Iterable[Mapping[str, np.ndarray]], *, top_k: int,
                   per_token: bool = False) -> dict:
  """Perplexity of the Branch-Train-Merge ensemble of `members` ((config, params, expert_mask));
  `per_token` as scoring.perplexity's."""
  totals = scoring.TokenTotals(per_token)
  for batch in batches:
    logp = np.stack([np.asarray(_target_logprobs(c, p, batch, m)) for c, p, m in members])
    mask = batch["loss_mask"].astype(np.float64)
    log_w = btm_log_weights(prefix_loglik(logp, batch["positions"], mask), top_k)
    mixed = mixture_logprobs(log_w, logp.astype(np.float64))
    totals.add(-mixed * mask, mask)
  return totals.result()


# ----------------------------------------------------------------------------- BTX


def random_router(config: ModelConfig, params, seed: int):
  """MoE params with every router row drawn from N(0, init_std^2) and no expert bias."""
  mlp = {k: v for k, v in params["layers"]["mlp"].items() if k != "expert_bias"}
  shape = np.shape(mlp["router"])
  mlp["router"] = (config.init_std * np.random.default_rng(seed).normal(size=shape)).astype(
      np.asarray(mlp["router"]).dtype)
  return (config.replace(expert_bias=False, expert_bias_init=0.0),
          {**params, "layers": {**params["layers"], "mlp": mlp}})


def btx(config: ModelConfig, params, data_root: str, cfg: router_tuning.RouterTuningConfig):
  """(config, params) of BTX: random router rows trained on `cfg.public_slice` public training
  documents only (no proxy sets), every other tensor frozen."""
  config, params = random_router(config, params, cfg.seed)
  records = router_tuning.tuning_documents(data_root, {}, cfg.public_slice, cfg.seed)
  trained, _ = router_tuning.train_router(config, params, records, cfg)
  return config, trained


# ----------------------------------------------------------------------------- prompt routing


class PromptRouter:
  """One-vs-rest hashed bag-of-words logistic regressions over `classes` (expert names); a text
  goes to the class of highest score."""

  def __init__(self, weights_CxF: np.ndarray, bias_C: np.ndarray, classes: Sequence[str]):
    self.weights_CxF, self.bias_C, self.classes = weights_CxF, bias_C, list(classes)

  @classmethod
  def fit(cls, texts_by_class: Mapping[str, Sequence[str]], **train_options) -> "PromptRouter":
    """Trains each class's documents against every other class's."""
    feats = {c: router_tuning.hashed_features(t) for c, t in texts_by_class.items()}
    weights, biases = [], []
    for c in feats:
      rest = np.concatenate([f for o, f in feats.items() if o != c])
      w, b = router_tuning.train_classifier(feats[c], rest, **train_options)
      weights.append(w)
      biases.append(b)
    return cls(np.stack(weights), np.asarray(biases), list(feats))

  def scores(self, texts: Sequence[str]) -> np.ndarray:
    return router_tuning.hashed_features(texts, self.weights_CxF.shape[1]) @ self.weights_CxF.T \
        + self.bias_C

  def route(self, texts: Sequence[str]) -> list[str]:
    """The chosen class of each text."""
    return [self.classes[i] for i in np.argmax(self.scores(texts), axis=1)]


def train_prompt_router(data_root: str, proxies: Mapping[str, Mapping], *,
                        docs_per_class: int = 200, seed: int = 0) -> PromptRouter:
  """A PromptRouter trained only on what the owners may share (docs/method.md, section 5): each
  owner's proxy set (router_tuning.select_proxies: indices and hashes of PUBLIC training
  documents), labelled by its domain, against `docs_per_class` other public documents as
  "public". It reads the public split and nothing else: never a closed domain's documents or
  labels (the paper's router is a zero-shot classifier, which saw none either)."""
  rows = corpus.read_text_split(data_root, corpus.PUBLIC, "train")
  router_tuning.check_proxies(data_root, rows, proxies)
  texts = {d: [rows[i]["text"] for i in p["indices"][:docs_per_class]] for d, p in proxies.items()}
  taken = {i for p in proxies.values() for i in p["indices"]}
  order = np.random.default_rng(seed).permutation(len(rows))
  # Tiny corpora can have every public document in some proxy set: then "public" draws from all.
  rest = [i for i in order if i not in taken] or list(order)
  return PromptRouter.fit({corpus.PUBLIC: [rows[i]["text"] for i in rest[:docs_per_class]],
                           **texts})


# Prompt routing chooses a row's expert from the row's first PROMPT_TOKENS tokens. Those tokens
# are not scored, for prompt routing or for any other model (reproduce's Evaluator drops them
# from every model's losses): a choice made after reading them would score them with look-ahead,
# and every model must be compared on the same tokens.
PROMPT_TOKENS = 32


def prompt_routing_perplexity(config: ModelConfig, params, names: Sequence[str],
                              router: PromptRouter, tokenizer,
                              batches: Iterable[Mapping[str, np.ndarray]], *,
                              prompt_tokens: int = PROMPT_TOKENS, per_token: bool = False) -> dict:
  """Perplexity when each row runs on {public, the expert its first `prompt_tokens` tokens are
  routed to}; also the share of rows sent to each expert. Every loss-masked token counts here (as
  in every scorer); reproduce drops the first `prompt_tokens` of each row for every model."""
  totals, chosen = scoring.TokenTotals(per_token), []
  fn = scoring.jitted_token_nll(config)
  for batch in batches:
    rows = batch["tokens"].shape[0]
    texts = [tokenizer.decode([int(t) for t, s in zip(row[:prompt_tokens], seg[:prompt_tokens])
                               if s != 0])
             for row, seg in zip(batch["tokens"], batch["segment_ids"])]
    picks = router.route(texts)
    mask = np.zeros((rows, len(names)), bool)
    mask[:, names.index("public")] = True
    for r, pick in enumerate(picks):
      mask[r, names.index(pick)] = True
    totals.add(jax.device_get(fn(params, batch, mask)), batch["loss_mask"])
    real = batch["segment_ids"][:, 0] != 0  # Padding rows of a short final batch route nowhere.
    chosen += [p for p, ok in zip(picks, real) if ok]
  shares = {c: chosen.count(c) / max(len(chosen), 1) for c in router.classes}
  return {**totals.result(), "routed_to": shares}
