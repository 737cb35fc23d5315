"""
LIVR training: one visible loop, two stages (the paper's recipe; README, "LIVR in one page").

    python train.py --stage 1                                  # one process, built-in demo
    torchrun --nproc_per_node 2 train.py --stage 1             # FSDP2 over 2 processes
    torchrun --nproc_per_node 2 train.py --stage 2             # from the stage-1 checkpoint
    python evaluate.py                                         # scores runs/demo/stage2/final

With no --model/--data the run is the built-in demo: a tiny Qwen2.5-VL-shaped model (random
init, preset "tiny") on the synthetic tasks, all under runs/demo/. On real data:

    torchrun --nproc_per_node 1 train.py --stage 1 --model Qwen/Qwen2.5-VL-3B-Instruct \
        --data train.jsonl --val val.jsonl --run-dir runs/count
    torchrun --nproc_per_node 1 train.py --stage 2 --model Qwen/Qwen2.5-VL-3B-Instruct \
        --data train.jsonl --val val.jsonl --run-dir runs/count

Stage 1 trains under the bottleneck mask (masks.py): the answer reaches the image only through
the K latent tokens. Stage 2 starts from stage 1's checkpoint with the causal mask. The paper's
comparisons come from the same loop:
    Direct SFT      --latents 0 --mask causal --epochs 10       (one stage)
    latents only    --stage 1 --mask causal
    mask only       --latents 0 --mask answer_only
Defaults are the paper's recipe: LoRA r16/a32/p0.05 on q,k,v,o,gate,up,down + the latent rows,
AdamW lr 1e-4 wd 0.01, effective batch 8, 5% warm-up then cosine (a fresh schedule per stage),
seed 42, loss on answer tokens only (their summed cross-entropy over the global batch divided by
their count). The paper's per-device batch 1 with accumulation is --micro-batch-tokens 0; by
default each device packs its share of a step into few long sequences, one segment per sample,
which gives the same gradient in fewer, larger passes.
"""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import masks
import model as qwen

DEMO_DIR = "runs/demo"
PAPER_EPOCHS = {1: 4, 2: 6}
# The "demo" preset, the defaults of a run with no --model: the built-in demo learns from scratch
# on 2 CPU cores in minutes, so it trains the whole (tiny) language model at a higher learning
# rate, and longer in stage 2: the two tasks that compare colours across images (similarity,
# jigsaw) are learned there, through direct attention, after about 2,000 mixed steps. Everything
# else is the paper's recipe. It saves every 200 of its short steps, not 50: each save of a
# 2-process CPU run gathers the sharded state over gloo, where a rank was once seen to abort
# mid-gather (see README, "Tests"). Flags given on the command line still win.
DEMO = dict(train="full", lr=5e-4, epochs={1: 2, 2: 8}, batch_size=4, save_every=200, n_train=800)
DEMO_HELP = ("With no --model the run is the built-in demo, and these defaults differ (the demo "
             "preset, train.DEMO): --train full --lr 5e-4 --epochs 2 (stage 1) / 8 (stage 2), "
             "--batch-size 4 (used with --micro-batch-tokens 0), --save-every 200, on 800 "
             "synthetic samples per task under runs/demo/.")


