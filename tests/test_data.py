"""
Tests for data.py. The oracle is transformers' Qwen2.5-VL processor (Qwen2VLImageProcessorPil +
Qwen2_5_VLProcessor.apply_chat_template), loaded from the same toy checkpoint files we build.

    python -m pytest -q tests/test_data.py
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import batching
import blink
import data
import demo
import masks

K = 4  # latent tokens in these tests


def random_image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng([seed, w, h])
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
        img = img.convert("RGBA")
        img.putalpha(alpha)
        return img
    return img.convert(mode) if mode != "RGB" else img


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return demo.build_tokenizer(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def ours(ckpt):
    return data.Processor.from_pretrained(ckpt, num_latents=K)


@pytest.fixture(scope="module")
def hf(ckpt, ours):
    transformers = pytest.importorskip("transformers")

    class ImageOnlyProcessor(transformers.Qwen2_5_VLProcessor):
        # the video processor needs torchvision; image-only use never touches it
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    tok.add_tokens(ours.latent_tokens, special_tokens=True)     # the same latents, as special tokens
    image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(ckpt)
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None,
                              chat_template=tok.chat_template)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return demo.make_synthetic(tmp_path_factory.mktemp("synth"), n_train=40, n_val=8, n_test=8, seed=3)


# ---------------------------------------------------------------------------- images

SIZES = [  # (w, h, mode, min_pixels, max_pixels)
    (10, 10, "RGB", 3136, 12845056),          # tiny: upscaled to the 56x56 minimum
    (1, 1, "RGB", 3136, 12845056),
    (3, 5, "L", 3136, 12845056),
    (2000, 30, "RGB", 3136, 12845056),        # very wide
    (30, 2000, "RGB", 3136, 12845056),        # very tall
    (57, 83, "RGBA", 3136, 12845056),         # odd sizes, alpha composited on white
    (224, 224, "P", 3136, 12845056),
    (640, 480, "RGB", 3136, 12845056),
    (1013, 777, "RGB", 3136, 12845056),
    (3000, 2000, "RGB", 3136, 1003520),       # large: downscaled to the pixel budget
    (300, 200, "RGB", 200000, 12845056),      # upscaled to a large min_pixels
    (100, 400, "RGB", 3136, 4 * 3136),
    (56, 56, "RGB", 3136, 3136),
]


@pytest.mark.parametrize("w,h,mode,min_pixels,max_pixels", SIZES)
def test_preprocess_image_matches_transformers(w, h, mode, min_pixels, max_pixels):
    transformers = pytest.importorskip("transformers")
    image = random_image(w, h, mode)
    ref = transformers.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(
        images=[image], return_tensors="np")
    pixel_values, grid_thw = data.preprocess_image(image, min_pixels=min_pixels, max_pixels=max_pixels)
    assert pixel_values.dtype == torch.float32 and grid_thw.dtype == torch.long
    assert grid_thw.tolist() == ref["image_grid_thw"][0].tolist()
    assert pixel_values.shape == ref["pixel_values"].shape == (int(grid_thw.prod()), 1176)
    np.testing.assert_allclose(pixel_values.numpy(), ref["pixel_values"], atol=1e-5, rtol=0)


def test_preprocess_image_rejects_extreme_aspect():
    with pytest.raises(ValueError, match="aspect ratio"):
        data.preprocess_image(Image.new("RGB", (2010, 10)))


def test_image_config_read_from_checkpoint(tmp_path):
    demo.build_tokenizer(tmp_path, min_pixels=1000, max_pixels=50000)
    p = data.Processor.from_pretrained(tmp_path)
    assert (p.image_config.min_pixels, p.image_config.max_pixels) == (1000, 50000)
    assert p.image_tokens(1000, 1000) == (196 // 14) ** 2 // 4        # smart_resize -> 196x196 under 50000
    enc = p.encode(data.Sample(images=[random_image(1000, 1000)], question="q", answer="a"))
    assert int(enc["image_grid_thw"].prod()) * 14 * 14 <= 50000


# ---------------------------------------------------------------------------- tokens

def test_tokenizer_build_is_fast_deterministic_and_qwen_ordered(tmp_path, ckpt):
    import time
    t0 = time.time()
    demo.build_tokenizer(tmp_path)
    assert time.time() - t0 < 2
    assert (tmp_path / "tokenizer.json").read_bytes() == (Path(ckpt) / "tokenizer.json").read_bytes()
    tok = data.Processor.from_pretrained(tmp_path, num_latents=0).tokenizer
    first = tok.token_to_id("<|endoftext|>")
    assert [tok.token_to_id(t) for t, _ in data.QWEN_ADDED_TOKENS] == list(range(first, first + 22))
    assert first == tok.get_vocab_size(with_added_tokens=False)   # added tokens follow the BPE vocab


def test_processor_ids(ours):
    tok = ours.tokenizer
    assert ours.image_token_id == tok.token_to_id("<|image_pad|>")
    assert ours.im_end_id == tok.token_to_id("<|im_end|>")
    assert ours.pad_id == tok.token_to_id("<|endoftext|>")
    assert [tok.token_to_id(t) for t in ours.latent_tokens] == list(range(ours.latent_token_id, ours.latent_token_id + K))
    assert ours.latent_token_id == tok.token_to_id("<|file_sep|>") + 1   # appended right after Qwen's tokens
    assert ours.vocab_size == ours.latent_token_id + K


TEXTS = ["Hello  world\n\n  it's 1234 apples!!", "ÄÖü café naïve 你好，世界 🙂", "a\r\nb\t\tc   \n",
         "I'LL see, they'RE here; x=3.14e-5 (A) the second image", "   leading and trailing   "]


def test_tokenizer_matches_transformers_on_arbitrary_text(ours, hf):
    # transformers' Qwen2Tokenizer rebuilds its pipeline from its own Qwen2 definition: ours must equal it
    # (trim_offsets aside: it moves offsets, never ids, and Qwen's own file has it off as ours does)
    def pipeline(tok):
        d = json.loads(tok.to_str())
        for p in d["pre_tokenizer"]["pretokenizers"]:
            p.pop("trim_offsets", None)
        return d["normalizer"], d["pre_tokenizer"]
    assert pipeline(ours.tokenizer) == pipeline(hf.tokenizer.backend_tokenizer)
    for text in TEXTS:
        assert ours.tokenizer.encode(text, add_special_tokens=False).ids == \
            hf.tokenizer(text, add_special_tokens=False)["input_ids"], text


def hf_encode(hf, parts, answer=None):
    """transformers: apply_chat_template(tokenize=True) on messages whose user content is parts
    (PIL images and strings, in order)."""
    content = [{"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p}
               for p in parts]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=answer is None,
                                 return_dict=True, return_tensors="np")
    return out


def make_cases():
    a, b, c = random_image(100, 60, seed=1), random_image(56, 56, seed=2), random_image(31, 300, "RGBA", seed=3)
    d = random_image(200, 90, seed=4)
    latents = "".join(data.LATENT_TOKEN.format(i) for i in range(K))
    q = "Which image is more similar to the first image?"
    mc = data.format_prompt(q, ["the second image", "the third image"])
    return {
        "text-only": (data.Sample(images=[], question="What is 2+2?", answer="4"),
                      ["What is 2+2?" + latents]),
        "one-image": (data.Sample(images=[a], question="What colour?", choices=["red", "blue"], answer="(B)"),
                      [a, data.format_prompt("What colour?", ["red", "blue"]) + latents]),
        "multi-image": (data.Sample(images=[b, c, d], question=q, choices=["the second image", "the third image"],
                                    answer="A"),
                        [b, c, d, mc + latents]),
        "llava-inline": (data.Sample(images=[a, d], question="Look at <image>\nand then at\n<image>\nWhich is brighter?",
                                     answer="The first one."),
                         ["Look at ", a, "and then at", d, "Which is brighter?" + latents]),
    }


@pytest.mark.parametrize("case", ["text-only", "one-image", "multi-image", "llava-inline"])
@pytest.mark.parametrize("with_answer", [False, True])
def test_token_ids_match_transformers(ours, hf, case, with_answer):
    sample, parts = make_cases()[case]
    enc = ours.encode(sample, with_answer=with_answer)
    ref = hf_encode(hf, parts, data.normalize_answer(sample.answer) if with_answer else None)
    ref_ids = ref["input_ids"][0].tolist()
    if with_answer:
        # the template ends the answer turn with "<|im_end|>\n"; our sequence ends at <|im_end|>
        assert ours.tokenizer.decode([ref_ids[-1]]) == "\n"
        ref_ids = ref_ids[:-1]
    assert enc["input_ids"].tolist() == ref_ids
    if sample.images:
        assert enc["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
        np.testing.assert_allclose(enc["pixel_values"].numpy(), ref["pixel_values"], atol=1e-5, rtol=0)
    else:
        assert enc["pixel_values"].shape == (0, 1176) and enc["image_grid_thw"].shape == (0, 3)


def test_processor_call_with_expanded_text_matches(ours, hf):
    """The other public route: render the template to text, then processor(text=, images=)."""
    sample, parts = make_cases()["multi-image"]
    content = [{"type": "image"} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts]
    text = hf.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    ref = hf(text=[text], images=[p for p in parts if isinstance(p, Image.Image)], return_tensors="np")
    assert ours.encode(sample, with_answer=False)["input_ids"].tolist() == ref["input_ids"][0].tolist()


# ---------------------------------------------------------------------------- labels and kinds

def test_labels_cover_exactly_the_answer(ours):
    sample = data.Sample(images=[random_image(80, 80)], question="How many?", answer="12 apples")
    enc = ours.encode(sample)
    ids, labels, kinds = enc["input_ids"], enc["labels"], enc["kinds"]
    answer_ids = ours.tokenizer.encode("12 apples<|im_end|>", add_special_tokens=False).ids
    n = len(answer_ids)
    assert ids[-n:].tolist() == answer_ids and ids[-1] == ours.im_end_id
    assert (labels[-n:] == ids[-n:]).all() and (labels[:-n] == -100).all()
    assert (kinds[-n:] == masks.ANSWER).all() and ((kinds == masks.ANSWER) == (labels != -100)).all()
    assert ours.decode(ids[labels != -100], skip_special_tokens=False) == "12 apples<|im_end|>"
    # image tokens: exactly the <|image_pad|>s, t*h*w/4 of them
    assert ((kinds == masks.IMAGE) == (ids == ours.image_token_id)).all()
    assert int((kinds == masks.IMAGE).sum()) == int(enc["image_grid_thw"].prod()) // 4
    # latents: K consecutive, right after the question, then <|im_end|>\n<|im_start|>assistant\n
    lat = (kinds == masks.LATENT).nonzero().flatten()
    assert lat.tolist() == list(range(int(lat[0]), int(lat[0]) + K))
    assert ids[lat].tolist() == list(range(ours.latent_token_id, ours.latent_token_id + K))
    after = ours.decode(ids[int(lat[-1]) + 1:-n], skip_special_tokens=False)
    assert after == "<|im_end|>\n<|im_start|>assistant\n"
    before = ours.decode(ids[:int(lat[0])], skip_special_tokens=False)
    assert before.endswith("<|vision_end|>How many?")
    # the system turn, up to its closing "\n", is SYSTEM; everything else is text
    system = ours.decode(ids[kinds == masks.SYSTEM], skip_special_tokens=False)
    assert system == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert (kinds[:int((kinds == masks.SYSTEM).sum())] == masks.SYSTEM).all()
    other = (kinds == masks.IMAGE) | (kinds == masks.LATENT) | (kinds == masks.SYSTEM) | (labels != -100)
    assert ((kinds == masks.TEXT) == ~other).all()


def test_no_answer_ends_at_generation_prompt(ours):
    enc = ours.encode(data.Sample(images=[], question="q", answer="A"), with_answer=False)
    assert (enc["labels"] == -100).all() and not (enc["kinds"] == masks.ANSWER).any()
    assert ours.decode(enc["input_ids"][-4:], skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_ids_on_qwens_real_layout():
    """With Qwen's 151,643 BPE entries in front (dummy ones: no download), every id is looked up,
    not assumed, and lands where Qwen2.5-VL's tokenizer puts it; the latents take the unused ids from 151665."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update({f"x{i}": i for i in range(len(vocab), 151643)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, s in data.QWEN_ADDED_TOKENS if s])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, s in data.QWEN_ADDED_TOKENS if not s])
    p = data.Processor(tok, num_latents=16)
    assert (p.pad_id, p.im_end_id, p.vision_start_token_id, p.vision_end_token_id, p.image_token_id) == \
        (151643, 151645, 151652, 151653, 151655)
    assert p.latent_token_id == 151665 and p.vocab_size == 151681 <= 151936


