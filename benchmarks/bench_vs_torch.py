"""flexolmo_jax vs transformers' FlexOlmoForCausalLM: the same model, weights and batch.

  python -m benchmarks.bench_vs_torch --sizes=d256,100m --shapes=8x256 [--passes=forward,train
      --impls=torch_eager,torch_sdpa,torch_compile,jax_ynnpack --steps=3 --nomemory]

The grid is every size (tiny 1.2M, d256 7M, 25m, 100m) at every batch x seq shape (2x128, 8x256,
4x1024), both passes, against torch eager, sdpa and sdpa + torch.compile; the flags select a
subset (the whole grid takes hours on a shared 2-core CPU). Each row gives the speed-up of
flexolmo_jax over it, and each shape's summary line flexolmo_jax over the best PyTorch row.

Model: a FlexOlmo with 2 experts (public + new), top-2 of 2, no expert bias (transformers has
none): the expert-training shape. Our parameters are written with `convert.save_hf` and loaded
by `FlexOlmoForCausalLM.from_pretrained`, and the logits are checked to agree (1e-3) first.

Rows, per case (size @ batch x seq):
  forward   ours: jitted `Transformer.apply`; torch: `model(tokens)` under inference_mode with
            attn_implementation "eager" and "sdpa", and "sdpa" + torch.compile.
  train     ours: `objective.make_train_step` in expert mode (only expert 1's FFN, router row 1
            trained; AdamW, global-norm clip 1.0, plain cross entropy). torch: the same
            subset. transformers 5 fuses the experts into `experts.gate_up_proj [E, 2I, H]`
            and `down_proj [E, H, I]`, so expert 1 cannot be a separate leaf: the fused tensors
            and the router weight are trained and gradient hooks zero expert 0's slices and
            router row 0 (AdamW with zero gradient and no decay leaves them unchanged). torch
            therefore also computes expert 0's weight gradients; we do not.
  jax ynnpack (--impls=...,jax_ynnpack): ours compiled without flexolmo_jax.xla_options (XLA's
            default YNNPACK GEMMs on CPU), to show what that option gives (the same
            compilation where the shape is below the option's threshold, xla_options.for_gemms);
            the speed-up over the best PyTorch row counts torch rows only.
torch.compile's warm-up runs under a SIGALRM timeout (--compile_timeout); the alarm only acts
when control returns to Python, so a compile can overrun it; the note gives the real time
(inductor's on-disk cache makes repeat runs compile faster).
Timing: every runner is warmed up (compiled), then the timed steps are interleaved across
runners in this one process; tokens/s is from the median step time.
Memory: each runner is rebuilt in a fresh subprocess. CPU: peak resident set size sampled every
ms by a thread during the steps, minus the resident size just before them (= the step's working
memory above the resident weights; compilation excluded). GPU: peak device bytes in use (JAX
memory_stats / torch.cuda.max_memory_allocated), weights included. Ours also shows the compiled
step's own accounting (`memory_analysis()`: arguments + outputs + temporaries - aliases).
MFU: model FLOPs / step time / peak, where the peak is jnp's best timed 2048^3 float32 matmul
(the faster of: with flexolmo_jax.xla_options' oneDNN GEMMs, without) at the start of this
run (on a shared machine the load can change between that and the steps:
compare the load printed at the start and the end). Model FLOPs with N = matmul parameters (embedding lookup
excluded, lm_head and both experts included, as top-2 of 2 runs both), T tokens, A = attention
score + value FLOPs (4 B L^2 H Dh per layer, the full square): forward 2NT + A; expert
training 4NT + 2 N_trainable T + 3A (frozen weights get no weight gradient).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from flexolmo_jax import convert, experts, model
from flexolmo_jax import objective, partition, xla_options
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.train_config import train_config

_SIZES = flags.DEFINE_list("sizes", ["tiny", "d256", "25m", "100m"], "Model sizes (SIZES).")
_SHAPES = flags.DEFINE_list("shapes", ["2x128", "8x256", "4x1024"], "batch x seq shapes.")
_PASSES = flags.DEFINE_list("passes", ["forward", "train"], "forward and/or train.")
_IMPLS = flags.DEFINE_list("impls", ["torch_eager", "torch_sdpa", "torch_compile"],
                           "Rows besides flexolmo_jax's: torch_eager, torch_sdpa, torch_compile "
                           "(sdpa), jax_ynnpack (ours without xla_options' oneDNN GEMMs).")
_STEPS = flags.DEFINE_integer("steps", 0, "Timed steps per runner (0: the size's default).")
_ATTENTION = flags.DEFINE_string("attention_impl", "chunked",
                                 "flexolmo_jax attention_impl (chunked: what the rows in "
                                 "docs/performance.md ran; auto would pick xla up to one block).")
_SCAN = flags.DEFINE_bool("scan_layers", False,
                          "flexolmo_jax scan_layers (False unrolls the layers: faster on CPU).")
_COMPILE_TIMEOUT = flags.DEFINE_integer("compile_timeout", 240, "Seconds allowed per torch.compile.")
_MEMORY = flags.DEFINE_bool("memory", True, "Measure peak memory in a fresh subprocess per runner.")
_MEMORY_COMPILE = flags.DEFINE_bool("memory_compile", False,
                                    "Also measure torch.compile memory (compiles again).")
_WORKER = flags.DEFINE_string("_mem_worker", "", "Internal: case,kind,impl to measure memory of.")

SIZES = {
    # name: (model dims, default timed steps)
    "tiny": (dict(vocab_size=8192, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=192),
             10),
    # The shape of issue 17's measurement.
    "d256": (dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=8,
                  ffn_hidden=688), 5),
    "25m": (dict(vocab_size=8192, d_model=512, n_layers=4, n_heads=8, n_kv_heads=8,
                 ffn_hidden=1376), 3),
    "100m": (dict(vocab_size=8192, d_model=768, n_layers=8, n_heads=12, n_kv_heads=12,
                  ffn_hidden=2048), 3),
}
IMPLS = ("jax", "jax ynnpack", "torch eager", "torch sdpa", "torch sdpa+compile")
# "jax ynnpack": flexolmo_jax compiled without xla_options (FLEXOLMO_CPU_GEMMS=xla), to measure
# what the oneDNN GEMM option gives; not a PyTorch row.
_IMPL_FLAGS = {"jax ynnpack": "jax_ynnpack", "torch eager": "torch_eager",
               "torch sdpa": "torch_sdpa", "torch sdpa+compile": "torch_compile"}


def _shape(case):
  """A case is "size@BATCHxSEQ": (model dims, batch, seq, timed steps)."""
  size, shape = case.split("@")
  dims, steps = SIZES[size]
  batch, seq = (int(n) for n in shape.split("x"))
  return dims, batch, seq, _STEPS.value or steps


def _configs(case):
  dims, batch, seq, _ = _shape(case)
  public_cfg = ModelConfig(**dims, rope_theta=10_000.0, moe_backend="dense",
                           attention_impl=_ATTENTION.value, scan_layers=_SCAN.value)
  moe_cfg = experts.moe_config(public_cfg, 1, top_k=2, with_bias=False)
  tcfg = train_config(dict(
      mode="expert", data=dict(path="unused", seq_len=seq, batch_size=batch),
      expert=dict(name="new", public="unused", bias=False, top_k=2),
      optim=dict(warmup_steps=1, lr=1e-4), loss=dict(z_loss=0.0, router_z_loss=0.0,
                                                       load_balancing=0.0), steps=100))
  return public_cfg, moe_cfg, tcfg


def _params(public_cfg):
  """Public params, router rows and an expert perturbed away from the public FFN."""
  public = model.init_params(public_cfg, jax.random.key(0))
  keys = iter(jax.random.split(jax.random.key(1), 8))
  L, D = public_cfg.n_layers, public_cfg.d_model
  r_pub = 0.02 * jax.random.normal(next(keys), (L, D))
  expert = experts.upcycle_expert(public, 0.02 * jax.random.normal(next(keys), (L, D)))
  expert = {k: v + 0.01 * jax.random.normal(next(keys), v.shape) for k, v in expert.items()}
  return public, r_pub, expert


def _batch(vocab, batch, seq):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch, seq), dtype=np.int32)
  targets = rng.integers(0, vocab, (batch, seq), dtype=np.int32)
  return tokens, targets


def _flops(moe_cfg, batch, seq):
  c = moe_cfg
  hd = c.resolved_head_dim
  attn_w = c.d_model * hd * (2 * c.n_heads + 2 * c.n_kv_heads)
  ffn_w = c.num_experts * 3 * c.d_model * c.ffn_hidden + c.num_experts * c.d_model
  n = c.n_layers * (attn_w + ffn_w) + c.d_model * c.vocab_size
  n_trainable = c.n_layers * (3 * c.d_model * c.ffn_hidden + c.d_model)
  tokens = batch * seq
  attn = 4 * batch * seq * seq * c.n_heads * hd * c.n_layers
  total = n + c.n_layers * 2 * c.d_model + c.d_model + c.d_model * c.vocab_size  # + norms, embed
  return {"forward": 2 * n * tokens + attn,
          "train": 4 * n * tokens + 2 * n_trainable * tokens + 3 * attn,
          "params": total, "matmul_params": n, "trainable": n_trainable}


# ------------------------------------------------------------------------------------ runners


def _jax_runners(size, kinds):
  public_cfg, moe_cfg, tcfg = _configs(size)
  _, batch, seq, _ = _shape(size)
  public, r_pub, expert = _params(public_cfg)
  full = experts.assemble_moe(public, r_pub, [expert], with_bias=False)
  tokens, targets = _batch(moe_cfg.vocab_size, batch, seq)
  gemm_options = xla_options.for_gemms(moe_cfg.d_model, batch * seq)  # As fit.py chooses.
  out = {}
  if "forward" in kinds:
    fwd = jax.jit(lambda p, t: model.Transformer(moe_cfg).apply({"params": p}, t),
                  compiler_options=gemm_options)
    tok = jnp.asarray(tokens)
    compiled = fwd.lower(full, tok).compile()
    out["forward"] = (lambda: jax.block_until_ready(fwd(full, tok)), _jax_mem(compiled))
  if "train" in kinds:
    tx, schedule = objective.make_optimizer(tcfg, expert)
    state = {"params": expert, "opt_state": tx.init(expert), "step": jnp.int32(0)}
    frozen = {"public": public, "public_router": r_pub}
    ones = jnp.ones((batch, seq), jnp.int32)
    b = {"tokens": jnp.asarray(tokens), "targets": jnp.asarray(targets), "segment_ids": ones,
         "loss_mask": ones.astype(jnp.float32),
         "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))}
    step = jax.jit(objective.make_train_step(tcfg, moe_cfg, partition.EXPERT, tx, schedule),
                   donate_argnums=0, compiler_options=gemm_options)
    compiled = step.lower(state, frozen, b).compile()
    box = [state]

    def run():
      box[0], metrics = compiled(box[0], frozen, b)
      jax.block_until_ready(metrics)
    out["train"] = (run, _jax_mem(compiled))
  return out, (moe_cfg, full, tokens)


def _ynnpack_runners(size, kinds):
  """_jax_runners compiled without xla_options' oneDNN GEMMs."""
  before = os.environ.get(xla_options.ENV)
  os.environ[xla_options.ENV] = "xla"
  try:
    return _jax_runners(size, kinds)
  finally:
    if before is None:
      del os.environ[xla_options.ENV]
    else:
      os.environ[xla_options.ENV] = before