def parse_args(argv=None):
    """The flags, with the defaults this run uses: the paper's recipe, or the demo preset
    (DEMO) when no --model is given; --epochs defaults by stage (PAPER_EPOCHS)."""
    p = argument_parser()
    first = p.parse_args(argv)
    demo = first.model is None
    p.set_defaults(epochs=(DEMO["epochs"] if demo else PAPER_EPOCHS)[first.stage],
                   **({k: DEMO[k] for k in ("train", "lr", "batch_size", "save_every")} if demo else {}))
    return p.parse_args(argv)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default; a default of None is resolved at run time, and its help says how."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def argument_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=DEMO_HELP,
                                formatter_class=HelpFormatter)
    p.add_argument("--stage", type=int, choices=[1, 2], required=True,
                   help="1: bottleneck mask; 2: causal mask, from the stage-1 checkpoint")
    p.add_argument("--model", help="base checkpoint (directory or hub id); default: the tiny demo model")
    p.add_argument("--data", help="training set (.jsonl or LLaVA .json); default: synthetic tasks")
    p.add_argument("--val", help="validation set; default: the synthetic val split with the demo")
    p.add_argument("--run-dir", default=DEMO_DIR, help="where stage{1,2}/ checkpoints and metrics go")
    p.add_argument("--init", help="stage 2: the stage-1 checkpoint (default RUN_DIR/stage1/final)")
    p.add_argument("--latents", type=int, default=16, help="K latent tokens (0 = Direct SFT)")
    p.add_argument("--mask", choices=list(masks.RULES),
                   help="attention mask, a rule of masks.RULES (default: masks.STAGE_MODES, "
                        "bottleneck in stage 1, causal in stage 2)")
    p.add_argument("--train", choices=["lora", "full"], default="lora",
                   help="LoRA (paper) or the whole language model; the vision encoder and merger "
                        "stay frozen; what trains is masks.trainable")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--epochs", type=float, help="default: 4 in stage 1, 6 in stage 2 (paper)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of steps for linear warm-up")
    p.add_argument("--global-batch", type=int, default=8,
                   help="samples per optimizer step over all devices; each device packs its share "
                        "into micro-batches and accumulates their gradients")
    p.add_argument("--micro-batch-tokens", type=int,
                   help="token budget of a packed micro-batch: a device's samples of a step are "
                        "packed into as few sequences of at most this many tokens as fit, each "
                        "sample its own segment (default: 8192 on GPU, 512 on CPU); 0: no "
                        "packing, --batch-size samples per padded micro-batch")
    p.add_argument("--batch-size", type=int, default=1,
                   help="with --micro-batch-tokens 0 only: samples per padded micro-batch")
    p.add_argument("--workers", type=int,
                   help="DataLoader processes per device that decode images and build batches "
                        "ahead of the step (default: up to 4 on GPU, 0 on CPU: in-process)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-len", type=int, default=4096, help="longest sample in tokens")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records instead of failing")
    p.add_argument("--eval-every", type=int, default=0,
                   help="validate every N optimizer steps (0: at the end of each epoch)")
    p.add_argument("--save-every", type=int, default=50, help="resumable checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--resume", action="store_true",
                   help="continue RUN_DIR/stageN/last. What defines the run (--model shape, "
                   "--latents, --mask, --train, LoRA, --epochs, --global-batch, --warmup, --seed, "
                   "--max-len, --skip-bad) and the training records (their count and a hash of their text, "
                   "answers and image file names) must match it, else the resume is refused; --lr, "
                   "--weight-decay and --clip may change and are applied from the resumed step on "
                   "(the new peak --lr under the same schedule), and the log says so")
    p.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (debug)")
    p.add_argument("--dtype", choices=["bf16", "fp32"],
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each decoder block in backward to save memory")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer and vision block (model.compile_blocks): "
                   "fused per-token work, after a one-off compile as the run starts")
    return p


class RunError(Exception):
    """Bad input: a message that says what to do; main() prints it and exits 2."""


# (flag, lowest allowed value, whether the lowest is allowed): a value outside is an error,
# never replaced by a default
ARG_LIMITS = [("lr", 0, False), ("epochs", 0, False), ("batch_size", 1, True),
              ("global_batch", 1, True), ("save_every", 1, True), ("log_every", 1, True),
              ("latents", 0, True), ("lora_rank", 1, True), ("lora_alpha", 0, False),
              ("lora_dropout", 0, True), ("weight_decay", 0, True), ("warmup", 0, True),
              ("clip", 0, False), ("max_len", 1, True), ("eval_every", 0, True),
              ("max_steps", 0, True)]


def check_args(args):
    """Every numeric flag finite and in range (RunError names the flag)."""
    for name, low, inclusive in ARG_LIMITS:
        v = getattr(args, name)
        if v is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(v):
            raise RunError(f"{flag} {v} is not a finite number")
        if v < low or (v == low and not inclusive):
            raise RunError(f"{flag} {v}: must be {'at least' if inclusive else 'more than'} {low}")
    for name in ("lora_dropout", "warmup"):
        if getattr(args, name) >= 1:
            raise RunError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be below 1")


# what a resumed run must share with the checkpoint: they define the model's shape, what is
# trained, the sample order and the schedule
RESUME_FIXED = ("latents", "mask", "train", "lora_rank", "lora_alpha", "lora_dropout", "epochs",
                "global_batch", "warmup", "seed", "max_len", "skip_bad")
RESUME_APPLIED = ("lr", "weight_decay", "clip")


def hparams(args, mask_mode):
    """The settings a checkpoint records so that --resume can compare them."""
    return {**{k: getattr(args, k) for k in RESUME_FIXED + RESUME_APPLIED}, "mask": mask_mode}


