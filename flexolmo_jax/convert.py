"""Hugging Face interop: Olmo2 / FlexOlmo safetensors checkpoints <-> our parameter tree.

  python -m flexolmo_jax.convert --from_hf=HF_DIR --out=ARTIFACT_DIR \
      [--expert_names=public,math,code,...] [--router_rows=ROWS.npz]
  python -m flexolmo_jax.convert --to_hf=ARTIFACT_DIR --out=HF_DIR [--max_shard_size=5GB] \
      [--drop_expert_bias]

The tokenizer files, generation_config.json and chat template travel with the weights both ways
(data.tokenizer.HF_COMPANION_FILES); the artifact's manifest records the tokenizer fingerprint,
and a FlexOlmo checkpoint's expert names (--expert_names, or config.json's `expert_names`).
Bad input ends the command with one line on stderr and exit code 2.

Both directions go tensor by tensor: loading fills preallocated stacked arrays, saving streams
each tensor into its safetensors file, so a 7x7B checkpoint is never held twice in memory.
Loading accepts the per-expert layout (`mlp.experts.{e}.gate_proj.weight`, what every
transformers version writes to disk) and the fused layout (`mlp.experts.gate_up_proj [E, 2F, D]`,
gate rows first, and `mlp.experts.down_proj [E, D, F]`); saving writes the per-expert layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import re
import struct
import types
from typing import Any, Callable, Mapping, Sequence

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from flexolmo_jax import checkpoint, cli, paths, progress
from flexolmo_jax import model
from flexolmo_jax import router_init
from flexolmo_jax import runs
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import tokenizer as tokenizer_lib

SUPPORTED_MODEL_TYPES = ("olmo2", "flex_olmo")
_ARCHITECTURES = {"olmo2": "Olmo2ForCausalLM", "flex_olmo": "FlexOlmoForCausalLM"}
# transformers' own defaults for the fields a config.json may leave out.
_HF_DEFAULTS = {
    "olmo2": {"rope_theta": 10_000.0, "rms_norm_eps": 1e-5},
    "flex_olmo": {"rope_theta": 500_000.0, "rms_norm_eps": 1e-6, "num_experts": 7,
                  "num_experts_per_tok": 5},
}
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
# ModelConfig has no length limit (RoPE needs none); transformers only sizes caches from it.
# 4096 is the context OLMo-2 / FlexOlmo were trained with.
_MAX_POSITION_EMBEDDINGS = 4096
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"
_FFN = ("gate_proj", "up_proj", "down_proj")
# Tokens of the probe on which `bias_effect` measures what dropping an expert bias changes.
_BIAS_PROBE_TOKENS = 64
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class HFCheckpointError(ValueError):
  """A Hugging Face checkpoint, or a tree to save as one, that the converter cannot map."""


# ----------------------------------------------------------------------------------------------
# Config.


def _dtype_name(dtype: Any) -> str:
  name = jnp.dtype(str(dtype).removeprefix("torch.")).name
  if name not in _SAFETENSORS_DTYPES:
    raise HFCheckpointError(f"dtype {name} is not supported; use one of "
                            f"{list(_SAFETENSORS_DTYPES)}")
  return name


def _rope_theta(hf: Mapping[str, Any], model_type: str) -> float:
  """Theta from `rope_parameters` (current files) or top-level `rope_theta` (older files)."""
  parameters = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  rope_type = parameters.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
  if rope_type != "default":
    raise HFCheckpointError(f"rope_type {rope_type!r} is not supported; only 'default' RoPE is")
  return float(parameters.get("rope_theta", hf.get("rope_theta",
                                                   _HF_DEFAULTS[model_type]["rope_theta"])))


def _single_token_id(hf: Mapping[str, Any], name: str) -> int | None:
  value = hf.get(name)
  if isinstance(value, (list, tuple)):
    if len(value) > 1:
      logging.warning("%s has several ids %s; ModelConfig keeps the first", name, value)
    value = value[0] if value else None
  return value


def config_from_hf(hf: Mapping[str, Any], *, dtype: Any = None) -> ModelConfig:
  """The ModelConfig of a Hugging Face Olmo2 / FlexOlmo config.json dict.

  `dtype` overrides the parameter dtype the file declares (`dtype`, or `torch_dtype` in older
  files; float32 when neither is present).
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise HFCheckpointError(f"model_type {model_type!r} is not supported; supported model types: "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  missing = [name for name in _REQUIRED_FIELDS if name not in hf]
  if missing:
    raise HFCheckpointError(f"config.json lacks {', '.join(missing)}")
  if hf.get("tie_word_embeddings", False):
    raise HFCheckpointError("tie_word_embeddings=True is not supported: OLMo-2 / FlexOlmo keep "
                            "the input embedding and the output head separate")
  if hf.get("attention_bias", False):
    raise HFCheckpointError("attention_bias=True is not supported: OLMo-2 attention has no biases")
  if hf.get("hidden_act", "silu") != "silu":
    raise HFCheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported; only 'silu' is")
  defaults = _HF_DEFAULTS[model_type]
  n_heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim")
  if head_dim == hf["hidden_size"] // n_heads:
    head_dim = None  # The derived default: keep the config canonical.
  moe = {}
  if model_type == "flex_olmo":
    num_experts = hf.get("num_experts", hf.get("num_local_experts", defaults["num_experts"]))
    moe = dict(num_experts=num_experts,
               top_k=hf.get("num_experts_per_tok", defaults["num_experts_per_tok"]),
               norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
  param_dtype = _dtype_name(dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32")
  return ModelConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      ffn_hidden=hf["intermediate_size"], head_dim=head_dim,
      rms_norm_eps=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
      rope_theta=_rope_theta(hf, model_type), **moe,
      dtype=param_dtype, param_dtype=param_dtype,
      pad_token_id=_single_token_id(hf, "pad_token_id"),
      eos_token_id=_single_token_id(hf, "eos_token_id"),
      bos_token_id=_single_token_id(hf, "bos_token_id"))


def config_to_hf(config: ModelConfig, expert_names: Sequence[str] | None = None) -> dict[str, Any]:
  """The config.json dict: FlexOlmo when the config is a MoE, Olmo2 when it is dense."""
  model_type = "flex_olmo" if config.is_moe else "olmo2"
  hf = {
      "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
      "vocab_size": config.vocab_size, "hidden_size": config.d_model,
      "intermediate_size": config.ffn_hidden, "num_hidden_layers": config.n_layers,
      "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
      "hidden_act": "silu", "max_position_embeddings": _MAX_POSITION_EMBEDDINGS,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
      "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
      "pad_token_id": config.pad_token_id, "eos_token_id": config.eos_token_id,
      "bos_token_id": config.bos_token_id, "dtype": _dtype_name(config.param_dtype),
      # transformers 4.x reads only these older spellings; 5.x accepts them beside the new ones.
      "rope_theta": config.rope_theta, "torch_dtype": _dtype_name(config.param_dtype),
  }
  if config.head_dim is not None:
    hf["head_dim"] = config.head_dim
  if config.is_moe:
    hf.update(num_experts=config.num_experts, num_experts_per_tok=config.top_k,
              norm_topk_prob=config.norm_topk_prob)
  if expert_names is not None:
    names = list(expert_names)
    if not config.is_moe or len(names) != config.num_experts:
      raise HFCheckpointError(f"expert_names has {len(names)} names for a model with "
                              f"{config.num_experts} experts")
    hf["expert_names"] = names
  return hf


def check_expert_names(names: Sequence[str], num_experts: int | None) -> list[str]:
  """Refuses expert names that are not unique `[A-Za-z0-9_-]+` names, `public` first, one per
  expert (`num_experts` None: the model is dense and takes no names)."""
  names = [str(n).strip() for n in names]
  if num_experts is None:
    raise HFCheckpointError("expert names were given for a dense (Olmo2) checkpoint; only a "
                            "FlexOlmo checkpoint has experts to name")
  if len(names) != num_experts:
    raise HFCheckpointError(f"{len(names)} expert names {names} for a model with {num_experts} "
                            f"experts; give exactly {num_experts}, the first one public")
  bad = [n for n in names if not cli.NAME.fullmatch(n)]
  if bad:
    raise HFCheckpointError(f"expert names {bad} are not made of letters, digits, _ and -")
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise HFCheckpointError(f"expert names {duplicates} are given more than once; each expert "
                            "needs its own name")
  if names[0] != "public":
    raise HFCheckpointError(f"the first expert name is {names[0]!r}; expert 0 is the public "
                            "model's FFN and must be named public")
  return names


def _read_hf_config(path: pathlib.Path) -> dict[str, Any]:
  config_path = path / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"no config.json in {path}")
  try:
    return json.loads(config_path.read_text())
  except json.JSONDecodeError as err:
    raise HFCheckpointError(f"{config_path} is not valid JSON ({err})") from None


def load_hf_expert_names(path: str | os.PathLike) -> list[str] | None:
  """The expert names `save_hf` stored in config.json, or None when there are none."""
  return _read_hf_config(pathlib.Path(path)).get("expert_names")


# ----------------------------------------------------------------------------------------------
# Tensor map.


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One Hugging Face tensor and where it sits in our tree."""

  key: str  # HF name in the per-expert layout.
  leaf: str  # Our '/'-joined parameter path.
  index: tuple[int, ...]  # Position in our stacked leaf (layer, then expert).
  transpose: bool  # HF Linear weights are [out, in]; ours are [in, out].
  # The fused-layout alternative of an expert weight: (HF name, index into it).
  fused: tuple[str, tuple[Any, ...]] | None = None


def _expert_tensors(prefix: str, layer: int, expert: int, ffn: int) -> list[_Tensor]:
  """One expert's three weights, each with its place in transformers' fused layout."""
  fused = {"gate_proj": ("gate_up_proj", (expert, slice(0, ffn))),  # Gate rows come first.
           "up_proj": ("gate_up_proj", (expert, slice(ffn, 2 * ffn))),
           "down_proj": ("down_proj", (expert,))}
  return [_Tensor(f"{prefix}mlp.experts.{expert}.{name}.weight", f"layers/mlp/{name}",
                  (layer, expert), True,
                  fused=(f"{prefix}mlp.experts.{fused[name][0]}", fused[name][1]))
          for name in _FFN]


def _tensor_map(config: ModelConfig) -> list[_Tensor]:
  """Every HF tensor of `config`'s checkpoint, in the order transformers lists them."""
  tensors = [_Tensor("model.embed_tokens.weight", "embed", (), False)]
  for layer in range(config.n_layers):
    prefix = f"model.layers.{layer}."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
      tensors.append(_Tensor(f"{prefix}self_attn.{name}.weight", f"layers/attn/{name}", (layer,),
                             transpose=name.endswith("proj")))
    if config.is_moe:
      tensors.append(_Tensor(f"{prefix}mlp.gate.weight", "layers/mlp/router", (layer,), False))
      for expert in range(config.num_experts):
        tensors.extend(_expert_tensors(prefix, layer, expert, config.ffn_hidden))
    else:
      for name in _FFN:
        tensors.append(_Tensor(f"{prefix}mlp.{name}.weight", f"layers/mlp/{name}", (layer,), True))
    tensors.append(_Tensor(f"{prefix}post_attention_layernorm.weight", "layers/post_attn_norm",
                           (layer,), False))
    tensors.append(_Tensor(f"{prefix}post_feedforward_layernorm.weight", "layers/post_ffn_norm",
                           (layer,), False))
  tensors.append(_Tensor("model.norm.weight", "final_norm", (), False))
  tensors.append(_Tensor("lm_head.weight", "lm_head", (), True))
  return tensors


def hf_tensors(config: ModelConfig) -> list[tuple[str, str, tuple[int, ...]]]:
  """(Hugging Face name, our '/'-joined leaf, index into that leaf) of every tensor of `config`'s
  checkpoint, in the order transformers lists them."""
  return [(t.key, t.leaf, t.index) for t in _tensor_map(config)]


@functools.cache  # Tracing the model's init costs about a second; configs are hashable.
def param_shapes(config: ModelConfig) -> Mapping[str, tuple[int, ...]]:
  """Our parameter shapes by '/'-joined path, from the model itself (nothing allocated)."""
  abstract = jax.eval_shape(functools.partial(model.init_params, config), jax.random.key(0))
  return types.MappingProxyType(
      {path: tuple(leaf.shape) for path, leaf in checkpoint.flatten(abstract).items()})


def _hf_shape(tensor: _Tensor, leaf_shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(leaf_shape[len(tensor.index):])
  return shape[::-1] if tensor.transpose else shape


def _check_covered(tensors: list[_Tensor], shapes: Mapping[str, Any], ignore=()) -> None:
  """Refuses a model parameter the tensor map does not fill (the model grew a new parameter)."""
  unmapped = sorted(set(shapes) - {t.leaf for t in tensors} - set(ignore))
  if unmapped:
    raise HFCheckpointError(f"parameters with no Hugging Face counterpart: {', '.join(unmapped)}")


# ----------------------------------------------------------------------------------------------
# Loading.


class _SafetensorsReader(contextlib.ExitStack):
  """Reads tensors one at a time from `model.safetensors` or a sharded index."""

  def __init__(self, path: pathlib.Path):
    super().__init__()
    self.path = path
    index_path, single_path = path / _INDEX_FILE, path / _SINGLE_FILE
    if index_path.exists():
      self._files = json.loads(index_path.read_text())["weight_map"]
      for name in sorted(set(self._files.values())):
        if not (path / name).exists():
          raise FileNotFoundError(f"shard {name} listed in {index_path} does not exist")
    elif single_path.exists():
      with safe_open(single_path, framework="numpy") as f:
        self._files = {key: _SINGLE_FILE for key in f.keys()}
    else:
      raise FileNotFoundError(f"{path} has neither {_SINGLE_FILE} nor {_INDEX_FILE}")
    self._handles: dict[str, Any] = {}

  def __contains__(self, key: str) -> bool:
    return key in self._files

  def keys(self) -> list[str]:
    return list(self._files)

  def _slice(self, key: str):
    name = self._files[key]
    if name not in self._handles:
      self._handles[name] = self.enter_context(safe_open(self.path / name, framework="numpy"))
    return self._handles[name].get_slice(key)

  def read(self, key: str, expected_shape: tuple[int, ...], index: tuple[Any, ...] = ()):
    """The tensor `key` (or `key[index]`) after checking the whole tensor's shape."""
    tensor = self._slice(key)
    found = tuple(tensor.get_shape())
    if found != expected_shape:
      raise HFCheckpointError(f"tensor {key} has shape {list(found)}, expected "
                              f"{list(expected_shape)} (in {self.path})")
    return tensor[index] if index else tensor[:]


def _fused_shape(tensor: _Tensor, config: ModelConfig) -> tuple[int, ...]:
  if tensor.leaf.endswith("down_proj"):
    return (config.num_experts, config.d_model, config.ffn_hidden)
  return (config.num_experts, 2 * config.ffn_hidden, config.d_model)


def _read_tensor(reader: _SafetensorsReader, tensor: _Tensor, shape: tuple[int, ...],
                 config: ModelConfig) -> tuple[np.ndarray, str]:
  """The HF tensor for `tensor`, from the per-expert or the fused layout, and its source key."""
  if tensor.key in reader:
    return reader.read(tensor.key, shape), tensor.key
  if tensor.fused is not None and tensor.fused[0] in reader:
    fused_key, index = tensor.fused
    return reader.read(fused_key, _fused_shape(tensor, config), index), fused_key
  alternative = f"; the fused {tensor.fused[0]} is absent too" if tensor.fused else ""
  raise HFCheckpointError(f"missing tensor {tensor.key}, expected shape {list(shape)}, in "
                          f"{reader.path}{alternative}")


def load_hf(path: str | os.PathLike, *, dtype: Any = None) -> tuple[ModelConfig, dict[str, Any]]:
  """Reads a Hugging Face Olmo2 / FlexOlmo checkpoint directory: (config, params).

  Params are a nested dict of host numpy arrays laid out as `Transformer(config)` expects, in
  the checkpoint's declared dtype unless `dtype` is given; the config's `param_dtype` and
  activation `dtype` are both set to it. `moe_backend` is left at the ModelConfig default:
  pick one with `config.replace(moe_backend=...)`.
  """
  path = pathlib.Path(path)
  config = config_from_hf(_read_hf_config(path), dtype=dtype)
  shapes = param_shapes(config)
  tensors = _tensor_map(config)
  _check_covered(tensors, shapes)
  param_dtype = jnp.dtype(config.param_dtype)
  flat = {leaf: np.empty(shape, param_dtype) for leaf, shape in shapes.items()}
  used = set()
  with _SafetensorsReader(path) as reader:
    for tensor in progress.bar(tensors, desc=f"read {path.name}", unit="tensor"):
      target = flat[tensor.leaf]
      value, source = _read_tensor(reader, tensor, _hf_shape(tensor, target.shape), config)
      target[tensor.index] = value.T if tensor.transpose else value  # Casts on assignment.
      used.add(source)
    unused = sorted(set(reader.keys()) - used)
  if unused:
    logging.warning("ignored %d tensors of %s that the model has no place for: %s",
                    len(unused), path, ", ".join(unused[:8]))
  return config, checkpoint.unflatten(flat)


def load_hf_router(path: str | os.PathLike) -> np.ndarray:
  """The router weights [L, E, D] of a FlexOlmo checkpoint, read without the other tensors."""
  path = pathlib.Path(path)
  config = config_from_hf(_read_hf_config(path))
  if not config.is_moe:
    raise HFCheckpointError(f"{path} is a dense checkpoint: it has no router")
  router = [t for t in _tensor_map(config) if t.leaf == "layers/mlp/router"]
  with _SafetensorsReader(path) as reader:
    return np.stack([reader.read(t.key, (config.num_experts, config.d_model)) for t in router])


# ----------------------------------------------------------------------------------------------
# Saving.


def parse_size(size: int | str) -> int:
  """Bytes in a size such as 5000000, "5GB" (10**9) or "4GiB" (2**30)."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
  if not match:
    raise ValueError(f"cannot read size {size!r}; write e.g. 5GB, 500MB or 4GiB")
  return int(float(match.group(1)) * _UNITS[match.group(2)])


def _shards(sizes: Sequence[int], limit: int | None) -> list[list[int]]:
  """Groups consecutive tensors (by position) into shards of at most `limit` bytes each.

  A tensor larger than the limit gets a shard of its own, as in transformers.
  """
  shards: list[list[int]] = [[]]
  filled = 0
  for position, size in enumerate(sizes):
    if limit is not None and shards[-1] and filled + size > limit:
      shards.append([])
      filled = 0
    shards[-1].append(position)
    filled += size
  return shards


def _write_safetensors(path: pathlib.Path,
                       tensors: Sequence[tuple[str, tuple[int, ...], np.dtype,
                                               Callable[[], np.ndarray]]]) -> None:
  """Writes a safetensors file, producing and writing one tensor at a time.

  The header needs only shapes and dtypes, so no tensor is materialised before its turn.
  """
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers requires "pt".
  offset = 0
  for key, shape, dtype, _ in tensors:
    size = int(np.prod(shape)) * dtype.itemsize
    header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": list(shape),
                   "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # Tensor data starts 8-byte aligned.
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for key, shape, dtype, produce in progress.bar(tensors, desc=f"write {path.name}",
                                                   unit="tensor"):
      array = np.ascontiguousarray(produce(), dtype=dtype.newbyteorder("<"))
      if array.shape != shape:
        raise HFCheckpointError(f"tensor {key} came out with shape {array.shape}, expected {shape}")
      f.write(array.tobytes())


def bias_effect(config: ModelConfig, params: Mapping[str, Any]) -> tuple[float, int]:
  """What dropping the expert bias does to this model: (largest |logit change|, positions whose
  greedy token changes), over a fixed probe of random tokens."""
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, _BIAS_PROBE_TOKENS),
                                             dtype=np.int32)
  mlp = params["layers"]["mlp"]
  unbiased = {**params, "layers": {**params["layers"], "mlp": {
      k: v for k, v in mlp.items() if k != "expert_bias"}}}
  forward = lambda c, p: np.asarray(model.Transformer(c).apply({"params": p}, tokens), np.float32)
  kept, dropped = forward(config, params), forward(config.replace(expert_bias=False), unbiased)
  return (float(np.max(np.abs(kept - dropped))),
          int(np.sum(kept.argmax(-1) != dropped.argmax(-1))))


def _check_expert_bias(config: ModelConfig, params: Mapping[str, Any], flat: Mapping[str, Any],
                       drop_expert_bias: bool):
  """HF FlexOlmo has no router bias: refuses to drop one unless asked, saying what dropping it
  changes on this very model."""
  if not config.expert_bias:
    return
  # The bias acts as min(b, 0) on every expert but the public one; only that part can be lost.
  effective = np.minimum(np.asarray(flat["layers/mlp/expert_bias"], np.float32)[:, 1:], 0.0)
  if np.any(effective != 0.0):
    change, flips = bias_effect(config, params)
    effect = (f"dropping it moves the logits by up to {change:.3g} and changes the greedy token "
              f"at {flips} of {_BIAS_PROBE_TOKENS} positions of a random-token probe")
  else:
    effect = "dropping it changes nothing here (every bias is >= 0, so min(b, 0) = 0)"
  if not drop_expert_bias:
    raise HFCheckpointError(
        f"the model has a learned expert bias, which Hugging Face FlexOlmo cannot represent; "
        f"{effect}. Pass --drop_expert_bias (drop_expert_bias=True) to export without it, or "
        "merge with --keep_bias=false")
  if np.any(effective != 0.0):
    logging.warning("the exported model's outputs differ from this model's: %s", effect)


def save_hf(config: ModelConfig, params: Mapping[str, Any], path: str | os.PathLike, *,
            max_shard_size: int | str | None = None, expert_names: Sequence[str] | None = None,
            drop_expert_bias: bool = False,
            files: Mapping[str, str | os.PathLike] | None = None) -> None:
  """Writes a Hugging Face checkpoint (config.json + safetensors) that transformers loads.

  Dense configs become `Olmo2ForCausalLM`, MoE configs `FlexOlmoForCausalLM` in the per-expert
  layout. Tensors are cast to `config.param_dtype`. `max_shard_size` (bytes, or e.g. "5GB")
  splits the weights into shards with an index; None writes one file. `path` must be absent or
  an empty directory; it appears only once complete. A learned expert bias has no HF
  counterpart: saving one is refused unless `drop_expert_bias`. `files` (name -> source path)
  are copied next to the weights: tokenizer, generation config, chat template.
  """
  flat = checkpoint.flatten(params)
  shapes = param_shapes(config)
  for leaf, shape in shapes.items():
    found = tuple(np.shape(flat[leaf])) if leaf in flat else None
    if found != shape:
      raise HFCheckpointError(f"parameter {leaf} has shape {found}, expected {shape} for this "
                              "config")
  _check_expert_bias(config, params, flat, drop_expert_bias)
  tensors = _tensor_map(config)
  _check_covered(tensors, shapes, ignore=("layers/mlp/expert_bias",))
  hf_config = config_to_hf(config, expert_names)
  dtype = jnp.dtype(config.param_dtype)

  def producer(tensor: _Tensor) -> Callable[[], np.ndarray]:
    def produce():
      value = np.asarray(flat[tensor.leaf][tensor.index])  # Only this slice leaves the device.
      return value.T if tensor.transpose else value
    return produce

  specs = [(t.key, _hf_shape(t, shapes[t.leaf]), dtype, producer(t)) for t in tensors]
  shards = _shards([int(np.prod(s[1])) * dtype.itemsize for s in specs],
                   None if max_shard_size is None else parse_size(max_shard_size))
  with checkpoint.atomic_directory(path) as tmp:
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    for name, source in (files or {}).items():
      paths.path(source).copy(paths.path(tmp) / name)
    if len(shards) == 1:
      _write_safetensors(tmp / _SINGLE_FILE, specs)
      return
    weight_map = {}
    for number, shard in enumerate(shards, 1):
      name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
      _write_safetensors(tmp / name, [specs[i] for i in shard])
      weight_map.update({specs[i][0]: name for i in shard})
    total = sum(int(np.prod(s[1])) * dtype.itemsize for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / _INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Artifacts and command line.


def carried_files(directory: str | os.PathLike) -> dict[str, paths.epath.Path]:
  """The tokenizer, generation-config and chat-template files present in `directory` (local or
  remote)."""
  directory = paths.path(directory)
  return {name: directory / name for name in tokenizer_lib.HF_COMPANION_FILES
          if (directory / name).is_file()}


def hf_to_artifact(hf_path: str | os.PathLike, out: str | os.PathLike, *, dtype: Any = None,
                   expert_names: Sequence[str] | None = None,
                   router_rows: str | os.PathLike | None = None) -> dict:
  """Converts a Hugging Face checkpoint into a params artifact at `out`; returns its manifest.

  The tokenizer files, generation config and chat template are copied along, and the manifest
  records the tokenizer's fingerprint and the experts' names (`expert_names`, else those in
  config.json). Names are checked before any weight is read. `router_rows`: also write each
  expert's router rows [L, D] under its name to this .npz (the router-embeddings format), so a
  new owner can train against the released public row.
  """
  hf_path = pathlib.Path(hf_path).absolute()
  hf = _read_hf_config(hf_path)
  names = expert_names if expert_names is not None else hf.get("expert_names")
  if names is not None:
    config = config_from_hf(hf, dtype=dtype)
    names = check_expert_names(names, config.num_experts if config.is_moe else None)
  if router_rows is not None and names is None:
    raise HFCheckpointError("--router_rows needs the experts' names: pass --expert_names")
  files = carried_files(hf_path)
  config, params = load_hf(hf_path, dtype=dtype)
  extra = {"source": f"hf:{hf_path}"}
  if names is not None:
    extra["expert_names"] = names
  if "tokenizer.json" in files:
    extra[tokenizer_lib.FINGERPRINT_KEY] = tokenizer_lib.fingerprint(files["tokenizer.json"])
  kind = "merged" if config.is_moe else "public"
  manifest = checkpoint.save_params_artifact(out, config, params, kind, extra_manifest=extra,
                                             files=files)
  if router_rows is not None:
    router = params["layers"]["mlp"]["router"]
    router_init.save_embeddings(str(router_rows), {n: router[:, i] for i, n in enumerate(names)})
  return manifest


def _files_to_export(artifact: pathlib.Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
  """What travels into the Hugging Face directory: the artifact's own carried files, else the
  tokenizer its manifest names (with that tokenizer's companion files)."""
  files = carried_files(artifact)
  if "tokenizer.json" in files:
    return files
  found = tokenizer_lib.model_tokenizer_path(artifact, manifest)
  if found is None:
    logging.warning("%s carries no tokenizer: the export has none either (AutoTokenizer will "
                    "not load it)", artifact)
    return files
  if found.endswith(".json"):
    return {**carried_files(pathlib.Path(found).parent), **files}
  logging.warning("the model's tokenizer is a sentencepiece model (%s); it is copied as "
                  "tokenizer.model, which transformers' AutoTokenizer cannot load as is", found)
  return {**files, "tokenizer.model": found}


def artifact_to_hf(artifact: str | os.PathLike, out: str | os.PathLike, *, dtype: Any = None,
                   max_shard_size: int | str | None = None, drop_expert_bias: bool = False) -> None:
  """Writes the params artifact (or training run) at `artifact` as a Hugging Face checkpoint at
  `out`, with the tokenizer, generation config and chat template that travel with it."""
  artifact = pathlib.Path(artifact)
  config, params, manifest = runs.load_params(artifact)
  if manifest.get("kind") == "expert":
    raise HFCheckpointError(f"{artifact} is one expert's training run; merge it first "
                            "(python -m flexolmo_jax.merge) and convert the merged model")
  if dtype is not None:
    config = config.replace(param_dtype=_dtype_name(dtype))
  save_hf(config, params, out, max_shard_size=max_shard_size,
          expert_names=manifest.get("expert_names"), drop_expert_bias=drop_expert_bias,
          files=_files_to_export(artifact, manifest))


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags; only when run as a program, so that importing this module
  next to another tool's module (merge.py also has --out) never clashes."""
  flags.DEFINE_string("from_hf", None, "Hugging Face checkpoint directory to convert into a "
                      "flexolmo_jax params artifact at --out.")
  flags.DEFINE_string("to_hf", None, "flexolmo_jax params artifact directory to convert into a "
                      "Hugging Face checkpoint at --out.")
  flags.DEFINE_string("out", None, "Output directory; must be absent or empty.")
  flags.DEFINE_string("dtype", None, "Parameter dtype of the output (default: the input's).")
  flags.DEFINE_string("max_shard_size", "5GB", "--to_hf: largest safetensors shard.")
  flags.DEFINE_bool("drop_expert_bias", False, "--to_hf: save a model with a learned expert bias "
                    "without it (Hugging Face FlexOlmo has none).")
  flags.DEFINE_list("expert_names", None, "--from_hf: names of a FlexOlmo checkpoint's experts, "
                    "in order: unique [A-Za-z0-9_-]+ names, the first one public.")
  flags.DEFINE_string("router_rows", None, "--from_hf of a FlexOlmo: also write each expert's "
                      "router rows to this .npz (config.expert.router_embeddings format).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  cli.default_verbosity()
  if bool(FLAGS.from_hf) == bool(FLAGS.to_hf) or not FLAGS.out:
    cli.fail("give exactly one of --from_hf=HF_DIR and --to_hf=ARTIFACT_DIR, and --out=DIR")
  checkpoint.require_local_artifact(FLAGS.out)  # Before the conversion's work.
  if (FLAGS.expert_names is not None or FLAGS.router_rows) and not FLAGS.from_hf:
    cli.fail("--expert_names and --router_rows go with --from_hf (an artifact's names travel in its "
          "manifest)")
  if FLAGS.from_hf:
    manifest = hf_to_artifact(FLAGS.from_hf, FLAGS.out, dtype=FLAGS.dtype,
                              expert_names=FLAGS.expert_names, router_rows=FLAGS.router_rows)
    names = f", experts {manifest['expert_names']}" if "expert_names" in manifest else ""
    print(f"wrote {manifest['kind']} artifact {FLAGS.out} (fingerprint "
          f"{manifest['fingerprint'][:16]}{names})")
  else:
    artifact_to_hf(FLAGS.to_hf, FLAGS.out, dtype=FLAGS.dtype,
                   max_shard_size=FLAGS.max_shard_size, drop_expert_bias=FLAGS.drop_expert_bias)
    print(f"wrote Hugging Face checkpoint {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  cli.run(main, errors=(SafetensorError,))  # Bad input of any kind: one line, exit status 2.
