r"""Merging at load time, opt-out, and the merge command (docs/method.md, section 5).

  python -m flexolmo_jax.merge --public=runs/public \
      --experts=math=runs/experts/math,code=runs/experts/code [--opt_out=code] [--top_k=K] \
      [--keep_bias=false] --out=runs/merged
  python -m flexolmo_jax.merge --merged=runs/merged --opt_out=code --out=runs/merged_no_code
  python -m flexolmo_jax.merge --public=runs/flex_public \
      --experts=math=hf:HF_FLEX_MATH_2X,mine=runs/experts/mine --out=runs/merged
  python -m flexolmo_jax.merge --merged=runs/flex_7x7b --experts=mine=runs/experts/mine \
      --out=runs/flex_8x7b

Expert 0 is always the public FFN with the public router row r_pub; expert j (in the order given)
is owner j's FFN and router row. Each expert checkpoint is restored on its own and copied once
into preallocated stacked arrays, so assembly holds the merged model plus one expert at a time.
An expert is refused unless it was trained on exactly this public model (same fingerprint) and
against the same r_pub as the others. Opting an expert out drops its FFN and router row in every
layer: the result is identical to never having merged it.
Export with `python -m flexolmo_jax.convert --to_hf=OUT --out=HF_DIR` (expert names travel in
the manifest into config.json; Hugging Face FlexOlmo has no expert bias: merge with
--keep_bias=false, or pass --drop_expert_bias to convert). `name=hf:DIR` takes a released 2-expert
FlexOlmo checkpoint (its shared part must equal the public model); `--merged=DIR --experts=...`
adds experts to a merged or converted released model, keeping its experts' names
(docs/interop.md).
"""

from __future__ import annotations

import os
import pathlib
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from flexolmo_jax import checkpoint, cli, convert, distributed, experts, paths, progress, runs
from flexolmo_jax import sharding
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import tokenizer as tokenizer_lib
from flexolmo_jax.model import logical_axes

PUBLIC = "public"
STACKED_KEYS = experts.FFN_KEYS + ("router",)
# Fields that define the public architecture; an expert's config must agree on all of them.
ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden",
               "head_dim", "param_dtype")


class MergeError(ValueError):
  """An expert or model that cannot be merged; the message says which and why."""


def parse_experts(spec: str | Mapping[str, str] | Sequence[tuple[str, str]]
                  ) -> list[tuple[str, str]]:
  """[(name, path)] from "a=DIR,b=DIR", a dict or pairs; refuses duplicate or reserved names."""
  if isinstance(spec, str):
    pairs = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
      name, sep, path = item.partition("=")
      if not sep or not name or not path:
        raise MergeError(f"--experts entry {item!r} is not name=DIR")
      pairs.append((name.strip(), path.strip()))
  else:
    pairs = list(spec.items() if isinstance(spec, Mapping) else spec)
  names = [name for name, _ in pairs]
  for name in names:
    cli.check_name(name, "expert name", MergeError)
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise MergeError(f"expert name(s) {duplicates} given more than once; each expert needs a "
                     "unique name")
  if PUBLIC in names:
    raise MergeError(f"{PUBLIC!r} is reserved for expert 0 (the public model); rename the expert")
  return [(str(name), str(path)) for name, path in pairs]


def _check_opt_out(names: Sequence[str], opt_out: Iterable[str]) -> set[str]:
  opt_out = set(opt_out)
  if PUBLIC in opt_out:
    raise MergeError("the public expert (expert 0) cannot be opted out")
  unknown = sorted(opt_out - set(names))
  if unknown:
    raise MergeError(f"cannot opt out {unknown}: not among the experts {list(names)}")
  return opt_out


def _load_public(path) -> tuple[ModelConfig, dict, str]:
  config, params, manifest = runs.load_params(path)
  if config.is_moe:
    raise MergeError(f"{path} holds a mixture of experts; --public must be the dense public model "
                     "(to opt experts out of a merged model, use --merged)")
  # An artifact's fingerprint was just verified on load; a training run's is computed here.
  return config, params, manifest.get("fingerprint") or checkpoint.fingerprint(params)


