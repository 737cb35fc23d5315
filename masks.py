"""
The LIVR method in one place: the token kinds, where the latents go, the attention-mask rules,
and which parameters train. Everything else in the repository only carries these out.

LIVR (Latent Implicit Visual Reasoning) appends K learnable latent tokens after the question.
In Stage 1 the *bottleneck* mask forces every path from the image to the answer to run through
those latents; Stage 2 and inference use the plain causal mask.

    mask[..., i, j] == True  <=>  query token i may attend to key token j

A mask mode is one rule below: (kinds [..., L], ctx) -> BoolTensor [..., L, L] of the edges it
keeps, where ctx (a Context) tells K, each latent's index in its group and the training progress
(a curriculum needs no module global). build_mask ANDs the rule with the causal mask and with the
packed-sample blocks, so a rule never has to think about either. The rules:
  "bottleneck" (stage 1): every token that is neither IMAGE nor LATENT loses its edges to all
      IMAGE tokens. IMAGE tokens attend causally as usual; LATENT tokens keep everything
      earlier (prompt, images, earlier latents) -- they are the only route from image to answer.
  "answer_only" (the paper's "mask only" ablation): only ANSWER tokens lose the image.
  "causal" (stage 2, inference): plain causal.
A new mode is one new function added to RULES: train.py's and evaluate.py's --mask pick it up.
SYSTEM and ANSWER are kinds of their own so that a rule can single them out; the rules here
treat SYSTEM as TEXT, and only "answer_only" tells ANSWER from TEXT.
The diagonal always survives (no rule may cut it), so no row is empty and SDPA never sees a
fully masked row.

Run `python masks.py` to see a small example drawn as a character grid.
"""
import functools

import torch

# ----------------------------------------------------------------------------------------------
# Token kinds, one per position (data.Processor.encode assigns them)

TEXT, IMAGE, LATENT, ANSWER, SYSTEM = 0, 1, 2, 3, 4
KIND_CHARS = {TEXT: "t", IMAGE: "I", LATENT: "L", ANSWER: "a", SYSTEM: "s"}
KIND_NAMES = {TEXT: "text", IMAGE: "image", LATENT: "latent", ANSWER: "answer", SYSTEM: "system"}


def image_index(kinds):
    """[..., L] -> [..., L] long: which image (0, 1, ...) the token belongs to or follows, -1
    before the first. An image is a run of IMAGE tokens, so a rule can tell images (and the
    latents placed after each) apart from the kinds alone."""
    is_image = kinds == IMAGE
    starts = is_image.clone()
    starts[..., 1:] &= ~is_image[..., :-1]                # the first token of each run
    return starts.long().cumsum(-1) - 1


# ----------------------------------------------------------------------------------------------
# Where the latents go: Q' = Q + L, the K latent tokens right after the question

def place_latents(user_parts, latents, is_image=lambda part: isinstance(part, int)):
    """The user turn's parts in order (question text and images; is_image tells them apart)
    with `latents`, the K latent tokens as one part, inserted. data.Processor and bench.py
    both lay out their sequences with this. LIVR: after the whole question."""
    return list(user_parts) + [latents]


# ----------------------------------------------------------------------------------------------
# The mask rules: (kinds [..., L], context) -> edges kept [..., L, L] (before causal and packing)

class Context:
    """What a rule may read besides the kinds; build_mask makes it. Everything is on the kinds'
    device and computed only when a rule reads it, so building a mask never waits on the device.
      segments      [..., L] packed-sample numbers (None: one sample per row)
      num_latents   K, as the model has it (None where the caller does not say)
      progress      training progress in [0, 1] (step / total steps) while training and
                    validating; None at inference -- a curriculum decides what that means
      latent_index  [..., L] long: each latent's index in its group (a run of LATENT tokens:
                    0..K-1, again after each image when a fork places latents per image), -1 elsewhere
    """

    def __init__(self, kinds, segments=None, num_latents=None, progress=None):
        self.kinds, self.segments = kinds, segments
        self.num_latents, self.progress = num_latents, progress

    @functools.cached_property
    def latent_index(self):
        is_latent = self.kinds == LATENT
        pos = torch.arange(self.kinds.shape[-1], device=self.kinds.device).expand_as(self.kinds)
        starts = is_latent.clone()
        starts[..., 1:] &= ~is_latent[..., :-1]                # the first latent of each group
        first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(-1).values
        return torch.where(is_latent, pos - first, torch.full_like(pos, -1))


