"""masks.py: the LIVR rules as properties over random kind/segment sequences, checked edge by
edge against a plain double loop over (query, key) pairs."""
import pytest
import torch

import masks
from masks import ANSWER, IMAGE, LATENT, SYSTEM, TEXT


def answer_side(kinds, segments):
    """The positions whose output is an answer token, one at a time: the next token of the same
    sample is ANSWER, or the position ends a sample that holds no ANSWER token (a prompt)."""
    L = len(kinds)
    side = []
    for i in range(L):
        same_next = i + 1 < L and segments[i + 1] == segments[i]
        has_answer = any(kinds[j] == ANSWER for j in range(L) if segments[j] == segments[i])
        side.append((same_next and kinds[i + 1] == ANSWER) or (not same_next and not has_answer))
    return side


def reference(kinds, stage, segments):
    """The rules as masks.py's docstring states them, one edge at a time."""
    L = len(kinds)
    side = answer_side(kinds, segments)
    out = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            ok = j <= i and segments[i] == segments[j]
            image_key, diagonal = kinds[j] == IMAGE, i == j
            if stage in (1, "bottleneck", "latents_image_only") and image_key and not diagonal and (
                    kinds[i] not in (IMAGE, LATENT) or side[i]):
                ok = False
            if stage == "answer_only" and image_key and side[i] and not diagonal:
                ok = False
            if stage == "latents_image_only" and kinds[i] == LATENT and kinds[j] in (TEXT, SYSTEM) and not diagonal:
                ok = False
            out[i, j] = ok
    return out


def random_sequence(g, L, n_segments):
    kinds = torch.randint(0, 5, (L,), generator=g)
    cuts = torch.sort(torch.randint(0, L, (n_segments - 1,), generator=g)).values
    segments = torch.zeros(L, dtype=torch.long)
    for c in cuts:
        segments[c:] += 1
    return kinds, segments


@pytest.mark.parametrize("stage", [1, 2, "bottleneck", "causal", "answer_only", "latents_image_only"])
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
    """No query on the answer side, and no prompt query, sees the image; latents and image tokens
    off the answer side see everything before them; the diagonal is always there (no empty rows)."""
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        kinds, segments = random_sequence(g, 20, 1)
        m = masks.build_mask(kinds, 1)
        image = kinds == IMAGE
        side = masks.Context(kinds).answer_side
        blind = (kinds == TEXT) | (kinds == ANSWER) | (kinds == SYSTEM) | side
        assert not (m[blind][:, image] & ~torch.eye(20, dtype=torch.bool)[blind][:, image]).any()
        causal = torch.ones(20, 20, dtype=torch.bool).tril()
        keep = ((kinds == LATENT) | image) & ~side
        assert torch.equal(m[keep], causal[keep])
        assert m.diagonal().all()
        assert torch.equal(masks.build_mask(kinds, 2), causal)


def test_the_answer_side_is_where_the_answer_is_predicted():
    """A training sequence: the last prompt position through the answer's last-but-one; a
    prompt awaiting its answer: its last position; packed samples each their own."""
    s, t, I, L, a = SYSTEM, TEXT, IMAGE, LATENT, ANSWER
    seq = torch.tensor([s, I, I, t, L, L, t, t, a, a])
    assert masks.Context(seq).answer_side.nonzero().flatten().tolist() == [7, 8]
    prompt = seq[:8]
    assert masks.Context(prompt).answer_side.nonzero().flatten().tolist() == [7]
    packed = torch.cat([seq, prompt, seq])
    segments = torch.tensor([1] * 10 + [2] * 8 + [3] * 10)
    assert masks.Context(packed, segments).answer_side.nonzero().flatten().tolist() == [7, 8, 17, 25, 26]


def test_unknown_stage():
    with pytest.raises(ValueError, match="unknown mask mode 3"):
        masks.build_mask(torch.zeros(3, dtype=torch.long), 3)


@pytest.mark.parametrize("returns", [
    lambda kinds, ctx: kinds != IMAGE,                                     # [L]: would broadcast over rows
    lambda kinds, ctx: (kinds != IMAGE)[..., None, :],                     # [1, L]: the same
    lambda kinds, ctx: torch.ones(*kinds.shape, kinds.shape[-1]),          # float
])
def test_a_fork_rule_of_the_wrong_shape_or_type_is_named(monkeypatch, returns):
    monkeypatch.setitem(masks.RULES, "forked", returns)
    kinds = torch.tensor([SYSTEM, IMAGE, IMAGE, TEXT, LATENT, ANSWER])
    with pytest.raises(ValueError, match="mask rule 'forked' returned .*bool tensor of shape \\(6, 6\\)"):
        masks.build_mask(kinds, "forked")


def test_draw_shows_the_grid():
    kinds = torch.tensor([TEXT, IMAGE, LATENT, TEXT, ANSWER])
    art = masks.draw(kinds, masks.build_mask(kinds, 1))
    assert art.splitlines() == ["   tILta", "t  #....", "I  ##...", "L  ###..", "t  #.##.", "a  #.###"]


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
