"""
Qwen2.5-VL and Qwen3-VL written out by hand, plus the two things LIVR adds to them: latent
tokens and LoRA.

Mirrors transformers' `Qwen2_5_VLForConditionalGeneration` and `Qwen3VLForConditionalGeneration`
(the numerical oracles, matched to 1e-4 relative in tests/test_model.py and tests/test_qwen3.py)
without their indirection. Notable features:
  - loads the hub's safetensors checkpoints as they are (both key layouts, both config.json
    forms, shards, tied or untied head), built on the `meta` device and filled with
    `assign=True` so a 3B model is never held twice;
  - M-RoPE position ids for text + several images, restarting per packed sample;
  - one forward for training, prefill and decode (a static KV cache, as in gpt-fast), with an
    optional explicit boolean attention mask -- the door the LIVR bottleneck comes through;
  - packed training batches made ready on the host (`prepare_batch`: positions, the vision
    window layout, where the logits go), and attention run per packed sample on its own block
    of the mask (`attention_blocks`), so the training step never waits on the device and never
    pays for the pairs of different samples;
  - LIVR latent tokens: K rows of their own (`latent_embeds`), trained while the tied
    embedding table stays frozen (the paper trains only the K new rows);
  - hand-written LoRA on q, k, v, o, gate, up, down that merges back for export;
  - open to forks: `forward(..., return_hidden=True)` returns an `Output` (logits, last hidden
    states, image features, token kinds), and `EXTEND` adds a fork's modules after the strict
    hub load, which `load_livr` then fills from a checkpoint;
  - Qwen3-VL (config.json's model_type "qwen3_vl") as switches of the same classes, equal to
    transformers' `Qwen3VLForConditionalGeneration` (tests/test_qwen3.py): q/k RMSNorm, no q/k/v
    bias, an explicit head_dim, interleaved M-RoPE, and the vision tower's DeepStack features
    added at the image positions after the first decoder layers (vision.py has the rest).

    import model
    m = model.load_pretrained("Qwen/Qwen2.5-VL-3B-Instruct")        # fp32 on CPU by default
    logits = m(input_ids=ids, pixel_values=pv, image_grid_thw=thw)   # [B, L, vocab]

    b = model.prepare_batch(data.pack(encoded, 8192)[0], m.cfg)      # training: on the host
    logits = m(b["input_ids"], b["pixel_values"], mask=model.attention_blocks(b["kinds"], "bottleneck", b["spans"]),
               position_ids=b["position_ids"], vision_layout=b["vision_layout"],
               logits_at=b["logits_at"])                            # [n, vocab], as train.compute_loss

    python model.py export runs/demo/stage2/final OUT   # a plain hub checkpoint (export.py)
"""
import json
import math
import os
from dataclasses import dataclass, field, asdict
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import masks
import vision
from vision import VisionConfig, VisionEncoder, window_layout


# ----------------------------------------------------------------------------------------------
# Config: read from the checkpoint's own config.json

@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])
    tie_word_embeddings: bool = True
    # Qwen3-VL's switches (Config.from_dict sets them from a "qwen3_vl" config.json)
    attention_bias: bool = True          # q/k/v bias (Qwen3: the config's attention_bias, False)
    o_proj_bias: bool = False            # Qwen3 gives o_proj the same bias as q/k/v
    qk_norm: bool = False                # RMSNorm over each head of q and k before RoPE
    mrope_interleaved: bool = False      # M-RoPE channels T,H,W,T,H,W,... instead of three blocks
    explicit_head_dim: int = 0           # the config's head_dim (Qwen3-VL-4B: 128 != 2560/32); 0 = hidden/heads

    @property
    def head_dim(self):
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads


@dataclass
class Config:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: int = 151645
    model_type: str = "qwen2_5_vl"       # or "qwen3_vl": the switch the config.json decides

    @property
    def qwen3(self):
        return self.model_type == "qwen3_vl"

    @classmethod
    def from_dict(cls, d):
        """Both forms that exist: the hub's flat one (text fields at the top, `rope_scaling`) and
        transformers 5's nested one (`text_config`, `rope_parameters`). A "qwen3_vl" model_type
        (Qwen3-VL 2B/4B/8B, always nested) turns on the Qwen3-VL switches."""
        model_type = d.get("model_type", "qwen2_5_vl")
        if str(model_type).startswith("qwen3_vl") and model_type != "qwen3_vl":
            raise ValueError(f"model_type {model_type!r} is not supported (dense Qwen3-VL is \"qwen3_vl\")")
        if model_type == "qwen3_vl":
            return cls._from_qwen3_dict(d)
        t = {**d, **d.get("text_config", {})}
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        text = TextConfig(
            vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
            num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", t.get("rope_theta", 1e6)),
            mrope_section=list(rope.get("mrope_section", [16, 24, 24])),
            tie_word_embeddings=d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
        assert 2 * sum(text.mrope_section) == text.head_dim, "mrope_section must sum to head_dim/2"
        eos = t.get("eos_token_id", 151645)
        ids = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                 "vision_end_token_id") if k in d}
        return cls(text=text, vision=VisionConfig.from_dict(d["vision_config"]),
                   eos_token_id=eos[0] if isinstance(eos, list) else eos, **ids)

    @classmethod
    def _from_qwen3_dict(cls, d):
        """Qwen3-VL's config.json: text fields under `text_config` (the hub's `rope_scaling` +
        `rope_theta`, or transformers 5's `rope_parameters`), defaults as transformers' Qwen3VL*Config."""
        t = d.get("text_config") or {}
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        heads = t.get("num_attention_heads", 32)
        bias = bool(t.get("attention_bias", False))
        text = TextConfig(
            vocab_size=t.get("vocab_size", 151936), hidden_size=t.get("hidden_size", 4096),
            intermediate_size=t.get("intermediate_size", 22016),
            num_hidden_layers=t.get("num_hidden_layers", 32), num_attention_heads=heads,
            num_key_value_heads=t.get("num_key_value_heads") or heads,
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", t.get("rope_theta", 500000.0)),
            mrope_section=list(rope.get("mrope_section", [24, 20, 20])),
            tie_word_embeddings=d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)),
            attention_bias=bias, o_proj_bias=bias, qk_norm=True, mrope_interleaved=True,
            explicit_head_dim=t.get("head_dim", 128))
        if t.get("hidden_act", "silu") != "silu":
            raise ValueError(f"text hidden_act {t['hidden_act']!r}: only silu is implemented")
        assert len(text.mrope_section) == 3, "mrope_section must have 3 entries (T, H, W)"
        eos = t.get("eos_token_id", d.get("eos_token_id", 151645))
        ids = {k: d[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                 "vision_end_token_id") if k in d}
        return cls(text=text, vision=VisionConfig.from_dict(d.get("vision_config") or {}, "qwen3_vl"),
                   eos_token_id=eos[0] if isinstance(eos, list) else eos, model_type="qwen3_vl", **ids)

    def to_dict(self):
        """The hub's flat form, as Qwen/Qwen2.5-VL-3B-Instruct's config.json has it (Qwen3-VL:
        the nested form transformers 5 writes)."""
        if self.qwen3:
            return self._qwen3_dict()
        t = asdict(self.text)
        for k in ("attention_bias", "o_proj_bias", "qk_norm", "mrope_interleaved", "explicit_head_dim"):
            t.pop(k)
        t["rope_scaling"] = {"type": "mrope", "mrope_section": t.pop("mrope_section")}
        return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                **t, "hidden_act": "silu", "vision_config": asdict(self.vision),
                "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                "vision_start_token_id": self.vision_start_token_id,
                "vision_end_token_id": self.vision_end_token_id, "eos_token_id": self.eos_token_id,
                "torch_dtype": "bfloat16"}

    def _qwen3_dict(self):
        t, v = self.text, asdict(self.vision)
        text = {"model_type": "qwen3_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
                "head_dim": t.head_dim, "hidden_act": "silu", "rms_norm_eps": t.rms_norm_eps,
                "attention_bias": t.attention_bias, "tie_word_embeddings": t.tie_word_embeddings,
                "eos_token_id": self.eos_token_id,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                    "mrope_section": list(t.mrope_section), "mrope_interleaved": True}}
        vision = {k: v[k] for k in ("depth", "hidden_size", "num_heads", "intermediate_size",
                                    "out_hidden_size", "in_channels", "patch_size", "temporal_patch_size",
                                    "spatial_merge_size", "hidden_act", "num_position_embeddings")}
        vision.update(model_type="qwen3_vl_vision", deepstack_visual_indexes=list(v["deepstack_visual_indexes"]),
                      rope_parameters={"rope_type": "axial", "rope_theta": v["rope_theta"]})
        return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
                "text_config": text, "vision_config": vision, "tie_word_embeddings": t.tie_word_embeddings,
                "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                "vision_start_token_id": self.vision_start_token_id,
                "vision_end_token_id": self.vision_end_token_id, "eos_token_id": self.eos_token_id,
                "torch_dtype": "bfloat16"}