def _jax_mem(compiled):
  try:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


class _Timeout(Exception):
  pass


def _with_timeout(fn, seconds):
  def handler(signum, frame):
    raise _Timeout(f"torch.compile took over {seconds}s")
  old = signal.signal(signal.SIGALRM, handler)
  signal.alarm(seconds)
  try:
    return fn()
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _torch_model(hf_dir, attn, device):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  m = transformers.FlexOlmoForCausalLM.from_pretrained(hf_dir, attn_implementation=attn,
                                                       dtype=torch.float32)
  return m.to(device)


def _torch_runners(size, impl, kinds, hf_dir, tokens, targets):
  """{kind: (step_fn, None)} for one torch implementation; warm-up (compile) included."""
  import torch  # pylint: disable=g-import-not-at-top
  _, _, tcfg = _configs(size)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  attn = "eager" if impl == "torch eager" else "sdpa"
  compiled = impl.endswith("compile")
  tok = torch.as_tensor(tokens, dtype=torch.long, device=device)
  tgt = torch.as_tensor(targets, dtype=torch.long, device=device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  out = {}
  if "forward" in kinds:
    m = _torch_model(hf_dir, attn, device).eval()
    call = torch.compile(m) if compiled else m

    def fwd():
      with torch.inference_mode():
        call(input_ids=tok).logits
      sync()
    out["forward"] = fwd
  if "train" in kinds:
    m = _torch_model(hf_dir, attn, device).train()
    params = []
    for name, p in m.named_parameters():
      train_it = ".mlp.experts." in name or name.endswith(".mlp.gate.weight")
      p.requires_grad_(train_it)
      if train_it:
        keep = torch.ones(p.shape[0], *([1] * (p.dim() - 1)), device=device)
        keep[0] = 0.0  # expert 0 / router row 0 stay frozen
        p.register_hook(lambda g, keep=keep: g * keep)
        params.append(p)
    o = tcfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=0.0)
    call = torch.compile(m) if compiled else m
    vocab = m.config.vocab_size

    def step():
      logits = call(input_ids=tok).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab).float(), tgt.reshape(-1))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, o.clip_norm)
      opt.step()
      opt.zero_grad(set_to_none=True)
      sync()
    out["train"] = step
  return out


