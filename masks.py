"""
The LIVR method in one place: the token kinds, where the latents go, the attention-mask rules,
and which parameters train. Everything else in the repository only carries these out.

LIVR (Latent Implicit Visual Reasoning) appends K learnable latent tokens after the question.
In Stage 1 the *bottleneck* mask forces every path from the image to the answer to run through
those latents; Stage 2 and inference use the plain causal mask.

    mask[..., i, j] == True  <=>  query token i may attend to key token j

A rule is stated in terms of what the *predictions* can see. Position i's output predicts token
i+1, so the answer's first token is predicted at the last prompt position (the "\\n" after
"assistant"), not at an answer token. The *answer side* of a sequence is every position whose
output is trained or decoded as an answer token: the last prompt position through the answer's
last-but-one token (in a prompt that awaits its answer, its last position; in generation, every
generated token). Context.answer_side marks them.

A mask mode is one rule below: (kinds [..., L], ctx) -> BoolTensor [..., L, L] of the edges it
keeps, where ctx (a Context) tells the answer side, K, each latent's index in its group and the
training progress (a curriculum needs no module global). build_mask ANDs the rule with the
causal mask and with the packed-sample blocks, so a rule never has to think about either:
  "bottleneck" (stage 1): every query that is neither IMAGE nor LATENT -- and every query on the
      answer side -- loses its edges to all IMAGE keys. IMAGE queries attend causally as usual;
      LATENT queries keep everything earlier (prompt, images, earlier latents): they are the only
      route from the image to the answer.
  "answer_only" (the paper's "blocking only answer->image"): only the answer side loses the
      image; the prompt still sees it, so image information can reach the answer through the
      prompt's hidden states -- the leak the bottleneck closes.
  "latents_image_only" (the paper's "latents blocked from the prompt"): the bottleneck, and the
      latents lose the question and the system text; they keep the images and earlier latents.
  "causal" (stage 2, inference): plain causal.
A new mode is one new function added to RULES: train.py's and evaluate.py's --mask pick it up.
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

LATENT_POSITIONS = ("after", "before")


def place_latents(user_parts, latents, is_image=lambda part: isinstance(part, int), position="after"):
    """The user turn's parts in order (question text and images; is_image tells them apart)
    with `latents`, the K latent tokens as one part, inserted. data.Processor and bench.py
    both lay out their sequences with this. "after": LIVR, Q' = Q + L, after the whole question.
    "before": the paper's ablation L + Q, at the start of the user turn -- before the images too,
    so under causal attention the latents never see the image: in stage 1 the bottleneck then
    leaves the answer no path to it at all."""
    if position == "before":
        return [latents] + list(user_parts)
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
      answer_side   [..., L] bool: the positions whose output is trained or decoded as an answer
                    token: the next token (in the same sample) is ANSWER, or the position ends a
                    sample that holds no ANSWER token yet (a prompt: it predicts the answer's
                    first token)
      latent_index  [..., L] long: each latent's index in its group (a run of LATENT tokens:
                    0..K-1, again after each image when a fork places latents per image), -1 elsewhere
    """

    def __init__(self, kinds, segments=None, num_latents=None, progress=None):
        self.kinds, self.segments = kinds, segments
        self.num_latents, self.progress = num_latents, progress

    @functools.cached_property
    def answer_side(self):
        k = self.kinds
        seg = torch.zeros_like(k) if self.segments is None else self.segments
        same_next = seg[..., 1:] == seg[..., :-1]
        side = torch.zeros_like(k, dtype=torch.bool)
        side[..., :-1] = (k[..., 1:] == ANSWER) & same_next         # the next token is an answer token
        ends = torch.ones_like(side)
        ends[..., :-1] = ~same_next                                  # the last position of a sample
        same = seg[..., :, None] == seg[..., None, :]                # (..., L, L)
        has_answer = (same & (k == ANSWER)[..., None, :]).any(-1)    # its sample holds an answer
        return side | (ends & ~has_answer)

    @functools.cached_property
    def latent_index(self):
        is_latent = self.kinds == LATENT
        pos = torch.arange(self.kinds.shape[-1], device=self.kinds.device).expand_as(self.kinds)
        starts = is_latent.clone()
        starts[..., 1:] &= ~is_latent[..., :-1]                # the first latent of each group
        first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(-1).values
        return torch.where(is_latent, pos - first, torch.full_like(pos, -1))


