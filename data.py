"""
Model inputs for LIVR, exactly as the reference Qwen2.5-VL and Qwen3-VL processors make them.

LIVR trains and evaluates on multiple-choice visual tasks (BLINK style, 1-4 images per question)
and on open-ended counting. This file turns such records into the tensors the model eats, and
tags every token with its *kind* so masks.py can build the visual bottleneck:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|>*n1<|vision_end|> ... question ... <|latent_0|>..<|latent_K-1|>
    <|im_end|>\\n<|im_start|>assistant\\n  A<|im_end|>
    kinds:  system ..... text, image ...... text ...... latent ...... text ...... answer
            (masks.py's TEXT, IMAGE, LATENT, ANSWER, SYSTEM; the system turn ends at its "\\n")

What it mirrors (transformers is the oracle in tests/, never imported here):
  - preprocess_image   = Qwen2VLImageProcessorPil (smart_resize, PIL bicubic, rescale, normalize,
                         patch flattening), to 1e-5 for any image size.
  - Processor.encode   = Qwen2_5_VLProcessor + apply_chat_template with Qwen2.5-VL's chat template,
                         token for token, plus the K latent tokens after the question (the paper's
                         Q' = Q + L; masks.place_latents). For a Qwen3-VL checkpoint: its image
                         settings (16-px patches, mean/std 0.5) and its chat template (no
                         default system turn), equal to Qwen3VLProcessor.
  - build_tokenizer    = a tiny byte-level BPE with Qwen2's pre-tokenizer and Qwen2.5-VL's special
                         tokens in Qwen's order, so tests and the CPU demo run without downloads.
Data formats: our JSONL, LLaVA-style JSON, BLINK parquet (converted), and built-in synthetic
vision-centric tasks (counting, object localization, visual similarity, jigsaw) for the demo.

The file reads in the order a record travels: records (reading, checking, formats) -> images ->
tokens (chat template, Processor) -> batches (collate, pack) -> streaming (workers, samplers);
the embedded default (the demo's tokenizer, the synthetic tasks) comes last, then the CLI.

Run:
    python data.py synth --out data/synth                  # write the synthetic tasks (JSONL + PNG)
    python data.py check data/synth/train.jsonl --max-len 256
    python data.py show data/synth/train.jsonl --index 0   # what the model sees, token by token
    python data.py convert-blink path/to/BLINK --out data/blink   # needs pyarrow
"""
import argparse
import concurrent.futures
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import masks

# ----------------------------------------------------------------------------------------------
# Records

@dataclass
class Sample:
    """One question. images: paths or PIL images, in order. question may carry LLaVA-style
    <image> placeholders; without them the images come first, as in BLINK."""
    images: list
    question: str
    answer: str | None = None            # "A".."D" for multiple choice, "7" for counting
    choices: list | None = None          # None = open-ended
    task: str = ""
    prompt: str | None = None            # verbatim user text when it differs from format_prompt()
    id: str = ""
    where: str = ""                      # "file:line", for error messages
    llava: bool = False                  # LLaVA data: each image must have its <image> placeholder

    @property
    def text(self):
        return self.prompt if self.prompt is not None else format_prompt(self.question, self.choices)


def answer_letters(n):
    return [chr(ord("A") + i) for i in range(n)]


def format_prompt(question, choices=None):
    """BLINK's wording: '<question>\\nSelect from the following choices.\\n(A) ..\\n(B) ..'."""
    if not choices:
        return question
    options = "\n".join(f"({letter}) {c}" for letter, c in zip(answer_letters(len(choices)), choices))
    return f"{question}\nSelect from the following choices.\n{options}"


def normalize_answer(answer):
    """'(A)' (BLINK's gold format) -> 'A'; anything else stripped."""
    answer = str(answer).strip()
    m = re.fullmatch(r"\(([A-Z])\)", answer)
    return m.group(1) if m else answer


def chance(record):
    """Accuracy of uniform guessing: 1/len(choices); open-ended counting (2-9) is 1/8."""
    return 1 / len(record.choices) if record.choices else 1 / len(COUNT_RANGE)


def as_sample(record):
    if isinstance(record, Sample):
        return record
    d = dict(record)
    return Sample(images=list(d.get("images") or []), question=d.get("question", ""), answer=d.get("answer"),
                  choices=d.get("choices"), task=d.get("task", ""), prompt=d.get("prompt"),
                  id=str(d.get("id", "")))


# ----------------------------------------------------------------------------------------------
# Loading, with a report of every bad record

class DataError(ValueError):
    """A dataset with bad records; str(e) is the full report, e.problems the 'file:line: reason' lines."""

    def __init__(self, problems, total, path, message=None):
        self.problems = problems
        super().__init__(message or "\n".join(problems) + f"\n{len(problems)} bad record(s) of "
                         f"{total} in {path} (fix them, or pass --skip-bad / skip_bad=True to "
                         "leave them out)")


