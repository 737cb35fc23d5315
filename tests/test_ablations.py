"""The paper's ablations, checked on what the model computes.

Rules about predictions: position i's output predicts token i+1, so every mask rule is stated for
the *answer side* (masks.Context.answer_side) and checked here on logits and hidden states: which
positions move when only the pixels change (exactly those the mask lets reach an image token),
under every rule of masks.RULES, with K = 0 and K > 0, on both backbones; the same in training
(packed and unpacked), in validation (which never picks a latent id, as generate does not) and in
generation (the first token and the later ones). Then every row of the README's ablation table,
read from the README itself, resolves (`train.py --dry-run`) to what the row means."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import batching
import checkpoint
import data
import evaluate
import masks
import tiny
import train
from demo import make_demo_base, make_synthetic
from masks import ANSWER, IMAGE, LATENT, SYSTEM, TEXT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A tiny random base of each backbone (weights at std 0.1, so pixel changes show), with the
    synthetic tasks."""
    root = tmp_path_factory.mktemp("ablations")
    splits = make_synthetic(str(root / "data"), n_train=4, n_val=2, n_test=2, seed=3,
                            tasks=("visual_similarity",))
    return {"qwen2.5": make_demo_base(str(root / "base25"), std=0.1),
            "qwen3": tiny.write_qwen3_base(str(root / "base3"), std=0.1),
            "train": str(splits["train"]), "val": str(splits["val"])}


def image(seed, w=56, h=56):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def sample(answer="A", seed=0):
    return data.Sample(images=[image(seed), image(seed + 1, 84, 56)], question="Which image is brighter?",
                       choices=["the first", "the second"], answer=answer)


def load(bases, backbone, k):
    proc = data.Processor.from_pretrained(bases[backbone], num_latents=k)
    m = checkpoint.load_pretrained(bases[backbone], num_latents=k, latent_token_id=proc.latent_token_id)
    return m, proc


def other_pixels(enc, seed=7):
    return torch.randn(enc["pixel_values"].shape, generator=torch.Generator().manual_seed(seed)) * 2


def reach(mask, kinds):
    """The positions an image can reach through `mask` [L, L]: image tokens, and every query
    that may attend to a key the image reaches -- the dependence the model must compute."""
    dep = torch.zeros(len(kinds), dtype=torch.bool)
    for i in range(len(kinds)):
        dep[i] = bool(kinds[i] == IMAGE) or bool((mask[i, :i] & dep[:i]).any())
    return dep


def forward(m, enc, mode, pixel_values):
    mask = masks.build_mask(enc["kinds"], mode, num_latents=m.num_latents)
    with torch.no_grad():
        out = m(enc["input_ids"][None], pixel_values, enc["image_grid_thw"], mask=mask[None],
                return_hidden=True)
    return out.logits[0], out.hidden[0], mask


# --- the rules, on what the model computes ------------------------------------------------------

@pytest.mark.parametrize("backbone", ["qwen2.5", "qwen3"])
@pytest.mark.parametrize("k", [0, K])
@pytest.mark.parametrize("mode", list(masks.RULES))
def test_which_positions_see_the_pixels(bases, backbone, k, mode):
    """Under each rule, exactly the positions the mask connects to an image token change when
    only the pixels change; the answer side follows the rule's promise."""
    m, proc = load(bases, backbone, k)
    enc = proc.encode(sample())
    kinds, side = enc["kinds"], masks.Context(enc["kinds"]).answer_side
    logits, hidden, mask = forward(m, enc, mode, enc["pixel_values"])
    logits2, hidden2, _ = forward(m, enc, mode, other_pixels(enc))
    moved = (hidden - hidden2).abs().amax(-1) > 0
    assert torch.equal(moved, reach(mask, kinds)), (mode, k)
    answer_moved = (logits - logits2).abs().amax(-1)[side]                # (n answer-side,)
    image = kinds == IMAGE
    if mode == "causal" or (mode in ("bottleneck", "latents_image_only") and k):
        assert (answer_moved > 1e-6).all()                  # the image reaches the answer...
    if mode in ("bottleneck", "latents_image_only") and not k:
        assert (answer_moved == 0).all()                    # ...or, with no latents, cannot
    if mode in ("bottleneck", "answer_only", "latents_image_only"):
        assert not mask[side][:, image].any()               # no answer-side row has an image key
    if mode == "answer_only":
        causal_logits, _, _ = forward(m, enc, "causal", enc["pixel_values"])
        assert ((logits - causal_logits).abs().amax(-1)[side] > 1e-6).all()
        assert (answer_moved > 1e-6).all()                  # the leak through the prompt
        assert mask[(kinds == TEXT) & ~side][:, image].any()
    if mode == "latents_image_only" and k:
        lat = kinds == LATENT
        assert not (mask[lat][:, (kinds == TEXT) | (kinds == SYSTEM)]).any()
        assert mask[lat][:, image].all()


