"""The CUDA path: what CPU tests cannot show. Every test here runs only when a CUDA device is
present and is skipped, with the reason printed, when it is not. On a GPU machine:

    python -m pytest -q -rs tests/test_cuda.py

The crashes this guards against are device mix-ups (a tensor built on the host meeting a CUDA
tensor), collectives on CPU tensors under NCCL, and bf16 numerics: parity with transformers in
fp32 on CUDA (TF32 off), a bf16 loss close to the fp32 one, KV-cache generation equal to full
forwards, torchrun with NCCL through both stages and --resume, evaluate.py on CUDA, and the
prepared training step: per-sample attention equal to the dense mask, and no host sync."""
import json
import os
import subprocess
import sys

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
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the GPU path is tested on a GPU machine "
                                       "(python -m pytest -q -rs tests/test_cuda.py)")
GRIDS = [(1, 6, 10), (1, 4, 4), (1, 2, 14)]     # partial windows at the edges, three sizes


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 on CUDA means fp32: TF32 matmuls would differ from the oracle at ~1e-3."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_err(ours, ref):
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def cuda(*xs):
    return [x.cuda() for x in xs]


def test_fp32_logits_match_transformers_on_cuda(tmp_path):
    path = tiny.write_checkpoint(str(tmp_path), seed=1, tied=False)
    ref = tiny.oracle(path).cuda()
    ours = checkpoint.load_pretrained(path, device="cuda")
    ids, pv, thw = cuda(*tiny.inputs(GRIDS, [5, 7, 3, 9]))
    want = tiny.hf_logits(ref, ids, pv, thw)
    with torch.no_grad():
        got = ours(input_ids=ids, pixel_values=pv, image_grid_thw=thw)
        feats_ref = torch.cat(ref.model.get_image_features(pv, thw, return_dict=True).pooler_output)
        feats = ours.visual(pv, thw)
    assert got.device.type == "cuda"
    assert rel_err(got, want) <= 1e-4
    assert rel_err(feats, feats_ref) <= 1e-4
    pos, _ = ref.model.get_rope_index(ids, (ids == tiny.IDS["image_token_id"]).int(), thw)
    assert torch.equal(ours.rope_index(ids, thw), pos)


def test_padded_batch_under_the_bottleneck_mask_on_cuda(tmp_path):
    """Two right-padded rows, explicit bottleneck mask: equals the same rows on the CPU."""
    path = tiny.write_checkpoint(str(tmp_path), seed=3)
    a = tiny.inputs([(1, 4, 6)], [3, 8], seed=4)
    b = tiny.inputs([(1, 2, 2), (1, 6, 4)], [2, 3, 4], seed=5)
    L = max(a[0].shape[1], b[0].shape[1])
    ids, seg = torch.zeros(2, L, dtype=torch.long), torch.zeros(2, L, dtype=torch.long)
    for i, x in enumerate((a, b)):
        ids[i, :x[0].shape[1]], seg[i, :x[0].shape[1]] = x[0][0], 1
    pv, thw = torch.cat([a[1], b[1]]), torch.cat([a[2], b[2]])
    kinds = torch.where(ids == tiny.IDS["image_token_id"], masks.IMAGE, masks.TEXT)
    out = {}
    for dev in ("cpu", "cuda"):
        m = checkpoint.load_pretrained(path, device=dev)
        mask = masks.build_mask(kinds.to(dev), 1, seg.to(dev))
        with torch.no_grad():
            out[dev] = m(ids.to(dev), pv.to(dev), thw.to(dev), mask=mask, segment_ids=seg.to(dev))
    real = seg.bool()
    assert rel_err(out["cuda"].cpu()[real], out["cpu"][real]) <= 1e-4


def test_bf16_loss_is_close_to_fp32_on_cuda(tmp_path):
    """The same batch through the training loss: bf16 weights and compute vs fp32."""
    base = make_demo_base(str(tmp_path / "base"), std=0.1)
    paths = make_synthetic(tmp_path / "data", n_train=2, n_val=0, n_test=0, seed=0)
    proc = data.Processor.from_pretrained(base, num_latents=4)
    batch = batching.collate([proc.encode(r) for r in data.load_dataset(paths["train"])], proc.pad_id)
    losses = {}
    for dt in (torch.float32, torch.bfloat16):
        m = checkpoint.load_pretrained(base, dtype=dt, device="cuda", num_latents=4,
                                  latent_token_id=proc.latent_token_id)
        torch.manual_seed(0)
        m.set_latents(4, proc.latent_token_id)
        with torch.no_grad():
            ce, n = train.compute_loss(m, batching.to_device(batch, torch.device("cuda")), "bottleneck")
        losses[dt] = ce.item() / n
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) <= 2e-2 * abs(losses[torch.float32])