# ---------------------------------------------------------------------------- bad data

def write_png(path, size=(60, 60)):
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path.name


def test_every_bad_record_is_reported(tmp_path, ckpt, ours, capsys):
    write_png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really a png")
    good = {"images": ["ok.png"], "question": "Which?", "choices": ["x", "y"], "answer": "A", "task": "t"}
    lines = [
        good,                                                                   # 1
        {**good, "images": ["missing.png"]},                                    # 2
        {**good, "images": ["broken.png"]},                                     # 3
        {**good, "answer": ""},                                                 # 4
        {k: v for k, v in good.items() if k != "answer"},                      # 5
        {**good, "answer": "C"},                                                # 6
        {**good, "question": "<image> and <image>: which?"},                   # 7
        "{not json",                                                            # 8
        {**good, "question": "Which? " + "very long " * 200},                  # 9
        {**good, "choices": None, "answer": "7"},                              # 10 (open-ended: fine)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    expected = {
        2: "image not found", 3: "unreadable image", 4: "no answer", 5: "no answer",
        6: "answer 'C' is not among the choices (A, B)", 7: "2 <image> placeholder(s) for 1 image(s)",
        8: "not valid JSON", 9: "longer than --max-len 100",
    }
    good_samples, problems, total = data.check_file(path, ours, max_len=100)
    assert total == 10 and len(good_samples) == 2 and len(problems) == len(expected)
    for line, msg in expected.items():
        assert any(p.startswith(f"{path}:{line}: ") and msg in p for p in problems), (line, msg, problems)

    with pytest.raises(data.DataError) as e:
        data.load_dataset(path, processor=ours, max_len=100)
    assert all(p in str(e.value) for p in problems) and "8 bad record(s) of 10" in str(e.value)
    assert isinstance(e.value, ValueError)

    kept = data.load_dataset(path, skip_bad=True, processor=ours, max_len=100)
    assert [s.where for s in kept] == [f"{path}:1", f"{path}:10"]
    assert "skipped 8 bad record(s) of 10" in capsys.readouterr().err

    assert data.main(["check", str(path), "--max-len", "100", "--model", str(ckpt), "--num-latents", str(K)]) == 1
    out = capsys.readouterr().out
    assert all(p in out for p in problems)