def _expert_manifest(name: str, path: str, public_fingerprint: str) -> dict:
  """The expert run's manifest, checked against the public model before any weight is read."""
  if not runs.is_run_dir(path):
    raise MergeError(f"expert {name!r}: {path} is not an expert training run (no checkpoints/); "
                     "train it: python -m flexolmo_jax.train --config=configs/<name>_expert.py")
  try:
    manifest = checkpoint.read_manifest(path)
  except ValueError as err:
    raise MergeError(f"expert {name!r}: {err}") from err
  if manifest.get("kind") != "expert":
    raise MergeError(f"expert {name!r}: {path} is a {manifest.get('kind')!r} run, not an expert")
  if manifest.get("name") != name:
    raise MergeError(f"expert {name!r}: {path} holds the expert {manifest.get('name')!r}; name it "
                     f"{manifest.get('name')}={path}")
  if manifest.get("public_fingerprint") != public_fingerprint:
    raise MergeError(
        f"expert {name!r} ({path}) was trained on another public model: its public fingerprint is "
        f"{manifest.get('public_fingerprint')}, the public model's is {public_fingerprint}. "
        "Retrain the expert on this public model, or merge it with the one it was trained on")
  return manifest


def _check_config(name: str, path: str, config: ModelConfig, public: ModelConfig) -> None:
  diff = {f: (getattr(config, f), getattr(public, f)) for f in ARCH_FIELDS
          if getattr(config, f) != getattr(public, f)}
  if diff:
    raise MergeError(f"expert {name!r} ({path}) does not fit the public model: "
                     + ", ".join(f"{f}={a} vs {b}" for f, (a, b) in diff.items()))


def _expected_shapes(public_params, with_bias: bool) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  mlp = public_params["layers"]["mlp"]
  shapes = {k: (mlp[k].shape, mlp[k].dtype) for k in experts.FFN_KEYS}
  L, D = mlp["gate_proj"].shape[:2]
  shapes["router"] = ((L, D), mlp["gate_proj"].dtype)
  if with_bias:
    shapes["expert_bias"] = ((L,), mlp["gate_proj"].dtype)
  return shapes


def _check_expert_tree(name, path, tree, shapes) -> None:
  missing = sorted(set(shapes) - set(tree))
  if missing:
    hint = " (merge with keep_bias=False / --keep_bias=false)" if missing == ["expert_bias"] else ""
    raise MergeError(f"expert {name!r} ({path}) has no {missing}{hint}")
  for key, (shape, dtype) in shapes.items():
    found = np.shape(tree[key]), np.asarray(tree[key]).dtype
    if found != (shape, dtype):
      raise MergeError(f"expert {name!r} ({path}): {key} has shape {found[0]} {found[1]}, "
                       f"the public model needs {shape} {dtype}")


def _checked_inputs(public, expert_list, opt_out):
  """The public model and the experts to merge, every manifest checked; no expert weight read.

  Returns (public_config, public_params, public_fingerprint, pairs, manifests, configs).
  """
  pairs = parse_experts(expert_list)
  skip = _check_opt_out([n for n, _ in pairs], opt_out)
  pairs = [(n, p) for n, p in pairs if n not in skip]
  public_config, public_params, public_fp = _load_public(public)

  manifests = {n: _source_manifest(n, p, public_config, public_params, public_fp)
               for n, p in pairs}
  _check_tokenizers(checkpoint.read_manifest(public), manifests)
  configs = {n: ModelConfig.from_dict(m["config"]) for n, m in manifests.items()}
  for n, p in pairs:
    _check_config(n, p, configs[n], public_config)
  routers = {m.get("public_router_fingerprint") for m in manifests.values()}
  if len(routers) > 1:
    raise MergeError("the experts were trained against different public router rows: "
                     + ", ".join(f"{n}: {m.get('public_router_fingerprint')}"
                                 for n, m in manifests.items())
                     + "; every owner must use the same router embeddings for 'public'")
  return public_config, public_params, public_fp, pairs, manifests, configs


