"""Evaluation metrics on tiny models, against values computed by hand: log-likelihoods, OLMES
normalisations, multiple-choice accuracy, perplexity, greedy decoding, the HumanEval sandbox,
the task format and its converters, and the evaluate entry point."""

import functools
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flexolmo_jax import checkpoint, codegen, eval_tasks, evaluate, sandbox, scoring, subsets
from flexolmo_jax import config as config_lib
from flexolmo_jax import objective
from flexolmo_jax.train_config import LossConfig
from flexolmo_jax.data import DataConfig, DataError, load_tokenizer, make_pipeline
from flexolmo_jax.model import Transformer, init_params

REPO = pathlib.Path(__file__).resolve().parents[1]
DENSE = config_lib.tiny(vocab_size=512, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=48,
                        pad_token_id=0, eos_token_id=1)
MOE = DENSE.replace(num_experts=3, top_k=2, expert_bias=True, expert_bias_init=-0.1)


@pytest.fixture(scope="module")
def dense():
  return DENSE, init_params(DENSE, jax.random.key(0))


@pytest.fixture(scope="module")
def moe():
  return MOE, init_params(MOE, jax.random.key(1))


@pytest.fixture(scope="module")
def tok(corpus_dir):
  return load_tokenizer(corpus_dir)


PAD_TO = 64  # reference forwards run right-padded to one length: one compile per model


@functools.lru_cache(maxsize=None)
def _forward(config):
  return jax.jit(lambda params, tokens, mask: Transformer(config).apply(
      {"params": params}, tokens, expert_mask=mask))


def _reference_log_probs(config, params, ids, expert_mask=None):
  """log_softmax of the model's logits at each position of `ids` [len(ids), V]."""
  tokens = np.zeros((1, PAD_TO), np.int32)
  tokens[0, :len(ids)] = ids
  mask = None if expert_mask is None else np.asarray(expert_mask)[None]
  return _log_softmax(_forward(config)(params, tokens, mask)[0, :len(ids)])


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  return logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("which", ["dense", "moe_masked"])
def test_loglikelihood_is_sum_of_target_log_softmax(which, dense, moe, tok):
  config, params = dense if which == "dense" else moe
  mask = None if which == "dense" else np.array([True, False, True])
  scorer = scoring.Scorer(config, params, tok, batch_size=2, max_len=64, expert_mask=mask)
  requests = [("The capital of France is", " Paris"), ("Solve for x: 2x = 4. ", "x = 2"),
              ("", "Hello world"), ("A much longer context about cooking rice in water", " ok")]
  got = scorer.loglikelihood(requests)
  for (context, continuation), scored in zip(requests, got):
    ctx, cont = scorer.encode_pair(context, continuation)
    seq = np.array([ctx + cont], np.int32)
    logp = _reference_log_probs(config, params, seq[0], mask)
    positions = range(len(ctx) - 1, len(seq[0]) - 1)
    expected = sum(logp[p, seq[0, p + 1]] for p in positions)
    assert scored.logprob == pytest.approx(expected, abs=1e-4)
    assert scored.num_tokens == len(cont)
    assert scored.per_token == pytest.approx(expected / len(cont), abs=1e-4)
    assert scored.per_char == pytest.approx(expected / len(continuation), abs=1e-4)
    assert scored.greedy == all(np.argmax(logp[p]) == seq[0, p + 1] for p in positions)


def test_encode_pair_moves_trailing_space_and_uses_eos_for_empty_context(dense, tok):
  scorer = scoring.Scorer(*dense, tok)
  assert scorer.encode_pair("one two ", "three") == scorer.encode_pair("one two", " three")
  ctx, cont = scorer.encode_pair("", "three")
  assert ctx == [tok.eos_id] and cont == tok.encode("three")


def test_long_context_is_cut_from_the_left(dense, tok):
  scorer = scoring.Scorer(*dense, tok, batch_size=2, max_len=16)
  long_ctx = " ".join(["word"] * 60)
  (short,) = scorer.loglikelihood([(long_ctx, " end")])
  ctx, cont = scorer.encode_pair(long_ctx, " end")
  seq = np.array([(ctx + cont)[-17:]], np.int32)
  logp = _reference_log_probs(DENSE, dense[1], seq[0])
  expected = sum(logp[p, seq[0, p + 1]] for p in range(16 - len(cont), 16))
  assert short.logprob == pytest.approx(expected, abs=1e-4)