def test_llava_json_with_line_numbers(tmp_path, ours):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png", (90, 40))
    records = [
        {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is red?"},
                                                        {"from": "gpt", "value": "The square."}]},
        {"id": "2", "image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image>\nCompare."},
                                                                   {"from": "gpt", "value": "Same."}]},
        {"id": "3", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]},
        {"id": "4", "image": "a.png", "conversations": [{"from": "human", "value": "No marker."},
                                                        {"from": "gpt", "value": "Hm."}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records, indent=2))
    text = path.read_text().splitlines()
    line_of = {r["id"]: next(i + 1 for i, ln in enumerate(text) if f'"id": "{r["id"]}"' in ln) - 1 for r in records}
    good, problems, total = data.check_file(path, ours)
    assert total == 4 and len(good) == 1 and good[0].where == f"{path}:{line_of['1']}"
    assert any(p.startswith(f"{path}:{line_of['2']}: ") and "1 <image> placeholder(s) for 2 image(s)" in p
               for p in problems)
    assert any(p.startswith(f"{path}:{line_of['3']}: ") and "image not found" in p and "no answer" in p
               for p in problems)
    assert any(p.startswith(f"{path}:{line_of['4']}: ") and "0 <image> placeholder(s) for 1 image(s)" in p
               for p in problems)
    enc = ours.encode(good[0])
    assert ours.decode(enc["input_ids"], skip_special_tokens=False).count("<|vision_end|>What is red?") == 1


