"""attention.py's block-sparse path (FlexAttention) (train.py --attention flex), against the dense mask
it re-expresses and the per-sample path it may replace.

On CPU (FlexAttention in torch 2.13: forward only, eager): the tiles of both block masks against
the dense masks; the logits of packed and padded batches, Qwen2.5-VL and Qwen3-VL, every mode of
masks.RULES and one rule added here, fp32; the masks made without reading a value back. On a
GPU (skipped without one, `python -m pytest -q -rs tests/test_flex.py`): logits and gradients
equal the dense path's in fp32, the step never waits on the device, compiled blocks take it, and
train.py --attention flex under torchrun follows the per-sample path's losses."""
import pytest
import torch

import attention
import batching
import checkpoint
import demo
import masks
import model
import tiny
import train
import vision

LATENT = 310                       # tiny.VOCAB has room past the special ids for K=4 latents
CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA device: FlexAttention's backward and compiled kernels "
                                 "are tested on a GPU (python -m pytest -q -rs tests/test_flex.py)")
BACKBONES = {"qwen2.5": (tiny.config_dict, 14), "qwen3": (tiny.config_dict3, 16)}   # (config, patch)
# 1-2 images each (partial windows at the edges for Qwen2.5-VL), one sample text-only
SAMPLES = [([(1, 6, 10), (1, 4, 4)], [3, 5, 2], 3), ([(1, 2, 14)], [4, 6], 2), ([], [9], 4),
           ([(1, 4, 6)], [2, 3], 1)]


def rel_err(ours, ref):
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def latents_blind_to_text(kinds, ctx=None):
    """A rule added after attention.py was written: LATENT queries lose their edges to TEXT keys."""
    return ~((kinds == masks.LATENT)[..., :, None] & (kinds == masks.TEXT)[..., None, :])


MODES = [*masks.RULES, "latents_blind_to_text"]


@pytest.fixture(autouse=True)
def added_rule(monkeypatch):
    monkeypatch.setitem(masks.RULES, "latents_blind_to_text", latents_blind_to_text)