def _merged_config(public_config, configs, n_experts, top_k, with_bias, backend):
  train_top_k = max((c.top_k for c in configs.values()), default=1)
  bias_init = min((c.expert_bias_init for c in configs.values()), default=0.0)
  config = experts.moe_config(public_config, n_experts, top_k=top_k or train_top_k,
                              with_bias=with_bias, bias_init=bias_init, backend=backend)
  return config, top_k or train_top_k


def _assemble(public, expert_list, *, opt_out=(), top_k=None, keep_bias=True, backend=None,
              with_fingerprints=False):
  """(config, params, names, provenance) for `assemble`; provenance feeds the manifest."""
  public_config, public_params, public_fp, pairs, manifests, configs = _checked_inputs(
      public, expert_list, opt_out)
  # Released (hf:) experts have no bias: a merge of only those has none either.
  with_bias = bool(keep_bias) and any(c.expert_bias for c in configs.values())

  mlp = public_params["layers"]["mlp"]
  L, D = mlp["gate_proj"].shape[:2]
  E = 1 + len(pairs)
  # One buffer per stacked tensor, filled slice by slice: no second full copy is ever made.
  stacked = {k: np.empty((L, E) + mlp[k].shape[1:], mlp[k].dtype) for k in experts.FFN_KEYS}
  stacked["router"] = np.empty((L, E, D), mlp["gate_proj"].dtype)
  if with_bias:
    stacked["expert_bias"] = np.zeros((L, E), mlp["gate_proj"].dtype)  # Never applied to 0.
  for k in experts.FFN_KEYS:
    stacked[k][:, 0] = mlp[k]
  if pairs:
    stacked["router"][:, 0] = _public_router(pairs[0][1], manifests[pairs[0][0]])
  else:
    stacked["router"][:, 0] = 0.0  # A lone expert gets softmax weight 1 whatever its row.

  shapes = _expected_shapes(public_params, with_bias)
  provenance = {}
  for j, (name, path) in enumerate(progress.bar(pairs, desc="merge: read experts", unit="expert"),
                                   1):
    _, tree, manifest = _load_expert(path, manifests[name])
    _check_expert_tree(name, path, tree, shapes)
    for key in shapes:
      stacked[key][:, j] = tree[key]
    provenance[name] = {"path": str(paths.absolute(path)), "step": manifest["step"],
                        "fingerprint": checkpoint.fingerprint(tree) if with_fingerprints else None}
    del tree

  params = {**public_params, "layers": {**public_params["layers"], "mlp": stacked}}
  config, requested = _merged_config(public_config, configs, len(pairs), top_k, with_bias, backend)
  names = [PUBLIC] + [n for n, _ in pairs]
  info = {"public_fingerprint": public_fp, "experts": provenance,
          "bias": "kept" if with_bias else "dropped", "top_k_requested": requested}
  return config, params, names, info


def place(config: ModelConfig, params, mesh: jax.sharding.Mesh | None):
  """`params` on `mesh` with the model's logical shardings (unchanged when mesh is None)."""
  if mesh is None:
    return params
  shardings = sharding.tree_shardings(params, logical_axes(config), mesh)
  return jax.tree.map(jax.device_put, params, shardings)


def assemble(public: str | os.PathLike,
             expert_list: Mapping[str, str] | Sequence[tuple[str, str]] | str, *,
             opt_out: Iterable[str] = (), top_k: int | None = None, keep_bias: bool = True,
             backend: str | None = None, mesh: jax.sharding.Mesh | None = None
             ) -> tuple[ModelConfig, dict, list[str]]:
  """Merged FlexOlmo parameters in memory: (config, params, expert_names).

  `public`: the dense public model (training run or params artifact). `expert_list`: name ->
  expert training run, in the order of expert rows 1..n. Opted-out experts are never read.
  `top_k` defaults to the experts' training top-k; either way it is clamped to the experts
  present. `keep_bias=False` drops the learned expert biases. With `mesh`, arrays are placed
  with the model's shardings; otherwise they are host numpy arrays.
  """
  config, params, names, _ = _assemble(public, expert_list, opt_out=opt_out, top_k=top_k,
                                       keep_bias=keep_bias, backend=backend)
  return config, place(config, params, mesh), names


