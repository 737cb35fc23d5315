"""
LIVR training: one visible loop, two stages (the paper's recipe; README, "LIVR in one page").

    python train.py --stage 1                                  # one process, built-in demo
    torchrun --nproc_per_node 2 train.py --stage 1             # FSDP2 over 2 processes
    torchrun --nproc_per_node 2 train.py --stage 2             # from where stage 1 ended
    torchrun --nproc_per_node 1 train.py --stage 1 --model Qwen/Qwen2.5-VL-3B-Instruct \
        --data train.jsonl --val val.jsonl --run-dir runs/count               # real data

With no --model/--data the run is the built-in demo (demo.py). Stage 1 trains under the
bottleneck mask (masks.py): the answer reaches the image only through the K latent tokens;
stage 2 continues from stage 1's end with the causal mask. Defaults are the paper's recipe:
LoRA r16/a32/p0.05 on q,k,v,o,gate,up,down + the latent rows, AdamW lr 1e-4 wd 0.01, effective
batch 8, 5% warm-up then cosine (a fresh schedule per stage), seed 42, loss on answer tokens only
(their summed cross-entropy over the global batch divided by their count). Each device packs its
share of a step into few long sequences, one segment per sample: the paper's per-device batch 1
with accumulation (--micro-batch-tokens 0) in fewer, larger passes, the same gradient.

The file reads: the run (set-up steps, then the loop), the loss, the set-up steps (the flags are
declared once, in flags.py). A fork plugs into Hooks -- its own loss, the latent rows set from
the first batch, a callback after each step, its own flags -- each receiving the Run (flags,
stage, step, progress).
"""
import argparse
import contextlib
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import attention
import batching
import checkpoint
import data
import demo
import faults
import flags
import masks
import model
import rundir
import tracking
from distributed import all_sum, leave, mesh_note, mixed_precision, setup_distributed, shard_model
from flags import parse_args  # noqa: F401 (train.parse_args)
from rundir import RunError, save_checkpoint


# ----------------------------------------------------------------------------------------------
# What a fork may read of the run in progress, and the seams it plugs into

@dataclass
class Run:
    """The run in progress, as the loss, the latent-init hook and step callbacks see it."""
    args: argparse.Namespace            # every flag (flags.FLAGS and a fork's), resolved
    stage: int
    mask_mode: str                      # a name in masks.RULES
    step: int = 0                       # optimizer steps done in this stage
    total_steps: int = 1
    rank: int = 0
    world: int = 1
    tokens_per_s: float = 0.0           # over this process's run of the stage so far

    @property
    def progress(self):
        """Training progress in [0, 1]; mask rules read it as their Context.progress."""
        return self.step / max(1, self.total_steps)


@dataclass
class Hooks:
    """A fork's seams, each optional:
      loss          (m, batch, mask_mode, run) -> (summed loss, answer-token count); default compute_loss
      init_latents  (m, batch, run) -> None: sets the latent rows from the stage's first micro-batch
                    (the same on every rank), before sharding; only when the rows are fresh (no
                    --init, no --resume)
      on_step       [(run, record) -> None]: after every optimizer step and every validation, on
                    every rank, with what metrics.jsonl gets
      flags         [flags.flag(...)]: the fork's own flags, declared as flags.FLAGS's are
      param_groups  (m, named_params, run) -> [{"params": [...], "lr_scale": s, "weight_decay_scale": w}]:
                    AdamW's groups (a group's lr is --lr x lr_scale on the same schedule, its
                    weight decay --weight-decay x weight_decay_scale; both default 1);
                    named_params: the trainable (name, parameter) pairs, each in exactly one group"""
    loss: Optional[Callable] = None
    init_latents: Optional[Callable] = None
    on_step: list = field(default_factory=list)
    flags: list = field(default_factory=list)
    param_groups: Optional[Callable] = None


# ----------------------------------------------------------------------------------------------
# The run: set-up steps (each a function further down), then one loop

