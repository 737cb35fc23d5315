"""
A record's way to model inputs, exactly as the reference Qwen2.5-VL and Qwen3-VL processors make
them: records (our JSONL, LLaVA-style JSON; checked, every bad one named), images, the chat
template, and the Processor that tags every token with its *kind* so masks.py can build the
visual bottleneck:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|image_pad|>*n1<|vision_end|> ... question ... <|latent_0|>..<|latent_K-1|>
    <|im_end|>\\n<|im_start|>assistant\\n  A<|im_end|>
    kinds:  system ..... text, image ...... text ...... latent ...... text ...... answer
            (masks.py's TEXT, IMAGE, LATENT, ANSWER, SYSTEM; the system turn ends at its "\\n")

It mirrors (transformers is the oracle in tests/, never imported here) Qwen2_5_VLProcessor +
apply_chat_template, token for token, plus the K latent tokens after the question (the paper's
Q' = Q + L; masks.place_latents), and Qwen3VLProcessor for a Qwen3-VL checkpoint (its image
settings and chat template); images.py mirrors the image processor. Batches are batching.py's;
BLINK converts with blink.py; the demo's tokenizer and synthetic tasks are demo.py's.

Run:
    python data.py check data/train.jsonl --max-len 4096 --model runs/demo/base
    python data.py show runs/demo/data/test.jsonl --index 0 --model runs/demo/base   # token by token
"""
import argparse
import codecs
import concurrent.futures
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer

import faults
import masks
from images import (ImageConfig, ImageError, image_size, is_qwen3, preprocess_image, preprocess_np,  # noqa: F401
                    smart_resize, to_rgb)
from images import check_image as _check_image

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


COUNT_RANGE = range(2, 10)                    # open-ended counting answers (the demo's task): chance 1/8
SPLITS = {"train": 0, "val": 1, "test": 2}    # dataset splits by name (numbered: demo.py seeds by them)


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
    """A dataset file's text (a leading UTF-8 byte-order mark, as some editors write, dropped);
    a directory or a file that is not UTF-8 is a DataError that names the file, line and byte."""
    path = Path(path)
    if path.is_dir():
        raise DataError([], 0, path, f"{path} is a directory, not a dataset file (.jsonl or .json)")
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = raw.count(b"\n", 0, at) + 1
        raise DataError([], 0, path, f"{path}:{line}: not UTF-8 text (byte {at}: "
                        f"{raw[at:at + 1]!r}); save the file as UTF-8") from None


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
        except (ValueError, RecursionError) as e:         # also a number of 5000 digits
            return [(f"{path}:{getattr(e, 'lineno', 1)}", None, f"not valid JSON ({getattr(e, 'msg', e)})")]
        if not isinstance(whole, list):
            return [(f"{path}:1", None, "expected a JSON list of records")]
        raw = list(_json_list_with_lines(text))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw.append((n, json.loads(line), None))
            except (ValueError, RecursionError) as e:     # also a number of 5000 digits
                raw.append((n, None, f"not valid JSON ({getattr(e, 'msg', e)})"))
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
    for v in value:
        _utf8(v, "image path")
    return [str(root / v) for v in value]


MAX_CHOICES = 26                  # options are lettered A..Z


