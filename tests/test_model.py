"""model.py against transformers' Qwen2_5_VLForConditionalGeneration on random checkpoints
written in the hub's layout: logits, vision features, KV-cache generation, bf16, loader errors."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import batching
import checkpoint
import model
import tiny


def rel_err(ours, ref):
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


# several images of different sizes; grids whose merged size is not a multiple of the window
# (window 56 px = 2x2 merged tokens here) leave partly empty windows at the edges
GRIDS = [(1, 6, 10), (1, 4, 4), (1, 2, 14)]


@pytest.mark.parametrize("opts", [
    dict(),                                         # hub layout, flat config, tied, one file
    dict(tied=False, shards=3),                     # untied head, sharded
    dict(layout="new", form="nested"),              # transformers 5 layout and config form
    dict(heads=8, kv_heads=1),                      # head/KV-head ratio 8
    dict(heads=4, kv_heads=4, tied=False, layout="new", form="flat", shards=2),  # MHA
])
def test_logits_match_transformers(tmp_path, opts):
    path = tiny.write_checkpoint(str(tmp_path), seed=1, **opts)
    ref, ours = tiny.oracle(path), checkpoint.load_pretrained(path)
    ids, pv, thw = tiny.inputs(GRIDS, [5, 7, 3, 9])
    want = tiny.hf_logits(ref, ids, pv, thw)
    with torch.no_grad():
        got = ours(input_ids=ids, pixel_values=pv, image_grid_thw=thw)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-4


def test_one_image_and_text_only(tmp_path):
    path = tiny.write_checkpoint(str(tmp_path), seed=2)
    ref, ours = tiny.oracle(path), checkpoint.load_pretrained(path)
    ids, pv, thw = tiny.inputs([(1, 8, 8)], [4, 6])
    with torch.no_grad():
        assert rel_err(ours(ids, pv, thw), tiny.hf_logits(ref, ids, pv, thw)) <= 1e-4
        text = ids[:, :4]
        assert rel_err(ours(text), tiny.hf_logits(ref, text)) <= 1e-4


def test_batch_with_padding(tmp_path):
    """Batch of 2 right-padded samples with different images: each row equals transformers."""
    path = tiny.write_checkpoint(str(tmp_path), seed=3)
    ref, ours = tiny.oracle(path), checkpoint.load_pretrained(path)
    a = tiny.inputs([(1, 4, 6)], [3, 8], seed=4)
    b = tiny.inputs([(1, 2, 2), (1, 6, 4)], [2, 3, 4], seed=5)
    L = max(a[0].shape[1], b[0].shape[1])
    ids = torch.zeros(2, L, dtype=torch.long)
    am = torch.zeros(2, L, dtype=torch.long)
    for i, x in enumerate((a, b)):
        ids[i, :x[0].shape[1]] = x[0][0]
        am[i, :x[0].shape[1]] = 1
    pv, thw = torch.cat([a[1], b[1]]), torch.cat([a[2], b[2]])
    want = tiny.hf_logits(ref, ids, pv, thw, attention_mask=am)
    with torch.no_grad():
        got = ours(ids, pv, thw, attention_mask=am)
    real = am.bool()
    assert rel_err(got[real], want[real]) <= 1e-4


def test_vision_features_match(tmp_path):
    path = tiny.write_checkpoint(str(tmp_path), seed=6)
    ref, ours = tiny.oracle(path), checkpoint.load_pretrained(path)
    _, pv, thw = tiny.inputs(GRIDS, [1, 1, 1, 1])
    with torch.no_grad():
        want = torch.cat(ref.model.get_image_features(pv, thw, return_dict=True).pooler_output)
        got = ours.visual(pv, thw)
    assert rel_err(got, want) <= 1e-4


def test_rope_index_matches_transformers(tmp_path):
    path = tiny.write_checkpoint(str(tmp_path), seed=0)
    ref, ours = tiny.oracle(path), checkpoint.load_pretrained(path)
    ids, pv, thw = tiny.inputs(GRIDS, [5, 7, 3, 9])
    want, _ = ref.model.get_rope_index(ids, (ids == tiny.IDS["image_token_id"]).int(), thw)
    assert torch.equal(ours.rope_index(ids, thw), want)


def test_generation_with_cache_equals_full_forward(tmp_path):
    path = tiny.write_checkpoint(str(tmp_path), seed=7)
    ours = checkpoint.load_pretrained(path)
    ref = tiny.oracle(path)
    a = tiny.inputs([(1, 4, 6)], [3, 8], seed=8)
    b = tiny.inputs([(1, 2, 2), (1, 4, 4)], [2, 3, 4], seed=9)
    # left-pad the prompts, as generation does
    L = max(a[0].shape[1], b[0].shape[1])
    ids = torch.zeros(2, L, dtype=torch.long)
    am = torch.zeros(2, L, dtype=torch.long)
    for i, x in enumerate((a, b)):
        ids[i, L - x[0].shape[1]:] = x[0][0]
        am[i, L - x[0].shape[1]:] = 1
    pv, thw = torch.cat([a[1], b[1]]), torch.cat([a[2], b[2]])
    new = ours.generate(ids, pv, thw, attention_mask=am, max_new_tokens=6, eos_token_id=-1)
    assert new.shape == (2, 6)
    # greedy tokens from step-by-step full forwards (no cache) must be the same
    seq, mask = ids, am
    for i in range(6):
        with torch.no_grad():
            logits = ours(seq, pv, thw, attention_mask=mask)[:, -1]
        tok = logits.argmax(-1)
        assert torch.equal(tok, new[:, i])
        seq = torch.cat([seq, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    # and transformers' own generate agrees
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=am, pixel_values=pv, image_grid_thw=thw,
                           mm_token_type_ids=(ids == tiny.IDS["image_token_id"]).int(),
                           max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out[:, L:], new)


def test_cached_decode_logits_equal_full_forward(tmp_path):
    """Prefill + decode through the KV cache gives the same logits as one full forward."""
    path = tiny.write_checkpoint(str(tmp_path), seed=10)
    ours = checkpoint.load_pretrained(path)
    ids, pv, thw = tiny.inputs([(1, 4, 4)], [3, 10], seed=11)
    step, full = tiny.cached_and_full_logits(ours, ids, pv, thw)
    assert rel_err(step, full) <= 1e-4


def test_bf16_close_to_fp32(tmp_path):
    path = tiny.write_checkpoint(str(tmp_path), seed=12, dtype=torch.bfloat16)
    m16 = checkpoint.load_pretrained(path, dtype=None)
    assert m16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    m32 = checkpoint.load_pretrained(path)
    ids, pv, thw = tiny.inputs([(1, 4, 6)], [3, 5], seed=13)
    with torch.no_grad():
        a, b = m16(ids, pv, thw).float(), m32(ids, pv, thw)
    assert torch.isfinite(a).all()
    assert rel_err(a, b) < 0.1
    # the same greedy predictions almost everywhere
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def _corrupt(path, fn):
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_loader_missing_key(tmp_path):
    path = tiny.write_checkpoint(str(tmp_path))
    _corrupt(path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        checkpoint.load_pretrained(path)


def test_loader_extra_key(tmp_path):
    path = tiny.write_checkpoint(str(tmp_path))
    _corrupt(path, lambda sd: sd.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.9.extra.weight' in .*model.safetensors"):
        checkpoint.load_pretrained(path)


def test_loader_wrong_shape(tmp_path):
    path = tiny.write_checkpoint(str(tmp_path))
    _corrupt(path, lambda sd: sd.update({"visual.merger.mlp.0.bias": torch.zeros(7)}))
    with pytest.raises(ValueError, match=r"'visual.merger.mlp.0.bias' in .*has shape \(7,\)"):
        checkpoint.load_pretrained(path)


def test_loader_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        (tmp_path / "config.json").write_text(json.dumps(tiny.config_dict()))
        checkpoint.load_pretrained(str(tmp_path))


def test_save_pretrained_round_trip(tmp_path):
    """Our writer produces files that both we and transformers load to the same logits."""
    src = tiny.write_checkpoint(str(tmp_path / "a"), seed=14, heads=4, kv_heads=2)
    m = checkpoint.load_pretrained(src)
    checkpoint.save_pretrained(m, str(tmp_path / "b"), max_shard_bytes=200_000)
    ids, pv, thw = tiny.inputs([(1, 4, 6)], [3, 5], seed=15)
    with torch.no_grad():
        want = m(ids, pv, thw)
        got = checkpoint.load_pretrained(str(tmp_path / "b"))(ids, pv, thw)
    assert torch.equal(got, want)
    assert rel_err(tiny.hf_logits(tiny.oracle(str(tmp_path / "b")), ids, pv, thw), want) <= 1e-4


def test_config_forms_agree():
    flat = checkpoint.config_from_dict(tiny.config_dict(form="flat"))
    nested = checkpoint.config_from_dict(tiny.config_dict(form="nested"))
    assert flat == nested
    assert checkpoint.config_from_dict(checkpoint.config_to_dict(flat)) == flat


# --- the prepared batch and the per-sample attention blocks (training's fast path) -----------

LATENT = 310                      # tiny.VOCAB has room past the special ids for K=4 latents


def sample(grids, text_lens, n_answer, seed):
    """An encode()-shaped sample: tiny.inputs' text and images, 4 latents, then an answer."""
    import masks
    ids, pv, thw = tiny.inputs(grids, text_lens, seed=seed)
    ids = ids[0]
    g = torch.Generator().manual_seed(seed + 100)
    answer = torch.randint(0, 290, (n_answer,), generator=g)
    kinds = torch.where(ids == tiny.IDS["image_token_id"], masks.IMAGE, masks.TEXT)
    ids = torch.cat([ids, torch.arange(LATENT, LATENT + 4), torch.tensor([7, 8]), answer])
    kinds = torch.cat([kinds, torch.full((4,), masks.LATENT), torch.full((2,), masks.TEXT),
                       torch.full((n_answer,), masks.ANSWER)])
    return dict(input_ids=ids, labels=torch.where(kinds == masks.ANSWER, ids, -100), kinds=kinds,
                pixel_values=pv, image_grid_thw=thw)


