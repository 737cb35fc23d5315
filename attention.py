"""
Attention over a packed micro-batch, without computing the pairs of different samples: the mask
of masks.build_mask (a rule of masks.RULES, causality and the packed-sample blocks) in one of
two forms model.Attention and vision.Attention dispatch on.
  blocks (the default)   Blocks: each sample's own [Ls, Ls] mask, one SDPA call per sample
                         (block_attention); what is off the blocks is never computed.
  flex (--attention flex) a FlexAttention BlockMask: each decoder layer attends over the whole
                         micro-batch in ONE call, and each full-attention vision block over all
                         images in one call; empty tiles cost nothing, and making the mask never
                         waits on the device.
The definitions stay where they are; this file only re-expresses them:
  decoder  masks.build_mask(kinds, mode, segments) is made on the device as the dense [B, L, L]
           boolean it is, then cut into BLOCK x BLOCK tiles: a tile without an edge is skipped,
           a tile of edges only runs without looking at the mask, the others read the dense mask
           (mask_mod). A rule added to masks.RULES works here unchanged.
  vision   vision.image_attention's blocks: a slot attends to the real slots of its own image
           frame (layout.images), from each slot's frame number and whether it is real.
On CPU (torch 2.13) FlexAttention runs forward only, eager and unfused (it materialises the
scores; no backward): tests/test_flex.py checks there that it equals the per-sample path, and on
a GPU that the gradients do too and that nothing syncs with the host. BENCH.md has what was
measured; train.py --attention and bench.py --attention choose the path.
"""
import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

import masks
import vision

BLOCK = 128          # FlexAttention's tile: BLOCK queries x BLOCK keys


# ----------------------------------------------------------------------------------------------
# Per-sample blocks: one SDPA call per packed sample

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


def attention_blocks(kinds, mask_mode, spans, num_latents=None, progress=None):
    """masks.build_mask(kinds, mask_mode, segments) of a packed batch, kept as its diagonal blocks:
    Blocks of (row, start, end, mask) with mask = masks.build_mask(kinds[row, start:end], mask_mode), the
    sample's own [Ls, Ls] rule, or None where the rule is plain causal (SDPA's is_causal: the
    flash kernel on a GPU). Off the blocks the dense mask is False -- samples never attend to
    each other -- so block_attention spends nothing there. num_latents and progress reach the
    rule's Context. Built on kinds' device, no sync."""
    causal = masks.mode_name(mask_mode) == "causal"
    return Blocks([(b, s, e, None if causal else masks.build_mask(kinds[b, s:e], mask_mode, None, num_latents, progress))
                   for b, s, e in spans])


# ----------------------------------------------------------------------------------------------
# FlexAttention: one block-sparse call

def flex(q, k, v, block_mask):
    """One FlexAttention call: q (B, nh, L, hd), k/v (B, nkv, L, hd) -> (B, L, nh, hd)."""
    # on a GPU FlexAttention is fast only compiled (eager, it writes out the scores); inside a
    # block compiled by model.compile_blocks it is traced with the block instead
    eager = q.device.type == "cpu" or torch.compiler.is_compiling()
    fn = flex_attention if eager else _compiled()
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)


@functools.cache
def _compiled():
    # dynamic: every micro-batch has its own length, and one graph serves them all
    return torch.compile(flex_attention, dynamic=True)


# ----------------------------------------------------------------------------------------------
# The decoder: the dense mask of masks.build_mask, cut into tiles

def decoder_mask(kinds, mode, segments, num_latents=None, progress=None, block=BLOCK):
    """kinds, segments [B, L] (on the device) and a mask mode -> the BlockMask of
    masks.build_mask(kinds, mode, segments, num_latents, progress). Tensor ops only: nothing is
    read back."""
    L = kinds.shape[-1]
    pad = -L % block                 # whole tiles; the padding has no edges
    dense = F.pad(masks.build_mask(kinds, mode, segments, num_latents, progress), (0, pad, 0, pad))  # [B, Lp, Lp]
    B, Lp, _ = dense.shape
    n = Lp // block
    edges = dense.view(B, n, block, n, block).sum((2, 4))                       # [B, nq, nk]
    full = edges == block * block

    def mask_mod(b, h, q, kv):       # partial tiles only: full ones never call it
        return dense[b, q, kv]
    return BlockMask.from_kv_blocks(*_ordered((edges > 0) & ~full), *_ordered(full),
                                    BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(L, L))