def check_resume(saved, now, path, log):
    """Refuse a resume whose run-defining settings changed; say which applied ones changed."""
    if not saved:
        return
    changed = [k for k in RESUME_FIXED if k in saved and saved[k] != now[k]]
    if changed:
        raise RunError(f"--resume: {path} was trained with " + ", ".join(
            f"--{k.replace('_', '-')} {saved[k]}" for k in changed) + "; this run has " + ", ".join(
            f"--{k.replace('_', '-')} {now[k]}" for k in changed) + ". These define the run "
            "(model shape, what is trained, sample order, schedule): pass the checkpoint's values, "
            "or start a new --run-dir")
    for k in RESUME_APPLIED:
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
    return read_trainer_json(path).get("hparams")


def read_trainer_json(path):
    """path/trainer.json as a dict ({} for a checkpoint without one)."""
    file = os.path.join(path, "trainer.json")
    if not os.path.exists(file):
        return {}
    try:
        return qwen.read_json(file, "trainer state")
    except qwen.CheckpointError as e:
        raise RunError(str(e)) from None


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


# ----------------------------------------------------------------------------------------------
# Distributed set-up: torchrun sets RANK/WORLD_SIZE; plain `python train.py` is one process

def setup_distributed():
    if "RANK" not in os.environ:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, dev
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":     # before the process group, so NCCL binds each rank to its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return rank, world, torch.device("cpu")


def all_sum(*xs):
    """Sum Python numbers over all processes. NCCL reduces only CUDA tensors, gloo CPU ones."""
    if not dist.is_initialized():
        return list(map(float, xs))
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(xs, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def shard_model(m, compute_dtype, device, per_block=None):
    """FSDP2, torchtitan-style: on a GPU each vision block and decoder block is its own unit,
    then the root (embeddings, tied head, latents, merger); a block's parameters are gathered for
    its forward, freed, and gathered again for its backward, so memory holds about one block's.
    CPU processes (gloo) shard the model as one unit: there every collective is a round trip
    between processes that costs more than a tiny demo block's compute (the 2-process demo step:
    87 ms per-block, 62 ms as one unit, with AdamW's foreach). per_block overrides the choice
    (tests shard per block over gloo). Parameters stay fp32 masters; compute runs in
    `compute_dtype` and gradients reduce in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    mesh = dist.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    if per_block is None:
        per_block = device.type == "cuda"
    if per_block:
        for block in [*m.visual.blocks, *m.model.layers]:
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(m, mesh=mesh, mp_policy=mp)
    return m


# ----------------------------------------------------------------------------------------------
# The built-in demo: a tiny base checkpoint and the synthetic tasks, made once

def make_demo_base(path, std=0.02, seed=0):
    """A random tiny Qwen2.5-VL in the hub's layout, with a small tokenizer of its own."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    data.build_tokenizer(tmp)
    proc = data.Processor.from_pretrained(tmp, num_latents=64)       # room for up to 64 latents
    ids = dict(image_token_id=proc.image_token_id, vision_start_token_id=proc.vision_start_token_id,
               vision_end_token_id=proc.vision_end_token_id, eos_token_id=proc.im_end_id,
               video_token_id=proc.tokenizer.token_to_id("<|video_pad|>"))
    cfg = qwen.preset("tiny", vocab_size=64 * math.ceil(proc.vocab_size / 64), **ids)
    qwen.save_pretrained(qwen.init_weights(qwen.Qwen25VL(cfg), std=std, seed=seed), tmp)
    os.replace(tmp, path)
    return path


def ensure_demo(run_dir, rank, n_train):
    base, data_dir = os.path.join(run_dir, "base"), os.path.join(run_dir, "data")
    if rank == 0 and not os.path.exists(os.path.join(base, "config.json")):
        make_demo_base(base)
    if rank == 0 and not os.path.exists(os.path.join(data_dir, "test.jsonl")):
        data.make_synthetic(data_dir, n_train=n_train, seed=42)
    if dist.is_initialized():
        dist.barrier()
    return base, os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "val.jsonl")


# ----------------------------------------------------------------------------------------------
# The loss: next-token cross-entropy on answer tokens only

def forward_batch(m, batch, mask_mode, **kw):
    """The model on a training batch under `mask_mode`, logits only where a label follows
    (`logits_at`), never as a [B, L, vocab] tensor. Returns (m's output, targets (n,), n): the
    output is the (n, vocab) logits, or a model.Output with return_hidden=True in `kw` (what an
    auxiliary loss on the latents reads). A batch from model.prepare_batch runs the per-sample
    attention blocks with everything else made on the host: nothing here waits on the device.
    Otherwise the mask is the dense [B, L, L] one."""
    if "logits_at" in batch:
        out = m(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"],
                mask=qwen.attention_blocks(batch["kinds"], mask_mode, batch["spans"]),
                position_ids=batch["position_ids"], vision_layout=batch["vision_layout"],
                logits_at=batch["logits_at"], **kw)
        return out, batch["targets"], batch["n_targets"]
    mask = masks.build_mask(batch["kinds"], mask_mode, batch["segment_ids"])   # (B, L, L)
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != -100        # position i predicts token i+1
    out = m(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"], mask=mask,
            segment_ids=batch["segment_ids"], logits_at=predicts, **kw)
    targets = labels[:, 1:][labels[:, 1:] != -100]
    return out, targets, targets.numel()


