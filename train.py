"""
LIVR training: one visible loop, two stages (the paper's recipe; README, "LIVR in one page").

    python train.py --stage 1                                  # one process, built-in demo
    torchrun --nproc_per_node 2 train.py --stage 1             # FSDP2 over 2 processes
    torchrun --nproc_per_node 2 train.py --stage 2             # from the stage-1 checkpoint
    python evaluate.py                                         # scores runs/demo/stage2/final

With no --model/--data the run is the built-in demo (demo.py): a tiny Qwen2.5-VL-shaped model
(random init) on the synthetic tasks, all under runs/demo/. On real data:

    torchrun --nproc_per_node 1 train.py --stage 1 --model Qwen/Qwen2.5-VL-3B-Instruct \
        --data train.jsonl --val val.jsonl --run-dir runs/count
    torchrun --nproc_per_node 1 train.py --stage 2 --model Qwen/Qwen2.5-VL-3B-Instruct \
        --data train.jsonl --val val.jsonl --run-dir runs/count

Stage 1 trains under the bottleneck mask (masks.py): the answer reaches the image only through
the K latent tokens. Stage 2 starts from stage 1's checkpoint with the causal mask. Defaults are
the paper's recipe: LoRA r16/a32/p0.05 on q,k,v,o,gate,up,down + the latent rows, AdamW lr 1e-4
wd 0.01, effective batch 8, 5% warm-up then cosine (a fresh schedule per stage), seed 42, loss on
answer tokens only (their summed cross-entropy over the global batch divided by their count).
The paper's per-device batch 1 with accumulation is --micro-batch-tokens 0; by default each
device packs its share of a step into few long sequences, one segment per sample, which gives the
same gradient in fewer, larger passes.

The file reads: the run (set-up steps, then the loop), the loss, the set-up steps, the flags
(declared once, in FLAGS), the distributed plumbing. A fork plugs into the seams of Hooks: its
own loss, an initialisation of the latent rows from the first batch, a callback after each step;
each receives the Run (flags, stage, step, progress).
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

import batching
import checkpoint
import checks
import data
import demo
import faults
import masks
import model
import rundir
from distributed import all_sum, leave, mixed_precision, setup_distributed, shard_model
from rundir import RunError


# ----------------------------------------------------------------------------------------------
# What a fork may read of the run in progress, and the seams it plugs into

@dataclass
class Run:
    """The run in progress, as the loss, the latent-init hook and step callbacks see it."""
    args: argparse.Namespace            # every flag of FLAGS, resolved
    stage: int
    mask_mode: str                      # a name in masks.RULES
    step: int = 0                       # optimizer steps done in this stage
    total_steps: int = 1
    rank: int = 0
    world: int = 1

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
                    every rank, with what metrics.jsonl gets"""
    loss: Optional[Callable] = None
    init_latents: Optional[Callable] = None
    on_step: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# The run: set-up steps (each a function further down), then one loop