def _ordered(tiles):
    """[B, nq, nk] bool -> FlexAttention's lists: per query tile the number of key tiles listed
    [B, 1, nq] and their indices, listed ones first [B, 1, nq, nk] (int32; one head dimension,
    shared by every head)."""
    t = tiles[:, None].to(torch.int32)
    return (t.sum(-1, dtype=torch.int32),
            torch.argsort(t, dim=-1, descending=True, stable=True).to(torch.int32))


# ----------------------------------------------------------------------------------------------
# The vision encoder: full attention within each image frame, every image at once

@dataclasses.dataclass
class FlexLayout(vision.Layout):
    """A vision.Layout whose full-attention blocks attend through one block-sparse call
    (vision.Attention dispatches on `attend`). Made on the device, after Layout.to."""
    block_mask: BlockMask = None

    def attend(self, q, k, v):
        """vision.image_attention in one call: q, k, v [S, nh, hs] -> [S, nh * hs]."""
        # contiguous (1, nh, S, hs), as image_attention makes them: inside a block compiled on
        # CPU, FlexAttention read these strided views wrongly (torch 2.13; tests/test_flex.py)
        y = flex(*(z.transpose(0, 1)[None].contiguous() for z in (q, k, v)), self.block_mask)
        return y.reshape(q.shape[0], -1)


def vision_layout(layout, block=BLOCK):
    """A vision.Layout (on the device) -> the same as a FlexLayout; None stays None."""
    if layout is None:
        return None
    frame, real, frames = _frames(layout)              # [S] long, [S] bool, frame count
    S = frame.shape[0]
    pad = -S % block
    frame = F.pad(frame, (0, pad), value=frames)       # the padding: a frame of its own, not real
    real = F.pad(real, (0, pad))
    n = (S + pad) // block
    # frame numbers never decrease along the slots, so a tile holds the frames first..last
    first, last = frame.view(n, block)[:, 0], frame.view(n, block)[:, -1]          # [n]
    any_real, all_real = real.view(n, block).any(-1), real.view(n, block).all(-1)  # [n]
    one = first == last
    meet = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None]) & any_real[None, :]
    full = meet & one[:, None] & one[None, :] & (first[:, None] == first[None, :]) & all_real[None, :]

    # one captured tensor [2, Sp]: the query's frame, the key's frame or -1 where its slot is
    # empty (two captured vectors failed to build in Inductor's CPU template, torch 2.13)
    ids = torch.stack([frame, torch.where(real, frame, -1)]).to(torch.int32)

    def mask_mod(b, h, q, kv):
        return ids[0, q] == ids[1, kv]
    bm = BlockMask.from_kv_blocks(*_ordered((meet & ~full)[None]), *_ordered(full[None]),
                                  BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(S, S))
    fields = {f.name: getattr(layout, f.name) for f in dataclasses.fields(vision.Layout)}
    return FlexLayout(**fields, block_mask=bm)


def _frames(layout):
    """Each slot's frame number [S] and whether it holds a real patch [S] (image_attention's key
    masks), on the layout's device; and the number of frames. Images follow one another from
    slot 0 (window_layout, full_layout)."""
    dev = layout.src.device
    frame, real, f0, slot = [], [], 0, 0
    for a, t, n, key_mask in layout.images:            # (first slot, frames, slots per frame, mask)
        assert a == slot, "vision layout: images must follow one another"
        frame.append(torch.arange(t * n, device=dev) // n + f0)
        real.append(torch.ones(t * n, dtype=torch.bool, device=dev) if key_mask is None
                    else key_mask.reshape(-1))
        f0, slot = f0 + t, slot + t * n
    return torch.cat(frame), torch.cat(real), f0