def compute_loss(m, batch, mask_mode):
    """Returns (summed cross-entropy over answer tokens, number of answer tokens). A fork's loss
    replaces this function (the loop calls train.compute_loss) and reads forward_batch's output."""
    logits, targets, n = forward_batch(m, batch, mask_mode)                     # (n, vocab)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), n


@torch.no_grad()
def val_accuracy(m, batches, mask_mode):
    """Exact-match accuracy under teacher forcing: a sample counts when the argmax at every
    answer position (answer tokens and the closing <|im_end|>) is the gold token -- the same
    verdict greedy decoding would reach, in one forward_batch per batch. Every rank runs the
    same number of forwards (FSDP needs that); padded-in repeats carry weight 0. Batches hold
    one sample per row (data.collate); the verdicts stay on the device and are read back once,
    at the end."""
    m.eval()
    pending = []                      # (wrong answer tokens per row (B,), weight (B,))
    for batch, weight in batches:
        logits, targets, _ = forward_batch(m, batch, mask_mode)                 # (n, vocab)
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
# Checkpoints: trainable weights (a LIVR checkpoint evaluate.py reads) + the trainer's state

def full_state(m, opt):
    """Full (unsharded) trainable weights and optimizer state, on rank 0's host; other ranks get
    empty ones. Under FSDP each tensor is gathered on its own and moved off the device before the
    next, so a save needs one tensor's room on the GPU, not the whole state's (for a full
    fine-tune of the 3B the state is ~36 GB)."""
    if not dist.is_initialized():
        return qwen.trainable_state(m), opt.state_dict()
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


