"""
Speed and memory of our Qwen2.5-VL next to transformers' (the oracle): the same machine, the same
weights, the same inputs, one run. Every ratio is ours / transformers.

  1. train    one LIVR stage-1 step (forward + backward + AdamW) with LoRA r16 on q,k,v,o,gate,
              up,down plus the K=16 latent rows, under the bottleneck mask, batch 1 of 2-image
              samples (the paper's per-device batch): tokens/s, and the peak memory the step adds
              to the loaded model, activation checkpointing off and on.
  1b. step    one optimizer step of the paper's global batch of 8 BLINK-like samples (1-4 images
              of 224-672 px, half that on a CPU; 40-200 prompt tokens), same trainable set and
              mask: ours packed into as few micro-batches as --micro-batch-tokens allows
              (batching.pack + batching.prepare_batch, made on the host as the data pipeline does),
              transformers at batch 1 with accumulation 8. Samples/s, tokens/s, peak memory, and
              on a GPU the model FLOPs utilisation (train_step_mfu).
  2. vision   encoder forward, images/s at 448x448 and 896x896 (transformers with sdpa).
  3. decode   greedy decoding with a KV cache, tokens/s of the decode steps alone, batch 1 and 8,
              and batch 1 on the tiny demo model, where per-token overhead is all there is.
  4. packing  real / computed tokens, packed vs padded to the longest (no model involved).
Against the machine: the share of our training step's time spent in matrix multiplies
(torch.profiler), and our batch-1 decode speed over the memory-bandwidth bound (a copy bandwidth
measured in this run / the weight bytes every decoded token reads).

Like with like: one random checkpoint written by checkpoint.save_pretrained, loaded by both sides in
the same dtype (fp32 on CPU, bf16 on a GPU). Transformers gets the same trainable set (its
projections wrapped in our model.LoRALinear under the same seed, the latent rows written over its
embedding output by a hook), the same bottleneck mask (as a [B, 1, L, L] additive float mask, which
its mask code passes through untouched), the same AdamW and the same dropout draws: both sides'
first loss must agree, and the report shows it. Transformers computes logits at every position
and its own loss, ours only where a label follows (`logits_at`): that difference is the
implementations', and it is kept.

Each training measurement runs in a fresh interpreter (its own allocator, its own peak memory);
the two sides' workers take turns, pass by pass, and everything reports the fastest of its
passes, so a busy neighbour on a shared machine slows both sides rather than one.

    python bench.py                    # "small" preset (~120M), fp32 on CPU
    python bench.py --json > b.json    # the same; the table goes to stderr, JSON to stdout
    python bench.py --preset 3b        # 3B shapes, random weights, bf16 on a GPU; adds model
                                       # FLOPs utilisation and the largest batch that fits
    python bench.py --preset 4b        # Qwen3-VL-4B-Instruct's shapes (the paper's strongest
                                       # backbone), the same measurements, bf16 on a GPU
    python bench.py --preset tiny --quick     # seconds; what tests/test_bench.py runs
"""
import argparse
import ctypes
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn

import batching
import checkpoint
import data
import demo as demo_files
import masks
import model
import train

K = 16                         # LIVR's latent tokens
DTYPES = ("float32", "bfloat16")        # --dtype choices: torch dtype names
TARGETS = {  # the project's speed targets: (comparison, target)
    "train_speedup": (">=", 1.3), "train_mem_ratio": ("<=", 0.85), "vision_speedup": (">=", 1.15),
    "decode_speedup": (">=", 1.0), "decode_speedup_tiny": (">=", 2.0),
    "packing_efficiency": (">=", 0.95), "train_gemm_fraction": (">=", 0.85),
    "decode_roofline_fraction": (">=", 0.8), "train_step_speedup": (">=", 2.5),
}
GPU_TARGETS = {"train_step_speedup": (">=", 5.0), "train_step_mfu": (">=", 0.40)}  # one H100


def targets(r):
    return {**TARGETS, **(GPU_TARGETS if r["device"].startswith("cuda") else {})}
PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "L4": 121}  # dense


# ----------------------------------------------------------------------------------------------
# The two models, from one random checkpoint

def write_checkpoint(preset, out_dir, dtype, seed=0):
    """A random model of the preset's shape, written in the hub's layout for both loaders. "tiny"
    is the demo's model as train.py makes it: the tiny shapes with its own 512-token vocabulary."""
    if preset == "tiny":
        return demo_files.make_demo_base(out_dir)
    with torch.device("meta"):
        m = model.Qwen25VL(model.preset(preset))
    m = m.to_empty(device="cpu")          # only the weights are written, so no buffer needs filling
    m.lm_head.weight = m.model.embed_tokens.weight
    checkpoint.save_pretrained(model.init_weights(m, seed=seed).to(dtype), out_dir)
    return out_dir


def latent_id(vocab_size):
    """The first of the K latent ids: the table's last K rows (past the tokenizer's, on Qwen's
    151,936-row table; free as well in the demo's)."""
    return vocab_size - K


def load_ours(path, device, dtype):
    return checkpoint.load_pretrained(path, dtype=dtype, device=device)


def load_hf(path, device, dtype):
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cls = (transformers.Qwen3VLForConditionalGeneration if checkpoint.read_config(path).qwen3
           else transformers.Qwen2_5_VLForConditionalGeneration)
    return cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()


# ----------------------------------------------------------------------------------------------
# Inputs, shaped as data.Processor.encode makes them

