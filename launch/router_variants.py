r"""The router study behind the README's "Why plain FlexOlmo loses here": on a finished small
reproduction, (1) each expert's mean router logit on every domain's test text, and (2) math and
news experts retrained with other router rows / initial bias, merged with the public model and
scored per domain.

  python -m launch.router_variants --workdir=runs      # after bash launch/small_demo.sh

Variant experts go to WORKDIR/router_variants/<variant>/<domain> (reused when finished); the
default variant is the reproduction's own experts.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
from absl import app, flags

from flexolmo_jax import cli, merge, runs, scoring
from flexolmo_jax.model import Transformer

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs", "A finished reproduction (launch/small_demo.sh); variant "
                    "experts are trained under it, and reused when finished.")
flags.DEFINE_alias("runs", "workdir")  # The name the README used before the --workdir rule.
flags.DEFINE_integer("steps", 40, "Expert steps (the reproduction's default).")
flags.DEFINE_integer("eval_batches", 2, "Test batches (8 x 128 tokens) per domain.")

EXPERTS = ("math", "news")
DOMAINS = ("public", "math", "news", "creative", "code")
LOGIT_DOMAINS = ("public", "math", "news")


def _train(root: pathlib.Path, workdir: pathlib.Path, domain: str, *overrides: str) -> None:
  if (workdir / runs.MANIFEST).exists():
    return
  subprocess.run([sys.executable, "-m", "flexolmo_jax.train",
                  f"--config=configs/{domain}_expert.py", f"--workdir={workdir}",
                  f"--config.data.path={root / 'data'}", f"--config.expert.public={root / 'public'}",
                  f"--config.steps={FLAGS.steps}", f"--config.eval_every={FLAGS.steps}",
                  f"--config.checkpoint_every={FLAGS.steps}", *overrides], check=True)


def variants(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """{label: directory holding one expert run per domain of EXPERTS}, trained when missing."""
  out = {"mean hidden state, bias -0.5 (default)": root / "experts"}
  embeddings = root / "router_variants" / "minilm.npz"
  embeddings.parent.mkdir(parents=True, exist_ok=True)
  for domain in () if embeddings.exists() else ("public",) + EXPERTS:  # An off-the-shelf embedder.
    subprocess.run([sys.executable, "-m", "flexolmo_jax.embed", f"--data={root / 'data'}",
                    f"--domain={domain}", "--embedder=minilm", f"--public={root / 'public'}",
                    f"--out={embeddings}", "--num_docs=300"], check=True)
  for label, name, overrides in (
      ("all-MiniLM-L6-v2 rows, bias -0.5", "minilm",
       [f"--config.expert.router_embeddings={embeddings}"]),
      ("mean hidden state, bias -2.0", "bias2", ["--config.expert.bias_init=-2.0"])):
    for domain in EXPERTS:
      _train(root, root / "router_variants" / name / domain, domain, *overrides)
    out[label] = root / "router_variants" / name
  return out


def mean_router_logits(config, params, batch) -> np.ndarray:
  """[layers, experts]: r_e . h averaged over the batch's tokens (bias not included)."""
  _, state = Transformer(config).apply({"params": params}, batch["tokens"],
                                       mutable=["intermediates"])
  (h_LxBxTxD,) = state["intermediates"]["layers"]["ffn_input"]
  router_LxExD = np.asarray(params["layers"]["mlp"]["router"])
  return np.einsum("lbtd,led->lbte", np.asarray(h_LxBxTxD), router_LxExD).mean(axis=(1, 2))


def main(argv) -> None:
  del argv
  cli.default_verbosity()
  root = pathlib.Path(FLAGS.workdir)
  batches = {d: list(scoring.domain_batches(str(root / "data"), d, "test", batch_size=8,
                                            seq_len=128, max_batches=FLAGS.eval_batches))
             for d in DOMAINS}
  config, params, names = merge.assemble(
      root / "public", {d: str(root / "experts" / d) for d in
                        ("news", "creative", "code", "academic", "educational", "math")}, top_k=4)
  print("Mean router logit per expert over one test batch (columns: " + ", ".join(names) + ")")
  for d in LOGIT_DOMAINS:
    for layer, row in enumerate(mean_router_logits(config, params, batches[d][0])):
      print(f"  {d:8s} layer {layer} " + " ".join(f"{v:6.2f}" for v in row))

  rows = {}
  pub_config, pub_params, _ = runs.load_params(root / "public")
  rows["public model alone"] = (pub_config, pub_params)
  for label, directory in variants(root).items():
    rows[label] = merge.assemble(root / "public", {d: str(directory / d) for d in EXPERTS},
                                 top_k=2)[:2]
  print("\n| router rows, bias | " + " | ".join(DOMAINS) + " | avg |")
  print("|---" * (len(DOMAINS) + 2) + "|")
  for label, (c, p) in rows.items():
    ppl = [scoring.perplexity(c, p, batches[d])["perplexity"] for d in DOMAINS]
    print(f"| {label} | " + " | ".join(f"{v:.1f}" for v in ppl) + f" | {np.mean(ppl):.1f} |")


if __name__ == "__main__":
  app.run(main)