def preset(name, vocab_size=151936, **token_ids):
    """Model shapes by name: the real 3B, Qwen3-VL-4B ('4b'), a ~100M 'small' one for benchmarks,
    and the 'tiny' one the built-in CPU demo trains from random init in minutes."""
    shapes = {
        "3b": (dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=2, mrope_section=[16, 24, 24]),
               dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                    fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048)),
        "small": (dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, mrope_section=[8, 12, 12]),
                  dict(depth=8, hidden_size=384, num_heads=6, intermediate_size=1024,
                       fullatt_block_indexes=[3, 7], out_hidden_size=512)),
        "tiny": (dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=[4, 6, 6]),
                 dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=128,
                      fullatt_block_indexes=[1], out_hidden_size=128)),
    }
    if name == "4b":   # Qwen/Qwen3-VL-4B-Instruct's shapes (its config.json, the Qwen3-VL switches on)
        text = dict(vocab_size=vocab_size, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                    rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20],
                                         mrope_interleaved=True))
        vision = dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096, patch_size=16,
                      out_hidden_size=2560, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])
        return Config.from_dict(dict(model_type="qwen3_vl", tie_word_embeddings=True, text_config=text,
                                     vision_config=vision, **token_ids))
    if name not in shapes:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(shapes) + ['4b']}")
    text, vision = shapes[name]
    return Config(text=TextConfig(vocab_size=vocab_size, tie_word_embeddings=True, **text),
                  vision=VisionConfig.from_dict(vision), **token_ids)


# ----------------------------------------------------------------------------------------------
# The decoder (Qwen2.5; Qwen3's differences are switches of TextConfig)

class RMSNorm(nn.Module):
    # Qwen2RMSNorm: normalise in fp32, cast back, *then* multiply by the weight
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MRoPE(nn.Module):
    # Qwen2_5_VLRotaryEmbedding: the rotary channels are split between the (t, h, w) position
    # axes by `mrope_section`; the same split is used for both halves of the head.
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.head_dim, self.theta = cfg.head_dim, cfg.rope_theta
        # computed on the CPU explicitly so that building the model on `meta` leaves it real
        axis = torch.tensor([a for a, n in enumerate(cfg.mrope_section) for _ in range(n)], device="cpu")
        if cfg.mrope_interleaved:  # Qwen3-VL: channel c turns with H if c % 3 == 1 (c < 3*s_h), W if 2 (c < 3*s_w), else T
            s = cfg.mrope_section
            axis = torch.tensor([1 if c % 3 == 1 and c < 3 * s[1] else 2 if c % 3 == 2 and c < 3 * s[2] else 0
                                 for c in range(cfg.head_dim // 2)], device="cpu")
        self.register_buffer("axis", axis, persistent=False)           # (D/2,) in {0, 1, 2}

    def forward(self, position_ids, dtype):
        # position_ids (3, B, L) -> cos, sin (B, L, D)
        D = self.head_dim
        # the frequencies are made here, in fp32, once per forward: a float buffer would follow
        # model.to(torch.bfloat16) and turn every angle at position ~1000 off by radians
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, D, 2, device=position_ids.device).float() / D))
        pos = position_ids[self.axis].permute(1, 2, 0).float()        # (B, L, D/2)
        freqs = pos * inv_freq
        cos, sin = freqs.cos(), freqs.sin()
        # rotate_half(x) * sin == x.roll(D/2) * [-sin, sin]: the sign goes into the table once per
        # forward instead of into every q and k of every layer
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


class KVCache(nn.Module):
    # gpt-fast's static cache: one slot per position, written at `input_pos`. Allocated at the
    # first write, in the dtype the keys arrive in (bf16 under FSDP's mixed precision).
    def __init__(self, batch, n_kv_heads, max_len, head_dim):
        super().__init__()
        self.shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = self.v = None

    def update(self, input_pos, k, v):
        if self.k is None:
            self.k = k.new_zeros(self.shape)
            self.v = v.new_zeros(self.shape)
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        n = int(input_pos[-1]) + 1          # rows decode in lockstep: keys past n are empty
        return self.k[:, :, :n], self.v[:, :, :n]