def run(args, rank, world, device, log, hooks=None):
    hooks = hooks or Hooks()
    flags.check_args(args, hooks.flags)
    tracking.require(args.report_to)          # a missing package stops the run before any work
    base, init, stage_dir, mask_mode = settle_run(args, rank, world, device, log, hooks.flags)
    processor, train_records, val_records = read_data(args, base, rank)
    m = build_model(args, init, base, processor, device)
    if args.dry_run:                 # the resolved run, as the loop below would train it
        plan = describe(args, m, mask_mode, init, stage_dir, len(train_records))
        log(json.dumps(plan, indent=1))
        return plan
    r = Run(args, args.stage, mask_mode, rank=rank, world=world)
    tracker = tracking.start(args, stage_dir, rank)      # --report-to; metrics.png at the stage's end
    on_step = [*hooks.on_step, tracker.on_step]
    if hooks.init_latents and not init and not args.resume:
        hooks.init_latents(m, first_batch(args, m, processor, train_records, device), r)
    compute_dtype, autocast = place_model(m, args, device)
    named = [(k, p) for k, p in m.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = optimizer_groups(named, hooks.param_groups(m, named, r) if hooks.param_groups else None)
    opt, sched, total_steps, steps_per_epoch = build_optimizer(args, groups, len(train_records))
    r.total_steps = total_steps
    meta = {"base": os.path.abspath(base), "base_fingerprint": checkpoint.base_fingerprint(base),
            "stage": args.stage, "mask": mask_mode,
            "num_latents": args.latents, "latent_token_id": processor.latent_token_id,
            "latent_position": args.latent_position, "shared_latent": args.shared_latent,
            "train": args.train, "lora": None if args.train != "lora" else
            {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout}}
    data_id = rundir.data_identity(train_records)
    if args.resume:
        rundir.check_resume_data(checkpoint.read_trainer_json(os.path.join(stage_dir, "last")).get("data"),
                                 data_id, os.path.join(stage_dir, "last"), args.data)
    step, best = start_or_resume(args, m, opt, sched, stage_dir, rank, device, log)
    rundir.check_resumed_step(step, total_steps, os.path.join(stage_dir, "last"))
    train_batches, val_batches = build_loaders(args, m, processor, train_records, val_records,
                                               step, total_steps, compute_dtype, rank, world, device)
    n_params = sum(p.numel() for p in params)
    packing = (f"packed into micro-batches of <= {args.micro_batch_tokens} tokens" if args.micro_batch_tokens
               else f"micro-batches of {args.batch_size}")
    log(f"stage {args.stage} | mask {mask_mode} | K={args.latents} | train {args.train} "
        f"({n_params / 1e6:.2f}M trainable) | {len(train_records)} samples | {total_steps} steps of "
        f"{args.global_batch}, {packing} | {world} x {device.type} | lr {args.lr:g}" + mesh_note(params))
    metrics = os.path.join(stage_dir, "metrics.jsonl")

    # checkpoints this run can name as good after a divergence (never saved non-finite)
    saved = rundir.Checkpoints(m.cfg.text.vocab_size, [(init, 0)] if init else [], metrics)
    last = os.path.join(stage_dir, "last")
    if args.resume:
        saved.add(last, step)

    def record(rec):                 # one line of metrics.jsonl, then the fork's callbacks
        if rank == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
        for fn in on_step:
            fn(r, rec)

    def save(name, final=False):
        if not saved.may_save():     # the loss is diverging: keep the checkpoint from before
            if final:
                raise RunError(f"{saved.refusal(name)} Try a lower --lr.")
            return log(saved.refusal(name))
        save_checkpoint(os.path.join(stage_dir, name), m, opt, sched, meta,
                        {"step": step, "best": best, "args": vars(args),
                         "hparams": rundir.hparams(args, mask_mode, *flags.resume_flags(hooks.flags)), "data": data_id},
                        rank, device)
        saved.add(os.path.join(stage_dir, name), step)

    def evaluate_and_keep_best():
        nonlocal best
        if val_batches is None:
            return
        with autocast():
            acc = val_accuracy(m, ((batching.to_device(b, device), w) for b, w in val_batches), mask_mode, r)
        log(f"step {step} | val accuracy {100 * acc:.1f}%")
        record({"step": step, "val_acc": acc})
        if acc > best:
            best = acc
            save("best")

    # the loop: one optimizer step of --global-batch samples per turn
    m.train()
    t0, tokens_seen, start_step = time.time(), 0, step
    bad_steps = 0                    # consecutive non-finite steps
    steps = iter(train_batches)      # the global batch of each step: a seeded permutation per epoch
    gate = faults.StepGate(rank, world, last)   # a signal or a fault on any rank stops every rank here
    while step < total_steps:
        r.step = step
        # this rank's share of the step, as micro-batches on the host
        micro = gate.next(steps, step, lambda: save("last"), lambda: saved.step_of(last))
        loss, tokens = accumulate(m, micro, r, hooks.loss or compute_loss, autocast, device)
        tokens_seen += tokens
        r.tokens_per_s = tokens_seen * world / (time.time() - t0)
        norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        loss, grad_norm = read_scalars(loss, norm)     # the step's one wait on the device
        saved.observe(step + 1, loss)
        lr = sched.get_last_lr()[0]
        # loss is all-reduced and the norm is over the full (reduced) gradient, so every rank
        # takes the same decision here
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            opt.step()
            bad_steps = 0
        else:
            bad_steps += 1
            log(skip_message(step, loss, grad_norm, saved))
            if bad_steps >= MAX_BAD_STEPS:
                raise RunError(f"{bad_steps} non-finite steps in a row (last at step {step + 1}): "
                               f"stopping. {saved.note(stopping=True)} Try a lower --lr.")
        opt.zero_grad(set_to_none=True)  # a skipped step applies nothing
        sched.step()                     # the schedule and sample order go on as if stepped
        step = r.step = step + 1
        record({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm} if finite else
               {"step": step, "skipped": f"loss {loss}, grad norm {grad_norm}", "lr": lr})
        if step % args.log_every == 0 or step == total_steps:
            dt = time.time() - t0
            eta = dt / (step - start_step) * (total_steps - step)
            log(f"step {step}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{r.tokens_per_s:.0f} tok/s | ETA {fmt_time(eta)}")
        end_of_epoch = step % steps_per_epoch == 0
        if (args.eval_every and step % args.eval_every == 0) or (not args.eval_every and end_of_epoch):
            evaluate_and_keep_best()
        stop_early = args.max_steps and step >= start_step + args.max_steps and step < total_steps
        if step % args.save_every == 0 or step == total_steps or stop_early:
            save("last", final=step == total_steps or stop_early)
        if stop_early:   # on the last step the stage ends normally instead, writing `final`
            log(f"stopping after --max-steps {args.max_steps}; --resume continues from step {step}")
            tracker.finish()
            return
    if total_steps == 0:             # --epochs 0: the stage ends where it starts
        save("last")
    if val_records and best < 0:
        evaluate_and_keep_best()
    # end = the weights after the last step (stage 2 starts there); final = what the stage
    # reports: the best validation checkpoint (the paper, single task) or end (--final end)
    reported = "best" if args.final == "best" and val_records else "end"
    if rank == 0:
        checkpoint.copy_checkpoint(os.path.join(stage_dir, "last"), os.path.join(stage_dir, "end"))
        checkpoint.copy_checkpoint(os.path.join(stage_dir, reported), os.path.join(stage_dir, "final"))
    tracker.finish()
    log(f"stage {args.stage} done: {stage_dir}/end; final = {reported}" +
        (f" (best val accuracy {100 * best:.1f}%)" if val_records else ""))


def accumulate(m, micro, r, loss_fn, autocast, device):
    """Forward and backward over this rank's micro-batches of one step, the gradient summed to
    the global token mean. Returns (the step's loss, all ranks' mean per answer token, a 0-dim
    tensor on the device; the tokens this rank computed). One collective of host numbers first:
    the global answer-token count, and every rank's micro-batch count -- FSDP needs all ranks to
    run the same number of forward/backward passes, so a rank with fewer repeats its smallest
    micro-batch with weight 0."""
    rank, world = r.rank, r.world
    n_tokens, *counts = all_sum(sum(batching.num_targets(b) for b in micro),
                                *[len(micro) if q == rank else 0 for q in range(world)])
    weights = [1.0] * len(micro) + [0.0] * (int(max(counts)) - len(micro))
    micro = [batching.to_device(b, device) for b in micro]           # each batch copied once
    micro += [min(micro, key=lambda b: b["input_ids"].numel())] * (len(weights) - len(micro))
    loss_sum, tokens = torch.zeros((), device=device), 0
    for batch, weight in zip(micro, weights):
        with autocast():
            ce, _ = loss_fn(m, batch, r.mask_mode, r)
        # FSDP averages gradients over ranks; scale so the step sees the global token mean
        (ce * (weight * world / n_tokens)).backward()
        loss_sum += weight * ce.detach().float()
        tokens += int(weight) * batch["input_ids"].numel()
    if dist.is_initialized():
        dist.all_reduce(loss_sum)         # on the device: the loop reads it with the grad norm
    return loss_sum / n_tokens, tokens


MAX_BAD_STEPS = 3


def read_scalars(*xs):
    """0-dim device tensors as Python floats, in one read-back. clip_grad_norm_'s total norm is a
    DTensor under FSDP: its full (replicated) value is taken on the device first."""
    xs = [x.full_tensor() if hasattr(x, "full_tensor") else x for x in xs]
    return torch.stack([x.detach().float() for x in xs]).tolist()


def finite_checkpoint_note(saved):
    """The newest checkpoint from before the loss left its range (rundir.Checkpoints)."""
    return saved.note()


def skip_message(step, loss, grad_norm, saved):
    return (f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
            f"(loss {loss}, grad norm {grad_norm}): step skipped, weights unchanged. "
            + finite_checkpoint_note(saved))


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------------------------
# The loss: next-token cross-entropy on answer tokens only

def forward_batch(m, batch, mask_mode, run=None, **kw):
    """The model on a training batch under `mask_mode`, logits only where a label follows
    (`logits_at`), never as a [B, L, vocab] tensor. Returns (m's output, targets (n,), n): the
    output is the (n, vocab) logits, or a model.Output with return_hidden=True in `kw` (what an
    auxiliary loss on the latents reads). A batch from batching.prepare_batch runs the per-sample
    attention blocks (or, m.attention_path "flex", one block-sparse call per layer: attention.py)
    with everything else made on the host: nothing here waits on the device. Otherwise the mask is
    the dense [B, L, L] one. `run` gives the mask rule its progress."""
    progress = None if run is None else run.progress
    if "logits_at" in batch:
        if getattr(m, "attention_path", "blocks") == "flex":        # --attention flex
            mask = attention.decoder_mask(batch["kinds"], mask_mode, batch["segment_ids"], m.num_latents, progress)
            layout = attention.vision_layout(batch["vision_layout"])
        else:
            mask = attention.attention_blocks(batch["kinds"], mask_mode, batch["spans"], m.num_latents, progress)
            layout = batch["vision_layout"]
        out = m(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"], mask=mask,
                position_ids=batch["position_ids"], vision_layout=layout, logits_at=batch["logits_at"], **kw)
        return out, batch["targets"], batch["n_targets"]
    mask = masks.build_mask(batch["kinds"], mask_mode, batch["segment_ids"], m.num_latents, progress)  # (B, L, L)
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != -100        # position i predicts token i+1
    out = m(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"], mask=mask,
            segment_ids=batch["segment_ids"], logits_at=predicts, **kw)
    targets = labels[:, 1:][labels[:, 1:] != -100]
    return out, targets, targets.numel()


def compute_loss(m, batch, mask_mode, run=None):
    """Returns (summed cross-entropy over answer tokens, number of answer tokens). A fork's loss
    (Hooks.loss) has this signature and reads forward_batch's output; `run` is the Run (None
    outside train.run: tests, bench.py)."""
    logits, targets, n = forward_batch(m, batch, mask_mode, run)                # (n, vocab)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), n


@torch.no_grad()
def val_accuracy(m, batches, mask_mode, run=None):
    """Exact-match accuracy under teacher forcing: a sample counts when the argmax (latent ids
    excluded, as generate excludes them) at every position that predicts an answer token (the
    answer and its closing <|im_end|>) is the gold token -- the verdict greedy decoding would
    reach, in one forward_batch per batch. Every rank runs the
    same number of forwards (FSDP needs that); padded-in repeats carry weight 0. Batches hold
    one sample per row (batching.collate); the verdicts stay on the device and are read back
    once, at the end."""
    m.eval()
    pending = []                      # (wrong answer tokens per row (B,), weight (B,))
    for batch, weight in batches:
        logits, targets, _ = forward_batch(m, batch, mask_mode, run)            # (n, vocab)
        labels = batch["labels"]
        B, L = labels.shape
        # the row of each answer position, in forward_batch's (row-major) order
        row = (batch["logits_at"] // L if "logits_at" in batch else
               (labels[:, 1:] != -100).nonzero()[:, 0])
        guess = m.mask_latent_logits(logits).argmax(-1)      # as generate: never a latent id
        wrong = torch.zeros(B, device=labels.device).index_add_(0, row, (guess != targets).float())
        pending.append((wrong, weight))
    m.train()
    correct = total = 0.0
    if pending:
        wrong = torch.cat([w for w, _ in pending]).cpu()
        weight = torch.cat([w for _, w in pending]).float()
        correct, total = float(((wrong == 0).float() * weight).sum()), float(weight.sum())
    c, t = all_sum(correct, total)
    return c / max(t, 1)


# ----------------------------------------------------------------------------------------------
# Set-up steps, in the order run() takes them

def settle_run(args, rank, world, device, log, extra_flags=()):
    """The run's inputs and the checks that need no data: the base checkpoint (the demo's made
    once), the device-dependent defaults, the mask, the stage-1 checkpoint stage 2 starts from,
    and --resume's agreement with the checkpoint. Returns (base, init, stage_dir, mask_mode)."""
    is_demo = args.model is None
    if is_demo and device.type == "cpu":
        # the tiny model's matmuls are too small to split: extra threads only add wake-up costs
        torch.set_num_threads(1)
    if is_demo:
        base, train_file, val_file = demo.ensure_demo(args.run_dir, rank, demo.TRAIN["n_train"])
        args.data, args.val = args.data or train_file, args.val or val_file
    else:
        base = checkpoint.resolve(args.model)
        if not args.data:
            raise RunError("--model given without --data: pass a training set (.jsonl or .json)")
    on_gpu = device.type == "cuda"
    if args.micro_batch_tokens is None:
        # a GPU wants few long sequences whose activations fit (the 3B: ~48 GB at 8192); on
        # CPU a long packed sequence costs more than the passes it saves (BENCH.md)
        args.micro_batch_tokens = 8192 if on_gpu else 512
    if args.workers is None:
        args.workers = batching.default_workers(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    mask_mode = args.mask or masks.STAGE_MODES[args.stage]
    if args.attention == "flex" and not on_gpu:
        raise RunError("--attention flex needs a CUDA device: FlexAttention has no backward on "
                       "CPU (torch 2.13); use --attention blocks")
    if args.shard_size and world % args.shard_size:
        raise RunError(f"--shard-size {args.shard_size} does not divide the {world} processes")
    if args.global_batch % world:
        raise RunError(f"--global-batch {args.global_batch} is not a multiple of the "
                       f"{world} processes")
    if not args.micro_batch_tokens and args.global_batch % (args.batch_size * world):
        raise RunError(f"--global-batch {args.global_batch} is not a multiple of "
                       f"--batch-size {args.batch_size} x {world} processes")
    stage_dir = os.path.join(args.run_dir, f"stage{args.stage}")
    if args.stage == 2 and args.epochs == 0:
        raise RunError("--epochs 0 trains nothing: stage 2 needs at least part of an epoch "
                       "(stage 1 may have 0, the paper's (0, 10) split)")
    init = (rundir.stage_one_checkpoint(args.run_dir, args.init, rank, "best" if args.from_best else "end")
            if args.stage == 2 else None)
    if init:                          # stage 2 trains on the base stage 1 trained on
        base = rundir.trained_base(init, None if is_demo else base)
    if args.resume:
        last = rundir.resumable(stage_dir, rank, base)
        fixed, applied = flags.resume_flags(extra_flags)
        rundir.check_resume(rundir.read_hparams(last), rundir.hparams(args, mask_mode, fixed, applied),
                            last, log, fixed, applied)
    return base, init, stage_dir, mask_mode


def read_data(args, base, rank):
    """The processor and the records, read and checked up front (they are small); images are
    decoded lazily, batch by batch (batching.py, "Streaming")."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    try:
        processor = data.Processor.from_pretrained(base, num_latents=args.latents,
                                                   latent_position=args.latent_position)
    except FileNotFoundError:
        raise
    except Exception as e:          # tokenizers' and json's own error types
        raise RunError(f"cannot read the tokenizer or image processor in {base}: {type(e).__name__}: {e}") from None
    check = lambda path: data.load_dataset(
        path, skip_bad=args.skip_bad, max_len=args.max_len, processor=processor,
        progress=data.progress_line(f"checking {path}") if rank == 0 else None)
    train_records = check(args.data)
    val_records = check(args.val) if args.val else []
    return processor, train_records, val_records


def build_model(args, stage_init, base, processor, device):
    """The base model + latent rows + LoRA (or all LM weights) trainable; the rest frozen. From
    a stage-1 checkpoint, stage 2 keeps its latent layout and what it trained."""
    if stage_init:
        m, meta = checkpoint.load_livr(stage_init, device="cpu", base=base)   # complete or CheckpointError
        if m.num_latents != args.latents:
            raise RunError(f"{stage_init} has {m.num_latents} latent tokens but --latents is "
                           f"{args.latents}: pass --latents {m.num_latents}")
        for key, flag_ in (("train", "--train"), ("latent_position", "--latent-position"),
                           ("shared_latent", "--shared-latent")):
            theirs = meta.get(key, FLAG_DEFAULTS[key])
            if theirs != getattr(args, key):
                raise RunError(f"{stage_init} was trained with {flag_} {theirs}; this run has "
                               f"{flag_} {getattr(args, key)}: pass the same to both stages")
    else:
        m = checkpoint.load_pretrained(base, device="cpu", num_latents=args.latents,
                                       latent_token_id=processor.latent_token_id,
                                       shared_latent=args.shared_latent)
        if args.train == "lora":
            model.add_lora(m, args.lora_rank, args.lora_alpha, args.lora_dropout)
    base = checkpoint.base_parameter_names(m)   # the rest is new: latents, LoRA, a fork's modules
    for name, p in m.named_parameters():
        p.requires_grad = masks.trainable(name, args.train, from_base=name in base)
    m.grad_checkpointing = args.activation_checkpointing
    m.attention_path = args.attention                  # read by forward_batch
    return m.to(device)


FLAG_DEFAULTS = {"train": "lora", "latent_position": "after", "shared_latent": False}   # older livr.json


def describe(args, m, mask_mode, init, stage_dir, n_records):
    """The resolved run (--dry-run): what each command of the README's ablation table computes."""
    trainable = {k: p.numel() for k, p in m.named_parameters() if p.requires_grad}
    return {"stage": args.stage, "mask": mask_mode, "num_latents": m.num_latents,
            "latent_position": args.latent_position, "shared_latent": args.shared_latent,
            "latent_rows": 0 if m.latent_embeds is None else m.latent_embeds.shape[0],
            "train": args.train, "trainable_parameters": sum(trainable.values()),
            "trainable_tensors": sorted(trainable), "lr": args.lr, "epochs": args.epochs,
            "steps": schedule_length(args, n_records)[0], "init": init, "stage_dir": stage_dir,
            "final": args.final}


def first_batch(args, m, processor, records, device):
    """The stage's first micro-batch as every rank would make it on one process: what
    Hooks.init_latents sees, the same on every rank (so the latent rows start equal)."""
    sampler = batching.StepSampler(len(records), args.global_batch, 0, 1, args.seed, 0, 1)
    make = batching.StepBatches(processor.pad_id, args.micro_batch_tokens, args.batch_size,
                                prepare=functools.partial(batching.prepare_batch, cfg=m.cfg))
    items = [batching.EncodedRecords(records, processor)[i] for i in next(iter(sampler))]
    return batching.to_device(make(items)[0], device)


def place_model(m, args, device):
    """Shard over the processes (FSDP2) or, on one device, keep fp32 masters under autocast.
    Returns (compute dtype, a context-manager factory for the forward passes)."""
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    compute_dtype = checkpoint.DTYPES[dtype_name]
    if args.compile:
        model.compile_blocks(m)            # before FSDP wraps the blocks: each compiles as a plain module
    if dist.is_initialized():
        shard_model(m, compute_dtype, device, shard_size=args.shard_size)
        return compute_dtype, contextlib.nullcontext       # FSDP casts the parameters itself
    return compute_dtype, mixed_precision(m, compute_dtype, device)


def optimizer_groups(named, groups=None):
    """AdamW's parameter groups: one of every trainable parameter, or a fork's `groups`
    (Hooks.param_groups), checked to hold each trainable parameter exactly once -- a parameter
    left out would silently never train -- with finite, non-negative scales."""
    if groups is None:
        return [{"params": [p for _, p in named], "lr_scale": 1.0, "weight_decay_scale": 1.0}]
    name_of = {id(p): k for k, p in named}
    seen, out = {}, []
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or "params" not in g:
            raise RunError(f"param_groups: group {i} must be a dict with \"params\"")
        unknown = set(g) - {"params", "lr_scale", "weight_decay_scale"}
        if unknown:
            raise RunError(f"param_groups: group {i} has {sorted(unknown)}: set lr_scale and "
                           "weight_decay_scale (of --lr, --weight-decay) instead")
        scales = {k: g.get(k, 1.0) for k in ("lr_scale", "weight_decay_scale")}
        for k, v in scales.items():
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise RunError(f"param_groups: group {i}'s {k} {v!r} must be a finite number >= 0")
        ps = list(g["params"])
        for p in ps:
            k = name_of.get(id(p))
            if k is None:
                raise RunError(f"param_groups: group {i} holds a parameter that does not train "
                               f"(shape {tuple(p.shape)}); name only the named_params given")
            if k in seen:
                raise RunError(f"param_groups: {k} is in groups {seen[k]} and {i}")
            seen[k] = i
        out.append({"params": ps, **{k: float(v) for k, v in scales.items()}})
    missing = [k for k in name_of.values() if k not in seen]
    if missing:
        raise RunError(f"param_groups: {len(missing)} trainable parameter(s) in no group, e.g. "
                       f"{missing[0]} (they would never train)")
    return out


def build_optimizer(args, groups, n_records):
    """AdamW and the schedule: 5% linear warm-up, then cosine to 0 -- a fresh one per stage.
    `groups`: optimizer_groups(); each group's lr and weight decay are --lr and
    --weight-decay times its scales. Returns (opt, sched, total_steps, steps_per_epoch)."""
    # foreach: a few multi-tensor ops per step rather than a dozen per parameter (the default on
    # a GPU; on CPU, and for FSDP's DTensors, it saves most of the optimizer's host time)
    groups = [{**g, "lr": args.lr * g["lr_scale"], "weight_decay": args.weight_decay * g["weight_decay_scale"]}
              for g in groups]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=args.weight_decay, foreach=True)
    total_steps, steps_per_epoch = schedule_length(args, n_records)
    warmup = max(1, int(args.warmup * total_steps))

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda), total_steps, steps_per_epoch