@pytest.fixture
def eager_flex(monkeypatch):
    """Eager FlexAttention on CPU as its own debug switch runs it: the same dense math (every
    score, then the mask_mod), without the wrapper that re-traces each call (0.3 s each here)."""
    import torch.nn.attention.flex_attention as fa
    monkeypatch.setattr(fa, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


def sample(grids, text_lens, n_answer, seed, patch):
    """An encode()-shaped sample: tiny.inputs' text and images, 4 latents, text, an answer."""
    ids, pv, thw = tiny.inputs(grids, text_lens, seed=seed, patch=patch)
    answer = torch.randint(0, 290, (n_answer,), generator=torch.Generator().manual_seed(seed + 100))
    kinds = torch.cat([torch.where(ids[0] == tiny.IDS["image_token_id"], masks.IMAGE, masks.TEXT),
                       torch.full((4,), masks.LATENT), torch.full((2,), masks.TEXT),
                       torch.full((n_answer,), masks.ANSWER)])
    ids = torch.cat([ids[0], torch.arange(LATENT, LATENT + 4), torch.tensor([7, 8]), answer])
    return dict(input_ids=ids, labels=torch.where(kinds == masks.ANSWER, ids, -100), kinds=kinds,
                pixel_values=pv, image_grid_thw=thw)


def batches(patch):
    """{"packed": one row of the four samples and 7 padding tokens, "padded": three rows}."""
    enc = [sample(*s, seed=20 + i, patch=patch) for i, s in enumerate(SAMPLES)]
    (packed,) = batching.pack(enc, sum(len(e["input_ids"]) for e in enc) + 7)
    return {"packed": packed, "padded": batching.collate(enc[:3], 0)}


def build(backbone, lora=False):
    config, patch = BACKBONES[backbone]
    m = model.Qwen25VL(checkpoint.config_from_dict(config()), num_latents=4, latent_token_id=LATENT)
    model.init_weights(m, std=0.1)
    if lora:
        model.add_lora(m, 4, 8, 0.0)
        for name, p in m.named_parameters():
            if "lora_B" in name:              # zero at init: make the LoRA path count
                torch.nn.init.normal_(p, std=0.05)
    return m.eval(), patch


# --- the tiles ---------------------------------------------------------------------------------

def listed(bm):
    """A BlockMask's tiles as [B, nq, nk] bools: (partial, full)."""
    def dense(num, idx):
        out = torch.zeros(idx.shape[0], idx.shape[2], idx.shape[3], dtype=torch.bool)
        for b in range(idx.shape[0]):
            for i in range(idx.shape[2]):
                out[b, i, idx[b, 0, i, :num[b, 0, i]].long()] = True
        return out
    return dense(bm.kv_num_blocks, bm.kv_indices), dense(bm.full_kv_num_blocks, bm.full_kv_indices)


def tiles(mask, block):
    """A dense [B, L, L] mask's tiles, padded with False: (any edge, every edge) [B, nq, nk]."""
    pad = -mask.shape[-1] % block
    m = torch.nn.functional.pad(mask, (0, pad, 0, pad))
    n = m.shape[-1] // block
    t = m.view(m.shape[0], n, block, n, block).transpose(2, 3).flatten(3)
    return t.any(-1), t.all(-1)


@pytest.mark.parametrize("mode", MODES)
def test_decoder_tiles_are_the_dense_masks(mode):
    """Every tile of masks.build_mask with an edge is listed; exactly those with no hole run
    without the mask (FlexAttention skips the rest, and eager on CPU never looks at tiles)."""
    seen = set()
    for batch in batches(14).values():
        dense = masks.build_mask(batch["kinds"], mode, batch["segment_ids"])
        bm = attention.decoder_mask(batch["kinds"], mode, batch["segment_ids"], block=8)
        partial, full = listed(bm)
        some, every = tiles(dense, 8)
        assert torch.equal(full, every) and torch.equal(partial, some & ~every)
        seen |= {k for k, t in (("full", full), ("partial", partial), ("empty", ~some)) if t.any()}
        L = dense.shape[-1]
        b, q, kv = (z.flatten() for z in torch.meshgrid(*map(torch.arange, dense.shape), indexing="ij"))
        assert torch.equal(bm.mask_mod(b, 0, q, kv).view_as(dense), dense) and bm.seq_lengths == (L, L)
    assert seen == {"full", "partial", "empty"}             # every kind of tile occurs


@pytest.mark.parametrize("backbone", BACKBONES)
def test_vision_tiles_cover_every_image(backbone):
    """The full-attention mask over all images: each slot sees the real slots of its own frame
    (vision.image_attention's blocks and key masks, with a two-frame grid too); every tile with
    such an edge is listed, and a tile runs unmasked only if it has no hole."""
    config, patch = BACKBONES[backbone]
    cfg = checkpoint.config_from_dict(config()).vision
    thw = torch.tensor([(1, 6, 10), (2, 4, 4), (1, 2, 14), (1, 4, 6)])
    layout = vision.window_layout(thw, cfg)
    S = layout.src.shape[0]
    want = torch.zeros(S, S, dtype=torch.bool)
    for a, t, n, key in layout.images:
        for f in range(t):
            s = a + f * n
            want[s:s + n, s:s + n] = True if key is None else key[f].view(1, n)
    fl = attention.vision_layout(layout, block=16)
    b, q, kv = (z.flatten() for z in torch.meshgrid(torch.zeros(1, dtype=torch.long), torch.arange(S),
                                                    torch.arange(S), indexing="ij"))
    assert torch.equal(fl.block_mask.mask_mod(b, 0, q, kv).view(S, S), want)
    partial, full = listed(fl.block_mask)
    some, every = tiles(want[None], 16)
    assert not (partial & full).any() and torch.equal(some & ~(partial | full), torch.zeros_like(some))
    assert (full <= every).all() and full.any()
    assert torch.equal(fl.src, layout.src) and fl.images == layout.images


@pytest.mark.slow
def test_compiled_flex_on_cpu_reads_the_tiles():
    """Compiled, FlexAttention skips the empty tiles and runs the full ones unmasked (eager it
    looks at the mask_mod alone): on CPU (forward only, ~25 s to compile each mask) both masks
    give SDPA's output under the dense masks they stand for."""
    from torch.nn.attention.flex_attention import flex_attention
    attend = torch.compile(flex_attention, dynamic=True)
    g = torch.Generator().manual_seed(0)
    batch = batches(14)["packed"]
    dense = masks.build_mask(batch["kinds"], "bottleneck", batch["segment_ids"])        # [1, L, L]
    layout = vision.window_layout(torch.tensor([(1, 6, 10), (2, 4, 4), (1, 2, 14)]),
                                  checkpoint.config_from_dict(tiny.config_dict()).vision)
    S = layout.src.shape[0]
    frames = torch.zeros(S, S, dtype=torch.bool)
    for a, t, n, key in layout.images:
        for f in range(t):
            s = a + f * n
            frames[s:s + n, s:s + n] = True if key is None else key[f].view(1, n)
    for want, bm in ((dense, attention.decoder_mask(batch["kinds"], "bottleneck", batch["segment_ids"], block=16)),
                     (frames[None], attention.vision_layout(layout, block=16).block_mask)):
        L = want.shape[-1]
        q, k, v = (torch.randn(1, 4, L, 16, generator=g) for _ in range(3))
        with torch.no_grad():
            got = attend(q, k, v, block_mask=bm)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=want[:, None])
        assert rel_err(got, ref) <= 1e-5


