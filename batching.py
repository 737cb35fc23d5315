"""
Batches: encoded records -> what one training or validation step eats, made on the host.

    encode() dicts --collate--> a padded batch [B, L] (one sample per row)
                   --pack-----> packed rows, several samples each (segment_ids number them)
                   --prepare_batch--> + M-RoPE positions, the vision window layout, where the
                                      logits go: what the forward would otherwise compute in
                                      Python and read back from the device
Streaming: the records stay in memory (they are small), the pixels are decoded when a batch is
made, in DataLoader worker processes, so host memory does not grow with the dataset and the
first step starts at once. Each rank reads only its own share of every batch.

    records --StepSampler--> this rank's record indices for one optimizer step
            --EncodedRecords (in a worker)--> encode() dicts
            --StepBatches (in the worker)--> the step's micro-batches, packed, ready for the device
A record that fails to encode (an image gone, truncated or enlarged since the up-front check)
is one data.DataError naming the record (file:line) and the image, in whichever process saw it:
a worker sends it back as a faults.Fault (an exception raised there would arrive wrapped in its
traceback), and loader() raises it in the main process. Workers leave SIGINT and SIGTERM to the
main process, which decides when to stop (faults.py; ignore_stop_signals).
"""
import math
import os
import signal
import sys

import torch

import data
import faults
import masks
import model
from vision import window_layout


# ----------------------------------------------------------------------------------------------
# Padding or packing

def collate(encoded, pad_id, padding_side="right"):
    """[encode() dicts] -> batch: input_ids/labels/kinds/attention_mask/segment_ids [B, L],
    pixel_values [sum N, 1176] and image_grid_thw [sum n, 3] concatenated in sample order."""
    B, L = len(encoded), max(len(e["input_ids"]) for e in encoded)
    batch = {
        "input_ids": torch.full((B, L), pad_id, dtype=torch.long),
        "labels": torch.full((B, L), -100, dtype=torch.long),
        "kinds": torch.full((B, L), masks.TEXT, dtype=torch.long),
        "attention_mask": torch.zeros(B, L, dtype=torch.long),
        "segment_ids": torch.zeros(B, L, dtype=torch.long),     # 1 = the sample, 0 = padding
    }
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(L - n, L)  # left: for batched generation
        batch["input_ids"][i, sl] = e["input_ids"]
        batch["labels"][i, sl] = e["labels"]
        batch["kinds"][i, sl] = e["kinds"]
        batch["attention_mask"][i, sl] = 1
        batch["segment_ids"][i, sl] = 1
    batch["pixel_values"] = torch.cat([e["pixel_values"] for e in encoded])
    batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in encoded])
    return batch