def schedule_length(args, n_records):
    """(optimizer steps in the stage, steps per epoch): --epochs of --global-batch samples, at
    least one step unless --epochs is 0."""
    steps_per_epoch = n_records // args.global_batch
    if steps_per_epoch == 0:
        raise RunError(f"{args.data} has {n_records} usable record(s), fewer than one "
                       f"optimizer step's --global-batch {args.global_batch}: add data or lower "
                       "--global-batch")
    return (max(1, int(steps_per_epoch * args.epochs)) if args.epochs else 0), steps_per_epoch


def start_or_resume(args, m, opt, sched, stage_dir, rank, device, log):
    """A fresh metrics.jsonl, or --resume: the trainer state, the (possibly new) --lr, the
    weights and the metrics up to the resumed step. Returns (step, best val accuracy)."""
    if not args.resume:
        if rank == 0:
            os.makedirs(stage_dir, exist_ok=True)
            open(os.path.join(stage_dir, "metrics.jsonl"), "w").close()
        return 0, -1.0
    last = os.path.join(stage_dir, "last")
    state = rundir.load_trainer_state(last, m, opt, sched, rank, device)
    rundir.apply_hparams(opt, sched, args)
    rundir.restore_weights(m, last)
    step, best = state["step"], state["best"]
    if rank == 0:   # drop what a killed run logged after its last checkpoint
        rundir.keep_metrics(os.path.join(stage_dir, "metrics.jsonl"), step, log)
    log(f"resumed {stage_dir}/last at step {step}")
    return step, best