# ------------------------------------------------------------------------------------ measuring


def _peak_matmul():
  import torch  # pylint: disable=g-import-not-at-top
  n = 2048
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  # "jax": with xla_options' GEMM option (oneDNN on CPU), "jax_default": without.
  mms = {"jax": jax.jit(lambda x, y: x @ y, compiler_options=xla_options.for_gemms(n, n)),
         "jax_default": jax.jit(lambda x, y: x @ y)}
  for mm in mms.values():
    jax.block_until_ready(mm(a, a))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  ta = torch.randn(n, n, device=device)
  best = {"jax": 1e9, "jax_default": 1e9, "torch": 1e9}
  for _ in range(5):
    for name, mm in mms.items():
      t = time.perf_counter()
      jax.block_until_ready(mm(a, a))
      best[name] = min(best[name], time.perf_counter() - t)
    t = time.perf_counter()
    torch.mm(ta, ta)
    if device == "cuda":
      torch.cuda.synchronize()
    best["torch"] = min(best["torch"], time.perf_counter() - t)
  flop = 2 * n**3
  return {k: flop / v for k, v in best.items()}


def _rss():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mem_worker(spec):
  """Runs in a fresh process: builds one runner, prints its peak step memory as JSON."""
  size, kind, impl = spec.split(",", 2)  # size: the case, size@BxS
  _, batch, seq, _ = _shape(size)
  public_cfg, moe_cfg, _ = _configs(size)
  tokens, targets = _batch(moe_cfg.vocab_size, batch, seq)
  on_gpu = jax.devices()[0].platform != "cpu"
  if impl.startswith("jax"):
    runners, _ = _ynnpack_runners(size, (kind,)) if impl == "jax ynnpack" else _jax_runners(
        size, (kind,))
    fn = runners[kind][0]
  else:
    import torch  # pylint: disable=g-import-not-at-top
    public, r_pub, expert = _params(public_cfg)
    full = experts.assemble_moe(public, r_pub, [expert], with_bias=False)
    with tempfile.TemporaryDirectory() as tmp:
      convert.save_hf(moe_cfg, full, os.path.join(tmp, "hf"))
      del public, expert, full
      fn = _torch_runners(size, impl, (kind,), os.path.join(tmp, "hf"), tokens, targets)[kind]
      if impl.endswith("compile"):
        _with_timeout(fn, _COMPILE_TIMEOUT.value)  # compile outside the measured window
  import gc  # pylint: disable=g-import-not-at-top
  gc.collect()
  if on_gpu:
    for _ in range(2):
      fn()
    if impl.startswith("jax"):
      peak = jax.devices()[0].memory_stats()["peak_bytes_in_use"]
    else:
      import torch  # pylint: disable=g-import-not-at-top
      peak = torch.cuda.max_memory_allocated()
    print(json.dumps({"peak": peak}))
    return
  base = _rss()
  peak = [base]
  done = threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _rss())
      time.sleep(0.001)
  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  for _ in range(2):
    fn()
  done.set()
  thread.join()
  peak[0] = max(peak[0], _rss())
  print(json.dumps({"peak": peak[0] - base,
                    "maxrss_delta": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                    - base}))


