"""Qwen3-VL: model.py/vision.py with the config's Qwen3-VL switches against transformers'
Qwen3VLForConditionalGeneration on random checkpoints in the hub's layout (tiny.write_checkpoint
with family="qwen3"): logits, vision and deepstack features, positions, KV-cache generation,
the loader's strict checks, our writer; then LIVR on it (prepared batches, the bottleneck)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import batching
import checkpoint
import demo
import masks
import model
import tiny


def rel_err(ours, ref):
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def write(path, **kw):
    return tiny.write_checkpoint(str(path), family="qwen3", **kw)


def inputs(grids, text_lens, seed=0):
    return tiny.inputs(grids, text_lens, seed=seed, patch=16)


# several images of different sizes, non-square, one smaller and one larger than the learned
# position grid (6x6 here), so the bilinear resampling both shrinks and stretches
GRIDS = [(1, 6, 10), (1, 4, 4), (1, 2, 14)]


@pytest.mark.parametrize("opts", [
    dict(),                                                   # the hub's form, tied, one file
    dict(tied=False, form="t5", shards=3),                    # untied head, transformers 5's config
    dict(heads=8, kv_heads=1, head_dim=16, section=(2, 2, 2)),  # GQA 8, M-RoPE sections short of head_dim/2
    dict(heads=4, kv_heads=4, tied=False, layers=2, deepstack=(0, 1, 2), depth=3,
         num_position_embeddings=64),                         # MHA; more deepstack levels than layers
    dict(deepstack=(), section=(6, 3, 3), hidden=96, head_dim=16),  # no deepstack; hidden != heads*head_dim
])
def test_logits_match_transformers(tmp_path, opts):
    path = write(tmp_path, seed=1, **opts)
    ref, ours = tiny.oracle(path), checkpoint.load_pretrained(path)
    assert ours.cfg.qwen3 and not ours.cfg.vision.window_size
    ids, pv, thw = inputs(GRIDS, [5, 7, 3, 9])
    want = tiny.hf_logits(ref, ids, pv, thw)
    with torch.no_grad():
        got = ours(input_ids=ids, pixel_values=pv, image_grid_thw=thw)
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-4


def test_text_only_and_one_image(tmp_path):
    path = write(tmp_path, seed=2)
    ref, ours = tiny.oracle(path), checkpoint.load_pretrained(path)
    ids, pv, thw = inputs([(1, 8, 8)], [4, 6])
    with torch.no_grad():
        assert rel_err(ours(ids, pv, thw), tiny.hf_logits(ref, ids, pv, thw)) <= 1e-4
        text = ids[:, :4]
        assert rel_err(ours(text), tiny.hf_logits(ref, text)) <= 1e-4


def padded(samples, left=False):
    L = max(x[0].shape[1] for x in samples)
    ids = torch.zeros(len(samples), L, dtype=torch.long)
    am = torch.zeros(len(samples), L, dtype=torch.long)
    for i, x in enumerate(samples):
        n = x[0].shape[1]
        sl = slice(L - n, L) if left else slice(0, n)
        ids[i, sl], am[i, sl] = x[0][0], 1
    return ids, am, torch.cat([x[1] for x in samples]), torch.cat([x[2] for x in samples])


@pytest.mark.parametrize("left", [False, True])
def test_batch_with_padding(tmp_path, left):
    """A right- or left-padded batch of 3 samples with 1, 2 and 0 images: each row equals transformers."""
    path = write(tmp_path, seed=3, tied=False)
    ref, ours = tiny.oracle(path), checkpoint.load_pretrained(path)
    ids, am, pv, thw = padded([inputs([(1, 4, 6)], [3, 8], seed=4),
                               inputs([(1, 2, 2), (1, 6, 4)], [2, 3, 4], seed=5),
                               inputs([], [11], seed=6)], left=left)
    want = tiny.hf_logits(ref, ids, pv, thw, attention_mask=am)
    with torch.no_grad():
        got = ours(ids, pv, thw, attention_mask=am)
    real = am.bool()
    assert rel_err(got[real], want[real]) <= 1e-4


def test_vision_and_deepstack_features_match(tmp_path):
    path = write(tmp_path, seed=6, deepstack=(0, 2))
    ref, ours = tiny.oracle(path), checkpoint.load_pretrained(path)
    _, pv, thw = inputs(GRIDS + [(2, 4, 2)], [1, 1, 1, 1, 1])     # a 2-frame entry too
    with torch.no_grad():
        out = ref.model.get_image_features(pv, thw, return_dict=True)
        feats, deep = ours.visual(pv, thw, deepstack=True)
        assert torch.equal(ours.visual(pv, thw), feats)
    assert rel_err(feats, torch.cat(out.pooler_output)) <= 1e-5
    assert len(deep) == len(out.deepstack_features) == 2
    for a, b in zip(deep, out.deepstack_features):
        assert rel_err(a, torch.cat(b)) <= 1e-5


def test_rope_index_matches_transformers(tmp_path):
    path = write(tmp_path, seed=0)
    ref, ours = tiny.oracle(path), checkpoint.load_pretrained(path)
    ids, am, pv, thw = padded([inputs(GRIDS, [5, 7, 3, 9]), inputs([(1, 2, 4)], [2, 3], seed=1)])
    want, _ = ref.model.get_rope_index(ids, (ids == tiny.IDS["image_token_id"]).int(), thw,
                                       attention_mask=am)
    assert torch.equal(ours.rope_index(ids, thw, am), want)


def test_generate_equals_transformers(tmp_path):
    path = write(tmp_path, seed=7)
    ours, ref = checkpoint.load_pretrained(path), tiny.oracle(path)
    ids, am, pv, thw = padded([inputs([(1, 4, 6)], [3, 8], seed=8),
                               inputs([(1, 2, 2), (1, 4, 4)], [2, 3, 4], seed=9)], left=True)
    new = ours.generate(ids, pv, thw, attention_mask=am, max_new_tokens=6, eos_token_id=-1)
    assert new.shape == (2, 6)
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=am, pixel_values=pv, image_grid_thw=thw,
                           mm_token_type_ids=(ids == tiny.IDS["image_token_id"]).int(),
                           max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out[:, ids.shape[1]:], new)


def test_cached_decode_logits_equal_full_forward(tmp_path):
    path = write(tmp_path, seed=10)
    ours = checkpoint.load_pretrained(path)
    ids, pv, thw = inputs([(1, 4, 4)], [3, 10], seed=11)
    step, full = tiny.cached_and_full_logits(ours, ids, pv, thw)
    assert rel_err(step, full) <= 1e-4


def _corrupt(path, fn):
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_loader_is_strict(tmp_path):
    path = write(tmp_path / "a")
    _corrupt(path, lambda sd: sd.pop("model.visual.deepstack_merger_list.1.linear_fc2.bias"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.visual.deepstack_merger_list.1.linear_fc2.bias'"):
        checkpoint.load_pretrained(path)
    path = write(tmp_path / "b")
    _corrupt(path, lambda sd: sd.update({"model.visual.pos_embed.weight": torch.zeros(49, 48)}))
    with pytest.raises(ValueError, match=r"'model.visual.pos_embed.weight' in .*has shape \(49, 48\)"):
        checkpoint.load_pretrained(path)
    path = write(tmp_path / "c")
    _corrupt(path, lambda sd: sd.update({"model.language_model.layers.0.self_attn.q_proj.bias": torch.zeros(96)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.language_model.layers.0.self_attn.q_proj.bias'"):
        checkpoint.load_pretrained(path)


def test_legacy_key_layout_loads_the_same(tmp_path):
    """`visual.*` / `model.*` keys (the older layout, which transformers 5 reads for Qwen2.5-VL
    only) load into the same model as the hub's `model.visual.*` / `model.language_model.*`."""
    a = checkpoint.load_pretrained(write(tmp_path / "hub", seed=4))
    b = checkpoint.load_pretrained(write(tmp_path / "legacy", seed=4, layout="legacy"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unsupported_model_type(tmp_path):
    cfg = tiny.config_dict3()
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3_vl_moe"}))
    with pytest.raises(checkpoint.CheckpointError, match="qwen3_vl_moe"):
        checkpoint.load_pretrained(str(tmp_path))


def test_config_forms_agree():
    hub = checkpoint.config_from_dict(tiny.config_dict3(form="hub"))
    t5 = checkpoint.config_from_dict(tiny.config_dict3(form="t5"))
    assert hub == t5 and hub.qwen3 and hub.text.head_dim == 24 and hub.vision.patch_size == 16
    assert checkpoint.config_from_dict(checkpoint.config_to_dict(hub)) == hub


def test_config_defaults_are_transformers():
    """A key the file leaves out means what transformers' Qwen3VL*Config says it means."""
    from transformers import Qwen3VLConfig
    assert checkpoint.config_from_dict({"model_type": "qwen3_vl"}) == checkpoint.config_from_dict(Qwen3VLConfig().to_dict())


def test_bf16_close_to_fp32(tmp_path):
    path = write(tmp_path, seed=12, dtype=torch.bfloat16)
    m16, m32 = checkpoint.load_pretrained(path, dtype=None), checkpoint.load_pretrained(path)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    ids, pv, thw = inputs([(1, 4, 6)], [3, 5], seed=13)
    with torch.no_grad():
        a, b = m16(ids, pv, thw).float(), m32(ids, pv, thw)
    assert torch.isfinite(a).all() and rel_err(a, b) < 0.1
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_save_pretrained_round_trip(tmp_path):
    """Our writer's files (transformers 5 names, nested config) load in both to the same logits."""
    src = write(tmp_path / "a", seed=14, tied=False)
    m = checkpoint.load_pretrained(src)
    checkpoint.save_pretrained(m, str(tmp_path / "b"), max_shard_bytes=200_000)
    ids, pv, thw = inputs([(1, 4, 6)], [3, 5], seed=15)
    with torch.no_grad():
        want = m(ids, pv, thw)
        got = checkpoint.load_pretrained(str(tmp_path / "b"))(ids, pv, thw)
    assert torch.equal(got, want)
    assert rel_err(tiny.hf_logits(tiny.oracle(str(tmp_path / "b")), ids, pv, thw), want) <= 1e-4


def test_preset_4b_shapes():
    cfg = model.preset("4b")
    t, v = cfg.text, cfg.vision
    assert cfg.qwen3 and (t.hidden_size, t.num_hidden_layers, t.head_dim, t.mrope_section) == (2560, 36, 128, [24, 20, 20])
    assert (v.depth, v.hidden_size, v.patch_size, v.deepstack_visual_indexes) == (24, 1024, 16, (5, 11, 17))
    assert checkpoint.config_from_dict(checkpoint.config_to_dict(cfg)) == cfg


# --- the processor: Qwen3-VL's image settings and chat template ------------------------------

K = 4


@pytest.fixture(scope="module")
def ckpt3(tmp_path_factory):
    return demo.build_tokenizer(tmp_path_factory.mktemp("tok3"), family="qwen3")


@pytest.fixture(scope="module")
def proc3(ckpt3):
    import data
    return data.Processor.from_pretrained(ckpt3, num_latents=K)


@pytest.fixture(scope="module")
def hf3(ckpt3, proc3):
    import transformers

    class ImageOnlyProcessor(transformers.Qwen3VLProcessor):
        # the video processor needs torchvision; image-only use never touches it
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    tok = transformers.AutoTokenizer.from_pretrained(ckpt3)
    tok.add_tokens(proc3.latent_tokens, special_tokens=True)
    image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(ckpt3)
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None,
                              chat_template=tok.chat_template)


def test_processor_reads_qwen3_settings(ckpt3, proc3, tmp_path):
    import data
    c = proc3.image_config
    assert (c.patch_size, c.image_mean, c.image_std, c.min_pixels, c.max_pixels) == \
        (16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 65536, 16777216)
    assert proc3.patch_dim == 1536 and proc3.system_prompt is None
    assert proc3.latent_token_id == proc3.tokenizer.token_to_id("</think>") + 1
    # a Qwen3-VL checkpoint whose preprocessor file leaves keys out gets Qwen3-VL's, not Qwen2.5-VL's
    (tmp_path / "config.json").write_text(json.dumps(tiny.config_dict3()))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"merge_size": 2}))
    assert data.ImageConfig.from_pretrained(tmp_path) == data.ImageConfig.qwen3()


