"""The README's three worked forks, each applied through the extension points a fork uses --
a rule in masks.RULES, masks.place_latents, model.EXTEND, train.compute_loss and the open
forward -- by monkeypatching, never by editing a file, and each checked for its intended effect:
  (a) latents see the image and the question, but not the system prompt: the mask;
  (b) K latents after each image, each group seeing only its own image: the mask, and a step;
  (c) a stage-1 auxiliary loss on the latents' hidden states through a small extra head: it has
      gradients, and a stage-1 checkpoint with the head loads in stage 2 and in evaluate.py."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import batching
import checkpoint
import data
import evaluate
import flags
import masks
import model
import rundir
import train
from demo import make_demo_base, make_synthetic
from masks import ANSWER, IMAGE, LATENT, SYSTEM, TEXT

K = 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny random base checkpoint with its tokenizer, and a small synthetic data set."""
    root = tmp_path_factory.mktemp("forks")
    base = make_demo_base(str(root / "base"))
    splits = make_synthetic(str(root / "data"), n_train=4, n_val=2, n_test=2, seed=5,
                                 tasks=("counting",))
    return dict(root=root, base=base, train=str(splits["train"]), val=str(splits["val"]),
                test=str(splits["test"]))


def image(seed, w=56, h=84):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def two_image_sample():
    return data.Sample(images=[image(0), image(1, 84, 56)], question="Which image is brighter?",
                       choices=["the first", "the second"], answer="A")


def loss_of(m, enc, mask_mode):
    """train.compute_loss on one encoded sample, through the prepared (per-sample block) path."""
    batch = batching.prepare_batch(batching.collate([enc], 0), m.cfg)
    ce, n = train.compute_loss(m, batch, mask_mode)
    return ce / n


# --- the open forward -----------------------------------------------------------------------

def test_forward_returns_hidden_states_image_features_and_kinds(demo):
    proc = data.Processor.from_pretrained(demo["base"], num_latents=K)
    m = checkpoint.load_pretrained(demo["base"], num_latents=K, latent_token_id=proc.latent_token_id)
    enc = proc.encode(two_image_sample())
    ids, pv, thw = enc["input_ids"][None], enc["pixel_values"], enc["image_grid_thw"]
    mask = masks.build_mask(enc["kinds"], "bottleneck")[None]
    with torch.no_grad():
        logits = m(ids, pv, thw, mask=mask)
        out = m(ids, pv, thw, mask=mask, return_hidden=True)
        feats = m.visual(pv, thw)
    assert torch.equal(out.logits, logits)                       # the default return is unchanged
    assert torch.allclose(m.lm_head(out.hidden), logits, atol=1e-5)
    assert out.hidden.shape == (1, ids.shape[1], m.cfg.text.hidden_size)
    assert torch.allclose(out.image_features, feats, atol=1e-6)
    data_kinds = torch.where((enc["kinds"] == SYSTEM) | (enc["kinds"] == ANSWER), TEXT, enc["kinds"])
    assert torch.equal(out.kinds[0], data_kinds)
    # generate's mask_mode, by name or by stage number
    prompt = proc.encode(two_image_sample(), with_answer=False)
    gen = lambda **kw: m.generate(prompt["input_ids"][None], prompt["pixel_values"], prompt["image_grid_thw"],
                                  max_new_tokens=3, kinds=prompt["kinds"][None], **kw)
    assert torch.equal(gen(mask_mode="bottleneck"), gen(mask_mode=1))


# --- fork (a): the latents do not see the system prompt --------------------------------------

def latents_skip_system(kinds, ctx=None):
    """Fork (a), as the README writes it in masks.py: the bottleneck, and the latents lose the
    system turn."""
    return masks.bottleneck(kinds, ctx) & masks._cut(kinds == LATENT, kinds == SYSTEM)