class _FixedScorer:
  """Returns preset scores, so accuracies can be worked out by hand."""

  def __init__(self, scores):
    self.scores = scores

  def loglikelihood(self, requests):
    assert len(requests) == len(self.scores)
    return [scoring.Scored(lp, n, c, False) for lp, n, c in self.scores]


def test_multiple_choice_accuracy_raw_per_token_per_char():
  items = [eval_tasks.Item("a", "Q1", (" x", " yyyyyyyyy"), gold=1),
           eval_tasks.Item("b", "Q2", (" p", " q", " r"), gold=0)]
  scores = [(-2.0, 1, 2), (-3.0, 3, 10),  # raw picks 0; per token (-2 vs -1) and per char 1
            (-1.0, 1, 2), (-4.0, 2, 2), (-0.5, 1, 2)]  # raw, per token, per char all pick 2
  result = evaluate.run_multiple_choice(_FixedScorer(scores), items)
  assert result == {"acc": 0.0, "acc_per_token": 0.5, "acc_per_char": 0.5, "items": 2,
                    "chance": pytest.approx((1 / 2 + 1 / 3) / 2)}


def test_multiple_choice_on_a_model_picks_its_own_argmax(dense, tok):
  scorer = scoring.Scorer(*dense, tok, batch_size=2, max_len=64)
  choices = (" red", " green", " blue")
  scored = scorer.loglikelihood([("My favourite colour is", c) for c in choices])
  best = int(np.argmax([s.logprob for s in scored]))
  items = [eval_tasks.Item("c", "My favourite colour is", choices, gold=best)]
  assert evaluate.run_multiple_choice(scorer, items)["acc"] == 1.0


def test_perplexity_is_exp_mean_nll_and_matches_training_loss(dense, corpus_dir):
  config, params = dense
  cfg = DataConfig(path=corpus_dir, domains=("math",), shuffle=False, seq_len=32, batch_size=4)
  batches = list(make_pipeline(cfg, "validation", num_epochs=1, drop_remainder=False,
                               shard_index=0, shard_count=1))
  # Each packed document separately, unpadded: the NLL of every token after the first.
  total, count = 0.0, 0
  for batch in batches:
    for row in range(batch["tokens"].shape[0]):
      for segment in set(batch["segment_ids"][row].tolist()) - {0}:
        where = batch["segment_ids"][row] == segment
        logp = _reference_log_probs(config, params, batch["tokens"][row][where])
        total -= float(np.sum(logp[np.arange(where.sum()), batch["targets"][row][where]]))
        count += int(where.sum())
  result = scoring.perplexity(config, params, batches)
  assert result["tokens"] == count
  assert result["nll"] == pytest.approx(total / count, abs=1e-5)
  assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
  no_aux = LossConfig(z_loss=0.0, router_z_loss=0.0, load_balancing=0.0)
  ce_fn = jax.jit(lambda b: objective.loss_terms(config, params, b, no_aux, 1.0)[1]["ce"])
  ce = sum(float(ce_fn(scoring.pad_rows(b, 4))) for b in batches)
  assert result["nll"] == pytest.approx(ce / count, abs=1e-5)  # what training reports as val loss


# ----------------------------------------------------------------------------- generation


def test_greedy_generate_matches_step_by_step_argmax(dense, tok):
  config, params = dense
  prompts = ["Problem: Add 1/2", "The"]
  got = codegen.greedy_generate(config, params, tok, prompts, max_new_tokens=6, batch_size=2,
                                max_len=64)
  for prompt, text in zip(prompts, got):
    ids = tok.encode(prompt)
    new = []
    for _ in range(6):
      nxt = int(np.argmax(_reference_log_probs(config, params, ids + new)[-1]))
      if nxt == tok.eos_id:
        break
      new.append(nxt)
    assert text == tok.decode(new)


def test_generation_stops_at_stop_string():
  assert codegen._cut_at_stop("abc\ndef f():", ("\ndef", "\nclass")) == ("abc", True)  # pylint: disable=protected-access
  assert codegen._cut_at_stop("abc", ("\ndef",)) == ("abc", False)  # pylint: disable=protected-access


@pytest.mark.parametrize("answer,text,match,ok", [
    ("18", " She sells 16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is 18.", "number", True),
    ("1,000", "so 1,000", "number", True), ("18", "The answer is 17.", "number", False),
    ("Paris", " Paris ", "exact", True), ("Paris", "paris", "exact", False),
])
def test_answer_matching(answer, text, match, ok):
  item = eval_tasks.Item("g", "Q", answer=answer, match=match)
  assert evaluate.answer_matches(item, text) is ok