def causal(kinds, ctx=None):
    """Stage 2 and inference: nothing beyond the causal mask."""
    return torch.ones(kinds.shape[-1], kinds.shape[-1], dtype=torch.bool, device=kinds.device)


def bottleneck(kinds, ctx=None):
    """Stage 1: only IMAGE and LATENT queries may attend to IMAGE keys."""
    blind = (kinds != IMAGE) & (kinds != LATENT)          # queries that may not see the image
    return ~(blind[..., :, None] & (kinds == IMAGE)[..., None, :])


def answer_only(kinds, ctx=None):
    """The "mask only" ablation: ANSWER queries may not attend to IMAGE keys."""
    return ~((kinds == ANSWER)[..., :, None] & (kinds == IMAGE)[..., None, :])


RULES = {"bottleneck": bottleneck, "causal": causal, "answer_only": answer_only}
STAGE_MODES = {1: "bottleneck", 2: "causal"}      # the mask each training stage uses by default


def mode_name(mode):
    """1, 2 or a name in RULES -> the name; anything else is a ValueError listing the modes."""
    name = STAGE_MODES.get(mode, mode)
    if not isinstance(name, str) or name not in RULES:
        raise ValueError(f"unknown mask mode {mode!r}; expected one of "
                         f"{sorted(map(str, [*STAGE_MODES, *RULES]))}")
    return name


def build_mask(kinds, mode, segments=None, num_latents=None, progress=None):
    """kinds: LongTensor [L] or [B, L]; mode: 1, 2 or a name in RULES; segments: same shape as
    kinds, numbering packed samples (padding can be its own segment); num_latents and progress
    reach the rule through its Context. Returns BoolTensor [..., L, L]."""
    name = mode_name(mode)
    L = kinds.shape[-1]
    pos = torch.arange(L, device=kinds.device)
    mask = (pos[:, None] >= pos[None, :]).expand(*kinds.shape[:-1], L, L)  # causal
    if segments is not None:
        mask = mask & (segments[..., :, None] == segments[..., None, :])
    if name == "causal":
        return mask
    rule = RULES[name](kinds, Context(kinds, segments, num_latents, progress))
    return mask & (rule | torch.eye(L, dtype=torch.bool, device=kinds.device))


def generated_keys(kinds, mode, num_latents=None):
    """[B, L] prompt kinds -> [B, L] bool: the prompt keys a generated token may attend to
    under `mode` -- the rule's row for one more ANSWER token after the prompt."""
    ext = torch.cat([kinds, torch.full_like(kinds[..., :1], ANSWER)], -1)     # (B, L+1)
    return build_mask(ext, mode, num_latents=num_latents)[..., -1, :-1]


# ----------------------------------------------------------------------------------------------
# Which parameters train

def trainable(name, train="lora", from_base=True):
    """Whether parameter `name` trains. Everything the base checkpoint lacks trains: the latent
    rows, the LoRA factors, a fork's new module (from_base=False). Of the base weights, only the
    language model's blocks and final norm, and only with --train full; the vision encoder, the
    merger and the embedding table (tied to the head) stay frozen."""
    if not from_base or name == "latent_embeds" or "lora_" in name:
        return True
    return train == "full" and name.startswith("model.") and "embed_tokens" not in name


def draw(kinds, mask):
    """A [L] kinds vector and its [L, L] mask as text: rows are queries, columns keys."""
    k = "".join(KIND_CHARS[int(x)] for x in kinds)
    rows = ["   " + k]
    for i, row in enumerate(mask):
        rows.append(f"{k[i]}  " + "".join("#" if x else "." for x in row))
    return "\n".join(rows)


if __name__ == "__main__":
    # a toy sequence: system, an image, question text, K=3 latents, the answer
    s, t, I, L, a = SYSTEM, TEXT, IMAGE, LATENT, ANSWER
    kinds = torch.tensor([s, s, I, I, I, I, t, t, L, L, L, t, a, a])
    print("kinds: s=system  t=text  I=image  L=latent  a=answer   (# = may attend)\n")
    for mode in RULES:
        print(f"{mode}:")
        print(draw(kinds, build_mask(kinds, mode)), "\n")
    segments = torch.tensor([0] * 7 + [1] * 7)
    print("bottleneck, two packed samples (segments 0 and 1):")
    print(draw(kinds, build_mask(kinds, "bottleneck", segments)))