@pytest.mark.parametrize("w,h", [(10, 10), (640, 480), (57, 300), (3000, 2000), (33, 1500)])
def test_preprocess_matches_transformers(ckpt3, proc3, w, h):
    import numpy as np
    import transformers
    from PIL import Image
    rng = np.random.default_rng([w, h])
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    ref = transformers.Qwen2VLImageProcessorPil.from_pretrained(ckpt3)(images=[image], return_tensors="np")
    pv, thw = proc3.preprocess(image)
    assert list(thw) == ref["image_grid_thw"][0].tolist()
    assert pv.shape == ref["pixel_values"].shape == (int(np.prod(thw)), 1536)
    np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_answer", [False, True])
@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_token_ids_match_qwen3_chat_template(proc3, hf3, with_answer, n_images):
    import numpy as np
    import data
    from PIL import Image
    rng = np.random.default_rng(n_images)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for w, h in [(100, 60), (300, 300), (31, 400)][:n_images]]
    q = data.format_prompt("Which image is more similar to the first image?", ["the second", "the third"])
    sample = data.Sample(images=images, question=q, answer="(A)")
    enc = proc3.encode(sample, with_answer=with_answer)
    latents = "".join(proc3.latent_tokens)
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": q + latents}]
    messages = [{"role": "user", "content": content}]
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": data.normalize_answer("(A)")}]})
    ref = hf3.apply_chat_template(messages, tokenize=True, add_generation_prompt=not with_answer,
                                  return_dict=True, return_tensors="np")
    ref_ids = ref["input_ids"][0].tolist()
    if with_answer:   # the template ends the answer turn with "<|im_end|>\n"; ours ends at <|im_end|>
        assert proc3.tokenizer.decode([ref_ids[-1]]) == "\n"
        ref_ids = ref_ids[:-1]
    assert enc["input_ids"].tolist() == ref_ids
    assert not proc3.decode(enc["input_ids"], skip_special_tokens=False).startswith("<|im_start|>system")
    if images:
        assert enc["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
        np.testing.assert_allclose(enc["pixel_values"].numpy(), ref["pixel_values"], atol=1e-5, rtol=0)
    else:
        assert enc["pixel_values"].shape == (0, 1536)


# --- LIVR on Qwen3-VL: latents, masks, LoRA, packing, train.py, evaluate.py --------------------

@pytest.fixture(scope="module")
def base3(tmp_path_factory):
    """A tiny random Qwen3-VL base with its tokenizer, and a small synthetic data set."""
    root = tmp_path_factory.mktemp("base3")
    base = tiny.write_qwen3_base(str(root / "base"), std=0.1)
    splits = demo.make_synthetic(str(root / "data"), n_train=6, n_val=2, n_test=4, seed=3)
    return dict(base=base, train=str(splits["train"]), val=str(splits["val"]), test=str(splits["test"]))


def test_bottleneck_cuts_the_path_with_deepstack(base3):
    """Under the stage-1 mask the answer sees the image only through the latents, although
    DeepStack adds image features inside the decoder (at the image positions only)."""
    import data
    record = data.load_dataset(base3["train"])[0]
    for k in (0, 4):
        proc = data.Processor.from_pretrained(base3["base"], num_latents=k)
        m = checkpoint.load_pretrained(base3["base"], num_latents=k, latent_token_id=proc.latent_token_id)
        assert m.cfg.qwen3 and m.cfg.vision.deepstack_visual_indexes
        enc = proc.encode(record)
        out = []
        for seed in (0, 1):
            pv = torch.randn(enc["pixel_values"].shape, generator=torch.Generator().manual_seed(seed)) * 3
            with torch.no_grad():
                logits = m(enc["input_ids"][None], pv, enc["image_grid_thw"],
                           mask=masks.build_mask(enc["kinds"], 1)[None])
            out.append(logits[0, enc["kinds"] == masks.ANSWER])
        if k == 0:
            assert torch.equal(out[0], out[1]), "answer saw the image without latents"
        else:
            assert (out[0] - out[1]).abs().max() > 1e-3, "latents did not carry the image"
    # and the deepstack path is live: under the causal mask the answer does see the image
    with torch.no_grad():
        a, b = (m(enc["input_ids"][None], torch.randn(enc["pixel_values"].shape, generator=torch.Generator().manual_seed(s)),
                  enc["image_grid_thw"]) for s in (0, 1))
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["bottleneck", "answer_only", "causal"])
def test_prepared_packed_batch_equals_dense_mask(base3, mode):
    """Packed samples made ready on the host (prepare_batch: Qwen3-VL's full-attention layout and
    positions) with per-sample attention blocks give the dense-mask logits and gradients, LoRA on."""
    import data
    import train
    proc = data.Processor.from_pretrained(base3["base"], num_latents=4)
    m = checkpoint.load_pretrained(base3["base"], num_latents=4, latent_token_id=proc.latent_token_id)
    model.add_lora(m, rank=4, alpha=8, dropout=0.0)
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    encoded = [proc.encode(r) for r in data.load_dataset(base3["train"])[:4]]
    (batch,) = batching.pack(encoded, sum(len(e["input_ids"]) for e in encoded) + 5)
    prepared = batching.prepare_batch(batch, m.cfg)
    assert prepared["vision_layout"].pos_index is not None
    real = batch["segment_ids"][0] > 0
    with torch.no_grad():
        dense = m(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                  mask=masks.build_mask(batch["kinds"], mode, batch["segment_ids"]),
                  segment_ids=batch["segment_ids"])
        fast = m(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                 mask=model.attention_blocks(batch["kinds"], mode, prepared["spans"]),
                 position_ids=prepared["position_ids"], vision_layout=prepared["vision_layout"])
        for i, e in enumerate(encoded):       # each packed sample equals the sample alone
            alone = m(e["input_ids"][None], e["pixel_values"], e["image_grid_thw"],
                      mask=masks.build_mask(e["kinds"], mode)[None])[0]
            assert rel_err(dense[0, batch["segment_ids"][0] == i + 1], alone) <= 1e-5
    assert rel_err(fast[0, real], dense[0, real]) <= 1e-5
    m.train()
    grads = []
    for b in (batch, prepared):
        m.zero_grad()
        loss, n = train.compute_loss(m, b, mode)
        (loss / n).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "latent_embeds" in grads[0]
    for k in grads[0]:   # (some are exactly 0: a deepstack feature added after the last layer the latents feed)
        g, want = grads[1][k], grads[0][k]
        assert (g - want).abs().max() <= 1e-5 * want.abs().max() + 1e-12, k