def _cut(queries, keys):
    """Kept edges when every query in `queries` [..., L] loses every key in `keys` [..., L]."""
    return ~(queries[..., :, None] & keys[..., None, :])


def causal(kinds, ctx=None):
    """Stage 2 and inference: nothing beyond the causal mask."""
    return torch.ones(kinds.shape[-1], kinds.shape[-1], dtype=torch.bool, device=kinds.device)


def bottleneck(kinds, ctx=None):
    """Stage 1: only IMAGE and LATENT queries may attend to IMAGE keys, and never a position
    that predicts the answer."""
    ctx = ctx or Context(kinds)
    blind = ((kinds != IMAGE) & (kinds != LATENT)) | ctx.answer_side
    return _cut(blind, kinds == IMAGE)


def answer_only(kinds, ctx=None):
    """Only the answer's predictions lose their edges to the image; the prompt keeps them."""
    ctx = ctx or Context(kinds)
    return _cut(ctx.answer_side, kinds == IMAGE)


def latents_image_only(kinds, ctx=None):
    """The bottleneck, and the latents lose the question and system text: they keep only the
    images and earlier latents."""
    ctx = ctx or Context(kinds)
    prompt_text = (kinds == TEXT) | (kinds == SYSTEM)
    return bottleneck(kinds, ctx) & _cut(kinds == LATENT, prompt_text)


RULES = {"bottleneck": bottleneck, "causal": causal, "answer_only": answer_only,
         "latents_image_only": latents_image_only}
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
    if not (isinstance(rule, torch.Tensor) and rule.dtype == torch.bool and rule.shape == mask.shape):
        got = f"{rule.dtype} {tuple(rule.shape)}" if isinstance(rule, torch.Tensor) else type(rule).__name__
        raise ValueError(f"mask rule {name!r} returned {got}: a rule returns the kept edges as a bool "
                         f"tensor of shape {tuple(mask.shape)} (kinds' shape + (L,)), never broadcast")
    return mask & (rule | torch.eye(L, dtype=torch.bool, device=kinds.device))


def generated_keys(kinds, mode, num_latents=None):
    """[B, L] prompt kinds -> [B, L] bool: the prompt keys a generated token may attend to
    under `mode` -- the rule's row for a generated token, which is an ANSWER token whose own
    output is decoded as the next answer token (so: on the answer side)."""
    ext = torch.cat([kinds, torch.full_like(kinds[..., :2], ANSWER)], -1)     # (B, L+2)
    return build_mask(ext, mode, num_latents=num_latents)[..., -2, :-2]


# ----------------------------------------------------------------------------------------------
# Which parameters train

TRAIN_MODES = ("lora", "latents", "full", "full-embed")


def trainable(name, train="lora", from_base=True):
    """Whether parameter `name` trains under --train `train`. Always: what the base checkpoint
    lacks -- the latent rows, the LoRA factors (which exist only under "lora"), a fork's new
    module (from_base=False). Of the base weights:
      "lora", "latents"  none ("latents": the K latent rows alone, the paper's prompt tuning)
      "full"             the language model's blocks and final norm; the embedding table (tied
                         to the head in the 3B/4B) and the head stay frozen
      "full-embed"       the whole language model: also the embedding table and the output head
    The vision encoder and the merger never train."""
    if not from_base or name == "latent_embeds" or "lora_" in name:
        return True
    if train == "full-embed":
        return name.startswith("model.") or name == "lm_head.weight"
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
    print("kinds: s=system  t=text  I=image  L=latent  a=answer   (# = may attend; ^ = the answer side,")
    print("the positions whose output is an answer token)\n")
    side = "   " + "".join("^" if x else " " for x in Context(kinds).answer_side)
    for mode in RULES:
        print(f"{mode}:")
        print(draw(kinds, build_mask(kinds, mode)) + "\n" + side + "\n")
    segments = torch.tensor([0] * 7 + [1] * 7)
    print("bottleneck, two packed samples (segments 0 and 1):")
    print(draw(kinds, build_mask(kinds, "bottleneck", segments)))
