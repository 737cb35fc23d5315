"""
lmms-eval for LIVR: the command that makes lmms-eval score an export as evaluate.py does, and an
lmms-eval task for this project's JSONL records.

Two things make lmms-eval's numbers differ from ours, both silently:
  - its `qwen2_5_vl` model passes min_pixels=200704, max_pixels=1605632 to
    AutoProcessor.from_pretrained, which override the export's preprocessor_config.json: images
    are resized to other sizes (the demo: a 56-px image became 448 px, 841 image tokens instead
    of 97, and 18.8% accuracy instead of 98%). `command` reads the export's own limits and puts
    them in --model_args;
  - its built-in `blink` task words the prompt its own way (a "Note: You only need to respond
    with ..." pre-prompt) and scores its own way. `write_task` writes a task whose prompt is
    data.Sample.text (the record's verbatim `prompt`, else data.format_prompt) and whose scoring
    is scoring.score (evaluate.py's), per task and the mean over tasks as scoring.accuracy takes it.

lmms-eval imports a task's utils.py from the task directory, without this project on its path, so
the utils.py written here is standalone: it is generated from our functions' own source
(inspect.getsource), never a hand copy, so the two cannot drift apart.

    python evaluate.py --lmms-task runs/demo/lmms --data runs/demo/data/test.jsonl
    python lmms.py command runs/demo/hub --task-dir runs/demo/lmms     # prints the command
    python lmms.py compare OUTPUT/*/*_samples_livr.jsonl runs/demo/eval/results.json \
        --task-dir runs/demo/lmms                                      # lmms-eval's outputs vs ours
"""
import argparse
import inspect
import json
import os
import re
import shlex
import sys
import textwrap

import data
import images
import scoring

TASK = "livr"
# lmms-eval's model class per backbone (the name its --model takes)
LMMS_MODELS = {False: "qwen2_5_vl", True: "qwen3_vl"}


class TaskError(ValueError):
    """Bad input for the task writer: a one-line message naming the file or record (evaluate.py
    prints it and exits 2)."""


# ----------------------------------------------------------------------------------------------
# The command

def pixel_limits(export_dir):
    """(min_pixels, max_pixels) of the export's own image processor config, read as our
    processor reads it (data.ImageConfig: min/max_pixels, else size.shortest/longest_edge)."""
    c = data.ImageConfig.from_pretrained(export_dir)
    return c.min_pixels, c.max_pixels


def command(export_dir, task_dir=None, device="cpu", output="lmms-results", qwen3=None, shown=None):
    """The lmms-eval command line for an export: its pixel limits, the device arguments, our task
    (`task_dir` from write_task) or, without one, the tasks placeholder. `shown`: the path to print
    for the export (default export_dir)."""
    lo, hi = pixel_limits(export_dir)
    qwen3 = data.is_qwen3(export_dir) if qwen3 is None else qwen3
    model_args = f"pretrained={shown or export_dir},min_pixels={lo},max_pixels={hi}"
    model_args += ",device_map=cpu" if device == "cpu" else ",device_map=auto"
    tasks = ["--tasks", TASK, "--include_path", task_dir] if task_dir else ["--tasks", "TASK"]
    argv = ["python", "-m", "lmms_eval", "--model", LMMS_MODELS[qwen3], "--model_args", model_args,
            *tasks, "--batch_size", "1", "--device", "cpu" if device == "cpu" else "cuda",
            "--output_path", output, "--log_samples"]
    return " ".join(shlex.quote(a) for a in argv)


