"""
The run directory and the rules of --resume. A stage writes RUN_DIR/stageN/:
    metrics.jsonl   one JSON line per step (loss, lr, grad norm) and per validation
    last/           the resumable checkpoint (the LIVR checkpoint + the trainer's state)
    best/           the best validation accuracy so far
    end/            the weights after the stage's last step (stage 2 starts from stage1/end)
    final/          what the stage reports: best, or end (--final end); checkpoint.py has the formats
A resumed run must define the same run as the checkpoint -- the flags that fix the model's
shape, what trains, the sample order and the schedule (flags.FLAGS marks them), and the same
training records -- while the flags that may change (lr, weight decay, clipping) are applied
from the resumed step on. What a killed run logged after its last checkpoint is dropped.

A stage directory cannot be corrupted by the runs that write it:
  - one run at a time: a run holds an exclusive lock on STAGE_DIR/.lock for its life (fcntl.flock,
    which the kernel drops when the process ends however it ends, even by kill -9, so a dead
    run's lock is simply taken over); a second run is refused, naming the holder's pid and host;
  - a run without --resume never starts over a stage that holds one (steps in metrics.jsonl, or
    a checkpoint): it says how to continue it (--resume) or start over;
  - nothing is written through a symbolic link: a stage directory that is a link, or a link
    where the stage writes (last, best, end, final, their .tmp/.old, metrics.jsonl, .lock), is refused
    by name (and checkpoint.swap_in replaces a link made meanwhile, never its target);
  - what the run trained on is true: stage 2 trains on the base stage 1 trained on (its livr.json
    names it, checked by fingerprint), and --resume continues on that same base.
Which checkpoint is good after a divergence is Checkpoints' job; at the end, a live run's state
(gathered for a save, put back for --resume).
"""
import fcntl
import hashlib
import json
import math
import os
import random
import socket

import torch
import torch.distributed as dist