def assemble_on_mesh(public: str | os.PathLike,
                     expert_list: Mapping[str, str] | Sequence[tuple[str, str]] | str,
                     mesh: jax.sharding.Mesh, *, opt_out: Iterable[str] = (),
                     top_k: int | None = None, keep_bias: bool = True,
                     backend: str | None = None) -> tuple[ModelConfig, dict, list[str]]:
  """`assemble(..., mesh=mesh)` without a host copy of the experts: each expert's checkpoint is
  restored by Orbax directly onto the devices that own its slot of the mesh's "expert" axis.

  With the model's rules, a stacked expert tensor [L, E, ...] splits E over "expert"; slot j
  lives on the devices whose "expert" coordinate is j // (E / expert_size). Expert j is
  restored with the sharding of its own [L, ...] tensor on that sub-mesh (the remaining axes
  split exactly as in the merged tensor), and each device's shard of the merged tensor is the
  stack of the shards of the experts in its slot. Values equal `assemble`'s bit for bit.
  """
  public_config, public_params, _, pairs, manifests, configs = _checked_inputs(
      public, expert_list, opt_out)
  if any(_is_hf(p) for _, p in pairs):
    raise MergeError("hf: experts are read on the host: merge them with the merge command "
                     "(or assemble) and load the merged artifact")
  with_bias = bool(keep_bias) and bool(pairs)
  config, _ = _merged_config(public_config, configs, len(pairs), top_k, with_bias, backend)
  mlp = public_params["layers"]["mlp"]
  num_layers, width = mlp["gate_proj"].shape[:2]
  dtype = mlp["gate_proj"].dtype
  public_router = (runs.load_public_router(pairs[0][1], manifests[pairs[0][0]]) if pairs
                   else np.zeros((num_layers, width), dtype))
  public_expert = {k: mlp[k] for k in experts.FFN_KEYS}
  public_expert["router"] = np.asarray(public_router, dtype)
  if with_bias:
    public_expert["expert_bias"] = np.zeros((num_layers,), dtype)  # Never applied to expert 0.

  merged_axes = logical_axes(config)
  stacked_shapes = {k: (num_layers, config.num_experts) + v.shape[1:]
                    for k, v in public_expert.items()}
  stacked_shardings = {k: sharding.logical_sharding(stacked_shapes[k],
                                                    tuple(merged_axes["layers"]["mlp"][k]), mesh)
                       for k in public_expert}
  slot_shardings = {k: _slot_shardings(s, config.num_experts) for k, s in stacked_shardings.items()}

  expert_trees = [distributed.put(public_expert, {k: v[0] for k, v in slot_shardings.items()})]
  shapes = _expected_shapes(public_params, with_bias)
  for j, (name, path) in enumerate(pairs, 1):
    abstract = {k: jax.ShapeDtypeStruct(shape, dtype_, sharding=slot_shardings[k][j])
                for k, (shape, dtype_) in shapes.items()}
    try:
      tree, _ = runs.restore_params_sharded(path, abstract)
    except ValueError as err:
      raise MergeError(f"expert {name!r}: {err}") from err
    expert_trees.append(tree)

  stacked = {k: _stack_shards([t[k] for t in expert_trees], stacked_shapes[k],
                              stacked_shardings[k]) for k in public_expert}
  rest = {**public_params, "layers": {k: v for k, v in public_params["layers"].items()
                                      if k != "mlp"}}
  rest_axes = {**merged_axes, "layers": {k: v for k, v in merged_axes["layers"].items()
                                         if k != "mlp"}}
  placed = distributed.put(rest, sharding.tree_shardings(rest, rest_axes, mesh))
  params = {**placed, "layers": {**placed["layers"], "mlp": stacked}}
  return config, params, [PUBLIC] + [n for n, _ in pairs]