def test_fork_a_latents_do_not_see_the_system_prompt(demo, monkeypatch):
    monkeypatch.setitem(masks.RULES, "latents_skip_system", latents_skip_system)
    proc = data.Processor.from_pretrained(demo["base"], num_latents=K)
    kinds = proc.encode(two_image_sample())["kinds"]
    assert (kinds == SYSTEM).sum() > 0 and (kinds == IMAGE).sum() > 0
    mask = masks.build_mask(kinds, "latents_skip_system")
    plain = masks.build_mask(kinds, "bottleneck")
    lat, system, image_, question = (kinds == LATENT), (kinds == SYSTEM), (kinds == IMAGE), None
    first_latent = int(lat.nonzero()[0])
    question = (kinds == TEXT) & (torch.arange(len(kinds)) < first_latent)
    assert not mask[lat][:, system].any()                     # the system prompt: cut
    assert mask[lat][:, image_].all() and mask[lat][:, question].all()   # image and question: kept
    assert torch.equal(mask[~lat], plain[~lat])               # every other row as the bottleneck
    assert plain[lat][:, system].all()                        # (which lets the latents see it)
    # every CLI picks the new mode up, and a training step runs under it
    assert train.parse_args(["--stage", "1", "--mask", "latents_skip_system"]).mask == "latents_skip_system"
    assert evaluate.parse_args(["--mask", "latents_skip_system"]).mask == "latents_skip_system"
    m = checkpoint.load_pretrained(demo["base"], num_latents=K, latent_token_id=proc.latent_token_id)
    assert torch.isfinite(loss_of(m, proc.encode(two_image_sample()), "latents_skip_system"))


# --- fork (b): K latents after each image, each group seeing only its image ----------------------

def latents_after_each_image(user_parts, latents, is_image=lambda part: isinstance(part, int), position="after"):
    """Fork (b)'s layout: the K latent tokens right after every image."""
    out = []
    for part in user_parts:
        out += [part, latents] if is_image(part) else [part]
    return out


def own_image_only(kinds, ctx=None):
    """Fork (b)'s rule: the bottleneck, and each latent group loses every image but its own."""
    which = masks.image_index(kinds)                          # the latents after image g are g
    other = which[..., :, None] != which[..., None, :]
    return masks.bottleneck(kinds) & ~((kinds == LATENT)[..., :, None] & (kinds == IMAGE)[..., None, :] & other)


def test_fork_b_each_latent_group_sees_only_its_image(demo, monkeypatch):
    monkeypatch.setattr(masks, "place_latents", latents_after_each_image)
    monkeypatch.setitem(masks.RULES, "own_image_only", own_image_only)
    proc = data.Processor.from_pretrained(demo["base"], num_latents=K)
    enc = proc.encode(two_image_sample())
    kinds = enc["kinds"]
    assert proc.num_tokens(two_image_sample()) == len(kinds)
    image_runs = [r for r in np.split(np.arange(len(kinds)), np.flatnonzero(np.diff(kinds.numpy())) + 1)]
    images = [torch.tensor(r) for r in image_runs if kinds[r[0]] == IMAGE]
    groups = [torch.tensor(r) for r in image_runs if kinds[r[0]] == LATENT]
    assert len(images) == len(groups) == 2 and all(len(g) == K for g in groups)
    for img, grp in zip(images, groups):                      # <|vision_end|> between them
        assert int(grp[0]) == int(img[-1]) + 2
    mask = masks.build_mask(kinds, "own_image_only")
    for g, grp in enumerate(groups):
        for i, img in enumerate(images):
            sees = mask[grp][:, img]
            assert sees.all() if i == g else not sees.any(), (g, i)
    answer = kinds == ANSWER
    assert not mask[answer][:, kinds == IMAGE].any()          # the answer still only via latents
    # the model takes the repeated latent ids, packed or not, and the loss has gradients
    m = checkpoint.load_pretrained(demo["base"], num_latents=K, latent_token_id=proc.latent_token_id)
    m.latent_embeds.requires_grad_(True)
    loss = loss_of(m, enc, "own_image_only")
    loss.backward()
    assert torch.isfinite(loss) and m.latent_embeds.grad.abs().sum() > 0


# --- fork (c): a stage-1 auxiliary loss on the latents' hidden states --------------------------

AUX_WEIGHT = 0.1


