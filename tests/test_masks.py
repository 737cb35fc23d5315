"""masks.py: the LIVR rules as properties over random kind/segment sequences, checked edge by
edge against a plain double loop over (query, key) pairs."""
import pytest
import torch

import masks
from masks import ANSWER, IMAGE, LATENT, TEXT


def reference(kinds, stage, segments):
    """The paper's rule (masks.py's docstring), one edge at a time."""
    L = len(kinds)
    out = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            ok = j <= i and segments[i] == segments[j]
            if stage in (1, "bottleneck") and kinds[j] == IMAGE and kinds[i] not in (IMAGE, LATENT):
                ok = False
            if stage == "answer_only" and kinds[j] == IMAGE and kinds[i] == ANSWER:
                ok = False
            out[i, j] = ok
    return out


def random_sequence(g, L, n_segments):
    kinds = torch.randint(0, 4, (L,), generator=g)
    cuts = torch.sort(torch.randint(0, L, (n_segments - 1,), generator=g)).values
    segments = torch.zeros(L, dtype=torch.long)
    for c in cuts:
        segments[c:] += 1
    return kinds, segments


@pytest.mark.parametrize("stage", [1, 2, "bottleneck", "causal", "answer_only"])
def test_rules_on_random_sequences(stage):
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        L = int(torch.randint(1, 24, (1,), generator=g))
        kinds, segments = random_sequence(g, L, n_segments=1 + trial % 3)
        got = masks.build_mask(kinds, stage, segments)
        assert torch.equal(got, reference(kinds.tolist(), stage, segments.tolist()))


def test_batched_equals_rowwise():
    g = torch.Generator().manual_seed(1)
    rows = [random_sequence(g, 16, 2) for _ in range(4)]
    kinds = torch.stack([k for k, _ in rows])
    segments = torch.stack([s for _, s in rows])
    batched = masks.build_mask(kinds, 1, segments)
    assert batched.shape == (4, 16, 16)
    for b in range(4):
        assert torch.equal(batched[b], masks.build_mask(kinds[b], 1, segments[b]))


def test_bottleneck_properties():
    """Answer and prompt never see the image; latents see everything before them; image
    tokens are plain causal; the diagonal is always there (no empty rows)."""
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        kinds, segments = random_sequence(g, 20, 1)
        m = masks.build_mask(kinds, 1)
        image = kinds == IMAGE
        blind = (kinds == TEXT) | (kinds == ANSWER)
        assert not m[blind][:, image].any()
        causal = torch.ones(20, 20, dtype=torch.bool).tril()
        assert torch.equal(m[kinds == LATENT], causal[kinds == LATENT])
        assert torch.equal(m[image], causal[image])
        assert m.diagonal().all()
        assert torch.equal(masks.build_mask(kinds, 2), causal)


def test_unknown_stage():
    with pytest.raises(ValueError, match="unknown mask mode 3"):
        masks.build_mask(torch.zeros(3, dtype=torch.long), 3)


def test_draw_shows_the_grid():
    kinds = torch.tensor([TEXT, IMAGE, LATENT, ANSWER])
    art = masks.draw(kinds, masks.build_mask(kinds, 1))
    assert art.splitlines() == ["   tILa", "t  #...", "I  ##..", "L  ###.", "a  #.##"]


def test_rules_are_registered_once_and_generated_tokens_follow_the_rule():
    """Every mode is a function of RULES; SYSTEM is TEXT to every rule; a generated token is
    an ANSWER token to the rule (under the bottleneck and answer_only: blind to the image)."""
    g = torch.Generator().manual_seed(3)
    assert all(callable(rule) for rule in masks.RULES.values())
    assert {masks.mode_name(m) for m in (1, 2, *masks.RULES)} == set(masks.RULES)
    for _ in range(10):
        kinds, segments = random_sequence(g, 24, 2)
        as_system = torch.where(kinds == TEXT, masks.SYSTEM, kinds)
        for mode in masks.RULES:
            assert torch.equal(masks.build_mask(as_system, mode, segments),
                               masks.build_mask(kinds, mode, segments))
        batch = kinds[None]
        assert masks.generated_keys(batch, "causal").all()
        for mode in ("bottleneck", "answer_only"):
            assert torch.equal(masks.generated_keys(batch, mode), batch != IMAGE)


def test_image_index_numbers_each_image_run():
    t, I, L = TEXT, IMAGE, LATENT
    kinds = torch.tensor([t, I, I, t, L, t, I, L, L, I, t])
    assert masks.image_index(kinds).tolist() == [-1, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