def _measure_memory(size, kind, impl):
  args = [sys.executable, "-m", "benchmarks.bench_vs_torch", f"--_mem_worker={size},{kind},{impl}",
          f"--attention_impl={_ATTENTION.value}", f"--scan_layers={_SCAN.value}",
          f"--compile_timeout={_COMPILE_TIMEOUT.value}"]
  try:
    res = subprocess.run(args, capture_output=True, text=True,
                         timeout=_COMPILE_TIMEOUT.value + 600, check=False)
  except subprocess.TimeoutExpired:
    return None
  for line in reversed(res.stdout.strip().splitlines()):
    if line.startswith("{"):
      return json.loads(line)["peak"]
  return None


def _check_logits(moe_cfg, full, tokens, hf_dir):
  import torch  # pylint: disable=g-import-not-at-top
  ours = np.asarray(model.Transformer(moe_cfg).apply({"params": full}, jnp.asarray(tokens)))
  hf = _torch_model(hf_dir, "eager", "cpu").eval()
  with torch.inference_mode():
    theirs = hf(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
  err = float(np.max(np.abs(ours - theirs)))
  assert err < 1e-3, f"logits differ by {err}"
  return err


def _bench_case(case, peak_flops):
  """Rows (case, pass, implementation, tokens/s, speed-up of ours over it, MFU, memory, note)
  and the case's one-line description."""
  dims, batch, seq, steps = _shape(case)
  kinds = tuple(_PASSES.value)
  impls = ("jax",) + tuple(i for i in IMPLS[1:] if _IMPL_FLAGS[i] in _IMPLS.value)
  jax_runners, (moe_cfg, full, tokens) = _jax_runners(case, kinds)
  _, targets = _batch(moe_cfg.vocab_size, batch, seq)
  runners = {("jax", k): fn for k, (fn, _) in jax_runners.items()}
  notes = {("jax", k): "" for k in kinds}
  flops = _flops(moe_cfg, batch, seq)
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, "hf")
    convert.save_hf(moe_cfg, full, hf_dir)
    err = _check_logits(moe_cfg, full, tokens, hf_dir)
    for impl in impls[1:]:
      if impl == "jax ynnpack":
        for k, (fn, _) in _ynnpack_runners(case, kinds)[0].items():
          runners[(impl, k)], notes[(impl, k)] = fn, f"{xla_options.ENV}=xla"
        continue
      try:
        built = _torch_runners(case, impl, kinds, hf_dir, tokens, targets)
      except Exception as e:  # pylint: disable=broad-except
        for k in kinds:
          notes[(impl, k)] = f"failed ({type(e).__name__}: {str(e)[:80]})"
        continue
      for k, fn in built.items():
        runners[(impl, k)] = fn
        notes[(impl, k)] = ""
  # Warm-up (compilation) for every runner, torch.compile under a timeout; a failure is a row.
  for key, fn in list(runners.items()):
    try:
      if key[0].endswith("compile"):
        t = time.perf_counter()
        _with_timeout(fn, _COMPILE_TIMEOUT.value)
        notes[key] = f"compile {time.perf_counter() - t:.0f}s"
      else:
        fn()
    except Exception as e:  # pylint: disable=broad-except
      del runners[key]
      notes[key] = f"failed ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
  times = {key: [] for key in runners}
  for _ in range(steps):
    for key, fn in runners.items():
      t = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - t)
  rows = []
  for kind in kinds:
    base = statistics.median(times[("jax", kind)]) if ("jax", kind) in times else None
    for impl in impls:
      key = (impl, kind)
      measure = _MEMORY.value and key in times and (_MEMORY_COMPILE.value or "compile" not in impl)
      mem = _measure_memory(case, kind, impl) if measure else None
      if key not in times:
        rows.append((case, kind, impl, None, None, None, mem, notes.get(key, "failed")))
        continue
      t = statistics.median(times[key])
      rows.append((case, kind, impl, batch * seq / t, t / base if base else None,
                   flops[kind] / t / peak_flops, mem, notes[key]))
    first = len(rows) - len(impls)  # ours: add the compiled step's own memory accounting
    note = f"memory_analysis {_fmt_mib(jax_runners[kind][1])} MiB (weights included)"
    rows[first] = rows[first][:-1] + ((rows[first][-1] + "; " if rows[first][-1] else "") + note,)
  info = (f"{case}: {flops['params'] / 1e6:.1f}M params ({flops['matmul_params'] / 1e6:.1f}M "
          f"in matmuls, {flops['trainable'] / 1e6:.1f}M trained), batch {batch} x seq {seq}, "
          f"{steps} timed steps, max |logits ours - HF eager| = {err:.1e}")
  return rows, info


