"""Evaluation tasks: one JSONL format, converters from public benchmark files, and multiple-choice
tasks built offline from a corpus's held-out documents.

The task format: one JSON object per line, either a multiple-choice item
  {"id": "arc/Mercury_7175875", "context": "Question: ...\\nAnswer:", "choices": [" a", " b"],
   "gold": 1}
scored by the log-likelihood of each choice after the prompt, or a generation item
  {"id": "gsm8k/3", "context": "Question: ...\\nAnswer:", "answer": "18",
   "stop": ["\\n\\n", "Question:"], "match": "number"}
scored by greedy decoding until a stop string and comparing with `answer` ("exact": the stripped
text; "number": the last number in the text). Optional on both kinds:
  "preamble": text put before everything else (e.g. "The following are questions about ...\\n\\n")
  "fewshot": [{"context": ..., "target": ...}, ...] solved examples, rendered as
             context + target + "\\n\\n" each, between the preamble and the item's context.
The prompt is therefore preamble + shots + context; choices and targets carry their own leading
space, as in lm-evaluation-harness.

Convert a public benchmark file with
  python -m flexolmo_jax.eval_tasks --format=arc --input=ARC-Challenge-Test.jsonl --out=arc.jsonl \
      [--fewshot_input=ARC-Challenge-Train.jsonl --num_fewshot=5]
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import random
import re
import sys
from typing import Any, Callable, Mapping, Sequence

from absl import flags

from flexolmo_jax import atomic, cli
from flexolmo_jax.data import corpus
from flexolmo_jax.data.sources import DataError

MATCH_MODES = ("exact", "number")
_ITEM_KEYS = {"id", "context", "choices", "gold", "answer", "stop", "match", "preamble", "fewshot"}


@dataclasses.dataclass(frozen=True)
class Shot:
  """A solved example shown before the item."""
  context: str
  target: str


@dataclasses.dataclass(frozen=True)
class Item:
  """One task item: multiple choice (choices + gold) or generation (answer)."""
  id: str
  context: str
  choices: tuple[str, ...] = ()
  gold: int | None = None
  answer: str | None = None
  stop: tuple[str, ...] = ("\n\n",)
  match: str = "exact"
  preamble: str = ""
  fewshot: tuple[Shot, ...] = ()

  @property
  def is_multiple_choice(self) -> bool:
    return bool(self.choices)

  @property
  def prompt(self) -> str:
    """The text the model conditions on: preamble, solved examples, then the context."""
    shots = "".join(f"{s.context}{s.target}\n\n" for s in self.fewshot)
    return self.preamble + shots + self.context

  def to_json(self) -> dict[str, Any]:
    """The item as one JSONL object (fields at their defaults left out)."""
    out: dict[str, Any] = {"id": self.id, "context": self.context}
    if self.is_multiple_choice:
      out.update(choices=list(self.choices), gold=self.gold)
    else:
      out.update(answer=self.answer, stop=list(self.stop), match=self.match)
    if self.preamble:
      out["preamble"] = self.preamble
    if self.fewshot:
      out["fewshot"] = [dataclasses.asdict(s) for s in self.fewshot]
    return out


def parse_item(obj: Any, default_id: str) -> Item:
  """An Item from one decoded JSONL object; ValueError says what is wrong with it."""
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  unknown = sorted(set(obj) - _ITEM_KEYS)
  if unknown:
    raise ValueError(f"unknown field(s) {unknown}; valid fields: {sorted(_ITEM_KEYS)}")
  if not isinstance(obj.get("context"), str):
    raise ValueError('"context" must be a string')
  has_choices, has_answer = "choices" in obj, "answer" in obj
  if has_choices == has_answer:
    raise ValueError('give either "choices" + "gold" (multiple choice) or "answer" (generation)')
  fields: dict[str, Any] = {"id": str(obj.get("id", default_id)), "context": obj["context"]}
  if has_choices:
    choices = obj["choices"]
    if not (isinstance(choices, list) and len(choices) >= 2
            and all(isinstance(c, str) and c for c in choices)):
      raise ValueError('"choices" must be a list of at least 2 non-empty strings')
    gold = obj.get("gold")
    if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)):
      raise ValueError(f'"gold" must be an integer index into the {len(choices)} choices, got {gold!r}')
    fields.update(choices=tuple(choices), gold=gold)
  else:
    if not isinstance(obj["answer"], str):
      raise ValueError('"answer" must be a string')
    stop = obj.get("stop", ["\n\n"])
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
      raise ValueError('"stop" must be a list of non-empty strings')
    match = obj.get("match", "exact")
    if match not in MATCH_MODES:
      raise ValueError(f'"match" must be one of {MATCH_MODES}, got {match!r}')
    fields.update(answer=obj["answer"], stop=tuple(stop), match=match)
  if not isinstance(obj.get("preamble", ""), str):
    raise ValueError('"preamble" must be a string')
  fields["preamble"] = obj.get("preamble", "")
  shots = obj.get("fewshot", [])
  if not (isinstance(shots, list) and all(
      isinstance(s, dict) and set(s) == {"context", "target"}
      and all(isinstance(v, str) for v in s.values()) for s in shots)):
    raise ValueError('"fewshot" must be a list of {"context": str, "target": str} objects')
  fields["fewshot"] = tuple(Shot(s["context"], s["target"]) for s in shots)
  return Item(**fields)


def load_jsonl(path: str) -> list[Item]:
  """The items of a task file; errors name the file and the line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"task file {path} does not exist")
  name = os.path.splitext(os.path.basename(path))[0]
  items = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        items.append(parse_item(json.loads(line), f"{name}/{len(items)}"))
      except (json.JSONDecodeError, ValueError) as err:
        raise DataError(f"{path}:{number}: {err}") from err
  if not items:
    raise DataError(f"{path} holds no task items")
  return items