def sdpa(q, k, v, mask=None, is_causal=False):
    """F.scaled_dot_product_attention with grouped KV heads: q (B, nh, Lq, hd), k/v (B, nkv, Lk, hd).
    With a mask, CUDA's fused kernels take no enable_gqa (SDPA would fall back to its math kernel,
    which writes the (B, nh, Lq, Lk) scores in fp32), so there the KV heads are repeated instead."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1 and mask is not None and q.is_cuda:
        k, v = (z[:, :, None].expand(-1, -1, rep, -1, -1).flatten(1, 2) for z in (k, v))
        rep = 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=rep > 1)


def block_attention(q, k, v, blocks):
    """Attention of a packed batch, one SDPA call per sample on its own diagonal block (blocks from
    attention_blocks), so nothing is spent on the (masked) pairs of different samples. Positions
    outside every block (padding) attend to nothing: their output is 0. q (B, nh, L, hd) ->
    (B, L, nh, hd)."""
    B, nh, L, hd = q.shape
    rows, end = [[] for _ in range(B)], [0] * B
    gap = lambda n: v.new_zeros(1, n, nh, hd)      # v: the dtype SDPA returns (also under autocast)
    for b, s, e, mask in blocks:              # in order along each row, not overlapping
        if s > end[b]:
            rows[b].append(gap(s - end[b]))
        y = sdpa(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], mask, is_causal=mask is None)
        rows[b].append(y.transpose(1, 2))                                     # (1, Ls, nh, hd)
        end[b] = e
    for b in range(B):
        if end[b] < L:
            rows[b].append(gap(L - end[b]))
    return torch.cat([torch.cat(r, 1) if len(r) > 1 else r[0] for r in rows])


class Attention(nn.Module):
    # Qwen2_5_VLAttention: GQA, bias on q/k/v, none on o. Qwen3VLTextAttention: q/k RMSNorm,
    # no q/k/v bias (attention_bias), an explicit head_dim
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                        cfg.num_key_value_heads, cfg.head_dim)
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_proj_bias)
        if cfg.qk_norm:   # Qwen3VLTextAttention: RMSNorm over each head's channels, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.kv_cache = None

    def forward(self, x, cos, sin, mask, input_pos=None, return_attn=False):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                          # (B, nh | nkv, L, hd)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = (q * cos).addcmul_(q.roll(self.head_dim // 2, -1), sin)          # q * cos + rotate_half(q) * sin
        k = (k * cos).addcmul_(k.roll(self.head_dim // 2, -1), sin)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if isinstance(mask, Blocks):  # a packed batch's per-sample blocks (attention_blocks)
            return self.o_proj(block_attention(q, k, v, mask).reshape(B, L, -1)), None
        if return_attn:  # the explicit path, for attention maps (evaluate.py)
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            att = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            y = att @ v
        else:
            att = None
            y = sdpa(q, k, v, mask, is_causal=mask is None and L > 1)
        y = y.transpose(1, 2).reshape(B, L, -1)
        return self.o_proj(y), att


class MLP(nn.Module):
    # Qwen2MLP: SwiGLU, no bias
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    # Qwen2_5_VLDecoderLayer: pre-norm attention and MLP, each with a residual
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, input_pos=None, return_attn=False):
        h, att = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, return_attn)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, att


class TextModel(nn.Module):
    # Qwen2_5_VLTextModel's weights: `model.*` in the hub layout
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# ----------------------------------------------------------------------------------------------
# The VLM: vision encoder + decoder, with LIVR's latent tokens

class Output(NamedTuple):
    """forward(..., return_hidden=True): what a fork's loss or probe reads."""
    logits: torch.Tensor                  # (B, L, vocab), or (n, vocab) at logits_at
    hidden: torch.Tensor                  # (B, L, d) last hidden states, after the final norm
    image_features: Optional[torch.Tensor]  # (N/4, d) the merger's output, None without images
    kinds: torch.Tensor                   # (B, L) masks.TEXT / IMAGE / LATENT (token_kinds)
    attns: Optional[list] = None          # with return_attn: per layer (B, nh, L, Lk)