def _best_torch(rows):
  """{(case, pass): (flexolmo_jax tokens/s) / (best PyTorch tokens/s)}."""
  out = {}
  for case, kind, impl, rate, *_ in rows:
    if not impl.startswith("torch") or rate is None:
      continue
    ours = next(r[3] for r in rows if r[:3] == (case, kind, "jax"))
    best = max(r[3] for r in rows if r[:2] == (case, kind) and r[2].startswith("torch") and r[3])
    out[(case, kind)] = None if ours is None else ours / best
  return out


def _fmt_mib(b):
  return "n/a" if b is None else f"{b / 2**20:,.1f}"


def main(argv):
  del argv
  if _WORKER.value:
    _mem_worker(_WORKER.value)
    return
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  platform = jax.devices()[0].platform
  load0 = os.getloadavg()
  peaks = _peak_matmul()
  # The target is a fraction of what jnp reaches on one big matmul, with or without oneDNN.
  peak = max(peaks["jax"], peaks["jax_default"])
  on_gpu = platform != "cpu"
  print(f"device: {platform} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs, load "
        f"average {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at the start; jax "
        f"{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}; flexolmo_jax attention_impl="
        f"{_ATTENTION.value}, scan_layers={_SCAN.value}, XLA_FLAGS="
        f"{os.environ.get('XLA_FLAGS', '')!r}")
  print(f"peak matmul (2048^3 f32): jnp {peaks['jax'] / 1e9:,.1f} GFLOP/s with xla_options' "
        f"GEMM option, {peaks['jax_default'] / 1e9:,.1f} without, torch "
        f"{peaks['torch'] / 1e9:,.1f} GFLOP/s; MFU against the faster jnp figure", flush=True)
  mem_how = ("peak device bytes in use (weights included), fresh process" if on_gpu else
             "peak RSS above the resident model during 2 steps, fresh process, sampled every ms")
  print(f"memory: {mem_how}. torch training: fused expert tensors trained with gradient hooks "
        "zeroing expert 0 and router row 0.\n")
  print("| case | pass | implementation | tokens/s | JAX speed-up over it (x) | MFU | peak memory "
        "(MiB) | notes |")
  print("|---|---|---|---|---|---|---|---|", flush=True)
  all_rows, infos = [], []
  for size in _SIZES.value:
    for shape in _SHAPES.value:
      rows, info = _bench_case(f"{size}@{shape}", peak)
      all_rows += rows
      infos.append(info)
      for case, kind, impl, rate, ratio, mfu, mem, note in rows:  # As each case finishes.
        cells = ["n/a" if rate is None else f"{rate:,.0f}",
                 "n/a" if ratio is None else f"{ratio:.2f}",
                 "n/a" if mfu is None else f"{100 * mfu:.1f}%", _fmt_mib(mem)]
        print(f"| {case} | {kind} | {impl} | {' | '.join(cells)} | {note} |", flush=True)
  print()
  for info in infos:
    print(info)
  for (case, kind), ratio in _best_torch(all_rows).items():
    print(f"{case} {kind}: flexolmo_jax / best PyTorch = "
          f"{'n/a' if ratio is None else f'{ratio:.2f}'}x")
  load = os.getloadavg()
  print(f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end")


if __name__ == "__main__":
  app.run(main)
