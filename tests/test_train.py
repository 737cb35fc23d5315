"""LIVR training: the bottleneck really cuts the image->answer path, only trainable tensors
move, FSDP over 2 processes equals 1 process, kill-and-resume equals an uninterrupted run, and
bad input fails with a message that says what to do."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import batching
import checkpoint
import data
import masks
import model
import tiny
import train
from demo import make_demo_base, make_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny random base checkpoint with its tokenizer, and a small synthetic data set."""
    root = tmp_path_factory.mktemp("demo")
    base = make_demo_base(str(root / "base"))
    splits = make_synthetic(str(root / "data"), n_train=6, n_val=2, n_test=2, seed=3)
    return dict(root=root, base=base, train=str(splits["train"]), val=str(splits["val"]))


def losses(run_dir, stage=1):
    with open(os.path.join(run_dir, f"stage{stage}", "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def args(demo, run_dir, *extra):
    return ["--model", demo["base"], "--data", demo["train"], "--val", demo["val"],
            "--run-dir", str(run_dir), "--batch-size", "2", "--global-batch", "4",
            "--log-every", "100", *extra]


# --- the bottleneck ----------------------------------------------------------------------------

def answer_logits(m, proc, record, image_seed):
    """Logits at the answer positions, with the record's images replaced by random pixels."""
    enc = proc.encode(record)
    pv = torch.randn(enc["pixel_values"].shape, generator=torch.Generator().manual_seed(image_seed))
    mask = masks.build_mask(enc["kinds"], 1)[None]
    with torch.no_grad():
        logits = m(enc["input_ids"][None], pv * 3, enc["image_grid_thw"], mask=mask)
    return logits[0, enc["kinds"] == masks.ANSWER]


def test_bottleneck_cuts_the_path(demo):
    """Under the stage-1 mask the answer changes with the image only through the latents."""
    record = data.load_dataset(demo["train"])[0]
    for k in (0, 4):
        proc = data.Processor.from_pretrained(demo["base"], num_latents=k)
        m = checkpoint.load_pretrained(demo["base"], num_latents=k, latent_token_id=proc.latent_token_id)
        a, b = answer_logits(m, proc, record, 0), answer_logits(m, proc, record, 1)
        if k == 0:
            assert torch.equal(a, b), "answer saw the image without latents"
        else:
            assert (a - b).abs().max() > 1e-3, "latents did not carry the image"


# --- what a step changes --------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["lora", "full"])
def test_only_trainable_parameters_change(demo, mode):
    a = train.parse_args(["--stage", "1", "--latents", "4", "--train", mode])
    proc = data.Processor.from_pretrained(demo["base"], num_latents=4)
    m = train.build_model(a, None, demo["base"], proc, torch.device("cpu"))
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = batching.collate([proc.encode(r) for r in data.load_dataset(demo["train"])[:2]], proc.pad_id)
    for _ in range(2):          # two steps: LoRA's B leaves zero after the first, A after the second
        loss, n = train.compute_loss(m, batch, "bottleneck")
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    trainable = {k for k, p in m.named_parameters() if p.requires_grad}
    assert "latent_embeds" in trainable
    assert not any(k.startswith("visual.") or "embed_tokens" in k for k in trainable)
    if mode == "lora":
        assert all("lora_" in k or k == "latent_embeds" for k in trainable)
    else:
        assert "model.layers.0.self_attn.q_proj.weight" in trainable
    for k, v in m.state_dict().items():
        if k in trainable:
            assert not torch.equal(v, before[k]), f"{k} is trainable but did not change"
        else:
            assert torch.equal(v, before[k]), f"{k} is frozen but changed"


def test_lora_merges_into_the_same_function(demo):
    proc = data.Processor.from_pretrained(demo["base"], num_latents=2)
    m = checkpoint.load_pretrained(demo["base"], num_latents=2, latent_token_id=proc.latent_token_id)
    model.add_lora(m, rank=4, alpha=8, dropout=0.0)
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    enc = proc.encode(data.load_dataset(demo["train"])[0])
    with torch.no_grad():
        want = m(enc["input_ids"][None], enc["pixel_values"], enc["image_grid_thw"])
        got = model.merge_lora(m)(enc["input_ids"][None], enc["pixel_values"], enc["image_grid_thw"])
    assert not any(isinstance(x, model.LoRALinear) for x in m.modules())
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


# --- the loop ---------------------------------------------------------------------------------

def test_fsdp_two_processes_equal_one(demo, tmp_path):
    common = args(demo, tmp_path / "x", "--stage", "1", "--train", "full", "--epochs", "1",
                  "--latents", "4")
    one = [a if a != str(tmp_path / "x") else str(tmp_path / "one") for a in common]
    two = [a if a != str(tmp_path / "x") else str(tmp_path / "two") for a in common]
    train.main(one)
    tiny.torchrun(2, os.path.join(ROOT, "train.py"), *two)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_kill_and_resume_reproduces_losses(demo, tmp_path, workers):
    """LoRA dropout on, so the resumed run must also restore the RNG exactly; with images
    decoded in worker processes too (a GPU run's default)."""
    common = ["--stage", "1", "--epochs", "2", "--latents", "4", "--save-every", "2", "--workers", workers]
    train.main(args(demo, tmp_path / "full", *common))
    train.main(args(demo, tmp_path / "cut", *common, "--max-steps", "5"))
    assert len(losses(tmp_path / "cut")) == 5
    train.main(args(demo, tmp_path / "cut", *common, "--resume"))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert len(a) == len(b) == 12
    assert a == pytest.approx(b, rel=1e-6)
    # the final checkpoint loads back for evaluation
    m, meta = checkpoint.load_livr(str(tmp_path / "cut" / "stage1" / "final"))
    assert meta["stage"] == 1 and m.num_latents == 4


def test_stage_two_starts_from_stage_one(demo, tmp_path):
    common = ["--epochs", "1", "--latents", "4", "--max-steps", "1"]
    train.main(args(demo, tmp_path, "--stage", "1", *common))
    os.replace(tmp_path / "stage1" / "last", tmp_path / "stage1" / "end")   # as if stage 1 had ended
    train.main(args(demo, tmp_path, "--stage", "2", *common))
    m1, _ = checkpoint.load_livr(str(tmp_path / "stage1" / "end"))
    m2, meta = checkpoint.load_livr(str(tmp_path / "stage2" / "last"))
    assert meta["stage"] == 2 and meta["mask"] == "causal"
    assert not torch.equal(m1.latent_embeds, m2.latent_embeds)


# --- bad input --------------------------------------------------------------------------------

def fails_with(argv, capsys, pattern):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert pattern in err, err


def test_bad_inputs(demo, tmp_path, capsys):
    fails_with(["--stage", "1", "--model", str(tmp_path / "nope"), "--data", demo["train"]],
               capsys, "not a checkpoint directory or a hub id")
    fails_with(args(demo, tmp_path, "--stage", "2"), capsys,
               "run `train.py --stage 1` first")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"images": ["missing.png"], "question": "q?", "choices": ["x", "y"],
                               "answer": "C"}) + "\n")
    fails_with(["--stage", "1", "--model", demo["base"], "--data", str(bad), "--run-dir",
                str(tmp_path)], capsys, "bad.jsonl:1")
    train.main(args(demo, tmp_path / "k", "--stage", "1", "--latents", "4", "--max-steps", "1",
                    "--epochs", "1"))
    fails_with(args(demo, tmp_path / "k", "--stage", "2", "--latents", "8",
                    "--init", str(tmp_path / "k" / "stage1" / "last")), capsys,
               "has 4 latent tokens but --latents is 8")
    fails_with(args(demo, tmp_path / "r", "--stage", "1", "--resume"), capsys, "no checkpoint")