def build_loaders(args, m, processor, train_records, val_records, step, total_steps,
                  compute_dtype, rank, world, device):
    """The input pipeline: this rank's share of each step from `step` on, packed into micro-
    batches in worker processes; validation in batches of 8, the same count on every rank.
    batching.prepare_batch makes the step's positions, layouts and targets with the batch, in
    the workers, so the step itself never waits on the host. Pixels go in the compute dtype
    (bf16 on a GPU: half the bytes to copy, same numbers)."""
    on_gpu = device.type == "cuda"
    prepare = functools.partial(batching.prepare_batch, cfg=m.cfg)
    train_batches = batching.loader(
        batching.EncodedRecords(train_records, processor, max_len=args.max_len),
        batching.StepSampler(len(train_records), args.global_batch, rank, world, args.seed, step, total_steps),
        batching.StepBatches(processor.pad_id, args.micro_batch_tokens, args.batch_size, compute_dtype, prepare),
        args.workers, pin_memory=on_gpu)
    val_batches = batching.loader(
        batching.EncodedRecords(val_records, processor, max_len=args.max_len),
        batching.RankShard(len(val_records), rank, world, 8),
        batching.ValBatches(processor.pad_id, pixel_dtype=compute_dtype, prepare=prepare),
        args.workers, pin_memory=on_gpu) if val_records else None
    return train_batches, val_batches