def test_mixed_precision_step_on_cuda(tmp_path):
    """One device in bf16: frozen weights bf16, trainable fp32 masters, the step runs."""
    base = make_demo_base(str(tmp_path / "base"))
    paths = make_synthetic(tmp_path / "data", n_train=2, n_val=0, n_test=0, seed=0)
    a = train.parse_args(["--stage", "1", "--latents", "4", "--train", "lora"])
    proc = data.Processor.from_pretrained(base, num_latents=4)
    dev = torch.device("cuda")
    m = train.build_model(a, None, base, proc, dev)
    autocast = train.mixed_precision(m, torch.bfloat16, dev)
    params = [p for p in m.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.is_cuda for p in params)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters() if not p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-5)
    batch = batching.to_device(batching.collate([proc.encode(r) for r in data.load_dataset(paths["train"])],
                                         proc.pad_id), dev)
    before = m.latent_embeds.detach().clone()
    with autocast():
        ce, n = train.compute_loss(m, batch, "bottleneck")
    (ce / n).backward()
    opt.step()
    assert torch.isfinite(ce) and not torch.equal(before, m.latent_embeds)


def test_generation_with_cache_equals_full_forward_on_cuda(tmp_path):
    path = tiny.write_checkpoint(str(tmp_path), seed=7)
    ours = checkpoint.load_pretrained(path, device="cuda")
    a = tiny.inputs([(1, 4, 6)], [3, 8], seed=8)
    b = tiny.inputs([(1, 2, 2), (1, 4, 4)], [2, 3, 4], seed=9)
    L = max(a[0].shape[1], b[0].shape[1])
    ids, am = torch.zeros(2, L, dtype=torch.long), torch.zeros(2, L, dtype=torch.long)
    for i, x in enumerate((a, b)):
        ids[i, L - x[0].shape[1]:], am[i, L - x[0].shape[1]:] = x[0][0], 1
    ids, am, pv, thw = cuda(ids, am, torch.cat([a[1], b[1]]), torch.cat([a[2], b[2]]))
    new = ours.generate(ids, pv, thw, attention_mask=am, max_new_tokens=6, eos_token_id=-1)
    seq, mask = ids, am
    for i in range(6):
        with torch.no_grad():
            tok = ours(seq, pv, thw, attention_mask=mask)[:, -1].argmax(-1)
        assert torch.equal(tok, new[:, i])
        seq = torch.cat([seq, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    # and under the stage-1 mask at test time (the evaluate.py --mask bottleneck path)
    kinds = torch.where(ids == tiny.IDS["image_token_id"], masks.IMAGE, masks.TEXT)
    assert ours.generate(ids, pv, thw, attention_mask=am, max_new_tokens=3, eos_token_id=-1,
                         kinds=kinds, mask_mode=1).shape == (2, 3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    base = make_demo_base(str(root / "base"))
    splits = make_synthetic(str(root / "data"), n_train=6, n_val=2, n_test=2, seed=3)
    return dict(base=base, train=str(splits["train"]), val=str(splits["val"]),
                test=str(splits["test"]))


def torchrun(*argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--master_port", tiny.free_port(), os.path.join(ROOT, "train.py"), *argv]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def losses(run_dir, stage):
    with open(os.path.join(run_dir, f"stage{stage}", "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_torchrun_nccl_both_stages_resume_and_evaluate(demo, tmp_path):
    """torchrun --nproc_per_node 1 on NCCL: stage 1 (killed after 3 steps, then --resume),
    stage 2 from its checkpoint, then evaluate.py on CUDA. fp32, so the resumed losses equal the
    uninterrupted run's (the CUDA RNG state drives LoRA dropout and must be restored too)."""
    common = ["--model", demo["base"], "--data", demo["train"], "--val", demo["val"],
              "--global-batch", "4", "--epochs", "1", "--latents", "4", "--save-every", "2",
              "--log-every", "1", "--dtype", "fp32"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    out = torchrun("--stage", "1", "--run-dir", full, *common)
    assert "cuda" in out
    torchrun("--stage", "1", "--run-dir", cut, *common, "--max-steps", "3")
    torchrun("--stage", "1", "--run-dir", cut, *common, "--resume")
    a, b = losses(full, 1), losses(cut, 1)
    assert len(a) == len(b) > 3
    assert a == pytest.approx(b, rel=1e-4)
    bf16 = [c for c in common if c not in ("--dtype", "fp32")]       # the GPU default: bf16
    torchrun("--stage", "2", "--run-dir", cut, *bf16)
    assert all(map(lambda x: x == x and abs(x) < 1e4, losses(cut, 2)))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--checkpoint",
                        os.path.join(cut, "stage2", "final"), "--data", demo["test"], "--out",
                        str(tmp_path / "eval"), "--device", "cuda", "--maps", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "mean accuracy" in r.stdout.splitlines()[-1]


# --- the prepared training step (batching.prepare_batch + attention_blocks) ----------------------

@pytest.mark.parametrize("mode", ["bottleneck", "causal"])
def test_prepared_step_equals_dense_and_never_syncs_on_cuda(mode):
    """On CUDA the per-sample blocks take SDPA's fused kernels (KV heads repeated where a mask is
    given): fp32 logits equal the dense mask's; and a bf16 LoRA step of a prepared batch, forward
    and backward, never waits on the device (sync debug mode turns any wait into an error)."""
    from test_model import LATENT, packed_row
    cfg = checkpoint.config_from_dict(tiny.config_dict())
    m = model.Qwen25VL(cfg, num_latents=4, latent_token_id=LATENT)
    model.init_weights(m, std=0.1)
    model.add_lora(m, 4, 8, 0.05)
    for name, p in m.named_parameters():        # as train.py trains it: LoRA + latents
        p.requires_grad = name == "latent_embeds" or "lora_" in name
    m.to("cuda").eval()
    raw = packed_row()
    dev = torch.device("cuda")
    batch, prepared = batching.to_device(raw, dev), batching.to_device(batching.prepare_batch(raw, cfg), dev)
    real = raw["segment_ids"][0] > 0
    with torch.no_grad():
        dense = m(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                  mask=masks.build_mask(batch["kinds"], mode, batch["segment_ids"]),
                  segment_ids=batch["segment_ids"])
        fast = m(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                 mask=model.attention_blocks(prepared["kinds"], mode, prepared["spans"]),
                 position_ids=prepared["position_ids"], vision_layout=prepared["vision_layout"])
    assert rel_err(fast[0, real.cuda()], dense[0, real.cuda()]) <= 1e-5
    m.to(torch.bfloat16).train()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, n = train.compute_loss(m, prepared, mode)
        (loss / n).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item() and m.latent_embeds.grad is not None



def test_compiled_blocks_equal_eager_on_cuda():
    """model.compile_blocks (train.py --compile) on CUDA: Inductor's fused kernels give the eager
    loss and gradients of a prepared LoRA step (fp32, TF32 off), and once compiled the step still
    never waits on the device."""
    import copy
    from test_model import LATENT, packed_row
    cfg = checkpoint.config_from_dict(tiny.config_dict())
    m = model.Qwen25VL(cfg, num_latents=4, latent_token_id=LATENT)
    model.init_weights(m, std=0.1)
    model.add_lora(m, 4, 8, 0.0)
    for name, p in m.named_parameters():
        p.requires_grad = name == "latent_embeds" or "lora_" in name
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    m.to("cuda").train()
    eager = copy.deepcopy(m)
    model.compile_blocks(m)
    prepared = batching.to_device(batching.prepare_batch(packed_row(), cfg), torch.device("cuda"))
    grads = []
    for net in (eager, m, m):                   # the second compiled run: nothing left to compile
        net.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if len(grads) == 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss, n = train.compute_loss(net, prepared, "bottleneck")
            (loss / n).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        grads.append({k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None})
    want = grads[0]
    for got in grads[1:]:
        assert got.keys() == want.keys()
        for k in want:
            assert ((got[k] - want[k]).norm() / want[k].norm()).item() < 1e-4, k


def test_torchrun_nccl_compiled_steps_follow_eager(demo, tmp_path):
    """train.py --compile under FSDP on NCCL in bf16: the compiled blocks train as eager ones
    (losses within bf16 noise over a few steps)."""
    common = ["--stage", "1", "--model", demo["base"], "--data", demo["train"], "--val", demo["val"],
              "--global-batch", "4", "--epochs", "1", "--latents", "4", "--log-every", "1",
              "--lora-dropout", "0"]
    torchrun(*common, "--run-dir", str(tmp_path / "eager"))
    torchrun(*common, "--run-dir", str(tmp_path / "compiled"), "--compile")
    a, b = losses(tmp_path / "eager", 1), losses(tmp_path / "compiled", 1)
    assert len(a) == len(b) > 3
    assert b == pytest.approx(a, rel=3e-2)


def test_a_gpu_runs_loader_pins_the_whole_batch(demo):
    """With pin_memory (train.py's loader on a GPU) every tensor of a prepared batch is pinned,
    the vision layout's too (vision.Layout.pin_memory), so its copy to the device overlaps."""
    import functools
    proc = data.Processor.from_pretrained(demo["base"], num_latents=4)
    cfg = checkpoint.read_config(demo["base"])
    records = data.load_dataset(demo["train"])
    loader = batching.loader(batching.EncodedRecords(records, proc), batching.StepSampler(len(records), 4, 0, 1, 0, 0, 1),
                         batching.StepBatches(proc.pad_id, 4096, 1, torch.bfloat16,
                                          functools.partial(batching.prepare_batch, cfg=cfg)),
                         workers=1, pin_memory=True)
    (batch,) = next(iter(loader))
    layout = batch["vision_layout"]
    assert batch["input_ids"].is_pinned() and batch["pixel_values"].is_pinned()
    assert layout.src.is_pinned() and layout.merged_src.is_pinned()