@pytest.mark.parametrize("backbone", ["qwen2.5", "qwen3"])
@pytest.mark.parametrize("mode", list(masks.RULES))
def test_training_paths_follow_the_rule(bases, backbone, mode):
    """train.forward_batch -- packed (prepared, per-sample blocks) and unpacked (dense mask) --
    gives at every answer-predicting position the logits the rule's dense single-sample forward
    gives; with no latents under the bottleneck, none of them moves with the pixels."""
    m, proc = load(bases, backbone, K if mode != "bottleneck" else 0)
    encs = [proc.encode(sample("A", 0)), proc.encode(sample("B", 10))]
    want = []
    for enc in encs:
        logits, _, _ = forward(m, enc, mode, enc["pixel_values"])
        want.append(logits[masks.Context(enc["kinds"]).answer_side])
    want = torch.cat(want)
    packed = batching.prepare_batch(batching.pack(encs, 512, proc.pad_id)[0], m.cfg)
    padded = batching.collate(encs, proc.pad_id)
    for batch in (packed, padded):
        with torch.no_grad():
            got, targets, n = train.forward_batch(m, batch, mode)
        assert n == len(want) and torch.allclose(got, want, atol=1e-5, rtol=1e-4)
        if mode == "bottleneck":
            moved = {**batch, "pixel_values": other_pixels(batch)}
            with torch.no_grad():
                assert torch.equal(train.forward_batch(m, moved, mode)[0], got)


@pytest.mark.parametrize("backbone", ["qwen2.5", "qwen3"])
@pytest.mark.parametrize("mode", list(masks.RULES))
def test_generation_follows_the_rule(bases, backbone, mode):
    """generate's first token (the prompt's last position) and later tokens (each generated one)
    are the argmax of a full forward of prompt + tokens under the rule, with the generated tokens
    as answer tokens: left-padded prompts of two lengths, one batch."""
    m, proc = load(bases, backbone, K)
    prompts = [proc.encode(sample(seed=0), with_answer=False),
               proc.encode(data.Sample(images=[image(5)], question="Which?", choices=["a", "b"], answer="A"),
                           with_answer=False)]
    batch = batching.collate(prompts, proc.pad_id, padding_side="left")
    n = 3
    new = m.generate(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                     batch["attention_mask"], max_new_tokens=n, eos_token_id=-1,
                     kinds=batch["kinds"], mask_mode=mode)
    for enc, tokens in zip(prompts, new):
        ids = torch.cat([enc["input_ids"], tokens])
        kinds = torch.cat([enc["kinds"], torch.full((n,), ANSWER)])
        L = len(enc["input_ids"])
        with torch.no_grad():
            logits = m(ids[None], enc["pixel_values"], enc["image_grid_thw"],
                       mask=masks.build_mask(kinds, mode, num_latents=K)[None])[0]
        assert masks.Context(kinds).answer_side[L - 1:L + n - 1].all()
        assert torch.equal(m.mask_latent_logits(logits[L - 1:L + n - 1]).argmax(-1), tokens), mode


def test_validation_never_picks_a_latent_id(bases):
    """A model whose argmax at the answer positions would be a latent id: val_accuracy reaches
    generate's verdict (latent ids excluded), not the raw argmax's."""
    m, proc = load(bases, "qwen2.5", K)
    prompt = proc.encode(sample(), with_answer=False)
    with torch.no_grad():
        h = m(prompt["input_ids"][None], prompt["pixel_values"], prompt["image_grid_thw"],
              return_hidden=True).hidden[0, -1]
        m.lm_head.weight[m.latent_token_id] = 50 * h / h.norm()   # the tied head's latent row
    tokens = m.generate(prompt["input_ids"][None], prompt["pixel_values"], prompt["image_grid_thw"],
                        max_new_tokens=2, eos_token_id=-1)[0]
    # the sequence generate produced, taught back: its own tokens are the gold answer
    ids = torch.cat([prompt["input_ids"], tokens])
    enc = {**prompt, "input_ids": ids, "kinds": torch.cat([prompt["kinds"], torch.full((2,), ANSWER)]),
           "labels": torch.cat([torch.full_like(prompt["input_ids"], -100), tokens])}
    batch = batching.collate([enc], proc.pad_id)
    with torch.no_grad():
        raw, _, _ = train.forward_batch(m, batch, "causal")
    assert int(raw[0].argmax()) == m.latent_token_id                # the trap is set
    assert train.val_accuracy(m, [(batch, torch.ones(1))], "causal") == 1.0