def test_train_both_stages_and_evaluate(base3, tmp_path):
    """train.py (stage 1 with LoRA, then stage 2 from it) and evaluate.py run on a Qwen3-VL base."""
    import evaluate
    import train
    common = ["--model", base3["base"], "--data", base3["train"], "--val", base3["val"],
              "--run-dir", str(tmp_path), "--batch-size", "2", "--global-batch", "4",
              "--log-every", "100", "--epochs", "1", "--latents", "4", "--max-steps", "2"]
    train.main(common + ["--stage", "1"])
    os.replace(tmp_path / "stage1" / "last", tmp_path / "stage1" / "end")   # as if stage 1 had ended
    train.main(common + ["--stage", "2"])
    m, meta = checkpoint.load_livr(str(tmp_path / "stage2" / "last"))
    assert m.cfg.qwen3 and meta["stage"] == 2 and m.num_latents == 4
    out = tmp_path / "eval"
    evaluate.main(["--checkpoint", f"livr={tmp_path / 'stage2' / 'last'}", "--checkpoint",
                   f"zero={base3['base']}", "--data", base3["test"], "--out", str(out),
                   "--max-new-tokens", "4", "--attention-samples", "2", "--maps", "0"])
    assert any(out.iterdir())


def test_export_runs_in_transformers(base3, tmp_path):
    """A LIVR run on Qwen3-VL, exported (export.py): transformers' Qwen3-VL loads it, its chat
    template puts the latents where our processor does, and it gives our logits and greedy tokens."""
    import data
    import export
    import train
    import transformers
    train.main(["--model", base3["base"], "--data", base3["train"], "--run-dir", str(tmp_path),
                "--batch-size", "2", "--global-batch", "4", "--log-every", "100", "--epochs", "1",
                "--latents", "4", "--max-steps", "2", "--lr", "5e-3", "--stage", "1"])
    out = export.export(str(tmp_path / "stage1" / "last"), str(tmp_path / "hub"))
    m, _ = checkpoint.load_livr(str(tmp_path / "stage1" / "last"), merge=True)
    proc = data.Processor.from_pretrained(base3["base"], num_latents=4)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "Qwen3VLForConditionalGeneration"
    assert "A Qwen3-VL model" in open(os.path.join(out, "README.md")).read()
    for r in data.load_dataset(base3["test"])[:2]:
        enc = proc.encode(r, with_answer=False)
        content = [{"type": "image"} for _ in r.images] + [{"type": "text", "text": r.text}]
        text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                       add_generation_prompt=True)
        for t, h, w in enc["image_grid_thw"].tolist():     # the processor's expansion of each image
            text = text.replace("<|image_pad|>", "<|placeholder|>" * (t * h * w // 4), 1)
        ids = tok(text.replace("<|placeholder|>", "<|image_pad|>"), add_special_tokens=False)["input_ids"]
        assert ids == enc["input_ids"].tolist()
        ids = enc["input_ids"][None]
        with torch.no_grad():
            ref = hf(input_ids=ids, pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                     mm_token_type_ids=(ids == proc.image_token_id).int()).logits[0]
            got = m(ids, enc["pixel_values"], enc["image_grid_thw"])[0]
            lat = slice(m.latent_token_id, m.latent_token_id + 4)
            ref[:, lat] = got[:, lat] = 0          # the latent rows: never generated by either side
            assert rel_err(got, ref) <= 1e-4
            new = hf.generate(input_ids=ids, pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                              mm_token_type_ids=(ids == proc.image_token_id).int(), do_sample=False,
                              max_new_tokens=5, eos_token_id=None, pad_token_id=proc.pad_id)[0, ids.shape[1]:]
        mine = m.generate(ids, enc["pixel_values"], enc["image_grid_thw"], max_new_tokens=5, eos_token_id=-1)[0]
        assert new.tolist() == mine.tolist()


def test_bench_inputs_for_the_4b_preset():
    """bench.py --preset 4b's inputs: images snapped to 32-pixel multiples, one <|image_pad|> per
    merged token; the preset's weights carry exactly transformers' Qwen3-VL-4B keys and shapes."""
    import bench
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    cfg = model.preset("4b")
    s = bench.encoded(cfg, torch.Generator().manual_seed(0), [(56, 100), (224, 224)])
    assert s["image_grid_thw"].tolist() == [[1, 2, 6], [1, 14, 14]]
    assert s["pixel_values"].shape == (12 + 196, 1536)
    assert int((s["input_ids"] == cfg.image_token_id).sum()) == (12 + 196) // 4
    with torch.device("meta"):
        ours = model.Qwen25VL(cfg)
        ref = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_dict(checkpoint.config_to_dict(cfg)))
    theirs = {k: v.shape for k, v in ref.state_dict().items() if k != "lm_head.weight"}   # tied
    mine = dict(ours.state_dict())
    assert {ck: mine[k].shape for ck, k in checkpoint.hub_key_map(ours, "new").items()} == theirs
    assert 4.43e9 < sum(p.numel() for p in ours.parameters()) < 4.45e9


@pytest.mark.parametrize("mode", ["bottleneck", "causal"])
def test_prepared_step_never_reads_the_device(base3, mode):
    """Forward + backward of a prepared Qwen3-VL batch (DeepStack included) on the `meta` device,
    where any read-back to the host raises: the step only queues device work."""
    import data
    import train
    proc = data.Processor.from_pretrained(base3["base"], num_latents=4)
    encoded = [proc.encode(r) for r in data.load_dataset(base3["train"])[:3]]
    (batch,) = batching.pack(encoded, sum(len(e["input_ids"]) for e in encoded) + 3)
    cfg = checkpoint.read_config(base3["base"])
    with torch.device("meta"):
        m = model.Qwen25VL(cfg, num_latents=4, latent_token_id=proc.latent_token_id)
    model.add_lora(m, 4, 8, 0.05)
    m.to("meta").train()
    on_meta = {k: v.to("meta") if hasattr(v, "to") else v for k, v in batching.prepare_batch(batch, cfg).items()}
    loss, n = train.compute_loss(m, on_meta, mode)
    (loss / n).backward()
    assert m.latent_embeds.grad is not None
