"""
The built-in demo: what `torchrun --nproc_per_node 2 train.py --stage 1` trains when given no
--model and no --data, made once under runs/demo/:
  - a tiny byte-level BPE tokenizer with Qwen2's pre-tokenizer and Qwen2.5-VL's special tokens in
    Qwen's order (build_tokenizer), so the demo and the tests run without downloads;
  - synthetic vision-centric tasks (make_synthetic): counting, object localization, visual
    similarity and a jigsaw completion, built so that only the pixels decide the answer;
  - a random tiny Qwen2.5-VL in the hub's layout (make_demo_base, model.preset("tiny")), and the
    training defaults that let it learn from scratch on 2 CPU cores (TRAIN).

    python demo.py synth --out data/synth          # write the synthetic tasks (JSONL + PNG)
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch.distributed as dist
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import checkpoint
import data
import model
from data import (COUNT_RANGE, DEFAULT_SYSTEM_PROMPT, QWEN25VL_CHAT_TEMPLATE, QWEN2_PRETOKENIZE_REGEX,
                  QWEN3VL_CHAT_TEMPLATE, QWEN3_EXTRA_TOKENS, QWEN_ADDED_TOKENS, SPLITS, ImageConfig, Sample,
                  format_prompt, write_jsonl)

DIR = "runs/demo"
# The demo's training defaults, those of a run with no --model: the tiny model learns from scratch
# on 2 CPU cores in minutes, so it trains the whole (tiny) language model at a higher learning
# rate, and longer in stage 2: the two tasks that compare colours across images (similarity,
# jigsaw) are learned there, through direct attention, after about 2,000 mixed steps. Everything
# else is the paper's recipe. It saves every 200 of its short steps. Flags on the command line win.
TRAIN = dict(train="full", lr=5e-4, epochs={1: 2, 2: 8}, batch_size=4, save_every=200, n_train=800)
TRAIN_HELP = ("With no --model the run is the built-in demo, and these defaults differ (the demo "
              "preset, demo.TRAIN): --train full --lr 5e-4 --epochs 2 (stage 1) / 8 (stage 2), "
              "--batch-size 4 (used with --micro-batch-tokens 0), --save-every 200, on 800 "
              "synthetic samples per task under runs/demo/.")


# ----------------------------------------------------------------------------------------------
# The tokenizer

def build_tokenizer(out_dir, corpus=None, vocab_size=1000, min_pixels=None, max_pixels=None, family="qwen2.5"):
    """Write a small Qwen2.5-VL-shaped checkpoint tokenizer into out_dir (tokenizer.json,
    tokenizer_config.json with the chat template, chat_template.json, preprocessor_config.json).
    Byte-level BPE trained on `corpus` (default: the synthetic tasks' and BLINK's wording), so any
    text still encodes (bytes are the base alphabet); Qwen's added tokens follow the BPE vocab as
    on the real tokenizer. Deterministic; well under a second. vocab_size is an upper bound: the
    default corpus stops at ~425 BPE tokens (447 with Qwen's added tokens, before latents).
    family "qwen3": Qwen3-VL's files instead (its 4 more added tokens, its chat template, and its
    preprocessor_config.json: 16-pixel patches, mean/std 0.5, its pixel limits)."""
    qwen3 = family == "qwen3"
    image = ImageConfig.qwen3() if qwen3 else ImageConfig()
    min_pixels, max_pixels = min_pixels or image.min_pixels, max_pixels or image.max_pixels
    added_tokens = QWEN_ADDED_TOKENS + (QWEN3_EXTRA_TOKENS if qwen3 else [])
    template = QWEN3VL_CHAT_TEMPLATE if qwen3 else QWEN25VL_CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus if corpus is not None else default_corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, s in added_tokens if s])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, s in added_tokens if not s])
    tok.save(str(out_dir / "tokenizer.json"))

    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": s} for t, s in added_tokens}
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 131072, "errors": "replace",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "add_prefix_space": False, "split_special_tokens": False, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added, "chat_template": template,
    }
    preprocessor_config = {
        "min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": image.patch_size, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": list(image.image_mean), "image_std": list(image.image_std),
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor" if qwen3 else "Qwen2_5_VLProcessor",
    }
    if qwen3:   # as the hub's file has them: the pixel limits as size={shortest_edge, longest_edge}
        del preprocessor_config["min_pixels"], preprocessor_config["max_pixels"]
        preprocessor_config["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    files = {"tokenizer_config.json": tokenizer_config, "preprocessor_config.json": preprocessor_config,
             "chat_template.json": {"chat_template": template}}
    for name, obj in files.items():
        (out_dir / name).write_text(json.dumps(obj, indent=2) + "\n")
    return out_dir


def default_corpus():
    """What the toy tokenizer learns merges from: the chat frame, BLINK's phrasing, our tasks."""
    lines = [DEFAULT_SYSTEM_PROMPT, "system\n", "user\n", "assistant\n", "Select from the following choices.",
             "the first image", "the second image", "the third image", "the fourth image",
             "Which image is more similar to the reference image?", "How many objects are in the image?",
             "Answer with a number.", "yes", "no", " ".join("0123456789"), " ".join("ABCD")]
    lines += [f"({a}) {b}" for a in "ABCD" for b in ("the second image", "the third image")]
    for spec in SYNTHETIC_TASKS.values():
        lines.append(format_prompt(spec["question"], spec["choices"]))
    return lines * 4