class Qwen25VL(nn.Module):
    # Qwen2_5_VLForConditionalGeneration; parameter names are the hub's keys
    def __init__(self, cfg: Config, num_latents=0, latent_token_id=None):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionEncoder(cfg.vision)
        self.model = TextModel(cfg.text)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = MRoPE(cfg.text)
        self.grad_checkpointing = False
        self.set_latents(num_latents, latent_token_id)

    # --- LIVR: latent tokens ------------------------------------------------------------------
    def set_latents(self, num_latents, latent_token_id=None):
        """K latent tokens with ids latent_token_id .. latent_token_id+K-1 (the tokenizer's added
        special tokens). Their embeddings are a separate [K, d] parameter, initialised at the
        embedding table's scale, so the frozen (and tied) table is never touched. K=0: none."""
        self.num_latents, self.latent_token_id = num_latents, latent_token_id
        self.latent_embeds = None
        if num_latents:
            if latent_token_id is None:
                raise ValueError("latent tokens need latent_token_id (the id of <|latent_0|>)")
            if latent_token_id + num_latents > self.cfg.text.vocab_size:
                self.grow_vocab(latent_token_id + num_latents)     # a base with no spare rows
            table = self.model.embed_tokens.weight
            std = table.float().std().item() if table.device.type != "meta" else 0.02
            init = torch.randn(num_latents, self.cfg.text.hidden_size, device=table.device) * std
            self.latent_embeds = nn.Parameter(init.to(table.dtype))

    def grow_vocab(self, vocab_size):
        """Grow the embedding table (and an untied head) to `vocab_size` rows, for latent ids past
        the end of a base table that has no spare rows. The new rows are zeros and stay so: a
        latent id's embedding is read from latent_embeds, and generate() never emits one."""
        old = self.model.embed_tokens.weight                                     # (V, d)
        extra = vocab_size - old.shape[0]
        grown = lambda w: nn.Parameter(torch.cat([w.detach(), w.new_zeros(extra, w.shape[1])]),
                                       requires_grad=w.requires_grad)            # (V + extra, d)
        self.model.embed_tokens.weight = grown(old)
        self.model.embed_tokens.num_embeddings = vocab_size
        self.lm_head.weight = (self.model.embed_tokens.weight if self.cfg.text.tie_word_embeddings
                               else grown(self.lm_head.weight))
        self.lm_head.out_features = vocab_size
        self.cfg.text.vocab_size = vocab_size

    def embed(self, input_ids, pixel_values, image_grid_thw, vision_layout=None, details=False):
        """Token embeddings with the latent rows and the image features in place. With a
        vision_layout (prepare_batch) the count of <|image_pad|> tokens was checked on the host,
        so nothing here reads back from the device. details=True: returns (embeddings, image
        features (N/4, d) or None, [Qwen3-VL's DeepStack features, one (N/4, d) per early
        layer; empty for Qwen2.5-VL], the image-token mask (B, L) or None)."""
        x = self.model.embed_tokens(input_ids)                                    # (B, L, d)
        feats = None
        if self.num_latents:
            idx = input_ids - self.latent_token_id
            is_latent = (idx >= 0) & (idx < self.num_latents)
            lat = self.latent_embeds[idx.clamp(0, self.num_latents - 1)]
            x = torch.where(is_latent[..., None], lat.to(x.dtype), x)
        deep, is_image = [], None
        if pixel_values is not None and pixel_values.numel():
            feats, deep = self.visual(pixel_values.to(x.dtype), image_grid_thw, vision_layout,
                                      deepstack=True)                          # (N/4, d), [(N/4, d)]
            is_image = input_ids == self.cfg.image_token_id
            if vision_layout is None and int(is_image.sum()) != feats.shape[0]:
                raise ValueError(f"{int(is_image.sum())} <|image_pad|> tokens but "
                                 f"{feats.shape[0]} image features")
            x = x.masked_scatter(is_image[..., None], feats.to(x.dtype))
        return (x, feats, deep, is_image) if details else x

    # --- M-RoPE positions -----------------------------------------------------------------------
    def rope_index(self, input_ids, image_grid_thw=None, segment_ids=None):
        """(3, B, L) M-RoPE positions on input_ids' device: the module-level rope_index."""
        return rope_index(self.cfg, input_ids, image_grid_thw, segment_ids).to(input_ids.device)

    # --- forward ----------------------------------------------------------------------------
    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None,
                mask=None, segment_ids=None, position_ids=None, input_pos=None,
                logits_at=None, return_attn=False, vision_layout=None, return_hidden=False):
        """
        input_ids       (B, L)
        pixel_values    (N, 1176) and image_grid_thw (num_images, 3), as the processor makes them
        attention_mask  (B, L) 1 = real token, 0 = padding (as in transformers)
        mask            (B, L, Lk) or (B, 1, L, Lk) bool, True = may attend: an explicit mask such
                        as masks.build_mask(kinds, "bottleneck"). Replaces the causal mask.
                        Or a packed batch's per-sample blocks, attention_blocks(kinds, mask_mode, spans):
                        the same mask without its off-block part, one attention call per sample.
        segment_ids     (B, L) packed-sample numbers; positions restart per sample
        position_ids    (3, B, L) the M-RoPE positions, made ahead (prepare_batch; decode passes them)
        input_pos       (L,) cache slots to write when a KV cache is set up (see generate)
        logits_at       compute logits only there, returning (n, vocab) -- training needs them
                        only on answer tokens, which saves the [B, L, vocab] tensor: (B, L) bool,
                        or (n,) long flat indices into B*L (prepare_batch's, no device sync)
        return_attn     also return each layer's attention probabilities (B, nh, L, Lk)
        return_hidden   return an Output (logits, hidden, image_features, kinds, attns) instead of
                        the logits: what a fork's auxiliary loss or probe on the latents needs
        vision_layout   vision.window_layout(image_grid_thw), made ahead (prepare_batch)
        With position_ids, vision_layout, a block or explicit mask and long logits_at (all that
        prepare_batch and attention_blocks give), nothing in here waits on the device.
        """
        if segment_ids is None and attention_mask is not None:
            segment_ids = attention_mask.long()
        if position_ids is None:
            position_ids = self.rope_index(input_ids, image_grid_thw, segment_ids)
        if mask is None and (return_attn or (segment_ids is not None and not bool((segment_ids == 1).all()))):
            mask = masks.build_mask(torch.zeros_like(input_ids), "causal", segment_ids)
        # (else: one unpadded sample per row, SDPA's own causal path)
        if torch.is_tensor(mask) and mask.dim() == 3:
            mask = mask[:, None]                                                  # (B, 1, L, Lk)
        x, feats, deep, is_image = self.embed(input_ids, pixel_values, image_grid_thw, vision_layout,
                                              details=True)
        cos, sin = self.rope(position_ids, x.dtype)
        attns = []
        for i, layer in enumerate(self.model.layers):
            if self.grad_checkpointing and self.training:
                x, att = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask,
                                                           use_reentrant=False)
            else:
                x, att = layer(x, cos, sin, mask, input_pos, return_attn)
            attns.append(att)
            if i < len(deep):   # Qwen3-VL's DeepStack: block features added at the image positions
                # scattered into zeros and added, not indexed: a boolean index would wait on the device
                x = x + torch.zeros_like(x).masked_scatter(is_image[..., None], deep[i].to(x.dtype))
        if return_hidden:
            hidden = self.model.norm(x)                                           # (B, L, d)
            h = hidden if logits_at is None else (
                hidden[logits_at] if logits_at.dtype == torch.bool else hidden.flatten(0, 1)[logits_at])
            return Output(self.lm_head(h), hidden, feats, self.token_kinds(input_ids),
                          attns if return_attn else None)
        if logits_at is not None:   # select before the final norm: it is per token
            x = x[logits_at] if logits_at.dtype == torch.bool else x.flatten(0, 1)[logits_at]  # (n, d)
        logits = self.lm_head(self.model.norm(x))
        return (logits, attns) if return_attn else logits

    def token_kinds(self, input_ids):
        """(B, L) masks.TEXT / IMAGE / LATENT as the model tells them from the ids alone (the
        data's kinds also mark SYSTEM and ANSWER, which the ids do not show)."""
        kinds = torch.where(input_ids == self.cfg.image_token_id, masks.IMAGE, masks.TEXT)
        if self.num_latents:
            idx = input_ids - self.latent_token_id
            kinds = torch.where((idx >= 0) & (idx < self.num_latents), masks.LATENT, kinds)
        return kinds

    # --- generation -----------------------------------------------------------------------
    def setup_cache(self, batch, max_len):
        for layer in self.model.layers:
            a = layer.self_attn
            a.kv_cache = KVCache(batch, a.n_kv_heads, max_len, a.head_dim)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    @torch.inference_mode()      # not just no_grad: no version counters either, less per-token overhead (BENCH.md)
    def generate(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None,
                 max_new_tokens=16, eos_token_id=None, kinds=None, mask_mode="causal", stage=None):
        """Greedy decoding with the KV cache. Prompts are left-padded (attention_mask 0 on the
        left). mask_mode="bottleneck" (or any masks.RULES mode) with `kinds` decodes under that
        rule: the prompt as in masks.build_mask and every generated token as an ANSWER token
        (under the bottleneck: blind to the image, the paper's test-time check). `stage` is the
        old name of mask_mode. Latent tokens are never generated. Returns (B, <= max_new_tokens)."""
        if stage is not None:
            mask_mode = stage
        B, L = input_ids.shape
        dev = input_ids.device
        eos = self.cfg.eos_token_id if eos_token_id is None else eos_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        segment_ids = attention_mask.long()
        total = L + max_new_tokens
        self.setup_cache(B, total)
        try:
            kinds = torch.zeros_like(input_ids) if kinds is None else kinds
            prefill_mask = masks.build_mask(kinds, mask_mode, segment_ids)
            # every generated token attends to real prompt keys, those the rule leaves an answer
            key_ok = attention_mask.bool()
            if masks.mode_name(mask_mode) != "causal":
                key_ok = key_ok & masks.generated_keys(kinds, mask_mode)
            key_ok = torch.cat([key_ok, torch.ones(B, max_new_tokens, dtype=torch.bool, device=dev)], 1)
            all_keys = bool(key_ok.all())             # no padding, no blind spot: SDPA needs no mask
            position_ids = self.rope_index(input_ids, image_grid_thw, segment_ids)
            input_pos = torch.arange(L)               # on the host: KVCache reads it back
            last = torch.zeros(B, L, dtype=torch.bool, device=dev)
            last[:, -1] = True                        # prompts are left-padded: all end at L-1
            logits = self(input_ids, pixel_values, image_grid_thw, mask=prefill_mask,
                          position_ids=position_ids, input_pos=input_pos, logits_at=last)
            next_pos = position_ids.amax(dim=(0, 2)) + 1                           # (B,)
            out = []
            done = torch.zeros(B, dtype=torch.bool, device=dev)
            for i in range(max_new_tokens):
                if self.num_latents:
                    logits[:, self.latent_token_id:self.latent_token_id + self.num_latents] = float("-inf")
                tok = logits.argmax(-1)
                tok = torch.where(done, torch.full_like(tok, eos), tok)
                out.append(tok)
                done = done | (tok == eos)
                if bool(done.all()) or i == max_new_tokens - 1:
                    break
                slot = L + i
                pos = (next_pos + i).view(1, B, 1).expand(3, B, 1)
                step_mask = None if all_keys else key_ok[:, None, None, :slot + 1]  # (B, 1, 1, slot+1)
                logits = self(tok[:, None], mask=step_mask, position_ids=pos,
                              input_pos=torch.tensor([slot]))[:, -1]
            return torch.stack(out, 1)
        finally:
            self.clear_cache()

    @property
    def dtype(self):
        return self.model.embed_tokens.weight.dtype


