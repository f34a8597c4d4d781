r"""Per-device memory plan of training or serving a model on a named accelerator mesh.

  python -m flexolmo_jax.memory_plan                       # every preset x mode x named mesh
  python -m flexolmo_jax.memory_plan --model=flexolmo_7x7b --mesh=v5p-64 --mode=expert \
      [--batch=32 --seq_len=4096 --mesh_shape=fsdp=16,tensor=2 --remat=full --json]
  python -m flexolmo_jax.memory_plan --config=configs/olmo2_7b_expert.py [--mesh=v5p-8]

With --config, the plan is that training config's: its mode, sequence length, microbatch
(data.batch_size / grad_accum), rematerialisation and compute dtype, on the architecture of its
public model (the checkpoint's manifest when it exists, else the preset the config file names in
PUBLIC_PRESET), on the meshes it names in PLAN_MESHES unless --mesh is given.

Nothing is allocated: parameter and optimizer trees come from `jax.eval_shape` of the model's
own init and of objective.make_optimizer's init, the trainable/frozen split and its axes come from
partition.py, and each leaf is divided per device by the NamedSharding that
sharding.tree_shardings gives it (the rules training uses) on an AbstractMesh
of the named mesh's shape, so 64 devices need not exist. Activations are estimated from the
layer shapes (`activation_bytes` documents the formula). For tiny configs, `compiled_memory`
compiles the real train step on the local devices and reads XLA's memory_analysis(), which the
tests compare with the estimate.

Modes:
  public     train every parameter of --model (pretraining the dense model, or full fine-tuning
             of a merged MoE): params, gradients and AdamW moments for all of it.
  expert     one data owner's run (train.py expert mode): the dense public model of --model's
             architecture, frozen, plus ONE trainable expert (FFN, router row, bias per layer).
             Gradients and AdamW moments exist only for that expert, so its optimizer state is
             about 1/E of full fine-tuning of the E-expert model.
  inference  the parameters and one forward pass (no gradients, no optimizer).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from absl import app, flags
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from flexolmo_jax import cli, experts, objective, partition, sharding
from flexolmo_jax.config import ATTENTION_IMPLS, PRESETS, ModelConfig
from flexolmo_jax.data.config import DataConfig
from flexolmo_jax.model import init_params, logical_axes
from flexolmo_jax.train_config import TrainConfig, train_config

MODES = ("public", "expert", "inference")
GB = 1e9  # Vendors quote HBM in decimal gigabytes; every figure here uses the same unit.


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """A named slice: device count and HBM per device (vendor figure, GB)."""

  devices: int
  hbm_gb: float
  note: str


# TPU names count TensorCores for v4/v5p (2 per chip) and chips for v5e/v6e.
MESHES: dict[str, MeshSpec] = {
    "v4-32": MeshSpec(16, 32.0, "TPU v4, 16 chips"),
    "v5p-8": MeshSpec(4, 95.0, "TPU v5p, 4 chips"),
    "v5p-64": MeshSpec(32, 95.0, "TPU v5p, 32 chips"),
    "v5e-256": MeshSpec(256, 16.0, "TPU v5e (v5litepod-256), 256 chips"),
    "v6e-64": MeshSpec(64, 32.0, "TPU v6e, 64 chips"),
    "8xH100": MeshSpec(8, 80.0, "one node, 8 NVIDIA H100 80GB"),
    "8xH200": MeshSpec(8, 141.0, "one node, 8 NVIDIA H200"),
}
DEFAULT_MESHES = ("v4-32", "v5p-64", "v5e-256", "8xH200")
DEFAULT_MODELS = {"olmo2_7b": ("public", "inference"),
                  "flexolmo_7x7b": ("public", "expert", "inference"),
                  "flexolmo_8x7b_top4": ("public", "expert", "inference")}


def mesh_spec(name: str) -> MeshSpec:
  if name not in MESHES:
    raise ValueError(f"unknown mesh {name!r}; valid meshes: {', '.join(MESHES)}")
  return MESHES[name]


def default_mesh_shape(devices: int, config: ModelConfig, mode: str) -> dict[str, int]:
  """FSDP over every device, except that a MoE's experts get their own axis when it divides both
  the expert count and the device count (expert training holds one expert: no expert axis)."""
  expert = math.gcd(config.num_experts, devices) if config.is_moe and mode != "expert" else 1
  return {"data": 1, "fsdp": devices // expert, "expert": expert, "tensor": 1}


def parse_mesh_shape(spec: str) -> dict[str, int]:
  """{"fsdp": 16, "tensor": 2} from "fsdp=16,tensor=2"."""
  shape = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    axis, sep, size = item.partition("=")
    if not sep or axis not in sharding.MESH_AXES or not size.isdigit():
      raise ValueError(f"--mesh_shape entry {item!r} is not AXIS=SIZE with AXIS in "
                       f"{sharding.MESH_AXES}")
    shape[axis] = int(size)
  return {axis: shape.get(axis, 1) for axis in sharding.MESH_AXES}


def abstract_mesh(shape: Mapping[str, int]) -> AbstractMesh:
  """A device-free mesh of `shape` over sharding.MESH_AXES (Auto axes, as make_mesh builds)."""
  return AbstractMesh(tuple(int(shape.get(a, 1)) for a in sharding.MESH_AXES), sharding.MESH_AXES,
                      axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES))


def per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds of a tree: each leaf's shard shape times its item size."""
  leaves = jax.tree.leaves(abstract_tree)
  shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  return sum(math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x, s in zip(leaves, shards, strict=True))