def test_packing_gives_the_same_logits_as_samples_alone(demo):
    """Several samples packed into one sequence (segment ids restart masks and M-RoPE
    positions) give each sample exactly the logits it gets alone, in both stages' masks."""
    proc = data.Processor.from_pretrained(demo["base"], num_latents=4)
    m = checkpoint.load_pretrained(demo["base"], num_latents=4, latent_token_id=proc.latent_token_id)
    model.init_weights(m, std=0.1, seed=5)      # a model whose outputs depend on everything
    encoded = [proc.encode(r) for r in data.load_dataset(demo["train"])[:5]]
    batches = batching.pack(encoded, max_len=260)
    assert len(batches) < len(encoded) and batching.packing_efficiency(batches) > 0.5
    checked = 0
    for b in batches:
        seg_ids = b["segment_ids"][0]
        for stage in (1, 2):
            mask = masks.build_mask(b["kinds"], stage, b["segment_ids"])
            with torch.no_grad():
                packed = m(b["input_ids"], b["pixel_values"], b["image_grid_thw"], mask=mask,
                           segment_ids=b["segment_ids"])[0]
            for seg in seg_ids.unique().tolist():
                if seg == 0:
                    continue
                e = encoded[b["samples"][seg - 1]]
                with torch.no_grad():
                    alone = m(e["input_ids"][None], e["pixel_values"], e["image_grid_thw"],
                              mask=masks.build_mask(e["kinds"], stage)[None])[0]
                assert torch.allclose(packed[seg_ids == seg], alone, atol=1e-4, rtol=1e-4)
                checked += 1
    assert checked == 2 * len(encoded)