def test_answer_latent_attention_reads_the_predicting_positions(bases):
    m, proc = load(bases, "qwen2.5", K)
    rec = sample()
    enc = proc.encode(rec)
    side, latent = masks.Context(enc["kinds"]).answer_side, enc["kinds"] == LATENT
    with torch.no_grad():
        _, attns = m(enc["input_ids"][None], enc["pixel_values"], enc["image_grid_thw"],
                     mask=masks.build_mask(enc["kinds"], "causal")[None], return_attn=True)
    want = np.mean([float(a[0][:, side][:, :, latent].sum(-1).mean()) for a in attns])
    got = evaluate.answer_latent_attention(m, proc, [rec])
    assert got == pytest.approx(want, rel=1e-5)
    at_answer_tokens = np.mean([float(a[0][:, enc["kinds"] == ANSWER][:, :, latent].sum(-1).mean()) for a in attns])
    assert got != pytest.approx(at_answer_tokens, rel=1e-3)   # not the answer tokens' own rows


# --- the README's ablation table, each row as the commands it lists -----------------------------

def readme_rows():
    """{paper row: [command, ...]} from the README's ablation table."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = text[text.index("## The paper's ablations"):].split("\n## ")[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and "`" in cells[1]:
            rows[cells[0]] = re.findall(r"`([^`]+)`", cells[1])
    return rows


# what each row must resolve to, per stage: mask, K, latent position, shared row, what trains,
# epochs, what final holds (stage 2 always starts from stage1/end)
LIVR = dict(mask="bottleneck", k=16, position="after", shared=False, train="lora", epochs=4, final="best")
STAGE2 = dict(LIVR, mask="causal", epochs=6)


def expect(name):
    two = lambda s1, s2=None: (dict(LIVR, **s1), dict(STAGE2, **(s2 if s2 is not None else {
        k: v for k, v in s1.items() if k != "epochs" and k != "mask"})))
    table = {
        "Direct SFT": (dict(LIVR, mask="causal", k=0, epochs=10), None),
        "LIVR, 4 + 6": two({}),
        "split (0, 10)": two({"epochs": 0}, {"epochs": 10}),
        "split (2, 8)": two({"epochs": 2}, {"epochs": 8}),
        "split (6, 4)": two({"epochs": 6}, {"epochs": 4}),
        "split (8, 2)": two({"epochs": 8}, {"epochs": 2}),
        "K = 4": two({"k": 4}), "K = 8": two({"k": 8}), "K = 32": two({"k": 32}),
        "latents only, no mask": two({"mask": "causal"}),
        "mask only, no latents": two({"k": 0}),
        "blocking only answer→image": two({"mask": "answer_only"}),
        "latents blocked from the prompt": two({"mask": "latents_image_only"}),
        "latents before the prompt": two({"position": "before"}),
        "one shared latent embedding": two({"shared": True}),
        "prompt tuning": two({"train": "latents"}),
        "Mirage setting": two({"k": 4, "train": "full-embed", "epochs": 10}, {"k": 4, "train": "full-embed", "epochs": 10}),
        "multi-task SFT, 5 epochs, final": (dict(LIVR, mask="causal", k=0, epochs=5, final="end"), None),
        "multi-task LIVR, 2 + 3, final": two({"epochs": 2, "final": "end"}, {"epochs": 3, "final": "end"}),
    }
    key = next(k for k in table if name.startswith(k))
    return table[key]


def expected_trainable(base, train_mode, k, shared):
    """The trainable tensors and their parameter count, from the base's own tensor names and
    the row's meaning (not from masks.trainable): the oracle for each command."""
    m = checkpoint.load_pretrained(base)
    d, names = m.cfg.text.hidden_size, {}
    if k:
        names["latent_embeds"] = (1 if shared else k) * d
    for name, p in m.named_parameters():
        lm = name.startswith("model.")
        if train_mode == "full" and lm and "embed_tokens" not in name:
            names[name] = p.numel()
        if train_mode == "full-embed" and (lm or name == "lm_head.weight"):
            names[name] = p.numel()
        if train_mode == "lora" and name.endswith("_proj.weight") and lm:   # LoRA A (r x in) + B (out x r)
            out_f, in_f = p.shape
            stem = name[:-len(".weight")]
            names[stem + ".lora_A"], names[stem + ".lora_B"] = 16 * in_f, out_f * 16
    return names