def card_section(export_dir, shown, qwen3=False):
    """The model card's "Evaluation harnesses" section: the exact lmms-eval command for this
    export (its pixel limits), how to score it with our task, and the traps."""
    lo, hi = pixel_limits(export_dir)
    cpu, gpu = (command(export_dir, "TASK_DIR", d, qwen3=qwen3, shown=shown) for d in ("cpu", "cuda"))
    kit = ("- **VLMEvalKit**: use its `Qwen3VLChat` class with `model_path` set to this directory."
           if qwen3 else
           "- **VLMEvalKit** loads a local path with its Qwen2-VL code path unless the path's name "
           "contains\n  \"2.5\", \"2_5\" or \"qwen25\": use its `Qwen2VLChat` class with `model_path` "
           "set to this directory,\n  named with the family in it (e.g. `LIVR-Qwen2.5-VL-3B`).")
    qwen3_note = ("\n  Not checked for Qwen3-VL: `qwen_vl_utils` first resizes with its own limits, not "
                  "this export's,\n  so images are resized twice; the `simple` implementation also adds "
                  "a system turn." if qwen3 else "")
    return f"""
## Evaluation harnesses

**lmms-eval** (0.7.3) gives the outputs this project's `evaluate.py` gives only with the pixel
limits of this export's own `preprocessor_config.json` (min_pixels={lo}, max_pixels={hi}) in
`--model_args`: its `{LMMS_MODELS[qwen3]}` model otherwise passes its own limits to the processor,
which override the file, so images are resized differently and the accuracy falls without a
word. Write the task for your JSONL records first (`TASK_DIR`; from the LIVR repository), then run:

```bash
python evaluate.py --lmms-task TASK_DIR --data test.jsonl      # writes TASK_DIR/{TASK}.yaml + utils.py
# on a CPU
{cpu}
# on a GPU
{gpu}
```

- The task's prompt is LIVR's (`data.format_prompt`, or the record's own `prompt`) and its scoring
  is `evaluate.py`'s: `mean_accuracy` is the mean over the records' tasks (not over samples),
  `acc_<task>` each task's accuracy, in %. Use it rather than lmms-eval's built-in `blink`
  task, which adds a "Note: You only need to respond with ..." pre-prompt: other wording, other
  numbers.
- dtype: lmms-eval runs the model in bf16; `evaluate.py` runs fp32 on a CPU and bf16 on a GPU
  (`--dtype bf16` compares like with like). bf16 can flip a near-tie between two tokens, so a
  few outputs may differ from an fp32 run.
- Images: lmms-eval 0.7.3 runs the `chat` implementation of `{LMMS_MODELS[qwen3]}`, which passes the
  images as they are (its `simple` one re-encodes each as a JPEG, quality 85: lossy).{qwen3_note}
- lmms-eval passes only one `eos_token_id` (the tokenizer's `<|im_end|>`), not the list in
  `generation_config.json`: where `evaluate.py` also stops at `<|endoftext|>`, lmms-eval decodes
  on to `max_new_tokens`, and what follows joins the answer.
- lmms-eval exits with status 0 even when a task fails to load or a sample raises: read its
  log and check that `OUTPUT/.../*_results.json` exists and names the task.
{kit}
"""


# ----------------------------------------------------------------------------------------------
# The task: docs, YAML and a standalone utils.py

# our functions that the task calls, in dependency order; their source goes into utils.py as is
SHARED = [data.answer_letters, data.format_prompt, data.normalize_answer, data.chance, images.ImageError,
          images.open_image, images._to_8bit, images._has_alpha, images.to_rgb, scoring._norm,
          scoring._parse_letter, scoring._parse_number, scoring.parse_answer, scoring.score, scoring.accuracy]
# the module-level values they read, written as Python literals
CONSTANTS = {"COUNT_RANGE": data.COUNT_RANGE, "NUMBER_WORDS": scoring.NUMBER_WORDS,
             "NUMBER": scoring.NUMBER}

UTILS_HEAD = '''"""lmms-eval task utilities for LIVR records, written by the LIVR repository's lmms.py.

Generated: every function below the header is the repository's own (data.py, images.py,
scoring.py), copied from its source, so prompt, images and scoring are evaluate.py's. Do not
edit: write it again."""
import re
import types
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

'''

UTILS_TAIL = '''

# the names our functions call them by (data.answer_letters, data.normalize_answer, ...)
data = types.SimpleNamespace(answer_letters=answer_letters, normalize_answer=normalize_answer,
                             COUNT_RANGE=COUNT_RANGE)


class Record:
    """A doc as the fields data.Sample's code reads."""
    def __init__(self, doc):
        self.question, self.prompt = doc["question"], doc.get("prompt")
        self.choices, self.answer = doc.get("choices") or None, doc.get("answer")
        self.task = doc.get("task") or ""

{text}

def doc_to_visual(doc):
    return [to_rgb(p) for p in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return Record(doc).text


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    record, output = Record(doc), results[0]
    item = {{"task": record.task or "all", "correct": score(output, record),
            "chance": chance(record), "error": None}}
    return {{name: item for name in METRICS}}


def mean_accuracy(items):
    return accuracy(items)["mean"]

'''


