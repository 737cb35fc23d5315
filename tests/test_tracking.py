"""tracking.py and curves.py: what train.py logs reaches TensorBoard's event file and W&B's offline
run directory (both read back), only rank 0 logs, a missing package is a one-line error naming
it, and metrics.jsonl is drawn as a PNG that depends on the data. Driven by synthetic metric
records, plus one short real train.py run."""
import argparse
import glob
import json
import os
import struct
import sys

import numpy as np
import pytest
from PIL import Image

import curves
import demo
import tracking
import train

# what train.py writes to metrics.jsonl (+ tokens_per_s, which it adds for the trackers)
RECORDS = ([{"step": s, "loss": 2.0 / s, "lr": 1e-4 * s, "grad_norm": 0.5 + s, "tokens_per_s": 1000.0 + s}
            for s in range(1, 6)]
           + [{"step": 6, "skipped": "loss nan, grad norm nan", "lr": 6e-4}, {"step": 6, "val_acc": 0.625}])
FLAGS = argparse.Namespace(stage=1, lr=1e-4, model=None, epochs=2.0, mask=None, report_to="tensorboard",
                           compile=False)
WANT = {"train/loss": {s: 2.0 / s for s in range(1, 6)}, "train/lr": {s: 1e-4 * s for s in range(1, 7)},
        "train/grad_norm": {s: 0.5 + s for s in range(1, 6)},
        "train/tokens_per_s": {s: 1000.0 + s for s in range(1, 6)}, "val/accuracy": {6: 0.625}}


