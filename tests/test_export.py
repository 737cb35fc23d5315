"""export.py: a trained LIVR run, exported, runs unchanged in transformers (the oracle) and gives
the tokens evaluate.py gives on the original checkpoint; this project reads the export back
with the same predictions; no pickle files; re-export is atomic; a base with no spare rows gets
a grown table. Tiny random bases trained a few steps with train.main, fp32, CPU."""
import hashlib
import json
import os

import pytest
import torch
from PIL import Image

import checkpoint
import data
import demo
import evaluate
import export
import model
import train

transformers = pytest.importorskip("transformers")

K = 4


def make_base(path, spare_rows=True):
    """demo.make_demo_base, or the same model with the table cut to the tokenizer's size: no
    spare rows for the latent ids, as a base whose table was resized to its tokenizer would be."""
    demo.make_demo_base(str(path), std=0.1, seed=0)
    if spare_rows:
        return str(path)
    m = checkpoint.load_pretrained(str(path))
    rows = data.Processor.from_pretrained(path, num_latents=0).vocab_size
    m.model.embed_tokens.weight = torch.nn.Parameter(m.model.embed_tokens.weight[:rows].clone())
    m.lm_head.weight = m.model.embed_tokens.weight
    m.cfg.text.vocab_size = rows
    os.remove(os.path.join(path, "model.safetensors"))
    checkpoint.save_pretrained(m, str(path))
    return str(path)


def train_run(root, name, base, splits, mode, latents=K, extra=()):
    """Stage 1 then stage 2, one epoch each (6 steps), at a learning rate high enough that the
    LoRA factors / LM weights and the latent rows move visibly. Returns RUN/stage2/final."""
    run = str(root / f"run-{name}")
    common = ["--model", base, "--data", str(splits["train"]), "--val", str(splits["val"]),
              "--run-dir", run, "--batch-size", "2", "--global-batch", "4", "--log-every", "100",
              "--latents", str(latents), "--epochs", "1", "--lr", "5e-3", "--train", mode, *extra]
    train.main(["--stage", "1", *common])
    train.main(["--stage", "2", *common])
    return os.path.join(run, "stage2", "final")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (checkpoint, export)} for a LoRA run, a full-FT run, a LoRA run on a base with no
    spare rows, a Direct SFT run (no latents) and a run with one shared latent row placed before
    the prompt; plus the test records (new to training: the synthetic test split)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # tiny matmuls: more threads only wait on each other
    root = tmp_path_factory.mktemp("export")
    splits = demo.make_synthetic(str(root / "data"), n_train=6, n_val=2, n_test=3, seed=3)
    spare, tight = make_base(root / "base"), make_base(root / "base-tight", spare_rows=False)
    out = {}
    for name, base, mode, k, extra in (("lora", spare, "lora", K, ()), ("full", spare, "full", K, ()),
                                       ("grown", tight, "lora", K, ()), ("sft", spare, "lora", 0, ()),
                                       ("before", spare, "lora", K, ("--latent-position", "before",
                                                                     "--shared-latent"))):
        ckpt = train_run(root, name, base, splits, mode, k, extra)
        # small shards, so both loaders must follow the index across several files
        out[name] = (ckpt, export.export(ckpt, str(root / "hub" / name), max_shard_bytes=400_000))
    yield out, str(splits["test"])
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def no_video_processor():
    """AutoProcessor also loads Qwen's video processor, which needs torchvision; without it
    installed, load None in its place (images only: it is never called)."""
    try:
        import torchvision  # noqa: F401
        yield
        return
    except ImportError:
        pass
    import transformers.processing_utils as pu

    class NoVideo:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return None
    lookup = pu._LazyAutoProcessorMapping.__getitem__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pu._LazyAutoProcessorMapping, "__getitem__",
                   lambda self, key: NoVideo if key == "video_processor" else lookup(self, key))
        mp.setattr(transformers.Qwen2_5_VLProcessor, "check_argument_for_proper_class",
                   lambda self, name, arg: None if arg is None else
                   transformers.ProcessorMixin.check_argument_for_proper_class(self, name, arg))
        yield