# ----------------------------------------------------------------------------------------------
# The batch, made ready on the host: what the forward would otherwise compute in Python and read
# back from the device (positions, window layout, where the logits go), computed once per batch in
# the data pipeline, so the training step only issues GPU work.

def rope_index(cfg: Config, input_ids, image_grid_thw=None, segment_ids=None):
    """(3, B, L) positions on the host, equal to transformers' get_rope_index. Text tokens count
    up on all three axes; an image's tokens get (start, start+row, start+col) on the merged grid;
    text after it resumes at start + max(rows, cols). Positions restart at every packed sample
    (segment); padding (segment 0) gets 0."""
    B, L = input_ids.shape
    m = cfg.vision.spatial_merge_size
    pos = torch.zeros(3, B, L, dtype=torch.long)
    if segment_ids is None:
        segment_ids = torch.ones(B, L, dtype=torch.long)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    ids_cpu, seg_cpu = input_ids.cpu(), segment_ids.cpu()
    for b in range(B):
        seg = seg_cpu[b]
        for s in seg.unique().tolist():
            if s == 0:
                continue
            where = (seg == s).nonzero().squeeze(1)
            is_img = (ids_cpu[b, where] == cfg.image_token_id).long()
            # image runs: starts and ends within the segment
            edges = torch.diff(torch.cat([is_img.new_zeros(1), is_img, is_img.new_zeros(1)]))
            starts, ends = (edges == 1).nonzero().squeeze(1), (edges == -1).nonzero().squeeze(1)
            parts, cur, prev = [], 0, 0
            for st, en in zip(starts.tolist(), ends.tolist()):
                parts.append(torch.arange(st - prev).expand(3, -1) + cur)
                cur += st - prev
                grid = next(grids, None)
                if grid is None:
                    raise ValueError(f"sample {b}: more runs of <|image_pad|> tokens than rows in "
                                     f"image_grid_thw ({len(image_grid_thw) if image_grid_thw is not None else 0})")
                t, h, w = grid
                gh, gw = h // m, w // m
                if en - st != t * gh * gw:
                    raise ValueError(f"sample {b}: an image run of {en - st} tokens does not "
                                     f"match its grid {t}x{h}x{w} ({t * gh * gw} tokens)")
                tt = torch.arange(t).repeat_interleave(gh * gw)
                hh = torch.arange(gh).repeat_interleave(gw).repeat(t)
                ww = torch.arange(gw).repeat(t * gh)
                parts.append(torch.stack([tt, hh, ww]) + cur)
                cur += max(gh, gw)
                prev = en
            parts.append(torch.arange(len(where) - prev).expand(3, -1) + cur)
            pos[:, b, where] = torch.cat(parts, dim=1)
    return pos


def segment_spans(segment_ids):
    """[(row, start, end)] of every packed sample (a run of one segment number > 0), as Python
    ints. A sample must be one contiguous run: the per-sample attention relies on it."""
    spans = []
    for b, row in enumerate(segment_ids.tolist()):
        seen, start = set(), 0
        for i in range(1, len(row) + 1):
            if i == len(row) or row[i] != row[start]:
                if row[start] != 0:
                    if row[start] in seen:
                        raise ValueError(f"row {b}: segment {row[start]} is not one contiguous run")
                    seen.add(row[start])
                    spans.append((b, start, i))
                start = i
    return spans


class Blocks:
    """A packed batch's per-sample attention blocks, [(row, start, end, mask)] (attention_blocks).
    A class of its own, not a list: torch.compile (compile_blocks) then hands it through to the
    eager block_attention without guarding on its length, so one graph serves any sample count."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def attention_blocks(kinds, mask_mode, spans):
    """masks.build_mask(kinds, mask_mode, segments) of a packed batch, kept as its diagonal blocks:
    Blocks of (row, start, end, mask) with mask = masks.build_mask(kinds[row, start:end], mask_mode), the
    sample's own [Ls, Ls] rule, or None where the rule is plain causal (SDPA's is_causal: the
    flash kernel on a GPU). Off the blocks the dense mask is False -- samples never attend to
    each other -- so block_attention spends nothing there. Built on kinds' device, no sync."""
    causal = masks.mode_name(mask_mode) == "causal"
    return Blocks([(b, s, e, None if causal else masks.build_mask(kinds[b, s:e], mask_mode))
                   for b, s, e in spans])