def write_metrics(stage_dir, records):
    os.makedirs(stage_dir, exist_ok=True)
    with open(os.path.join(stage_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({k: v for k, v in r.items() if k != "tokens_per_s"}) + "\n" for r in records)


def drive(backend, stage_dir, rank=0):
    """A stage as train.py runs it: start, a record per step, finish."""
    write_metrics(stage_dir, RECORDS)
    t = tracking.start(argparse.Namespace(**{**vars(FLAGS), "report_to": backend}), str(stage_dir), rank)
    for r in RECORDS:
        t.log(r)
    t.finish()


# --- TensorBoard --------------------------------------------------------------------------------

def tensorboard_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    return scalars, acc


def test_tensorboard_event_file_holds_the_scalars_and_flags(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams import plugin_data_pb2
    drive("tensorboard", tmp_path / "stage1")
    scalars, acc = tensorboard_scalars(str(tmp_path / "stage1" / "tensorboard"))
    assert scalars.keys() == WANT.keys()
    for tag, want in WANT.items():
        assert scalars[tag] == pytest.approx(want, rel=1e-6), tag     # float32 in the event file
    # the flags: TensorBoard's hparams plugin (session start info) and a text table
    meta = acc.SummaryMetadata("_hparams_/session_start_info")
    hp = plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content).session_start_info.hparams
    assert hp["lr"].number_value == pytest.approx(1e-4) and hp["stage"].number_value == 1
    assert hp["report_to"].string_value == "tensorboard" and hp["model"].string_value == "null"
    assert "flags/text_summary" in acc.Tags()["tensors"]


def test_resume_purges_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    """A killed run logged steps 1..5; resumed from a checkpoint at step 3 it logs 4.. again
    with other values: TensorBoard keeps one value per step, the new one."""
    pytest.importorskip("tensorboard")
    stage = str(tmp_path / "stage1")
    write_metrics(stage, RECORDS)
    first = tracking.start(FLAGS, stage, 0)
    for r in RECORDS[:5]:
        first.log(r)
    first.writer.flush()                  # killed: never finished
    again = tracking.start(FLAGS, stage, 0)
    for s in (4, 5):
        again.log({"step": s, "loss": 10.0 + s, "lr": 1.0, "grad_norm": 1.0})
    again.finish()
    scalars, _ = tensorboard_scalars(os.path.join(stage, "tensorboard"))
    assert scalars["train/loss"] == pytest.approx({1: 2.0, 2: 1.0, 3: 2 / 3, 4: 14.0, 5: 15.0})


# --- W&B, offline ---------------------------------------------------------------------------------

def wandb_records(path):
    """The records of a W&B run file (run-ID.wandb): LevelDB's log format (32 KiB blocks, each
    chunk a 7-byte header: CRC, length, type full/first/middle/last) after W&B's 7-byte header,
    each record a wandb_internal_pb2.Record -- what `wandb sync` uploads."""
    from wandb.proto import wandb_internal_pb2
    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:                   # a block's tail too short for a header
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            out.append(wandb_internal_pb2.Record.FromString(buf))
    return out


def test_wandb_offline_run_holds_the_scalars_and_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "livr-test")
    drive("wandb", tmp_path / "stage1")
    files = glob.glob(str(tmp_path / "stage1" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    history, config, run = {}, {}, None
    for rec in wandb_records(files[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            step = items.pop("_step")
            for k, v in items.items():
                if not k.startswith("_"):
                    history.setdefault(k, {})[step] = v
        elif kind == "run":
            run = rec.run
            config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
    assert history.keys() == WANT.keys()
    for tag, want in WANT.items():
        assert history[tag] == pytest.approx(want, rel=1e-12), tag
    assert run.project == "livr-test" and run.display_name == "test_wandb_offline_run_holds_t0/stage1"
    assert config["lr"] == 1e-4 and config["stage"] == 1 and config["model"] == "null"


# --- what every backend shares --------------------------------------------------------------------

def test_missing_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    for name in ("wandb", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)          # import now raises ImportError
    for backend in ("wandb", "tensorboard"):
        with pytest.raises(tracking.TrackingError, match=f"--report-to {backend} needs the {backend} "
                           f"package, which is not installed: pip install {backend}"):
            tracking.start(argparse.Namespace(report_to=backend), str(tmp_path), rank=1)
    with pytest.raises(SystemExit) as e:                      # train.py: before any work
        train.main(["--stage", "1", "--report-to", "wandb", "--run-dir", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install wandb" in err[0]
    assert not os.path.exists(tmp_path / "r" / "base")      # stopped before making the demo


def test_only_rank_zero_logs_and_draws(tmp_path):
    pytest.importorskip("tensorboard")
    drive("tensorboard", tmp_path / "stage1", rank=1)
    assert sorted(os.listdir(tmp_path / "stage1")) == ["metrics.jsonl"]


def test_none_draws_the_png(tmp_path):
    drive("none", tmp_path / "stage1")
    assert sorted(os.listdir(tmp_path / "stage1")) == ["metrics.jsonl", "metrics.png"]


# --- the PNG ------------------------------------------------------------------------------------

def test_png_has_its_size_and_depends_on_the_data(tmp_path):
    images = []
    for name, records in (("a", RECORDS), ("b", [{**r, "loss": 1.0 + r["step"] % 2} if "loss" in r else r
                                                 for r in RECORDS]),
                          ("c", RECORDS[:-1] + [{"step": 6, "val_acc": 0.25}]), ("d", RECORDS)):
        write_metrics(tmp_path / name, records)
        path = curves.draw(str(tmp_path / name / "metrics.jsonl"))
        assert path == str(tmp_path / name / "metrics.png")
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == curves.SIZE
            images.append(np.asarray(im.convert("RGB")))
    a, b, c, d = images
    assert np.array_equal(a, d)                          # the same data, the same picture
    w = curves.SIZE[0] // 3
    # other losses change the loss panel only; another validation accuracy the third panel only
    assert not np.array_equal(a[:, :w], b[:, :w]) and np.array_equal(a[:, w:], b[:, w:])
    assert np.array_equal(a[:, :2 * w], c[:, :2 * w]) and not np.array_equal(a[:, 2 * w:], c[:, 2 * w:])
    # the curves are drawn in their colours
    assert (a[:, :w] == curves.PANELS[0][2]).all(-1).sum() > 100
    assert (a[:, w:2 * w] == curves.PANELS[1][2]).all(-1).sum() > 100


def test_png_survives_a_torn_line_and_an_empty_file(tmp_path):
    stage = tmp_path / "s"
    write_metrics(stage, RECORDS)
    with open(stage / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')                      # torn by a kill
    assert curves.read_series(str(stage / "metrics.jsonl"))["loss"] == [(s, 2.0 / s) for s in range(1, 6)]
    curves.draw(str(stage / "metrics.jsonl"))
    (stage / "metrics.jsonl").write_text("")
    with Image.open(curves.draw(str(stage / "metrics.jsonl"))) as im:
        assert im.size == curves.SIZE


# --- the real thing -----------------------------------------------------------------------------

def test_train_py_logs_what_metrics_jsonl_holds(tmp_path):
    """One short train.py run with --report-to tensorboard: the event file's loss, lr and grad
    norm are metrics.jsonl's, validation accuracy included; tokens/s is logged; metrics.png is
    drawn at the stage's end (here: the --max-steps stop)."""
    pytest.importorskip("tensorboard")
    base = demo.make_demo_base(str(tmp_path / "base"))
    splits = demo.make_synthetic(str(tmp_path / "data"), n_train=4, n_val=2, n_test=1, seed=3)
    train.main(["--stage", "1", "--model", base, "--data", str(splits["train"]), "--val", str(splits["val"]),
                "--run-dir", str(tmp_path / "run"), "--latents", "4", "--global-batch", "4", "--epochs", "2",
                "--max-steps", "3", "--eval-every", "2", "--log-every", "100", "--report-to", "tensorboard"])
    stage = tmp_path / "run" / "stage1"
    rows = [json.loads(line) for line in open(stage / "metrics.jsonl")]
    scalars, acc = tensorboard_scalars(str(stage / "tensorboard"))
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
                     ("val_acc", "val/accuracy")):
        want = {r["step"]: r[key] for r in rows if key in r}
        assert want and scalars[tag] == pytest.approx(want, rel=1e-6), tag
    assert sorted(scalars["train/tokens_per_s"]) == [1, 2, 3]
    assert all(v > 0 for v in scalars["train/tokens_per_s"].values())
    with Image.open(stage / "metrics.png") as im:
        assert im.size == curves.SIZE