def test_utf8_byte_order_mark_is_read_as_text(tmp_path):
    """Editors on some systems start UTF-8 files with a byte-order mark: the records are the same."""
    write_png(tmp_path / "a.png")
    rows = [{"id": "1", "images": ["a.png"], "question": "Caf\u00e9?", "choices": ["x", "y"], "answer": "A"},
            {"id": "2", "question": "2 + 2?", "answer": "4"}]
    for name, text in (("d.jsonl", "".join(json.dumps(r) + "\n" for r in rows)), ("d.json", json.dumps(rows))):
        plain, marked = tmp_path / name, tmp_path / f"bom_{name}"
        plain.write_text(text, encoding="utf-8")
        marked.write_text(text, encoding="utf-8-sig")
        assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
        ours, theirs = data.read_records(plain), data.read_records(marked)
        assert [(s.question, s.answer, s.images, e) for _, s, e in ours] == \
            [(s.question, s.answer, s.images, e) for _, s, e in theirs] and len(ours) == 2
        assert [w.split(":")[-1] for w, _, _ in ours] == [w.split(":")[-1] for w, _, _ in theirs]


# ---------------------------------------------------------------------------- synthetic tasks

def test_synthetic_is_deterministic(tmp_path):
    a = demo.make_synthetic(tmp_path / "a", n_train=12, n_val=4, n_test=4, seed=7)
    b = demo.make_synthetic(tmp_path / "b", n_train=12, n_val=4, n_test=4, seed=7)
    c = demo.make_synthetic(tmp_path / "c", n_train=12, n_val=4, n_test=4, seed=8)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 3 + 20 * (1 + 1 + 3 + 3)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert a["train"].read_text() == b["train"].read_text() != c["train"].read_text()


