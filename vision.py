"""
The Qwen2.5-VL and Qwen3-VL vision encoders (ViT + patch merger), from scratch, in one file.

Mirrors `Qwen2_5_VisionTransformerPretrainedModel` in transformers'
`models/qwen2_5_vl/modeling_qwen2_5_vl.py`: same parameter names (the hub's `visual.*` keys
with the prefix removed), same numbers, none of its indirection. tests/test_vision.py checks it
against that class.

How an image becomes LM tokens:
  1. The image processor has already cut the image into 14x14x(2 frames) patches and flattened
     each one to a row of pixel_values [num_patches, 3*2*14*14], listed merge-block by
     merge-block: the 4 patches of each 2x2 block are adjacent, blocks in raster order.
  2. A linear patch embedding (the checkpoint stores it as a Conv3d whose stride equals its
     kernel, which is just a matmul on the flattened patch).
  3. `depth` pre-norm transformer blocks with 2-D rotary positions (row, col of the patch).
     Most blocks attend only inside a window of 112x112 pixels (8x8 patches = 4x4 merged
     tokens); the `fullatt_block_indexes` blocks attend across the whole image.
  4. The merger: RMSNorm per patch, concatenate each 2x2 block, MLP to the LM width.

Windows, the one idea worth reading slowly: we lay all patches of all images out once, per
batch (on the host, with the batch) or per forward, as a padded grid [num_windows, 64 slots]
(window_layout). Windowed attention is then a reshape plus a single SDPA call with a
key-padding mask, and full attention is one SDPA call per
image over that image's windows. Windows at the right/bottom edge are partly empty; their empty
slots hold a copy of some real patch, are masked out as keys, and are dropped before the merger.

Qwen3-VL (`model_type` "qwen3_vl", the config's switch) changes five things, each a branch below:
16x16 patches and a Conv3d with a bias; a learned [num_position_embeddings, hidden] table of
absolute positions, bilinearly resampled (align_corners) to each image's patch grid and added
after the patch embedding; LayerNorm and a plain GELU(tanh) MLP in the blocks; no windows
(window_size 0: every block attends over the whole image, full_layout); a LayerNorm merger, plus
"deepstack" mergers on the outputs of blocks `deepstack_visual_indexes`, whose features the
decoder adds to its hidden states at the image positions after its first layers (model.py).
Mirrors `Qwen3VLVisionModel` in transformers' `models/qwen3_vl/modeling_qwen3_vl.py`.

Test: pytest -q tests/test_vision.py (parity with transformers, several image sizes in one call);
tests/test_qwen3.py for the Qwen3-VL tower and its DeepStack features.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 2048           # the LM's hidden size
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2           # 2x2 patches -> one LM token
    window_size: int = 112                # in pixels: 112 / 14 / 2 = 4x4 merged tokens per window
    fullatt_block_indexes: tuple = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Qwen3-VL's switches (model_type "qwen3_vl"; window_size 0 = no windows, full attention everywhere)
    model_type: str = "qwen2_5_vl"
    num_position_embeddings: int = 0      # rows of the learned position table (a square grid); 0 = none
    deepstack_visual_indexes: tuple = ()  # blocks whose outputs feed the decoder's first layers

    @property
    def qwen3(self):
        return self.model_type == "qwen3_vl"

    @classmethod
    def from_dict(cls, d, model_type=None):
        """Read a checkpoint's `vision_config`; hub files and transformers spell some keys differently.
        model_type: the checkpoint's top-level one ("qwen3_vl" selects the Qwen3-VL encoder)."""
        aliases = {"in_chans": "in_channels", "num_attention_heads": "num_heads", "num_hidden_layers": "depth"}
        kw = {aliases.get(k, k): v for k, v in d.items()}
        kw.pop("model_type", None)       # the vision config's own ("qwen3_vl_vision", or "qwen3_vl" on the hub)
        if model_type == "qwen3_vl" or d.get("model_type") in ("qwen3_vl", "qwen3_vl_vision"):
            # Qwen3-VL's defaults where the file leaves a key out (transformers' Qwen3VLVisionConfig)
            kw = {"depth": 27, "hidden_size": 1152, "num_heads": 16, "intermediate_size": 4304,
                  "out_hidden_size": 3584, "patch_size": 16, "num_position_embeddings": 2304,
                  "hidden_act": "gelu_pytorch_tanh",
                  **kw, "model_type": "qwen3_vl", "window_size": 0, "fullatt_block_indexes": ()}
            kw.setdefault("deepstack_visual_indexes", (8, 16, 24))
        if isinstance(d.get("rope_parameters"), dict) and "rope_theta" in d["rope_parameters"]:
            kw["rope_theta"] = d["rope_parameters"]["rope_theta"]
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in kw.items() if k in names}
        if "fullatt_block_indexes" in kw:
            kw["fullatt_block_indexes"] = tuple(kw["fullatt_block_indexes"])
        if "deepstack_visual_indexes" in kw:
            kw["deepstack_visual_indexes"] = tuple(kw["deepstack_visual_indexes"])
        return cls(**kw)


