"""Trust, round 2 (issue 23): a run directory that cannot be corrupted (a lock, no silent rerun,
no save through a symbolic link), provenance that is true (a checkpoint names the base it was
trained on, by fingerprint), preemption-safe runs (a signal on any rank, or the launcher's
death, ends in one save and one line), and every fault one named line from the process that saw
it. Tests are grouped by the issue's numbered cases; those about processes and signals (7, 8, 9,
the stalled rank of 11) are in test_trust2_processes.py, through torchrun with real signals."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import checkpoint
import checks
import data
import evaluate
import export
import images
import rundir
import train
from demo import make_demo_base, make_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust2")
    base = make_demo_base(str(root / "base"))
    splits = make_synthetic(str(root / "data"), n_train=2, n_val=1, n_test=1, seed=3)
    return dict(root=root, base=base, train=str(splits["train"]), val=str(splits["val"]),
                test=str(splits["test"]))


def run_args(demo, run_dir, *extra, stage=1):
    return ["--stage", str(stage), "--model", demo["base"], "--data", demo["train"],
            "--run-dir", str(run_dir), "--batch-size", "2", "--micro-batch-tokens", "0",
            "--global-batch", "4", "--latents", "4", "--log-every", "100", "--epochs", "2", *extra]


@pytest.fixture(scope="module")
def stage1(demo, tmp_path_factory):
    """A stage-1 run stopped after 2 of 4 steps: RUN/stage1/last is resumable."""
    run = tmp_path_factory.mktemp("stage1")
    train.main(run_args(demo, run, "--max-steps", "2", "--save-every", "1"))
    return run


@pytest.fixture(scope="module")
def other_base(demo):
    """A base of the same shapes with other weights (another seed): what case 1 trains on."""
    return make_demo_base(str(demo["root"] / "other_base"), seed=1)


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def fails_with(argv, capsys, *patterns, main=train.main, code=2):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    assert e.value.code == code, out.err
    assert "Traceback" not in out.err and "Traceback" not in out.out
    for p in patterns:
        assert p in out.err, out.err
    return out.err


def snapshot(path):
    """{relative path: bytes} of every file under `path` (links as their targets' text)."""
    out = {}
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            key = os.path.relpath(p, path)
            if os.path.islink(p):
                out[key] = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                out[key] = open(p, "rb").read()
    return out


def trainer_step(path):
    return json.load(open(os.path.join(path, "trainer.json")))["step"]


def metric_steps(run_dir, stage=1):
    with open(os.path.join(run_dir, f"stage{stage}", "metrics.jsonl")) as f:
        return [r["step"] for r in map(json.loads, f) if "loss" in r or "skipped" in r]


def edit_json(file, fn):
    d = json.load(open(file))
    fn(d)
    json.dump(d, open(file, "w"))


# --- 1. stage 2 trains on, and records, the base stage 1 trained on ------------------------------

def test_a_checkpoint_records_its_base_and_its_fingerprint(demo, stage1):
    meta = json.load(open(stage1 / "stage1" / "last" / "livr.json"))
    assert meta["base"] == os.path.abspath(demo["base"])
    assert meta["base_fingerprint"] == checkpoint.base_fingerprint(demo["base"])
    assert meta["base_fingerprint"].startswith("v1:")


def test_stage_two_trains_on_stage_one_base_and_refuses_another(demo, stage1, other_base, tmp_path, capsys):
    run = copy_run(stage1, tmp_path / "run")
    last = str(run / "stage1" / "last")
    ours, theirs = (checks.short_fingerprint(checkpoint.base_fingerprint(b)) for b in (demo["base"], other_base))
    assert ours != theirs
    s2 = run_args(demo, run, "--init", last, "--max-steps", "1", stage=2)
    # --model with other weights: refused, both fingerprints named
    b2 = list(s2)
    b2[b2.index("--model") + 1] = other_base
    fails_with(b2, capsys, ours, theirs, "--model")
    assert not os.path.exists(run / "stage2" / "last")
    # the same weights elsewhere (a moved copy) are the same base
    moved = str(tmp_path / "moved_base")
    shutil.copytree(demo["base"], moved)
    s2[s2.index("--model") + 1] = moved
    train.main(s2)
    meta = json.load(open(run / "stage2" / "last" / "livr.json"))
    assert meta["base"] == moved and meta["base_fingerprint"] == checkpoint.base_fingerprint(demo["base"])
    # --resume on other weights: refused too, in either stage
    fails_with(b2 + ["--resume"], capsys, ours, theirs)
    r1 = run_args(demo, run, "--resume")
    r1[r1.index("--model") + 1] = other_base
    fails_with(r1, capsys, ours, theirs, "--resume")


def test_evaluate_and_export_refuse_a_base_with_other_weights(demo, stage1, other_base, tmp_path, capsys):
    last = str(copy_run(stage1, tmp_path / "run") / "stage1" / "last")
    edit_json(os.path.join(last, "livr.json"), lambda m: m.update(base=other_base))   # as if replaced
    ours, theirs = (checks.short_fingerprint(checkpoint.base_fingerprint(b)) for b in (demo["base"], other_base))
    with pytest.raises(checkpoint.CheckpointError, match=theirs):
        checkpoint.load_livr(last)
    fails_with(["--checkpoint", last, "--data", demo["test"], "--out", str(tmp_path / "e")], capsys,
               ours, theirs, main=evaluate.main)
    assert export.main([last, str(tmp_path / "hub")]) == 2
    err = capsys.readouterr().err
    assert ours in err and theirs in err and not os.path.exists(tmp_path / "hub")


def test_latent_ids_are_checked_against_the_tokenizer_wherever_loaded(demo, stage1, tmp_path, capsys):
    run = copy_run(stage1, tmp_path / "run")
    last = str(run / "stage1" / "last")
    edit_json(os.path.join(last, "livr.json"), lambda m: m.update(latent_token_id=m["latent_token_id"] + 1))
    fails_with(run_args(demo, run, "--init", last, "--max-steps", "1", stage=2), capsys,
               "latent_token_id is", "puts <|latent_0|> at id")
    fails_with(["--checkpoint", last, "--data", demo["test"], "--out", str(tmp_path / "e")], capsys,
               "puts <|latent_0|> at id", main=evaluate.main)
    assert export.main([last, str(tmp_path / "hub")]) == 2
    assert "puts <|latent_0|> at id" in capsys.readouterr().err


# --- 2. saves never follow a symbolic link out of the run directory -----------------------------

@pytest.mark.parametrize("name", ["last", "final", "last.tmp", "last.old", "best", "metrics.jsonl", "stage"])
def test_a_symbolic_link_in_the_stage_is_refused_and_its_target_untouched(demo, stage1, tmp_path, capsys, name):
    run = copy_run(stage1, tmp_path / "run")
    outside = copy_run(stage1 / "stage1", tmp_path / "outside")       # someone else's files
    before = snapshot(outside)
    if name == "stage":
        shutil.rmtree(run / "stage1")
        os.symlink(outside, run / "stage1")
    else:
        shutil.rmtree(run / "stage1" / name, ignore_errors=True)
        if os.path.exists(run / "stage1" / name):
            os.remove(run / "stage1" / name)
        os.symlink(outside / ("metrics.jsonl" if name == "metrics.jsonl" else "last"), run / "stage1" / name)
    fails_with(run_args(demo, run, "--resume", "--max-steps", "1"), capsys, "is a symbolic link")
    assert snapshot(outside) == before


@pytest.mark.parametrize("where", ["run", "stage"])
def test_a_file_where_the_run_or_stage_directory_goes_is_named(demo, tmp_path, capsys, where):
    run = tmp_path / "R"
    if where == "stage":
        os.makedirs(run)
    target = run if where == "run" else run / "stage1"
    target.write_text("notes")
    fails_with(run_args(demo, run, "--max-steps", "1"), capsys, f"{target} is a file, not a directory")
    assert target.read_text() == "notes"


def test_the_issue_reproduction_a_linked_final_of_a_fresh_run(demo, stage1, tmp_path, capsys):
    """`ln -s /x/ckpt R/stage1/final; T1` once deleted /x/ckpt/livr.json."""
    ckpt = copy_run(stage1 / "stage1" / "last", tmp_path / "x" / "ckpt")
    before = snapshot(ckpt)
    os.makedirs(tmp_path / "R" / "stage1")
    os.symlink(ckpt, tmp_path / "R" / "stage1" / "final")
    fails_with(run_args(demo, tmp_path / "R"), capsys, "final is a symbolic link")
    assert snapshot(ckpt) == before


def test_a_save_replaces_a_link_never_its_target(stage1, tmp_path):
    """A link made while a run goes on (after its checks) is replaced, never written through."""
    m, meta = checkpoint.load_livr(str(stage1 / "stage1" / "last"))
    victim = copy_run(stage1 / "stage1" / "last", tmp_path / "victim")
    before = snapshot(victim)
    out = tmp_path / "run" / "last"
    os.makedirs(out.parent)
    for link in (out, tmp_path / "run" / "last.tmp", tmp_path / "run" / "last.old"):
        os.symlink(victim, link)
    checkpoint.save_livr(m, str(out), meta)
    assert not os.path.islink(out) and checkpoint.is_complete(str(out))
    checkpoint.copy_checkpoint(str(out), str(tmp_path / "run" / "final"))
    assert snapshot(victim) == before


# --- 3. a rerun without --resume never starts over an earlier run -------------------------------

def test_a_rerun_without_resume_is_refused_and_changes_nothing(demo, stage1, tmp_path, capsys):
    run = copy_run(stage1, tmp_path / "run")
    before = snapshot(run / "stage1")
    fails_with(run_args(demo, run), capsys, "already holds a run", "metrics.jsonl up to step 2", "--resume",
               "--run-dir")
    after = snapshot(run / "stage1")
    after.pop(".lock"), before.pop(".lock")
    assert after == before
    # a start that failed before its first step leaves nothing that blocks the next one
    os.makedirs(tmp_path / "fresh" / "stage1")
    (tmp_path / "fresh" / "stage1" / "metrics.jsonl").write_text("")
    rundir.check_fresh(str(tmp_path / "fresh" / "stage1"))


# --- 4. one run per stage directory -------------------------------------------------------------

HOLD_LOCK = """
import fcntl, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()} {socket.gethostname()}\\n".encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(demo, tmp_path, capsys):
    run = tmp_path / "run"
    os.makedirs(run / "stage1")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / "stage1" / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fails_with(run_args(demo, run, "--max-steps", "1"), capsys, "in use by another run",
                   f"pid {holder.pid} on host")
        assert not os.path.exists(run / "stage1" / "metrics.jsonl")
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9): its lock file stays, naming it, and is simply taken over
    assert str(holder.pid) in (run / "stage1" / ".lock").read_text()
    train.main(run_args(demo, run, "--max-steps", "1"))
    assert metric_steps(run) == [1]


# --- 5. non-finite weights and config values, and fp16 overflow ----------------------------------

def edited_base(demo, path, weights=None, config=None):
    """A copy of the demo base with its weights (a function of the state dict) or its
    config.json (a function of the text) edited."""
    shutil.copytree(demo["base"], path)
    if weights:
        sd = load_file(path / "model.safetensors")
        weights(sd)
        save_file(sd, path / "model.safetensors")
    if config:
        (path / "config.json").write_text(config((path / "config.json").read_text()))
    return str(path)


def with_model(demo, tmp_path, base):
    args = run_args(demo, tmp_path / "r", "--max-steps", "1")
    args[args.index("--model") + 1] = base
    return args


@pytest.mark.parametrize("edit, named", [
    (lambda sd: sd["model.norm.weight"].__setitem__(3, float("nan")), "holds non-finite values"),
    # a quantized checkpoint's integers: a cast to float would train on them in silence
    (lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"].to(torch.int8)}),
     "is torch.int8, not floating point"),
])
def test_base_weights_that_cannot_be_used_are_named(demo, tmp_path, capsys, edit, named):
    base = edited_base(demo, tmp_path / "base", weights=edit)
    fails_with(with_model(demo, tmp_path, base), capsys, "tensor 'model.norm.weight'", named)
    # evaluation says so instead of scoring 0%
    fails_with(["--checkpoint", base, "--data", demo["test"], "--out", str(tmp_path / "e")],
               capsys, named, main=evaluate.main)


@pytest.mark.parametrize("edit, named", [
    (lambda text: text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN'),
     "config.json: rms_norm_eps must be a finite number, not nan"),
    # another family's config would build the wrong network
    (lambda text: json.dumps({**json.loads(text), "model_type": "qwen2_vl"}),
     "model_type 'qwen2_vl' is not supported"),
])
def test_base_configs_that_cannot_be_used_are_named(demo, tmp_path, capsys, edit, named):
    base = edited_base(demo, tmp_path / "base", config=edit)
    fails_with(with_model(demo, tmp_path, base), capsys, named)


def test_export_fp16_refuses_weights_beyond_its_range(stage1, tmp_path, capsys):
    last = str(copy_run(stage1, tmp_path / "run") / "stage1" / "last")
    f = os.path.join(last, "weights.safetensors")
    sd = load_file(f)
    sd["latent_embeds"][0, 0] = 1e6
    save_file(sd, f)
    assert export.main([last, str(tmp_path / "hub"), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "--dtype fp16: 1 tensor(s) hold values beyond its range" in err and "inf" in err
    assert not os.path.exists(tmp_path / "hub")


# --- 6. records: answers, choices, text; images changed after the check; EXIF --------------------

def test_bad_answers_choices_and_text_are_named_by_check_and_training(demo, tmp_path, capsys):
    good = json.loads(open(demo["train"]).readline())
    good["images"] = [os.path.join(os.path.dirname(demo["train"]), p) for p in good["images"]]
    lines = [json.dumps({**good, "answer": ["3"]}),
             json.dumps({**good, "answer": float("nan")}),                    # NaN, as json writes it
             json.dumps({**good, "answer": True}),
             json.dumps({**good, "choices": [f"c{i}" for i in range(27)], "answer": "A"}),
             json.dumps({**good, "question": "x"})[:-1] + ', "task": "\\ud800"}',  # a lone surrogate
             json.dumps({**good, "answer": 1})[:-2] + "1" * 5000 + "}",         # a 5000-digit number
             json.dumps(good)]
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    assert data.main(["check", str(f)]) == 1
    out = capsys.readouterr().out
    for n, reason in [(1, "answer must be a string (an option letter) or a number"),
                      (2, "answer nan is not a finite number"), (3, "answer must be a string"),
                      (4, "27 choices: at most 26"), (5, "the task is not valid text (a lone surrogate"),
                      (6, "not valid JSON")]:
        assert f"bad.jsonl:{n}: {reason}" in out, out
    assert "bad.jsonl:7" not in out and "6 bad record(s) of 7" in out
    args = run_args(demo, tmp_path / "r")
    args[args.index("--data") + 1] = str(f)
    fails_with(args, capsys, "bad.jsonl:1: answer must be", "bad.jsonl:4: 27 choices")


def change_after_check(monkeypatch, change):
    """Run `change(records)` right after train.py's up-front check of the training records."""
    real = data.load_dataset

    def load(path, **kw):
        records = real(path, **kw)
        if path.endswith("train.jsonl"):
            change(records)
        return records
    monkeypatch.setattr(train.data, "load_dataset", load)


def enlarge(path):
    Image.new("RGB", (1120, 1120), "red").save(path)


def truncate(path):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:len(raw) // 2])


@pytest.mark.parametrize("how, workers, reason", [
    ("enlarged", "0", "tokens, longer than --max-len 300"),
    ("truncated", "1", "unreadable (OSError: image file is truncated"),
    ("removed", "1", "file not found"),
    ("bomb", "0", "DecompressionBombError"),
])
def test_an_image_changed_after_the_check_is_named_when_encoded(demo, tmp_path, monkeypatch, capsys,
                                                                how, workers, reason):
    shutil.copytree(os.path.dirname(demo["train"]), tmp_path / "d")
    train_file = str(tmp_path / "d" / "train.jsonl")
    victim = {}

    def change(records):
        r = records[0]
        victim.update(where=r.where, image=r.images[0])
        if how == "enlarged":
            enlarge(r.images[0])
        elif how == "truncated":
            truncate(r.images[0])
        elif how == "removed":
            os.remove(r.images[0])
        else:
            monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)     # every image is now a bomb
    change_after_check(monkeypatch, change)
    args = run_args(demo, tmp_path / "r", "--workers", workers, "--max-len", "300")
    args[args.index("--data") + 1] = train_file
    err = fails_with(args, capsys, reason)
    assert "Caught" not in err and "Original Traceback" not in err
    if how != "bomb":
        assert f"error: {victim['where']}: " in err and (how == "enlarged" or victim["image"] in err)
    assert not os.path.exists(tmp_path / "r" / "stage1" / "last")


