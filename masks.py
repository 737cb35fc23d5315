"""
The LIVR attention masks, built explicitly as boolean tensors you can print.

LIVR (Latent Implicit Visual Reasoning) appends K learnable latent tokens after the prompt.
In Stage 1 the *bottleneck* mask forces every path from the image to the answer to run through
those latents; Stage 2 and inference use the plain causal mask (PAPER.md, "Attention masks").

    mask[..., i, j] == True  <=>  query token i may attend to key token j

The rule, starting from the causal mask and never crossing packed-sample boundaries:
  stage 1 ("bottleneck"): every token that is neither IMAGE nor LATENT loses its edges to all
      IMAGE tokens. IMAGE tokens attend causally as usual; LATENT tokens keep everything
      earlier (prompt, images, earlier latents) -- they are the only route from image to answer.
  "answer_only" (the paper's "mask only" ablation): only ANSWER tokens lose the image.
  stage 2 / "causal": plain causal.
ANSWER is its own kind for that ablation only; the main rule treats it as TEXT.
The diagonal always survives (no token is IMAGE-and-blind), so no row is empty and SDPA never
sees a fully masked row.

Run `python masks.py` to see a small example drawn as a character grid.
"""
import torch

# Token kinds, one per position (data.py assigns them).
TEXT, IMAGE, LATENT, ANSWER = 0, 1, 2, 3
KIND_CHARS = {TEXT: "t", IMAGE: "I", LATENT: "L", ANSWER: "a"}

# stage number or mode name -> mode
MODES = {1: "bottleneck", 2: "causal", "bottleneck": "bottleneck", "causal": "causal",
         "answer_only": "answer_only"}


def build_mask(kinds, stage, segments=None):
    """kinds: LongTensor [L] or [B, L]; stage: 1, 2 or a name in MODES; segments: same shape as
    kinds, numbering packed samples (padding can be its own segment). Returns BoolTensor [..., L, L]."""
    if stage not in MODES:
        raise ValueError(f"unknown mask stage {stage!r}; expected one of {sorted(map(str, MODES))}")
    mode = MODES[stage]
    L = kinds.shape[-1]
    pos = torch.arange(L, device=kinds.device)
    mask = (pos[:, None] >= pos[None, :]).expand(*kinds.shape[:-1], L, L)  # causal
    if segments is not None:
        mask = mask & (segments[..., :, None] == segments[..., None, :])
    if mode == "causal":
        return mask
    if mode == "bottleneck":
        blind = (kinds != IMAGE) & (kinds != LATENT)   # queries that may not see the image
    else:  # answer_only
        blind = kinds == ANSWER
    image_key = (kinds == IMAGE)[..., None, :]
    return mask & ~(blind[..., :, None] & image_key)


def draw(kinds, mask):
    """A [L] kinds vector and its [L, L] mask as text: rows are queries, columns keys."""
    k = "".join(KIND_CHARS[int(x)] for x in kinds)
    rows = ["   " + k]
    for i, row in enumerate(mask):
        rows.append(f"{k[i]}  " + "".join("#" if x else "." for x in row))
    return "\n".join(rows)


if __name__ == "__main__":
    # a toy sequence: prompt text, an image, question text, K=3 latents, the answer
    t, I, L, a = TEXT, IMAGE, LATENT, ANSWER
    kinds = torch.tensor([t, t, I, I, I, I, t, t, L, L, L, t, a, a])
    print("kinds: t=text  I=image  L=latent  a=answer   (# = may attend)\n")
    for stage in (1, 2, "answer_only"):
        print(f"stage {stage} ({MODES[stage]}):")
        print(draw(kinds, build_mask(kinds, stage)), "\n")
    segments = torch.tensor([0] * 7 + [1] * 7)
    print("stage 1, two packed samples (segments 0 and 1):")
    print(draw(kinds, build_mask(kinds, 1, segments)))