# ----------------------------------------------------------------------------- sandbox


def test_sandbox_passes_correct_and_fails_wrong_code():
  problem = codegen.load_humaneval()[0]
  good = sandbox.run_sandboxed(codegen.humaneval_program(problem, problem["canonical_solution"]))
  assert good == {"passed": True, "result": "passed"}
  bad = sandbox.run_sandboxed(codegen.humaneval_program(problem, "    return False\n"))
  assert not bad["passed"] and "AssertionError" in bad["result"]


def test_sandbox_kills_an_infinite_loop_within_the_timeout():
  start = time.monotonic()
  result = sandbox.run_sandboxed("while True:\n  pass\n", timeout=1.0)
  assert time.monotonic() - start < 5.0
  assert result == {"passed": False, "result": "timed out after 1 s"}


def test_sandbox_has_no_network_and_limited_memory():
  net = sandbox.run_sandboxed("import socket\nsocket.create_connection(('127.0.0.1', 80))\n")
  assert not net["passed"] and "network" in net["result"]
  mem = sandbox.run_sandboxed("x = bytearray(2 << 30)\n", memory_mb=256)
  assert not mem["passed"] and "MemoryError" in mem["result"]


@pytest.mark.slow
def test_humaneval_reports_pass_rate_and_training_overlap(dense, tok, corpus_dir):
  problems = codegen.load_humaneval()[:2]
  result = codegen.evaluate_humaneval(*dense, tok, problems=problems, max_new_tokens=4,
                                      timeout=5.0, max_len=512, data_root=corpus_dir)
  assert result["problems"] == 2 and result["passed"] == 0 and result["pass@1"] == 0.0
  assert [s["task_id"] for s in result["samples"]] == ["HumanEval/0", "HumanEval/1"]
  assert all(not s["passed"] for s in result["samples"])
  assert result["sandbox"] == sandbox.isolation().describe()


# ----------------------------------------------------------------------------- task format


def test_jsonl_round_trip_and_prompt(tmp_path):
  items = [eval_tasks.Item("q1", "Question: 2+2?\nAnswer:", (" 3", " 4"), gold=1,
                           preamble="Math.\n\n", fewshot=(eval_tasks.Shot("Question: 1+1?\nAnswer:", " 2"),)),
           eval_tasks.Item("q2", "Question: 3+3?\nAnswer:", answer="6", stop=("\n",), match="number")]
  path = str(tmp_path / "t.jsonl")
  eval_tasks.write_jsonl(items, path)
  assert eval_tasks.load_jsonl(path) == items
  assert items[0].prompt == "Math.\n\nQuestion: 1+1?\nAnswer: 2\n\nQuestion: 2+2?\nAnswer:"


@pytest.mark.parametrize("line,message", [
    ('{"context": "c", "choices": ["a", "b"], "gold": 2}', "gold"),
    ('{"context": "c", "choices": ["a", "b"], "gold": 0, "answer": "a"}', "either"),
    ('{"context": "c", "choices": ["a"], "gold": 0}', "at least 2"),
    ('{"context": "c", "answer": "a", "colour": 1}', "unknown field"),
    ('{"context": "c", "answer": "a", "match": "fuzzy"}', "match"),
    ("not json", "Expecting value"),
])
def test_malformed_task_line_names_file_and_line(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"context": "ok", "answer": "x"}\n\n' + line + "\n")
  with pytest.raises(DataError, match=rf"bad.jsonl:3: .*{message}"):
    eval_tasks.load_jsonl(str(path))