@pytest.mark.slow
def test_compiled_blocks_take_the_flex_path_on_cpu():
    """model.compile_blocks with the flex path (FlexAttention traced inside the compiled decoder
    layers and vision blocks; forward only on CPU, ~1 minute to compile): the eager flex logits."""
    import copy
    m, patch = build("qwen2.5", lora=True)
    m.attention_path = "flex"
    eager = copy.deepcopy(m)
    model.compile_blocks(m)
    p = batching.prepare_batch(batches(patch)["packed"], m.cfg)
    with torch.no_grad():
        got, _, _ = train.forward_batch(m, p, "bottleneck")
        want, _, _ = train.forward_batch(eager, p, "bottleneck")
    assert rel_err(got, want) <= 1e-5


def test_masks_are_made_without_reading_the_device():
    """On `meta` every value read back to the host raises: making both masks never waits."""
    batch = batches(14)["packed"]
    bm = attention.decoder_mask(batch["kinds"].to("meta"), "bottleneck", batch["segment_ids"].to("meta"))
    layout = vision.window_layout(batch["image_grid_thw"], checkpoint.config_from_dict(tiny.config_dict()).vision)
    fl = attention.vision_layout(layout.to("meta"))
    assert bm.kv_indices.is_meta and fl.block_mask.full_kv_indices.is_meta


# --- the model: flex equals the per-sample path and the dense mask ----------------------------

@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", MODES)
def test_flex_logits_equal_the_dense_mask(eager_flex, backbone, mode):
    """Padded (three rows) and packed (four samples, then padding) batches, fp32: the flex path
    gives the dense mask's logits at every real position, also through train.forward_batch
    (m.attention_path, train.py --attention)."""
    m, patch = build(backbone)
    for kind, batch in reversed(batches(patch).items()):        # padded, then packed
        p = batching.prepare_batch(batch, m.cfg)
        ids, pv, thw = batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"]
        seg = batch["segment_ids"]
        with torch.no_grad():
            dense = m(ids, pv, thw, mask=masks.build_mask(batch["kinds"], mode, seg), segment_ids=seg)
            fast = m(ids, pv, thw, mask=attention.decoder_mask(batch["kinds"], mode, seg),
                     vision_layout=attention.vision_layout(p["vision_layout"]), position_ids=p["position_ids"])
        real = seg > 0
        assert rel_err(fast[real], dense[real]) <= 1e-5, kind
    m.attention_path = "flex"            # the packed batch (p) through the training step's forward
    with torch.no_grad():
        out, _, n = train.forward_batch(m, p, mode)
    want = dense.flatten(0, 1)[p["logits_at"]]                 # the dense logits where labels follow
    assert out.shape == (n, m.cfg.text.vocab_size) and rel_err(out, want) <= 1e-5


def test_train_refuses_flex_without_cuda(tmp_path):
    """--attention flex needs a GPU (no CPU backward); the default is the per-sample blocks."""
    a = train.parse_args(["--stage", "1", "--model", str(tmp_path), "--data", "x.jsonl", "--attention", "flex"])
    with pytest.raises(train.RunError, match="--attention flex needs a CUDA device"):
        train.settle_run(a, 0, 1, torch.device("cpu"), print)
    a = train.parse_args(["--stage", "1", "--model", str(tmp_path), "--data", "x.jsonl"])
    train.settle_run(a, 0, 1, torch.device("cpu"), print)
    assert a.attention == "blocks"


# --- on a GPU ---------------------------------------------------------------------------------