def main(argv=None, hooks=None):
    """Exit codes: 0 done, 2 an error (one line `error: ...` from the process that met it),
    128 + the signal's number (143 SIGTERM, 130 SIGINT) when a signal stopped the run after
    saving `last` (faults.py)."""
    faults.safe_output()          # paths and task names never reach the terminal raw
    hooks = hooks or Hooks()
    args = flags.parse_args(argv, hooks.flags, description=__doc__.split("\n\n")[0])
    rank, world, device = setup_distributed(args.collective_timeout)
    log = print if rank == 0 else (lambda *a, **k: None)
    claim = (contextlib.nullcontext() if args.dry_run else     # a dry run writes nothing
             rundir.StageClaim(args.run_dir, args.stage, args.resume, rank))
    try:
        with faults.signals(), claim:
            result = run(args, rank, world, device, log, hooks)
    except (Exception, faults.Stopped) as e:
        code = faults.report(e, rank, world, (RunError, data.DataError, checkpoint.CheckpointError,
                                              OSError, tracking.TrackingError),
                             timeout_s=args.collective_timeout)
        if code is None:
            raise                 # a bug: its traceback
        if dist.is_initialized():
            leave(code)           # an error need not reach every rank: no barrier to meet at
        sys.exit(code)
    if dist.is_initialized():
        dist.barrier()            # rank 0 may still be writing `final`: leave together
        leave(0)
    return result                 # the resolved run with --dry-run


if __name__ == "__main__":
    main()
