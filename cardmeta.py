"""
The exported model card's metadata: the YAML front matter the Hugging Face Hub reads, made with
huggingface_hub's own ModelCardData so that it is valid hub metadata.

    base_model      the base's hub id (when it came from the hub)
    license         license / license_name / license_link from the base's own README card
    tags, pipeline_tag, library_name
    model-index     the run's best validation accuracy (metrics.jsonl beside the checkpoint) and,
                    when the run has one for this very checkpoint, evaluate.py's test accuracy
                    per task and their mean (RUN_DIR/eval/results.json, evaluate.py's default
                    --out for the demo: `python evaluate.py --checkpoint RUN/stage2/final --out RUN/eval`)

export.model_card puts it at the top of README.md. The Hub's own validator needs the network
(ModelCard.validate); offline, tests/test_cardmeta.py parses the card back with huggingface_hub.
"""
import json
import math
import os

from huggingface_hub import EvalResult, ModelCardData
from huggingface_hub.repocard import metadata_load

TASK_TYPE = "image-text-to-text"
LICENSE_KEYS = ("license", "license_name", "license_link")


def base_license(base_dir):
    """{license, license_name, license_link} as the base's README.md front matter states them
    ({} when it has no card, no license, or a card that does not parse)."""
    path = os.path.join(base_dir, "README.md")
    if not os.path.isfile(path):
        return {}
    try:
        meta = metadata_load(path) or {}
    except Exception:              # a malformed base card must not stop the export
        return {}
    return {k: meta[k] for k in LICENSE_KEYS if isinstance(meta.get(k), str)}


def best_validation(checkpoint):
    """(accuracy in %, step, validation file or None) of the best metrics.jsonl row beside the
    checkpoint (train.py keeps the best-validation checkpoint as final); None without one."""
    stage_dir = os.path.dirname(os.path.normpath(checkpoint))
    rows = []
    try:
        with open(os.path.join(stage_dir, "metrics.jsonl"), encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("val_acc"), (int, float)) \
                        and math.isfinite(row["val_acc"]):
                    rows.append(row)
    except OSError:
        return None
    if not rows:
        return None
    best = max(rows, key=lambda r: r["val_acc"])
    val_file = None
    for name in ("best", "last"):        # `final` is a copy without the trainer's state
        try:
            with open(os.path.join(stage_dir, name, "trainer.json"), encoding="utf-8") as f:
                val_file = (json.load(f).get("args") or {}).get("val")
            val_file = val_file if isinstance(val_file, str) else None   # a record, not a setting
            break
        except (OSError, ValueError, AttributeError):
            continue
    return 100 * best["val_acc"], best.get("step"), val_file


def test_results(checkpoint):
    """evaluate.py's results for this checkpoint: (per-task accuracy %, mean, data file) from
    RUN_DIR/eval/results.json, only when an entry's path is this checkpoint, it was decoded as
    trained (causal mask, latents kept) and the file is newer than the checkpoint; else None."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    path = os.path.join(run_dir, "eval", "results.json")
    try:
        if os.path.getmtime(path) < os.path.getmtime(os.path.join(checkpoint, "livr.json")):
            return None                  # evaluated before this checkpoint was written
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        if results.get("mask") != "causal" or not results.get("latents"):
            return None
        for entry in results.get("checkpoints") or []:
            if os.path.realpath(str(entry.get("path"))) == os.path.realpath(checkpoint):
                return dict(entry["accuracy"]), float(entry["mean"]), str(results.get("data"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return None


def eval_results(checkpoint):
    """The model-index entries: validation accuracy, then test accuracy per task and the mean."""
    out = []
    val = best_validation(checkpoint)
    if val:
        acc, step, val_file = val
        name = os.path.basename(val_file) if val_file else "validation set"
        out.append(EvalResult(task_type=TASK_TYPE, dataset_type=_stem(name), dataset_name=name,
                              dataset_split="validation", metric_type="accuracy",
                              metric_name=f"validation accuracy (best, step {step})",
                              metric_value=round(acc, 2)))
    test = test_results(checkpoint)
    if test:
        per_task, mean, data_file = test
        name = os.path.basename(data_file)
        common = dict(task_type=TASK_TYPE, dataset_type=_stem(name), dataset_name=name,
                      dataset_split="test", metric_type="accuracy")
        out.append(EvalResult(**common, metric_name="mean accuracy over tasks", metric_value=round(mean, 2)))
        out += [EvalResult(**common, metric_name=f"accuracy ({task})", metric_value=round(v, 2))
                for task, v in per_task.items()]
    return out


def _stem(name):
    return os.path.splitext(name)[0] or name


def front_matter(meta, checkpoint, base_id, family_tag, model_name):
    """The card's YAML front matter, '---' lines included."""
    results = eval_results(checkpoint)
    card = ModelCardData(base_model=base_id, library_name="transformers", pipeline_tag=TASK_TYPE,
                         tags=["livr", family_tag, "latent-tokens"], model_name=model_name,
                         eval_results=results or None, **base_license(meta["base"]))
    return f"---\n{card.to_yaml()}\n---\n"
