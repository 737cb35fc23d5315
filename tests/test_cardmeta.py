"""cardmeta.py: the exported model card's front matter is valid hub metadata (huggingface_hub parses
it back into the same ModelCardData, model-index included), names the base model, copies the
licence from the base's own card, and reports the run's validation and test accuracy -- the
test accuracy only from an evaluation of this very checkpoint."""
import json
import os
import time

import pytest
from huggingface_hub import ModelCard, ModelCardData

import cardmeta
import demo
import evaluate
import export
import train

BASE_CARD = """---
license: other
license_name: qwen-research
license_link: https://example.org/LICENSE
language: [en]
---
# Tiny-VL
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A base laid out as the hub cache keeps one (so it has a hub id) with its own card, a
    3-step run validated at every step, and evaluate.py's results for its checkpoint."""
    root = tmp_path_factory.mktemp("card")
    base = root / "hub" / "models--Org--Tiny-VL" / "snapshots" / "abc123"
    demo.make_demo_base(str(base))
    (base / "README.md").write_text(BASE_CARD)
    splits = demo.make_synthetic(str(root / "data"), n_train=4, n_val=2, n_test=1, seed=3)
    train.main(["--stage", "1", "--model", str(base), "--data", str(splits["train"]), "--val",
                str(splits["val"]), "--run-dir", str(root / "run"), "--latents", "4", "--global-batch", "4",
                "--epochs", "1", "--max-steps", "3", "--eval-every", "2", "--log-every", "100"])
    ckpt = str(root / "run" / "stage1" / "last")
    # no --out, as the README runs it: the results land in the run's eval/, where the card looks
    evaluate.main(["--checkpoint", ckpt, "--data", str(splits["test"]),
                   "--attention-samples", "0", "--max-new-tokens", "4"])
    return dict(root=root, base=str(base), ckpt=ckpt, val=str(splits["val"]))


def test_evaluate_default_out_is_the_run_dirs():
    assert evaluate.default_out("livr=runs/x/stage2/final") == os.path.join("runs", "x", "eval")
    assert evaluate.default_out("/a/b/stage1/last/") == "/a/b/eval"
    for elsewhere in ("runs/x/hub", "Qwen/Qwen2.5-VL-3B-Instruct", "zero-shot=runs/demo/base"):
        assert evaluate.default_out(elsewhere) == os.path.join(demo.DIR, "eval")


def card_of(out):
    with open(os.path.join(out, "README.md")) as f:
        return ModelCard(f.read())


def test_export_card_is_valid_hub_metadata(run, tmp_path):
    out = export.export(run["ckpt"], str(tmp_path / "hub"))
    card = card_of(out)
    d = card.data.to_dict()
    # huggingface_hub reads it back into the same metadata (model-index parsed into EvalResults)
    assert ModelCardData(**d).to_dict() == d
    assert ModelCard(str(card)).data.to_dict() == d
    assert d["base_model"] == "Org/Tiny-VL"
    assert (d["license"], d["license_name"], d["license_link"]) == ("other", "qwen-research",
                                                                    "https://example.org/LICENSE")
    assert d["library_name"] == "transformers" and d["pipeline_tag"] == "image-text-to-text"
    assert {"livr", "qwen2_5_vl"} <= set(d["tags"])
    results = card.data.eval_results
    assert all(r.task_type == "image-text-to-text" and r.metric_type == "accuracy" for r in results)
    # validation: the best val_acc of metrics.jsonl, in %
    rows = [json.loads(line) for line in open(os.path.join(run["root"], "run", "stage1", "metrics.jsonl"))]
    best = max((r for r in rows if "val_acc" in r), key=lambda r: r["val_acc"])
    val = [r for r in results if r.dataset_split == "validation"]
    assert len(val) == 1 and val[0].metric_value == round(100 * best["val_acc"], 2)
    assert val[0].dataset_name == "val.jsonl" and f"step {best['step']}" in val[0].metric_name
    # test: evaluate.py's per-task accuracy and mean for this checkpoint
    report = json.load(open(os.path.join(run["root"], "run", "eval", "results.json")))["checkpoints"][0]
    test = {r.metric_name: r.metric_value for r in results if r.dataset_split == "test"}
    assert test == {"mean accuracy over tasks": round(report["mean"], 2),
                    **{f"accuracy ({t})": round(v, 2) for t, v in report["accuracy"].items()}}
    assert len(test) == 5
    # the body still follows, with the lmms-eval command for this export's pixel limits
    lo, hi = export.lmms.pixel_limits(out)
    assert f"pretrained={out},min_pixels={lo},max_pixels={hi},device_map=cpu" in card.text


def test_test_results_only_for_this_checkpoint(run, tmp_path):
    ckpt = run["ckpt"]
    assert cardmeta.test_results(ckpt) is not None
    # another checkpoint of the run has no test results of its own
    assert cardmeta.test_results(os.path.join(run["root"], "run", "stage1", "best")) is None
    results = os.path.join(run["root"], "run", "eval", "results.json")
    saved = open(results).read()
    try:
        # decoded under the bottleneck mask, or without latents: not the model's accuracy
        for change in ({"mask": "bottleneck"}, {"latents": False}):
            with open(results, "w") as f:
                json.dump({**json.loads(saved), **change}, f)
            assert cardmeta.test_results(ckpt) is None, change
        # evaluated before the checkpoint was (re)written
        with open(results, "w") as f:
            f.write(saved)
        old = os.path.getmtime(os.path.join(ckpt, "livr.json")) - 60
        os.utime(results, (old, old))
        assert cardmeta.test_results(ckpt) is None
    finally:
        with open(results, "w") as f:
            f.write(saved)
        now = time.time()
        os.utime(results, (now, now))


def test_card_without_base_card_or_metrics(run, tmp_path):
    """No base card, no metrics, a local base: no license, no model-index, still valid."""
    meta = {"base": str(tmp_path)}
    text = cardmeta.front_matter(meta, str(tmp_path / "stage1" / "final"), None, "qwen2_5_vl", "LIVR-x")
    d = ModelCard(text + "# x\n").data.to_dict()
    assert "license" not in d and "model-index" not in d and "base_model" not in d
    assert d["pipeline_tag"] == "image-text-to-text"
    # a base card that does not parse is ignored, not fatal
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert cardmeta.base_license(str(tmp_path)) == {}