def read_text(path):
    """A dataset file's text; a directory or a file that is not UTF-8 is a DataError that names
    the file, line and byte."""
    path = Path(path)
    if path.is_dir():
        raise DataError([], 0, path, f"{path} is a directory, not a dataset file (.jsonl or .json)")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError([], 0, path, f"{path}:{line}: not UTF-8 text (byte {e.start}: "
                        f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8") from None


def read_records(path, image_root=None):
    """Parse a dataset file: [(where, Sample | None, parse_error | None)] in file order.
    .jsonl: one record per line (ours, or LLaVA-style if it has "conversations");
    .json: a list of records (LLaVA style, or ours). Image paths are relative to the file
    (or to image_root)."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    text = read_text(path)
    raw = []                                        # (line number, object or None, error)
    if path.suffix == ".json":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            return [(f"{path}:{e.lineno}", None, f"not valid JSON ({e.msg})")]
        if not isinstance(whole, list):
            return [(f"{path}:1", None, "expected a JSON list of records")]
        raw = list(_json_list_with_lines(text))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw.append((n, json.loads(line), None))
            except json.JSONDecodeError as e:
                raw.append((n, None, f"not valid JSON ({e.msg})"))
    out = []
    for n, obj, err in raw:
        where = f"{path}:{n}"
        if err is None and not isinstance(obj, dict):
            err = "record is not a JSON object"
        if err:
            out.append((where, None, err))
            continue
        try:
            sample = _llava_sample(obj, root) if "conversations" in obj else _our_sample(obj, root)
            sample.where = where
            out.append((where, sample, None))
        except ValueError as e:
            out.append((where, None, str(e)))
    return out


def _json_list_with_lines(text):
    """Yield (line, object, None) for each element of a (valid) top-level JSON list."""
    dec, ws = json.JSONDecoder(), re.compile(r"[\s,]*")
    i = ws.match(text, text.index("[") + 1).end()
    line, last = 1, 0
    while not text.startswith("]", i):
        line, last = line + text.count("\n", last, i), i
        obj, i = dec.raw_decode(text, i)
        yield line, obj, None
        i = ws.match(text, i).end()


def _paths(value, root):
    if value is None:
        return []
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("images must be a list of paths")
    return [str(root / v) for v in value]


def _our_sample(d, root):
    """{"images": [...], "question": ..., "choices": [...]?, "answer": "A", "task": ...}"""
    if not isinstance(d.get("question"), str) or not d["question"].strip():
        raise ValueError("no question")
    choices = d.get("choices")
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2
                                or not all(isinstance(c, str) for c in choices)):
        raise ValueError("choices must be a list of at least 2 strings")
    answer = d.get("answer")
    return Sample(images=_paths(d.get("images", d.get("image")), root), question=d["question"],
                  answer=None if answer is None else str(answer), choices=choices or None,
                  task=str(d.get("task", "")), prompt=d.get("prompt"), id=str(d.get("id", "")))


def _llava_sample(d, root):
    """{"image": "a.jpg" | [...], "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": "..."}]}: one question, one answer."""
    turns = d["conversations"]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        raise ValueError("conversations must be a list of {from, value} turns")
    if len(turns) > 2:
        raise ValueError(f"multi-turn conversations are not supported ({len(turns)} turns)")
    roles = [str(t.get("from", t.get("role", ""))) for t in turns]
    if roles[0] not in ("human", "user"):
        raise ValueError(f"first turn is from {roles[0]!r}, expected 'human'")
    answer = turns[1].get("value") if len(turns) == 2 and roles[1] in ("gpt", "assistant") else None
    return Sample(images=_paths(d.get("image", d.get("images")), root), question=str(turns[0].get("value", "")),
                  answer=None if answer is None else str(answer), task=str(d.get("task", "")),
                  id=str(d.get("id", "")), llava=True)


def validate(sample, processor=None, max_len=None, checked_images=None):
    """Every reason this sample can't be trained on, as short strings (empty = good).
    checked_images: a dict {path: reasons} shared across calls, so an image that many records
    point at is decoded once (check_file passes one)."""
    reasons = []
    answer = normalize_answer(sample.answer) if sample.answer is not None else ""
    if not answer:
        reasons.append("no answer")
    elif sample.choices and answer not in answer_letters(len(sample.choices)):
        reasons.append(f"answer {sample.answer!r} is not among the choices "
                       f"({', '.join(answer_letters(len(sample.choices)))})")
    text = sample.text
    n_placeholders = text.count(IMAGE_PLACEHOLDER)
    if (n_placeholders or sample.llava) and n_placeholders != len(sample.images):
        reasons.append(f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(sample.images)} image(s)")
    reserved = processor.reserved if processor else [t for t, _ in QWEN_ADDED_TOKENS]
    tok = reserved_token_in(text, reserved) or reserved_token_in(answer, reserved)
    if tok:
        reasons.append(f"text contains the reserved token {tok}")
    for image in sample.images:
        if isinstance(image, Image.Image):
            continue
        if checked_images is None:
            reasons += _check_image(image)
        else:
            if image not in checked_images:
                checked_images[image] = _check_image(image)
            reasons += checked_images[image]
    if max_len is not None and processor is not None and not reasons:
        n = processor.num_tokens(sample)
        if n > max_len:
            reasons.append(f"{n} tokens, longer than --max-len {max_len}")
    return reasons


def _check_image(path):
    """Reasons an image file can't be used (empty = good). Decodes it fully: a truncated file
    fails here, not mid-training."""
    if not Path(path).is_file():
        return [f"image not found: {path}"]
    try:
        with Image.open(path) as im:
            im.load()
            w, h = im.size
    except Exception as e:                # PIL raises many types for corrupt files
        return [f"unreadable image: {path} ({type(e).__name__}: {e})"]
    if max(w, h) / min(w, h) > 200:       # smart_resize refuses these
        return [f"image aspect ratio over 200: {path} ({w}x{h})"]
    return []


def check_file(path, processor=None, max_len=None, image_root=None, progress=None, threads=None):
    """(good samples, ['file:line: reason', ...], number of records). Each distinct image file is
    decoded once, by `threads` threads (default: up to 8; PIL decodes without holding the GIL).
    progress(done, total) is called after each image, then after each record (see progress_line)."""
    good, problems = [], []
    entries = read_records(path, image_root)
    paths = list(dict.fromkeys(im for _, s, _ in entries if s for im in s.images
                               if not isinstance(im, Image.Image)))
    threads = threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        checked_images = {}
        for n, (p, reasons) in enumerate(zip(paths, pool.map(_check_image, paths)), start=1):
            checked_images[p] = reasons
            if progress:
                progress(n, len(paths))
    for n, (where, sample, err) in enumerate(entries, start=1):
        reasons = [err] if err else validate(sample, processor, max_len, checked_images)
        if reasons:
            problems.append(f"{where}: {'; '.join(reasons)}")
        else:
            good.append(sample)
        if progress:
            progress(n, len(entries))
    return good, problems, len(entries)


def progress_line(label, after=3.0, every=1.0, file=None):
    """A progress(done, total) callable that prints '\\r<label>: done/total, ETA ..' to stderr once
    the work has taken more than `after` seconds (short jobs print nothing), then at most every
    `every` seconds, and a last line when done."""
    t0, last = time.time(), [0.0]

    def progress(done, total):
        now = time.time()
        if now - t0 < after or (done < total and now - last[0] < every):
            return
        last[0] = now
        eta = (now - t0) / done * (total - done)
        print(f"\r{label}: {done}/{total}, {now - t0:.0f}s, ETA {eta:.0f}s",
              end="\n" if done == total else "", file=file or sys.stderr, flush=True)
    return progress


def load_dataset(path, skip_bad=False, max_len=None, processor=None, image_root=None, progress=None):
    """Records of a .jsonl / .json file as [Sample]. Any bad record raises DataError with the full
    report, unless skip_bad (then they are left out and counted on stderr)."""
    if max_len is not None and processor is None:
        raise ValueError("max_len needs a processor to count tokens")
    good, problems, total = check_file(path, processor, max_len, image_root, progress)
    if total == 0:
        raise DataError([], 0, path, f"{path} holds no records")
    if problems and not good and skip_bad:
        raise DataError(problems, total, path, "\n".join(problems) + f"\nall {total} record(s) "
                        f"of {path} are bad: --skip-bad would leave nothing")
    if problems and not skip_bad:
        raise DataError(problems, total, path)
    if problems:
        print(f"{path}: skipped {len(problems)} bad record(s) of {total}", file=sys.stderr)
    return good


def write_jsonl(samples, path):
    """Our JSONL format; image paths written relative to the file."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            d = {"id": s.id, "task": s.task, "images": [os.path.relpath(p, path.parent) for p in s.images],
                 "question": s.question}
            if s.choices:
                d["choices"] = s.choices
            if s.prompt is not None:
                d["prompt"] = s.prompt
            d["answer"] = s.answer
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# BLINK, as distributed on the hub (BLINK-Benchmark/BLINK: <Task>/{val,test}-*.parquet)