def default_processor(num_latents=16):
    """A Processor over the toy tokenizer, built once into a temp cache (for offline CLI use)."""
    key = hashlib.sha1(json.dumps([default_corpus(), QWEN_ADDED_TOKENS]).encode()).hexdigest()[:10]
    path = Path(tempfile.gettempdir()) / f"livr-toy-tokenizer-{key}"
    if not (path / "preprocessor_config.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + "."))
        build_tokenizer(tmp)
        try:
            os.replace(tmp, path)             # atomic: concurrent builders don't see half a directory
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return data.Processor.from_pretrained(path, num_latents=num_latents)


# ----------------------------------------------------------------------------------------------
# Synthetic vision-centric tasks: the demo's data and the tests' fixtures
#
# Built for a tiny, randomly initialised model on a CPU, so the visual signal is coarse and strong
# (solid colours, one object per 28-px cell = one LM image token):
#   counting             one 112-px image (16 image tokens): 2-9 white squares; open-ended, chance 1/8
#   object_localization  one 112-px image (16): a red and a blue box outline, the white square in one
#   visual_similarity    three 56-px images (4 each): which candidate has the reference's colour
#   jigsaw               a 112-px picture with its bottom-right quadrant black + two 56-px pieces (24)
# A task's prompt is the same for every sample, so the answer can only come from the pixels.

PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                    (145, 30, 180), (70, 240, 240), (240, 50, 230)], dtype=np.uint8)


SYNTHETIC_TASKS = {
    "counting": {"question": "How many squares are in the image? Answer with a number.", "choices": None},
    "object_localization": {"question": "Which box contains the white square?",
                            "choices": ["the red box", "the blue box"]},
    "visual_similarity": {"question": "Which image is more similar to the first image?",
                          "choices": ["the second image", "the third image"]},
    "jigsaw": {"question": "The bottom right of the first image is missing. Which image fills it?",
               "choices": ["the second image", "the third image"]},
}


def _grid(size, rgb):
    return np.full((size, size, 3), rgb, dtype=np.uint8)


def _synth_counting(rng, label, size):
    """label = count - 2; that many white squares, one per cell, on a dark background."""
    count, cell = COUNT_RANGE[label], size // 4
    img, m = _grid(size, (24, 24, 24)), cell // 7
    for c in rng.choice(16, size=count, replace=False):
        r, q = divmod(int(c), 4)
        img[r * cell + m:(r + 1) * cell - m, q * cell + m:(q + 1) * cell - m] = 255
    return [img], str(count)


def _synth_localization(rng, label, size):
    """A red and a blue box outline on two cells; the white square sits in the red one (A) or the blue (B)."""
    cell, t = size // 4, max(2, size // 28)
    img = _grid(size, (40, 40, 40))
    red, blue = (int(c) for c in rng.choice(16, size=2, replace=False))
    for c, rgb in ((red, (230, 30, 30)), (blue, (30, 70, 240))):
        r, q = divmod(c, 4)
        y, x = r * cell, q * cell
        img[y:y + cell, x:x + cell] = rgb
        img[y + t:y + cell - t, x + t:x + cell - t] = (40, 40, 40)
    r, q = divmod(red if label == 0 else blue, 4)
    a, b = cell // 4, cell - cell // 4
    img[r * cell + a:r * cell + b, q * cell + a:q * cell + b] = 255
    return [img], "AB"[label]


def _solid(rng, color, size):
    """A solid-colour square with a small random brightness shift, so equal is never identical."""
    shift = int(rng.integers(-12, 13))
    return np.clip(np.full((size, size, 3), color, np.int16) + shift, 0, 255).astype(np.uint8)


def _synth_similarity(rng, label, size):
    """Reference and two candidates, each one solid colour; the match has the reference's colour."""
    ref, other = rng.choice(len(PALETTE), size=2, replace=False)
    small = size // 2
    match, distractor = _solid(rng, PALETTE[ref], small), _solid(rng, PALETTE[other], small)
    candidates = [match, distractor] if label == 0 else [distractor, match]
    return [_solid(rng, PALETTE[ref], small)] + candidates, "AB"[label]