def packed_row():
    """One packed row of four samples (1-2 images each, one text-only) and padding at its end."""
    enc = [sample([(1, 6, 10), (1, 4, 4)], [3, 5, 2], 3, seed=20),
           sample([(1, 2, 14)], [4, 6], 2, seed=21),
           sample([], [9], 4, seed=22),
           sample([(1, 4, 6)], [2, 3], 1, seed=23)]
    L = sum(len(e["input_ids"]) for e in enc) + 7
    (batch,) = batching.pack(enc, L)
    return batch


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    path = tiny.write_checkpoint(str(tmp_path_factory.mktemp("fast")), seed=16)
    m = checkpoint.load_pretrained(path, num_latents=4, latent_token_id=LATENT)
    m.requires_grad_(True)
    return m


def test_prepare_batch(latent_model):
    import masks
    cfg, batch = latent_model.cfg, packed_row()
    p = batching.prepare_batch(batch, cfg)
    assert torch.equal(p["position_ids"], latent_model.rope_index(batch["input_ids"], batch["image_grid_thw"],
                                                                  batch["segment_ids"]))
    labels = batch["labels"][0]
    predicts = labels[1:] != -100
    assert torch.equal(p["logits_at"], predicts.nonzero()[:, 0]) and p["n_targets"] == int(predicts.sum())
    assert torch.equal(p["targets"], labels[1:][predicts])
    ends = [e for _, _, e in p["spans"]]
    assert [s for _, s, _ in p["spans"]] == [0] + ends[:-1] and ends[-1] == batch["input_ids"].shape[1] - 7
    # the per-sample blocks are exactly the dense mask's diagonal blocks, and nothing is off them
    dense = masks.build_mask(batch["kinds"], 1, batch["segment_ids"])[0]
    covered = torch.zeros_like(dense)
    for b, s, e, block in model.attention_blocks(batch["kinds"], 1, p["spans"]):
        assert torch.equal(block, dense[s:e, s:e])
        covered[s:e, s:e] = True
    assert not (dense & ~covered)[:ends[-1]].any()
    bad = {**batch, "input_ids": batch["input_ids"].clone()}
    bad["input_ids"][0, (bad["input_ids"][0] == tiny.IDS["image_token_id"]).nonzero()[0]] = 5
    with pytest.raises(ValueError, match="<|image_pad|> tokens but"):
        batching.prepare_batch(bad, cfg)