def test_prepared_batches_give_the_same_loss_and_accuracy(demo):
    """compute_loss and val_accuracy on batching.prepare_batch's batches (per-sample attention blocks,
    flat logits_at, one read-back) equal the plain dense-mask path, sample by sample."""
    proc = data.Processor.from_pretrained(demo["base"], num_latents=4)
    m = checkpoint.load_pretrained(demo["base"], num_latents=4, latent_token_id=proc.latent_token_id)
    model.init_weights(m, std=0.1, seed=5)
    encoded = [proc.encode(r) for r in data.load_dataset(demo["train"])[:4]]
    plain = batching.collate(encoded, proc.pad_id)
    # make row 0 right and the rest wrong: its labels become the model's own argmax
    with torch.no_grad():
        predicts = torch.zeros_like(plain["labels"], dtype=torch.bool)
        predicts[:, :-1] = plain["labels"][:, 1:] != -100
        pred = m(plain["input_ids"], plain["pixel_values"], plain["image_grid_thw"],
                 mask=masks.build_mask(plain["kinds"], 1, plain["segment_ids"]),
                 segment_ids=plain["segment_ids"], logits_at=predicts).argmax(-1)
    shifted = torch.full_like(plain["labels"], -100)
    shifted[:, 1:][predicts[:, :-1]] = pred
    row0 = shifted[0] != -100
    plain["labels"][0, row0] = shifted[0, row0]
    prepared = batching.prepare_batch(plain, m.cfg)
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0])
    for mode in ("bottleneck", "causal"):
        a, b = train.compute_loss(m, plain, mode), train.compute_loss(m, prepared, mode)
        assert b[1] == a[1] and torch.allclose(b[0], a[0], rtol=1e-5)
        acc = train.val_accuracy(m, [(plain, weight)], mode)
        assert train.val_accuracy(m, [(prepared, weight)], mode) == acc
        if mode == "bottleneck":      # the mode row 0's labels were made in
            assert acc == pytest.approx(1 / 3)


# --- one device in bf16: fp32 masters ---------------------------------------------------------

def test_one_device_bf16_keeps_fp32_masters(demo):
    """bf16 compute on one device (here the CPU) keeps trainable tensors and AdamW's state in
    fp32: a step of ~lr = 1e-5 on latent rows of size ~0.1 is below half a bf16 ulp, so a bf16
    weight would not move at all; the fp32 master must."""
    a = train.parse_args(["--stage", "1", "--latents", "4", "--train", "lora"])
    proc = data.Processor.from_pretrained(demo["base"], num_latents=4)
    m = train.build_model(a, None, demo["base"], proc, torch.device("cpu"))
    autocast = train.mixed_precision(m, torch.bfloat16, torch.device("cpu"))
    params = [p for p in m.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters() if not p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-5)
    batch = batching.collate([proc.encode(r) for r in data.load_dataset(demo["train"])[:2]], proc.pad_id)
    before = m.latent_embeds.detach().clone()
    with autocast():
        ce, n = train.compute_loss(m, batch, "bottleneck")
        logits = m(batch["input_ids"][:1, :8])
    assert logits.dtype == torch.bfloat16                   # the compute ran in bf16
    (ce / n).backward()
    opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    step = (m.latent_embeds.detach() - before).abs()
    assert 2e-6 < step.mean() < 5e-5                         # about lr per element
    # ... which bf16 weights would have rounded away: the same rows cast to bf16 are unchanged
    lost = before.bfloat16() == m.latent_embeds.detach().bfloat16()
    assert lost.float().mean() > 0.9