def test_synthetic_is_balanced_and_leak_free(synth):
    recs = data.load_dataset(synth["train"])
    by_task = {}
    for r in recs:
        by_task.setdefault(r.task, []).append(r)
    assert sorted(by_task) == sorted(demo.SYNTHETIC_TASKS) and all(len(v) == 40 for v in by_task.values())
    for task, rs in by_task.items():
        answers = [r.answer for r in rs]
        counts = {a: answers.count(a) for a in set(answers)}
        expected = [str(n) for n in data.COUNT_RANGE] if task == "counting" else ["A", "B"]
        assert sorted(counts) == sorted(expected)
        assert max(counts.values()) - min(counts.values()) <= 1, (task, counts)
        # the text is the same for every sample of a task: the answer can only come from the image
        assert len({r.text for r in rs}) == 1
        assert data.chance(rs[0]) == (1 / 8 if task == "counting" else 1 / 2)
    # tasks are interleaved in the file, not in blocks
    assert len({r.task for r in recs[:12]}) > 1


def cells(img, n=4):
    """Centre colour of each cell of an n x n grid -> (n, n, 3) int array."""
    s = img.shape[0] // n
    return img[s // 2::s, s // 2::s].astype(int)


def solve(record):
    """A pixel-reading oracle: proves every label is recoverable from the images alone."""
    ims = [np.asarray(Image.open(p)) for p in record.images]
    if record.task == "counting":
        return str(int((cells(ims[0]).sum(-1) > 3 * 128).sum()))
    if record.task == "object_localization":
        s = ims[0].shape[0] // 4
        for (r, q) in zip(*np.nonzero(cells(ims[0]).min(-1) == 255)):
            border = ims[0][r * s + 1, q * s + 1].astype(int)
            return "A" if border[0] > border[2] else "B"
    if record.task == "visual_similarity":
        ref = cells(ims[0], 2)
        d = [np.abs(cells(im, 2) - ref).sum() for im in ims[1:]]
        return "AB"[int(np.argmin(d))]
    if record.task == "jigsaw":
        puzzle = ims[0].astype(int)
        top_left, bottom_left, top_right = puzzle[0, 0], puzzle[-1, 0], puzzle[0, -1]
        # the half that runs into the hole is the one whose colour differs from the top-left
        hole = bottom_left if (bottom_left != top_left).any() else top_right
        return "AB"[int(np.argmin([np.abs(im.astype(int).mean((0, 1)) - hole).sum() for im in ims[1:]]))]
    raise AssertionError(record.task)


def test_synthetic_labels_are_readable_from_pixels(synth):
    recs = data.load_dataset(synth["train"]) + data.load_dataset(synth["test"])
    wrong = [(r.id, r.answer, solve(r)) for r in recs if solve(r) != r.answer]
    assert not wrong


def test_synthetic_sizes_suit_a_tiny_model(synth, ours):
    for r in data.load_dataset(synth["val"]):
        enc = ours.encode(r)
        n_image = int((enc["kinds"] == masks.IMAGE).sum())
        assert n_image == {"counting": 16, "object_localization": 16, "visual_similarity": 12, "jigsaw": 24}[r.task]
        assert len(enc["input_ids"]) < 110


# ---------------------------------------------------------------------------- batching

@pytest.fixture(scope="module")
def encoded(synth, ours):
    return [ours.encode(r) for r in data.load_dataset(synth["val"])[:6]]


def test_collate(encoded, ours):
    b = batching.collate(encoded, ours.pad_id)
    B, L = len(encoded), max(len(e["input_ids"]) for e in encoded)
    for k in ("input_ids", "labels", "kinds", "attention_mask", "segment_ids"):
        assert b[k].shape == (B, L) and b[k].dtype == torch.long
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        assert b["input_ids"][i, :n].tolist() == e["input_ids"].tolist()
        assert (b["input_ids"][i, n:] == ours.pad_id).all() and (b["labels"][i, n:] == -100).all()
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (L - n) == b["segment_ids"][i].tolist()
    assert torch.equal(b["pixel_values"], torch.cat([e["pixel_values"] for e in encoded]))
    assert torch.equal(b["image_grid_thw"], torch.cat([e["image_grid_thw"] for e in encoded]))
    real = sum(len(e["input_ids"]) for e in encoded)
    assert batching.packing_efficiency([b]) == pytest.approx(real / (B * L))
    left = batching.collate(encoded, ours.pad_id, padding_side="left")
    assert left["input_ids"][0, -len(encoded[0]["input_ids"]):].tolist() == encoded[0]["input_ids"].tolist()


def test_pack(encoded, ours):
    lengths = [len(e["input_ids"]) for e in encoded]
    max_len = 2 * max(lengths) + 5
    batches = batching.pack(encoded, max_len, ours.pad_id)
    assert len(batches) < len(encoded)
    seen = []
    for b in batches:
        for k in ("input_ids", "labels", "kinds", "attention_mask", "segment_ids"):
            assert b[k].shape == (1, max_len)
        seg = b["segment_ids"][0]
        n = int(seg.max())
        real = int((seg > 0).sum())
        assert seg[:real].tolist() == sorted(seg[:real].tolist()) and (seg[real:] == 0).all()
        assert set(seg[:real].tolist()) == set(range(1, n + 1))
        assert (b["attention_mask"][0] == (seg > 0).long()).all() and (b["labels"][0, real:] == -100).all()
        # each segment is one encoded sample, intact, in order; its images come in the same order
        grids = []
        for s in range(1, n + 1):
            ids = b["input_ids"][0, seg == s].tolist()
            j = next(j for j, e in enumerate(encoded) if j not in seen and e["input_ids"].tolist() == ids)
            seen.append(j)
            grids.append(encoded[j]["image_grid_thw"])
        assert torch.equal(b["image_grid_thw"], torch.cat(grids))
        assert b["pixel_values"].shape[0] == int(b["image_grid_thw"].prod(-1).sum())
    assert sorted(seen) == list(range(len(encoded)))
    assert batching.packing_efficiency(batches) == pytest.approx(sum(lengths) / (len(batches) * max_len))
    with pytest.raises(ValueError, match="more than the packing length"):
        batching.pack(encoded, min(lengths) - 1)


def test_pack_is_first_fit():
    fake = [{"input_ids": torch.zeros(n, dtype=torch.long), "labels": torch.zeros(n, dtype=torch.long),
             "kinds": torch.zeros(n, dtype=torch.long), "pixel_values": torch.zeros(0, 1176),
             "image_grid_thw": torch.zeros(0, 3, dtype=torch.long)} for n in (6, 5, 4, 3)]
    batches = batching.pack(fake, 10)
    # 6 -> bin1, 5 -> bin2 (no room in 1), 4 -> bin1 (first with room), 3 -> bin2
    assert [b["segment_ids"][0].tolist() for b in batches] == [[1] * 6 + [2] * 4, [1] * 5 + [2] * 3 + [0] * 2]


# ---------------------------------------------------------------------------- streaming

def test_step_sampler_reads_each_ranks_share_of_the_seeded_order():
    """Per step: the ranks' shares are disjoint and make up the global batch of the seeded
    per-epoch permutation; starting at step k (a resumed run) replays the same samples."""
    n, G = 23, 6
    full = [list(batching.StepSampler(n, G, r, 3, seed=7, total_steps=8)) for r in range(3)]
    assert all(len(f) == 8 for f in full) and len(batching.StepSampler(n, G, 0, 3, 7, 5, 8)) == 3
    for step in range(8):
        epoch, k = divmod(step, n // G)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(7 + epoch))
        assert sum((f[step] for f in full), []) == order[k * G:(k + 1) * G].tolist()
    assert list(batching.StepSampler(n, G, 1, 3, seed=7, start_step=5, total_steps=8)) == full[1][5:]
    with pytest.raises(ValueError, match="does not split over 4"):
        batching.StepSampler(n, G, 0, 4)


def test_rank_shards_cover_the_set_once_with_weight_0_repeats(ours, synth):
    records = data.load_dataset(synth["val"])[:7]
    ds, seen = batching.EncodedRecords(records, ours), []
    for rank in range(3):
        batches = [batching.ValBatches(ours.pad_id)([ds[j] for j in ids]) for ids in batching.RankShard(7, rank, 3, 2)]
        assert len(batches) == 2                 # ceil(ceil(7 / 3) / 2) on every rank
        for ids, (b, w) in zip(batching.RankShard(7, rank, 3, 2), batches):
            assert b["input_ids"].shape[0] == len(ids) == len(w)
            seen += [(j % 7, float(x)) for j, x in zip(ids, w)]
    assert sorted(i for i, w in seen if w == 1) == list(range(7))
    assert len([w for _, w in seen if w == 0]) == 3 * 3 - 7


def test_step_batches_pack_without_padding_to_the_budget(encoded, ours):
    """Packed micro-batches: every sample once, intact, each its own segment; a sequence is as
    long as its samples rounded up to a multiple of 8, never padded to the budget nor over it;
    a sample longer than the budget gets a sequence of its own. Budget 0: padded batches."""
    lengths = sorted(len(e["input_ids"]) for e in encoded)
    budget = lengths[-1] + lengths[0] + 8
    micro = batching.StepBatches(ours.pad_id, budget, pixel_dtype=torch.bfloat16)(encoded)
    assert 1 < len(micro) < len(encoded)
    got = []
    for b in micro:
        L, seg = b["input_ids"].shape[1], b["segment_ids"][0]
        real = int((seg > 0).sum())
        assert L % 8 == 0 and real <= L < real + 8 and L <= budget
        got += [len(b["input_ids"][0, seg == s]) for s in range(1, int(seg.max()) + 1)]
        assert b["pixel_values"].dtype == torch.bfloat16
    assert sorted(got) == lengths
    assert sum(batching.num_targets(b) for b in micro) == sum(int((e["labels"] != -100).sum()) for e in encoded)
    alone = batching.StepBatches(ours.pad_id, 16)(encoded)           # every sample over the budget
    assert [b["input_ids"].shape[1] for b in alone] == [-(-n // 8) * 8 for n in reversed(lengths)]
    padded = batching.StepBatches(ours.pad_id, 0, batch_size=4)(encoded)
    assert [b["input_ids"].shape[0] for b in padded] == [4, 2]
    assert torch.equal(padded[0]["pixel_values"], torch.cat([e["pixel_values"] for e in encoded[:4]]))
    marked = batching.StepBatches(ours.pad_id, 0, prepare=lambda b: {**b, "n_targets": 5})(encoded)
    assert all(b["n_targets"] == 5 and batching.num_targets(b) == 5 for b in marked)


def test_loader_leaves_the_global_rng_alone(encoded, ours, synth):
    """Starting a DataLoader must not draw from torch's global RNG: dropout replays exactly
    after --resume only if the stream is where the checkpoint left it."""
    records = data.load_dataset(synth["val"])[:4]
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    loader = batching.loader(batching.EncodedRecords(records, ours), [[0, 1], [2, 3]], batching.StepBatches(ours.pad_id, 512))
    assert len(list(loader)) == 2
    assert torch.equal(torch.rand(3), want)


def test_progress_line_only_for_slow_work(monkeypatch, capsys):
    clock = iter([100.0, 100.5, 101.0, 105.0, 105.2, 106.5, 107.0])
    monkeypatch.setattr(data.time, "time", lambda: next(clock))
    p = data.progress_line("checking x.jsonl")          # starts at t=100
    p(1, 10)                                             # 0.5 s in: quiet
    p(2, 10)                                             # 1 s: quiet
    p(5, 10)                                             # 5 s: shown, ETA 5 s
    p(6, 10)                                             # 0.2 s after the last line: quiet
    p(8, 10)                                             # shown
    p(10, 10)                                            # done: shown, with a newline
    err = capsys.readouterr().err
    assert err == ("\rchecking x.jsonl: 5/10, 5s, ETA 5s\rchecking x.jsonl: 8/10, 6s, ETA 2s"
                   "\rchecking x.jsonl: 10/10, 7s, ETA 0s\n")


def test_check_file_decodes_a_shared_image_once(tmp_path, monkeypatch):
    random_image(64, 48).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"images": ["a.png"], "question": "q?", "answer": "7"})
                                              + "\n" for _ in range(5)))
    calls = []
    real = data._check_image
    monkeypatch.setattr(data, "_check_image", lambda p: calls.append(p) or real(p))
    good, problems, total = data.check_file(tmp_path / "d.jsonl")
    assert len(good) == total == 5 and not problems and len(calls) == 1