def utils_source(tasks):
    """The standalone utils.py for records of these task names."""
    parts = [UTILS_HEAD]
    parts += [f"{k} = {v!r}\n" for k, v in CONSTANTS.items()]
    for fn in SHARED:
        parts.append("\n\n" + textwrap.dedent(inspect.getsource(fn)))
    text = textwrap.indent(textwrap.dedent(inspect.getsource(data.Sample.text.fget)), "    ")
    parts.append(UTILS_TAIL.format(text=text))
    names = metric_names(tasks)
    for task, name in names.items():
        parts.append(f"\ndef {name}(items):\n    return accuracy(items)[\"accuracy\"].get({task!r}, 0.0)\n\n")
    parts.append(f"\nMETRICS = {['mean_accuracy', *names.values()]!r}\n")
    return "".join(parts)


def metric_names(tasks):
    """{task: 'acc_<task>'}, made identifiers (a metric is also a function of utils.py), unique."""
    names = {}
    for t in tasks:
        name = "acc_" + re.sub(r"\W", "_", t, flags=re.ASCII)
        while name in names.values():
            name += "_"
        names[t] = name
    return names


def task_yaml(docs_file, metrics, name=TASK, max_new_tokens=32):
    """The task's YAML: our docs file, greedy decoding, our prompt and scoring."""
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {json.dumps(os.path.abspath(docs_file))}", "test_split: test",
             "output_type: generate_until", "doc_to_visual: !function utils.doc_to_visual",
             "doc_to_text: !function utils.doc_to_text", "doc_to_target: !function utils.doc_to_target",
             "generation_kwargs:", f"  max_new_tokens: {max_new_tokens}", "  do_sample: false",
             "  temperature: 0", "  until: [\"<|im_end|>\"]",
             "process_results: !function utils.process_results", "metric_list:"]
    for m in metrics:
        lines += [f"  - metric: {m}", f"    aggregation: !function utils.{m}", "    higher_is_better: true"]
    return "\n".join(lines) + "\n"


def docs(path, image_root=None, limit=None):
    """Our records as lmms-eval docs (one JSON object each, every field present, image paths
    absolute). A record that evaluate.py would score wrong without asking the model (it does
    not parse, has no answer, an unreadable image...) is refused, named by file:line."""
    if not os.path.isfile(path):
        raise TaskError(f"{path}: no such dataset file")
    try:
        entries = data.read_records(path, image_root)[:limit]
    except (data.DataError, OSError) as e:
        raise TaskError(str(e).splitlines()[0]) from None
    out = []
    for where, s, err in entries:
        reasons = [err] if err else data.validate(s)
        if not reasons and data.IMAGE_PLACEHOLDER in s.text:
            reasons = [f"an {data.IMAGE_PLACEHOLDER} placeholder: lmms-eval puts every image before "
                       "the text, so the prompt would differ from ours"]
        if reasons:
            raise TaskError(f"{where}: {'; '.join(reasons)} (evaluate.py scores such a record wrong; "
                            "fix it or leave it out)")
        out.append({"id": s.id, "where": where, "task": s.task, "question": s.question,
                    "choices": s.choices or [], "prompt": s.prompt, "answer": s.answer,
                    "images": [os.path.abspath(p) for p in s.images]})
    if not out:
        raise TaskError(f"{path} holds no records")
    return out