def test_bf16_run_steps_fp32_masters(demo, tmp_path):
    """train.py itself in bf16 on one device: two runs that differ only in lr (1e-5 vs 2e-5)
    end one step later with latent rows ~1e-5 apart. Stepping bf16 weights would leave both
    runs' rows at their (identical) initial bf16 values."""
    rows = []
    for lr in ("1e-5", "2e-5"):
        run = tmp_path / lr
        train.main(args(demo, run, "--stage", "1", "--latents", "4", "--dtype", "bf16",
                        "--lr", lr, "--warmup", "0", "--max-steps", "1", "--epochs", "1"))
        m, _ = checkpoint.load_livr(str(run / "stage1" / "last"))
        rows.append(m.latent_embeds.detach())
    diff = (rows[0] - rows[1]).abs().mean()
    assert 2e-6 < diff < 5e-5, diff


# --- packing a step into micro-batches ---------------------------------------------------------

def step_gradient(m, micro, mask_mode):
    """The gradient of one optimizer step's loss (summed answer-token cross-entropy over the
    micro-batches / their answer-token count), accumulated micro-batch by micro-batch."""
    m.zero_grad(set_to_none=True)
    n = sum(batching.num_targets(b) for b in micro)
    for b in micro:
        ce, _ = train.compute_loss(m, b, mask_mode)
        (ce / n).backward()
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mask_mode", ["bottleneck", "causal"])
def test_packed_step_gives_the_per_sample_gradient(demo, mask_mode):
    """fp32, no dropout: the global batch packed into one or a few sequences (one segment per
    sample) gives the gradient of the paper's per-sample accumulation, to 1e-5 relative."""
    a = train.parse_args(["--stage", "1", "--latents", "4", "--train", "full"])
    proc = data.Processor.from_pretrained(demo["base"], num_latents=4)
    m = train.build_model(a, None, demo["base"], proc, torch.device("cpu"))
    model.init_weights(m, std=0.1, seed=5)      # a model whose outputs depend on everything
    records = data.load_dataset(demo["train"])
    items = [batching.EncodedRecords(records, proc)[i] for i in range(8)]
    want = step_gradient(m, batching.StepBatches(proc.pad_id, 0, 1)(items), mask_mode)
    for budget in (4096, 200):                   # all 8 in one sequence; several sequences
        micro = batching.StepBatches(proc.pad_id, budget)(items)
        assert len(micro) == (1 if budget == 4096 else 3)
        got = step_gradient(m, micro, mask_mode)
        assert got.keys() == want.keys() and len(want) > 10
        for k in want:
            err = (got[k] - want[k]).norm() / want[k].norm()
            assert err < 1e-5, f"{k}: relative error {err:.2e} with budget {budget}"


@pytest.mark.parametrize("mask_mode", ["bottleneck", "causal"])
def test_fsdp_packed_step_equals_per_sample_accumulation(demo, tmp_path, mask_mode):
    """2 FSDP processes packing their shares (to micro-batch counts that differ between the
    ranks at some steps, so one must run a weight-0 extra pass or the step deadlocks) train as
    one process with one-sample micro-batches: the same loss and gradient norm at every step."""
    proc = data.Processor.from_pretrained(demo["base"], num_latents=4)
    records = data.load_dataset(demo["train"])
    ds, pack = batching.EncodedRecords(records, proc), batching.StepBatches(proc.pad_id, 144)
    counts = [[len(pack([ds[i] for i in ids])) for ids in batching.StepSampler(len(records), 8, r, 2, 42, 0, 3)]
              for r in range(2)]
    assert counts[0] != counts[1]                # the uneven case is exercised
    common = ["--model", demo["base"], "--data", demo["train"], "--stage", "1", "--mask", mask_mode,
              "--train", "full", "--latents", "4", "--global-batch", "8", "--max-steps", "3",
              "--log-every", "100"]
    train.main(common + ["--run-dir", str(tmp_path / "one"), "--micro-batch-tokens", "0", "--batch-size", "1"])
    tiny.torchrun(2, os.path.join(ROOT, "train.py"), *common, "--run-dir", str(tmp_path / "two"),
                  "--micro-batch-tokens", "144", timeout=300)
    metrics = lambda d: [r for r in map(json.loads, open(d / "stage1" / "metrics.jsonl")) if "loss" in r]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