def add_aux_head(m):
    """Fork (c)'s module: a small head from the latents' hidden states to the image features."""
    d = m.cfg.text.hidden_size
    m.aux_head = nn.Linear(d, d, device=m.model.embed_tokens.weight.device, dtype=m.dtype)


def aux_loss(m, out):
    """The latents' hidden states, through the head, regress the mean image feature."""
    latent = out.hidden[out.kinds == LATENT]                                 # (n_latents, d)
    return F.mse_loss(m.aux_head(latent).mean(0).float(), out.image_features.mean(0).float())


def compute_loss_with_aux(m, batch, mask_mode, run=None):
    """Fork (c)'s train.compute_loss: the answer's cross-entropy, plus the auxiliary loss in
    stage 1 (scaled by the answer-token count: the loop divides the sum by it)."""
    out, targets, n = train.forward_batch(m, batch, mask_mode, return_hidden=True)
    ce = F.cross_entropy(out.logits.float(), targets, reduction="sum")
    if mask_mode != "bottleneck" or out.image_features is None:
        return ce, n
    return ce + AUX_WEIGHT * n * aux_loss(m, out), n


def test_fork_c_aux_loss_has_gradients(demo, monkeypatch):
    monkeypatch.setattr(model, "EXTEND", [add_aux_head])
    proc = data.Processor.from_pretrained(demo["base"], num_latents=K)
    m = checkpoint.load_pretrained(demo["base"], num_latents=K, latent_token_id=proc.latent_token_id)
    # build_model's rule trains the new head (it is not in the base checkpoint)
    base = checkpoint.base_parameter_names(m)
    assert "aux_head.weight" not in base
    assert masks.trainable("aux_head.weight", "lora", from_base=False)
    for name, p in m.named_parameters():
        p.requires_grad = masks.trainable(name, "lora", from_base=name in base)
    batch = batching.prepare_batch(batching.collate([proc.encode(two_image_sample())], 0), m.cfg)
    loss, n = compute_loss_with_aux(m, batch, "bottleneck")
    ce, _ = train.compute_loss(m, batch, "bottleneck")
    assert float(loss.detach()) > float(ce.detach())
    loss.backward()
    assert m.aux_head.weight.grad.abs().sum() > 0 and m.latent_embeds.grad.abs().sum() > 0
    assert all(p.grad is None for k, p in m.named_parameters() if k in base)


