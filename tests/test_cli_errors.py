"""Every command line refuses bad input the same way: exit status 2, ONE `error:` line on stderr
naming the problem (and the fix), no traceback, and nothing written. Each case is refused before
JAX compiles anything; a few run by default, the rest (about 6 s each, mostly imports) are slow."""

import os
import pathlib
import subprocess
import sys

import pytest

from flexolmo_jax import atomic, cli

REPO = pathlib.Path(__file__).resolve().parents[1]
NAME_RULE = "must match [A-Za-z0-9_-]+"
CORPUS_MISSING = "is not a prepared corpus"
NO_MODEL = "no model at"

# (id, module and arguments with {tmp} for the test's directory, what the error line must say).
# {tmp}/none does not exist; {tmp}/empty is an empty directory, {tmp}/empty.jsonl an empty file.
CASES = [
    ("train_config_key", ["flexolmo_jax.train", "--config=configs/math_expert.py",
                          "--config.optim.lr_peek=1", "--workdir={tmp}/run"], "did you mean lr?"),
    ("merge_name", ["flexolmo_jax.merge", "--public={tmp}/none", "--experts=../x={tmp}/none",
                    "--out={tmp}/merged"], NAME_RULE),
    ("data_owner_missing_dir", ["flexolmo_jax.data", "prepare", "--out={tmp}/corpus",
                                "--owner=mine={tmp}/none"], "does not exist"),
    ("train_name", ["flexolmo_jax.train", "--config=configs/math_expert.py",
                    "--config.expert.name=../x", "--workdir={tmp}/run"], NAME_RULE),
    ("train_dp_router_from_owner_data", ["flexolmo_jax.train", "--config=configs/math_expert.py",
                                         "--config.dp.enabled=true", "--workdir={tmp}/run"],
     "router_source='public', or 'proxies'"),
    ("train_missing_config", ["flexolmo_jax.train", "--config={tmp}/none.py",
                              "--workdir={tmp}/run"], "No such file"),
    ("train_missing_corpus", ["flexolmo_jax.train", "--config=configs/math_expert.py",
                              "--config.data.path={tmp}/none", "--workdir={tmp}/run"],
     CORPUS_MISSING),
    ("solo_expert_config_key", ["flexolmo_jax.solo_expert", "--config=configs/math_expert.py",
                                "--config.loss.zloss=1", "--workdir={tmp}/run"], "did you mean"),
    ("router_tuning_name", ["flexolmo_jax.router_tuning", "select", "--data={tmp}/none",
                            "--domain=/abs", "--out={tmp}/proxies.json"], NAME_RULE),
    ("router_tuning_usage", ["flexolmo_jax.router_tuning", "frob"], "select|tune"),
    ("merge_missing_model", ["flexolmo_jax.merge", "--public={tmp}/none",
                             "--experts=math={tmp}/none", "--out={tmp}/merged"], NO_MODEL),
    ("merge_empty_name", ["flexolmo_jax.merge", "--public={tmp}/none",
                          "--experts==x", "--out={tmp}/merged"], "is not name=DIR"),
    ("convert_missing_dir", ["flexolmo_jax.convert", "--from_hf={tmp}/none",
                             "--out={tmp}/artifact"], "no config.json"),
    ("evaluate_missing_model", ["flexolmo_jax.evaluate", "--model={tmp}/none",
                                "--out={tmp}/results"], NO_MODEL),
    ("reproduce_unknown_flag", ["flexolmo_jax.reproduce", "--workdri={tmp}/repro"],
     "Unknown command line flag 'workdri'"),
    ("privacy_missing_corpus", ["flexolmo_jax.privacy", "--data={tmp}/none", "--domain=math",
                                "--public={tmp}/none", "--expert={tmp}/none",
                                "--out={tmp}/study"], CORPUS_MISSING),
    ("embed_missing_corpus", ["flexolmo_jax.embed", "--data={tmp}/none", "--domain=math",
                              "--embedder=minilm", "--public={tmp}/none",
                              "--out={tmp}/rows.npz"], CORPUS_MISSING),
    ("data_owner_name", ["flexolmo_jax.data", "prepare", "--out={tmp}/corpus",
                         "--owner=../x={tmp}/empty"], NAME_RULE),
    ("data_owner_empty", ["flexolmo_jax.data", "prepare", "--out={tmp}/corpus",
                          "--owner=mine={tmp}/empty"], "holds no .txt or .jsonl files"),
    ("serve_missing_flag", ["flexolmo_jax.serve", "--model={tmp}/none"], "--policies is required"),
    ("sweep_missing_corpus", ["launch.sweep", "--models=a={tmp}/none", "--data={tmp}/none",
                              "--workdir={tmp}/sweep"], CORPUS_MISSING),
    ("launch_gpu_usage", ["launch.gpu", "--workdir={tmp}/run"], "--config and --workdir"),
    ("memory_plan_model", ["flexolmo_jax.memory_plan", "--model=nonesuch"],
     "unknown model 'nonesuch'"),
    ("eval_tasks_empty", ["flexolmo_jax.eval_tasks", "--format=arc", "--input={tmp}/empty.jsonl",
                          "--out={tmp}/tasks.jsonl"], "holds no arc items"),
]
FAST = ("train_config_key", "merge_name", "data_owner_missing_dir")


def _params():
  for name, argv, says in CASES:
    marks = () if name in FAST else (pytest.mark.slow,)
    yield pytest.param(argv, says, id=name, marks=marks)


@pytest.mark.parametrize("argv,says", _params())
def test_bad_input_is_one_error_line_exit_2_and_writes_nothing(argv, says, tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty.jsonl").write_text("")
  before = sorted(tmp_path.rglob("*"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-m", *(a.format(tmp=tmp_path) for a in argv)],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert done.returncode == 2, done.stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
  assert says in lines[0]
  assert "Traceback" not in done.stderr + done.stdout
  assert sorted(tmp_path.rglob("*")) == before  # Nothing written, not even an empty directory.


@pytest.mark.parametrize("name", ["", "../x", "/abs", "a/b", ".", "..", "a b", "math\n", None])
def test_names_that_are_not_plain_file_names_are_refused_naming_the_rule(name):
  with pytest.raises(ValueError, match=r"must match \[A-Za-z0-9_-\]\+"):
    cli.check_name(name, "domain")


def test_plain_names_pass():
  for name in ("math", "Math_2", "news-2024", "_"):
    assert cli.check_name(name, "domain") == name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "results.json"
  atomic.write_text(path, "old\n")
  with pytest.raises(RuntimeError):
    with atomic.replacing(path) as f:
      f.write("half of the new")
      raise RuntimeError("killed mid-write")
  assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
  atomic.write_text(path, "new\n")
  assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