def _total_bytes(abstract_tree) -> int:
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract_tree))


def _optimizer(model_config: ModelConfig):
  """objective.make_optimizer as training builds it (AdamW: two moments in the parameter dtype)."""
  config = TrainConfig(mode="public", data=DataConfig(), model=model_config)
  return lambda trainable: objective.make_optimizer(config, trainable)[0]


def training_trees(config: ModelConfig, mode: str):
  """Abstract (trainable, frozen, trainable_axes, frozen_axes, step_config) of a run.

  In expert mode `config` names the architecture; the run trains a 2-expert MoE (public + the
  owner's, top-2 of 2, with bias), exactly as train.setup builds it; the split and its axes are
  partition.py's.
  """
  key = jax.random.key(0)
  if mode != "expert":
    trainable = jax.eval_shape(functools.partial(init_params, config), key)
    return (trainable, None, *partition.PUBLIC.axes(config, trainable), config)
  public_config = config.replace(num_experts=0, top_k=1, expert_bias=False, moe_backend="dense")
  public = jax.eval_shape(functools.partial(init_params, public_config), key)
  row = jax.ShapeDtypeStruct((config.n_layers, config.d_model), jnp.dtype(config.param_dtype))
  trainable = jax.eval_shape(lambda p, r: experts.upcycle_expert(p, r, bias_init=-0.5),
                             public, row)
  step_config = experts.moe_config(public_config, 1, top_k=2, with_bias=True, bias_init=-0.5)
  frozen = {"public": public, "public_router": row}
  return (trainable, frozen, *partition.EXPERT.axes(step_config, trainable), step_config)