def _synth_jigsaw(rng, label, size):
    """Two colour halves (top/bottom or left/right) with the bottom-right quadrant blacked out;
    the right piece is the colour of the half running into the hole, the other piece a colour
    that appears nowhere in the picture."""
    c0, c1, other = rng.choice(len(PALETTE), size=3, replace=False)
    h = size // 2
    puzzle = np.zeros((size, size, 3), np.uint8)
    puzzle[:] = PALETTE[c0]
    if rng.integers(2):
        puzzle[h:] = PALETTE[c1]                  # top / bottom: the hole is in the bottom half
    else:
        puzzle[:, h:] = PALETTE[c1]               # left / right: the hole is in the right half
    puzzle[h:, h:] = 0
    piece, distractor = _solid(rng, PALETTE[c1], h), _solid(rng, PALETTE[other], h)
    candidates = [piece, distractor] if label == 0 else [distractor, piece]
    return [puzzle] + candidates, "AB"[label]


SYNTHETIC_MAKERS = {"counting": _synth_counting, "object_localization": _synth_localization,
                    "visual_similarity": _synth_similarity, "jigsaw": _synth_jigsaw}


def make_synthetic(out_dir, n_train=256, n_val=64, n_test=128, seed=42, tasks=tuple(SYNTHETIC_TASKS),
                   image_size=112):
    """Write {train,val,test}.jsonl (+ PNGs under images/) with n_* samples PER TASK; returns
    {split: path}. Deterministic: same seed -> byte-identical files. Labels are balanced (each
    letter, or each count 2-9, equally often up to one) and shuffled."""
    if image_size % 112:
        raise ValueError("image_size must be a multiple of 112 (4x4 cells of whole 28-px image tokens)")
    out_dir = Path(out_dir)
    paths = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        samples = []
        for task in tasks:
            spec = SYNTHETIC_TASKS[task]
            # one stream per (seed, task, split): adding a task or resizing a split leaves the others as they were
            rng = np.random.default_rng([seed, zlib.crc32(task.encode()), SPLITS[split]])
            n_classes = len(spec["choices"]) if spec["choices"] else len(COUNT_RANGE)
            labels = rng.permutation(np.arange(n) % n_classes)
            for i, label in enumerate(labels):
                images, answer = SYNTHETIC_MAKERS[task](rng, int(label), image_size)
                files = []
                for k, img in enumerate(images):
                    f = out_dir / "images" / split / f"{task}_{i:05d}_{k}.png"
                    Image.fromarray(img).save(f, format="PNG")
                    files.append(str(f))
                samples.append(Sample(images=files, question=spec["question"], answer=answer,
                                      choices=spec["choices"], task=task, id=f"{task}_{split}_{i:05d}"))
        order = np.random.default_rng([seed, SPLITS[split]]).permutation(len(samples))
        paths[split] = write_jsonl([samples[i] for i in order], out_dir / f"{split}.jsonl")
    return paths


# ----------------------------------------------------------------------------------------------
# The demo's base checkpoint and data, made once

def make_demo_base(path, std=0.02, seed=0):
    """A random tiny Qwen2.5-VL in the hub's layout, with a small tokenizer of its own."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_tokenizer(tmp)
    proc = data.Processor.from_pretrained(tmp, num_latents=64)       # room for up to 64 latents
    ids = dict(image_token_id=proc.image_token_id, vision_start_token_id=proc.vision_start_token_id,
               vision_end_token_id=proc.vision_end_token_id, eos_token_id=proc.im_end_id,
               video_token_id=proc.tokenizer.token_to_id("<|video_pad|>"))
    cfg = model.preset("tiny", vocab_size=64 * math.ceil(proc.vocab_size / 64), **ids)
    checkpoint.save_pretrained(model.init_weights(model.Qwen25VL(cfg), std=std, seed=seed), tmp)
    os.replace(tmp, path)
    return path


def ensure_demo(run_dir, rank, n_train):
    base, data_dir = os.path.join(run_dir, "base"), os.path.join(run_dir, "data")
    if rank == 0 and not os.path.exists(os.path.join(base, "config.json")):
        make_demo_base(base)
    if rank == 0 and not os.path.exists(os.path.join(data_dir, "test.jsonl")):
        make_synthetic(data_dir, n_train=n_train, seed=42)
    if dist.is_initialized():
        dist.barrier()
    return base, os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "val.jsonl")


# ----------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("synth", help="write the synthetic tasks (JSONL + PNG)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--n-train", type=int, default=256, help="per task")
    p.add_argument("--n-val", type=int, default=64, help="per task")
    p.add_argument("--n-test", type=int, default=128, help="per task")
    p.add_argument("--tasks", default=",".join(SYNTHETIC_TASKS), help="comma-separated subset of: %(default)s")
    p.add_argument("--image-size", type=int, default=112, help="side of the main image; multiple of 112")
    args = ap.parse_args(argv)
    for flag in ("n_train", "n_val", "n_test", "image_size"):
        low = 1 if flag in ("image_size", "n_train") else 0
        if getattr(args, flag) < low:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least {low}")
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
    if unknown or not tasks:
        print(f"error: --tasks: unknown task(s) {unknown}; choose from {', '.join(SYNTHETIC_TASKS)}",
              file=sys.stderr)
        return 2
    try:
        paths = make_synthetic(args.out, args.n_train, args.n_val, args.n_test, args.seed, tasks, args.image_size)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