def prepare_batch(batch, cfg: Config):
    """A data.collate / data.pack batch (CPU tensors) plus what the step needs, made on the host
    (in the data pipeline) so the forward never waits on the device. Returns a new dict with:
      position_ids   (3, B, L) long   M-RoPE positions (rope_index)
      vision_layout  vision.Layout    the images' window layout (None: no images); .to(device)
      logits_at      (n,) long        flat indices into B*L of the positions whose next token
                                      is labelled (position i predicts token i+1)
      targets        (n,) long        the label each of them predicts
      n_targets      int              n, so counting answer tokens needs no sync
      spans          [(row, start, end)] Python ints: each sample's positions (attention_blocks)
    The <|image_pad|> count is checked against the images here, not in the forward."""
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.device.type != "cpu":
        raise ValueError("prepare_batch runs on the host: call it before moving the batch to the device")
    seg = batch.get("segment_ids", batch.get("attention_mask"))
    thw, pv = batch.get("image_grid_thw"), batch.get("pixel_values")
    n_image_tokens = int((ids == cfg.image_token_id).sum())
    layout = None
    if pv is not None and pv.numel():
        patches = int(thw.prod(-1).sum())
        merged = patches // cfg.vision.spatial_merge_size ** 2
        if pv.shape[0] != patches:
            raise ValueError(f"pixel_values has {pv.shape[0]} rows but image_grid_thw makes {patches} patches")
        if n_image_tokens != merged:
            raise ValueError(f"{n_image_tokens} <|image_pad|> tokens but {merged} image features")
        layout = window_layout(thw, cfg.vision)
    elif n_image_tokens:
        raise ValueError(f"{n_image_tokens} <|image_pad|> tokens but no pixel_values")
    predicts = labels[:, 1:] != -100                                     # (B, L-1)
    row, col = predicts.nonzero().unbind(1)
    return {**batch, "position_ids": rope_index(cfg, ids, thw, seg), "vision_layout": layout,
            "logits_at": row * ids.shape[1] + col, "targets": labels[:, 1:][predicts],
            "n_targets": int(predicts.sum()),
            "spans": segment_spans(seg if seg is not None else torch.ones_like(ids))}


def compile_blocks(m: Qwen25VL):
    """torch.compile each decoder layer and vision block, with dynamic shapes so that one graph
    serves every length: a block's per-token work (fp32 norms, projections, rotary, SwiGLU, LoRA
    and its dropout, residuals) fuses into few kernels where eager launches one per op. The
    attention loops over samples and images (block_attention, vision.image_attention) stay eager
    between the compiled parts: traced, they would recompile for every new count. Call before
    FSDP wraps the blocks (train.place_model). Returns m."""
    global block_attention
    block_attention = torch.compiler.disable(block_attention)
    vision.image_attention = torch.compiler.disable(vision.image_attention)
    for block in [*m.visual.blocks, *m.model.layers]:
        block.compile(dynamic=True)
    return m


# ----------------------------------------------------------------------------------------------
# LoRA, by hand (Hu et al. 2021): y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    # keeps the base Linear's `weight`/`bias` names, so checkpoints and the loader are unchanged
    def __init__(self, base: nn.Linear, rank=16, alpha=32, dropout=0.05):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # as PEFT: B = 0, so a no-op at start

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)                                # (..., out)
        h = F.linear(self.dropout(x), self.lora_A)                             # (..., r)
        # y + scale * h B^T as one GEMM that accumulates into y: no separate passes over the
        # (..., out) tensor to scale the update and add it
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), self.lora_B.t(), alpha=self.scale).view(y.shape)

    def merged(self):
        lin = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None,
                        device="meta")
        lin.weight = nn.Parameter(self.weight.detach() + self.scale * (self.lora_B @ self.lora_A).detach(),
                                  requires_grad=False)
        lin.bias = self.bias
        return lin


def add_lora(m: Qwen25VL, rank=16, alpha=32, dropout=0.05, targets=LORA_TARGETS):
    """Wrap the language model's projections (never the vision encoder or merger) with LoRA."""
    for layer in m.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    return m


def merge_lora(m: Qwen25VL):
    """Fold every LoRA update into its base weight (for evaluation and export)."""
    for layer in m.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, LoRALinear):
                    setattr(parent, name, mod.merged())
    return m


# ----------------------------------------------------------------------------------------------
# Loading and saving hub checkpoints

# The base checkpoint's modules. latent_embeds and a fork's modules (EXTEND) sit beside them,
# so they are never asked of the hub files nor written to them.
BASE_MODULES = ("visual", "model", "lm_head")


def hub_key_map(m: Qwen25VL, layout="hub"):
    """{checkpoint key: our key} for every base weight. Our names are the hub's (legacy) keys;
    newer transformers write `model.visual.*` and `model.language_model.*` instead."""
    ours = [k for k in m.state_dict() if "lora_" not in k and k.split(".")[0] in BASE_MODULES]
    if m.cfg.text.tie_word_embeddings:
        ours.remove("lm_head.weight")       # tied: the hub file has no lm_head.weight
    if layout == "hub":
        return {k: k for k in ours}

    def new(k):
        if k.startswith("visual."):
            return "model." + k
        if k.startswith("model."):
            return "model.language_model." + k[len("model."):]
        return k
    return {new(k): k for k in ours}