def write_task(out_dir, data_file, image_root=None, name=TASK, max_new_tokens=32, limit=None):
    """OUT_DIR/{docs.jsonl, NAME.yaml, utils.py}: an lmms-eval task for `data_file`. Returns the
    YAML's path."""
    records = docs(data_file, image_root, limit)
    os.makedirs(out_dir, exist_ok=True)
    tasks = list(dict.fromkeys(r["task"] or "all" for r in records))
    files = {"docs.jsonl": "".join(json.dumps(r) + "\n" for r in records),
             "utils.py": utils_source(tasks),
             f"{name}.yaml": task_yaml(os.path.join(out_dir, "docs.jsonl"),
                                       ["mean_accuracy", *metric_names(tasks).values()], name,
                                       max_new_tokens)}
    for fname, text in files.items():
        with open(os.path.join(out_dir, fname + ".part"), "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(os.path.join(out_dir, fname + ".part"), os.path.join(out_dir, fname))
    return os.path.join(out_dir, f"{name}.yaml")


def write_task_cli(args):
    """`python evaluate.py --lmms-task DIR --data FILE [--checkpoint EXPORT]`: write the task and
    print how to run it (the exact command when --checkpoint is an export)."""
    path = write_task(args.lmms_task, args.data, args.image_root, max_new_tokens=args.max_new_tokens,
                      limit=args.limit)
    print(f"wrote the lmms-eval task {TASK!r}: {path} (+ utils.py, docs.jsonl)")
    exports = [p for p in (args.checkpoint or []) if os.path.isfile(os.path.join(p, "config.json"))]
    if exports:
        print(command(exports[-1], args.lmms_task))
    else:
        print(f"the command for an export OUT (python export.py CHECKPOINT OUT): "
              f"python lmms.py command OUT --task-dir {shlex.quote(args.lmms_task)}")
    return {"lmms_task": path}


# ----------------------------------------------------------------------------------------------
# Checking a run: lmms-eval's outputs next to evaluate.py's

def compare(samples_file, results_file, task_dir, checkpoint=None):
    """(identical, total, differing [(record id, lmms-eval's output, ours)]): lmms-eval's
    --log_samples outputs (OUTPUT/*/*_samples_livr.jsonl) against evaluate.py's results.json
    (its last checkpoint, or the one named) for the same data file. Both number the records in
    file order (lmms-eval's doc_id, evaluate.py's index); their ids must agree."""
    with open(os.path.join(task_dir, "docs.jsonl"), encoding="utf-8") as f:
        ids = [json.loads(line)["id"] for line in f]
    with open(results_file, encoding="utf-8") as f:
        entries = json.load(f)["checkpoints"]
    entry = next((e for e in entries if e["name"] == checkpoint), None) if checkpoint else entries[-1]
    if entry is None:
        raise TaskError(f"{results_file} has no checkpoint named {checkpoint!r}")
    ours = {s["index"]: s for s in entry["samples"]}
    same, differ = 0, []
    with open(samples_file, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            i, out = row["doc_id"], row["filtered_resps"]
            out = (out[0] if isinstance(out, list) else out).strip()
            if i not in ours or i >= len(ids) or ours[i]["id"] != ids[i]:
                raise TaskError(f"{samples_file}: record {i} is not record {i} of {results_file}: "
                                "were they run on the same data file?")
            if out == ours[i]["output"]:
                same += 1
            else:
                differ.append((ids[i], out, ours[i]["output"]))
    return same, same + len(differ), differ


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("command", help="print the lmms-eval command for an export")
    c.add_argument("export", help="an export.py directory")
    c.add_argument("--task-dir", help="a directory written by `evaluate.py --lmms-task`")
    c.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    c.add_argument("--output", default="lmms-results")
    k = sub.add_parser("compare", help="lmms-eval's per-sample outputs against evaluate.py's")
    k.add_argument("samples", help="lmms-eval's OUTPUT/*/*_samples_livr.jsonl (--log_samples)")
    k.add_argument("results", help="evaluate.py's results.json")
    k.add_argument("--task-dir", required=True, help="the task directory lmms-eval ran")
    k.add_argument("--checkpoint", help="the results.json entry's name (default: the last)")
    args = p.parse_args(argv)
    if args.cmd == "compare":
        same, total, differ = compare(args.samples, args.results, args.task_dir, args.checkpoint)
        for rid, theirs, ours in differ[:20]:
            print(f"{rid}: lmms-eval {theirs!r}, evaluate.py {ours!r}")
        print(f"{same} of {total} outputs identical")
        return 0 if same == total else 1
    if not os.path.isfile(os.path.join(args.export, "config.json")):
        print(f"error: {args.export} has no config.json: not an export", file=sys.stderr)
        return 2
    print(command(args.export, args.task_dir, args.device, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