def test_fork_c_checkpoint_loads_in_stage_two_and_evaluate(demo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(model, "EXTEND", [add_aux_head])
    monkeypatch.setattr(train, "compute_loss", compute_loss_with_aux)
    common = ["--model", demo["base"], "--data", demo["train"], "--run-dir", str(tmp_path),
              "--latents", str(K), "--global-batch", "2", "--epochs", "1", "--max-steps", "1",
              "--log-every", "100"]
    train.main(["--stage", "1", *common])
    stage1 = tmp_path / "stage1" / "last"
    m1, meta = checkpoint.load_livr(str(stage1))
    assert "aux_head.weight" in meta["tensors"]
    head = checkpoint.load_pretrained(demo["base"], num_latents=K, latent_token_id=m1.latent_token_id).aux_head
    assert not torch.equal(m1.aux_head.weight, head.weight)  # trained (and saved) in stage 1
    train.main(["--stage", "2", "--init", str(stage1), *common])
    m2, meta2 = checkpoint.load_livr(str(tmp_path / "stage2" / "last"))
    assert meta2["stage"] == 2 and torch.equal(m2.aux_head.weight, m1.aux_head.weight)  # no aux grad in stage 2
    capsys.readouterr()
    evaluate.main(["--checkpoint", str(stage1), "--data", demo["test"], "--out", str(tmp_path / "eval"),
                   "--attention-samples", "0"])
    assert "accuracy" in capsys.readouterr().out
    # without the fork's module the checkpoint is refused, naming the tensor and the hook
    monkeypatch.setattr(model, "EXTEND", [])
    with pytest.raises(checkpoint.CheckpointError, match="aux_head.weight.*model.EXTEND"):
        checkpoint.load_livr(str(stage1))


# --- the seams: a fork that needs run context, with no module global and no second table ----------

def active_latents(kinds, ctx):
    """A curriculum rule: the bottleneck, and only the first ceil(K * progress) latents of each
    group see the image (all of them outside training, where progress is None)."""
    rule = masks.bottleneck(kinds, ctx)
    if ctx.progress is None:
        return rule
    active = ctx.latent_index < max(1, int(np.ceil(ctx.num_latents * ctx.progress)))
    return rule & ~(((kinds == LATENT) & ~active)[..., :, None] & (kinds == IMAGE)[..., None, :])


def aux_weighted_loss(m, batch, mask_mode, run=None):
    """The answer's loss plus, in stage 1, --aux-weight x the latents' mean squared norm: reads
    the flag, the stage and the step from the Run, not from a module global."""
    out, targets, n = train.forward_batch(m, batch, mask_mode, run, return_hidden=True)
    ce = F.cross_entropy(out.logits.float(), targets, reduction="sum")
    if run is None or run.stage != 1 or not run.args.aux_weight:
        return ce, n
    latent = out.hidden[out.kinds == LATENT]
    return ce + run.args.aux_weight * n * latent.float().pow(2).mean(), n


def test_a_fork_uses_every_seam_without_globals(demo, tmp_path, monkeypatch, capsys):
    # a new rule: one entry of masks.RULES (the test adds it as the source edit would); the new
    # flag comes with the fork's hooks, declared like flags.FLAGS's (no table edited at all)
    monkeypatch.setitem(masks.RULES, "active_latents", active_latents)
    aux_weight = flags.flag("--aux-weight", low=0, resume="fixed", type=float, default=0.0)
    # the rule reads K, each latent's index in its group, and the progress
    proc = data.Processor.from_pretrained(demo["base"], num_latents=K)
    kinds = proc.encode(two_image_sample())["kinds"]
    lat, image_ = kinds == LATENT, kinds == IMAGE
    seen = lambda progress: masks.build_mask(kinds, "active_latents", num_latents=K,
                                             progress=progress)[lat][:, image_].any(-1).tolist()
    assert seen(0.1) == [True, False, False, False] and seen(0.6) == [True, True, True, False]
    assert seen(None) == [True] * K
    # the flag is declared once: parsed, range-checked, and part of what --resume compares
    common = ["--model", demo["base"], "--data", demo["train"], "--run-dir", str(tmp_path),
              "--latents", str(K), "--global-batch", "2", "--epochs", "2", "--log-every", "100",
              "--mask", "active_latents", "--lr", "1e-12"]
    with pytest.raises(SystemExit):
        train.main(["--stage", "1", *common, "--aux-weight", "-1"], hooks=train.Hooks(flags=[aux_weight]))
    assert "--aux-weight -1.0: must be at least 0" in capsys.readouterr().err
    # the hooks: the loss gets the Run, the latent rows start from the first batch, a callback
    # sees every step -- all passed in, none set on a module
    calls, steps = [], []

    def loss(m, batch, mask_mode, run=None):
        calls.append((run.stage, run.step, run.args.aux_weight))
        return aux_weighted_loss(m, batch, mask_mode, run)

    def init_latents(m, batch, run):
        with torch.no_grad():     # every latent row: the mean embedding of the batch's text tokens
            text = m.model.embed_tokens(batch["input_ids"][batch["kinds"] == TEXT]).mean(0)
            m.latent_embeds.copy_(text.expand_as(m.latent_embeds))
        steps.append(("init", run.step, len(batch["input_ids"][0])))

    hooks = train.Hooks(loss=loss, init_latents=init_latents, flags=[aux_weight],
                        on_step=[lambda run, rec: steps.append((rec["step"], round(run.progress, 2)))])
    train.main(["--stage", "1", *common, "--aux-weight", "0.5", "--max-steps", "2"], hooks=hooks)
    assert steps[0][:2] == ("init", 0) and steps[1:] == [(1, 0.25), (2, 0.5)]
    assert calls == [(1, 0, 0.5), (1, 1, 0.5)]                  # one micro-batch a step
    m1, _ = checkpoint.load_livr(str(tmp_path / "stage1" / "last"))
    assert torch.allclose(m1.latent_embeds[0], m1.latent_embeds[-1])     # the hook's rows, kept
    # --resume refuses another --aux-weight, naming it: no second table listed it
    with pytest.raises(SystemExit):
        train.main(["--stage", "1", *common, "--aux-weight", "0.7", "--resume"], hooks=hooks)
    assert "--aux-weight 0.5" in capsys.readouterr().err


def test_a_fork_gives_the_latent_rows_their_own_learning_rate(demo, tmp_path, capsys):
    """Hooks.param_groups: the latent rows at --latent-lr-scale x --lr and no weight decay, the
    LoRA weights as before -- read off what AdamW's first step did to each (its update is
    lr x sign(gradient) wherever the gradient is not tiny)."""
    scale = flags.flag("--latent-lr-scale", low=0, resume="fixed", type=float, default=1.0)

    def groups(m, named, run):
        latents = [p for k, p in named if k == "latent_embeds"]
        return [{"params": latents, "lr_scale": run.args.latent_lr_scale, "weight_decay_scale": 0.0},
                {"params": [p for k, p in named if k != "latent_embeds"]}]

    def init_latents(m, batch, run):          # known starting rows, to read the step's update off
        with torch.no_grad():
            m.latent_embeds.fill_(0.5)

    lr = 1e-3
    common = ["--model", demo["base"], "--data", demo["train"], "--latents", str(K), "--global-batch",
              "2", "--log-every", "100", "--lr", str(lr), "--weight-decay", "0.5", "--max-steps", "1"]
    hooks = train.Hooks(param_groups=groups, init_latents=init_latents, flags=[scale])
    train.main(["--stage", "1", *common, "--run-dir", str(tmp_path / "a"), "--latent-lr-scale", "10"], hooks=hooks)
    m, _ = checkpoint.load_livr(str(tmp_path / "a" / "stage1" / "last"))
    latent_step = (m.latent_embeds - 0.5).abs().max().item()
    lora_b = [mod.lora_B for mod in m.modules() if isinstance(mod, model.LoRALinear)]
    lora_step = max(b.abs().max().item() for b in lora_b)       # B starts at zero: no decay to see
    assert latent_step == pytest.approx(10 * lr, rel=1e-3)      # x10, and no 0.5 x lr decay of 0.5
    assert lora_step == pytest.approx(lr, rel=1e-3)
    state = checkpoint.read_trainer_json(str(tmp_path / "a" / "stage1" / "last"))["optimizer"]
    assert [(g["lr_scale"], g["weight_decay_scale"]) for g in state["param_groups"]] == [(10.0, 0.0), (1.0, 1.0)]
    # --resume keeps each group's scale when it applies a new --lr
    m2 = torch.nn.Linear(2, 2)
    named = list(m2.named_parameters())
    opt, sched, _, _ = train.build_optimizer(
        argparse.Namespace(lr=lr, weight_decay=0.1, epochs=1, global_batch=1, warmup=0.0),
        train.optimizer_groups(named, [{"params": [m2.weight], "lr_scale": 10.0}, {"params": [m2.bias]}]), 4)
    rundir.apply_hparams(opt, sched, argparse.Namespace(lr=2e-3, weight_decay=0.2))
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(2e-2, 0.2), (2e-3, 0.2)]
    # a group list that leaves a parameter out, or names one twice, is refused by name
    with pytest.raises(train.RunError, match="bias"):
        train.optimizer_groups(named, [{"params": [m2.weight]}])
    with pytest.raises(train.RunError, match="weight is in groups 0 and 1"):
        train.optimizer_groups(named, [{"params": [m2.weight]}, {"params": [m2.weight, m2.bias]}])
    bad = lambda m, named, run: [{"params": [p for _, p in named], "lr": 1.0}]
    with pytest.raises(SystemExit):
        train.main(["--stage", "1", *common, "--run-dir", str(tmp_path / "b")], hooks=train.Hooks(param_groups=bad))
    assert "set lr_scale and weight_decay_scale" in capsys.readouterr().err