def _checkpoint_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index, "index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no \"weight_map\" of tensor -> shard file")
        return [os.path.join(path, str(s)) for s in sorted(set(weight_map.values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is: the message names the file and what is wrong."""


def resolve(path_or_repo_id):
    """A local checkpoint directory as is, or a hub id fetched (weights, configs, tokenizer)."""
    p = str(path_or_repo_id)
    if os.path.isdir(p):
        return p
    if os.path.exists(p):
        raise FileNotFoundError(f"{p} is a file, not a checkpoint directory")
    # a hub id is exactly "org/name"; anything that reads as a path is a missing directory
    if p.count("/") != 1 or p.startswith((".", "~", os.sep)) or os.path.isdir(os.path.dirname(p)):
        raise FileNotFoundError(f"{p}: no such directory (not a checkpoint directory or a hub id)")
    from huggingface_hub import snapshot_download
    return snapshot_download(p, allow_patterns=["*.json", "*.safetensors", "*.txt"])


def read_json(file, what="file"):
    """A JSON object from `file`, or a CheckpointError that names the file and the position."""
    try:
        with open(file, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not a valid JSON {what} ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_config(path):
    """Config from path/config.json; a missing or malformed key is named with the file."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path} has no config.json: not a Qwen2.5-VL/Qwen3-VL checkpoint directory")
    d = read_json(file, "config")
    try:
        return Config.from_dict(d)
    except KeyError as e:
        raise CheckpointError(f"{file}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError, AssertionError, AttributeError, ZeroDivisionError) as e:
        raise CheckpointError(f"{file}: malformed config ({type(e).__name__}: {e})") from None


def _safetensors_error(file, e):
    return CheckpointError(f"{file}: not a readable safetensors file, truncated or corrupt "
                           f"({type(e).__name__}: {e})")


# A fork's new modules: functions m -> None, run by load_pretrained once the hub tensors are
# loaded (strictly) and the latents set, e.g. `lambda m: setattr(m, "aux_head", nn.Linear(...))`.
# Their parameters are not in the base checkpoint, so they are never "missing" to the hub check;
# train.build_model trains them (masks.trainable) and load_livr fills them from a checkpoint.
EXTEND = []


def base_parameter_names(m: Qwen25VL):
    """Our names of the parameters the base (hub) checkpoint holds; the rest (latent rows, LoRA
    factors, a fork's modules) are new."""
    return set(hub_key_map(m).values()) | ({"lm_head.weight"} if m.cfg.text.tie_word_embeddings else set())


def load_pretrained(path_or_repo_id, dtype=torch.float32, device="cpu", num_latents=0,
                    latent_token_id=None, extend=None):
    """Build on `meta`, then fill every tensor from the safetensors files with assign=True.
    dtype=None keeps the checkpoint's dtype (bf16 on the hub). Strict: a missing, unexpected
    or wrongly shaped tensor raises an error that names it and its file. Then the latent rows,
    then each function of `extend` (default: EXTEND) adds a fork's modules."""
    from safetensors import safe_open
    path = resolve(path_or_repo_id)
    cfg = read_config(path)
    with torch.device("meta"):
        m = Qwen25VL(cfg)
    files = _checkpoint_files(path)
    where = {}                                          # checkpoint key -> file (headers only)
    for file in files:
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: missing shard (named in {path}'s index)")
        try:
            with safe_open(file, "pt") as f:
                where.update({k: file for k in f.keys()})
        except Exception as e:             # safetensors' own error type for a bad header
            raise _safetensors_error(file, e) from None
    new_layout = any(k.startswith(("model.visual.", "model.language_model.")) for k in where)
    key_map = hub_key_map(m, "new" if new_layout else "hub")
    expected = dict(m.state_dict())
    state, errors = {}, []
    errors += [f"unexpected tensor {k!r} in {file}" for k, file in where.items() if k not in key_map]
    errors += [f"missing tensor {k!r} (looked in {', '.join(files)})" for k in key_map if k not in where]
    for file in files:
        with safe_open(file, "pt", device=str(device)) as f:
            for key in f.keys():
                if key not in key_map:
                    continue
                try:
                    t = f.get_tensor(key)
                except Exception as e:     # the header promises more bytes than the file has
                    raise _safetensors_error(file, e) from None
                want = tuple(expected[key_map[key]].shape)
                if tuple(t.shape) != want:
                    errors.append(f"tensor {key!r} in {file} has shape {tuple(t.shape)}, "
                                  f"the config says {want}")
                    continue
                state[key_map[key]] = t if dtype is None else t.to(dtype)
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise CheckpointError(f"cannot load {path}:\n  " + "\n  ".join(errors[:20]) + more)
    m.load_state_dict(state, strict=False, assign=True)
    if cfg.text.tie_word_embeddings:
        m.lm_head.weight = m.model.embed_tokens.weight
    m = m.to(device)
    m.set_latents(num_latents, latent_token_id)
    for add in (EXTEND if extend is None else extend):
        add(m)
    return m.eval()


def save_pretrained(m: Qwen25VL, out_dir, max_shard_bytes=None):
    """Write config.json + safetensors in the hub's layout (LoRA merged first, latents left out:
    train.py saves those with its own checkpoints)."""
    from safetensors.torch import save_file
    if any(isinstance(mod, LoRALinear) for mod in m.modules()):
        raise ValueError("merge_lora(model) before save_pretrained: the hub layout has no LoRA")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(m.cfg.to_dict(), f, indent=2)
    ours = m.state_dict()
    layout = "new" if m.cfg.qwen3 else "hub"     # Qwen3-VL's hub files use transformers 5's names
    sd = {ck: ours[k].detach().contiguous().cpu() for ck, k in hub_key_map(m, layout).items()}
    if not max_shard_bytes:
        save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        if cur and size + v.numel() * v.element_size() > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += v.numel() * v.element_size()
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def init_weights(m: Qwen25VL, std=0.02, seed=0):
    """Random init for a model built from a preset (the tiny demo, benchmarks). The embedding
    rows get std 1/sqrt(d), not `std`: the table is tied to the output head and frozen during
    LIVR training, and with 0.02 a small model could not reach a confident logit margin."""
    g = torch.Generator().manual_seed(seed)
    embed_std = m.cfg.text.hidden_size ** -0.5
    for name, p in m.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight") or ".norm" in name or "ln_q" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * embed_std)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


# ----------------------------------------------------------------------------------------------
# LIVR checkpoints: what training changed, on top of a base hub checkpoint

def trainable_state(m: Qwen25VL):
    """The tensors training changed: LoRA factors and latents, or (full) the whole LM too."""
    return {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}


def save_livr(m: Qwen25VL, out_dir, meta, state=None, extra=None):
    """A LIVR checkpoint directory: livr.json (base path, K, latent id, LoRA settings, stage,
    and the names of the tensors it holds) and weights.safetensors with the trainable tensors
    (`state`, default: m's trainable ones). `extra` maps more file names to contents: a dict of
    tensors for a .safetensors name, a JSON-able object for a .json name (never pickle).
    Written to OUT.tmp with livr.json last -- its presence marks the directory complete -- then
    swapped in (swap_in), so a kill at any point leaves a complete checkpoint to recover."""
    from safetensors.torch import save_file
    if m is not None:
        meta = {**meta, "num_latents": m.num_latents, "latent_token_id": m.latent_token_id}
        state = trainable_state(m) if state is None else state
    meta = {**meta, "tensors": sorted(state)}
    out_dir = out_dir.rstrip("/")
    tmp = out_dir + ".tmp"
    remove_checkpoint_dir(tmp)
    os.makedirs(tmp)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()},
              os.path.join(tmp, "weights.safetensors"))
    for name, obj in (extra or {}).items():
        if name.endswith(".safetensors"):
            save_file(obj, os.path.join(tmp, name))
        elif name.endswith(".json"):
            write_json(obj, os.path.join(tmp, name))
        else:
            raise ValueError(f"save_livr: {name}: extra files are .safetensors or .json")
    write_json(meta, os.path.join(tmp, "livr.json"))         # last: the completeness marker
    swap_in(tmp, out_dir)


def write_json(obj, file):
    """Whole or not at all: written beside and renamed, so a reader never sees half a file."""
    with open(file + ".part", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(file + ".part", file)


def remove_checkpoint_dir(path):
    """Remove a checkpoint directory, its completeness marker first: a kill midway leaves an
    incomplete directory, never one that looks complete with tensors missing."""
    import shutil
    if os.path.isfile(os.path.join(path, "livr.json")):
        os.remove(os.path.join(path, "livr.json"))
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path) and not os.path.isdir(path):
        os.remove(path)


def is_complete(path):
    """A LIVR checkpoint directory whose writer finished: livr.json (written last) is there."""
    return os.path.isfile(os.path.join(path, "livr.json"))


def swap_in(tmp, out_dir):
    """Replace out_dir by the complete directory tmp. At every moment one complete copy exists
    under OUT, OUT.old or OUT.tmp; a stale OUT.old from an earlier kill is cleared first (while
    OUT itself is complete), so it can never block the rename."""
    old = out_dir + ".old"
    if os.path.exists(out_dir):
        remove_checkpoint_dir(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    remove_checkpoint_dir(old)


def recover_checkpoint(out_dir):
    """After a kill mid-save: if OUT is missing or incomplete, take the complete OUT.tmp (the
    newer save, fully written) or else OUT.old (the previous one) in its place. Leftovers that
    are not needed are removed. Returns True when OUT is a complete checkpoint afterwards."""
    out_dir = out_dir.rstrip("/")
    tmp, old = out_dir + ".tmp", out_dir + ".old"
    if not is_complete(out_dir):
        for candidate in (tmp, old):
            if is_complete(candidate):
                remove_checkpoint_dir(out_dir)
                os.replace(candidate, out_dir)
                break
    if is_complete(out_dir):
        remove_checkpoint_dir(tmp)
        remove_checkpoint_dir(old)
        return True
    return False


def required_tensors(m: Qwen25VL, meta):
    """The tensors a LIVR checkpoint must hold: those its livr.json lists (train.py writes the
    list), and in any case every parameter the base checkpoint lacks (latent rows, LoRA factors,
    a fork's modules); without a list, a --train full run's LM weights too."""
    listed = meta.get("tensors") or []
    if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
        raise CheckpointError("livr.json: \"tensors\" must be a list of tensor names")
    base = set(hub_key_map(m).values())
    params = [k for k, _ in m.named_parameters()]
    need = set(listed) | {k for k in params if k not in base}
    if "tensors" not in meta and meta.get("train") == "full":
        need |= {k for k in params if masks.trainable(k, "full")}
    return need


def check_state(weights, params, required, source):
    """Raise CheckpointError naming every missing, unknown, mis-shaped and non-finite tensor.
    weights: {name: tensor} read from `source`; params: {name: parameter} of the model (their
    logical shapes, DTensors included); required: names that must be in `weights`."""
    errors = [f"missing tensor {k!r}" for k in sorted(required) if k not in weights]
    errors += [f"unknown tensor {k!r} (this model has no such trainable parameter; a fork's "
               "module is added by a function in model.EXTEND)" for k in sorted(weights) if k not in params]
    errors += [f"tensor {k!r} has shape {tuple(v.shape)}, the model expects "
               f"{tuple(params[k].shape)}" for k, v in sorted(weights.items())
               if k in params and tuple(v.shape) != tuple(params[k].shape)]
    errors += [f"tensor {k!r} holds non-finite values" for k, v in sorted(weights.items())
               if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise CheckpointError(f"{source} is incomplete or does not fit the model:\n  "
                              + "\n  ".join(errors[:20]) + more)


def read_safetensors(file, device="cpu"):
    """{name: tensor} from a safetensors file; a truncated or corrupt file is named."""
    from safetensors.torch import load_file
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: no such file")
    try:
        return load_file(file, device=str(device))
    except Exception as e:                # safetensors' own error type
        raise _safetensors_error(file, e) from None


def load_livr(path, dtype=torch.float32, device="cpu", merge=False):
    """A checkpoint from train.py (livr.json + weights.safetensors), or a plain hub checkpoint
    (zero-shot, or a LIVR model written by export.py). Returns (model, meta). Complete or an
    error: every missing, unknown or mis-shaped tensor is named (CheckpointError)."""
    meta_file = os.path.join(path, "livr.json")
    if not os.path.exists(meta_file):
        m = load_pretrained(path, dtype=dtype, device=device)
        exported = read_json(os.path.join(resolve(path), "config.json"), "config").get("livr") or {}
        if exported.get("num_latents"):
            k, first = exported["num_latents"], exported.get("latent_token_id")
            if not isinstance(k, int) or not isinstance(first, int) or not 0 <= first <= m.cfg.text.vocab_size - k:
                raise CheckpointError(f"{path}/config.json: \"livr\" must give num_latents and a "
                                      f"latent_token_id whose rows fit the table, not {exported!r}")
            m.set_latents(k, first)
            with torch.no_grad():     # the export wrote the latent rows into the table at their ids
                m.latent_embeds.copy_(m.model.embed_tokens.weight[first:first + k])
        return m, {"base": path, **exported, "num_latents": m.num_latents}
    meta = read_json(meta_file, "LIVR checkpoint description")
    missing = [k for k in ("base", "num_latents", "latent_token_id") if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_file}: missing key {missing[0]!r}")
    if not isinstance(meta["num_latents"], int) or meta["num_latents"] < 0:
        raise CheckpointError(f"{meta_file}: num_latents must be a whole number >= 0, "
                              f"not {meta['num_latents']!r}")
    m = load_pretrained(meta["base"], dtype=dtype, device=device,
                        num_latents=meta["num_latents"], latent_token_id=meta["latent_token_id"])
    if meta.get("lora"):
        lora = meta["lora"]
        if not isinstance(lora, dict) or set(lora) - {"rank", "alpha", "dropout"}:
            raise CheckpointError(f"{meta_file}: \"lora\" must be {{rank, alpha, dropout}}, not {lora!r}")
        add_lora(m, **lora)
    weights_file = os.path.join(path, "weights.safetensors")
    weights = read_safetensors(weights_file, device)
    params = dict(m.named_parameters())
    check_state(weights, params, required_tensors(m, meta), weights_file)
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v)
    if merge:
        merge_lora(m)
    return m.eval(), meta


if __name__ == "__main__":
    # python model.py export RUN/stage2/final OUT: a plain hub checkpoint of a trained LIVR model,
    # for transformers, lmms-eval and vLLM (the code is export.py's)
    import sys
    if sys.argv[1:2] != ["export"]:
        sys.exit("usage: python model.py export CHECKPOINT OUT [--max-shard-size 5GB] [--dtype bf16]")
    import export
    sys.exit(export.main(sys.argv[2:], prog="model.py export"))