def hf_inputs(processor, record):
    """transformers' own prompt: apply_chat_template on the record as a user message (images
    where its <image> placeholders are, else first; then the text), as a harness would build it."""
    text = record.text
    if data.IMAGE_PLACEHOLDER in text:
        pieces = [p.strip("\n") for p in text.split(data.IMAGE_PLACEHOLDER)]
        content = [{"type": "text", "text": pieces[0]}]
        for image, piece in zip(record.images, pieces[1:]):
            content += [{"type": "image", "image": Image.open(image)}, {"type": "text", "text": piece}]
        content = [c for c in content if c.get("text", True) != ""]
    else:
        content = [{"type": "image", "image": Image.open(p)} for p in record.images]
        content.append({"type": "text", "text": text})
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                         add_generation_prompt=True, return_dict=True,
                                         return_tensors="pt")


def records(test_file, tmp_path):
    """The held-out synthetic records, plus a text-only one and a LLaVA-style one with an
    <image> placeholder mid-question."""
    recs = data.load_dataset(test_file)
    img = recs[0].images[0]
    return recs + [data.Sample(images=[], question="How many squares are in the image?", answer="3",
                               task="counting"),
                   data.Sample(images=[img], question="Look at <image>\nHow many squares are in the image?",
                               answer="4", task="counting")]


def until_stop(tokens, stops):
    out = []
    for t in tokens:
        out.append(t)
        if t in stops:
            break
    return out


# ----------------------------------------------------------------------------------------------
# transformers on the export == evaluate.py on the checkpoint

@pytest.mark.parametrize("name", ["lora", "full", "grown", "sft", "before"])
def test_transformers_generates_what_evaluate_generates(runs, name, no_video_processor, tmp_path):
    (ckpt, out), test_file = runs[0][name], runs[1]
    hf = transformers.AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    hf_proc = transformers.AutoProcessor.from_pretrained(out)
    m, proc, _ = evaluate.load_checkpoint(ckpt)
    k = 0 if name == "sft" else K
    assert m.num_latents == k and hf.generation_config.suppress_tokens == \
        (list(range(m.latent_token_id, m.latent_token_id + K)) if k else None)
    recs = records(test_file, tmp_path)
    ours = evaluate.evaluate(m, proc, recs, batch_size=4, max_new_tokens=8)
    stops = {proc.im_end_id, proc.pad_id}
    latent_ids = slice(m.latent_token_id, m.latent_token_id + K) if k else slice(0, 0)
    for r, result in zip(recs, ours):
        enc = proc.encode(r, with_answer=False)
        inputs = hf_inputs(hf_proc, r)
        # the same prompt, latents included, at the same place
        assert inputs["input_ids"][0].tolist() == enc["input_ids"].tolist(), r.id
        # the same function: every logit but the latent ids' (the tied head's rows there are
        # now the latent rows; neither side ever generates them)
        with torch.no_grad():
            ref = hf(**inputs).logits[0]
            got = m(enc["input_ids"][None], enc["pixel_values"], enc["image_grid_thw"])[0]
        ref[:, latent_ids] = got[:, latent_ids] = 0
        assert (ref - got).abs().max() <= 1e-4 * ref.abs().max(), r.id
        # the same greedy tokens, and the same text evaluate.py scored
        new = hf.generate(**inputs, do_sample=False, max_new_tokens=8)[0, inputs["input_ids"].shape[1]:]
        mine = m.generate(enc["input_ids"][None], enc["pixel_values"], enc["image_grid_thw"],
                          max_new_tokens=8, eos_token_id=proc.im_end_id)[0]
        assert until_stop(new.tolist(), stops) == until_stop(mine.tolist(), stops), r.id
        text = hf_proc.decode(until_stop(new.tolist(), stops), skip_special_tokens=True).strip()
        assert text == result["output"], r.id


def test_latent_tokens_and_template(runs, no_video_processor):
    ckpt, out = runs[0]["lora"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    first = json.load(open(os.path.join(out, "config.json")))["livr"]["latent_token_id"]
    latents = "".join(data.LATENT_TOKEN.format(i) for i in range(K))
    assert tok("a" + latents, add_special_tokens=False)["input_ids"][-K:] == list(range(first, first + K))
    assert tok.decode(list(range(first, first + K)), skip_special_tokens=True) == ""
    # a string user turn gets them too, at its end; the assistant turn never does
    text = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}],
                                   tokenize=False)
    assert text.endswith(f"user\nq{latents}<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n")


# ----------------------------------------------------------------------------------------------
# This project reads the export back