def test_exif_orientation_is_applied_as_transformers_load_image_does(demo, tmp_path):
    from transformers import Qwen2VLImageProcessor
    from transformers.image_utils import load_image
    x = (np.random.default_rng(0).random((112, 196, 3)) * 255).astype(np.uint8)   # 196 wide, 112 high
    im = Image.fromarray(x)
    exif = im.getexif()
    exif[0x0112] = 6                                   # "rotate 90 clockwise to view": a phone photo
    path = str(tmp_path / "phone.jpg")
    im.save(path, exif=exif.tobytes())
    ref = load_image(path)
    assert ref.size == (112, 196)
    assert np.array_equal(np.asarray(images.to_rgb(path)), np.asarray(ref))
    assert images.image_size(path) == ref.size
    pv, thw = images.preprocess_image(path)
    hf = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)(images=ref, return_tensors="pt")
    assert thw.tolist() == hf["image_grid_thw"][0].tolist() == [1, 14, 8]
    torch.testing.assert_close(pv, hf["pixel_values"], atol=1e-5, rtol=0)
    proc = data.Processor.from_pretrained(demo["base"], num_latents=4)
    s = data.Sample(images=[path], question="How many?", answer="3")
    assert proc.num_tokens(s) == len(proc.encode(s)["input_ids"])


