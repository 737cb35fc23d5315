"""evaluate.py: answer parsing, accuracy tables, the paper's mechanism checks, attention maps and
the CLI's handling of bad input, on tiny random checkpoints; and (slow) the trained demo beating
chance."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import demo
import evaluate
import masks
import tiny

K = 4   # latent tokens in the test checkpoints


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A random base checkpoint (zero-shot) and a LIVR checkpoint on top of it (K latents, no
    LoRA). std=0.1 so greedy outputs depend visibly on the image."""
    root = tmp_path_factory.mktemp("ckpt")
    base = demo.make_demo_base(str(root / "base"), std=0.1, seed=0)
    proc = data.Processor.from_pretrained(base, num_latents=K)
    m = checkpoint.load_pretrained(base, num_latents=K, latent_token_id=proc.latent_token_id)
    for name, p in m.named_parameters():
        p.requires_grad = name == "latent_embeds"
    livr = str(root / "livr")
    checkpoint.save_livr(m, livr, {"base": os.path.abspath(base), "stage": 2, "mask": "causal",
                              "train": "full", "lora": None})
    return base, livr


def image_file(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


# ----------------------------------------------------------------------------------------------
# Parsing and scoring

TWO = ["the red box", "the blue box"]
FOUR = ["the first image", "the second image", "the third image", "the fourth image"]
NESTED = ["car", "red car", "bus"]
COUNT = None

PARSES = [
    # (model output, choices, parsed)
    ("A", TWO, "A"), ("B", TWO, "B"), ("b", TWO, "B"), ("(B)", TWO, "B"), ("B.", TWO, "B"),
    ("**C**", FOUR, "C"), (" D\n", FOUR, "D"), ("C)", FOUR, "C"),
    ("The answer is C.", FOUR, "C"), ("Answer: (D)", FOUR, "D"), ("The correct option is B", FOUR, "B"),
    ("answer is option A", FOUR, "A"), ("(C) the third image", FOUR, "C"),
    ("I think it is (B), because the colours match.", FOUR, "B"),
    ("the blue box", TWO, "B"), ("The white square is in the blue box.", TWO, "B"),
    ("The third image is more similar to the first image.", FOUR, ""),     # two options named
    ("the third image", FOUR, "C"), ("B. the blue box", TWO, "B"), ("D: the fourth image", FOUR, "D"),
    ("the red car", NESTED, "B"), ("A car.", NESTED, "A"),
    ("A. the blue box", TWO, "A"),              # the letter is what is scored, not the text
    ("A red box has it", TWO, ""),              # the article "A", not option A
    ("E", FOUR, ""), ("(E)", FOUR, ""), ("I don't know.", FOUR, ""), ("", TWO, ""),
    ("7", COUNT, "7"), ("There are 7 squares.", COUNT, "7"), ("seven", COUNT, "7"),
    ("Seven squares.", COUNT, "7"), ("The answer is 5", COUNT, "5"), ("Answer: 12", COUNT, "12"),
    ("I count three squares in the image.", COUNT, "3"), ("9.", COUNT, "9"), ("09", COUNT, "9"),
    ("There are seventeen.", COUNT, "17"), ("none", COUNT, ""), ("squares", COUNT, ""),
]


@pytest.mark.parametrize("output, choices, want", PARSES)
def test_parse_answer(output, choices, want):
    record = data.Sample(images=[], question="q", choices=choices, answer="A" if choices else "7")
    assert evaluate.parse_answer(output, record) == want


def test_score_against_gold_forms():
    mc = data.Sample(images=[], question="q", choices=FOUR, answer="(C)")    # BLINK's gold form
    assert evaluate.score("C", mc) and evaluate.score("the third image", mc)
    assert not evaluate.score("B", mc) and not evaluate.score("", mc)
    count = data.Sample(images=[], question="q", answer="3")
    assert evaluate.score("three", count) and evaluate.score("There are 3.", count)
    assert not evaluate.score("13", count)
    assert not evaluate.score("A", data.Sample(images=[], question="q", choices=TWO, answer=None))


def test_accuracy_and_table_on_known_predictions():
    """Known outputs -> known per-task accuracy, macro mean, chance, Δ row."""
    recs = ([data.Sample(images=[], question="q", choices=TWO, answer="AB"[i % 2], task="loc") for i in range(4)]
            + [data.Sample(images=[], question="q", answer=str(2 + i), task="count") for i in range(5)])
    sft = ["A", "A", "A", "A", "2", "3", "nine", "9", "x"]          # loc 2/4, count 2/5
    livr = ["A", "B", "the red box", "(B)", "2", "3", "4", "5", "x"]   # loc 4/4, count 4/5
    res = {name: [evaluate.sample_result(i, r, out) for i, (r, out) in enumerate(zip(recs, outs))]
           for name, outs in [("sft", sft), ("livr", livr)]}
    res["livr"][8] = evaluate.sample_result(8, recs[8], error="OSError: broken")   # counted, wrong
    s = evaluate.accuracy(res["sft"])
    assert s["accuracy"] == {"loc": 50.0, "count": 40.0}
    assert s["mean"] == pytest.approx(45.0)                 # mean over tasks, not samples (44.4)
    assert s["chance"] == {"loc": 50.0, "count": 12.5} and s["chance_mean"] == pytest.approx(31.25)
    t = evaluate.accuracy(res["livr"])
    assert t["accuracy"] == {"loc": 100.0, "count": 80.0} and t["errors"] == 1
    md = evaluate.table(res, {"sft": None, "livr": 0.0761})
    lines = md.splitlines()
    assert lines[0] == "| checkpoint | loc (n=4) | count (n=5) | mean | answer→latent attn |"
    assert lines[2] == "| chance | 50.00 | 12.50 | 31.25 |  |"
    assert lines[3] == "| sft | 50.00 | 40.00 | 45.00 | – |"
    assert lines[4] == "| livr | 100.00 | 80.00 | 90.00 | 0.076 |"
    assert lines[5] == "| Δ (livr − sft) | +50.00 | +40.00 | +45.00 |  |"
    assert len(evaluate.table({"sft": res["sft"]}).splitlines()) == 4      # no Δ for one row


# ----------------------------------------------------------------------------------------------
# Evaluation on tiny random checkpoints

def test_no_latents_is_a_k0_prompt(ckpts, tmp_path):
    base, _ = ckpts
    rec = data.Sample(images=[image_file(tmp_path / "a.png", 84, 56, 0)], question="How many?", answer="2")
    with_k = evaluate.drop_latents(data.Processor.from_pretrained(base, num_latents=K).encode(rec, False))
    k0 = data.Processor.from_pretrained(base, num_latents=0).encode(rec, False)
    for key in ("input_ids", "kinds", "labels", "pixel_values", "image_grid_thw"):
        assert torch.equal(with_k[key], k0[key]), key


def test_bottleneck_without_latents_ignores_the_image(ckpts, tmp_path):
    """The paper's 43.44 row: under the stage-1 mask with no latents, nothing the answer can see
    depends on the image, so every image gives the same prediction. With the latents (or the
    causal mask) the same model's outputs do depend on the image, so the check is not vacuous."""
    _, livr = ckpts
    m, proc, _ = evaluate.load_checkpoint(livr)
    recs = [data.Sample(images=[image_file(tmp_path / f"{i}.png", 112, 112, i)], question="How many squares?",
                        answer="3", task="counting") for i in range(6)]
    outs = lambda **kw: [r["output"] for r in evaluate.evaluate(m, proc, recs, batch_size=4,
                                                                max_new_tokens=6, **kw)]
    blind = outs(mask="bottleneck", latents=False)
    assert len(set(blind)) == 1 and blind[0] != ""
    assert len(set(outs(mask="causal"))) > 1
    assert len(set(outs(mask="bottleneck"))) > 1            # the latents carry the image through
    assert outs(mask="causal", latents=False) != blind


def test_batched_equals_one_by_one(ckpts, tmp_path):
    """Left padding in a batch changes nothing: prompts of different lengths (1 or 2 images)."""
    _, livr = ckpts
    m, proc, _ = evaluate.load_checkpoint(livr)
    recs = [data.Sample(images=[image_file(tmp_path / f"{i}_{j}.png", 56 + 28 * i, 56, 10 * i + j)
                                for j in range(1 + i % 2)], question="Which?", choices=TWO, answer="A")
            for i in range(3)]
    batched = [r["output"] for r in evaluate.evaluate(m, proc, recs, batch_size=3, max_new_tokens=5)]
    single = [r["output"] for r in evaluate.evaluate(m, proc, recs, batch_size=1, max_new_tokens=5)]
    assert batched == single


def test_streamed_through_workers_equals_in_process(ckpts, tmp_path):
    """Images decoded in DataLoader worker processes give the same outputs as in this process;
    an image whose header reads but whose pixels do not (a truncated file) fails only its own
    sample, wherever it is decoded."""
    _, livr = ckpts
    m, proc, _ = evaluate.load_checkpoint(livr)
    recs = [data.Sample(images=[image_file(tmp_path / f"{i}.png", 56 + 28 * (i % 3), 56, i)],
                        question="Which?", choices=TWO, answer="A") for i in range(5)]
    whole = (tmp_path / "2.png").read_bytes()
    (tmp_path / "2.png").write_bytes(whole[:len(whole) // 2])           # header intact, data cut
    here = evaluate.evaluate(m, proc, recs, batch_size=2, max_new_tokens=4)
    there = evaluate.evaluate(m, proc, recs, batch_size=2, max_new_tokens=4, workers=2)
    assert here == there
    assert [r["error"] is not None for r in here] == [False, False, True, False, False]
    assert "truncated" in here[2]["error"]


def test_a_failing_sample_does_not_sink_its_batch(ckpts, tmp_path, monkeypatch):
    """A model error on one sample (here: the one with the big image) is that sample's error."""
    _, livr = ckpts
    m, proc, _ = evaluate.load_checkpoint(livr)
    recs = [data.Sample(images=[image_file(tmp_path / f"{i}.png", 56 * (1 + (i == 2)), 56, i)],
                        question="How many?", answer="2", task="counting") for i in range(4)]
    real = evaluate.generate_batch

    def flaky(m, processor, encoded, *args):
        if any(len(e["pixel_values"]) > 16 for e in encoded):
            raise RuntimeError("CUDA out of memory")
        return real(m, processor, encoded, *args)
    monkeypatch.setattr(evaluate, "generate_batch", flaky)
    res = evaluate.evaluate(m, proc, recs, batch_size=4, max_new_tokens=3)
    assert [r["error"] for r in res] == [None, None, "RuntimeError: CUDA out of memory", None]
    assert all(r["output"] for r in res if not r["error"])


def test_answer_latent_attention(ckpts, tmp_path):
    """Equal to the statistic computed by hand from the model's full attention maps, at the
    positions that predict the answer."""
    base, livr = ckpts
    m, proc, _ = evaluate.load_checkpoint(livr)
    recs = [data.Sample(images=[image_file(tmp_path / f"{i}.png", 56, 84, i)], question="Which?",
                        choices=TWO, answer="AB"[i]) for i in range(2)]
    got = evaluate.answer_latent_attention(m, proc, recs)
    want = []
    for r in recs:
        enc = proc.encode(r, with_answer=True)
        kinds = enc["kinds"][None]
        with torch.no_grad():
            _, attns = m(enc["input_ids"][None], enc["pixel_values"], enc["image_grid_thw"],
                         mask=masks.build_mask(kinds, "causal"), return_attn=True)
        a = torch.stack(attns)[:, 0]                                          # (layers, nh, L, L)
        # the rows that predict the answer's tokens (the answer side), not the answer tokens' own
        ans, lat = masks.Context(enc["kinds"]).answer_side, enc["kinds"] == masks.LATENT
        assert ans.tolist() != (enc["kinds"] == masks.ANSWER).tolist()
        want.append(a[:, :, ans][:, :, :, lat].sum(-1).mean().item())
    assert 0 < got < 1 and got == pytest.approx(sum(want) / len(want), rel=1e-5)
    zero_shot, proc0, _ = evaluate.load_checkpoint(base)
    assert evaluate.answer_latent_attention(zero_shot, proc0, recs) is None


def test_attention_maps_keep_aspect_ratio(ckpts, tmp_path):
    _, livr = ckpts
    m, proc, _ = evaluate.load_checkpoint(livr)
    sizes = [(150, 60), (45, 120)]                       # wide, tall; neither a multiple of 28
    recs = [data.Sample(images=[image_file(tmp_path / f"in{j}.png", w, h, j) for j, (w, h) in enumerate(sizes)],
                        question="Which image is brighter?", choices=FOUR[:2], answer="B", task="sim", id="s0")]
    out = tmp_path / "maps"
    page = evaluate.attention_maps(m, proc, recs, [0], str(out), per_latent=True)
    text = open(page, encoding="utf-8").read()
    assert "Which image is brighter?" in text and "answer <b>B</b>" in text and "prediction" in text
    for j, (w, h) in enumerate(sizes):
        for tag in ["mean"] + [f"latent{k}" for k in range(K)]:
            name = f"s00000_img{j}_{tag}.png"
            assert f'src="{name}"' in text
            with Image.open(out / name) as im:
                assert im.size == (w, h)
        with Image.open(out / f"s00000_img{j}.png") as im:
            assert im.size == (w, h)
    maps = evaluate.latent_image_attention(m, proc, recs[0])
    thw = proc.encode(recs[0], False)["image_grid_thw"]
    assert [a.shape for a in maps] == [(K, h // 2, w // 2) for _, h, w in thw.tolist()]
    assert all((a >= 0).all() for a in maps)


# ----------------------------------------------------------------------------------------------
# The CLI

def synthetic(tmp_path, n=2):
    paths = demo.make_synthetic(tmp_path / "data", n_train=0, n_val=0, n_test=n, seed=0)
    return str(paths["test"])


def test_cli_side_by_side(ckpts, tmp_path, capsys):
    base, livr = ckpts
    test = synthetic(tmp_path)
    out = evaluate.main(["--checkpoint", f"zero-shot={base}", "--checkpoint", livr, "--data", test,
                         "--out", str(tmp_path / "eval"), "--maps", "0,3", "--batch-size", "3",
                         "--max-new-tokens", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"mean accuracy \d+\.\d% \(chance \d+\.\d%\)", lines[-1])
    assert lines[0].startswith("| checkpoint | ")
    name = evaluate.checkpoint_name(livr)[0]                # "<parent>/livr"
    assert name.endswith("/livr")
    assert any(l.startswith(f"| Δ ({name} − zero-shot) |") for l in lines)
    saved = json.load(open(tmp_path / "eval" / "results.json"))
    assert [c["name"] for c in saved["checkpoints"]] == ["zero-shot", name]
    assert saved["checkpoints"][0]["answer_latent_attention"] is None
    assert 0 < saved["checkpoints"][1]["answer_latent_attention"] < 1
    samples = saved["checkpoints"][1]["samples"]
    assert len(samples) == 8 and {"output", "pred", "correct", "answer", "task"} <= set(samples[0])
    assert saved["checkpoints"][1]["chance_mean"] == pytest.approx(100 * (3 * 0.5 + 1 / 8) / 4)
    assert (tmp_path / "eval" / "maps" / "index.html").exists()
    assert out["checkpoints"][1]["mean"] == saved["checkpoints"][1]["mean"]


def test_results_are_written_whole_or_not_at_all(ckpts, tmp_path, monkeypatch, capsys):
    """A failure while writing results.json (a full disk, a kill) leaves the earlier file whole."""
    base, livr = ckpts
    test = synthetic(tmp_path)
    argv = ["--checkpoint", livr, "--data", test, "--out", str(tmp_path / "eval"),
            "--max-new-tokens", "4", "--attention-samples", "0"]
    evaluate.main(argv)
    before = (tmp_path / "eval" / "results.json").read_bytes()

    def full_disk(obj, f, **kw):
        f.write('{"data": "half')
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(evaluate.checkpoint.json, "dump", full_disk)
    with pytest.raises(SystemExit):
        evaluate.main(argv)
    assert "No space left on device" in capsys.readouterr().err
    assert (tmp_path / "eval" / "results.json").read_bytes() == before
    json.loads(before)


def test_cli_bad_inputs(ckpts, tmp_path, capsys):
    base, livr = ckpts
    test = synthetic(tmp_path)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(tmp_path / "nope"), "--data", test, "--out", str(tmp_path)])
    assert e.value.code == 2 and "cannot load checkpoint" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", str(tmp_path / "empty"), "--data", test, "--out", str(tmp_path)])
    assert "not a checkpoint" in capsys.readouterr().err

    records = [json.loads(l) for l in open(test)]
    no_answers = tmp_path / "data" / "no_answers.jsonl"
    no_answers.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answer"}) + "\n" for r in records))
    with pytest.raises(SystemExit):
        evaluate.main(["--checkpoint", livr, "--data", str(no_answers), "--out", str(tmp_path)])
    assert "has no answers" in capsys.readouterr().err

    # one broken image, one missing image, one unparseable line: the others are still scored
    (tmp_path / "data" / "broken.png").write_bytes(b"not a png")
    records[1]["images"] = ["broken.png"]
    records[2]["images"] = ["missing.png"]
    bad = tmp_path / "data" / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records) + "{not json\n")
    out = evaluate.main(["--checkpoint", livr, "--data", str(bad), "--out", str(tmp_path / "eval"),
                         "--max-new-tokens", "3"])
    cap = capsys.readouterr()
    samples = out["checkpoints"][0]["samples"]
    assert len(samples) == 8
    errors = {s["index"]: s["error"] for s in samples if s["error"]}
    assert set(errors) == {1, 2} and all(not s["correct"] for s in samples if s["error"])
    assert "broken.png" in errors[1] and "missing.png" in errors[2]
    assert "bad.jsonl:2" in cap.err and "bad.jsonl:9" in cap.err and "not valid JSON" in cap.err
    assert "2 sample(s) failed and were scored wrong" in cap.out
    assert re.fullmatch(r"mean accuracy \d+\.\d% \(chance \d+\.\d%\)", cap.out.strip().splitlines()[-1])


def test_cli_default_without_demo_says_what_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        evaluate.main([])
    assert "train.py --stage 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The built-in demo, trained for real (minutes on a CPU)

@pytest.mark.slow
def test_trained_demo_beats_chance(tmp_path):
    """The README's main job, as a user runs it: two torchrun stages on 2 processes, then
    evaluate.py; its last line must show the trained model clearly above chance, and every task
    above its own chance (the recipe reaches +20 points on each; the gate leaves room for a
    machine whose arithmetic sends training elsewhere)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = str(tmp_path / "demo")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", tiny.free_port(), os.path.join(root, "train.py"), "--run-dir", run]
    for stage in ("1", "2"):
        subprocess.run(torchrun + ["--stage", stage], check=True, cwd=root)
    out = subprocess.run([sys.executable, os.path.join(root, "evaluate.py"), "--checkpoint",
                          os.path.join(run, "stage2", "final"), "--data",
                          os.path.join(run, "data", "test.jsonl"), "--out", str(tmp_path / "eval")],
                         check=True, cwd=root, capture_output=True, text=True).stdout
    print(out)
    last = out.strip().splitlines()[-1]
    acc, chance = map(float, re.match(r"mean accuracy ([\d.]+)% \(chance ([\d.]+)%\)", last).groups())
    assert acc > chance + 20, last
    scores = json.load(open(tmp_path / "eval" / "results.json"))["checkpoints"][0]
    for task, value in scores["accuracy"].items():
        assert value > scores["chance"][task] + 10, (task, scores)