def test_evaluate_scores_the_export_as_the_checkpoint(runs, tmp_path):
    (ckpt, out), test_file = runs[0]["lora"], runs[1]
    res = evaluate.main(["--checkpoint", f"livr={ckpt}", "--checkpoint", f"hub={out}", "--data", test_file,
                         "--out", str(tmp_path), "--attention-samples", "4", "--max-new-tokens", "8"])
    a, b = res["checkpoints"]
    assert b["meta"]["num_latents"] == K
    assert [s["output"] for s in a["samples"]] == [s["output"] for s in b["samples"]]
    assert [s["pred"] for s in a["samples"]] == [s["pred"] for s in b["samples"]]
    assert a["accuracy"] == b["accuracy"]
    assert a["answer_latent_attention"] == pytest.approx(b["answer_latent_attention"], rel=1e-4)


def test_load_pretrained_reads_the_export(runs):
    ckpt, out = runs[0]["grown"]
    m, _ = checkpoint.load_livr(ckpt, merge=True)
    plain = checkpoint.load_pretrained(out)                      # the hub route: no latents of its own
    back, meta = checkpoint.load_livr(out)                       # the LIVR route: K from config.json
    first = m.latent_token_id
    assert plain.num_latents == 0 and back.num_latents == K and back.latent_token_id == first
    assert meta["num_latents"] == K
    assert torch.equal(back.latent_embeds, m.latent_embeds)
    assert torch.equal(plain.model.embed_tokens.weight[first:first + K], m.latent_embeds)
    ids = torch.tensor([[5, 6, first, first + 1, first + 2, first + 3, 7]])
    with torch.no_grad():
        want = m(ids)
        for other in (plain, back):
            got = other(ids)
            got[..., first:first + K] = want[..., first:first + K]
            assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_grown_table_when_the_base_has_no_spare_rows(runs):
    ckpt, out = runs[0]["grown"]
    base = json.load(open(os.path.join(ckpt, "livr.json")))["base"]
    base_rows = json.load(open(os.path.join(base, "config.json")))["vocab_size"]
    config = json.load(open(os.path.join(out, "config.json")))
    first = config["livr"]["latent_token_id"]
    assert first == base_rows                                # the latents start past the table
    assert config["vocab_size"] == base_rows + K
    base_m, m = checkpoint.load_pretrained(base), checkpoint.load_pretrained(out)
    table = m.model.embed_tokens.weight
    assert table.shape[0] == base_rows + K
    assert torch.equal(table[:base_rows], base_m.model.embed_tokens.weight)
    livr, _ = checkpoint.load_livr(ckpt)
    assert torch.equal(table[first:], livr.latent_embeds)
    # the spare-rows run keeps the base's table size
    lora_config = json.load(open(os.path.join(runs[0]["lora"][1], "config.json")))
    assert lora_config["vocab_size"] > lora_config["livr"]["latent_token_id"] + K


# ----------------------------------------------------------------------------------------------
# The directory itself

def test_no_pickle_files_and_a_complete_card(runs):
    ckpt, out = runs[0]["lora"]
    names = sorted(os.listdir(out))
    for n in names:
        assert n.endswith((".json", ".safetensors", ".jinja", ".md", ".txt")), n
        with open(os.path.join(out, n), "rb") as f:
            head = f.read(4)
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", f"{n} looks like a pickle"
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and [n for n in names if n.endswith(".safetensors")] == shards
    for n in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "README.md"):
        assert n in names, n
    card = open(os.path.join(out, "README.md")).read()
    meta = json.load(open(os.path.join(ckpt, "livr.json")))
    with open(os.path.join(os.path.dirname(ckpt), "metrics.jsonl")) as f:
        best = max(r["val_acc"] for r in map(json.loads, f) if "val_acc" in r)
    for fact in (meta["base"], f"| latent tokens (K) | {K}:", "| stage | 2 |", "| attention mask | causal |",
                 "LoRA r={rank}, alpha={alpha}, dropout={dropout}".format(**meta["lora"]), f"{100 * best:.1f}%"):
        assert fact in card, fact


def test_card_without_metrics_says_unknown(runs, tmp_path):
    import shutil
    ckpt = shutil.copytree(runs[0]["full"][0], tmp_path / "elsewhere" / "final")
    card = open(os.path.join(export.export(str(ckpt), str(tmp_path / "hub")), "README.md")).read()
    assert "| validation accuracy | unknown |" in card
    assert "the whole language model" in card