# --- 10. malformed files end in one named line, before anything is allocated ---------------------

@pytest.mark.parametrize("edit, named", [
    (lambda c: c.update(num_hidden_layers=10 ** 6), "num_hidden_layers 1000000 is outside 1..1024"),
    (lambda c: c.update(hidden_size=-1), "hidden_size -1 is outside"),
    (lambda c: c.update(vocab_size=1e9), "vocab_size must be a whole number, not 1000000000.0"),
    (lambda c: c.update(num_attention_heads=True), "num_attention_heads must be a whole number, not True"),
    (lambda c: c.update(rope_theta=float("inf")), "rope_theta must be a finite number, not inf"),
    (lambda c: c["vision_config"].update(patch_size=0), "vision_config.patch_size 0 is outside"),
    (lambda c: c.update(image_token_id=10 ** 9), "image_token_id 1000000000 is outside"),
    (lambda c: c["vision_config"].update(depth=3, fullatt_block_indexes=[7]), "fullatt_block_indexes must be"),
])
def test_absurd_config_values_are_refused_before_a_model_is_built(demo, tmp_path, monkeypatch, edit, named):
    base = tmp_path / "base"
    shutil.copytree(demo["base"], base)
    edit_json(base / "config.json", edit)

    def never(*a, **k):
        raise AssertionError("a model was built from an unchecked config")
    monkeypatch.setattr(checkpoint, "Qwen25VL", never)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(named)):
        checkpoint.load_pretrained(str(base))