@pytest.fixture
def no_tf32():
    """fp32 on CUDA means fp32: TF32 matmuls would differ at ~1e-3."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def grads(m, batch, mode):
    m.zero_grad(set_to_none=True)
    loss, n = train.compute_loss(m, batch, mode)
    (loss / n).backward()
    return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


@CUDA
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("mode", MODES)
def test_flex_logits_and_gradients_equal_dense_on_cuda(no_tf32, backbone, mode):
    """Compiled FlexAttention on CUDA, fp32, a packed batch with LoRA: logits and the gradients
    of every parameter (vision included) equal the dense mask's."""
    m, patch = build(backbone, lora=True)
    m.requires_grad_(True)
    m.to("cuda").train()
    dev = torch.device("cuda")
    raw = batches(patch)["packed"]
    batch, p = batching.to_device(raw, dev), batching.to_device(batching.prepare_batch(raw, m.cfg), dev)
    real = batch["segment_ids"] > 0
    with torch.no_grad():
        dense = m(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                  mask=masks.build_mask(batch["kinds"], mode, batch["segment_ids"]),
                  segment_ids=batch["segment_ids"])
        fast = m(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                 mask=attention.decoder_mask(p["kinds"], mode, p["segment_ids"]), position_ids=p["position_ids"],
                 vision_layout=attention.vision_layout(p["vision_layout"]))
    assert rel_err(fast[real], dense[real]) <= 1e-5
    m.attention_path = "flex"
    loss_flex, got = grads(m, p, mode)
    loss_dense, want = grads(m, batch, mode)           # an unprepared batch: the dense mask
    assert got.keys() == want.keys() and any(k.startswith("visual.") for k in want)
    assert abs(loss_flex.item() - loss_dense.item()) <= 1e-5 * abs(loss_dense.item())
    for k in want:       # (a few are exactly 0 on both paths: a feature no answer can reach)
        assert (got[k] - want[k]).norm().item() <= 1e-4 * want[k].norm().item() + 1e-12, k


@CUDA
@pytest.mark.parametrize("mode", ["bottleneck", "causal"])
def test_flex_step_never_syncs_on_cuda(mode):
    """A bf16 LoRA step on the flex path -- both masks made, forward, backward -- never waits on
    the device once compiled (sync debug mode turns any wait into an error)."""
    m, patch = build("qwen2.5", lora=True)
    for name, p in m.named_parameters():
        p.requires_grad = name == "latent_embeds" or "lora_" in name
    m.to("cuda", torch.bfloat16).train()
    m.attention_path = "flex"
    p = batching.to_device(batching.prepare_batch(batches(patch)["packed"], m.cfg), torch.device("cuda"))
    grads(m, p, mode)                                  # the first step compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, n = train.compute_loss(m, p, mode)
        (loss / n).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item() and m.latent_embeds.grad is not None


@CUDA
def test_compiled_blocks_take_the_flex_path_on_cuda(no_tf32):
    """model.compile_blocks (train.py --compile --attention flex): FlexAttention traced inside the
    compiled blocks gives the eager flex loss and gradients, for two batch shapes."""
    import copy
    m, patch = build("qwen2.5", lora=True)
    for name, p in m.named_parameters():
        p.requires_grad = name == "latent_embeds" or "lora_" in name
    m.to("cuda").train()
    m.attention_path = "flex"
    eager = copy.deepcopy(m)
    model.compile_blocks(m)
    for raw in batches(patch).values():
        p = batching.to_device(batching.prepare_batch(raw, m.cfg), torch.device("cuda"))
        (want_loss, want), (got_loss, got) = grads(eager, p, "bottleneck"), grads(m, p, "bottleneck")
        assert abs(got_loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
        for k in want:
            assert (got[k] - want[k]).norm().item() <= 1e-4 * want[k].norm().item() + 1e-12, k


@CUDA
def test_torchrun_flex_follows_blocks_on_cuda(tmp_path):
    """train.py --attention flex end to end: torchrun (FSDP on NCCL, world size 1), the real loop
    and loader, fp32: the losses of a few steps follow the per-sample path's."""
    from test_cuda import losses, torchrun
    base = demo.make_demo_base(str(tmp_path / "base"))
    splits = demo.make_synthetic(str(tmp_path / "data"), n_train=6, n_val=2, n_test=0, seed=3)
    common = ["--stage", "1", "--model", base, "--data", str(splits["train"]), "--val", str(splits["val"]),
              "--global-batch", "4", "--epochs", "1", "--latents", "4", "--log-every", "1",
              "--lora-dropout", "0", "--dtype", "fp32"]
    torchrun(*common, "--run-dir", str(tmp_path / "blocks"))
    torchrun(*common, "--run-dir", str(tmp_path / "flex"), "--attention", "flex")
    a, b = losses(tmp_path / "blocks", 1), losses(tmp_path / "flex", 1)
    assert len(a) == len(b) > 3
    assert b == pytest.approx(a, rel=1e-3)