def safe_name(value, what="name"):
    """A file-name piece from data (a BLINK idx or sub_task): only letters, digits, '.', '_' and
    '-' are kept, so nothing like '../..', '/abs', a NUL or a drive letter can steer a write
    outside --out. A changed value gets a short hash of the original, so two different values
    never share a file."""
    value = str(value)
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("._-")[:100]
    if clean == value and clean:
        return clean
    digest = hashlib.sha1(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{clean}_{digest}" if clean else f"{what}_{digest}"


def _inside(path, root):
    """path, after checking it resolves inside root (a last guard behind safe_name)."""
    if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)):
        raise ValueError(f"refusing to write {path}: outside {root}")
    return path


def convert_blink(sources, out_dir):
    """Parquet rows (idx, sub_task, image_1..image_4, question, choices, answer '(A)', prompt) ->
    <out>/<Task>_<split>.jsonl in our format, images under <out>/images/. BLINK's own prompt text
    is kept (as "prompt" when it differs from format_prompt(question, choices)). Rows with hidden
    answers (the test split) are skipped and counted. Returns the written paths."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit("convert-blink needs pyarrow: pip install pyarrow")
    files = []
    for s in ([sources] if isinstance(sources, (str, Path)) else sources):
        s = Path(s)
        files += sorted(s.rglob("*.parquet")) if s.is_dir() else [s]
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    by_file, hidden = {}, 0
    for f in files:
        for n, row in enumerate(pq.read_table(f).to_pylist()):
            idx = str(row.get("idx") or f"{f.parent.name}_{f.stem}_{n}")
            name = safe_name(idx, "idx")                                 # idx comes from the data
            answer = normalize_answer(row.get("answer") or "")
            if answer.lower() in ("", "hidden"):
                hidden += 1
                continue
            split = f.stem.split("-")[0] if f.stem.split("-")[0] in SPLITS else idx.split("_")[0]
            split = safe_name(split, "split")
            task = str(row.get("sub_task") or f.parent.name)
            images = []
            for k in range(1, 5):
                im = row.get(f"image_{k}")
                if not im:
                    continue
                raw = im["bytes"] if isinstance(im, dict) else im       # datasets' Image(): {bytes, path}
                ext = (Image.open(io.BytesIO(raw)).format or "png").lower().replace("jpeg", "jpg")
                p = _inside(out_dir / "images" / f"{name}_{k}.{ext}", out_dir / "images")
                p.write_bytes(raw)                                      # as distributed: no re-encoding
                images.append(str(p))
            choices = list(row.get("choices") or []) or None
            question, prompt = row.get("question", ""), row.get("prompt")
            sample = Sample(images=images, question=question, answer=answer, choices=choices, task=task, id=idx,
                            prompt=prompt if prompt and prompt != format_prompt(question, choices) else None)
            jsonl = _inside(out_dir / f"{safe_name(task, 'task')}_{split}.jsonl", out_dir)
            by_file.setdefault(jsonl, []).append(sample)
    written = [write_jsonl(samples, path) for path, samples in sorted(by_file.items())]
    for p in written:
        print(f"wrote {p} ({len(by_file[p])} records)")
    if hidden:
        print(f"skipped {hidden} record(s) with hidden answers (BLINK's test split)")
    return written


# ----------------------------------------------------------------------------------------------
# Images: Qwen2VLImageProcessorPil in numpy

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageConfig:
    """The image half of preprocessor_config.json (defaults = Qwen2.5-VL-3B-Instruct's file)."""
    min_pixels: int = 56 * 56                    # 3136
    max_pixels: int = 28 * 28 * 16384            # 12845056; the class default 1003520 is not the hub file's
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD

    @classmethod
    def qwen3(cls):
        """Qwen/Qwen3-VL-4B-Instruct's preprocessor_config.json: 16-pixel patches, mean = std = 0.5,
        size {shortest_edge: 65536, longest_edge: 16777216}."""
        return cls(min_pixels=65536, max_pixels=16777216, patch_size=16,
                   image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))

    @classmethod
    def from_dict(cls, d, defaults=None):
        # transformers lets min_pixels/max_pixels override size={shortest_edge, longest_edge}
        size = d.get("size") or {}
        c = defaults or cls()
        c.min_pixels = int(d.get("min_pixels") or size.get("shortest_edge") or c.min_pixels)
        c.max_pixels = int(d.get("max_pixels") or size.get("longest_edge") or c.max_pixels)
        for k in ("patch_size", "temporal_patch_size", "merge_size"):
            setattr(c, k, int(d.get(k, getattr(c, k))))
        c.image_mean = tuple(d.get("image_mean", c.image_mean))
        c.image_std = tuple(d.get("image_std", c.image_std))
        return c

    @classmethod
    def from_pretrained(cls, path):
        path = Path(path)
        defaults = cls.qwen3() if is_qwen3(path) else cls()   # what a key the file leaves out means
        for name, part in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            file = path / name                     # transformers 5 may nest it in the second
            if not file.exists():
                continue
            try:
                d = json.loads(file.read_text(encoding="utf-8"))
                return cls.from_dict(d if part is None else d.get(part, {}), defaults)
            except (ValueError, TypeError, AttributeError) as e:
                raise ValueError(f"{file}: not a valid image processor config ({type(e).__name__}: {e})") from None
        return defaults