def state_to_files(obj, tensors):
    """Split a nested state (dicts, lists, tuples, tensors, numbers, strings) into a JSON-able
    tree and {name: tensor} for safetensors: each tensor becomes {"__tensor__": name}, a tuple
    {"__tuple__": [...]}, a dict with non-string keys {"__items__": [[key, value], ...]}
    (the optimizer's state is keyed by parameter index). Tensors are moved to the CPU."""
    if torch.is_tensor(obj):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(obj, tuple):
        return {"__tuple__": [state_to_files(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [state_to_files(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: state_to_files(v, tensors) for k, v in obj.items()}
        return {"__items__": [[k, state_to_files(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state holds a {type(obj).__name__}, which has no file form")


def state_from_files(obj, tensors, source):
    """Inverse of state_to_files; a tensor name the file lacks is named."""
    if isinstance(obj, list):
        return [state_from_files(v, tensors, source) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise RunError(f"{source}: trainer.safetensors lacks tensor {obj['__tensor__']!r}")
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(state_from_files(v, tensors, source) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {k: state_from_files(v, tensors, source) for k, v in obj["__items__"]}
    return {k: state_from_files(v, tensors, source) for k, v in obj.items()}


def all_finite(state):
    """True when every floating-point tensor in a nested state is finite."""
    if torch.is_tensor(state):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return True


def save_checkpoint(path, m, opt, sched, meta, trainer, rank, device=torch.device("cpu")):
    """A LIVR checkpoint (livr.json + weights.safetensors) plus the trainer's state, pickle-free:
    trainer.json (step, best, args, hyper-parameters, scheduler, optimizer and RNG structure)
    and trainer.safetensors (the optimizer's moments and every rank's RNG state). Refuses to
    write non-finite weights or optimizer state."""
    weights, opt_state = full_state(m, opt)
    finite = rank != 0 or (all_finite(weights) and all_finite(opt_state))
    (n_bad,) = all_sum(0 if finite else 1)             # rank 0's verdict, on every rank
    if n_bad:
        raise RunError(f"not saving {path}: the weights or optimizer state are not finite")
    rng = rng_state(device)
    rngs = [None] * dist.get_world_size() if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)       # in memory between this run's ranks, no file
    if rank == 0:
        tensors = {}
        tree = state_to_files({**trainer, "optimizer": opt_state, "scheduler": sched.state_dict(),
                               "rng": rngs}, tensors)
        qwen.save_livr(None, path, meta, state=weights,
                       extra={"trainer.safetensors": tensors, "trainer.json": tree})
    if dist.is_initialized():
        dist.barrier()


def read_trainer_state(path):
    """The trainer state saved by save_checkpoint, as tensors on the CPU. Never unpickles: an
    old trainer.pt is refused."""
    if not os.path.exists(os.path.join(path, "trainer.json")):
        if os.path.exists(os.path.join(path, "trainer.pt")):
            raise RunError(f"{path}/trainer.pt is a pickle file, which could run code when loaded "
                           "and is not read: this checkpoint is from an older train.py. Start the "
                           "stage again, or pass its weights to stage 2 with --init")
        raise RunError(f"{path} has no trainer.json: not a resumable checkpoint")
    try:
        tree = qwen.read_json(os.path.join(path, "trainer.json"), "trainer state")
    except qwen.CheckpointError as e:
        raise RunError(str(e)) from None
    tensors = qwen.read_safetensors(os.path.join(path, "trainer.safetensors"))
    state = state_from_files(tree, tensors, path)
    missing = [k for k in ("step", "best", "optimizer", "scheduler", "rng") if k not in state]
    if missing:
        raise RunError(f"{path}/trainer.json: missing key {missing[0]!r}")
    return state


def load_trainer_state(path, m, opt, sched, rank, device=torch.device("cpu")):
    """Restore optimizer, scheduler and RNG from `path` (read_trainer_state). Tensors come back
    on the CPU: opt.load_state_dict / set_optimizer_state_dict move each one to its parameter's
    device (and shard it under FSDP); the step counters stay on the CPU as AdamW keeps them."""
    state = read_trainer_state(path)
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
        raise RunError(f"{path}: the trainer state does not fit this run "
                       f"({type(e).__name__}: {e})") from None
    return state


# ----------------------------------------------------------------------------------------------

def build_model(args, stage_init, base, processor, device):
    """The base model + latent rows + LoRA (or all LM weights) trainable; the rest frozen."""
    if stage_init:
        m, meta = qwen.load_livr(stage_init, device="cpu")     # complete or CheckpointError
        if m.num_latents != args.latents:
            raise RunError(f"{stage_init} has {m.num_latents} latent tokens but --latents is "
                           f"{args.latents}: pass --latents {m.num_latents}")
        if (meta.get("train") or "lora") != args.train:
            raise RunError(f"{stage_init} was trained with --train {meta.get('train')}; "
                           f"pass --train {meta.get('train')}")
    else:
        m = qwen.load_pretrained(base, device="cpu", num_latents=args.latents,
                                 latent_token_id=processor.latent_token_id)
        if args.train == "lora":
            qwen.add_lora(m, args.lora_rank, args.lora_alpha, args.lora_dropout)
    base = qwen.base_parameter_names(m)       # the rest is new: latents, LoRA, a fork's modules
    for name, p in m.named_parameters():
        p.requires_grad = masks.trainable(name, args.train, from_base=name in base)
    m.grad_checkpointing = args.activation_checkpointing
    return m.to(device)


def mixed_precision(m, compute_dtype, device):
    """One device, as FSDP's MixedPrecisionPolicy does over several: trainable parameters (and
    so AdamW's state) stay fp32 masters, frozen weights are stored in the compute dtype, and the
    forward runs in it under autocast. Stepping bf16 weights directly would lose every update
    smaller than half a bf16 ulp (lr 1e-4 on a weight of 0.02 is one ulp), so late in the
    cosine schedule training would silently stop. Returns a context-manager factory for the
    forward passes."""
    if compute_dtype == torch.float32:
        return contextlib.nullcontext
    for p in m.parameters():
        if not p.requires_grad:
            p.data = p.data.to(compute_dtype)
    return lambda: torch.autocast(device.type, dtype=compute_dtype)


def to_device(batch, device):
    """A batch made on the host -> the same dict on `device`: tensors copied without waiting
    (from pinned memory the copy overlaps compute), objects with a .to (vision.Layout) moved,
    Python ints and lists left as they are."""
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        run(args, rank, world, device, log)
    except (RunError, data.DataError, qwen.CheckpointError, OSError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        if dist.is_initialized():
            leave(2)              # an error need not reach every rank: no barrier to meet at
        sys.exit(2)
    if dist.is_initialized():
        dist.barrier()            # rank 0 may still be writing `final`: leave together
        leave(0)


def leave(code):
    """End a distributed process without tearing its process group down. Under gloo (torch
    2.13) the teardown aborts the process now and then, after everything is written: "terminate
    called without an active exception" in 4 of 30 two-process runs ending in a refused save,
    and still in 1 of 20 with a barrier first; 0 of 30 leaving like this. Nothing is lost:
    checkpoints and metrics are closed files by then, and DataLoader workers exit when their
    parent does."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------------------------
# The run: set-up steps (each a function below), then one loop

def run(args, rank, world, device, log):
    check_args(args)
    base, init, stage_dir, mask_mode = settle_run(args, rank, world, device, log)
    processor, train_records, val_records = read_data(args, base, rank)
    m = build_model(args, init, base, processor, device)
    compute_dtype, autocast = place_model(m, args, device)
    params = [p for p in m.parameters() if p.requires_grad]
    opt, sched, total_steps, steps_per_epoch = build_optimizer(args, params, len(train_records))
    meta = {"base": os.path.abspath(base), "stage": args.stage, "mask": mask_mode,
            "num_latents": args.latents, "latent_token_id": processor.latent_token_id,
            "train": args.train, "lora": None if args.train == "full" else
            {"rank": args.lora_rank, "alpha": args.lora_alpha, "dropout": args.lora_dropout}}
    data_id = data_identity(train_records)
    if args.resume:
        check_resume_data(read_trainer_json(os.path.join(stage_dir, "last")).get("data"), data_id,
                          os.path.join(stage_dir, "last"), args.data)
    step, best = start_or_resume(args, m, opt, sched, stage_dir, rank, device, log)
    train_batches, val_batches = build_loaders(args, m, processor, train_records, val_records,
                                               step, total_steps, compute_dtype, rank, world, device)
    n_params = sum(p.numel() for p in params)
    packing = (f"packed into micro-batches of <= {args.micro_batch_tokens} tokens" if args.micro_batch_tokens
               else f"micro-batches of {args.batch_size}")
    log(f"stage {args.stage} | mask {mask_mode} | K={args.latents} | train {args.train} "
        f"({n_params / 1e6:.2f}M trainable) | {len(train_records)} samples | {total_steps} steps of "
        f"{args.global_batch}, {packing} | {world} x {device.type} | lr {args.lr:g}")
    metrics = os.path.join(stage_dir, "metrics.jsonl")

    # checkpoints this run can name as finite (none is ever saved otherwise), newest last
    saved = [init] if init else []
    if args.resume:
        saved.append(os.path.join(stage_dir, "last"))

    def checkpoint(name):
        save_checkpoint(os.path.join(stage_dir, name), m, opt, sched, meta,
                        {"step": step, "best": best, "args": vars(args),
                         "hparams": hparams(args, mask_mode), "data": data_id}, rank, device)
        saved.append(os.path.join(stage_dir, name))

    def evaluate_and_keep_best():
        nonlocal best
        if val_batches is None:
            return
        with autocast():
            acc = val_accuracy(m, ((to_device(b, device), w) for b, w in val_batches), mask_mode)
        log(f"step {step} | val accuracy {100 * acc:.1f}%")
        if rank == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps({"step": step, "val_acc": acc}) + "\n")
        if acc > best:
            best = acc
            checkpoint("best")

    # the loop: one optimizer step of --global-batch samples per turn
    m.train()
    t0, tokens_seen, start_step = time.time(), 0, step
    bad_steps = 0                    # consecutive non-finite steps
    steps = iter(train_batches)      # the global batch of each step: a seeded permutation per epoch
    while step < total_steps:
        micro = next(steps)          # this rank's share of the step, as micro-batches on the host
        loss, tokens = accumulate(m, micro, mask_mode, autocast, rank, world, device)
        tokens_seen += tokens
        norm = torch.nn.utils.clip_grad_norm_(params, args.clip)
        loss, grad_norm = read_scalars(loss, norm)     # the step's one wait on the device
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
                               f"stopping. {finite_checkpoint_note(saved)} Try a lower --lr.")
        opt.zero_grad(set_to_none=True)  # a skipped step applies nothing
        sched.step()                     # the schedule and sample order go on as if stepped
        step += 1
        if rank == 0:
            rec = ({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm} if finite else
                   {"step": step, "skipped": f"loss {loss}, grad norm {grad_norm}", "lr": lr})
            with open(metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
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
            checkpoint("last")
        if stop_early:   # on the last step the stage ends normally instead, writing `final`
            log(f"stopping after --max-steps {args.max_steps}; --resume continues from step {step}")
            return
    if val_records and best < 0:
        evaluate_and_keep_best()
    # final = the best validation checkpoint (the paper reports that one), else the last
    if rank == 0:
        src = os.path.join(stage_dir, "best" if val_records else "last")
        copy_checkpoint(src, os.path.join(stage_dir, "final"))
    log(f"stage {args.stage} done: {stage_dir}/final" +
        (f" (best val accuracy {100 * best:.1f}%)" if val_records else ""))


def accumulate(m, micro, mask_mode, autocast, rank, world, device):
    """Forward and backward over this rank's micro-batches of one step, the gradient summed to
    the global token mean. Returns (the step's loss, all ranks' mean per answer token, a 0-dim
    tensor on the device; the tokens this rank computed). One collective of host numbers first:
    the global answer-token count, and every rank's micro-batch count -- FSDP needs all ranks to
    run the same number of forward/backward passes, so a rank with fewer repeats its smallest
    micro-batch with weight 0."""
    n_tokens, *counts = all_sum(sum(data.num_targets(b) for b in micro),
                                *[len(micro) if r == rank else 0 for r in range(world)])
    weights = [1.0] * len(micro) + [0.0] * (int(max(counts)) - len(micro))
    micro = [to_device(b, device) for b in micro]           # each batch copied once
    micro += [min(micro, key=lambda b: b["input_ids"].numel())] * (len(weights) - len(micro))
    loss_sum, tokens = torch.zeros((), device=device), 0
    for batch, weight in zip(micro, weights):
        with autocast():
            ce, _ = compute_loss(m, batch, mask_mode)
        # FSDP averages gradients over ranks; scale so the step sees the global token mean
        (ce * (weight * world / n_tokens)).backward()
        loss_sum += weight * ce.detach().float()
        tokens += int(weight) * batch["input_ids"].numel()
    if dist.is_initialized():
        dist.all_reduce(loss_sum)         # on the device: the loop reads it with the grad norm
    return loss_sum / n_tokens, tokens


def settle_run(args, rank, world, device, log):
    """The run's inputs and the checks that need no data: the base checkpoint (the demo's made
    once), the device-dependent defaults, the mask, the stage-1 checkpoint stage 2 starts from,
    and --resume's agreement with the checkpoint. Returns (base, init, stage_dir, mask_mode)."""
    demo = args.model is None
    if demo and device.type == "cpu":
        # the tiny model's matmuls are too small to split: extra threads only add wake-up costs
        torch.set_num_threads(1)
    if demo:
        base, train_file, val_file = ensure_demo(args.run_dir, rank, DEMO["n_train"])
        args.data, args.val = args.data or train_file, args.val or val_file
    else:
        base = qwen.resolve(args.model)
        if not args.data:
            raise RunError("--model given without --data: pass a training set (.jsonl or .json)")
    on_gpu = device.type == "cuda"
    if args.micro_batch_tokens is None:
        # a GPU wants few long sequences whose activations fit (the 3B: ~48 GB at 8192); on
        # CPU a long packed sequence costs more than the passes it saves (BENCH.md)
        args.micro_batch_tokens = 8192 if on_gpu else 512
    if args.workers is None:
        # a GPU step leaves the host's cores free for decoding; on a small CPU machine a worker
        # process only competes with the step for a core
        cpus = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        args.workers = min(4, max(1, cpus - 1)) if on_gpu else 0
    mask_mode = args.mask or masks.STAGE_MODES[args.stage]
    if args.micro_batch_tokens < 0 or args.workers < 0:
        raise RunError("--micro-batch-tokens and --workers must be >= 0")
    if args.global_batch % world:
        raise RunError(f"--global-batch {args.global_batch} is not a multiple of the "
                       f"{world} processes")
    if not args.micro_batch_tokens and args.global_batch % (args.batch_size * world):
        raise RunError(f"--global-batch {args.global_batch} is not a multiple of "
                       f"--batch-size {args.batch_size} x {world} processes")
    stage_dir = os.path.join(args.run_dir, f"stage{args.stage}")
    init = None
    if args.stage == 2:
        init = args.init or os.path.join(args.run_dir, "stage1", "final")
        if rank == 0:
            qwen.recover_checkpoint(init)       # a kill while stage 1 wrote `final`
        if dist.is_initialized():
            dist.barrier()
        if not os.path.exists(os.path.join(init, "livr.json")):
            raise RunError(f"stage 2 starts from a stage-1 checkpoint, and {init} has none: "
                           f"run `train.py --stage 1` first (same --run-dir) or pass --init")
    if args.resume:
        if rank == 0:               # a kill mid-save: a complete last.tmp / last.old takes over
            for name in ("last", "best"):
                qwen.recover_checkpoint(os.path.join(stage_dir, name))
        if dist.is_initialized():
            dist.barrier()
        if not qwen.is_complete(os.path.join(stage_dir, "last")):
            raise RunError(f"--resume: no checkpoint at {stage_dir}/last to resume from")
        saved_hparams = read_hparams(os.path.join(stage_dir, "last"))
        check_resume(saved_hparams, hparams(args, mask_mode), os.path.join(stage_dir, "last"), log)
    return base, init, stage_dir, mask_mode


def read_data(args, base, rank):
    """The processor and the records, read and checked up front (they are small); images are
    decoded lazily, batch by batch (data.py, "Streaming")."""
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


def place_model(m, args, device):
    """Shard over the processes (FSDP2) or, on one device, keep fp32 masters under autocast.
    Returns (compute dtype, a context-manager factory for the forward passes)."""
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    compute_dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    if args.compile:
        qwen.compile_blocks(m)             # before FSDP wraps the blocks, as torchtitan does
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
    state = load_trainer_state(last, m, opt, sched, rank, device)
    apply_hparams(opt, sched, args)
    _restore_weights(m, last)
    step, best = state["step"], state["best"]
    if rank == 0:   # drop what a killed run logged after its last checkpoint
        kept, torn = read_metrics(os.path.join(stage_dir, "metrics.jsonl"), step)
        if torn:
            log(f"resume: dropped {torn} unreadable line(s) of metrics.jsonl (torn by the kill)")
        with open(os.path.join(stage_dir, "metrics.jsonl"), "w") as f:
            f.writelines(kept)
    log(f"resumed {stage_dir}/last at step {step}")
    return step, best


def build_loaders(args, m, processor, train_records, val_records, step, total_steps,
                  compute_dtype, rank, world, device):
    """The input pipeline: this rank's share of each step from `step` on, packed into micro-
    batches in worker processes; validation in batches of 8, the same count on every rank.
    model.prepare_batch makes the step's positions, layouts and targets with the batch, in the
    workers, so the step itself never waits on the host. Pixels go in the compute dtype (bf16
    on a GPU: half the bytes to copy, same numbers)."""
    on_gpu = device.type == "cuda"
    prepare = functools.partial(qwen.prepare_batch, cfg=m.cfg)
    train_batches = data.loader(
        data.EncodedRecords(train_records, processor),
        data.StepSampler(len(train_records), args.global_batch, rank, world, args.seed, step, total_steps),
        data.StepBatches(processor.pad_id, args.micro_batch_tokens, args.batch_size, compute_dtype, prepare),
        args.workers, pin_memory=on_gpu)
    val_batches = data.loader(
        data.EncodedRecords(val_records, processor), data.RankShard(len(val_records), rank, world, 8),
        data.ValBatches(processor.pad_id, pixel_dtype=compute_dtype, prepare=prepare),
        args.workers, pin_memory=on_gpu) if val_records else None
    return train_batches, val_batches


MAX_BAD_STEPS = 3


def read_scalars(*xs):
    """0-dim device tensors as Python floats, in one read-back. clip_grad_norm_'s total norm is a
    DTensor under FSDP: its full (replicated) value is taken on the device first."""
    xs = [x.full_tensor() if hasattr(x, "full_tensor") else x for x in xs]
    return torch.stack([x.detach().float() for x in xs]).tolist()


def finite_checkpoint_note(saved):
    if saved:
        return f"The last checkpoint, finite, is {saved[-1]}."
    return "No checkpoint was saved in this stage yet."


def skip_message(step, loss, grad_norm, saved):
    return (f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
            f"(loss {loss}, grad norm {grad_norm}): step skipped, weights unchanged. "
            + finite_checkpoint_note(saved))


def copy_checkpoint(src, dst):
    """src's weights and livr.json (no trainer state) to dst, livr.json last, swapped in whole."""
    tmp = dst + ".tmp"
    qwen.remove_checkpoint_dir(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("trainer.*", "livr.json*"))
    qwen.write_json(qwen.read_json(os.path.join(src, "livr.json")), os.path.join(tmp, "livr.json"))
    qwen.swap_in(tmp, dst)


def _restore_weights(m, path):
    """The trainable weights of `path`, every one of them: a missing, unknown or mis-shaped
    tensor is a CheckpointError that names it (DTensor shapes are the full ones)."""
    file = os.path.join(path, "weights.safetensors")
    weights = qwen.read_safetensors(file)
    trainable = {k: p for k, p in m.named_parameters() if p.requires_grad}
    qwen.check_state(weights, trainable, set(trainable), file)
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        # strict=False only because the frozen weights are not in the file (checked above)
        set_model_state_dict(m, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        params = dict(m.named_parameters())
        with torch.no_grad():
            for k, v in weights.items():
                params[k].copy_(v)


if __name__ == "__main__":
    main()
