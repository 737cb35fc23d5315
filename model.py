"""
Qwen2.5-VL and Qwen3-VL written out by hand -- the network, read top to bottom -- plus the two
things LIVR adds to them: latent tokens and LoRA.

Mirrors transformers' `Qwen2_5_VLForConditionalGeneration` and `Qwen3VLForConditionalGeneration`
(the numerical oracles, matched to 1e-4 relative in tests/test_model.py and tests/test_qwen3.py)
without their indirection. Notable features:
  - M-RoPE position ids for text + several images, restarting per packed sample;
  - one forward for training, prefill and decode (a static KV cache: no reallocation per token), with an
    optional explicit boolean attention mask -- the door the LIVR bottleneck comes through;
  - attention run per packed sample on its own block of the mask (attention.py: per-sample
    SDPA blocks or one block-sparse FlexAttention call), so a packed training step never pays
    for the pairs of different samples;
  - LIVR latent tokens: K rows of their own (`latent_embeds`), trained while the tied
    embedding table stays frozen (the paper trains only the K new rows);
  - hand-written LoRA on q, k, v, o, gate, up, down that merges back for export;
  - open to forks: `forward(..., return_hidden=True)` returns an `Output` (logits, last hidden
    states, image features, token kinds), and `EXTEND` adds a fork's modules;
  - Qwen3-VL (config.json's model_type "qwen3_vl") as switches of the same classes: q/k RMSNorm,
    no q/k/v bias, an explicit head_dim, interleaved M-RoPE, and the vision tower's DeepStack
    features added at the image positions after the first decoder layers (vision.py has the rest).
Loading and saving the hub's files is checkpoint.py's; making a packed batch ready on the host
is batching.py's.

    import checkpoint
    m = checkpoint.load_pretrained("Qwen/Qwen2.5-VL-3B-Instruct")   # fp32 on CPU by default
    logits = m(input_ids=ids, pixel_values=pv, image_grid_thw=thw)   # [B, L, vocab]

    b = batching.prepare_batch(batching.pack(encoded, 8192)[0], m.cfg)   # training: on the host
    logits = m(b["input_ids"], b["pixel_values"], mask=attention.attention_blocks(b["kinds"], "bottleneck", b["spans"]),
               position_ids=b["position_ids"], vision_layout=b["vision_layout"],
               logits_at=b["logits_at"])                            # [n, vocab], as train.compute_loss
"""
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import attention
import masks
import vision
from attention import Blocks, attention_blocks, sdpa  # noqa: F401 (model.attention_blocks)
from vision import VisionConfig, VisionEncoder


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
    # Qwen3-VL's switches (checkpoint.config_from_dict sets them from a "qwen3_vl" config.json)
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
    if name == "4b":   # Qwen/Qwen3-VL-4B-Instruct's shapes (its config.json): the Qwen3-VL switches on
        text = TextConfig(vocab_size=vocab_size, hidden_size=2560, intermediate_size=9728,
                          num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                          rope_theta=5e6, mrope_section=[24, 20, 20], tie_word_embeddings=True,
                          attention_bias=False, qk_norm=True, mrope_interleaved=True, explicit_head_dim=128)
        vision = VisionConfig.from_dict(dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096,
                                             patch_size=16, out_hidden_size=2560, num_position_embeddings=2304,
                                             deepstack_visual_indexes=[5, 11, 17]), "qwen3_vl")
        return Config(text=text, vision=vision, model_type="qwen3_vl", **token_ids)
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
    # A static cache: one slot per position, written at `input_pos` (no growth, no copies). Allocated at the
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
        if isinstance(mask, Blocks):  # a packed batch's per-sample blocks (attention.py)
            return self.o_proj(attention.block_attention(q, k, v, mask).reshape(B, L, -1)), None
        if isinstance(mask, attention.BlockMask):  # --attention flex: the whole micro-batch in one call
            return self.o_proj(attention.flex(q, k, v, mask).reshape(B, L, -1)), None
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
    def set_latents(self, num_latents, latent_token_id=None, shared=False):
        """K latent tokens with ids latent_token_id .. latent_token_id+K-1 (the tokenizer's added
        special tokens). Their embeddings are a separate [K, d] parameter, initialised at the
        embedding table's scale, so the frozen (and tied) table is never touched. shared: one
        [1, d] row for all K (the paper's ablation; the K positions still differ). K=0: none."""
        self.num_latents, self.latent_token_id, self.shared_latent = num_latents, latent_token_id, shared
        self.latent_embeds = None
        if num_latents:
            if latent_token_id is None:
                raise ValueError("latent tokens need latent_token_id (the id of <|latent_0|>)")
            if latent_token_id + num_latents > self.cfg.text.vocab_size:
                self.grow_vocab(latent_token_id + num_latents)     # a base with no spare rows
            table = self.model.embed_tokens.weight
            std = table.float().std().item() if table.device.type != "meta" else 0.02
            init = torch.randn(1 if shared else num_latents, self.cfg.text.hidden_size, device=table.device) * std
            self.latent_embeds = nn.Parameter(init.to(table.dtype))

    def latent_rows(self):
        """The K latent embeddings, (K, d): the shared row repeated when there is one."""
        return self.latent_embeds.expand(self.num_latents, -1)

    def mask_latent_logits(self, logits):
        """logits (..., vocab) with the latent ids at -inf, in place: the model never emits a
        latent token (generate and val_accuracy decode through this)."""
        if self.num_latents:
            logits[..., self.latent_token_id:self.latent_token_id + self.num_latents] = float("-inf")
        return logits

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
            lat = self.latent_embeds[idx.clamp(0, self.latent_embeds.shape[0] - 1)]
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
        vision_layout   vision.window_layout(image_grid_thw), made ahead (batching.prepare_batch)
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
                 max_new_tokens=16, eos_token_id=None, kinds=None, mask_mode="causal"):
        """Greedy decoding with the KV cache. Prompts are left-padded (attention_mask 0 on the
        left). mask_mode="bottleneck" (or any masks.RULES mode) with `kinds` decodes under that
        rule: the prompt as in masks.build_mask (its last position predicts the answer's first
        token: the answer side) and every generated token as an ANSWER token that predicts the
        next (under the bottleneck: blind to the image, the paper's test-time check). Latent
        tokens are never generated. Returns (B, <= max_new_tokens)."""
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
            prefill_mask = masks.build_mask(kinds, mask_mode, segment_ids, self.num_latents)
            # every generated token attends to real prompt keys, those the rule leaves an answer
            key_ok = attention_mask.bool()
            if masks.mode_name(mask_mode) != "causal":
                key_ok = key_ok & masks.generated_keys(kinds, mask_mode, self.num_latents)
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
                tok = self.mask_latent_logits(logits).argmax(-1)
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


def compile_blocks(m: Qwen25VL):
    """torch.compile each decoder layer and vision block, with dynamic shapes so that one graph
    serves every length: a block's per-token work (fp32 norms, projections, rotary, SwiGLU, LoRA
    and its dropout, residuals) fuses into few kernels where eager launches one per op. The
    attention loops over samples and images (block_attention, vision.image_attention) stay eager
    between the compiled parts: traced, they would recompile for every new count. Call before
    FSDP wraps the blocks (train.place_model). Returns m."""
    attention.block_attention = torch.compiler.disable(attention.block_attention)
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
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # B = 0: the adapter is a no-op at start

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
# A fork's new modules, and random init

# Functions m -> None, run by checkpoint.load_pretrained once the hub tensors are loaded (strictly)
# and the latents set, e.g. `lambda m: setattr(m, "aux_head", nn.Linear(...))`. Their parameters
# are not in the base checkpoint, so the hub check never asks for them; masks.trainable trains
# them and checkpoint.load_livr fills them from a LIVR checkpoint.
EXTEND = []


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