@pytest.mark.parametrize("mode", ["bottleneck", "causal"])
def test_block_attention_equals_dense_mask(latent_model, mode):
    """The prepared batch + per-sample blocks give the dense path's logits (every real position)
    and loss gradients (every parameter, vision included), fp32."""
    import masks
    import train
    m, batch = latent_model, packed_row()
    prepared = batching.prepare_batch(batch, m.cfg)
    real = batch["segment_ids"][0] > 0
    with torch.no_grad():
        dense = m(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                  mask=masks.build_mask(batch["kinds"], mode, batch["segment_ids"]),
                  segment_ids=batch["segment_ids"])
        fast = m(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                 mask=model.attention_blocks(batch["kinds"], mode, prepared["spans"]),
                 position_ids=prepared["position_ids"], vision_layout=prepared["vision_layout"])
    assert rel_err(fast[0, real], dense[0, real]) <= 1e-5

    grads = []
    m.train()
    for b, ckpt in ((batch, False), (prepared, False), (prepared, True)):  # True: activation checkpointing
        m.zero_grad()
        m.grad_checkpointing = ckpt
        loss, n = train.compute_loss(m, b, mode)
        (loss / n).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    m.zero_grad()
    m.grad_checkpointing = False
    m.eval()
    assert grads[0].keys() == grads[1].keys() == grads[2].keys() and "latent_embeds" in grads[0]
    assert any(k.startswith("visual.") for k in grads[0])
    for k in grads[0]:
        assert rel_err(grads[1][k], grads[0][k]) <= 1e-5, k
        assert rel_err(grads[2][k], grads[0][k]) <= 1e-5, k