def _utf8(text, field):
    """`text` unless it holds a lone surrogate (JSON allows "\ud800"; no tokenizer, file or
    terminal does): ValueError naming the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the {field} is not valid text (a lone surrogate {text[e.start]!r} at "
                         f"character {e.start})") from None
    return text


def _answer(value):
    """A record's answer as text: a string, or a finite JSON number ("answer": 7); anything else
    (a list, true, NaN, an object) is a ValueError."""
    if value is None:
        return None
    if isinstance(value, str):
        return _utf8(value, "answer")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not np.isfinite(value):
            raise ValueError(f"answer {value} is not a finite number")
        return str(int(value) if isinstance(value, float) and value.is_integer() else value)
    raise ValueError(f"answer must be a string (an option letter) or a number, not {json.dumps(value)[:40]}")


def _our_sample(d, root):
    """{"images": [...], "question": ..., "choices": [...]?, "answer": "A", "task": ...}"""
    if not isinstance(d.get("question"), str) or not d["question"].strip():
        raise ValueError("no question")
    choices = d.get("choices")
    if choices is not None and (not isinstance(choices, list) or len(choices) < 2
                                or not all(isinstance(c, str) for c in choices)):
        raise ValueError("choices must be a list of at least 2 strings")
    if choices is not None and len(choices) > MAX_CHOICES:
        raise ValueError(f"{len(choices)} choices: at most {MAX_CHOICES}, lettered A to Z")
    if d.get("prompt") is not None and not isinstance(d["prompt"], str):
        raise ValueError("prompt must be a string")
    for field in ("question", "prompt", "task", "id"):
        if isinstance(d.get(field), str):
            _utf8(d[field], field)
    for c in choices or []:
        _utf8(c, "choice")
    return Sample(images=_paths(d.get("images", d.get("image")), root), question=d["question"],
                  answer=_answer(d.get("answer")), choices=choices or None,
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
    question = _utf8(str(turns[0].get("value", "")), "question")
    return Sample(images=_paths(d.get("image", d.get("images")), root), question=question,
                  answer=_answer(answer), task=_utf8(str(d.get("task", "")), "task"),
                  id=_utf8(str(d.get("id", "")), "id"), llava=True)


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
        try:
            n = processor.num_tokens(sample)
        except ValueError as e:           # an image gone or changed since its check (ImageError)
            return reasons + [str(e)]
        if n > max_len:
            reasons.append(f"{n} tokens, longer than --max-len {max_len}")
    return reasons


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
# The hub's chat templates, verbatim (templates/*.jinja): only written into a checkpoint's
# tokenizer_config.json (the demo's, the tests', an export's) so that transformers renders what
# render_chat() renders; we never run Jinja ourselves. Qwen3-VL's renders LIVR's single user
# turn as Qwen2.5-VL's does, minus the default system turn.
TEMPLATES = Path(__file__).resolve().parent / "templates"
QWEN25VL_CHAT_TEMPLATE = (TEMPLATES / "qwen2_5_vl.jinja").read_text(encoding="utf-8")
QWEN3VL_CHAT_TEMPLATE = (TEMPLATES / "qwen3_vl.jinja").read_text(encoding="utf-8")


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

    def __init__(self, tokenizer, image_config=None, num_latents=16, system_prompt=DEFAULT_SYSTEM_PROMPT,
                 latent_position="after"):
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageConfig()
        self.num_latents = num_latents
        self.system_prompt = system_prompt
        if latent_position not in masks.LATENT_POSITIONS:
            raise ValueError(f"latent_position {latent_position!r}: one of {masks.LATENT_POSITIONS}")
        self.latent_position = latent_position        # where masks.place_latents puts them
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
    def from_pretrained(cls, path, num_latents=16, min_pixels=None, max_pixels=None, latent_position="after"):
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
        return cls(tokenizer, image_config, num_latents, None if is_qwen3(path) else DEFAULT_SYSTEM_PROMPT,
                   latent_position)

    def image_tokens(self, width, height):
        """<|image_pad|> count for an image of this size (no pixels touched)."""
        c = self.image_config
        h, w = smart_resize(height, width, c.patch_size * c.merge_size, c.min_pixels, c.max_pixels)
        return (h // c.patch_size) * (w // c.patch_size) // c.merge_size ** 2

    def preprocess(self, image):
        """numpy (pixel_values [N, 1176], (1, h, w)) with this checkpoint's settings."""
        c = self.image_config
        return preprocess_np(image, c.min_pixels, c.max_pixels, c.image_mean, c.image_std,
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
        if not self.num_latents:
            return parts
        return masks.place_latents(parts, "".join(self.latent_tokens), position=self.latent_position)

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
            image_token_counts = [self.image_tokens(*image_size(im)) for im in sample.images]
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
        counts = [self.image_tokens(*image_size(im)) for im in sample.images]
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
    faults.safe_output()              # paths and task names never reach the terminal raw
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                 epilog=__doc__[__doc__.index("Run:"):],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    model_help = "checkpoint dir with tokenizer.json (e.g. runs/demo/base, or a hub checkpoint's)"
    p = sub.add_parser("check", help="list every bad record as file:line: reason")
    p.add_argument("file", help=".jsonl (ours / LLaVA per line) or .json (LLaVA list)")
    p.add_argument("--max-len", type=int, default=None,
                   help="flag records longer than this many tokens (needs --model: its tokenizer counts)")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--num-latents", type=int, default=16)
    p.add_argument("--image-root", default=None, help="resolve image paths here instead of next to FILE")
    p = sub.add_parser("show", help="print one record as the model sees it, token by token")
    p.add_argument("file")
    p.add_argument("--index", type=int, default=0, help="0-based record index in file order")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--num-latents", type=int, default=16)
    p.add_argument("--image-root", default=None)
    p.add_argument("--no-answer", action="store_true", help="show the evaluation prompt (ends at assistant\\n)")
    args = ap.parse_args(argv)
    for flag in ("max_len", "num_latents", "index"):
        v = getattr(args, flag, None)
        low = 1 if flag == "max_len" else 0
        if v is not None and v < low:
            ap.error(f"--{flag.replace('_', '-')} {v}: must be at least {low}")
    if args.cmd == "check" and args.max_len is not None and not args.model:
        ap.error("--max-len counts tokens with a checkpoint's tokenizer: pass --model too")
    try:
        return _run_cli(args)
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_cli(args):
    processor = Processor.from_pretrained(args.model, args.num_latents) if args.model else None
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


if __name__ == "__main__":
    sys.exit(main())