def pack(encoded, max_len, pad_id=0, multiple_of=None):
    """Greedy first-fit: each sample goes into the first sequence with room, in the given order.
    Returns batches shaped like collate()'s with B=1 and L=max_len (with multiple_of: L = the
    sequence's own tokens rounded up to a multiple of it, no padding to max_len); segment_ids
    number the samples 1..n (0 = padding) so the model restarts masks and M-RoPE positions per
    sample (pad_id only fills masked positions). Labels need no care at the seams: every sample starts with an
    unlabelled <|im_start|>, so no loss ever crosses from one sample into the next."""
    bins, room = [], []
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        if n > max_len:
            raise ValueError(f"sample {i} has {n} tokens, more than the packing length {max_len}")
        j = next((j for j, r in enumerate(room) if r >= n), None)
        if j is None:
            bins.append([])
            room.append(max_len)
            j = len(bins) - 1
        bins[j].append(i)
        room[j] -= n
    batches = []
    for members, r in zip(bins, room):
        L = max_len if multiple_of is None else -(-(max_len - r) // multiple_of) * multiple_of
        packed = {k: torch.full((1, L), fill, dtype=torch.long) for k, fill in
                  [("input_ids", pad_id), ("labels", -100), ("kinds", masks.TEXT), ("attention_mask", 0),
                   ("segment_ids", 0)]}
        pos = 0
        for seg, i in enumerate(members, start=1):
            e, n = encoded[i], len(encoded[i]["input_ids"])
            for k in ("input_ids", "labels", "kinds"):
                packed[k][0, pos:pos + n] = e[k]
            packed["attention_mask"][0, pos:pos + n] = 1
            packed["segment_ids"][0, pos:pos + n] = seg
            pos += n
        packed["pixel_values"] = torch.cat([encoded[i]["pixel_values"] for i in members])
        packed["image_grid_thw"] = torch.cat([encoded[i]["image_grid_thw"] for i in members])
        packed["samples"] = members             # segment s holds encoded[members[s - 1]]
        batches.append(packed)
    return batches


def packing_efficiency(batches):
    """Fraction of computed token positions that hold real tokens (1.0 = no padding at all)."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    total = sum(b["attention_mask"].numel() for b in batches)
    return real / max(total, 1)


# ----------------------------------------------------------------------------------------------
# What the step needs, made on the host with the batch (in the data pipeline), so the training
# step only issues device work and never waits on a read-back

def segment_spans(segment_ids):
    """[(row, start, end)] of every packed sample (a run of one segment number > 0), as Python
    ints. A sample must be one contiguous run: the per-sample attention relies on it."""
    spans = []
    for b, row in enumerate(segment_ids.tolist()):
        seen, start = set(), 0
        for i in range(1, len(row) + 1):
            if i == len(row) or row[i] != row[start]:
                if row[start] != 0:
                    if row[start] in seen:
                        raise ValueError(f"row {b}: segment {row[start]} is not one contiguous run")
                    seen.add(row[start])
                    spans.append((b, start, i))
                start = i
    return spans


def prepare_batch(batch, cfg: model.Config):
    """A collate / pack batch (CPU tensors) plus what the step needs, made on the host
    (in the data pipeline) so the forward never waits on the device. Returns a new dict with:
      position_ids   (3, B, L) long   M-RoPE positions (rope_index)
      vision_layout  vision.Layout    the images' window layout (None: no images); .to(device)
      logits_at      (n,) long        flat indices into B*L of the positions whose next token
                                      is labelled (position i predicts token i+1)
      targets        (n,) long        the label each of them predicts
      n_targets      int              n, so counting answer tokens needs no sync
      spans          [(row, start, end)] Python ints: each sample's positions (attention_blocks)
    The <|image_pad|> count is checked against the images here, not in the forward."""
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.device.type != "cpu":
        raise ValueError("prepare_batch runs on the host: call it before moving the batch to the device")
    seg = batch.get("segment_ids", batch.get("attention_mask"))
    thw, pv = batch.get("image_grid_thw"), batch.get("pixel_values")
    n_image_tokens = int((ids == cfg.image_token_id).sum())
    layout = None
    if pv is not None and pv.numel():
        patches = int(thw.prod(-1).sum())
        merged = patches // cfg.vision.spatial_merge_size ** 2
        if pv.shape[0] != patches:
            raise ValueError(f"pixel_values has {pv.shape[0]} rows but image_grid_thw makes {patches} patches")
        if n_image_tokens != merged:
            raise ValueError(f"{n_image_tokens} <|image_pad|> tokens but {merged} image features")
        layout = window_layout(thw, cfg.vision)
    elif n_image_tokens:
        raise ValueError(f"{n_image_tokens} <|image_pad|> tokens but no pixel_values")
    predicts = labels[:, 1:] != -100                                     # (B, L-1)
    row, col = predicts.nonzero().unbind(1)
    return {**batch, "position_ids": model.rope_index(cfg, ids, thw, seg), "vision_layout": layout,
            "logits_at": row * ids.shape[1] + col, "targets": labels[:, 1:][predicts],
            "n_targets": int(predicts.sum()),
            "spans": segment_spans(seg if seg is not None else torch.ones_like(ids))}


def to_device(batch, device):
    """A batch made on the host -> the same dict on `device`: tensors copied without waiting
    (from pinned memory the copy overlaps compute), objects with a .to (vision.Layout) moved,
    Python ints and lists left as they are."""
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Streaming: DataLoader workers decode and batch ahead of the step

class EncodedRecords(torch.utils.data.Dataset):
    """dataset[j] = processor.encode(records[j % n]) plus "index" (j % n) and "weight": positions
    past the end (j >= n) repeat a record with weight 0, so evaluation shards can all have the same
    length (see RankShard). A record that fails to encode, or (max_len) encodes longer than
    max_len tokens, is a data.DataError naming it -- or, with keep_errors and in a worker process,
    comes back as {"index", "weight", "error": message} instead, so it costs only itself (or
    reaches the main process whole). transform: applied to each encode() dict (evaluate.py drops
    the latents with it)."""

    def __init__(self, records, processor, with_answer=True, keep_errors=False, transform=None,
                 max_len=None):
        self.records, self.processor = records, processor
        self.with_answer, self.keep_errors, self.transform = with_answer, keep_errors, transform
        self.max_len = max_len

    def __len__(self):
        return len(self.records)

    def __getitem__(self, j):
        i = j % len(self.records)
        info = {"index": i, "weight": float(j < len(self.records))}
        record = self.records[i]
        try:
            enc = self.processor.encode(record, self.with_answer)
            error = None
            if self.max_len is not None and len(enc["input_ids"]) > self.max_len:
                error = (f"{len(enc['input_ids'])} tokens, longer than --max-len {self.max_len} "
                         "(were its images replaced since the check?)")
        except data.ImageError as e:     # names the image file
            error = str(e)
        except Exception as e:           # PIL and the tokenizer raise many types
            error = f"{type(e).__name__}: {e}"
        if error is None:
            return {**(self.transform(enc) if self.transform else enc), **info}
        where = getattr(record, "where", "") or f"record {i}"
        if self.keep_errors or in_worker():
            return {**info, "error": error if self.keep_errors else f"{where}: {error}"}
        raise data.DataError([], 0, where, f"{where}: {error}")


def in_worker():
    """True in a DataLoader worker process."""
    return torch.utils.data.get_worker_info() is not None


def refused(items):
    """The first failed item's error, raised here or (in a worker) sent back as a faults.Fault;
    None when every item encoded."""
    error = next((e["error"] for e in items if "error" in e), None)
    if error is None:
        return None
    if in_worker():
        return faults.Fault(error, data.DataError)
    raise data.DataError([], 0, "", error)


class StepSampler(torch.utils.data.Sampler):
    """A batch_sampler: for each optimizer step in [start_step, total_steps), the record indices
    of this rank's share of that step's global batch. The order is one seeded permutation per
    epoch (torch.randperm, seed + epoch), so a resumed run reads exactly the samples the
    uninterrupted one would; rank r takes the r-th of `world` equal slices."""

    def __init__(self, n, global_batch, rank=0, world=1, seed=42, start_step=0, total_steps=None):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} does not split over {world} processes")
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.steps_per_epoch = n // global_batch
        self.start_step = start_step
        self.total_steps = self.steps_per_epoch if total_steps is None else total_steps

    def __len__(self):
        return max(0, self.total_steps - self.start_step)

    def __iter__(self):
        share, order, order_epoch = self.global_batch // self.world, None, None
        for step in range(self.start_step, self.total_steps):
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                order, order_epoch = torch.randperm(self.n, generator=gen), epoch
            ids = order[k * self.global_batch:(k + 1) * self.global_batch]
            yield ids[self.rank * share:(self.rank + 1) * share].tolist()


class RankShard(torch.utils.data.Sampler):
    """A batch_sampler for validation: this rank's ceil(n / world) consecutive positions of the
    dataset in batches of batch_size. The last rank's positions past n repeat records (weight 0
    in EncodedRecords), so every rank runs the same number of forwards -- FSDP needs that."""

    def __init__(self, n, rank=0, world=1, batch_size=8):
        self.per_rank = math.ceil(n / world) if n else 0
        self.first, self.batch_size = rank * self.per_rank, batch_size

    def __len__(self):
        return math.ceil(self.per_rank / self.batch_size)

    def __iter__(self):
        for i in range(0, self.per_rank, self.batch_size):
            yield list(range(self.first + i, self.first + min(i + self.batch_size, self.per_rank)))


class StepBatches:
    """collate_fn: one rank's share of a step (EncodedRecords items) -> the step's micro-batches.
      micro_batch_tokens > 0: the samples packed, longest first, into as few B=1 sequences of at
          most that many tokens as first-fit finds, each sample its own segment (so its own mask
          block and M-RoPE positions), each sequence only as long as its samples (rounded up to a
          multiple of 8); a sample longer than the budget gets a sequence of its own.
      micro_batch_tokens == 0: batch_size samples per micro-batch, padded to the longest (collate).
    Pixels are cast to pixel_dtype here: in bf16 the copy to the device moves half the bytes, and
    the model casts them to its compute dtype anyway, so the numbers are the same.
    prepare(batch) -> batch adds what the step needs made ahead of it (prepare_batch)."""

    def __init__(self, pad_id, micro_batch_tokens=0, batch_size=1, pixel_dtype=torch.float32, prepare=None):
        self.pad_id, self.micro_batch_tokens, self.batch_size = pad_id, micro_batch_tokens, batch_size
        self.pixel_dtype, self.prepare = pixel_dtype, prepare

    def __call__(self, items):
        fault = refused(items)
        if fault:
            return fault
        if self.micro_batch_tokens:
            items = sorted(items, key=lambda e: -len(e["input_ids"]))
            # a multiple of 8, so that rounding a sequence up to one never passes the budget
            budget = max(self.micro_batch_tokens // 8 * 8, len(items[0]["input_ids"]))
            batches = pack(items, budget, self.pad_id, multiple_of=8)
            for b in batches:
                del b["samples"]         # indices into the sorted list: of no use to anyone
        else:
            batches = [collate(items[i:i + self.batch_size], self.pad_id)
                       for i in range(0, len(items), self.batch_size)]
        return [self.finish(b) for b in batches]

    def finish(self, batch):
        batch["pixel_values"] = batch["pixel_values"].to(self.pixel_dtype)
        return self.prepare(batch) if self.prepare else batch


class ValBatches(StepBatches):
    """collate_fn for RankShard batches: (padded batch, weights [B]) -- weight 0 marks repeats."""

    def __call__(self, items):
        fault = refused(items)
        if fault:
            return fault
        weights = torch.tensor([e["weight"] for e in items])
        return self.finish(collate(items, self.pad_id)), weights


def num_targets(batch):
    """Answer tokens the loss is taken over, counted on the host (no device sync)."""
    if "n_targets" in batch:
        return int(batch["n_targets"])
    return int((batch["labels"] != -100).sum())


def default_workers(device, processes_per_machine=1):
    """DataLoader processes per process: on a GPU up to 4, leaving a core for the main process
    (the step leaves the host's cores free for decoding); on a CPU none, since a worker would
    only compete with the step for a core."""
    cpus = (os.cpu_count() or 1) // processes_per_machine
    return min(4, max(1, cpus - 1)) if torch.device(device).type == "cuda" else 0


def loader(dataset, batch_sampler, collate_fn, workers=0, pin_memory=False, ahead=4, on_worker_death="raise"):
    """A DataLoader over batch_sampler's batches: `workers` processes decode images and build
    batches ahead of the step, about `ahead` batches in all (each worker at least one): what a
    step's host memory is multiplied by, whatever the dataset's size. It draws its worker seeds
    from a generator of its own, never from the global RNG: training's dropout stream (restored
    exactly on --resume) must not depend on when loaders are started. A faults.Fault a worker
    sends back is raised here, as the data.DataError it carries. on_worker_death "continue"
    (evaluation): when a worker dies (killed, out of memory), say so on stderr and make the
    remaining batches in this process, so no result is lost; "raise": torch's RuntimeError."""
    return Batches(torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=workers,
        pin_memory=pin_memory, prefetch_factor=max(1, -(-ahead // workers)) if workers else None,
        persistent_workers=workers > 0, generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals if workers else None), on_worker_death == "continue")


class Batches:
    """A DataLoader whose faults.Fault items are raised as the errors they carry, and that can
    go on in-process after a worker died (loader's on_worker_death)."""

    def __init__(self, loader, go_on=False):
        self.loader, self.go_on = loader, go_on

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        it, done, go_on = iter(self.loader), 0, self.go_on and self.loader.num_workers > 0
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if not go_on or "DataLoader worker" not in str(e):
                    raise
                print(f"warning: {faults.worker_death(str(e)).split(': a process')[0]}: making the "
                      "remaining batches in this process", file=sys.stderr, flush=True)
                go_on, rest = False, list(self.loader.batch_sampler)[done:]
                it = iter(torch.utils.data.DataLoader(self.loader.dataset, batch_sampler=rest,
                                                      collate_fn=self.loader.collate_fn))
                continue
            done += 1
            if isinstance(batch, faults.Fault):
                raise batch.error()
            yield batch


def ignore_stop_signals(worker_id):
    """A worker leaves the stop to the main process, which finishes its step first: it ignores
    SIGINT (a terminal's Ctrl-C reaches every process), and on SIGTERM (a scheduler's reaches
    every process too; multiprocessing's terminate() sends one) it exits quietly with status 0 --
    a worker killed by a signal would make torch raise in the main process mid-step, and one
    that ignored SIGTERM could never be terminated."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