def snap(px, cfg):
    """A side in pixels as the processor leaves it: a multiple of patch x merge (28 for
    Qwen2.5-VL, 32 for Qwen3-VL), rounded down, at least one merged token."""
    f = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    return max(f, px // f * f)


def random_images(sizes, g, cfg):
    """[(h, w) in pixels, snapped to multiples of 28 (Qwen3-VL: 32)] -> pixel_values
    [N, 3*2*p*p], image_grid_thw [n, 3]."""
    p = cfg.vision.patch_size
    thw = torch.tensor([(1, snap(h, cfg) // p, snap(w, cfg) // p) for h, w in sizes], dtype=torch.long).view(-1, 3)
    pv = torch.randn(int(thw.prod(-1).sum()), 3 * cfg.vision.temporal_patch_size * p * p, generator=g)
    return pv, thw


def encoded(cfg, g, image_sizes, n_text=60, n_answer=2, latents=K):
    """One sample in the chat layout, as Processor.encode returns it: text, each image in its own
    vision block, the question, the latents, the assistant turn, then n_answer answer tokens and
    <|im_end|> (n_answer=None: a prompt for generation, ending where the answer would start)."""
    t, I, Lt, a = masks.TEXT, masks.IMAGE, masks.LATENT, masks.ANSWER
    f = cfg.vision.patch_size * cfg.vision.spatial_merge_size          # pixels per merged token side
    special = min(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                  cfg.vision_end_token_id, cfg.eos_token_id)
    text = lambda n: torch.randint(0, special, (n,), generator=g)          # ordinary tokens
    # the user turn as [(ids, kind)] parts, one part per image's vision block, and the latents
    # placed by the Processor's rule (masks.place_latents)
    user = [(text(n_text // 3), t)]
    for h, w in image_sizes:
        user.append(torch.cat([torch.tensor([cfg.vision_start_token_id]),
                               torch.full(((snap(h, cfg) // f) * (snap(w, cfg) // f),), cfg.image_token_id),
                               torch.tensor([cfg.vision_end_token_id])]))
    user.append((text(n_text - n_text // 3), t))
    lat = latent_id(cfg.text.vocab_size)
    if latents:
        user = masks.place_latents(user, (torch.arange(lat, lat + latents), Lt), torch.is_tensor)
    pieces = [part if not torch.is_tensor(part) else
              (part, torch.where(part == cfg.image_token_id, I, t)) for part in user]
    pieces += [(text(5), t)]                                # <|im_end|>\n<|im_start|>assistant\n
    if n_answer is not None:
        pieces += [(text(n_answer), a),
                   (torch.tensor([cfg.eos_token_id]), a)]
    ids = torch.cat([p for p, _ in pieces])
    kinds = torch.cat([k if torch.is_tensor(k) else torch.full_like(p, k) for p, k in pieces])
    pv, thw = random_images(image_sizes, g, cfg)
    return dict(input_ids=ids, labels=torch.where(kinds == a, ids, -100), kinds=kinds,
                pixel_values=pv, image_grid_thw=thw)


def train_batches(cfg, n, px, seed=0):
    """n batches of one sample: 2 images with sides drawn from px = (lo, hi) in steps of 28,
    about 60 text tokens, K latents, a 1-3 token answer."""
    g = torch.Generator().manual_seed(seed)
    sides = list(range(px[0], px[1] + 1, 28))
    pick = lambda: sides[int(torch.randint(len(sides), (1,), generator=g))]
    return [batching.collate([encoded(cfg, g, [(pick(), pick()), (pick(), pick())], n_answer=1 + i % 3)], 0)
            for i in range(n)]


def blink_like_samples(cfg, n, px, prompt, seed=0):
    """n encoded samples with blink_like_lengths' mix: 1-4 images (1 most often), each side drawn
    from px = (lo, hi) in steps of 28, a prompt of prompt = (lo, hi) tokens, K latents and a
    1-token answer + <|im_end|>."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    n_images = torch.multinomial(torch.tensor([0.4, 0.3, 0.2, 0.1]), n, replacement=True, generator=g) + 1
    side = lambda: 28 * r(px[0] // 28, px[1] // 28)
    return [encoded(cfg, g, [(side(), side()) for _ in range(int(k))], n_text=r(*prompt), n_answer=1)
            for k in n_images]


def trim(packed, multiple=64):
    """A batching.pack row cut after its last sample, rounded up to a multiple of 64 tokens: the
    budget bounds a micro-batch, the tokens computed are the ones it holds."""
    n = int((packed["segment_ids"] > 0).sum(1).max())
    L = min(packed["input_ids"].shape[1], -(-n // multiple) * multiple)
    return {k: v[:, :L] if torch.is_tensor(v) and v.dim() == 2 and k not in ("pixel_values", "image_grid_thw")
            else v for k, v in packed.items()}


def to(batch, device):
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Timing and memory

def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def fastest(fns, device, reps, warmup=1):
    """Seconds of the fastest of reps calls of each fn, the fns taking turns (so a change in the
    machine's load lands on all of them)."""
    for f in fns:
        for _ in range(warmup):
            f()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, f in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def _status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


def memory_reset(device):
    """Start a peak-memory window; returns the baseline in MB. On a GPU: the caching allocator's
    counters. On CPU: hand free heap back to the OS (malloc_trim), then reset the kernel's
    resident-memory high-water mark (VmHWM) -- so the peak is the process's real footprint."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def memory_peak(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_mb("VmHWM")


# ----------------------------------------------------------------------------------------------
# 1. The training step, run by a worker process per side (see Worker)

def hf_trainable(ref, std):
    """Our trainable set on transformers' model: model.LoRALinear around the LM's q,k,v,o,gate,
    up,down in add_lora's order (so one seed gives both sides the same A matrices), and K latent
    rows that a forward hook writes over the embedding output wherever the ids are latent ids."""
    ref.requires_grad_(False)
    lm = ref.model.language_model
    table = lm.embed_tokens.weight                # drawn as Qwen25VL.set_latents draws them
    lat = nn.Parameter((torch.randn(K, table.shape[1], device=table.device) * std).to(table.dtype))
    for layer in lm.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in model.LORA_TARGETS:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    setattr(parent, name, model.LoRALinear(getattr(parent, name), 16, 32, 0.05))

    first = latent_id(table.shape[0])

    def latent_rows(module, inputs, out):
        idx = inputs[0] - first
        is_latent = (idx >= 0) & (idx < K)
        return torch.where(is_latent[..., None], lat[idx.clamp(0, K - 1)].to(out.dtype), out)
    lm.embed_tokens.register_forward_hook(latent_rows)
    ref.livr_latents = lat                        # registered, so .parameters() includes it
    return ref


def hf_loss(ref, b):
    """Transformers as its users train it: its own M-RoPE positions, logits and loss, the
    bottleneck mask as a 4-D additive float mask. Returns the summed loss, as ours does."""
    ids, thw = b["input_ids"], b["image_grid_thw"]
    allowed = masks.build_mask(b["kinds"], 1, b["segment_ids"])[:, None]       # (B, 1, L, L)
    mask = torch.zeros(allowed.shape, dtype=ref.dtype, device=ids.device).masked_fill(~allowed, float("-inf"))
    # with a 4-D mask its forward cannot build the positions itself, so we call its function
    pos, _ = ref.model.get_rope_index(ids, (ids == ref.config.image_token_id).int(), thw)
    out = ref(input_ids=ids, pixel_values=b["pixel_values"], image_grid_thw=thw,
              attention_mask=mask, position_ids=pos, labels=b["labels"])
    n = int((b["labels"][:, 1:] != -100).sum())
    return out.loss * n, n


def train_worker(a):
    """Build one side, warm up, then answer the parent: 'pass' times one pass over the timed
    steps; 'finish' reports peak memory (and the profile / largest batch when asked).
    a.global_batch = 0: steps of one batch-1 sample each (train_batches); else optimizer steps of
    a.global_batch BLINK-like samples: ours packed into micro-batches of at most a.micro_tokens
    tokens, transformers one sample per micro-batch, both accumulating to one AdamW step. Our
    batches are prepared on the host first (batching.prepare_batch), as the data pipeline does."""
    dev, dt = a.device, getattr(torch, a.dtype)
    cfg = checkpoint.read_config(a.path)
    ours = a.side == "ours"
    if ours:
        m = load_ours(a.path, dev, dt)
        torch.manual_seed(0)
        m.set_latents(K, latent_id(m.cfg.text.vocab_size))
        model.add_lora(m)
        for name, p in m.named_parameters():       # LIVR's trainable set (masks.trainable)
            p.requires_grad = masks.trainable(name, "lora")
        m.grad_checkpointing = a.ckpt
        m.attention_path = a.attention            # train.py --attention: blocks or flex (attention.py)
        if a.compile:
            model.compile_blocks(m)               # compiled in the warm-up steps, not timed
        loss_fn = lambda b: train.compute_loss(m, b, 1)
    else:
        m = load_hf(a.path, dev, dt)
        std = m.get_input_embeddings().weight.float().std().item()
        torch.manual_seed(0)
        hf_trainable(m, std)
        if a.ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss_fn = lambda b: hf_loss(m, b)
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    prep = (lambda b: batching.prepare_batch(b, cfg)) if ours else (lambda b: b)
    if a.global_batch:
        G = a.global_batch
        samples = blink_like_samples(cfg, G * (a.warmup + a.steps), a.step_px, a.step_prompt)
        groups = [samples[i:i + G] for i in range(0, len(samples), G)]
        split = (lambda grp: [trim(b) for b in batching.pack(grp, a.micro_tokens)]) if ours else \
            (lambda grp: [batching.collate([s], 0) for s in grp])
        t0 = time.perf_counter()
        steps = [[prep(b) for b in split(grp)] for grp in groups]
        host_s = (time.perf_counter() - t0) / len(groups)
        steps = [[to(b, dev) for b in micro] for micro in steps]
        # answer tokens per step, counted on the host (each sample's first token is unlabelled)
        counts = [sum(int((s["labels"] != -100).sum()) for s in grp) for grp in groups]
        real = [sum(len(s["input_ids"]) for s in grp) for grp in groups]
    else:
        raw = train_batches(cfg, a.warmup + a.steps, a.px)
        steps = [[to(prep(b), dev)] for b in raw]
        counts = [int((b["labels"] != -100).sum()) for b in raw]
        real = [b["input_ids"].numel() for b in raw]
        host_s = 0.0

    def step(micro, n):
        total = 0.0
        for b in micro:
            loss, _ = loss_fn(b)
            (loss / n).backward()
            total = total + loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(total) / n                   # one read-back per optimizer step

    @torch.no_grad()
    def check_loss(micro, n):                     # dropout off: both sides must agree
        m.eval()
        total = sum(float(loss_fn(b)[0]) for b in micro)
        m.train()
        return total / n

    loss_nodrop = check_loss(steps[0], counts[0]) if a.global_batch else None
    torch.manual_seed(1)                          # the same LoRA dropout draws on both sides
    base = memory_reset(dev)
    loss0 = step(steps[0], counts[0])
    for i in range(1, a.warmup):
        step(steps[i], counts[i])
    timed = list(zip(steps, counts))[a.warmup:]
    reply(dict(loss0=loss0, loss_no_dropout=loss_nodrop, tokens=sum(real[a.warmup:]),
               samples=(a.global_batch or 1) * a.steps, micro_batches=sum(len(x) for x, _ in timed),
               host_prepare_s=host_s, trainable=sum(p.numel() for p in params)))
    while sys.stdin.readline().strip() == "pass":
        sync(dev)
        t0 = time.perf_counter()
        for micro, n in timed:
            step(micro, n)
        sync(dev)
        seconds = time.perf_counter() - t0
        if str(dev).startswith("cuda"):
            torch.cuda.empty_cache()              # both sides share the GPU: free the cache between turns
        reply(dict(seconds=seconds))
    peak = memory_peak(dev)
    out = dict(step_mb=peak - base, peak_mb=peak)
    if a.profile:
        out.update(gemm_profile(lambda: step(*timed[-1]), dev))
    if a.max_batch:
        one = raw[-1]
        out.update(max_batch=max_batch(
            lambda B: step([to(prep({k: v.repeat(B, 1) for k, v in one.items()}), dev)], B * counts[-1])))
    reply(out)


def reply(d):
    print("@@" + json.dumps(d), flush=True)


class Worker:
    """One side of a training measurement in a fresh interpreter, driven line by line."""

    def __init__(self, args, **kw):
        a = dict(preset=args.preset, device=args.device, dtype=args.dtype, steps=args.steps,
                 warmup=args.warmup, px=args.px, threads=args.threads, global_batch=0,
                 micro_tokens=args.micro_batch_tokens, step_px=args.step_px, step_prompt=args.step_prompt,
                 compile=args.compile, attention=args.attention)
        a.update(kw)
        self.err = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(a)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)

    def ask(self, cmd=None):
        if cmd:
            self.p.stdin.write(cmd + "\n")
            self.p.stdin.flush()
        while line := self.p.stdout.readline():
            if line.startswith("@@"):
                return json.loads(line[2:])
        self.p.wait()
        self.err.seek(0)
        raise RuntimeError(f"bench worker failed:\n{self.err.read()[-4000:]}")

    def finish(self):
        out = self.ask("finish")
        self.p.wait()
        return out


def take_turns(workers, rounds):
    """Each side's warm-up report, then `rounds` turns of one timed pass per side: returns
    (reports, fastest pass in seconds) by side. Turns, so a change in machine load hits both."""
    reports = {side: w.ask() for side, w in workers.items()}
    best = {side: float("inf") for side in workers}
    for _ in range(rounds):
        for side, w in workers.items():
            best[side] = min(best[side], w.ask("pass")["seconds"])
    return reports, best


def bench_train(args, path):
    """Both sides' workers start together; then they take turns, one pass each, args.rounds times."""
    res = {}
    for ckpt in (False, True):
        w = {side: Worker(args, path=path, side=side, ckpt=ckpt, profile=side == "ours" and not ckpt,
                          max_batch=False) for side in ("ours", "hf")}
        r, best = take_turns(w, args.rounds)
        for side in w:
            r[side].update(w[side].finish(), tokens_per_s=r[side]["tokens"] / best[side],
                           step_s=best[side] / args.steps)
            res[side + ("_ckpt" if ckpt else "")] = r[side]
        log(f"  checkpointing {'on' if ckpt else 'off'}: "
            f"{r['ours']['tokens_per_s']:.0f} vs {r['hf']['tokens_per_s']:.0f} tokens/s, "
            f"+{r['ours']['step_mb']:.0f} vs +{r['hf']['step_mb']:.0f} MB, "
            f"first loss {r['ours']['loss0']:.6f} vs {r['hf']['loss0']:.6f}")
    if args.device.startswith("cuda"):           # alone on the device: the largest batch that fits
        w = Worker(args, path=path, side="ours", ckpt=True, profile=False, max_batch=True)
        w.ask()
        res["max_batch_ckpt"] = w.finish()["max_batch"]
    return res


def bench_train_step(args, path, cfg):
    """One optimizer step of the paper's global batch (BLINK-like samples, stage-1 mask, LoRA +
    latents): ours packed into micro-batches of --micro-batch-tokens, transformers at batch 1
    with accumulation. Same turn-taking as bench_train."""
    w = {side: Worker(args, path=path, side=side, ckpt=False, profile=side == "ours", max_batch=False,
                      global_batch=args.global_batch, steps=args.step_steps, warmup=args.step_warmup)
         for side in ("ours", "hf")}
    r, best = take_turns(w, args.step_rounds)
    for side in w:
        x = r[side]
        x.update(w[side].finish(), samples_per_s=x["samples"] / best[side],
                 tokens_per_s=x["tokens"] / best[side], step_s=best[side] / args.step_steps)
    # model FLOPs per step, the same for both sides: each sample on its own (train_flops)
    samples = blink_like_samples(cfg, args.global_batch * (args.step_warmup + args.step_steps),
                                 args.step_px, args.step_prompt)[args.global_batch * args.step_warmup:]
    r["flops_per_step"] = sum(train_flops(cfg, batching.collate([s], 0)) for s in samples) / args.step_steps
    o, h = r["ours"], r["hf"]
    log(f"  global batch {args.global_batch}: {o['samples_per_s']:.2f} vs {h['samples_per_s']:.2f} samples/s "
        f"({o['tokens_per_s']:.0f} vs {h['tokens_per_s']:.0f} tokens/s; ours in "
        f"{o['micro_batches'] / args.step_steps:.1f} micro-batches, transformers in {args.global_batch}), "
        f"+{o['step_mb']:.0f} vs +{h['step_mb']:.0f} MB, loss without dropout "
        f"{o['loss_no_dropout']:.6f} vs {h['loss_no_dropout']:.6f}")
    return r


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_scaled_mm"}


def gemm_profile(step, device, reps=3):
    """Share of the step's self time (CPU, or the GPU's on a GPU) in matrix multiplies, and the
    top ops by self time: the evidence for what bounds the step. Attention kernels (SDPA: blocked
    QK^T and PV products with an online softmax) are counted apart. The profiler times each op by
    the clock, so of reps profiled steps the least disturbed (smallest total) is kept."""
    from torch.profiler import ProfilerActivity, profile
    cuda = str(device).startswith("cuda")
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    best = None
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step()
            sync(device)
        # CPU-side ops only: on a GPU each kernel's time is already charged to the op that launched it
        ev = [(e.key, getattr(e, attr), e.count) for e in prof.key_averages()
              if e.device_type == torch.autograd.DeviceType.CPU and getattr(e, attr) > 0]
        if best is None or sum(t for _, t, _ in ev) < sum(t for _, t, _ in best):
            best = ev
    ev, total = best, sum(t for _, t, _ in best)
    share = lambda pred: sum(t for k, t, _ in ev if pred(k)) / total
    return dict(gemm_fraction=share(lambda k: k in GEMM_OPS),
                attention_fraction=share(lambda k: "scaled_dot_product" in k),
                top_ops=[(k, round(t / total, 4), n) for k, t, n in sorted(ev, key=lambda e: -e[1])[:12]])


def max_batch(step_of):
    """Largest batch (copies of one sample, doubling) whose training step fits in GPU memory;
    step_of(B) runs the step on B copies."""
    B, best = 1, 0
    while B <= 1024:
        try:
            step_of(B)
            best, B = B, 2 * B
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


def train_flops(cfg, b):
    """Model FLOPs of one LoRA step: vision forward; LM forward and the backward's input
    gradients (frozen weights get no weight gradient, the rank-16 factors are negligible), all as
    2 x parameters x tokens; attention scores counted in full (an explicit mask skips nothing)."""
    t, v = cfg.text, cfg.vision
    T, P = b["input_ids"].numel(), b["pixel_values"].shape[0]
    lm = t.num_hidden_layers * (t.hidden_size * (2 * t.hidden_size + 2 * t.num_key_value_heads * t.head_dim)
                                + 3 * t.hidden_size * t.intermediate_size)
    mlp = 2 if v.qwen3 else 3                                                # Qwen3-VL's vision MLP has no gate
    vis = v.depth * (4 * v.hidden_size ** 2 + mlp * v.hidden_size * v.intermediate_size)
    attn = 4 * T * T * t.hidden_size * t.num_hidden_layers                  # QK^T and PV, forward
    return 2 * vis * P + 4 * lm * T + 3 * attn


# ----------------------------------------------------------------------------------------------
# 2. The vision encoder

@torch.no_grad()
def bench_vision(ours, ref, args, cfg):
    g = torch.Generator().manual_seed(0)
    res = {}
    for px, n in zip(args.vision_px, args.vision_n):
        pv, thw = random_images([(px, px)] * n, g, cfg)
        pv, thw = pv.to(args.device, getattr(torch, args.dtype)), thw.to(args.device)
        t_ours, t_hf = fastest([lambda: ours.visual(pv, thw),
                                lambda: ref.model.get_image_features(pv, thw)], args.device, args.reps)
        res[px] = dict(ours=n / t_ours, hf=n / t_hf, speedup=t_hf / t_ours, images=n)
        log(f"  {px}x{px}: {n / t_ours:.2f} vs {n / t_hf:.2f} images/s")
    return res


# ----------------------------------------------------------------------------------------------
# 3. Greedy decoding with a KV cache

def prompts(cfg, batch, px, seed=0):
    """batch prompts of one length (no padding), each with its own image and ~40 text tokens."""
    g = torch.Generator().manual_seed(seed)
    ss = [encoded(cfg, g, [(px, px)], n_text=40, n_answer=None, latents=0) for _ in range(batch)]
    return (torch.stack([s["input_ids"] for s in ss]), torch.cat([s["pixel_values"] for s in ss]),
            torch.cat([s["image_grid_thw"] for s in ss]))


@torch.no_grad()
def bench_decode(ours, ref, args, cfg, batches, bandwidth=False):
    """Decode tokens/s = B * n / (time of n+1 new tokens - time of 1): both include the same
    prefill, so what is left is n decode steps. bandwidth=True also times a 256 MB copy, in turns
    with batch 1's decoding, for the roofline (res["copy_gbs"])."""
    res = {}
    if bandwidth:
        src = torch.ones(256 * 2**20 // 4, device=args.device)
        dst = torch.empty_like(src)
    for B in batches:
        ids, pv, thw = (t.to(args.device) for t in prompts(cfg, B, args.decode_px))
        pv, am, mm = pv.to(getattr(torch, args.dtype)), torch.ones_like(ids), (ids == cfg.image_token_id).int()
        gen_ours = lambda n: ours.generate(ids, pv, thw, attention_mask=am, max_new_tokens=n, eos_token_id=-1)
        gen_hf = lambda n: ref.generate(input_ids=ids, attention_mask=am, pixel_values=pv, image_grid_thw=thw,
                                        mm_token_type_ids=mm, max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
        n = args.decode_tokens
        agree = (gen_ours(n).cpu() == gen_hf(n).cpu()).float().mean().item()
        copy = [lambda: dst.copy_(src)] * (5 if bandwidth and B == 1 else 0)
        t = fastest([lambda: gen_ours(1), lambda: gen_ours(n + 1), lambda: gen_hf(1), lambda: gen_hf(n + 1)]
                    + copy, args.device, args.reps)
        r_ours, r_hf = B * n / (t[1] - t[0]), B * n / (t[3] - t[2])
        if copy:            # read + write, as STREAM's Copy counts
            res["copy_gbs"] = 2 * src.numel() * src.element_size() / min(t[4:]) / 1e9
        res[B] = dict(ours=r_ours, hf=r_hf, speedup=r_ours / r_hf, tokens_agree=agree)
        log(f"  batch {B}: {r_ours:.1f} vs {r_hf:.1f} tokens/s (same greedy tokens: {agree:.0%})")
    return res


def decode_weight_bytes(m):
    """Bytes every decoded token must read: the decoder layers, the final norm and the lm_head
    matrix (tied or not, the embedding lookup itself reads only one row)."""
    ps = list(m.model.layers.parameters()) + list(m.model.norm.parameters()) + [m.lm_head.weight]
    return sum(p.numel() * p.element_size() for p in ps)


# ----------------------------------------------------------------------------------------------
# 4. Packing: only sequence lengths matter, so no pixels are decoded

def length_only(n_tokens):
    """An encode()-shaped record of n_tokens real tokens and no pixels, for batching.pack/collate."""
    z = torch.zeros(n_tokens, dtype=torch.long)
    return dict(input_ids=z, labels=z - 100, kinds=z, pixel_values=torch.zeros(0, 1176),
                image_grid_thw=torch.zeros(0, 3, dtype=torch.long))


def blink_like_lengths(n, seed=0):
    """BLINK-style samples: 1-4 images (1 most often), each 224-672 px a side (64-576 image
    tokens), a 40-200 token prompt with its choices, K latents, a 1-token answer + <|im_end|>."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    n_images = torch.multinomial(torch.tensor([0.4, 0.3, 0.2, 0.1]), n, replacement=True, generator=g) + 1
    return [sum((r(8, 24) * r(8, 24)) + 2 for _ in range(int(k))) + r(40, 200) + K + 2 for k in n_images]


def efficiency(lengths, batch_size, max_len):
    recs = [length_only(n) for n in lengths]
    padded = [batching.collate(recs[i:i + batch_size], 0) for i in range(0, len(recs), batch_size)]
    return dict(packed=batching.packing_efficiency(batching.pack(recs, max_len)),
                padded=batching.packing_efficiency(padded), samples=len(lengths), max_len=max_len,
                batch_size=batch_size, mean_len=sum(lengths) / len(lengths), max_sample=max(lengths))


def bench_packing(args, demo, tmp):
    """The synthetic multi-task mix (demo.make_synthetic, tokenized by the demo's tokenizer) in
    its training order, and a BLINK-like length distribution; pad-to-longest in batches of 8."""
    proc = data.Processor.from_pretrained(demo, num_latents=K)
    paths = demo_files.make_synthetic(os.path.join(tmp, "synth"), n_train=args.pack_n // 4, n_val=1, n_test=1)
    synth = [proc.num_tokens(r) for r in data.load_dataset(paths["train"])]
    blink = blink_like_lengths(args.pack_n)
    return {"synthetic": efficiency(synth, 8, args.pack_len[0]),
            "blink_like": efficiency(blink, 8, args.pack_len[1])}


# ----------------------------------------------------------------------------------------------
# Report

def machine(device):
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def met(key, value, r):
    op, x = targets(r)[key]
    return value <= x if op == "<=" else value >= x


def table(r):
    """The Markdown report of whatever sections ran (--only)."""
    rows, out, extra = [], [], []
    tr, ts, G = r.get("train"), r.get("train_step"), r["global_batch"]
    if tr:
        pair = lambda a, b, key: (tr[a][key], tr[b][key])
        rows += [("train step, tokens/s", *pair("ours", "hf", "tokens_per_s")),
                 ("train step, tokens/s (act. ckpt)", *pair("ours_ckpt", "hf_ckpt", "tokens_per_s")),
                 ("train step, peak MB added", *pair("ours", "hf", "step_mb")),
                 ("train step, peak MB added (act. ckpt)", *pair("ours_ckpt", "hf_ckpt", "step_mb"))]
    if ts:
        rows += [(f"optimizer step of {G} BLINK-like samples (ours packed), {name}", ts["ours"][key],
                  ts["hf"][key]) for name, key in (("samples/s", "samples_per_s"),
                                                   ("tokens/s", "tokens_per_s"), ("peak MB added", "step_mb"))]
    rows += [(f"vision {px}x{px}, images/s", x["ours"], x["hf"]) for px, x in r.get("vision", {}).items()]
    rows += [(f"decode batch {b}, tokens/s", x["ours"], x["hf"]) for b, x in r.get("decode", {}).items()]
    if "decode_tiny" in r:
        rows += [("decode batch 1, tiny demo model, tokens/s", r["decode_tiny"]["ours"], r["decode_tiny"]["hf"])]
    out = [f"{r['preset']} preset, {r['dtype']}, {r['device']}: {r['machine']}; torch {r['torch']}, "
           f"transformers {r['transformers']}, {r['threads']} threads; load average "
           f"{r['load_average_start'][0]:.1f} at the start, {r['load_average_end'][0]:.1f} at the end",
           "", "| measure | ours | transformers | ours / transformers |", "|---|---:|---:|---:|"]
    out += [f"| {n} | {a:.3g} | {b:.3g} | {a / b:.2f} |" for n, a, b in rows]
    out += [f"| real / computed tokens, {k.replace('_', '-')} lengths: packed into {v['max_len']} "
            f"vs padded in batches of {v['batch_size']} | {v['packed']:.3f} | {v['padded']:.3f} | |"
            for k, v in r.get("packing", {}).items()]
    out += ["", "| key | value | target | met |", "|---|---:|---:|:---:|"]
    out += [f"| {k} | {r[k]:.3f} | {op} {x} | {'yes' if met(k, r[k], r) else 'NO'} |"
            for k, (op, x) in targets(r).items() if k in r]
    if tr:
        extra += [f"train_mem_ratio with activation checkpointing: {r['train_mem_ratio_ckpt']:.3f}",
                  f"first training loss, ours vs transformers: {tr['ours']['loss0']:.6f} vs "
                  f"{tr['hf']['loss0']:.6f}",
                  f"matrix multiplies {r['train_gemm_fraction']:.0%} + attention kernels "
                  f"{tr['ours']['attention_fraction']:.0%} of our step; top ops: "
                  + ", ".join(f"{k} {s:.0%}" for k, s, _ in tr["ours"]["top_ops"][:6])]
    if "copy_bandwidth_gbs" in r:
        extra.append(f"decode bound: {r['copy_bandwidth_gbs']:.1f} GB/s copy / "
                     f"{r['decode_weight_bytes'] / 1e6:.0f} MB of weights = "
                     f"{r['decode_bound_tokens_per_s']:.1f} tokens/s")
    if ts:
        o, h = ts["ours"], ts["hf"]
        extra.append(f"optimizer step of {G}: ours in {o['micro_batches'] / o['samples'] * G:.1f} packed "
                     f"micro-batches of <= {r['micro_batch_tokens']} tokens ({o['host_prepare_s'] * 1e3:.0f} ms "
                     f"on the host to pack and prepare, off the step), transformers in {G} of batch 1; loss "
                     f"with dropout off {o['loss_no_dropout']:.6f} vs {h['loss_no_dropout']:.6f}"
                     + ("; our blocks compiled (--compile)" if r.get("compiled") else "")
                     + ("; our attention one FlexAttention call a layer (--attention flex)"
                        if r.get("attention") == "flex" else ""))
        extra.append(f"our optimizer step: matrix multiplies {o['gemm_fraction']:.0%} + attention kernels "
                     f"{o['attention_fraction']:.0%}; top ops: "
                     + ", ".join(f"{k} {s:.0%}" for k, s, _ in o["top_ops"][:8]))
    if "mfu" in r:
        extra.append(f"model FLOPs utilisation (ours, batch 1): {r['mfu']:.1%}; "
                     f"largest batch that fits (act. ckpt): {tr['max_batch_ckpt']}")
    if "train_step_mfu" in r:
        extra.append(f"model FLOPs utilisation, optimizer step of {G}: ours {r['train_step_mfu']:.1%}, "
                     f"transformers {r['train_step_mfu_hf']:.1%} ({ts['flops_per_step'] / 1e12:.1f} TFLOP a step)")
    return "\n".join(out + [""] + extra)


SECTIONS = ("train", "train_step", "vision", "decode", "packing")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small", "3b", "4b"],
                   help="model shapes (model.preset); tiny = the demo's model, with its own vocabulary; "
                        "4b = Qwen3-VL-4B-Instruct's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    p.add_argument("--quick", action="store_true", help="toy sizes: checks that it runs, nothing more")
    p.add_argument("--global-batch", type=int, default=8, help="samples per optimizer step (the paper's 8)")
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="token budget of our packed micro-batches in the global-batch step (default: "
                        "4096 on a GPU, where the 3B's activations take ~6 MB a token; 8192 on CPU)")
    p.add_argument("--only", default=",".join(SECTIONS), metavar="SECTIONS",
                   help="comma-separated subset of the sections to run (default: all): %(default)s")
    p.add_argument("--compile", action="store_true",
                   help="our side with its blocks compiled (model.compile_blocks, train.py --compile); "
                        "the compile runs in the untimed warm-up steps")
    p.add_argument("--attention", default="blocks", choices=["blocks", "flex"],
                   help="our attention path, as train.py --attention: per-sample SDPA blocks, or one "
                        "block-sparse FlexAttention call per layer (attention.py; CUDA only: no CPU backward). "
                        "blocks stays the default on GPU until `python gpu_check.py` has measured both")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="keep the preset's random checkpoint in DIR and reuse it when it is there (the "
                        "same --preset and --dtype), e.g. across --compile and --attention runs "
                        "(gpu_check.py); default: a temporary one")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    only = set(args.only.split(",")) - {""}
    if only - set(SECTIONS):
        p.error(f"--only: unknown section(s) {sorted(only - set(SECTIONS))}; choose from {SECTIONS}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:                                       # a Worker's subprocess
        return train_worker(argparse.Namespace(**json.loads(args.worker)))
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.attention == "flex" and not args.device.startswith("cuda"):
        p.error("--attention flex needs a CUDA device: FlexAttention has no backward on CPU (torch 2.13)")
    q = args.quick                    # sizes: the real ones, or toys for the smoke test
    args.steps, args.warmup, args.rounds, args.reps = (1, 1, 1, 3) if q else (3, 1, 3, 3)
    args.px = (56, 112) if q else (224, 448)
    args.vision_px, args.vision_n = ([56, 112], [2, 1]) if q else ([448, 896], [2, 1])
    args.decode_px, args.decode_tokens = (56, 16) if q else (224, 32)
    args.pack_n, args.pack_len = (16, (512, 4096)) if q else (1024, (1024, 4096))
    # the global-batch step: BLINK-like prompts and 1-4 images of 224-672 px; on a CPU, images of
    # half the side and one timed pass, or transformers' side alone would take minutes a step
    gpu = args.device.startswith("cuda")
    args.micro_batch_tokens = args.micro_batch_tokens or (4096 if gpu else 8192)
    args.step_px = (56, 84) if q else (224, 672) if gpu else (112, 336)
    args.step_prompt = (10, 30) if q else (40, 200)
    args.step_steps, args.step_warmup, args.step_rounds = (2, 1, 2) if gpu and not q else (1, 0, 1)

    r = dict(preset=args.preset, device=args.device, dtype=args.dtype, machine=machine(args.device),
             torch=torch.__version__, transformers=__import__("transformers").__version__,
             threads=torch.get_num_threads(), load_average_start=os.getloadavg(),
             global_batch=args.global_batch, micro_batch_tokens=args.micro_batch_tokens,
             compiled=args.compile, attention=args.attention)
    log(f"{r['preset']} preset, {r['dtype']}, {r['device']}: {r['machine']}, {r['threads']} threads")
    if args.device == "cpu" and r["load_average_start"][0] > 1:
        log(f"warning: load average {r['load_average_start'][0]:.1f}: if other jobs are running, the "
            "sides take turns and the fastest pass counts, but with several threads a busy "
            "neighbour still stalls every parallel region (--threads 1 holds up better)")
    dt = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or os.path.join(tmp, args.preset)
        if not os.path.exists(os.path.join(path, "config.json")):   # written beside, then renamed
            shutil.rmtree(path + ".part", ignore_errors=True)
            os.replace(write_checkpoint(args.preset, path + ".part", dt), path)
        demo = path if args.preset == "tiny" else write_checkpoint("tiny", os.path.join(tmp, "tiny"), dt)
        cfg = checkpoint.read_config(path)
        if "train" in only:
            log("1. training step")
            r["train"] = tr = bench_train(args, path)
        if "train_step" in only:
            log(f"1b. training step of a global batch of {args.global_batch}")
            r["train_step"] = ts = bench_train_step(args, path, cfg)
        if only & {"vision", "decode"}:
            ours, ref = load_ours(path, args.device, dt), load_hf(path, args.device, dt)
        if "vision" in only:
            log("2. vision encoder")
            r["vision"] = bench_vision(ours, ref, args, cfg)
        if "decode" in only:
            log("3. decode")
            r["decode"] = bench_decode(ours, ref, args, cfg, (1, 8), bandwidth=True)
            r["copy_bandwidth_gbs"] = r["decode"].pop("copy_gbs")
            r["decode_weight_bytes"] = decode_weight_bytes(ours)
        if only & {"vision", "decode"}:
            del ours, ref
        if "decode" in only:
            if args.preset == "tiny":
                r["decode_tiny"] = r["decode"][1]
            else:
                log("   the tiny demo model (train.py's: preset tiny, its 512-token vocabulary)")
                r["decode_tiny"] = bench_decode(load_ours(demo, args.device, dt), load_hf(demo, args.device, dt),
                                                args, checkpoint.read_config(demo), (1,))[1]
        if "packing" in only:
            log("4. packing")
            r["packing"] = bench_packing(args, demo, tmp)
    r["load_average_end"] = os.getloadavg()

    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in r["machine"]), None)
    gpu_bf16 = args.device.startswith("cuda") and args.dtype == "bfloat16" and peak
    if "train" in only:
        r["train_speedup"] = tr["ours"]["tokens_per_s"] / tr["hf"]["tokens_per_s"]
        r["train_mem_ratio"] = tr["ours"]["step_mb"] / tr["hf"]["step_mb"]
        r["train_speedup_ckpt"] = tr["ours_ckpt"]["tokens_per_s"] / tr["hf_ckpt"]["tokens_per_s"]
        r["train_mem_ratio_ckpt"] = tr["ours_ckpt"]["step_mb"] / tr["hf_ckpt"]["step_mb"]
        r["train_gemm_fraction"] = tr["ours"]["gemm_fraction"]
        if gpu_bf16:
            batches = train_batches(cfg, args.warmup + args.steps, args.px)[args.warmup:]
            flops = sum(train_flops(cfg, b) for b in batches) / args.steps
            r["mfu"] = flops / tr["ours"]["step_s"] / (peak * 1e12)
    if "train_step" in only:
        r["train_step_speedup"] = ts["ours"]["samples_per_s"] / ts["hf"]["samples_per_s"]
        r["train_step_gemm_fraction"] = ts["ours"]["gemm_fraction"]
        if gpu_bf16:
            r["train_step_mfu"] = ts["flops_per_step"] / ts["ours"]["step_s"] / (peak * 1e12)
            r["train_step_mfu_hf"] = ts["flops_per_step"] / ts["hf"]["step_s"] / (peak * 1e12)
    if "vision" in only:
        r["vision_speedup"] = geomean([x["speedup"] for x in r["vision"].values()])
    if "decode" in only:
        r["decode_speedup"] = r["decode"][1]["speedup"]
        r["decode_speedup_batch8"] = r["decode"][8]["speedup"]
        r["decode_speedup_tiny"] = r["decode_tiny"]["speedup"]
        r["decode_bound_tokens_per_s"] = r["copy_bandwidth_gbs"] * 1e9 / r["decode_weight_bytes"]
        r["decode_roofline_fraction"] = r["decode"][1]["ours"] / r["decode_bound_tokens_per_s"]
    if "packing" in only:
        r["packing_efficiency"] = r["packing"]["synthetic"]["packed"]
    r["compared"] = ("same random weights and dtype on both sides; LoRA r16 (our LoRALinear) + 16 "
                     "latent rows trainable on both; the same stage-1 mask; AdamW; transformers with "
                     "sdpa, full-vocabulary logits and its own loss")
    if args.json:
        log(table(r))
        print(json.dumps(r, indent=1))
    else:
        print(table(r))


if __name__ == "__main__":
    main()