@dataclass
class Layout:
    """Where every patch sits in the padded window grid: built once per batch, on the host
    (batching.prepare_batch), or once per forward. A plain class, not a tuple: torch.compile
    (model.compile_blocks) guards only on the fields a compiled block reads, not on `images`."""
    src: torch.Tensor          # [S] patch feeding each slot (empty slots: any patch of the same frame)
    pos: torch.Tensor          # [S, 2] (row, col) of the slot's patch in its image
    window_mask: torch.Tensor | None  # [W, 1, 1, P] True = a real patch; None when no slot is empty
    images: list               # per image: (first slot, frames, slots per frame, key mask or None)
    merged_src: torch.Tensor   # [num_patches // m^2] merged slot of each output token, processor order
    # Qwen3-VL only: each slot's learned position embedding as 4 bilinear taps into the table
    pos_index: torch.Tensor | None = None   # [S, 4] long rows of pos_embed
    pos_weight: torch.Tensor | None = None  # [S, 4] fp32 weights

    def map(self, fn):
        """A Layout with fn applied to every tensor in it."""
        mv = lambda z: None if z is None else fn(z)
        return Layout(mv(self.src), mv(self.pos), mv(self.window_mask),
                      [(a, t, n, mv(mask)) for a, t, n, mask in self.images], mv(self.merged_src),
                      mv(self.pos_index), mv(self.pos_weight))

    def to(self, device, non_blocking=False):
        return self.map(lambda z: z.to(device, non_blocking=non_blocking))

    def pin_memory(self):        # the DataLoader's pin_memory=True calls this (a GPU run's loader)
        return self.map(torch.Tensor.pin_memory)