def _slot_shardings(stacked: jax.sharding.NamedSharding, num_experts: int):
  """For each expert j, the sharding of its unstacked tensor (the expert dim 1 removed) on the
  sub-mesh of devices that hold slot j of `stacked`."""
  mesh, spec = stacked.mesh, tuple(stacked.spec) + (None,) * 2
  inner = jax.sharding.PartitionSpec(*(spec[:1] + spec[2:len(stacked.spec)]))
  if spec[1] is None:  # Experts unsplit: every device holds every slot.
    return [jax.sharding.NamedSharding(mesh, inner)] * num_experts
  if spec[1] != "expert":
    raise MergeError(f"stacked expert tensors split over {spec[1]!r}; only 'expert' is supported")
  axis = mesh.axis_names.index("expert")
  per_slot = num_experts // mesh.shape["expert"]
  names = tuple(n for n in mesh.axis_names if n != "expert")
  out = []
  for j in range(num_experts):
    devices = np.take(mesh.devices, j // per_slot, axis=axis)
    sub = jax.sharding.Mesh(devices, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
    out.append(jax.sharding.NamedSharding(sub, inner))
  return out


def _stack_shards(arrays: Sequence[jax.Array], shape, target: jax.sharding.NamedSharding):
  """The [L, E, ...] array with `target` sharding whose slot j is arrays[j] ([L, ...]), built
  from the device-local shards (every expert's piece on a device is already on that device)."""
  pieces = []
  for device, index in target.addressable_devices_indices_map(shape).items():
    slots = range(*index[1].indices(shape[1]))
    rows = [next(s.data for s in arrays[j].addressable_shards if s.device == device)
            for j in slots]
    pieces.append(jax.device_put(jax.numpy.stack(rows, axis=1), device))
  return jax.make_array_from_single_device_arrays(shape, target, pieces)


def opt_out(config: ModelConfig, params, expert_names: Sequence[str], names: Iterable[str], *,
            top_k: int | None = None) -> tuple[ModelConfig, dict, list[str]]:
  """Drops the named experts' FFNs and router rows (and biases) from merged parameters.

  top_k (default: the model's) is clamped to the experts that remain.
  """
  if len(expert_names) != config.num_experts:
    raise MergeError(f"{len(expert_names)} expert names for a model with {config.num_experts} "
                     "experts")
  drop = _check_opt_out(expert_names, names)
  keep = [i for i, n in enumerate(expert_names) if n not in drop]
  mlp = params["layers"]["mlp"]
  sliced = {k: np.asarray(v)[:, keep] for k, v in mlp.items()}
  new = {**params, "layers": {**params["layers"], "mlp": sliced}}
  new_config = config.replace(num_experts=len(keep), top_k=min(top_k or config.top_k, len(keep)))
  return new_config, new, [expert_names[i] for i in keep]


def merge_to_dir(public, expert_list, out, *, opt_out_names=(), top_k=None, keep_bias=True,
                 backend=None) -> dict:
  """Assembles a merged model and writes it as a params artifact at `out`; returns the manifest."""
  config, params, names, info = _assemble(public, expert_list, opt_out=opt_out_names, top_k=top_k,
                                          keep_bias=keep_bias, backend=backend,
                                          with_fingerprints=True)
  extra = {"expert_names": names, "public_path": str(paths.absolute(public)), **info}
  tokenizer_extra, files = _tokenizer_travels(public, checkpoint.read_manifest(public))
  return checkpoint.save_params_artifact(out, config, params, "merged",
                                         extra_manifest={**extra, **tokenizer_extra}, files=files)


def opt_out_dir(merged, names, out, *, top_k=None) -> dict:
  """Opts experts out of the merged artifact at `merged` and writes the result to `out`."""
  config, params, manifest = checkpoint.load_params_artifact(merged)
  if manifest.get("kind") != "merged" or "expert_names" not in manifest:
    raise MergeError(f"{merged} is a {manifest.get('kind')!r} artifact without expert names; "
                     "--merged needs the output of python -m flexolmo_jax.merge")
  requested = top_k or manifest.get("top_k_requested") or config.top_k
  config, params, kept = opt_out(config, params, manifest["expert_names"], names, top_k=requested)
  extra = {k: v for k, v in manifest.items()
           if k not in ("kind", "config", "fingerprint", "versions")}
  extra.update(expert_names=kept, top_k_requested=requested, opted_out_from=str(
      paths.absolute(merged)), experts={k: v for k, v in manifest.get(
          "experts", {}).items() if k in kept})
  return checkpoint.save_params_artifact(out, config, params, "merged", extra_manifest=extra,
                                         files=convert.carried_files(merged))


# ------------------------------------------------- released experts and released merged models
# A released 2-expert FlexOlmo checkpoint (public FFN + one domain expert, as FlexOlmo's combine
# script writes them) joins a merge as `name=hf:DIR`; a converted released FlexOlmo takes new
# experts with `--merged=DIR --experts=...`.

HF_PREFIX = "hf:"


def _is_hf(path: str) -> bool:
  return str(path).startswith(HF_PREFIX)


def _source_manifest(name: str, path: str, public_config: ModelConfig, public_params,
                     public_fingerprint: str) -> dict:
  """The manifest of an expert training run, or of a released 2-expert checkpoint after checking
  that its shared part is the public model's."""
  if not _is_hf(path):
    return _expert_manifest(name, path, public_fingerprint)
  directory = path[len(HF_PREFIX):]
  config, params = _read_hf(name, directory)
  if config.num_experts != 2:
    raise MergeError(f"expert {name!r}: {directory} has {config.num_experts} experts; hf: takes a "
                     "2-expert FlexOlmo checkpoint (the public FFN + one domain expert)")
  _check_config(name, directory, config, public_config)
  _check_shared(name, directory, config, params, public_params)
  r_pub = np.asarray(params["layers"]["mlp"]["router"][:, 0], np.float32)
  manifest = {"kind": "expert", "name": name, "config": config.to_dict(), "step": None,
              "source": f"hf:{pathlib.Path(directory).absolute()}",
              "public_fingerprint": public_fingerprint,
              "public_router_fingerprint": checkpoint.fingerprint({"r": r_pub})}
  tokenizer_json = pathlib.Path(directory) / "tokenizer.json"
  if tokenizer_json.exists():
    manifest[tokenizer_lib.FINGERPRINT_KEY] = tokenizer_lib.fingerprint(tokenizer_json)
  return manifest


def _read_hf(name: str, directory: str) -> tuple[ModelConfig, dict]:
  try:
    config, params = convert.load_hf(directory)
  except (convert.HFCheckpointError, OSError) as err:
    raise MergeError(f"expert {name!r}: {err}") from None
  if not config.is_moe:
    raise MergeError(f"expert {name!r}: {directory} is a dense model; hf: takes a 2-expert "
                     "FlexOlmo checkpoint (the public FFN + one domain expert)")
  return config, params


def _check_shared(name: str, directory: str, config: ModelConfig, params, public_params) -> None:
  """Refuses a released expert whose embeddings, attention, norms, head or expert 0 differ from
  the public model's, naming the first differing tensor (Hugging Face name, file order)."""
  hf_flat, public_flat = checkpoint.flatten(params), checkpoint.flatten(public_params)
  for key, leaf, index in convert.hf_tensors(config):
    if leaf == "layers/mlp/router":
      continue  # Row 0 is checked against the other experts' r_pub, row 1 is the expert's own.
    if leaf.startswith("layers/mlp/"):
      if index[1] != 0:
        continue
      ours = public_flat[leaf][index[0]]
    else:
      ours = public_flat[leaf][index]
    theirs = hf_flat[leaf][index]
    if not np.array_equal(np.asarray(ours), np.asarray(theirs)):
      diff = np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64)))
      raise MergeError(f"expert {name!r} ({directory}) was not built on this public model: its "
                       f"{key} differs from the public model's (max |difference| {diff:.3g}); "
                       "merge it with the public model it was built on")


