"""
train.py's flags, each declared once: its argparse settings, its allowed range, and what --resume
does with it ("fixed": it defines the run and must match the checkpoint; "applied": it may change
and applies from the resumed step on). A fork's new flag is one more flag(...) line in FLAGS, or
one in train.Hooks(flags=[...]) when the fork lives in a file of its own: either way argparse,
the range check and --resume all see it.

    python train.py --help          # every flag with its default
"""
import argparse
import math
from dataclasses import dataclass, field
from typing import Optional

import demo
import masks
import tracking
from rundir import RunError

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
    flag("--init", help="stage 2: the checkpoint it starts from (default: RUN_DIR/stage1/end, the "
         "weights after stage 1's last step; see --from-best)"),
    flag("--from-best", action="store_true",
         help="stage 2: start from stage 1's best-validation checkpoint (RUN_DIR/stage1/best) "
              "instead of where stage 1 ended"),
    flag("--final", resume="fixed", choices=["best", "end"], default="best",
         help="what RUN_DIR/stageN/final holds: the best-validation checkpoint (the paper's "
              "single-task protocol) or the weights after the last step, stageN/end (its "
              "multi-task protocol); without --val it is end"),
    flag("--latents", low=0, resume="fixed", type=int, default=16, help="K latent tokens (0 = Direct SFT)"),
    flag("--latent-position", resume="fixed", choices=masks.LATENT_POSITIONS, default="after",
         help="where the latents go in the user turn: after the question (the paper, Q + L) or "
              "before it (L + Q, the paper's ablation: before the images too, so they cannot see "
              "them; masks.place_latents)"),
    flag("--shared-latent", resume="fixed", action="store_true",
         help="one embedding row shared by all K latent tokens (the paper's ablation)"),
    flag("--mask", resume="fixed", choices=masks.RULES,          # the dict: a rule added later counts
         help="attention mask, a rule of masks.RULES (default: masks.STAGE_MODES, bottleneck in "
              "stage 1, causal in stage 2)"),
    flag("--train", resume="fixed", choices=masks.TRAIN_MODES, default="lora",
         help="what trains besides the latent rows (masks.trainable): lora (the paper); latents "
              "(nothing else: prompt tuning); full (the language model's blocks and final norm; "
              "its embedding table and head stay frozen); full-embed (the whole language model, "
              "embedding table and head included). The vision encoder and merger never train"),
    flag("--lora-rank", low=1, resume="fixed", type=int, default=16, help="LoRA rank r"),
    flag("--lora-alpha", low=0, low_ok=False, resume="fixed", type=float, default=32,
         help="LoRA alpha (the update is scaled by alpha / r)"),
    flag("--lora-dropout", low=0, below=1, resume="fixed", type=float, default=0.05, help="LoRA dropout"),
    flag("--epochs", low=0, resume="fixed", type=float,
         help="default: 4 in stage 1, 6 in stage 2 (paper); 0 in stage 1 saves the starting "
              "weights as its end (the (0, 10) split)"),
    flag("--lr", low=0, low_ok=False, resume="applied", type=float, default=1e-4, help="peak learning rate"),
    flag("--weight-decay", low=0, resume="applied", type=float, default=0.01, help="AdamW weight decay"),
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
    flag("--seed", resume="fixed", type=int, default=42, help="initialisation, sample order and dropout"),
    flag("--max-len", low=1, resume="fixed", type=int, default=4096, help="longest sample in tokens"),
    flag("--skip-bad", resume="fixed", action="store_true", help="skip bad records instead of failing"),
    flag("--eval-every", low=0, type=int, default=0,
         help="validate every N optimizer steps (0: at the end of each epoch)"),
    flag("--save-every", low=1, type=int, default=50, help="resumable checkpoint every N steps"),
    flag("--log-every", low=1, type=int, default=5, help="print a progress line every N steps"),
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
    flag("--dry-run", action="store_true",
         help="resolve the run (mask, K, latent layout, what trains and how many parameters, "
              "epochs and steps, where stage 2 starts, what final holds), print it as JSON and "
              "exit: nothing is trained or saved"),
    flag("--dtype", choices=["bf16", "fp32"], help="compute dtype (default: bf16 on GPU, fp32 on CPU)"),
    flag("--activation-checkpointing", action="store_true",
         help="recompute each decoder block in backward to save memory"),
    flag("--attention", choices=["blocks", "flex"], default="blocks",
         help="how a packed micro-batch attends (attention.py): blocks, one SDPA call per sample; "
              "flex, one FlexAttention call per layer with a block-sparse mask from the same rule "
              "(CUDA only: torch 2.13 has no CPU backward for it). blocks on both devices until a "
              "GPU run of gpu_check.py has measured both (BENCH.md)"),
    flag("--shard-size", low=1, type=int,
         help="HSDP: shard the model within groups of this many processes (the GPUs of a node) "
              "and replicate it across the groups (default: shard over all)"),
    flag("--report-to", choices=tracking.BACKENDS, default="none", help=tracking.HELP),
    flag("--compile", action="store_true",
         help="torch.compile each decoder layer and vision block (model.compile_blocks): fused "
              "per-token work, after a one-off compile as the run starts"),
]


def resume_flags(extra=()):
    """(the fixed flags' names, the applied flags' names), as FLAGS (and a fork's `extra`) declare them."""
    table = [*FLAGS, *extra]
    return (tuple(f.dest for f in table if f.resume == "fixed"),
            tuple(f.dest for f in table if f.resume == "applied"))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default; a default of None is resolved at run time, and its help says how."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def argument_parser(extra=(), description=None):
    p = argparse.ArgumentParser(description=description, epilog=demo.TRAIN_HELP, formatter_class=HelpFormatter)
    for f in [*FLAGS, *extra]:
        p.add_argument(f.name, **f.kw)
    return p


def parse_args(argv=None, extra=(), description=None):
    """The flags (FLAGS and a fork's `extra`), with the defaults this run uses: the paper's recipe,
    or the demo preset (demo.TRAIN) when no --model is given; --epochs by stage (PAPER_EPOCHS)."""
    p = argument_parser(extra, description)
    first = p.parse_args(argv)
    is_demo = first.model is None
    p.set_defaults(epochs=(demo.TRAIN["epochs"] if is_demo else PAPER_EPOCHS)[first.stage],
                   **({k: demo.TRAIN[k] for k in ("train", "lr", "batch_size", "save_every")} if is_demo else {}))
    return p.parse_args(argv)


def check_args(args, extra=()):
    """Every numeric flag finite and in its range (RunError names the flag)."""
    for f in [*FLAGS, *extra]:
        v = getattr(args, f.dest)
        if v is None or (f.low is None and f.below is None):
            continue
        if not math.isfinite(v):
            raise RunError(f"{f.name} {v} is not a finite number")
        if f.low is not None and (v < f.low or (v == f.low and not f.low_ok)):
            raise RunError(f"{f.name} {v}: must be {'at least' if f.low_ok else 'more than'} {f.low}")
        if f.below is not None and v >= f.below:
            raise RunError(f"{f.name} {v}: must be below {f.below}")