# --- memory ------------------------------------------------------------------------------------

PEAK_RSS = """
import sys, train
try:
    train.main(sys.argv[1:])
finally:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print("peak_rss_kb", int(hwm.split()[1]))
"""


def test_host_memory_does_not_grow_with_the_dataset(demo, tmp_path):
    """The same 4 images (448 px: a 4.8 MB fp32 encoding each) behind 16 and 160 records: the
    training process's peak resident set is the same, because pixels are decoded per step and
    never kept (encoding every sample up front would add ~690 MB for the larger set)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    images = []
    for k in range(4):
        images.append(f"img{k}.png")
        Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(tmp_path / images[-1])
    peaks = []
    for n in (16, 160):
        path = tmp_path / f"train{n}.jsonl"
        path.write_text("".join(json.dumps({"images": [images[i % 4]], "question": "Which?",
                                            "choices": ["x", "y"], "answer": "AB"[i % 2]}) + "\n"
                                for i in range(n)))
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, "--model", demo["base"], "--data", str(path),
                              "--stage", "1", "--latents", "4", "--max-steps", "2", "--workers", "0",
                              "--run-dir", str(tmp_path / f"run{n}")],
                             cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        peaks.append(int(out.stdout.split("peak_rss_kb")[-1]) / 1024)
    assert peaks[1] - peaks[0] < 80, f"peak RSS {peaks[0]:.0f} MB -> {peaks[1]:.0f} MB for 10x the records"


# --- torch.compile ----------------------------------------------------------------------------

@pytest.mark.skipif(not any(map(shutil.which, (os.environ.get("CXX", "g++"), "c++", "clang++"))),
                    reason="torch.compile on CPU needs a C++ compiler, and none is on PATH")
def test_compiled_blocks_give_the_eager_step_without_recompiling(demo):
    """model.compile_blocks (train.py --compile): the packed, prepared LoRA step (per-sample
    blocks, both masks) gives the eager loss and gradient, and other sample counts and lengths
    reuse the compiled graphs (their attention loops stay outside them)."""
    import copy
    import functools

    import torch._dynamo
    a = train.parse_args(["--stage", "1", "--latents", "4", "--train", "lora", "--lora-dropout", "0"])
    proc = data.Processor.from_pretrained(demo["base"], num_latents=4)
    m = train.build_model(a, None, demo["base"], proc, torch.device("cpu"))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:                 # zero at init: make the LoRA path count
                p.normal_(std=0.05)
    eager = copy.deepcopy(m)
    torch._dynamo.reset()
    model.compile_blocks(m)
    prepare = functools.partial(batching.prepare_batch, cfg=m.cfg)
    records = data.load_dataset(demo["train"])
    items = [batching.EncodedRecords(records, proc)[i] for i in range(len(records))]
    one = [x for x, r in zip(items, records) if len(r.images) == 1]      # whole 112-px windows
    mixed = items[::-1]                         # and 56-px images: padded windows, a window mask
    # the first two steps compile each variant a block has (full or window attention, with or
    # without a window mask); the others, other sample counts and lengths, must add no graph
    for i, group in enumerate((mixed[:8], one[:2], mixed[8:11], one[2:7], mixed[11:13])):
        micro = batching.StepBatches(proc.pad_id, 4096, 1, torch.float32, prepare)(group)
        for mode in ("bottleneck", "causal"):
            want, got = step_gradient(eager, micro, mode), step_gradient(m, micro, mode)
            assert got.keys() == want.keys() and any("lora_A" in k for k in want)
            for k in want:
                err = (got[k] - want[k]).norm() / want[k].norm()
                assert err < 1e-5, f"{k}: relative error {err:.2e} with {len(group)} samples, {mode}"
        if i == 1:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