def run(args, rank, world, device, log, hooks=None):
    hooks = hooks or Hooks()
    check_args(args)
    base, init, stage_dir, mask_mode = settle_run(args, rank, world, device, log)
    processor, train_records, val_records = read_data(args, base, rank)
    m = build_model(args, init, base, processor, device)
    r = Run(args, args.stage, mask_mode, rank=rank, world=world)
    if hooks.init_latents and not init and not args.resume:
        hooks.init_latents(m, first_batch(args, m, processor, train_records, device), r)
    compute_dtype, autocast = place_model(m, args, device)
    params = [p for p in m.parameters() if p.requires_grad]
    opt, sched, total_steps, steps_per_epoch = build_optimizer(args, params, len(train_records))
    r.total_steps = total_steps
    meta = {"base": os.path.abspath(base), "base_fingerprint": checks.base_fingerprint(base),
            "stage": args.stage, "mask": mask_mode,
            "num_latents": args.latents, "latent_token_id": processor.latent_token_id,
            "train": args.train, "lora": None if args.train == "full" else
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
        f"{args.global_batch}, {packing} | {world} x {device.type} | lr {args.lr:g}")
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
        for fn in hooks.on_step:
            fn(r, rec)

    def save(name, final=False):
        if not saved.may_save():     # the loss is diverging: keep the checkpoint from before
            if final:
                raise RunError(f"{saved.refusal(name)} Try a lower --lr.")
            return log(saved.refusal(name))
        save_checkpoint(os.path.join(stage_dir, name), m, opt, sched, meta,
                        {"step": step, "best": best, "args": vars(args),
                         "hparams": rundir.hparams(args, mask_mode, *resume_flags()), "data": data_id},
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
                f"{tokens_seen * world / dt:.0f} tok/s | ETA {fmt_time(eta)}")
        end_of_epoch = step % steps_per_epoch == 0
        if (args.eval_every and step % args.eval_every == 0) or (not args.eval_every and end_of_epoch):
            evaluate_and_keep_best()
        stop_early = args.max_steps and step >= start_step + args.max_steps and step < total_steps
        if step % args.save_every == 0 or step == total_steps or stop_early:
            save("last", final=step == total_steps or stop_early)
        if stop_early:   # on the last step the stage ends normally instead, writing `final`
            log(f"stopping after --max-steps {args.max_steps}; --resume continues from step {step}")
            return
    if val_records and best < 0:
        evaluate_and_keep_best()
    # final = the best validation checkpoint (the paper reports that one), else the last
    if rank == 0:
        src = os.path.join(stage_dir, "best" if val_records else "last")
        checkpoint.copy_checkpoint(src, os.path.join(stage_dir, "final"))
    log(f"stage {args.stage} done: {stage_dir}/final" +
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
    attention blocks with everything else made on the host: nothing here waits on the device.
    Otherwise the mask is the dense [B, L, L] one. `run` gives the mask rule its progress."""
    progress = None if run is None else run.progress
    if "logits_at" in batch:
        out = m(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                mask=model.attention_blocks(batch["kinds"], mask_mode, batch["spans"], m.num_latents, progress),
                position_ids=batch["position_ids"], vision_layout=batch["vision_layout"],
                logits_at=batch["logits_at"], **kw)
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
    """Exact-match accuracy under teacher forcing: a sample counts when the argmax at every
    answer position (answer tokens and the closing <|im_end|>) is the gold token -- the same
    verdict greedy decoding would reach, in one forward_batch per batch. Every rank runs the
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
        wrong = torch.zeros(B, device=labels.device).index_add_(
            0, row, (logits.argmax(-1) != targets).float())
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

def settle_run(args, rank, world, device, log):
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
    if args.global_batch % world:
        raise RunError(f"--global-batch {args.global_batch} is not a multiple of the "
                       f"{world} processes")
    if not args.micro_batch_tokens and args.global_batch % (args.batch_size * world):
        raise RunError(f"--global-batch {args.global_batch} is not a multiple of "
                       f"--batch-size {args.batch_size} x {world} processes")
    stage_dir = os.path.join(args.run_dir, f"stage{args.stage}")
    init = rundir.stage_one_checkpoint(args.run_dir, args.init, rank) if args.stage == 2 else None
    if init:                          # stage 2 trains on the base stage 1 trained on
        base = rundir.trained_base(init, None if is_demo else base)
    if args.resume:
        last = rundir.resumable(stage_dir, rank, base)
        rundir.check_resume(rundir.read_hparams(last), rundir.hparams(args, mask_mode, *resume_flags()),
                            last, log, *resume_flags())
    return base, init, stage_dir, mask_mode


def read_data(args, base, rank):
    """The processor and the records, read and checked up front (they are small); images are
    decoded lazily, batch by batch (batching.py, "Streaming")."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    try:
        processor = data.Processor.from_pretrained(base, num_latents=args.latents)
    except FileNotFoundError:
        raise
    except Exception as e:          # tokenizers' and json's own error types
        raise RunError(f"cannot read the tokenizer in {base}: {type(e).__name__}: {e}") from None
    check = lambda path: data.load_dataset(
        path, skip_bad=args.skip_bad, max_len=args.max_len, processor=processor,
        progress=data.progress_line(f"checking {path}") if rank == 0 else None)
    train_records = check(args.data)
    val_records = check(args.val) if args.val else []
    return processor, train_records, val_records


def build_model(args, stage_init, base, processor, device):
    """The base model + latent rows + LoRA (or all LM weights) trainable; the rest frozen."""
    if stage_init:
        m, meta = checkpoint.load_livr(stage_init, device="cpu", base=base)   # complete or CheckpointError
        if m.num_latents != args.latents:
            raise RunError(f"{stage_init} has {m.num_latents} latent tokens but --latents is "
                           f"{args.latents}: pass --latents {m.num_latents}")
        if (meta.get("train") or "lora") != args.train:
            raise RunError(f"{stage_init} was trained with --train {meta.get('train')}; "
                           f"pass --train {meta.get('train')}")
    else:
        m = checkpoint.load_pretrained(base, device="cpu", num_latents=args.latents,
                                       latent_token_id=processor.latent_token_id)
        if args.train == "lora":
            model.add_lora(m, args.lora_rank, args.lora_alpha, args.lora_dropout)
    base = checkpoint.base_parameter_names(m)   # the rest is new: latents, LoRA, a fork's modules
    for name, p in m.named_parameters():
        p.requires_grad = masks.trainable(name, args.train, from_base=name in base)
    m.grad_checkpointing = args.activation_checkpointing
    return m.to(device)


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
        model.compile_blocks(m)            # before FSDP wraps the blocks, as torchtitan does
    if dist.is_initialized():
        shard_model(m, compute_dtype, device)
        return compute_dtype, contextlib.nullcontext       # FSDP casts the parameters itself
    return compute_dtype, mixed_precision(m, compute_dtype, device)


def build_optimizer(args, params, n_records):
    """AdamW and the schedule: 5% linear warm-up, then cosine to 0 -- a fresh one per stage.
    Returns (opt, sched, total_steps, steps_per_epoch)."""
    # foreach: a few multi-tensor ops per step rather than a dozen per parameter (the default on
    # a GPU; on CPU, and for FSDP's DTensors, it saves most of the optimizer's host time)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=args.weight_decay, foreach=True)
    steps_per_epoch = n_records // args.global_batch
    if steps_per_epoch == 0:
        raise RunError(f"{args.data} has {n_records} usable record(s), fewer than one "
                       f"optimizer step's --global-batch {args.global_batch}: add data or lower "
                       "--global-batch")
    total_steps = max(1, int(steps_per_epoch * args.epochs))
    warmup = max(1, int(args.warmup * total_steps))

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda), total_steps, steps_per_epoch


def start_or_resume(args, m, opt, sched, stage_dir, rank, device, log):
    """A fresh metrics.jsonl, or --resume: the trainer state, the (possibly new) --lr, the
    weights and the metrics up to the resumed step. Returns (step, best val accuracy)."""
    if not args.resume:
        if rank == 0:
            os.makedirs(stage_dir, exist_ok=True)
            open(os.path.join(stage_dir, "metrics.jsonl"), "w").close()
        return 0, -1.0
    last = os.path.join(stage_dir, "last")
    state = checkpoint.load_trainer_state(last, m, opt, sched, rank, device)
    rundir.apply_hparams(opt, sched, args)
    checkpoint.restore_weights(m, last)
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


def save_checkpoint(path, m, opt, sched, meta, trainer, rank, device=torch.device("cpu")):
    """The weights and the trainer's state gathered onto rank 0's host, and written there
    (checkpoint.save_trainer_checkpoint). Refuses, on every rank, to write non-finite weights
    or optimizer state: rank 0, which sees the gathered whole, decides for all."""
    weights, opt_state = checkpoint.full_state(m, opt)
    finite = rank != 0 or (checkpoint.all_finite(weights) and checkpoint.all_finite(opt_state))
    (n_bad,) = all_sum(0 if finite else 1)             # rank 0's verdict, on every rank
    if n_bad:
        raise RunError(f"not saving {path}: the weights or optimizer state are not finite")
    rng = checkpoint.rng_state(device)
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)       # in memory between this run's ranks, no file
    if rank == 0:
        checkpoint.save_trainer_checkpoint(path, meta, weights, {
            **trainer, "optimizer": opt_state, "scheduler": sched.state_dict(), "rng": rngs})
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# The flags, each declared once: its argparse settings, its allowed range, and what --resume
# does with it ("fixed": it defines the run and must match the checkpoint; "applied": it may
# change and applies from the resumed step on). A fork's new flag is one more line here.

PAPER_EPOCHS = {1: 4, 2: 6}


@dataclass
class Flag:
    name: str                           # "--lr"
    low: Optional[float] = None         # values below are errors
    low_ok: bool = True                 # whether `low` itself is allowed
    below: Optional[float] = None       # values must be below this
    resume: Optional[str] = None        # "fixed", "applied" or None
    kw: dict = field(default_factory=dict)   # argparse.add_argument's keywords (help, type, default...)

    @property
    def dest(self):
        return self.name[2:].replace("-", "_")


def flag(name, low=None, low_ok=True, below=None, resume=None, **kw):
    return Flag(name, low, low_ok, below, resume, kw)


FLAGS = [
    flag("--stage", type=int, choices=[1, 2], required=True,
         help="1: bottleneck mask; 2: causal mask, from the stage-1 checkpoint"),
    flag("--model", help="base checkpoint (directory or hub id); default: the tiny demo model"),
    flag("--data", help="training set (.jsonl or LLaVA .json); default: synthetic tasks"),
    flag("--val", help="validation set; default: the synthetic val split with the demo"),
    flag("--run-dir", default=demo.DIR, help="where stage{1,2}/ checkpoints and metrics go"),
    flag("--init", help="stage 2: the stage-1 checkpoint (default RUN_DIR/stage1/final)"),
    flag("--latents", low=0, resume="fixed", type=int, default=16, help="K latent tokens (0 = Direct SFT)"),
    flag("--mask", resume="fixed", choices=masks.RULES,          # the dict: a rule added later counts
         help="attention mask, a rule of masks.RULES (default: masks.STAGE_MODES, bottleneck in "
              "stage 1, causal in stage 2)"),
    flag("--train", resume="fixed", choices=["lora", "full"], default="lora",
         help="LoRA (paper) or the whole language model; the vision encoder and merger stay "
              "frozen; what trains is masks.trainable"),
    flag("--lora-rank", low=1, resume="fixed", type=int, default=16),
    flag("--lora-alpha", low=0, low_ok=False, resume="fixed", type=float, default=32),
    flag("--lora-dropout", low=0, below=1, resume="fixed", type=float, default=0.05),
    flag("--epochs", low=0, low_ok=False, resume="fixed", type=float,
         help="default: 4 in stage 1, 6 in stage 2 (paper)"),
    flag("--lr", low=0, low_ok=False, resume="applied", type=float, default=1e-4, help="peak learning rate"),
    flag("--weight-decay", low=0, resume="applied", type=float, default=0.01),
    flag("--warmup", low=0, below=1, resume="fixed", type=float, default=0.05,
         help="fraction of steps for linear warm-up"),
    flag("--global-batch", low=1, resume="fixed", type=int, default=8,
         help="samples per optimizer step over all devices; each device packs its share into "
              "micro-batches and accumulates their gradients"),
    flag("--micro-batch-tokens", low=0, type=int,
         help="token budget of a packed micro-batch: a device's samples of a step are packed into "
              "as few sequences of at most this many tokens as fit, each sample its own segment "
              "(default: 8192 on GPU, 512 on CPU); 0: no packing, --batch-size samples per "
              "padded micro-batch"),
    flag("--batch-size", low=1, type=int, default=1,
         help="with --micro-batch-tokens 0 only: samples per padded micro-batch"),
    flag("--workers", low=0, type=int,
         help="DataLoader processes per device that decode images and build batches ahead of the "
              "step (default: up to 4 on GPU, 0 on CPU: in-process)"),
    flag("--clip", low=0, low_ok=False, resume="applied", type=float, default=1.0,
         help="gradient-norm clipping"),
    flag("--seed", resume="fixed", type=int, default=42),
    flag("--max-len", low=1, resume="fixed", type=int, default=4096, help="longest sample in tokens"),
    flag("--skip-bad", resume="fixed", action="store_true", help="skip bad records instead of failing"),
    flag("--eval-every", low=0, type=int, default=0,
         help="validate every N optimizer steps (0: at the end of each epoch)"),
    flag("--save-every", low=1, type=int, default=50, help="resumable checkpoint every N steps"),
    flag("--log-every", low=1, type=int, default=5),
    flag("--resume", action="store_true", help="continue RUN_DIR/stageN/last. What defines the run "
         "(the flags FLAGS marks fixed: --model shape, --latents, --mask, --train, LoRA, --epochs, "
         "--global-batch, --warmup, --seed, --max-len, --skip-bad) and the training records (their "
         "count and a hash of their text, answers and image file names) must match it, else the "
         "resume is refused; --lr, --weight-decay and --clip may change and are applied from the "
         "resumed step on (the new peak --lr under the same schedule), and the log says so"),
    flag("--max-steps", low=0, type=int, default=0, help="stop after N optimizer steps (debug)"),
    flag("--collective-timeout", low=0, low_ok=False, type=float, default=1800,
         help="seconds a process waits for the others in a collective before it stops with an "
              "error naming the stall (a process stopped, hung or far slower)"),
    flag("--dtype", choices=["bf16", "fp32"], help="compute dtype (default: bf16 on GPU, fp32 on CPU)"),
    flag("--activation-checkpointing", action="store_true",
         help="recompute each decoder block in backward to save memory"),
    flag("--compile", action="store_true",
         help="torch.compile each decoder layer and vision block (model.compile_blocks): fused "
              "per-token work, after a one-off compile as the run starts"),
]


def resume_flags():
    """(the fixed flags' names, the applied flags' names), as FLAGS declares them."""
    return (tuple(f.dest for f in FLAGS if f.resume == "fixed"),
            tuple(f.dest for f in FLAGS if f.resume == "applied"))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default; a default of None is resolved at run time, and its help says how."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def argument_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=demo.TRAIN_HELP,
                                formatter_class=HelpFormatter)
    for f in FLAGS:
        p.add_argument(f.name, **f.kw)
    return p


def parse_args(argv=None):
    """The flags, with the defaults this run uses: the paper's recipe, or the demo preset
    (demo.TRAIN) when no --model is given; --epochs defaults by stage (PAPER_EPOCHS)."""
    p = argument_parser()
    first = p.parse_args(argv)
    is_demo = first.model is None
    p.set_defaults(epochs=(demo.TRAIN["epochs"] if is_demo else PAPER_EPOCHS)[first.stage],
                   **({k: demo.TRAIN[k] for k in ("train", "lr", "batch_size", "save_every")} if is_demo else {}))
    return p.parse_args(argv)


def check_args(args):
    """Every numeric flag finite and in its range (RunError names the flag)."""
    for f in FLAGS:
        v = getattr(args, f.dest)
        if v is None or (f.low is None and f.below is None):
            continue
        if not math.isfinite(v):
            raise RunError(f"{f.name} {v} is not a finite number")
        if f.low is not None and (v < f.low or (v == f.low and not f.low_ok)):
            raise RunError(f"{f.name} {v}: must be {'at least' if f.low_ok else 'more than'} {f.low}")
        if f.below is not None and v >= f.below:
            raise RunError(f"{f.name} {v}: must be below {f.below}")


def main(argv=None, hooks=None):
    """Exit codes: 0 done, 2 an error (one line `error: ...` from the process that met it),
    128 + the signal's number (143 SIGTERM, 130 SIGINT) when a signal stopped the run after
    saving `last` (faults.py)."""
    faults.safe_output()          # paths and task names never reach the terminal raw
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.collective_timeout)
    faults.COLLECTIVE_TIMEOUT[0] = args.collective_timeout
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        with faults.signals(), rundir.StageClaim(args.run_dir, args.stage, args.resume, rank):
            run(args, rank, world, device, log, hooks)
    except (Exception, faults.Stopped) as e:
        code = faults.report(e, rank, world, (RunError, data.DataError, checkpoint.CheckpointError, OSError))
        if code is None:
            raise                 # a bug: its traceback
        if dist.is_initialized():
            leave(code)           # an error need not reach every rank: no barrier to meet at
        sys.exit(code)
    if dist.is_initialized():
        dist.barrier()            # rank 0 may still be writing `final`: leave together
        leave(0)


if __name__ == "__main__":
    main()