import checkpoint
import checks
import faults
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
    interrupted its writing (only that one: a checkpoint named by --init may belong to another
    run, and is only read)."""
    if rank == 0 and not init:
        checkpoint.recover_checkpoint(os.path.join(run_dir, "stage1", which))
    init = init or os.path.join(run_dir, "stage1", which)
    barrier()
    if not os.path.exists(os.path.join(init, "livr.json")):
        raise RunError(f"stage 2 starts from a stage-1 checkpoint, and {init} has none: "
                       f"run `train.py --stage 1` first (same --run-dir) or pass --init")
    return init


def resumable(stage_dir, rank, base=None):
    """The checkpoint --resume continues, STAGE_DIR/last, after a kill mid-save: a complete
    last.tmp / last.old takes over (best/ likewise). A RunError when there is none, when it was
    saved by another number of processes, or (given this run's `base`) trained on another base."""
    if rank == 0:
        for name in ("last", "best"):
            checkpoint.recover_checkpoint(os.path.join(stage_dir, name))
    barrier()
    last = os.path.join(stage_dir, "last")
    if not checkpoint.is_complete(last):
        raise RunError(f"--resume: no checkpoint at {last} to resume from")
    tree = checkpoint.read_trainer_json(last, resume=True)   # none: the load names what is there
    saved, world = len(tree.get("rng", [])), dist.get_world_size() if dist.is_initialized() else 1
    if tree and saved != world:
        raise RunError(f"--resume: {last} was saved by a run of {saved} process(es) and this run "
                       f"has {world}: resume it with {saved} (torchrun --nproc_per_node {saved}); the "
                       "optimizer state is stored per process count, and each process's random state")
    if base is not None:
        meta = checkpoint.read_json(os.path.join(last, "livr.json"), "LIVR checkpoint description")
        check_same_base(meta, base, f"--resume: {last}")
    return last


def check_same_base(meta, base, what):
    """Refuse `base` unless it holds the weights `meta` (a livr.json) was trained on."""
    recorded, now = meta.get("base_fingerprint"), checkpoint.base_fingerprint(base)
    if recorded is not None and recorded != now:
        raise RunError(f"{what} was trained on the base {meta.get('base')} (fingerprint "
                       f"{checks.short_fingerprint(recorded)}), but this run's base {base} has "
                       f"fingerprint {checks.short_fingerprint(now)}: other weights. Pass the base "
                       "it was trained on (or none: a stage-2 run takes stage 1's)")


def trained_base(init, given=None):
    """Stage 2's base: the one the stage-1 checkpoint `init` was trained on, as its livr.json
    names it -- or `given` (--model) when it holds the same weights (a moved copy); a --model
    with other weights is refused, both fingerprints named."""
    source = os.path.join(init, "livr.json")
    meta = checkpoint.read_json(source, "LIVR checkpoint description")
    problems = checks.livr_problems(meta)
    if problems:
        raise checkpoint.CheckpointError(f"{source}: " + "; ".join(problems))
    if given is None:
        return checkpoint.resolve(meta["base"])
    if meta.get("base_fingerprint") is None and os.path.realpath(given) != os.path.realpath(meta["base"]):
        raise RunError(f"--model {given}: {init} was trained on {meta['base']} (its livr.json records "
                       "no fingerprint to compare): stage 2 trains on stage 1's base, drop --model")
    check_same_base(meta, given, f"--model {given}: {init}")
    return given


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
            log(f"resume: --{k.replace('_', '-')} changed from {saved[k]} to {now[k]:g}, "
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


def check_resumed_step(step, total_steps, last):
    """A resumed step past the run's end is a corrupt trainer.json, not a finished run."""
    if step > total_steps:
        raise RunError(f"--resume: {last}/trainer.json says step {step}, past this run's "
                       f"{total_steps} steps: the file is corrupt, or from another run")


def read_hparams(path):
    """The hyper-parameters recorded in path/trainer.json (None for a checkpoint without)."""
    return checkpoint.read_trainer_json(path).get("hparams")


def apply_hparams(opt, sched, args):
    """After restoring the trainer state: the (possibly new) --lr, --weight-decay on the same
    schedule. The scheduler scales base_lrs by the lambda, so the new peak takes effect at once."""
    factor = sched.lr_lambdas[0](sched.last_epoch)
    for g in opt.param_groups:            # a fork's groups scale both (train.optimizer_groups)
        lr = args.lr * g.get("lr_scale", 1.0)
        g["initial_lr"], g["lr"] = lr, lr * factor
        g["weight_decay"] = args.weight_decay * g.get("weight_decay_scale", 1.0)
    sched.base_lrs = [g["initial_lr"] for g in opt.param_groups]
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
    with open(file + ".part", "w") as f:      # whole or not at all: a kill now loses no line
        f.writelines(kept)
    os.replace(file + ".part", file)


# ----------------------------------------------------------------------------------------------
# One run per stage directory, never over another's results, never through a link

WRITTEN = [f"{n}{s}" for n in ("last", "best", "end", "final") for s in ("", ".tmp", ".old")] + [
    "metrics.jsonl", ".lock"]


class StageClaim:
    """`with StageClaim(run_dir, stage, resume, rank):` the stage directory made this run's: no
    symbolic links where it writes (check_links), the lock (lock), and without --resume no
    earlier run in it (check_fresh). Rank 0 does it; the other ranks learn the verdict and stop
    quietly when it fails (rank 0 names why). The lock is released on leaving the block, or by
    the kernel when the process ends."""

    def __init__(self, run_dir, stage, resume, rank):
        self.stage_dir = os.path.join(run_dir, f"stage{stage}")
        self.resume, self.rank, self.fd = resume, rank, None

    def __enter__(self):
        error = None
        if self.rank == 0:
            try:
                check_links(self.stage_dir)
                for d in (os.path.dirname(self.stage_dir), self.stage_dir):
                    if os.path.exists(d) and not os.path.isdir(d):
                        raise RunError(f"{d} is a file, not a directory: choose another --run-dir")
                os.makedirs(self.stage_dir, exist_ok=True)
                self.fd = lock(os.path.join(self.stage_dir, ".lock"))
                if not self.resume:
                    check_fresh(self.stage_dir)
            except (RunError, OSError) as e:
                error = e
        if dist.is_initialized():
            if all_sum(error is not None)[0] and self.rank != 0:
                raise faults.Quiet("rank 0 could not claim the stage directory")
        if error is not None:
            self.__exit__()
            raise error
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)            # closing drops the flock
            self.fd = None


def lock(file):
    """An exclusive flock on `file`, held until the returned descriptor is closed (or the process
    ends); the file then says who holds it. RunError naming the holder when another process has it."""
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise RunError(f"{file}: cannot open the run's lock file ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
        os.close(fd)
        who = f"pid {holder[0]} on host {holder[1]}" if len(holder) == 2 else "another process"
        raise RunError(f"{os.path.dirname(file)} is in use by another run ({who}, holding {file}): "
                       "wait for it to end, stop it, or pass another --run-dir") from None
    except OSError as e:            # a file system without flock: say so, and go on unlocked
        print(f"warning: {file}: cannot lock ({e.strerror}); a second run on this directory "
              "would not be stopped")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def check_links(stage_dir):
    """RunError when the stage directory, or a path in it that a run writes, is a symbolic
    link: a save through it would remove or write files outside the run directory."""
    if os.path.islink(stage_dir):
        raise RunError(f"{stage_dir} is a symbolic link (to {os.readlink(stage_dir)}): a stage "
                       "writes only inside its run directory; remove the link, or pass the "
                       "directory it points at's parent as --run-dir")
    links = [n for n in WRITTEN if os.path.islink(os.path.join(stage_dir, n))]
    if links:
        raise RunError(f"{stage_dir}: " + ", ".join(
            f"{n} is a symbolic link (to {os.readlink(os.path.join(stage_dir, n))})" for n in links)
            + ": a save would replace or remove what it points at; remove the link(s)")


def check_fresh(stage_dir):
    """RunError when the stage directory holds an earlier run (steps in metrics.jsonl, or a
    checkpoint): starting over there would truncate its log and mix checkpoints of two runs."""
    steps, _ = read_metrics(os.path.join(stage_dir, "metrics.jsonl"), math.inf)
    found = [n for n in WRITTEN[:-2] if os.path.exists(os.path.join(stage_dir, n))]
    if not steps and not found:
        return
    what = ([f"metrics.jsonl up to step {json.loads(steps[-1])['step']}"] if steps else []) + found
    raise RunError(f"{stage_dir} already holds a run ({', '.join(what)}): pass --resume to "
                   f"continue it, or start over with another --run-dir (or after removing {stage_dir})")


# ----------------------------------------------------------------------------------------------
# Which checkpoint is good after a divergence

class Checkpoints:
    """The checkpoints a stage can name as good when its loss diverges: each one's path, the
    step it holds, and whether its weights have given a loss in range since. The loss is in
    range when finite and at most RANGE x max(the stage's first loss -- metrics.jsonl's, when
    resuming -- and ln(vocab), a uniform guess); far above both, the weights are broken even if
    finite (1e30). Saves are refused (may_save) while the loss is out of range and finite (the
    weights are diverging: `last` keeps the ones from before), and when no step of this run has
    given a finite loss at all (it started from broken weights); a single skipped non-finite
    step changes no weights, and saves go on."""
    RANGE = 2.0

    def __init__(self, vocab_size, known=(), metrics=None):
        self.floor = math.log(max(vocab_size, 2))
        self.ceiling = None
        logged, _ = read_metrics(metrics, math.inf) if metrics else ([], 0)
        first = next((r["loss"] for r in map(json.loads, logged) if checks.is_number(r.get("loss"))), None)
        if first is not None:
            self.ceiling = self.RANGE * max(first, self.floor)
        self.held = {}               # path -> [step it holds, verdict: True good, False bad, None unknown]
        self.first_left = None       # (step, loss) where the loss first left its range in this run
        self.out = None              # (step, loss) where it went finite and too high, while it is
        self.steps = self.finite = 0  # losses seen in this run, finite ones among them
        for path, step in known:
            self.add(path, step)

    def step_of(self, path):
        """The step the checkpoint at `path` holds (None: none saved or known)."""
        return self.held.get(path, [None])[0]

    def add(self, path, step):
        self.held.pop(path, None)    # newest last
        self.held[path] = [step, None]

    def observe(self, step, loss):
        """The loss of optimizer step `step` (counted from 1): every checkpoint not yet judged
        holds the weights that gave it, when it is finite (a skipped step changes nothing)."""
        self.steps += 1
        ok = math.isfinite(loss)
        if ok:
            self.finite += 1
            self.ceiling = self.ceiling or self.RANGE * max(loss, self.floor)
            ok = loss <= self.ceiling
            for h in self.held.values():
                h[1] = ok if h[1] is None else h[1]
            self.out = None if ok else self.out or (step, loss)
        if not ok:
            self.first_left = self.first_left or (step, loss)

    def may_save(self):
        return self.out is None and not (self.steps and not self.finite)

    def refusal(self, name):
        if self.out is None:
            why = f"none of this run's {self.steps} step(s) has given a finite loss"
        else:
            why = (f"the loss left its range at step {self.out[0]} (loss {self.out[1]:.4g}, above "
                   f"{self.ceiling:.4g}) and has not come back")
        return f"not saving {name}: {why}. {self.note(stopping=True)}"

    def note(self, stopping=False):
        """The sentence naming the newest checkpoint not known bad (stopping: nor unjudged, as
        when only non-finite losses came after it) and where the loss left its range."""
        if not self.held:
            return "No checkpoint was saved in this stage yet."
        good = [(p, h) for p, h in self.held.items() if h[1] or (h[1] is None and not stopping)]
        if not good:
            return ("No checkpoint of this stage is known good: " + ", ".join(
                f"{p} (step {h[0]})" for p, h in self.held.items()) +
                " gave the losses out of range (non-finite or too high) since.")
        path, (step, verdict) = good[-1]
        text = f"The last checkpoint, finite, is {path}."
        if self.first_left is not None:
            text += f" It holds step {step}"
            if self.first_left[0] > step:
                text += f", from before the loss left its range at step {self.first_left[0]} (loss {self.first_left[1]:.4g})"
            text += "." if verdict else "; no finite loss has come from its weights since."
        return text


def unwritable(out_dir):
    """Why files cannot be written in `out_dir` (made if missing), or None: checked before
    hours of work whose results would go there."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        return f"--out {out_dir}: cannot write there ({e.strerror or e})"
    return None


def save_checkpoint(path, m, opt, sched, meta, trainer, rank, device=torch.device("cpu")):
    """The weights and the trainer's state gathered onto rank 0's host, and written there
    (checkpoint.save_trainer_checkpoint). Refuses, on every rank, to write non-finite weights
    or optimizer state: rank 0, which sees the gathered whole, decides for all."""
    weights, opt_state = full_state(m, opt)
    finite = rank != 0 or (checkpoint.all_finite(weights) and checkpoint.all_finite(opt_state))
    (n_bad,) = all_sum(0 if finite else 1)             # rank 0's verdict, on every rank
    if n_bad:
        raise RunError(f"not saving {path}: the weights or optimizer state are not finite")
    rng = rng_state(device)
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)       # in memory between this run's ranks, no file
    if rank == 0:
        checkpoint.save_trainer_checkpoint(path, meta, weights, {
            **trainer, "optimizer": opt_state, "scheduler": sched.state_dict(), "rng": rngs})
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# A live run's state: gathered for a save, put back for --resume

def full_state(m, opt):
    """Full (unsharded) trainable weights and optimizer state, on rank 0's host; other ranks get
    empty ones. Under FSDP each tensor is gathered on its own and moved off the device before the
    next, so a save needs one tensor's room on the GPU, not the whole state's (for a full
    fine-tune of the 3B the state is ~36 GB)."""
    if not dist.is_initialized():
        return checkpoint.trainable_state(m), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = {k for k, p in m.named_parameters() if p.requires_grad}
    sd = get_model_state_dict(m, options=opts)
    return {k: v for k, v in sd.items() if k in names}, get_optimizer_state_dict(m, opt, options=opts)


def rng_state(device):
    """This process's random state: torch CPU, CUDA (the device's generator draws the LoRA
    dropout masks on a GPU) and python's `random`."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rng, device):
    torch.set_rng_state(rng["torch"].cpu())
    random.setstate(rng["python"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


def load_trainer_state(path, m, opt, sched, rank, device=torch.device("cpu")):
    """Restore optimizer, scheduler and RNG from `path` (checkpoint.read_trainer_state). Tensors come back
    on the CPU: opt.load_state_dict / set_optimizer_state_dict move each one to its parameter's
    device (and shard it under FSDP); the step counters stay on the CPU as AdamW keeps them."""
    state = checkpoint.read_trainer_state(path)
    try:
        if dist.is_initialized():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(m, opt, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng = state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0]
        set_rng_state(rng, device)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise checkpoint.CheckpointError(f"{path}: the trainer state does not fit this run "
                              f"({type(e).__name__}: {e})") from None
    return state


def restore_weights(m, path):
    """The trainable weights of `path`, every one of them: a missing, unknown or mis-shaped
    tensor is a checkpoint.CheckpointError that names it (DTensor shapes are the full ones)."""
    file = os.path.join(path, "weights.safetensors")
    weights = checkpoint.read_safetensors(file)
    trainable = {k: p for k, p in m.named_parameters() if p.requires_grad}
    checkpoint.check_state(weights, trainable, set(trainable), file)
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        # strict=False only because the frozen weights are not in the file (checked above)
        set_model_state_dict(m, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        params = dict(m.named_parameters())
        with torch.no_grad():
            for k, v in weights.items():
                params[k].copy_(v)