def test_absurd_image_settings_are_named(demo, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(demo["base"], base)
    edit_json(base / "preprocessor_config.json", lambda c: c.update(patch_size=0))
    with pytest.raises(ValueError, match="preprocessor_config.json: .*patch_size 0 is outside 1..1024"):
        data.Processor.from_pretrained(str(base))


def test_a_5000_digit_number_in_a_config_is_named(demo, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(demo["base"], base)
    text = (base / "config.json").read_text()
    (base / "config.json").write_text(re.sub(r'"hidden_size": \d+', '"hidden_size": ' + "9" * 5000, text, 1))
    args = run_args(demo, tmp_path / "r")
    args[args.index("--model") + 1] = str(base)
    fails_with(args, capsys, "config.json: not a valid JSON config")


@pytest.mark.parametrize("edit, named", [
    (lambda t: t.update(hparams=[]), '"hparams" must be the run\'s settings'),
    (lambda t: t.update(step=-5), "step -5 is outside"),
    (lambda t: t.update(step="2"), "step must be a whole number"),
    (lambda t: t.update(best=float("nan")), "best must be a finite number"),
    (lambda t: t.update(data={"records": "8"}), '"data" must be'),
    (lambda t: t.update(rng=[]), '"rng" must be a list'),
    (lambda t: t["scheduler"].update(last_epoch=7), "last_epoch equal to step"),
    (lambda t: t["optimizer"]["param_groups"][0].update(eps=-1), "optimizer.param_groups[0]: eps -1"),
    (lambda t: (t.update(step=10 ** 9), t["scheduler"].update(last_epoch=10 ** 9)), "past this run's 4 steps"),
    ("5000 digits", "not a valid JSON trainer state"),
])
def test_malformed_trainer_state_is_refused_by_resume(demo, stage1, tmp_path, capsys, edit, named):
    run = copy_run(stage1, tmp_path / "run")
    f = run / "stage1" / "last" / "trainer.json"
    if edit == "5000 digits":
        f.write_text(f.read_text().replace('"step": 2', '"step": ' + "2" * 5000, 1))
    else:
        edit_json(f, edit)
    fails_with(run_args(demo, run, "--resume", "--max-steps", "1"), capsys, "trainer.json", named)


@pytest.mark.parametrize("edit, named", [
    (lambda m: m.update(num_latents=True), "num_latents must be a whole number, not True"),
    (lambda m: m.update(num_latents=10 ** 6), "num_latents 1000000 is outside 0..4096"),
    (lambda m: m.update(latent_token_id=10 ** 9), "latent_token_id 1000000000 is outside"),
    (lambda m: m.update(lora={"rank": "16", "alpha": 32, "dropout": 0.05}), "lora.rank must be a whole number"),
    (lambda m: m.update(base=7), '"base" must be'),
])
def test_malformed_livr_json_is_refused_before_anything_is_built(stage1, tmp_path, monkeypatch, edit, named):
    last = str(copy_run(stage1, tmp_path / "run") / "stage1" / "last")
    edit_json(os.path.join(last, "livr.json"), edit)

    def never(*a, **k):
        raise AssertionError("a model was built from an unchecked livr.json")
    monkeypatch.setattr(checkpoint, "load_pretrained", never)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(named)):
        checkpoint.load_livr(last)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(demo, stage1, tmp_path,
                                                                            monkeypatch, capsys):
    import safetensors
    import safetensors.torch
    run = copy_run(stage1, tmp_path / "run")
    before = snapshot(run / "stage1" / "last")

    def full(*a, **k):        # what safetensors raises when write() fails with ENOSPC
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    err = fails_with(run_args(demo, run, "--resume", "--max-steps", "1"), capsys,
                     "last.tmp: cannot write the checkpoint", "No space left on device", "is as it was")
    assert len(err.strip().splitlines()) == 1
    assert snapshot(run / "stage1" / "last") == before and not os.path.exists(run / "stage1" / "last.tmp")


def test_export_into_the_current_directory_is_refused(stage1, tmp_path, monkeypatch, capsys):
    os.makedirs(tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    assert export.main([str(stage1 / "stage1" / "last"), "."]) == 2
    assert ". is the current directory" in capsys.readouterr().err
    assert os.listdir(".") == []


def test_export_inside_the_checkpoint_is_refused(stage1, tmp_path, capsys):
    """Its next save swaps the whole checkpoint directory in: an export inside would be deleted."""
    run = copy_run(stage1, tmp_path / "run")
    last = run / "stage1" / "last"
    before = snapshot(last)
    assert export.main([str(last), str(last / "hub")]) == 2
    assert "is inside the checkpoint" in capsys.readouterr().err
    assert snapshot(last) == before


# --- 11. messages that tell the truth ------------------------------------------------------------

def poison(monkeypatch, bad_steps):
    """From micro-batch call n on (2 per step), the loss is multiplied by bad_steps[n]."""
    real, calls = train.compute_loss, [0]

    def compute_loss(m, batch, mask_mode, run=None):
        ce, n = real(m, batch, mask_mode, run)
        calls[0] += 1
        factor = next((f for start, f in sorted(bad_steps.items(), reverse=True) if calls[0] >= start), 1.0)
        return ce * factor, n
    monkeypatch.setattr(train, "compute_loss", compute_loss)


def test_divergence_names_the_last_checkpoint_from_before_the_loss_left_its_range(demo, tmp_path,
                                                                                 monkeypatch, capsys):
    """The loss leaves its range at step 4 (finite, 1e6 times too high), then goes NaN: `last`
    keeps step 2 (the save of step 4 and 6 are refused), and the stop names it."""
    run = tmp_path / "run"
    poison(monkeypatch, {7: 1e6, 9: float("nan")})       # 2 micro-batches a step
    with pytest.raises(SystemExit):
        train.main(run_args(demo, run, "--save-every", "2", "--epochs", "10"))
    out = capsys.readouterr()
    last = run / "stage1" / "last"
    assert (f"error: 3 non-finite steps in a row (last at step 7): stopping. The last checkpoint, "
            f"finite, is {last}. It holds step 2, from before the loss left its range at step 4") in out.err
    assert trainer_step(last) == 2
    assert out.out.count("not saving last: the loss left its range at step 4") == 2


def test_resuming_broken_weights_never_calls_them_good(demo, stage1, tmp_path, capsys):
    run = copy_run(stage1, tmp_path / "run")
    f = run / "stage1" / "last" / "weights.safetensors"
    save_file({k: torch.full_like(v, 1e30) for k, v in load_file(f).items()}, f)
    before = snapshot(run / "stage1" / "last")
    err = fails_with(run_args(demo, run, "--resume", "--lr", "1e-5"), capsys,
                     "not saving last: none of this run's 2 step(s) has given a finite loss",
                     f"No checkpoint of this stage is known good: {run / 'stage1' / 'last'} (step 2)")
    assert "finite, is" not in err and not os.path.exists(run / "stage1" / "final")
    assert snapshot(run / "stage1" / "last") == before


def test_resume_on_another_number_of_processes_says_so(demo, stage1, tmp_path, capsys):
    run = copy_run(stage1, tmp_path / "run")
    edit_json(run / "stage1" / "last" / "trainer.json", lambda t: t.update(rng=t["rng"] * 2))
    fails_with(run_args(demo, run, "--resume"), capsys, "saved by a run of 2 process(es) and this run has 1",
               "--nproc_per_node 2")


def test_an_unwritable_out_fails_before_the_evaluation(stage1, demo, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    err = fails_with(["--checkpoint", str(stage1 / "stage1" / "last"), "--data", demo["test"],
                      "--out", str(tmp_path / "file" / "out")], capsys, "--out", "cannot write there",
                     main=evaluate.main)
    assert "records" not in err and "samples" not in err


def test_escape_sequences_never_reach_the_terminal(demo, stage1, tmp_path, capsys):
    run = copy_run(stage1, tmp_path / "run\x1b[2J\x1b]0;pwned\x07")
    err = fails_with(run_args(demo, run), capsys, "already holds a run", "\\x1b[2J", "\\x07")
    assert "\x1b" not in err and "\x07" not in err
    rec = json.loads(open(demo["test"]).readline())
    rec["images"] = [os.path.join(os.path.dirname(demo["test"]), p) for p in rec["images"]]
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({**rec, "task": "count\x1b[31m\rred"}) + "\n")
    evaluate.main(["--checkpoint", str(stage1 / "stage1" / "last"), "--data", str(f), "--max-new-tokens", "2",
                   "--out", str(tmp_path / "e")])
    out = capsys.readouterr()
    assert "count\\x1b[31m\\rred" in out.out
    assert "\x1b" not in out.out + out.err and "red\r" not in out.out
