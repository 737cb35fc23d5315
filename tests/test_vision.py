"""vision.py against transformers' Qwen2.5-VL vision tower (the numerical oracle).

A tiny random reference model is built, its weights are scaled up so activations are O(1) and
attention is far from uniform (a wrong rotary split or window order then shows), and its state
dict is loaded strictly into ours. Run: pytest -q tests/test_vision.py
"""
import copy

import pytest
import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from vision import VisionConfig, VisionEncoder

TINY = dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48,
            fullatt_block_indexes=[1, 3], window_size=112, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3, hidden_act="silu")
PATCH_DIM = 3 * 2 * 14 * 14

# (t, h, w) in patches; h, w even. Merged grids: 1x1, 5x7 (partial windows), 2x30 (very wide),
# 18x10, 8x8 (exactly 2x2 windows).
MIXED = [[1, 2, 2], [1, 10, 14], [1, 4, 60], [1, 36, 20], [1, 16, 16]]


def make_reference(**overrides):
    torch.manual_seed(0)
    cfg = Qwen2_5_VLVisionConfig(**{**TINY, **overrides})
    ref = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_q" in name):
                p.copy_(1 + 0.3 * torch.randn_like(p))                    # RMSNorm gains around 1
            elif p.dim() == 1:
                p.copy_(0.3 * torch.randn_like(p))                        # biases
            else:                                                         # ~unit-gain matrices, x1.5
                p.copy_(1.5 * torch.randn_like(p) / p[0].numel() ** 0.5)
    return ref


def make_ours(ref):
    ours = VisionEncoder(VisionConfig.from_dict(ref.config.to_dict())).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


@pytest.fixture(scope="module")
def models():
    ref = make_reference()
    return ref, make_ours(ref)


def inputs(grid):
    grid_thw = torch.tensor(grid)
    torch.manual_seed(1)
    return torch.randn(int(grid_thw.prod(-1).sum()), PATCH_DIM), grid_thw


def reference_output(ref, pixel_values, grid_thw):
    with torch.no_grad():
        return ref(pixel_values, grid_thw).pooler_output


def assert_close(out, ref_out, rel=1e-4):
    assert out.shape == ref_out.shape
    err, scale = (out - ref_out).abs().max().item(), ref_out.abs().max().item()
    assert err <= rel * scale, f"max|diff| {err:.3g} > {rel} * max|ref| {scale:.3g}"


def test_parameter_names_are_the_hub_keys(models):
    ref, ours = models
    expected = {"patch_embed.proj.weight", "merger.ln_q.weight", "merger.mlp.0.weight", "merger.mlp.0.bias",
                "merger.mlp.2.weight", "merger.mlp.2.bias"}
    for i in range(TINY["depth"]):
        expected |= {f"blocks.{i}.{n}" for n in ["norm1.weight", "norm2.weight", "attn.qkv.weight", "attn.qkv.bias",
                     "attn.proj.weight", "attn.proj.bias"] + [f"mlp.{p}_proj.{wb}" for p in ("gate", "up", "down")
                                                              for wb in ("weight", "bias")]}
    assert set(ours.state_dict()) == expected                       # no persistent buffers either
    assert ours.patch_embed.proj.weight.shape == (64, 3, 2, 14, 14)  # the hub's Conv3d shape


def test_config_from_hub_dict():
    hub = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
           "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2,
           "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
           "tokens_per_second": 2, "temporal_patch_size": 2, "model_type": "qwen2_5_vl"}
    cfg = VisionConfig.from_dict(hub)
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.in_channels) == (32, 1280, 16, 3)
    assert cfg.fullatt_block_indexes == (7, 15, 23, 31) and cfg.out_hidden_size == 2048
    assert VisionConfig.from_dict({"in_channels": 4, "num_attention_heads": 8}).in_channels == 4


@pytest.mark.parametrize("grid", [[[1, 2, 2]], [[1, 32, 32]], [[1, 4, 60]], MIXED, [[2, 6, 10], [1, 10, 14]]],
                         ids=["tiny_28px", "448px", "very_wide", "mixed_sizes", "video_and_image"])
def test_matches_transformers(models, grid):
    ref, ours = models
    pixel_values, grid_thw = inputs(grid)
    with torch.no_grad():
        out = ours(pixel_values, grid_thw)
    assert_close(out, reference_output(ref, pixel_values, grid_thw))


def test_windows_matter(models):
    # The parity cases above must be able to see a wrong window: attending over the whole image
    # in every block (one big window) lands far outside the tolerance.
    ref, _ = models
    no_windows = make_ours(ref)
    no_windows.cfg.fullatt_block_indexes = tuple(range(TINY["depth"]))
    pixel_values, grid_thw = inputs(MIXED)
    with torch.no_grad():
        out = no_windows(pixel_values, grid_thw)
    ref_out = reference_output(ref, pixel_values, grid_thw)
    assert (out - ref_out).abs().max() > 100 * 1e-4 * ref_out.abs().max()


def test_images_are_independent_and_in_order(models):
    # Each image's tokens depend only on that image, and come out in input order: encoding the
    # images one by one and concatenating gives the batched output.
    _, ours = models
    pixel_values, grid_thw = inputs(MIXED)
    sizes = grid_thw.prod(-1).tolist()
    with torch.no_grad():
        batched = ours(pixel_values, grid_thw)
        one_by_one = torch.cat([ours(p, g[None]) for p, g in zip(pixel_values.split(sizes), grid_thw)])
    assert_close(batched, one_by_one, rel=1e-5)


def test_bf16_close_to_fp32(models):
    ref, ours = models
    pixel_values, grid_thw = inputs(MIXED)
    with torch.no_grad():
        out32 = ours(pixel_values, grid_thw)
        out16 = copy.deepcopy(ours).to(torch.bfloat16)(pixel_values.bfloat16(), grid_thw)
        ref16 = copy.deepcopy(ref).to(torch.bfloat16)(pixel_values.bfloat16(), grid_thw).pooler_output
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    assert_close(out16.float(), out32, rel=0.1)        # measured ~0.02
    assert_close(out16.float(), ref16.float(), rel=0.1)  # bf16 vs bf16 reference, measured ~0.015
    cos = torch.nn.functional.cosine_similarity(out16.float(), out32, dim=-1)
    assert cos.min() > 0.99


def test_gradients_match_transformers(models):
    # the in-place elementwise ops in vision.py must leave autograd correct
    ref, _ = models
    ref = copy.deepcopy(ref).train()
    ours = make_ours(ref).train()
    pixel_values, grid_thw = inputs([[1, 10, 14], [1, 2, 2]])
    ref(pixel_values, grid_thw).pooler_output.square().mean().backward()
    ours(pixel_values, grid_thw).square().mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, ref_grads[name].grad, rel=1e-3)