def write_jsonl(items: Sequence[Item], path: str) -> None:
  """Writes items in the task format."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic.replacing(path, encoding="utf-8") as f:
    for item in items:
      f.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- converters


def _read_json_lines(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"input file {path} does not exist")
  rows = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as err:
          raise DataError(f"{path}:{number}: not JSON: {err}") from err
  return rows


def _field(row: Mapping, key: str, path: str, index: int):
  if key not in row:
    raise DataError(f"{path}: record {index + 1} has no {key!r} field (has {sorted(row)})")
  return row[key]


def _shots(convert_one: Callable[[Any, int], Item], rows: Sequence, k: int) -> tuple[Shot, ...]:
  """The first k rows of a few-shot file as solved examples."""
  shots = []
  for i, row in enumerate(rows[:k]):
    item = convert_one(row, i)
    target = item.choices[item.gold] if item.is_multiple_choice else item.answer
    shots.append(Shot(item.context, target))
  return tuple(shots)


def _with_shots(items: list[Item], shots: tuple[Shot, ...]) -> list[Item]:
  return [dataclasses.replace(item, fewshot=shots) for item in items]


def _mmlu_csv_rows(path: str) -> list[list[str]]:
  with open(path, encoding="utf-8", newline="") as f:
    rows = [r for r in csv.reader(f) if r]
  for i, row in enumerate(rows):
    if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
      raise DataError(f"{path}: row {i + 1} is not `question,A,B,C,D,answer-letter` (got "
                      f"{len(row)} columns)")
  return rows


def _mmlu_subject(path: str) -> str:
  return re.sub(r"_(test|dev|val)$", "", os.path.splitext(os.path.basename(path))[0])


def _mmlu_item(row: Sequence[str], index: int, subject: str, style: str) -> Item:
  question, options, letter = row[0].strip(), [o.strip() for o in row[1:5]], row[5].strip()
  if style == "mc":
    listed = "".join(f"\n {'ABCD'[j]}. {o}" for j, o in enumerate(options))
    context, choices = f"Question: {question}{listed}\nAnswer:", [f" {c}" for c in "ABCD"]
  else:
    context, choices = f"Question: {question}\nAnswer:", [f" {o}" for o in options]
  return Item(id=f"mmlu/{subject}/{index}", context=context, choices=tuple(choices),
              gold="ABCD".index(letter),
              preamble=f"The following are multiple choice questions about "
                       f"{subject.replace('_', ' ')}.\n\n")


def _csv_files(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.csv")))
    if not files:
      raise DataError(f"{path} holds no .csv files")
    return files
  if not os.path.isfile(path):
    raise FileNotFoundError(f"input {path} does not exist")
  return [path]


def from_mmlu(path: str, *, fewshot_path: str | None = None, num_fewshot: int = 0,
              style: str = "rc") -> list[Item]:
  """MMLU from the original CSVs (`question,A,B,C,D,answer-letter`, no header): one file or a
  directory of `<subject>_test.csv`. Few-shot examples come from the matching `<subject>_dev.csv`
  in `fewshot_path` (a file or directory). style "rc" scores the answer texts (cloze, suits small
  models), "mc" the letters A-D after a listing of the options (OLMES's two formats)."""
  if style not in ("rc", "mc"):
    raise ValueError(f"style must be 'rc' or 'mc', got {style!r}")
  dev = {_mmlu_subject(f): f for f in _csv_files(fewshot_path)} if fewshot_path else {}
  items = []
  for path_ in _csv_files(path):
    subject = _mmlu_subject(path_)
    subject_items = [_mmlu_item(r, i, subject, style) for i, r in enumerate(_mmlu_csv_rows(path_))]
    if num_fewshot:
      if subject not in dev:
        raise DataError(f"no few-shot file for MMLU subject {subject!r} in {fewshot_path}")
      shots = _shots(lambda r, i: _mmlu_item(r, i, subject, style), _mmlu_csv_rows(dev[subject]),
                     num_fewshot)
      subject_items = _with_shots(subject_items, shots)
    items += subject_items
  return items


def _arc_item(row: Mapping, index: int, path: str = "ARC") -> Item:
  question = _field(row, "question", path, index)
  if isinstance(question, dict):  # allenai release: {"stem", "choices": [{"text", "label"}]}
    stem = question["stem"]
    texts = [c["text"] for c in question["choices"]]
    labels = [c["label"] for c in question["choices"]]
  else:  # Hugging Face export: "choices": {"text": [...], "label": [...]}
    stem, choices = question, _field(row, "choices", path, index)
    texts, labels = choices["text"], choices["label"]
  key = str(_field(row, "answerKey", path, index))
  if key not in labels:
    raise DataError(f"{path}: record {index + 1}: answerKey {key!r} is not among labels {labels}")
  return Item(id=f"arc/{row.get('id', index)}", context=f"Question: {stem}\nAnswer:",
              choices=tuple(f" {t}" for t in texts), gold=labels.index(key))


def from_arc(path: str, *, fewshot_path: str | None = None, num_fewshot: int = 0) -> list[Item]:
  """ARC (Easy or Challenge) from the allenai JSONL release or a Hugging Face JSONL export."""
  items = [_arc_item(r, i, path) for i, r in enumerate(_read_json_lines(path))]
  if num_fewshot:
    items = _with_shots(items, _shots(_arc_item, _read_json_lines(fewshot_path), num_fewshot))
  return items


def _hellaswag_clean(text: str) -> str:
  # As lm-evaluation-harness: WikiHow markup out, double spaces collapsed.
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def _hellaswag_item(row: Mapping, index: int, path: str = "HellaSwag") -> Item:
  ctx_b = row.get("ctx_b", "")
  ctx = _field(row, "ctx_a", path, index) + " " + (ctx_b[:1].upper() + ctx_b[1:])
  label = _field(row, "label", path, index)
  endings = _field(row, "endings", path, index)
  return Item(id=f"hellaswag/{row.get('ind', index)}",
              context=_hellaswag_clean(f"{row.get('activity_label', '')}: {ctx}"),
              choices=tuple(" " + _hellaswag_clean(e) for e in endings), gold=int(label))


def from_hellaswag(path: str, *, fewshot_path: str | None = None,
                   num_fewshot: int = 0) -> list[Item]:
  """HellaSwag from the original JSONL (ctx_a, ctx_b, activity_label, endings, label); the test
  split has no labels and is refused."""
  items = [_hellaswag_item(r, i, path) for i, r in enumerate(_read_json_lines(path))]
  if num_fewshot:
    items = _with_shots(items, _shots(_hellaswag_item, _read_json_lines(fewshot_path), num_fewshot))
  return items


def _gsm8k_item(row: Mapping, index: int, path: str = "GSM8K") -> tuple[Item, str]:
  """The generation item of one GSM8K record, and its worked solution as a few-shot target."""
  solution = str(_field(row, "answer", path, index))
  if "####" not in solution:
    raise DataError(f"{path}: record {index + 1}: answer has no '#### <number>' line")
  reasoning, final = solution.rsplit("####", 1)
  final = final.strip().replace(",", "")
  question = _field(row, "question", path, index)
  item = Item(id=f"gsm8k/{index}", context=f"Question: {question}\nAnswer:", answer=final,
              stop=("\n\n", "Question:"), match="number")
  # The target ends in a sentence whose last number is the answer, which is what is extracted.
  return item, f" {reasoning.strip()} The answer is {final}."


def from_gsm8k(path: str, *, fewshot_path: str | None = None, num_fewshot: int = 0) -> list[Item]:
  """GSM8K from its JSONL ({"question", "answer" ending in '#### N'}): generation items scored
  by the last number of the model's answer; few-shot targets are the worked solutions."""
  items = [_gsm8k_item(r, i, path)[0] for i, r in enumerate(_read_json_lines(path))]
  if num_fewshot:
    shots = []
    for i, row in enumerate(_read_json_lines(fewshot_path)[:num_fewshot]):
      item, target = _gsm8k_item(row, i, fewshot_path)
      shots.append(Shot(item.context, target))
    items = _with_shots(items, tuple(shots))
  return items


CONVERTERS: dict[str, Callable[..., list[Item]]] = {
    "mmlu": from_mmlu, "arc": from_arc, "hellaswag": from_hellaswag, "gsm8k": from_gsm8k,
}


# ----------------------------------------------------------------------------- domain tasks


def _window(text: str, start: int, context_chars: int, continuation_chars: int,
            min_context: int) -> tuple[str, str] | None:
  """A context of up to `context_chars` from `start` ending before a whitespace, and the
  continuation after it, cut at a word boundary: (context, continuation) or None."""
  context_end = min(start + context_chars, len(text) - continuation_chars)
  cut = max(text.rfind(" ", start, context_end), text.rfind("\n", start, context_end))
  if cut - start < min_context:
    return None
  tail = text[cut:cut + continuation_chars]
  last_space = max(tail.rfind(" "), tail.rfind("\n"))
  continuation = tail[:last_space] if last_space > 0 else tail
  if len(continuation.strip()) < 2:
    return None
  return text[start:cut], continuation


def domain_mc_items(docs: Sequence[str], name: str, *, num_items: int = 200, num_choices: int = 4,
                    context_chars: int = 192, continuation_chars: int = 48,
                    windows_per_doc: int = 4, seed: int = 0) -> list[Item]:
  """Multiple-choice items from held-out documents: a passage's true continuation among
  continuations of other passages (from other documents when there are enough).

  Every document gives up to `windows_per_doc` consecutive (context, continuation) windows, cut
  at word boundaries; continuations have about the same length, so neither the raw nor the
  per-character score can win on length alone.
  """
  windows = []  # (document index, context, continuation)
  min_context = min(32, context_chars // 2)
  for d, text in enumerate(docs):
    start, taken = 0, 0
    while taken < windows_per_doc and start + min_context + continuation_chars <= len(text):
      window = _window(text, start, context_chars, continuation_chars, min_context)
      if window is None:
        break
      windows.append((d,) + window)
      taken += 1
      # The next window starts at the word after this continuation.
      start += len(window[0]) + len(window[1]) + 1
  if len(windows) < num_choices:
    raise DataError(f"{name}: only {len(windows)} passages in {len(docs)} documents, fewer than "
                    f"the {num_choices} choices an item needs; use a larger held-out split")
  rng = random.Random(f"{name}/{seed}")
  items = []
  for i in rng.sample(range(len(windows)), len(windows)):
    doc, context, truth = windows[i]
    other_docs = [j for j, w in enumerate(windows) if w[0] != doc and w[2] != truth]
    pool = other_docs if len(other_docs) >= num_choices - 1 else [
        j for j, w in enumerate(windows) if j != i and w[2] != truth]
    if len(pool) < num_choices - 1:
      continue
    choices = [truth] + [windows[j][2] for j in rng.sample(pool, num_choices - 1)]
    if len(set(choices)) < num_choices:
      continue
    rng.shuffle(choices)
    items.append(Item(id=f"{name}/{len(items)}", context=context, choices=tuple(choices),
                      gold=choices.index(truth)))
    if len(items) == num_items:
      break
  if not items:
    raise DataError(f"{name}: no passage has {num_choices - 1} distinct distractors; use a larger "
                    "held-out split")
  return items


def domain_mc_task(root: str, domain: str, split: str = "test", **options) -> list[Item]:
  """`domain_mc_items` over one domain's held-out split of a prepared corpus."""
  manifest = corpus.load_manifest(root)
  if domain not in manifest["domains"]:
    raise DataError(f"domain {domain!r} is not in the corpus at {root}; it has "
                    f"{sorted(manifest['domains'])}")
  docs = [row["text"] for row in corpus.read_text_split(root, domain, split)]
  return domain_mc_items(docs, f"mc_{domain}", **options)


# ----------------------------------------------------------------------------- command line


def _flag_values() -> flags.FlagValues:
  """This command's flags, in their own FlagValues, so main() can be called with a list of
  arguments (by tests, or other programs) whatever flags the caller has defined."""
  fv = flags.FlagValues()
  flags.DEFINE_enum("format", None, sorted(CONVERTERS), "The benchmark's format.", flag_values=fv)
  flags.DEFINE_string("input", None, "The benchmark file (MMLU: file or directory).",
                      flag_values=fv)
  flags.DEFINE_string("out", None, "The task JSONL to write.", flag_values=fv)
  flags.DEFINE_string("fewshot_input", None, "File (MMLU: dev file or directory) of solved "
                      "examples.", flag_values=fv)
  flags.DEFINE_integer("num_fewshot", 0, "Solved examples put before each item.", flag_values=fv)
  flags.DEFINE_enum("style", "rc", ["rc", "mc"], "MMLU only: answer texts (rc) or letters (mc).",
                    flag_values=fv)
  flags.mark_flags_as_required(["format", "input", "out"], flag_values=fv)
  return fv


def main(argv: Sequence[str]) -> int:
  """Converts a public benchmark file into the task format; `argv` holds the arguments after the
  program name. Returns 0; bad input ends the program (cli.fail: one line, exit status 2)."""
  f = _flag_values()
  try:
    f(["eval_tasks", *argv])
    if f.num_fewshot and not f.fewshot_input:
      raise flags.ValidationError("--num_fewshot needs --fewshot_input")
  except flags.Error as err:
    cli.fail(f"{err} (see --help)")
  options = dict(fewshot_path=f.fewshot_input, num_fewshot=f.num_fewshot)
  if f.format == "mmlu":
    options["style"] = f.style
  try:
    items = CONVERTERS[f.format](f.input, **options)
    if not items:
      raise DataError(f"{f.input} holds no {f.format} items; check --input and --format")
  except (*cli.INPUT_ERRORS, TypeError) as err:
    cli.fail(err)
  write_jsonl(items, f.out)
  print(f"wrote {len(items)} items to {f.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