@pytest.mark.parametrize("mode", ["bottleneck", "causal"])
def test_prepared_step_never_reads_the_device(mode):
    """Forward + backward of a prepared batch on the `meta` device, where every value read back
    to the host (.item(), bool(), nonzero, boolean indexing, .cpu()) raises: the training step
    queues GPU work without waiting on it. The unprepared path does read back, and fails here."""
    import train
    cfg = checkpoint.config_from_dict(tiny.config_dict())
    with torch.device("meta"):
        m = model.Qwen25VL(cfg, num_latents=4, latent_token_id=LATENT)
    model.add_lora(m, 4, 8, 0.05)
    m.to("meta").train()
    on_meta = lambda b: {k: v.to("meta") if hasattr(v, "to") else v for k, v in b.items()}
    loss, n = train.compute_loss(m, on_meta(batching.prepare_batch(packed_row(), cfg)), mode)
    (loss / n).backward()
    assert n == 10 and m.latent_embeds.grad is not None
    with pytest.raises(NotImplementedError):
        train.compute_loss(m, on_meta(packed_row()), mode)


def test_rope_angles_survive_a_cast_to_bf16():
    """train.py casts a one-device model with m.to(torch.bfloat16): the M-RoPE angles must stay
    the fp32 ones (a bf16 frequency is off by radians at position 4000)."""
    rope = model.MRoPE(model.TextConfig())
    pos = torch.arange(4000).expand(3, 1, -1)
    want = rope(pos, torch.float32)
    got = rope.to(torch.bfloat16)(pos, torch.float32)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
