r"""A data owner's expert against OLMo-2 7B (the paper's 7B setting; docs/method.md, section 3).

  python -m flexolmo_jax.convert --from_hf=OLMo-2-1124-7B --out=runs/olmo2_7b   # or Flex-public-7B
  python -m flexolmo_jax.data prepare --tokenizer=runs/olmo2_7b --owner=math=MY_DIR --out=runs/data_7b
  python -m flexolmo_jax.train --config=configs/olmo2_7b_expert.py --workdir=runs/experts/math_7b
  python -m flexolmo_jax.memory_plan --config=configs/olmo2_7b_expert.py   # v4-32, v5p-8, 8xH100

The public model is the converted checkpoint at expert.public; its tokenizer (dolma2) is the one
the corpus must be prepared with (train refuses another). Recipe of docs/method.md, section 3.5:
AdamW (0.9, 0.95), weight decay 0, clip 1.0, peak LR 9e-4 after 2000 warmup steps, cosine decay to
0.1x, output z-loss 1e-5, router z-loss 1e-3, no load balancing, sequence length 4096, 50B tokens.
The batch (1024 x 4096 = 4M tokens, OLMo-2 7B's) is our choice: the method names none. It runs as
64 accumulated microbatches of 16 sequences, which is what the memory plan sizes.

Precision (docs/precision.md): bfloat16 compute; the trained expert and its AdamW moments in
float32 (master_dtype); the frozen public model as converted (float32). frozen_dtype=bfloat16
would halve its 29.2 GB (sharded over the devices), which the plan does not need.
The public model may be read from gs://; the corpus and workdir must be local or mounted:
array_record, the run lock and appended metrics need a file system (flexolmo_jax/paths.py).
"""

from flexolmo_jax.train_config import default_config

# The preset of the public model's architecture, for the memory plan before the checkpoint exists.
PUBLIC_PRESET = "olmo2_7b"
PLAN_MESHES = ("v4-32", "v5p-8", "8xH100")
_TOKENS = 50_000_000_000


def get_config():
  c = default_config()
  c.mode = "expert"
  c.workdir = "runs/experts/math_7b"
  c.expert.update(dict(name="math", public="runs/olmo2_7b", router_embeddings="",
                       embed_batches=8, bias=True, bias_init=-0.5, top_k=2))
  # bfloat16 compute from float32 master weights; full rematerialisation at length 4096;
  # the attention kernel of the platform (splash on TPU, cuDNN on GPU).
  c.model_overrides.update(dict(dtype="bfloat16", remat="full", moe_backend="dense",
                                attention_impl="auto"))
  c.master_dtype = "float32"
  c.frozen_dtype = ""
  c.data.path = "runs/data_7b"
  c.data.seq_len = 4096
  c.data.batch_size = 1024
  c.grad_accum = 64
  c.optim.update(dict(lr=9e-4, warmup_steps=2000, min_lr_ratio=0.1, b1=0.9, b2=0.95,
                      weight_decay=0.0, clip_norm=1.0))
  c.loss.update(dict(z_loss=1e-5, router_z_loss=1e-3, load_balancing=0.0))
  c.steps = _TOKENS // (c.data.batch_size * c.data.seq_len)
  c.mesh.update({"data": 1, "fsdp": -1})
  c.log_every = 10
  c.eval_every = 1000
  c.checkpoint_every = 1000
  return c