def _load_expert(path: str, manifest: dict) -> tuple[ModelConfig | None, dict, dict]:
  """(config, expert subtree, manifest) of an expert run or of a released 2-expert checkpoint
  (its expert 1 and router row 1, with a zero bias: the same function as no bias)."""
  if not _is_hf(path):
    return runs.load_params(path)
  config, params = _read_hf(manifest["name"], path[len(HF_PREFIX):])
  mlp = params["layers"]["mlp"]
  tree = {k: mlp[k][:, 1] for k in experts.FFN_KEYS + ("router",)}
  tree["expert_bias"] = np.zeros(mlp["router"].shape[:1], mlp["router"].dtype)
  return config, tree, manifest


def _public_router(path: str, manifest: dict) -> np.ndarray:
  """The public router row r_pub [L, D] an expert was trained or released with."""
  if not _is_hf(path):
    return runs.load_public_router(path, manifest)
  return np.asarray(convert.load_hf_router(path[len(HF_PREFIX):])[:, 0], np.float32)


def _check_tokenizers(model_manifest: dict, manifests: Mapping[str, dict]) -> None:
  for name, manifest in manifests.items():
    try:
      tokenizer_lib.check_matches(model_manifest, manifest, model="the public model",
                                  fix=f"expert {name!r} was trained with another tokenizer: "
                                  "retrain it on data prepared with the public model's tokenizer")
    except tokenizer_lib.TokenizerMismatchError as err:
      raise MergeError(str(err)) from None