def digest(path):
    return {n: hashlib.sha256(open(os.path.join(path, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(path))}


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_reexport_is_atomic(runs, tmp_path, monkeypatch, swap):
    """A failed re-export leaves the old OUT as it was and no temporary directory; a complete one
    replaces it whole. Both ways of putting it in place: Linux's one-step exchange, and moving
    the old one aside first (elsewhere), where a failed second rename puts the old one back."""
    import safetensors.torch
    if swap == "two renames":
        monkeypatch.setattr(checkpoint.ctypes, "CDLL", lambda *a, **k: (_ for _ in ()).throw(OSError("no libc")))
    ckpt = runs[0]["lora"][0]
    out = str(tmp_path / "hub")
    export.export(ckpt, out)                                         # one file: model.safetensors
    before = digest(out)
    save_file, calls = safetensors.torch.save_file, []

    def fails_on_third_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return save_file(*args, **kwargs)
    with monkeypatch.context() as mp:
        mp.setattr(safetensors.torch, "save_file", fails_on_third_shard)
        with pytest.raises(RuntimeError, match="disk full"):
            export.export(ckpt, out, max_shard_bytes=400_000)
    assert len(calls) == 3                                           # it did fail mid-weights
    assert digest(out) == before and os.listdir(tmp_path) == ["hub"]  # untouched, no temp dir

    # a failure after every file is written (the card) changes nothing either
    with monkeypatch.context() as mp:
        mp.setattr(export, "model_card", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            export.export(ckpt, out, max_shard_bytes=400_000)
    assert digest(out) == before and os.listdir(tmp_path) == ["hub"]

    if swap == "two renames":       # the old one moved aside, then the new one fails to move in
        replace = os.replace

        def fails_into_out(src, dst):
            if dst == out and ".tmp-" in src and not src.endswith(".old"):
                raise OSError("interrupted")
            return replace(src, dst)
        with monkeypatch.context() as mp:
            mp.setattr(os, "replace", fails_into_out)
            with pytest.raises(OSError, match="interrupted"):
                export.export(ckpt, out, max_shard_bytes=400_000)
        assert digest(out) == before and os.listdir(tmp_path) == ["hub"]

    # a complete re-export replaces it whole: the old single file is gone, the shards are in
    export.export(ckpt, out, max_shard_bytes=400_000)
    after = digest(out)
    assert "model.safetensors" not in after and "model.safetensors.index.json" in after
    assert os.listdir(tmp_path) == ["hub"]


def test_refuses_to_replace_what_is_not_an_export(runs, tmp_path, capsys):
    ckpt = runs[0]["lora"][0]
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    assert export.main([ckpt, str(precious)]) == 2
    assert "not an earlier export" in capsys.readouterr().err
    assert (precious / "todo.txt").read_text() == "keep me"
    assert export.main([str(tmp_path), str(tmp_path / "x")]) == 2    # no livr.json
    assert "not a LIVR checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [True, False])
def test_set_latents_grows_a_table_with_no_spare_rows(tied):
    """Latent ids past the table's end grow it (and an untied head) by zero rows; the rows
    already there stay as they were, and generation never emits a latent id."""
    ids = dict(image_token_id=30, video_token_id=31, vision_start_token_id=32, vision_end_token_id=33,
               eos_token_id=34)
    cfg = model.preset("tiny", vocab_size=40, **ids)
    cfg.text.tie_word_embeddings = tied
    m = model.init_weights(model.Qwen25VL(cfg)).eval()
    table, head = m.model.embed_tokens.weight.clone(), m.lm_head.weight.clone()
    m.set_latents(4, 38)                                    # ids 38..41: two past the 40 rows
    assert m.cfg.text.vocab_size == 42
    assert m.model.embed_tokens.weight.shape == m.lm_head.weight.shape == (42, cfg.text.hidden_size)
    assert torch.equal(m.model.embed_tokens.weight[:40], table)
    assert torch.equal(m.lm_head.weight[:40], head)
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tied
    prompt = torch.tensor([[1, 2, 3, 38, 39, 40, 41]])
    assert m(prompt).shape == (1, 7, 42)
    out = m.generate(prompt, max_new_tokens=6, eos_token_id=34)
    assert not ((out >= 38) & (out < 42)).any()
