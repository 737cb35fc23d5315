"""
The run directory and the rules of --resume. A stage writes RUN_DIR/stageN/:
    metrics.jsonl   one JSON line per step (loss, lr, grad norm) and per validation
    last/           the resumable checkpoint (the LIVR checkpoint + the trainer's state)
    best/           the best validation accuracy so far
    final/          what the stage reports (checkpoint.py has the formats)
A resumed run must define the same run as the checkpoint -- the flags that fix the model's
shape, what trains, the sample order and the schedule (train.FLAGS marks them), and the same
training records -- while the flags that may change (lr, weight decay, clipping) are applied
from the resumed step on. What a killed run logged after its last checkpoint is dropped.
"""
import hashlib
import json
import os

import torch
import torch.distributed as dist

import checkpoint
from distributed import all_sum


class RunError(Exception):
    """Bad input: a message that says what to do; train.main prints it and exits 2."""


def barrier():
    if dist.is_initialized():
        dist.barrier()


def stage_one_checkpoint(run_dir, init, rank, which="end"):
    """Where stage 2 starts: `init` (--init), else RUN_DIR/stage1/`which` -- "end", the weights
    after stage 1's last step (the default: the paper's split ablation reads as one continued
    run), or "best", its best-validation checkpoint (--from-best) -- taken back whole if a kill
    interrupted its writing."""
    init = init or os.path.join(run_dir, "stage1", which)
    if rank == 0:
        checkpoint.recover_checkpoint(init)
    barrier()
    if not os.path.exists(os.path.join(init, "livr.json")):
        raise RunError(f"stage 2 starts from a stage-1 checkpoint, and {init} has none: "
                       f"run `train.py --stage 1` first (same --run-dir) or pass --init")
    return init


def resumable(stage_dir, rank):
    """The checkpoint --resume continues, STAGE_DIR/last, after a kill mid-save: a complete
    last.tmp / last.old takes over (best/ likewise). A RunError when there is none."""
    if rank == 0:
        for name in ("last", "best"):
            checkpoint.recover_checkpoint(os.path.join(stage_dir, name))
    barrier()
    last = os.path.join(stage_dir, "last")
    if not checkpoint.is_complete(last):
        raise RunError(f"--resume: no checkpoint at {last} to resume from")
    return last


def hparams(args, mask_mode, fixed, applied):
    """The settings a checkpoint records so that --resume can compare them: the flags named in
    `fixed` (they define the run) and `applied` (they may change), and the mask the run used."""
    return {**{k: getattr(args, k) for k in (*fixed, *applied)}, "mask": mask_mode}


def check_resume(saved, now, path, log, fixed, applied):
    """Refuse a resume whose run-defining settings (`fixed`) changed; say which `applied` ones
    changed."""
    if not saved:
        return
    changed = [k for k in fixed if k in saved and saved[k] != now[k]]
    if changed:
        raise RunError(f"--resume: {path} was trained with " + ", ".join(
            f"--{k.replace('_', '-')} {saved[k]}" for k in changed) + "; this run has " + ", ".join(
            f"--{k.replace('_', '-')} {now[k]}" for k in changed) + ". These define the run "
            "(model shape, what is trained, sample order, schedule): pass the checkpoint's values, "
            "or start a new --run-dir")
    for k in applied:
        if k in saved and saved[k] != now[k]:
            log(f"resume: --{k.replace('_', '-')} changed from {saved[k]:g} to {now[k]:g}, "
                f"applied from the resumed step on")


def data_identity(records):
    """What --resume compares of the training set: the record count and a hash of each record's
    text, answer and image file names (not their folders, so a moved dataset still resumes).
    The sample order is a permutation of the records, so other records replay other samples."""
    h = hashlib.sha256()
    for r in records:
        names = [os.path.basename(i) if isinstance(i, str) else "<image>" for i in r.images]
        h.update(json.dumps([r.text, r.answer, names]).encode())
    return {"records": len(records), "sha256": h.hexdigest()}


def check_resume_data(saved, now, path, data_file):
    if saved and saved != now:
        raise RunError(f"--resume: {path} was trained on {saved['records']} record(s) with hash "
                       f"{saved['sha256'][:12]}; --data {data_file} has {now['records']} with hash "
                       f"{now['sha256'][:12]}. Resuming on other data would replay other samples: "
                       "pass the run's data, or start a new --run-dir")


def read_hparams(path):
    """The hyper-parameters recorded in path/trainer.json (None for a checkpoint without)."""
    return checkpoint.read_trainer_json(path).get("hparams")


def apply_hparams(opt, sched, args):
    """After restoring the trainer state: the (possibly new) --lr, --weight-decay on the same
    schedule. The scheduler scales base_lrs by the lambda, so the new peak takes effect at once."""
    factor = sched.lr_lambdas[0](sched.last_epoch)
    sched.base_lrs = [args.lr for _ in sched.base_lrs]
    for g in opt.param_groups:
        g["initial_lr"], g["lr"], g["weight_decay"] = args.lr, args.lr * factor, args.weight_decay
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def read_metrics(file, upto):
    """metrics.jsonl lines up to step `upto` (what a killed run logged after its checkpoint is
    dropped), tolerating a line torn by the kill."""
    kept, torn = [], 0
    if not os.path.exists(file):
        return kept, torn
    with open(file, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and isinstance(rec.get("step"), int)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                torn += 1
            elif rec["step"] <= upto:
                kept.append(json.dumps(rec) + "\n")
    return kept, torn


def keep_metrics(file, upto, log):
    """metrics.jsonl cut back to step `upto`: what a killed run logged after its checkpoint goes."""
    kept, torn = read_metrics(file, upto)
    if torn:
        log(f"resume: dropped {torn} unreadable line(s) of metrics.jsonl (torn by the kill)")
    with open(file, "w") as f:
        f.writelines(kept)


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