def _tokenizer_travels(model_dir, manifest: dict) -> tuple[dict, dict]:
  """(manifest keys, files) that carry a model's tokenizer into an artifact made from it."""
  keys = {k: manifest[k] for k in (tokenizer_lib.FINGERPRINT_KEY, tokenizer_lib.PATH_KEY)
          if k in manifest}
  return keys, convert.carried_files(model_dir)


def add_to_merged_dir(merged, expert_list, out, *, opt_out_names=(), top_k=None,
                      keep_bias=True) -> dict:
  """Adds experts (training runs, or hf: released 2-expert checkpoints) to a merged artifact, e.g.
  a converted released FlexOlmo, keeping its experts and their names; writes `out`.

  The merged model's expert 0 with its shared tensors is the public model the new experts must
  have been trained on (same fingerprint as the converted public checkpoint).
  """
  config, params, manifest = runs.load_params(merged)
  names = manifest.get("expert_names")
  if not config.is_moe or not names:
    raise MergeError(f"{merged} is not a merged model with expert names; convert a released "
                     "FlexOlmo with --expert_names=public,... first")
  pairs = parse_experts(expert_list)
  clash = sorted({n for n, _ in pairs} & set(names))
  if clash:
    raise MergeError(f"{merged} already has experts {clash}; give the new experts other names")
  public_params, released_r_pub = experts.dense_public_params(params)
  public_config = experts.dense_config(config)
  public_fp = checkpoint.fingerprint(public_params)
  manifests = {n: _source_manifest(n, p, public_config, public_params, public_fp)
               for n, p in pairs}
  _check_tokenizers(manifest, manifests)
  configs = {n: ModelConfig.from_dict(m["config"]) for n, m in manifests.items()}
  for n, p in pairs:
    _check_config(n, p, configs[n], public_config)
    r_pub = _public_router(p, manifests[n])
    if not np.array_equal(r_pub, np.asarray(released_r_pub, np.float32)):
      logging.warning("expert %r was trained against a public router row other than %s's row 0 "
                      "(max |difference| %.3g); its routing may differ from training", n, merged,
                      float(np.max(np.abs(r_pub - np.asarray(released_r_pub, np.float32)))))
  with_bias = bool(keep_bias) and (config.expert_bias
                                   or any(c.expert_bias for c in configs.values()))
  shapes = _expected_shapes(public_params, with_bias)
  mlp = params["layers"]["mlp"]
  columns = {k: [np.asarray(mlp[k])] for k in shapes if k in mlp}
  if with_bias and "expert_bias" not in mlp:
    columns["expert_bias"] = [np.zeros(mlp["router"].shape[:2], mlp["router"].dtype)]
  provenance = dict(manifest.get("experts", {}))
  for name, path in progress.bar(pairs, desc="merge: read experts", unit="expert"):
    _, tree, expert_manifest = _load_expert(path, manifests[name])
    _check_expert_tree(name, path, tree, shapes)
    for key in shapes:
      columns[key].append(np.asarray(tree[key])[:, None])
    provenance[name] = {"path": str(paths.absolute(path)) if not _is_hf(path) else path,
                        "step": expert_manifest["step"], "fingerprint": checkpoint.fingerprint(tree)}
  stacked = {k: np.concatenate(v, axis=1) for k, v in columns.items()}
  new_params = {**params, "layers": {**params["layers"], "mlp": stacked}}
  all_names = list(names) + [n for n, _ in pairs]
  requested = top_k or manifest.get("top_k_requested") or config.top_k
  new_config = config.replace(num_experts=len(all_names), top_k=min(requested, len(all_names)),
                              expert_bias=with_bias, expert_bias_init=min(
                                  [config.expert_bias_init]
                                  + [c.expert_bias_init for c in configs.values()])
                              if with_bias else 0.0)
  if opt_out_names:
    new_config, new_params, all_names = opt_out(new_config, new_params, all_names, opt_out_names,
                                                top_k=requested)
  extra = {k: v for k, v in manifest.items()
           if k not in ("kind", "config", "fingerprint", "versions")}
  extra.update(expert_names=all_names, top_k_requested=requested, public_fingerprint=public_fp,
               experts={k: v for k, v in provenance.items() if k in all_names},
               bias="kept" if with_bias else "dropped", added_to=str(paths.absolute(merged)))
  return checkpoint.save_params_artifact(out, new_config, new_params, "merged",
                                         extra_manifest=extra, files=convert.carried_files(merged))