def window_layout(grid_thw, cfg):
    """Slot s of the padded grid = (frame, window row, window col, token row, token col, i, j),
    i.e. windows in raster order, merged tokens in raster order inside a window, and the m x m
    patches of a merged token last -- the same order transformers' `get_window_index` uses,
    plus empty slots where the image ends inside a window. No windows (window_size 0, Qwen3-VL):
    full_layout."""
    if not cfg.window_size:
        return full_layout(grid_thw, cfg)
    m = cfg.spatial_merge_size
    s = cfg.window_size // cfg.patch_size // m  # merged tokens per window side
    P = (s * m) ** 2                            # patch slots per window
    num_patches = int(grid_thw.prod(-1).sum())
    ar = lambda n, dim: torch.arange(n).view([-1 if d == dim else 1 for d in range(7)])  # arange on one axis
    src, pos, valid, images = [], [], [], []
    patch0 = slot0 = 0
    for t, h, w in grid_thw.tolist():
        H, W = h // m, w // m                           # merged grid
        nh, nw = math.ceil(H / s), math.ceil(W / s)     # windows per column / row
        R = ar(nh, 1) * s + ar(s, 3)                    # merged row of the slot
        C = ar(nw, 2) * s + ar(s, 4)                    # merged col of the slot
        i, j = ar(m, 5), ar(m, 6)                       # patch inside the merged token
        shape = (t, nh, nw, s, s, m, m)
        ok = ((R < H) & (C < W)).expand(shape)
        # processor order: frame, merged token raster, then the m x m patches of the token
        idx = patch0 + ar(t, 0) * h * w + (R * W + C) * m * m + i * m + j
        # an empty slot copies its frame's first patch: any finite row will do, it is masked out
        src.append(torch.where(ok, idx, idx[:, :1, :1, :1, :1, :1, :1]).reshape(-1))
        pos.append(torch.stack([(R * m + i).expand(shape), (C * m + j).expand(shape)], -1).view(-1, 2))
        ok = ok.reshape(-1)
        valid.append(ok)
        n = nh * nw * P
        images.append((slot0, t, n, None if ok.all() else ok.view(t, 1, 1, n)))
        patch0, slot0 = patch0 + t * h * w, slot0 + t * n
    src, pos, valid = torch.cat(src), torch.cat(pos), torch.cat(valid)
    window_mask = None if valid.all() else valid.view(-1, 1, 1, P)
    # invert slot -> patch, then read off each merged token's first patch (its m^2 patches share a token)
    slot_of_patch = torch.empty(num_patches, dtype=torch.long)
    slot_of_patch[src[valid]] = torch.arange(len(src))[valid]
    return Layout(src, pos, window_mask, images, slot_of_patch[:: m * m] // (m * m))


def full_layout(grid_thw, cfg):
    """The Layout of an encoder without windows (Qwen3-VL): slots are the patches in processor
    order (no empty ones), one attention block per frame, and each patch's bilinear taps into the
    learned position table -- transformers' get_vision_interpolation_indices_and_weights with
    align_corners, in the same fp32 ops."""
    m = cfg.spatial_merge_size
    num_patches = int(grid_thw.prod(-1).sum())
    pos, images, index, weight = [], [], [], []
    side = int(cfg.num_position_embeddings ** 0.5)
    slot0 = 0
    for t, h, w in grid_thw.tolist():
        # processor order: merged token raster, then the m x m patches of the token
        r = torch.arange(h).view(h // m, m, 1, 1) + torch.zeros(1, 1, w // m, m, dtype=torch.long)
        c = torch.arange(w).view(1, 1, w // m, m) + torch.zeros(h // m, m, 1, 1, dtype=torch.long)
        r, c = r.transpose(1, 2).reshape(-1), c.transpose(1, 2).reshape(-1)      # [h*w]
        pos.append(torch.stack([r, c], -1).repeat(t, 1))
        images.append((slot0, t, h * w, None))
        slot0 += t * h * w
        if side:
            taps = []
            for i, n in ((r, h), (c, w)):       # per axis: 2 taps and their weights
                src = i.float() * (side - 1) / torch.clamp(torch.tensor(n) - 1, min=1)
                floor = torch.floor(src)
                off = torch.arange(2)
                taps.append(((floor.long()[:, None] + off).clamp(0, side - 1),
                             (1 - (src[:, None] - floor[:, None] - off).abs()).clamp(min=0)))
            (ht, hw_), (wt, ww) = taps
            index.append((ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4).repeat(t, 1))
            weight.append((hw_[:, :, None] * ww[:, None, :]).reshape(-1, 4).repeat(t, 1))
    cat = lambda z: torch.cat(z) if z else None
    return Layout(torch.arange(num_patches), torch.cat(pos), None, images,
                  torch.arange(num_patches // (m * m)), cat(index), cat(weight))


def rotary_cos_sin(pos, head_dim, theta):
    """2-D RoPE: the first half of each rotary half turns with the row, the second with the col.
    pos [S, 2] -> cos, sin [S, 1, head_dim] in fp32 (broadcast over the q and k heads)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float, device=pos.device)
                               / (head_dim // 2))
    freqs = (pos[..., None].float() * inv_freq).flatten(1)  # [S, head_dim/2]: rows' freqs, then cols'
    emb = torch.cat([freqs, freqs], dim=-1)                  # rotate_half pairs channel c with c + head_dim/2
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rotary(x, cos, sin):
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1], computed as
    [x2, x1] * [-sin1, sin2] + x * cos in one buffer, in place (memory-bound; see Block).
    x [S, 2*heads, head_dim] holds q's and k's heads (a 3-D broadcast has fewer dimensions to
    walk than [S, 2, heads, head_dim]). The reference rotates in fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    sin1, sin2 = sin.chunk(2, dim=-1)
    out = torch.cat([x2, x1], dim=-1).mul_(torch.cat([-sin1, sin2], dim=-1)).addcmul_(xf, cos)
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    # Qwen2_5_VLRMSNorm: normalise in fp32, cast back, then scale (the order matters in bf16)
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype).mul_(self.weight)


class PatchEmbed(nn.Module):
    # Qwen2_5_VisionPatchEmbed. A Conv3d with stride == kernel over one patch is a matmul on the
    # flattened patch (rows are already flattened in (c, t, h, w) order, the weight's own order).
    def __init__(self, cfg):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=cfg.qwen3)

    def forward(self, x):  # [S, c*t*p*p] -> [S, hidden]
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.view(w.shape[0], -1), self.proj.bias)


class Attention(nn.Module):
    # Qwen2_5_VLVisionAttention, run on the padded window grid
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        side = cfg.window_size // cfg.patch_size // cfg.spatial_merge_size * cfg.spatial_merge_size
        self.window_len = side * side                           # P patch slots per window (8*8 = 64)
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, layout, full):
        S, D = x.shape
        nh = self.n_head
        qkv = self.qkv(x).view(S, 3 * nh, self.head_dim)        # heads of q, then k, then v
        qk = apply_rotary(qkv[:, :2 * nh], cos, sin)
        q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, 2 * nh:]        # each [S, nh, hs]
        if full and hasattr(layout, "attend"):  # an attention.FlexLayout: every image in one call
            y = layout.attend(q, k, v)
        elif full:  # every patch of an image (of one frame) sees every other: one SDPA call per image
            y = image_attention(q, k, v, layout)
        else:     # windows are consecutive runs of P slots: one SDPA call over all windows of all images
            qw, kw, vw = (z.view(-1, self.window_len, nh, self.head_dim).transpose(1, 2) for z in (q, k, v))  # (W, nh, P, hs)
            y = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=layout.window_mask).transpose(1, 2).reshape(S, D)
        return self.proj(y)


def image_attention(q, k, v, layout):
    """Full attention within each image (each frame), one SDPA call per image: q, k, v [S, nh, hs]
    -> [S, nh * hs]. A loop over layout.images, which torch.compile (model.compile_blocks) leaves
    eager: traced, it would recompile for every new count of images."""
    nh, out = q.shape[1], []
    for a, t, n, mask in layout.images:
        # (t, nh, n, hs); contiguous, the layout the CPU flash kernel reads fastest
        qi, ki, vi = (z[a:a + t * n].view(t, n, nh, -1).transpose(1, 2).contiguous() for z in (q, k, v))
        out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask).transpose(1, 2).reshape(t * n, -1))
    return torch.cat(out) if len(out) > 1 else out[0]


class MLP(nn.Module):
    # Qwen2_5_VLMLP(bias=True): SwiGLU
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))


class PlainMLP(nn.Module):
    # Qwen3VLVisionMLP: linear, GELU (tanh approximation), linear; no gate
    def __init__(self, cfg):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = "tanh" if cfg.hidden_act in ("gelu_pytorch_tanh", "gelu_new") else "none"

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class Block(nn.Module):
    # Qwen2_5_VLVisionBlock: pre-norm attention + pre-norm MLP (Qwen3VLVisionBlock: LayerNorms, PlainMLP)
    def __init__(self, cfg):
        super().__init__()
        norm = (lambda: nn.LayerNorm(cfg.hidden_size, eps=1e-6)) if cfg.qwen3 else \
            (lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.norm1 = norm()
        self.attn = Attention(cfg)
        self.norm2 = norm()
        self.mlp = PlainMLP(cfg) if cfg.qwen3 else MLP(cfg)

    def forward(self, x, cos, sin, layout, full):
        # x + f(x) written as f(x).add_(x). Here and in MLP/apply_rotary the elementwise ops run in
        # place: on CPU a fresh tens-of-MB buffer (page faults) costs about as much as the op itself.
        # Autograd handles these in-place ops (tests/test_vision.py checks the gradients).
        x = self.attn(self.norm1(x), cos, sin, layout, full).add_(x)
        return self.mlp(self.norm2(x)).add_(x)


class PatchMerger(nn.Module):
    # Qwen2_5_VLPatchMerger: RMSNorm each patch, concatenate the m x m patches of a token, MLP
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, cfg.out_hidden_size))

    def forward(self, x):  # [M, m*m, hidden] -> [M, out_hidden]
        return self.mlp(self.ln_q(x).flatten(1))


class Qwen3Merger(nn.Module):
    # Qwen3VLVisionPatchMerger: LayerNorm per patch (or, for a deepstack merger, over the
    # concatenated m x m patches: postshuffle), concatenate, Linear-GELU-Linear to the LM width
    def __init__(self, cfg, postshuffle=False):
        super().__init__()
        dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(dim if postshuffle else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(dim, dim)
        self.linear_fc2 = nn.Linear(dim, cfg.out_hidden_size)

    def forward(self, x):  # [M, m*m, hidden] -> [M, out_hidden]
        x = self.norm(x.flatten(1)) if self.postshuffle else self.norm(x).flatten(1)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionEncoder(nn.Module):
    # Qwen2_5_VisionTransformerPretrainedModel (its `pooler_output`), or Qwen3VLVisionModel
    def __init__(self, cfg):
        super().__init__()
        assert cfg.qwen3 or cfg.hidden_act == "silu", \
            f"only the SwiGLU/silu Qwen2.5-VL vision MLP is implemented, got {cfg.hidden_act}"
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        if cfg.num_position_embeddings:
            self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.merger = Qwen3Merger(cfg) if cfg.qwen3 else PatchMerger(cfg)
        if cfg.deepstack_visual_indexes:
            self.deepstack_merger_list = nn.ModuleList(
                Qwen3Merger(cfg, postshuffle=True) for _ in cfg.deepstack_visual_indexes)

    def forward(self, pixel_values, grid_thw=None, layout=None, deepstack=False):
        """pixel_values [num_patches, c*t*p*p], grid_thw [num_images, 3] as the image processor
        returns them -> [num_patches // m^2, out_hidden], image 0's tokens first, each image's
        tokens in merged-raster order (the order of its <|image_pad|> placeholders).
        layout: window_layout(grid_thw, cfg) made ahead (on the host, with the batch) and moved to
        the device; without it the layout is built here, which reads grid_thw back to the host.
        deepstack=True: returns (features, [one [num_patches // m^2, out_hidden] per index of
        deepstack_visual_indexes]) -- the list is empty for Qwen2.5-VL."""
        cfg, dev = self.cfg, pixel_values.device
        if layout is None:
            layout = window_layout(grid_thw.cpu(), cfg).to(dev)
        x = self.patch_embed(pixel_values[layout.src])  # [S, hidden], patches gathered into the window grid
        if cfg.num_position_embeddings:  # learned absolute positions, resampled to the grid (full_layout)
            pe = (self.pos_embed(layout.pos_index) * layout.pos_weight[:, :, None]).sum(1)   # [S, hidden]
            x = x + pe.to(x.dtype)
        cos, sin = rotary_cos_sin(layout.pos, cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
        # back to processor order, dropping empty slots: one gather of whole merged tokens
        tokens = lambda x: x.view(-1, cfg.spatial_merge_size ** 2, cfg.hidden_size)[layout.merged_src]
        extra = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, layout, full=not cfg.window_size or i in cfg.fullatt_block_indexes)
            if i in cfg.deepstack_visual_indexes:
                extra.append(self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)](tokens(x)))
        feats = self.merger(tokens(x))
        return (feats, extra) if deepstack else feats