# ---------------------------------------------------------------------------- CLI and BLINK

def test_show_prints_kinds_and_counts(synth, ckpt, capsys):
    assert data.main(["show", str(synth["val"]), "--index", "0", "--num-latents", "3", "--model", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "<|latent_0|>" in out and " L " in out and " I " in out and " a " in out
    assert "latent 3, answer 2" in out and "per image: [" in out


def test_convert_blink(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    def png(color):
        import io
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), color).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    prompt = ("Given the first image with the lower right corner missing, can you tell which one of the second "
              "image or the third image is the missing part?\nSelect from the following choices.\n"
              "(A) the second image\n(B) the third image")
    rows = [
        {"idx": "val_Jigsaw_1", "question": "Which image is the missing part?", "sub_task": "Jigsaw",
         "image_1": png("red"), "image_2": png("green"), "image_3": png("blue"), "image_4": None,
         "choices": ["the second image", "the third image"], "answer": "(B)", "prompt": prompt, "explanation": ""},
        {"idx": "val_Jigsaw_2", "question": "Which image is the missing part?", "sub_task": "Jigsaw",
         "image_1": png("red"), "image_2": png("green"), "image_3": png("blue"), "image_4": None,
         "choices": ["the second image", "the third image"], "answer": "hidden", "prompt": prompt, "explanation": ""},
    ]
    (tmp_path / "BLINK" / "Jigsaw").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "BLINK" / "Jigsaw" / "val-00000-of-00001.parquet")
    assert blink.main([str(tmp_path / "BLINK"), "--out", str(tmp_path / "out")]) == 0
    recs = data.load_dataset(tmp_path / "out" / "Jigsaw_val.jsonl")
    assert len(recs) == 1
    r = recs[0]
    assert r.answer == "B" and r.task == "Jigsaw" and r.text == prompt and len(r.images) == 3
    assert np.asarray(Image.open(r.images[2]))[0, 0].tolist() == [0, 0, 255]
    # a prompt that is just BLINK's standard wording is stored as question + choices
    assert data.format_prompt("Is the car beneath the cat?", ["yes", "no"]) == \
        "Is the car beneath the cat?\nSelect from the following choices.\n(A) yes\n(B) no"


def test_num_tokens_is_the_encoded_length(ours, tmp_path):
    """Counted without pixels and with one image pad per image tokenized: still len(encode())."""
    paths = []
    for k, (w, h) in enumerate([(640, 480), (57, 300), (1000, 90)]):
        paths.append(str(tmp_path / f"{k}.png"))
        random_image(w, h, seed=k).save(paths[-1])
    for images, question in [(paths, "Which?"), (paths[1:], "<image> and\n<image>: same?"), ([], "Hi?")]:
        s = data.Sample(images=images, question=question, choices=["x", "y"], answer="B")
        for with_answer in (True, False):
            assert ours.num_tokens(s, with_answer) == len(ours.encode(s, with_answer)["input_ids"])