def check_mask(base, plan):
    """The edges of the command's mask on a real sample, laid out as the command lays it out."""
    proc = data.Processor.from_pretrained(base, num_latents=plan["num_latents"],
                                          latent_position=plan["latent_position"])
    kinds = proc.encode(sample())["kinds"]
    mask = masks.build_mask(kinds, plan["mask"], num_latents=plan["num_latents"])
    side, image, lat = masks.Context(kinds).answer_side, kinds == IMAGE, kinds == LATENT
    causal = torch.ones_like(mask).tril()
    if plan["mask"] == "causal":
        assert torch.equal(mask, causal)
        return
    assert not mask[side][:, image].any()                        # the answer side is blind
    if plan["mask"] == "answer_only":
        assert mask[(kinds == TEXT) & ~side][:, image].any()     # the prompt is not
    if plan["latent_position"] == "before" and lat.any():
        assert lat.nonzero()[0] < image.nonzero()[0] and not mask[lat][:, image].any()
    elif lat.any():
        assert mask[lat][:, image].all()                          # latents see every image
        assert mask[lat][:, (kinds == TEXT) | (kinds == SYSTEM)].any() == (plan["mask"] != "latents_image_only")


def test_every_ablation_row_resolves_to_what_it_means(bases, tmp_path, capsys):
    rows = readme_rows()
    assert len(rows) == 19, sorted(rows)
    base = bases["qwen2.5"]
    for i, (name, commands) in enumerate(rows.items()):
        run_dir = tmp_path / f"row{i}"
        common = ["--model", base, "--data", bases["train"], "--val", bases["val"], "--run-dir",
                  str(run_dir), "--global-batch", "2", "--log-every", "100"]
        for stage, (command, want) in enumerate(zip(commands, expect(name)), start=1):
            argv = command.split() + common
            assert argv[:2] == ["--stage", str(stage)], (name, command)
            plan = train.main(argv + ["--dry-run"])
            capsys.readouterr()
            assert plan["mask"] == want["mask"] and plan["num_latents"] == want["k"], name
            assert plan["latent_position"] == want["position"] and plan["shared_latent"] == want["shared"], name
            assert plan["train"] == want["train"] and plan["epochs"] == want["epochs"], name
            assert plan["final"] == want["final"], name
            names = expected_trainable(base, want["train"], want["k"], want["shared"])
            assert plan["trainable_tensors"] == sorted(names), name
            assert plan["trainable_parameters"] == sum(names.values()), name
            check_mask(base, plan)
            if stage == 1 and len(commands) == 2:
                # a real stage 1 that takes no step: stage 2 must start from where it ended
                train.main(argv + ["--epochs", "0"])          # the last --epochs wins
                capsys.readouterr()
                assert checkpoint.is_complete(str(run_dir / "stage1" / "end"))
            if stage == 2:
                assert plan["init"] == os.path.join(str(run_dir), "stage1", "end"), name
        assert len(commands) == (1 if expect(name)[1] is None else 2), name


def test_stage_two_starts_where_stage_one_ended(bases, tmp_path, capsys):
    """stage1/end holds the weights after the last step (last's weights, no trainer state);
    final is best by default and end with --final end; --from-best starts stage 2 at best."""
    common = ["--model", bases["qwen2.5"], "--data", bases["train"], "--val", bases["val"],
              "--run-dir", str(tmp_path), "--global-batch", "2", "--log-every", "100", "--epochs", "2",
              "--latents", "2", "--lr", "1e-2"]
    train.main(["--stage", "1", *common, "--eval-every", "1"])
    s1 = tmp_path / "stage1"
    read = lambda p: checkpoint.read_safetensors(str(s1 / p / "weights.safetensors"))
    assert all(torch.equal(read("end")[k], read("last")[k]) for k in read("last"))
    assert not os.path.exists(s1 / "end" / "trainer.json")
    assert all(torch.equal(read("final")[k], read("best")[k]) for k in read("best"))
    accs = [r["val_acc"] for r in map(json.loads, open(s1 / "metrics.jsonl")) if "val_acc" in r]
    assert len(accs) == 4
    assert train.main(["--stage", "2", *common, "--dry-run"])["init"] == str(s1 / "end")
    assert train.main(["--stage", "2", *common, "--dry-run", "--from-best"])["init"] == str(s1 / "best")
    train.main(["--stage", "1", *common, "--run-dir", str(tmp_path / "b"), "--final", "end"])
    b = tmp_path / "b" / "stage1"
    ends = checkpoint.read_safetensors(str(b / "end" / "weights.safetensors"))
    finals = checkpoint.read_safetensors(str(b / "final" / "weights.safetensors"))
    assert all(torch.equal(ends[k], finals[k]) for k in ends)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(["--stage", "2", *common, "--epochs", "0"])
    assert "--epochs 0 trains nothing" in capsys.readouterr().err