def opt_state_shardings(tx, abstract_opt_state, param_shardings, mesh):
  """Moments shard like their parameters; scalars (the step count) are replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, param_shardings,
                               transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def activation_bytes(config: ModelConfig, *, tokens_per_device: int, seq_len: int, mode: str,
                     tensor: int = 1, remat: str | None = None) -> int:
  """Estimated activation bytes per device for one step.

  Per token and layer, the tensors the backward pass keeps (a = activation dtype bytes; H, K
  query / kv heads, Dh head dim, D width, F ffn hidden, E experts, k_eff = experts computed per
  token: top_k for the sorted back ends, E for the dense oracle, 1 for a dense FFN; H, K, F and
  V are divided by the tensor axis):
    layer = a(2D + (H+2K)Dh + H Dh)          block input, q/k/v (post-RoPE), attention output
          + 4(H+K)Dh + 8D                     float32 QK-norm and output-norm inputs
          + H L (4 + a)                       attention probabilities, float32 and activation
                                              dtype (attention_impl "xla", the einsum); an
          | 4H                                attention kernel keeps the float32 log-sum-exp per
                                              query instead and recomputes its score blocks
          + 8E + k_eff a (2D + 3F)            router logits/probs; per expert: input copy,
                                              gate, up, silu(gate)*up, output
    head  = 8V + a D                          float32 logits and their gradient (inference: 4V),
                                              embedding output
  Remat (config.remat): "none" keeps every layer (n layer); "full" keeps each layer's input
  (n a D) and recomputes one layer at a time (+ layer); "dots" also keeps the projections'
  outputs, n a((H+2K)Dh + D + k_eff(2F + D)), + layer. Inference keeps nothing across layers:
  one layer plus the head, once. Gradients of activations and XLA's temporaries are not
  counted, so treat the figure as the order of magnitude the compiled step confirms.
  """
  c = config
  remat = remat or c.remat
  a = jnp.dtype(c.dtype).itemsize
  d, dh, n, length = c.d_model, c.resolved_head_dim, c.n_layers, seq_len
  heads, kv = c.n_heads / tensor, c.n_kv_heads / tensor
  ffn, vocab = c.ffn_hidden / tensor, c.vocab_size / tensor
  if mode == "expert":
    experts_, k_eff = 2, 2  # Top-2 of 2: both experts on every token.
  elif c.is_moe:
    experts_, k_eff = c.num_experts, (c.num_experts if c.moe_backend == "dense" else c.top_k)
  else:
    experts_, k_eff = 0, 1
  layer = (a * (2 * d + (heads + 2 * kv) * dh + heads * dh) + 4 * (heads + kv) * dh + 8 * d
           + heads * (length * (4 + a) if c.attention_impl == "xla" else 4)
           + 8 * experts_ + k_eff * a * (2 * d + 3 * ffn))
  head = 8 * vocab + a * d
  if mode == "inference":
    per_token = layer + head - 4 * vocab  # No logits gradient.
  elif remat == "none":
    per_token = n * layer + head
  elif remat == "full":
    per_token = n * a * d + layer + head
  else:  # "dots"
    saved = a * ((heads + 2 * kv) * dh + d + k_eff * (2 * ffn + d))
    per_token = n * (a * d + saved) + layer + head
  return int(per_token * tokens_per_device)


def batch_shards(mesh: AbstractMesh | jax.sharding.Mesh, batch: int) -> int:
  """How many ways a global batch of `batch` rows is split: the batch axes that divide it."""
  shards = 1
  for axis in sharding.batch_axes(mesh):
    if batch % (shards * mesh.shape[axis]) == 0:
      shards *= mesh.shape[axis]
  return shards


def plan(model: str | ModelConfig, mesh: str, mode: str, *, batch: int | None = None,
         seq_len: int = 4096, mesh_shape: Mapping[str, int] | None = None,
         remat: str = "full", attention_impl: str = "xla") -> dict[str, Any]:
  """One row of the plan: per-device bytes of every part of `mode` on the named `mesh`."""
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
  spec = mesh_spec(mesh)
  if isinstance(model, str):
    if model not in PRESETS:
      raise ValueError(f"unknown model {model!r}; valid models: {', '.join(PRESETS)}")
    name, config = model, PRESETS[model]()
  else:
    name, config = "custom", model
  config = config.replace(remat=remat, attention_impl=attention_impl)
  shape = dict(mesh_shape or default_mesh_shape(spec.devices, config, mode))
  if math.prod(shape.values()) != spec.devices:
    raise ValueError(f"mesh shape {shape} has {math.prod(shape.values())} devices; {mesh} has "
                     f"{spec.devices}")
  amesh = abstract_mesh(shape)
  # Default: one sequence per batch shard.
  batch = batch or math.prod(amesh.shape[a] for a in sharding.batch_axes(amesh))
  return {"model": name, "mode": mode, "mesh": mesh, "devices": spec.devices,
          "hbm_gb": spec.hbm_gb, "mesh_shape": shape, "batch": batch, "seq_len": seq_len,
          "remat": remat, "attention_impl": attention_impl,
          **estimate(config, mode, amesh, batch=batch, seq_len=seq_len)}


def estimate(config: ModelConfig, mode: str, mesh, *, batch: int, seq_len: int
             ) -> dict[str, Any]:
  """Per-device bytes (params, frozen, grads, optimizer, assembled, activations, total) of
  `mode` for `config` on `mesh` (an AbstractMesh or a real Mesh)."""
  trainable, frozen, axes, frozen_axes, step_config = training_trees(config, mode)
  shardings = sharding.tree_shardings(trainable, axes, mesh)
  params = per_device_bytes(trainable, shardings)
  out = {"params": params, "frozen": 0, "grads": 0, "optimizer": 0, "assembled": 0}
  if frozen is not None:
    out["frozen"] = per_device_bytes(frozen, sharding.tree_shardings(frozen, frozen_axes, mesh))
    # The sorted back ends and expert parallelism stack [public FFN, expert] into [L, 2, ...]
    # tensors inside the step (model.Mlp over experts.training_moe); the dense back end reads the
    # two apart, so for it this term is an upper bound.
    moe = jax.eval_shape(functools.partial(init_params, step_config), jax.random.key(0))
    moe_shardings = sharding.tree_shardings(moe, logical_axes(step_config), mesh)
    mlp = {k: moe["layers"]["mlp"][k] for k in experts.FFN_KEYS}
    out["assembled"] = per_device_bytes(
        mlp, {k: moe_shardings["layers"]["mlp"][k] for k in experts.FFN_KEYS})
  if mode != "inference":
    out["grads"] = params
    tx = _optimizer(config)(trainable)
    opt_state = jax.eval_shape(tx.init, trainable)
    out["optimizer"] = per_device_bytes(opt_state,
                                        opt_state_shardings(tx, opt_state, shardings, mesh))
    out["trainable_params_total"] = _total_bytes(trainable)
    out["optimizer_total"] = _total_bytes(opt_state)
    if mode == "expert":
      # Full fine-tuning of the merged model (of the 2-expert model, for a dense preset).
      full_config = config if config.is_moe else step_config
      full = jax.eval_shape(functools.partial(init_params, full_config), jax.random.key(0))
      out["full_finetune_optimizer_total"] = _total_bytes(
          jax.eval_shape(_optimizer(full_config)(full).init, full))
      out["full_finetune_experts"] = full_config.num_experts
  shards = batch_shards(mesh, batch)
  out["activations"] = activation_bytes(
      step_config if mode == "expert" else config, tokens_per_device=(batch // shards) * seq_len,
      seq_len=seq_len, mode=mode, tensor=mesh.shape["tensor"])
  out["total"] = sum(out[k] for k in ("params", "frozen", "grads", "optimizer", "assembled",
                                      "activations"))
  return out


def compiled_memory(config: ModelConfig, mode: str, mesh: jax.sharding.Mesh, *, batch: int,
                    seq_len: int) -> dict[str, int]:
  """XLA's memory_analysis() of the real train step (or forward pass, for inference) compiled
  for `mesh` from abstract inputs: bytes per device. Compiling a 7B step needs the real chips;
  on CPU use it with tiny configs."""
  trainable, frozen, axes, frozen_axes, step_config = training_trees(config, mode)
  shardings = sharding.tree_shardings(trainable, axes, mesh)
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  params = jax.tree.map(with_sharding, trainable, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding)
  if mode == "inference":
    from flexolmo_jax.model import Transformer  # pylint: disable=g-import-not-at-top
    fn = jax.jit(lambda p, t: Transformer(config).apply({"params": p}, t))
    compiled = fn.lower(params, tokens).compile()
  else:
    tcfg = TrainConfig(mode="public", data=DataConfig(batch_size=batch, seq_len=seq_len),
                       model=step_config)
    if mode == "expert":
      tcfg = dataclasses.replace(tcfg, mode="expert", model=None,
                                 expert=dataclasses.replace(tcfg.expert, name="plan",
                                                            public="abstract"))
    part = partition.BY_MODE[mode]
    tx, schedule = objective.make_optimizer(tcfg, trainable, part.fixed)
    opt_abstract = jax.eval_shape(tx.init, trainable)
    opt = jax.tree.map(with_sharding, opt_abstract,
                       opt_state_shardings(tx, opt_abstract, shardings, mesh))
    state = {"params": params, "opt_state": opt, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    frozen_in = None
    if frozen is not None:
      frozen_in = jax.tree.map(with_sharding, frozen,
                               sharding.tree_shardings(frozen, frozen_axes, mesh))
    host = {k: tokens for k in ("tokens", "targets", "segment_ids", "positions")}
    host["loss_mask"] = jax.ShapeDtypeStruct((batch, seq_len), jnp.float32, sharding=batch_sharding)
    step = objective.make_train_step(tcfg, step_config, part, tx, schedule)
    compiled = jax.jit(step, donate_argnums=0).lower(state, frozen_in, host).compile()
  stats = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes")
  out = {f: int(getattr(stats, f)) for f in fields}
  out["peak"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                 - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


# ----------------------------------------------------------------------------- output


def _gb(x: float) -> str:
  return f"{x / GB:.2f}"


def markdown(rows: Sequence[dict]) -> str:
  """The plan as a markdown table (GB per device), then each MoE's expert-vs-full optimizer."""
  head = ("| model | mode | mesh | devices | HBM/device | mesh (data,fsdp,expert,tensor) | batch x "
          "seq | params | frozen | grads | optimizer | assembled | activations | total | fits |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    shape = ",".join(str(r["mesh_shape"][a]) for a in sharding.MESH_AXES)
    fits = "yes" if r["total"] <= r["hbm_gb"] * GB else "NO"
    lines.append(f"| {r['model']} | {r['mode']} | {r['mesh']} | {r['devices']} | "
                 f"{r['hbm_gb']:.0f} | {shape} | {r['batch']}x{r['seq_len']} | "
                 + " | ".join(_gb(r[k]) for k in ("params", "frozen", "grads", "optimizer",
                                                  "assembled", "activations", "total"))
                 + f" | {fits} |")
  lines += ["", *ratio_lines(rows)]
  return "\n".join(lines) + "\n"


def ratio_lines(rows: Sequence[dict]) -> list[str]:
  """Expert-mode optimizer state against full fine-tuning of the whole E-expert model."""
  out, seen = [], set()
  for r in rows:
    if r["mode"] != "expert" or r["model"] in seen:
      continue
    seen.add(r["model"])
    full = r["full_finetune_optimizer_total"]
    out.append(f"- {r['model']}: expert-mode optimizer state {_gb(r['optimizer_total'])} GB in "
               f"all (2 x the trainable expert's {_gb(r['trainable_params_total'])} GB) vs "
               f"{_gb(full)} GB for full fine-tuning of the {r['full_finetune_experts']}-expert "
               f"model: 1/{full / r['optimizer_total']:.1f}.")
  return out


def plan_config(path: str, mesh: str, *, mesh_shape: Mapping[str, int] | None = None
                ) -> dict[str, Any]:
  """One row of the plan of the training config file at `path` on the named `mesh`."""
  module = _config_module(path)
  tc = train_config(_without_workdir(module.get_config()))
  if tc.mode == "expert":
    manifest = pathlib.Path(tc.expert.public) / "manifest.json"
    model = (ModelConfig.from_dict(json.loads(manifest.read_text())["config"])
             if manifest.exists() else PRESETS[module.PUBLIC_PRESET]())
    model = model.replace(**{k: v for k, v in tc.model_overrides.items() if k != "remat"})
    remat = tc.model_overrides.get("remat", model.remat)
  else:
    model, remat = tc.model, tc.model.remat
  row = plan(model, mesh, tc.mode, batch=tc.data.batch_size // tc.grad_accum,
             seq_len=tc.data.seq_len, mesh_shape=mesh_shape, remat=remat)
  return {**row, "model": pathlib.Path(path).stem}


def _config_module(path: str):
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  if spec is None or not pathlib.Path(path).exists():
    raise ValueError(f"no config file {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _without_workdir(cd):
  raw = cd.to_dict()
  raw.pop("workdir", None)
  return raw


# ----------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("model", None, f"Preset ({', '.join(PRESETS)}); default: the 7B models.")
  flags.DEFINE_string("mesh", None, f"Named mesh ({', '.join(MESHES)}); default: "
                      f"{', '.join(DEFAULT_MESHES)}.")
  flags.DEFINE_string("mode", None, f"One of {MODES}; default: every mode that applies.")
  flags.DEFINE_integer("batch", None, "Global batch (sequences); default one per batch shard.")
  flags.DEFINE_integer("seq_len", 4096, "Sequence length.")
  flags.DEFINE_string("mesh_shape", None, "AXIS=SIZE,... over data,fsdp,expert,tensor "
                      "(default: FSDP, plus an expert axis that divides the expert count).")
  flags.DEFINE_enum("remat", "full", ["none", "full", "dots"], "Rematerialisation policy.")
  flags.DEFINE_enum("attention_impl", "xla", list(ATTENTION_IMPLS),
                    "Attention (attention.py): xla keeps the [L, L] probabilities per layer; any "
                    "other is a kernel that does not.")
  flags.DEFINE_bool("json", False, "Print JSON instead of markdown.")
  flags.DEFINE_string("config", None, "A training config file (configs/*.py): plan its run.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.default_verbosity()
  models = [FLAGS.model] if FLAGS.model else list(DEFAULT_MODELS)
  meshes = [FLAGS.mesh] if FLAGS.mesh else list(DEFAULT_MESHES)
  shape = parse_mesh_shape(FLAGS.mesh_shape) if FLAGS.mesh_shape else None
  rows = []
  if FLAGS.config:
    module_meshes = getattr(_config_module(FLAGS.config), "PLAN_MESHES", DEFAULT_MESHES)
    rows = [plan_config(FLAGS.config, mesh, mesh_shape=shape)
            for mesh in ([FLAGS.mesh] if FLAGS.mesh else module_meshes)]
    models = []
  for model in models:
    modes = [FLAGS.mode] if FLAGS.mode else list(DEFAULT_MODELS.get(model, MODES))
    for mesh in meshes:
      rows += [plan(model, mesh, mode, batch=FLAGS.batch, seq_len=FLAGS.seq_len,
                    mesh_shape=shape, remat=FLAGS.remat,
                    attention_impl=FLAGS.attention_impl) for mode in modes]
  print(json.dumps(rows, indent=1) if FLAGS.json else markdown(rows))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