# ----------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags, defined only when run as a program (convert.py also defines --out)."""
  flags.DEFINE_string("public", None, "The dense public model: training run or params artifact.")
  flags.DEFINE_string("experts", None, "Comma-separated name=DIR expert training runs, or "
                      "name=hf:DIR released 2-expert FlexOlmo checkpoints.")
  flags.DEFINE_string("merged", None, "A merged artifact (e.g. a converted released FlexOlmo) to "
                      "opt experts out of, or, with --experts, to add experts to.")
  flags.DEFINE_list("opt_out", [], "Expert names to leave out.")
  flags.DEFINE_integer("top_k", None, "Experts per token (default: the training top-k), clamped "
                       "to the experts present.")
  flags.DEFINE_bool("keep_bias", True, "Keep the learned expert biases (false drops them, as "
                    "Hugging Face FlexOlmo needs).")
  flags.DEFINE_string("backend", None, "MoE back end of the merged config (dense/ragged/blocked).")
  flags.DEFINE_string("out", None, "Output artifact directory; must be absent or empty.")
  flags.mark_flag_as_required("out")
  flags.mark_flags_as_mutual_exclusive(["public", "merged"], required=True)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.default_verbosity()
  checkpoint.require_local_artifact(FLAGS.out)  # Before any work.
  if FLAGS.merged and FLAGS.experts:
    manifest = add_to_merged_dir(FLAGS.merged, FLAGS.experts, FLAGS.out,
                                 opt_out_names=FLAGS.opt_out, top_k=FLAGS.top_k,
                                 keep_bias=FLAGS.keep_bias)
  elif FLAGS.merged:
    manifest = opt_out_dir(FLAGS.merged, FLAGS.opt_out, FLAGS.out, top_k=FLAGS.top_k)
  else:
    if FLAGS.experts is None:
      raise app.UsageError("--public needs --experts=name=DIR,...")
    manifest = merge_to_dir(FLAGS.public, FLAGS.experts, FLAGS.out,
                            opt_out_names=FLAGS.opt_out, top_k=FLAGS.top_k,
                            keep_bias=FLAGS.keep_bias, backend=FLAGS.backend)
  print(f"wrote {FLAGS.out}: experts {manifest['expert_names']}, top_k "
        f"{manifest['config']['top_k']}, bias {manifest.get('bias', 'none')}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