def is_qwen3(path):
    """A Qwen3-VL checkpoint directory: its config.json says model_type "qwen3_vl", or (a
    tokenizer-only directory) its preprocessor_config.json names the Qwen3-VL processor."""
    for name, key, want in (("config.json", "model_type", "qwen3_vl"),
                            ("preprocessor_config.json", "processor_class", "Qwen3VLProcessor")):
        try:
            d = json.loads((Path(path) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and key in d:
            return d[key] == want
    return False


def smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 16384):
    """(h, w) rounded to multiples of `factor` with h*w in [min_pixels, max_pixels], aspect kept.
    Same arithmetic as transformers' smart_resize, including its rounding quirks."""
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image):
    """PIL RGB image from a path, PIL image or HWC uint8 array. Transparency is composited onto
    white, as transformers' convert_to_rgb does (a plain .convert('RGB') would give black)."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            im.load()
            image = im.copy()
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = _to_8bit(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(im):
    """16-bit greyscale (PIL modes I;16*, or I holding values above 255) scaled to 8 bits:
    PIL's own convert() clips at 255, which turns such images almost white. (PIL already keeps
    the high byte of 16-bit RGB/RGBA PNGs.)"""
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    x = np.asarray(im).astype(np.float64)
    if im.mode == "I" and x.max(initial=0) <= 255:
        return Image.fromarray(x.clip(0, 255).astype(np.uint8), "L")     # already 8-bit values
    return Image.fromarray(np.rint(x.clip(0, 65535) / 257).astype(np.uint8), "L")


def _has_alpha(im):
    return "A" in im.getbands() or im.info.get("transparency") is not None


def preprocess_image(image, min_pixels=56 * 56, max_pixels=28 * 28 * 16384, mean=OPENAI_CLIP_MEAN,
                     std=OPENAI_CLIP_STD, patch_size=14, temporal_patch_size=2, merge_size=2):
    """One image -> (pixel_values float32 [N, 3*T*p*p] = [N, 1176], grid_thw LongTensor [3] = (1, h, w)).
    N = h*w patches of 14x14; every 2x2 block of patches becomes one LM token (N/4 <|image_pad|>)."""
    pixel_values, grid_thw = _preprocess_np(image, min_pixels, max_pixels, mean, std, patch_size,
                                            temporal_patch_size, merge_size)
    return torch.from_numpy(pixel_values), torch.tensor(grid_thw, dtype=torch.long)


def _preprocess_np(image, min_pixels, max_pixels, mean, std, patch_size, temporal_patch_size, merge_size):
    image = to_rgb(image)
    factor = patch_size * merge_size
    h, w = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    image = image.resize((w, h), resample=Image.BICUBIC)          # PIL takes (width, height)
    # rescale in float64 then cast, normalise in float32: the reference's exact order of operations
    x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)      # (H, W, 3)
    x = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
    gh, gw, m, p, c = h // patch_size, w // patch_size, merge_size, patch_size, 3
    x = x.transpose(2, 0, 1).reshape(c, gh // m, m, p, gw // m, m, p)
    # patch order: merge-groups row-major, the m*m patches of a group contiguous, so the merger
    # can fuse each 2x2 group by a plain reshape
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)                          # (gh/m, gw/m, m, m, C, p, p)
    # a still image is a 2-frame clip of the same frame (Conv3d patch embed has temporal kernel 2)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))
    return np.ascontiguousarray(x).reshape(gh * gw, c * temporal_patch_size * p * p), (1, gh, gw)


def _image_size(image):
    """(width, height) from a PIL image or just the file header."""
    if isinstance(image, Image.Image):
        return image.size
    with Image.open(image) as im:
        return im.size


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat template

# Qwen2.5-VL's added tokens in Qwen's order (ids 151643.. on the real tokenizer); True = special.
QWEN_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
# Qwen3's tokenizer adds these after them (ids 151665..151668), so its latents start at 151669
QWEN3_EXTRA_TOKENS = [("<tool_response>", False), ("</tool_response>", False), ("<think>", False),
                      ("</think>", False)]
# Qwen2's pre-tokenizer: letters, single digits, punctuation runs, newlines and spaces split apart
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"          # LLaVA-style marker in the question text
LATENT_TOKEN = "<|latent_{}|>"
# Qwen2.5-VL-Instruct's chat template, verbatim. Only written into tokenizer_config.json so that
# transformers (the oracle) renders what render_chat() renders; we never run Jinja ourselves.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct's chat template, verbatim (its chat_template.json), for the same purpose. For
# LIVR's single user turn it renders what Qwen2.5-VL's does, minus the default system turn.
QWEN3VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def render_chat(user_parts, answer=None, system_prompt=DEFAULT_SYSTEM_PROMPT):
    """QWEN25VL_CHAT_TEMPLATE in plain Python for one user turn. user_parts: strings, and ints for
    images (the int = that image's number of <|image_pad|> tokens, already expanded as the
    processor does). Returns (text, answer_start): without an answer the text ends with the
    generation prompt; with one it ends at the answer's <|im_end|> (the template's trailing "\\n"
    is never trained on or generated, so we drop it). system_prompt None: no system turn, as
    QWEN3VL_CHAT_TEMPLATE renders a conversation that has none."""
    text = "" if system_prompt is None else f"<|im_start|>system\n{system_prompt}<|im_end|>\n"
    text += "<|im_start|>user\n"
    for part in user_parts:
        text += part if isinstance(part, str) else "<|vision_start|>" + "<|image_pad|>" * part + "<|vision_end|>"
    text += "<|im_end|>\n<|im_start|>assistant\n"
    answer_start = len(text)
    if answer is not None:
        text += answer + "<|im_end|>"
    return text, answer_start


# ----------------------------------------------------------------------------------------------
# Processor: records -> model inputs

class Processor:
    """Qwen2_5_VLProcessor + apply_chat_template in plain Python, with LIVR's K latent tokens."""

    def __init__(self, tokenizer, image_config=None, num_latents=16, system_prompt=DEFAULT_SYSTEM_PROMPT):
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageConfig()
        self.num_latents = num_latents
        self.system_prompt = system_prompt
        # K new vocabulary entries (the paper's latent tokens): special, so text never splits them.
        # On the real Qwen tokenizer (151,665 tokens) they land at 151665.., unused embedding rows.
        self.latent_tokens = [LATENT_TOKEN.format(i) for i in range(num_latents)]
        missing = [t for t in self.latent_tokens if tokenizer.token_to_id(t) is None]
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        ids = [tokenizer.token_to_id(t) for t in self.latent_tokens]
        if ids and ids != list(range(ids[0], ids[0] + num_latents)):
            raise ValueError(f"latent token ids are not consecutive: {ids}")
        self.latent_token_id = ids[0] if ids else None
        lookup = self._id
        self.image_token_id = lookup("<|image_pad|>")
        self.vision_start_token_id = lookup("<|vision_start|>")
        self.vision_end_token_id = lookup("<|vision_end|>")
        self.im_start_id = lookup("<|im_start|>")
        self.im_end_id = lookup("<|im_end|>")
        self.pad_id = lookup("<|endoftext|>")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # every control token of this tokenizer: user text holding one is refused, never encoded
        added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
        self.reserved = list(dict.fromkeys([t for t, _ in QWEN_ADDED_TOKENS] + self.latent_tokens + added))
        c = self.image_config
        self.patch_dim = 3 * c.temporal_patch_size * c.patch_size ** 2       # 1176

    def _id(self, token):
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no {token}: is this a Qwen2.5-VL tokenizer?")
        return i

    @classmethod
    def from_pretrained(cls, path, num_latents=16, min_pixels=None, max_pixels=None):
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path / 'tokenizer.json'} not found: expected a Qwen2.5-VL checkpoint")
        image_config = ImageConfig.from_pretrained(path)
        image_config.min_pixels = min_pixels or image_config.min_pixels
        image_config.max_pixels = max_pixels or image_config.max_pixels
        try:
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:                 # the tokenizers library raises a bare Exception
            raise ValueError(f"{path / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
        # Qwen3-VL's template has no default system turn
        return cls(tokenizer, image_config, num_latents, None if is_qwen3(path) else DEFAULT_SYSTEM_PROMPT)

    def image_tokens(self, width, height):
        """<|image_pad|> count for an image of this size (no pixels touched)."""
        c = self.image_config
        h, w = smart_resize(height, width, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels)
        return (h // c.patch_size) * (w // c.patch_size) // c.merge_size ** 2

    def preprocess(self, image):
        """numpy (pixel_values [N, 1176], (1, h, w)) with this checkpoint's settings."""
        c = self.image_config
        return _preprocess_np(image, c.min_pixels, c.max_pixels, c.image_mean, c.image_std,
                              c.patch_size, c.temporal_patch_size, c.merge_size)

    def user_parts(self, sample, image_token_counts):
        """The user turn as [str | int]: images where the <image> placeholders are (a newline on
        either side of a placeholder goes with it, as Qwen fine-tuning repos convert LLaVA data),
        else all images first; then the latents where masks.place_latents puts them (LIVR: right
        after the question)."""
        text = sample.text
        if IMAGE_PLACEHOLDER in text:
            pieces = re.split(r"\n?" + re.escape(IMAGE_PLACEHOLDER) + r"\n?", text)
            if len(pieces) - 1 != len(image_token_counts):
                raise ValueError(f"{sample.where}: {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders "
                                 f"for {len(image_token_counts)} images")
            parts = [pieces[0]]
            for n, piece in zip(image_token_counts, pieces[1:]):
                parts += [n, piece]
        else:
            parts = list(image_token_counts) + [text]
        parts = [p for p in parts if p != ""]
        return masks.place_latents(parts, "".join(self.latent_tokens)) if self.num_latents else parts

    def render(self, sample, with_answer=True, image_token_counts=None):
        """(text, answer_start) of the whole conversation, image pads expanded. User text (the
        question, choices, prompt, answer) holding a control token is a ValueError: rendered,
        it would be tokenized as that token (an <|im_end|> ending the turn, a fake latent...)."""
        for field, value in (("text", sample.text), ("answer", sample.answer if with_answer else None)):
            tok = reserved_token_in(value or "", self.reserved)
            if tok:
                raise ValueError(f"{sample.where or 'record'}: the {field} contains the reserved "
                                 f"token {tok} (control tokens are not allowed in user text)")
        if image_token_counts is None:
            image_token_counts = [self.image_tokens(*_image_size(im)) for im in sample.images]
        answer = None
        if with_answer:
            if not sample.answer:
                raise ValueError(f"{sample.where}: no answer to encode")
            answer = normalize_answer(sample.answer)
        return render_chat(self.user_parts(sample, image_token_counts), answer, self.system_prompt)

    def num_tokens(self, sample, with_answer=True):
        """Sequence length of encode(sample) without decoding any pixels (image sizes come from
        the file headers). <|image_pad|> is an added token, so each one is a token of its own
        whatever surrounds it: the text is tokenized with one pad per image and the rest counted
        (a 1080p image is ~2,700 pads; tokenizing them all would cost ms per record)."""
        counts = [self.image_tokens(*_image_size(im)) for im in sample.images]
        text, _ = self.render(sample, with_answer, [1] * len(counts))
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids) + sum(counts) - len(counts)

    def encode(self, record, with_answer=True):
        """A Sample (or dict) -> input_ids, labels, kinds [L]; pixel_values [N, 1176]; image_grid_thw [n, 3]."""
        sample = as_sample(record)
        pixels, grids = [], []
        for image in sample.images:
            pv, thw = self.preprocess(image)
            pixels.append(pv)
            grids.append(thw)
        counts = [t * h * w // self.image_config.merge_size ** 2 for t, h, w in grids]
        text, answer_start = self.render(sample, with_answer, counts)
        # Tokenize the whole string at once, exactly as the reference does, so BPE sees the same
        # pre-tokens; then find the answer by character offsets rather than re-tokenizing pieces.
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        input_ids = torch.tensor(enc.ids, dtype=torch.long)
        starts = torch.tensor([s for s, _ in enc.offsets], dtype=torch.long)
        ends = torch.tensor([e for _, e in enc.offsets], dtype=torch.long)
        if ((starts < answer_start) & (ends > answer_start)).any():
            raise ValueError(f"{sample.where}: a token straddles the start of the answer")
        is_answer = starts >= answer_start if with_answer else torch.zeros_like(input_ids, dtype=torch.bool)
        labels = torch.where(is_answer, input_ids, torch.full_like(input_ids, -100))
        kinds = torch.full_like(input_ids, masks.TEXT)
        if text.startswith("<|im_start|>system"):      # the system turn, up to its closing "\n"
            system_end = text.index("<|im_end|>\n") + len("<|im_end|>\n")
            kinds[ends <= system_end] = masks.SYSTEM
        kinds[input_ids == self.image_token_id] = masks.IMAGE
        if self.num_latents:
            is_latent = (input_ids >= self.latent_token_id) & (input_ids < self.latent_token_id + self.num_latents)
            kinds[is_latent] = masks.LATENT
        kinds[is_answer] = masks.ANSWER
        assert int((kinds == masks.IMAGE).sum()) == sum(counts)
        return {
            "input_ids": input_ids,                                                     # [L]
            "labels": labels,                                                           # [L], -100 = no loss
            "kinds": kinds,                                                             # [L], masks.TEXT/IMAGE/...
            # concatenated in numpy: one big torch op wakes the thread pool, slow on small CPUs (BENCH.md)
            "pixel_values": torch.from_numpy(np.concatenate(pixels) if pixels                # [N, 1176]
                                             else np.zeros((0, self.patch_dim), np.float32)),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long).reshape(-1, 3),       # [n, 3]
        }

    def decode(self, ids, skip_special_tokens=True):
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


LATENT_PATTERN = re.compile(r"<\|latent_\d+\|>")


def reserved_token_in(text, reserved):
    """The first control token in `text` (any of `reserved`, or any <|latent_N|>), else None."""
    for tok in reserved:
        if tok in text:
            return tok
    m = LATENT_PATTERN.search(text)
    return m.group(0) if m else None


# ----------------------------------------------------------------------------------------------
# Batching: pad-to-longest, or packing several samples into one sequence

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
# Streaming: the records stay in memory (they are small), the pixels are decoded when a batch is
# made, in DataLoader worker processes, so host memory does not grow with the dataset and the
# first step starts at once. Each rank reads only its own share of every batch.
#
#   records --StepSampler--> this rank's record indices for one optimizer step
#           --EncodedRecords (in a worker)--> encode() dicts
#           --StepBatches (in the worker)--> the step's micro-batches, packed, ready for the device

class EncodedRecords(torch.utils.data.Dataset):
    """dataset[j] = processor.encode(records[j % n]) plus "index" (j % n) and "weight": positions
    past the end (j >= n) repeat a record with weight 0, so evaluation shards can all have the same
    length (see RankShard). keep_errors: a record that fails to encode comes back as
    {"index", "weight", "error": "Type: message"} instead of raising, so it costs only itself.
    transform: applied to each encode() dict (evaluate.py drops the latents with it)."""

    def __init__(self, records, processor, with_answer=True, keep_errors=False, transform=None):
        self.records, self.processor = records, processor
        self.with_answer, self.keep_errors, self.transform = with_answer, keep_errors, transform

    def __len__(self):
        return len(self.records)

    def __getitem__(self, j):
        i = j % len(self.records)
        info = {"index": i, "weight": float(j < len(self.records))}
        try:
            enc = self.processor.encode(self.records[i], self.with_answer)
        except Exception as e:           # PIL raises many types for bad files
            if not self.keep_errors:
                raise
            return {**info, "error": f"{type(e).__name__}: {e}"}
        return {**(self.transform(enc) if self.transform else enc), **info}


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
    prepare(batch) -> batch adds what the step needs made ahead of it (model.prepare_batch)."""

    def __init__(self, pad_id, micro_batch_tokens=0, batch_size=1, pixel_dtype=torch.float32, prepare=None):
        self.pad_id, self.micro_batch_tokens, self.batch_size = pad_id, micro_batch_tokens, batch_size
        self.pixel_dtype, self.prepare = pixel_dtype, prepare

    def __call__(self, items):
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
        weights = torch.tensor([e["weight"] for e in items])
        return self.finish(collate(items, self.pad_id)), weights


def num_targets(batch):
    """Answer tokens the loss is taken over, counted on the host (no device sync)."""
    if "n_targets" in batch:
        return int(batch["n_targets"])
    return int((batch["labels"] != -100).sum())


def loader(dataset, batch_sampler, collate_fn, workers=0, pin_memory=False, ahead=4):
    """A DataLoader over batch_sampler's batches: `workers` processes decode images and build
    batches ahead of the step, about `ahead` batches in all (each worker at least one): what a
    step's host memory is multiplied by, whatever the dataset's size. It draws its worker seeds
    from a generator of its own, never from the global RNG: training's dropout stream (restored
    exactly on --resume) must not depend on when loaders are started."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn,
                                       num_workers=workers, pin_memory=pin_memory,
                                       prefetch_factor=max(1, -(-ahead // workers)) if workers else None,
                                       persistent_workers=workers > 0, generator=torch.Generator())


# ----------------------------------------------------------------------------------------------
# The embedded default: the demo's tokenizer, then the synthetic tasks (kept apart from the
# path a real record takes)

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
    return Processor.from_pretrained(path, num_latents=num_latents)


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

COUNT_RANGE = range(2, 10)
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
SPLITS = {"train": 0, "val": 1, "test": 2}


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
# Seeing what the model sees

def show(processor, sample, with_answer=True):
    """The rendered conversation, each token with its kind, and the counts."""
    enc = processor.encode(sample, with_answer)
    ids, kinds = enc["input_ids"].tolist(), enc["kinds"].tolist()
    lines = [f"{sample.where}  task={sample.task!r}  answer={sample.answer!r}", "", "rendered:"]
    per_image = [int(g.prod()) // processor.image_config.merge_size ** 2 for g in enc["image_grid_thw"]]
    text, _ = processor.render(sample, with_answer, per_image)
    text = re.sub(r"(<\|image_pad\|>)+", lambda m: f"<|image_pad|>*{m.group(0).count('<|image_pad|>')}", text)
    if processor.num_latents > 2:
        text = text.replace("".join(processor.latent_tokens[1:-1]), "...")
    lines += [text, "", "tokens (s=system t=text I=image L=latent a=answer):"]
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[i] and kinds[j + 1] == kinds[i]:
            j += 1
        piece = processor.tokenizer.decode([ids[i]], skip_special_tokens=False)
        run = f"  x{j - i + 1}" if j > i else ""
        lines.append(f"{i:5d} {masks.KIND_CHARS[kinds[i]]} {ids[i]:7d} {piece!r}{run}")
        i = j + 1
    count = {name: sum(1 for x in kinds if x == v) for v, name in masks.KIND_NAMES.items()}
    lines += ["", f"{len(ids)} tokens: system {count['system']}, text {count['text']}, image {count['image']} (per image: {per_image}), "
              f"latent {count['latent']}, answer {count['answer']} (answer + <|im_end|>)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 epilog=__doc__[__doc__.index("Run:"):],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    model_help = "checkpoint dir with tokenizer.json (default: the built-in toy tokenizer)"
    p = sub.add_parser("check", help="list every bad record as file:line: reason")
    p.add_argument("file", help=".jsonl (ours / LLaVA per line) or .json (LLaVA list)")
    p.add_argument("--max-len", type=int, default=None, help="flag records longer than this many tokens")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--num-latents", type=int, default=16)
    p.add_argument("--image-root", default=None, help="resolve image paths here instead of next to FILE")
    p = sub.add_parser("show", help="print one record as the model sees it, token by token")
    p.add_argument("file")
    p.add_argument("--index", type=int, default=0, help="0-based record index in file order")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--num-latents", type=int, default=16)
    p.add_argument("--image-root", default=None)
    p.add_argument("--no-answer", action="store_true", help="show the evaluation prompt (ends at assistant\\n)")
    p = sub.add_parser("convert-blink", help="BLINK parquet files -> our JSONL + images (needs pyarrow)")
    p.add_argument("sources", nargs="+", help="parquet files or directories holding them")
    p.add_argument("--out", required=True)
    p = sub.add_parser("synth", help="write the synthetic tasks (JSONL + PNG)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--n-train", type=int, default=256, help="per task")
    p.add_argument("--n-val", type=int, default=64, help="per task")
    p.add_argument("--n-test", type=int, default=128, help="per task")
    p.add_argument("--tasks", default=",".join(SYNTHETIC_TASKS), help="comma-separated subset of: %(default)s")
    p.add_argument("--image-size", type=int, default=112, help="side of the main image; multiple of 112")
    args = ap.parse_args(argv)
    for flag in ("max_len", "num_latents", "n_train", "n_val", "n_test", "image_size", "index"):
        v = getattr(args, flag, None)
        low = 1 if flag in ("max_len", "image_size", "n_train") else 0
        if v is not None and v < low:
            ap.error(f"--{flag.replace('_', '-')} {v}: must be at least {low}")
    try:
        return _run_cli(args)
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_cli(args):
    if args.cmd in ("check", "show"):
        processor = (Processor.from_pretrained(args.model, args.num_latents) if args.model
                     else default_processor(args.num_latents))
    if args.cmd == "check":
        good, problems, total = check_file(args.file, processor, args.max_len, args.image_root)
        for line in problems:
            print(line)
        if total == 0:
            print(f"{args.file} holds no records")
            return 1
        print(f"{len(problems)} bad record(s) of {total} in {args.file}" if problems
              else f"OK: {total} records in {args.file}")
        return 1 if problems else 0
    if args.cmd == "show":
        entries = read_records(args.file, args.image_root)
        if not 0 <= args.index < len(entries):
            print(f"--index {args.index} out of range: {args.file} has {len(entries)} records")
            return 1
        where, sample, err = entries[args.index]
        reasons = [err] if err else validate(sample, processor)
        if reasons:
            print(f"{where}: {'; '.join(reasons)}")
            return 1
        print(show(processor, sample, with_answer=not args.no_answer))
        return 0
    if args.cmd == "convert-blink":
        convert_blink(args.sources, args.out)
        return 0
    if args.cmd == "synth":
        tasks = [t for t in args.tasks.split(",") if t]
        unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
        if unknown or not tasks:
            raise ValueError(f"--tasks: unknown task(s) {unknown}; choose from {', '.join(SYNTHETIC_TASKS)}")
        paths = make_synthetic(args.out, args.n_train, args.n_val, args.n_test, args.seed, tasks,
                               args.image_size)
        for split, path in paths.items():
            print(f"{split}: {path}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
