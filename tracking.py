"""
Run tracking for train.py: the metrics it writes to metrics.jsonl, also sent to TensorBoard or
Weights & Biases (`--report-to`), and drawn as metrics.png at the end of each stage.

    torchrun --nproc_per_node 2 train.py --stage 1 --report-to tensorboard
    tensorboard --logdir runs/demo                   # RUN_DIR/stageN/tensorboard/
    WANDB_MODE=offline python train.py --stage 1 --report-to wandb     # RUN_DIR/stageN/wandb/

Both packages are optional (requirements-dev.txt): asking for one that is not installed stops the
run before it starts, naming the pip package. Only rank 0 logs. What is logged: per step the
loss, learning rate, gradient norm and tokens/s (train/...), the validation accuracy (val/...),
and the run's flags (TensorBoard's hparams and a text table; W&B's config). W&B takes its
project from WANDB_PROJECT (default "livr") and its mode (online/offline) from WANDB_MODE.
"""
import json
import os

import curves

BACKENDS = ("none", "tensorboard", "wandb")
HELP = ("also log loss, lr, grad norm, tokens/s, validation accuracy and the flags to TensorBoard "
        "(RUN_DIR/stageN/tensorboard) or Weights & Biases (WANDB_MODE, WANDB_PROJECT); "
        "metrics.png is drawn either way")
# metrics.jsonl key -> the scalar's name in the trackers
SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "tokens_per_s": "train/tokens_per_s", "val_acc": "val/accuracy"}


class TrackingError(RuntimeError):
    """The tracker asked for cannot run (its package is missing): a one-line message."""


def require(backend):
    """The backend's module, imported; TrackingError naming the pip package when it is missing."""
    if backend == "none":
        return None
    try:
        if backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter    # needs the tensorboard package
            return SummaryWriter
        import wandb
        return wandb
    except ImportError as e:
        raise TrackingError(f"--report-to {backend} needs the {backend} package, which is not "
                            f"installed: pip install {backend} ({e})") from None


def start(args, stage_dir, rank):
    """The stage's tracker. Every rank imports the backend (so a missing package stops all of
    them alike, before any collective); rank 0 alone logs and draws."""
    backend = getattr(args, "report_to", None) or "none"
    module = require(backend)
    if rank != 0:
        return Tracker("none", None, stage_dir, {}, draw=False)
    return Tracker(backend, module, stage_dir, vars(args))


def flat_flags(flags):
    """The flags as scalars a tracker's hparams take: numbers, strings and bools as they are,
    None and anything else as text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)
            for k, v in flags.items()}


class Tracker:
    """log(record) with each metrics.jsonl record (plus tokens_per_s), finish() at the end of a
    stage. The TensorBoard writer opens at the first record, so that a resumed run purges what
    the killed run logged after its checkpoint (purge_step = the first step logged again)."""

    def __init__(self, backend, module, stage_dir, flags, draw=True):
        self.backend, self.module, self.stage_dir, self.draw = backend, module, stage_dir, draw
        self.flags = flat_flags(flags)
        self.writer = self.run = None
        if backend == "wandb":
            run_dir = os.path.dirname(os.path.abspath(stage_dir))
            os.makedirs(stage_dir, exist_ok=True)
            self.run = module.init(project=os.environ.get("WANDB_PROJECT", "livr"), dir=stage_dir,
                                   name=f"{os.path.basename(run_dir)}/{os.path.basename(stage_dir)}",
                                   config=self.flags)

    def log(self, record):
        """One metrics.jsonl record ({"step", "loss", "lr", "grad_norm", ...} or {"step", "val_acc"})."""
        if self.backend == "none":
            return
        step = int(record["step"])
        scalars = {SCALARS[k]: float(v) for k, v in record.items()
                   if k in SCALARS and isinstance(v, (int, float))}
        if self.backend == "wandb":
            self.run.log(scalars, step=step)
            return
        if self.writer is None:
            self.writer = self.module(os.path.join(self.stage_dir, "tensorboard"), purge_step=step)
            self._write_hparams()
        for name, v in scalars.items():
            self.writer.add_scalar(name, v, step)

    def _write_hparams(self):
        """The flags in TensorBoard's HPARAMS tab (in this run's own event file, not a new run
        directory as SummaryWriter.add_hparams makes) and as a text table."""
        from torch.utils.tensorboard.summary import hparams
        for summary in hparams(self.flags, {"val/accuracy": 0.0}):
            self.writer.file_writer.add_summary(summary)
        table = "| flag | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in self.flags.items())
        self.writer.add_text("flags", table, 0)

    def on_step(self, run, record):
        """train.Hooks' step callback: each record, with the run's tokens/s on the step ones."""
        self.log({**record, "tokens_per_s": run.tokens_per_s} if "loss" in record else record)

    def finish(self):
        """Close the tracker and draw metrics.png beside metrics.jsonl (rank 0)."""
        if self.writer is not None:
            self.writer.close()
        if self.run is not None:
            self.run.finish()
        metrics = os.path.join(self.stage_dir, "metrics.jsonl")
        if self.draw and os.path.exists(metrics):
            curves.draw(metrics)