def test_missing_task_file_and_unknown_task_name(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    eval_tasks.load_jsonl(str(tmp_path / "nope.jsonl"))
  with pytest.raises(ValueError, match=r"unknown task 'mc_cooking'; valid tasks: perplexity.*mc_math"):
    evaluate.parse_tasks("perplexity,mc_cooking", ["math", "news"])
  assert evaluate.parse_tasks("mc,humaneval,file:a.jsonl,arc:b.jsonl", ["math", "news"]) == [
      "mc_math", "mc_news", "humaneval", "file:a.jsonl", "arc:b.jsonl"]


def test_expert_mask_parsing():
  names = ["public", "math", "code"]
  assert subsets.expert_mask("public+code", names).tolist() == [True, False, True]
  with pytest.raises(ValueError, match=r"unknown expert\(s\) \['news'\]"):
    subsets.expert_mask("news", names)


def test_task_registry_refuses_unknown_names_with_every_known_one():
  with pytest.raises(ValueError) as err:
    evaluate.parse_tasks("perplexity,bogus", ["math"])
  message = str(err.value)
  assert message.startswith("unknown task 'bogus'; valid tasks: perplexity, mc, mc_math, ")
  for usage in ("humaneval", "routing", "file:PATH", "mmlu:PATH", "arc:PATH", "hellaswag:PATH",
                "gsm8k:PATH"):
    assert usage in message
  for bad in ("file", "perplexity:x.jsonl", "mc_news"):  # No path, a path, an absent domain.
    with pytest.raises(ValueError, match=f"unknown task '{bad}'"):
      evaluate.parse_tasks(bad, ["math"])


def test_a_registered_task_is_parsed_and_run(dense, tok, tmp_path, monkeypatch):
  seen = []
  task = evaluate.Task("tokens:PATH", False, lambda ctx, name: seen.append(name) or {"n": 7},
                       takes_path=True)
  monkeypatch.setitem(evaluate.TASKS, "tokens", task)
  tasks = evaluate.parse_tasks("tokens:a.txt", [])
  results = evaluate.evaluate(*dense, tok, tasks, out_dir=str(tmp_path))
  assert results == {"tokens:a.txt": {"n": 7}} and seen == ["tokens:a.txt"]


def test_converters(tmp_path):
  mmlu = tmp_path / "mmlu"
  (mmlu / "test").mkdir(parents=True)
  (mmlu / "dev").mkdir()
  (mmlu / "test" / "astronomy_test.csv").write_text('"What is the Sun?",A star,A planet,A moon,A comet,A\n')
  (mmlu / "dev" / "astronomy_dev.csv").write_text("Largest planet?,Mars,Jupiter,Venus,Earth,B\n")
  (item,) = eval_tasks.from_mmlu(str(mmlu / "test"), fewshot_path=str(mmlu / "dev"), num_fewshot=1)
  assert item.choices == (" A star", " A planet", " A moon", " A comet") and item.gold == 0
  assert item.prompt == ("The following are multiple choice questions about astronomy.\n\n"
                         "Question: Largest planet?\nAnswer: Jupiter\n\n"
                         "Question: What is the Sun?\nAnswer:")
  (letters,) = eval_tasks.from_mmlu(str(mmlu / "test" / "astronomy_test.csv"), style="mc")
  assert letters.choices == (" A", " B", " C", " D") and " B. A planet" in letters.context

  arc = tmp_path / "arc.jsonl"
  arc.write_text(json.dumps({"id": "m1", "question": {"stem": "Which is a gas?", "choices": [
      {"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}]}, "answerKey": "B"}) + "\n"
                 + json.dumps({"id": "m2", "question": "Which is hot?", "choices": {
                     "text": ["fire", "snow"], "label": ["1", "2"]}, "answerKey": "1"}) + "\n")
  a, b = eval_tasks.from_arc(str(arc))
  assert (a.context, a.choices, a.gold) == ("Question: Which is a gas?\nAnswer:", (" ice", " steam"), 1)
  assert (b.choices, b.gold) == ((" fire", " snow"), 0)

  hs = tmp_path / "hs.jsonl"
  hs.write_text(json.dumps({"activity_label": "Baking", "ctx_a": "A man mixes flour.",
                            "ctx_b": "he", "endings": ["bakes [title] bread.", "sings."],
                            "label": 0}) + "\n")
  (h,) = eval_tasks.from_hellaswag(str(hs))
  assert h.context == "Baking: A man mixes flour. He" and h.choices == (" bakes. bread.", " sings.")

  gsm = tmp_path / "gsm.jsonl"
  gsm.write_text(json.dumps({"question": "2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n"
                 + json.dumps({"question": "1000 + 1?", "answer": "#### 1,001"}) + "\n")
  first, second = eval_tasks.from_gsm8k(str(gsm), fewshot_path=str(gsm), num_fewshot=1)
  assert (second.answer, second.match, second.is_multiple_choice) == ("1001", "number", False)
  assert first.fewshot[0].target == " 2 + 3 = 5 The answer is 5."

  bad = tmp_path / "bad.csv"
  bad.write_text("q,a,b,c,d,E\n")
  with pytest.raises(DataError, match="row 1"):
    eval_tasks.from_mmlu(str(bad))


def test_convert_cli(tmp_path):
  arc = tmp_path / "arc.jsonl"
  arc.write_text(json.dumps({"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                             "answerKey": "B"}) + "\n")
  out = tmp_path / "out.jsonl"
  assert eval_tasks.main(["--format=arc", f"--input={arc}", f"--out={out}"]) == 0
  assert eval_tasks.load_jsonl(str(out))[0].gold == 1
  with pytest.raises(SystemExit) as refused:  # Bad input: cli.fail, exit status 2.
    eval_tasks.main(["--format=arc", f"--input={tmp_path / 'none.jsonl'}", f"--out={out}"])
  assert refused.value.code == 2


def test_domain_mc_items_hold_the_true_continuation():
  docs = [f"Document {d} begins here and then " + " ".join(f"w{d}_{i}" for i in range(80))
          for d in range(5)]
  items = eval_tasks.domain_mc_items(docs, "mc_toy", num_items=10, context_chars=60,
                                     continuation_chars=20)
  assert len(items) == 10 and items == eval_tasks.domain_mc_items(
      docs, "mc_toy", num_items=10, context_chars=60, continuation_chars=20)
  for item in items:
    truth = item.choices[item.gold]
    assert len(item.choices) == 4 and len(set(item.choices)) == 4
    assert any(item.context + truth in doc for doc in docs)
    assert truth.startswith(" ") and not truth.endswith(" ")
    doc_of = lambda text: text.split("_")[0].split("w")[-1]  # distractors come from other docs
    assert all(doc_of(c) != doc_of(truth) for j, c in enumerate(item.choices) if j != item.gold)
  with pytest.raises(DataError, match="fewer than the 4 choices"):
    eval_tasks.domain_mc_items(docs[:1], "mc_toy", windows_per_doc=2)


# ----------------------------------------------------------------------------- entry point


def test_evaluate_writes_results(moe, tok, corpus_dir, tmp_path):
  config, params = moe
  task_file = tmp_path / "tiny.jsonl"
  task_file.write_text(json.dumps({"context": "Problem: Add 1/2 + 1/2.", "choices": [" 1", " 2"],
                                   "gold": 0}) + "\n"
                       + json.dumps({"context": "Answer:", "answer": "1", "match": "number"}) + "\n")
  names = evaluate.expert_names(config)
  tasks = evaluate.parse_tasks(f"perplexity,mc_news,routing,file:{task_file}", ["math", "news"])
  results = evaluate.evaluate(config, params, tok, tasks, out_dir=str(tmp_path / "out"),
                              data_root=corpus_dir, domains=["math", "news"], names=names,
                              batch_size=4, max_len=128, seq_len=64, mc_items=5, max_new_tokens=3,
                              expert_mask=subsets.expert_mask("public+expert_2", names))
  assert set(results["perplexity"]) == {"math", "news", "average"}
  assert results["perplexity"]["math"]["perplexity"] > 1.0
  assert 0 < results["mc_news"]["items"] <= 5 and 0.0 <= results["mc_news"]["acc"] <= 1.0
  routing = json.loads(pathlib.Path(results["routing"]["json"]).read_text())
  assert np.allclose(np.asarray(routing["shares"]["math"])[:, 1], 0.0)  # expert_1 masked out
  assert results[f"file:{task_file}"]["items"] == 1 and "exact_match" in results[f"file:{task_file}"]
  report = {"model": "m", "split": "test", "experts": names, "allowed_experts": [], "tasks": results}
  paths = evaluate.write_results(report, str(tmp_path / "out"))
  assert "| perplexity/math | perplexity |" in pathlib.Path(paths["md"]).read_text()


@pytest.mark.slow
def test_cli_runs_on_a_saved_model_and_rejects_bad_tasks(dense, corpus_dir, tmp_path):
  model_dir = tmp_path / "model"
  checkpoint.save_params_artifact(model_dir, *dense, kind="public")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  base = [sys.executable, "-m", "flexolmo_jax.evaluate", f"--model={model_dir}",
          f"--data={corpus_dir}", f"--out={tmp_path / 'out'}", "--domains=news",
          "--seq_len=32", "--batch_size=2", "--max_len=64", "--mc_items=3"]
  bad = subprocess.run(base + ["--tasks=perplexity,mmul"], capture_output=True, text=True,
                       cwd=REPO, env=env)
  assert bad.returncode == 2 and "unknown task 'mmul'; valid tasks:" in bad.stderr
  ok = subprocess.run(base + ["--tasks=perplexity,mc"], capture_output=True, text=True, cwd=REPO,
                      env=env)
  assert ok.returncode == 0, ok.stderr
  report = json.loads((tmp_path / "out" / "results.json").read_text())
  assert set(report["tasks"]) == {"perplexity", "mc_news"}
  assert (tmp_path / "out" / "results.md").exists()
