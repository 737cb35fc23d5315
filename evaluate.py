"""
Evaluation for LIVR: the paper's scoring, its tables side by side, its mechanism checks, and
latent attention maps.

The protocol is the paper's: multiple-choice tasks are scored by top-1
accuracy on the option letter, counting by exact match on the number. Decoding is greedy with the
KV cache on left-padded batches (model.generate); the latents sit after the prompt exactly as in
training, because the same data.Processor builds the prompt. On top of the accuracy table:
  - several checkpoints side by side (a zero-shot hub checkpoint, Direct SFT, LIVR), one row
    each as in the paper's tables, with the chance level per task and a Δ row;
  - "Do the latents carry the image?" (the paper's check): --mask bottleneck decodes under the stage-1
    mask at test time, --no-latents drops the latent tokens from the prompt, and every
    checkpoint with latents gets the mean answer->latent attention (the paper: 0.076 for LIVR,
    0.028 for a latents-only model);
  - latent->image attention maps overlaid on the input images (PNG) and an HTML page that shows
    question, images, maps, answer and prediction together.

Run:
    python evaluate.py                      # runs/demo/stage2/final on runs/demo/data/test.jsonl
    python evaluate.py --checkpoint zero-shot=runs/demo/base --checkpoint sft=runs/sft/stage1/final \\
        --checkpoint livr=runs/demo/stage2/final             # side by side, Δ = last - previous
    python evaluate.py --mask bottleneck --no-latents        # blind to the image: chance expected
    python evaluate.py --maps 0,1,2 --per-latent             # runs/demo/eval/maps/index.html
    python evaluate.py --checkpoint Qwen/Qwen2.5-VL-3B-Instruct --data blink/Jigsaw_val.jsonl

Outputs go to --out (default: RUN_DIR/eval when the last checkpoint is a run's RUN_DIR/stageN/NAME,
where export.py's card finds them; else runs/demo/eval): table.md, results.json (per-sample outputs
and predictions), maps/. The last line printed is the last checkpoint's mean accuracy and chance.
A bad sample (an image that fails to load, no answer) is reported and scored wrong; it never
costs the results of the others.
"""
import argparse
import contextlib
import gc
import html
import json
import os
import re
import sys
import time

import numpy as np
import torch
from PIL import Image

import batching
import checkpoint
import data
import demo
import faults
import lmms
import masks
import rundir
from scoring import accuracy, parse_answer, score  # noqa: F401 (evaluate.score, ...)

DEMO_CHECKPOINT = os.path.join(demo.DIR, "stage2", "final")
DEMO_DATA = os.path.join(demo.DIR, "data", "test.jsonl")
TRAIN_DEMO = ("torchrun --nproc_per_node 2 train.py --stage 1 && "
              "torchrun --nproc_per_node 2 train.py --stage 2")


class EvalError(Exception):
    """Bad input: a message that says what is wrong; main() prints it and exits 2."""


# ----------------------------------------------------------------------------------------------
# Evaluation: batched greedy decoding, one result dict per sample

def drop_latents(enc):
    """An encoded prompt without its latent tokens: what a processor with K=0 makes (--no-latents)."""
    keep = enc["kinds"] != masks.LATENT
    return {**enc, **{k: enc[k][keep] for k in ("input_ids", "labels", "kinds")}}


def sample_result(index, record, output="", error=None):
    return {"index": index, "id": record.id, "where": record.where, "task": record.task or "all",
            "question": record.question, "choices": record.choices, "answer": record.answer,
            "output": output, "pred": "" if error else parse_answer(output, record),
            "correct": error is None and score(output, record), "chance": data.chance(record),
            "error": error}


@torch.no_grad()
def generate_batch(m, processor, encoded, max_new_tokens, mask="causal"):
    """Greedy outputs (decoded text) for a list of encoded prompts, left-padded into one batch."""
    dev = next(m.parameters()).device
    batch = batching.collate(encoded, processor.pad_id, padding_side="left")
    pv = batch["pixel_values"] if batch["pixel_values"].numel() else None
    new = m.generate(batch["input_ids"].to(dev), pv if pv is None else pv.to(dev),
                     batch["image_grid_thw"].to(dev), batch["attention_mask"].to(dev),
                     max_new_tokens=max_new_tokens, eos_token_id=processor.im_end_id,
                     kinds=batch["kinds"].to(dev), mask_mode=mask)
    stops = {processor.im_end_id, processor.pad_id, m.cfg.eos_token_id}
    texts = []
    for row in new.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        texts.append(processor.decode(row[:end]).strip())
    return texts


def evaluate(m, processor, records, batch_size=8, mask="causal", latents=True, max_new_tokens=32,
             progress=None, workers=0):
    """Score every record; returns one dict per record, in order (see sample_result).
    mask: "causal" (inference as in the paper) or "bottleneck" (the stage-1 mask at test time:
    prompt and generated tokens cannot see the image, latents can). latents=False removes the
    latent tokens from the prompt. A record that fails (unreadable image, no answer, an answer
    outside the choices, a control token in its text, a model error) gets `error` set and counts
    as wrong: the same checks as training (data.validate), reported rather than fatal. Images are
    decoded batch by batch (in `workers` DataLoader processes; 0 = in this one), so memory does
    not grow with the number of records."""
    results, by_length = [None] * len(records), []
    for i, r in enumerate(records):
        try:
            reasons = data.validate(r, processor)
            if reasons:
                results[i] = sample_result(i, r, error="; ".join(reasons))
                continue
            # lengths from the text and the image headers only: no pixels kept here
            by_length.append((processor.num_tokens(r, with_answer=False), i))
        except Exception as e:           # PIL raises many types for bad files
            results[i] = sample_result(i, r, error=f"{type(e).__name__}: {e}")
    order = [i for _, i in sorted(by_length)]     # similar lengths together: less padding per batch
    batches = batching.loader(batching.EncodedRecords(records, processor, with_answer=False, keep_errors=True,
                                              transform=None if latents else drop_latents),
                          [order[s:s + batch_size] for s in range(0, len(order), batch_size)],
                          collate_fn=list, workers=workers, on_worker_death="continue")
    done = 0
    for items in batches:
        for e in items:
            if "error" in e:
                results[e["index"]] = sample_result(e["index"], records[e["index"]], error=e["error"])
        chunk = [e for e in items if "error" not in e]
        texts = _attempt(lambda: generate_batch(m, processor, chunk, max_new_tokens, mask)) if chunk else []
        if isinstance(texts, Exception):  # find the culprit: the rest of the batch still counts
            texts = [texts] if len(chunk) == 1 else [
                _attempt(lambda: generate_batch(m, processor, [e], max_new_tokens, mask)[0]) for e in chunk]
        for e, t in zip(chunk, texts):
            i = e["index"]
            results[i] = (sample_result(i, records[i], error=f"{type(t).__name__}: {t}")
                          if isinstance(t, Exception) else sample_result(i, records[i], output=t))
        done += len(items)
        if progress:
            progress(done, len(order))
    return results


def _attempt(fn):
    try:
        return fn()
    except Exception as e:
        return e


def table(results_by_checkpoint, latent_attention=None):
    """A Markdown table as the paper's: a row per checkpoint, a column per task + mean, the chance
    row first and a Δ row (last checkpoint minus the one before) at the end. `latent_attention`
    {name: value or None} adds the answer->latent attention column."""
    names = list(results_by_checkpoint)
    summary = {n: accuracy(rs) for n, rs in results_by_checkpoint.items()}
    tasks = list(dict.fromkeys(t for s in summary.values() for t in s["accuracy"]))
    first = summary[names[0]]
    head = ["checkpoint"] + [f"{t} (n={first['n'].get(t, 0)})" for t in tasks] + ["mean"]
    with_attn = latent_attention is not None and any(v is not None for v in latent_attention.values())
    if with_attn:
        head.append("answer→latent attn")
    fmt = lambda x: "–" if x is None else f"{x:.2f}"
    rows = [["chance"] + [fmt(first["chance"].get(t)) for t in tasks] + [fmt(first["chance_mean"])]
            + ([""] if with_attn else [])]
    for n in names:
        s = summary[n]
        row = [n] + [fmt(s["accuracy"].get(t)) for t in tasks] + [fmt(s["mean"])]
        if with_attn:
            v = latent_attention.get(n)
            row.append("–" if v is None else f"{v:.3f}")
        rows.append(row)
    if len(names) > 1:
        a, b = summary[names[-2]], summary[names[-1]]
        delta = lambda x, y: "–" if x is None or y is None else f"{y - x:+.2f}"
        rows.append([f"Δ ({names[-1]} − {names[-2]})"] +
                    [delta(a["accuracy"].get(t), b["accuracy"].get(t)) for t in tasks] +
                    [delta(a["mean"], b["mean"])] + ([""] if with_attn else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Attention, read one layer at a time

@contextlib.contextmanager
def read_attention(m, reduce):
    """Within the block, every decoder layer's attention probabilities (B, nh, L, Lk) go to
    reduce(layer_index, att) and are dropped at once: for a 3B model on multi-image prompts the
    36 layers' full maps would not fit in memory together (run the model with return_attn=True)."""
    def hook(i):
        def fn(module, args, output):
            y, att = output
            reduce(i, att)
            return y, None
        return fn
    handles = [layer.self_attn.register_forward_hook(hook(i)) for i, layer in enumerate(m.model.layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _forward_one(m, enc, mask, reduce):
    dev = next(m.parameters()).device
    ids, kinds = enc["input_ids"][None].to(dev), enc["kinds"][None].to(dev)
    pv = enc["pixel_values"].to(dev) if enc["pixel_values"].numel() else None
    last = torch.zeros_like(ids, dtype=torch.bool)
    last[:, -1] = True                    # logits are not needed: skip the (L, vocab) tensor
    with read_attention(m, reduce):
        m(ids, pv, enc["image_grid_thw"].to(dev), mask=masks.build_mask(kinds, mask, num_latents=m.num_latents),
          logits_at=last, return_attn=True)


@torch.no_grad()
def answer_latent_attention(m, processor, records, mask="causal", limit=None):
    """The paper's check that the answer reads the latents: with the gold answer appended
    (teacher forcing), the attention from the positions that predict the answer's tokens (the
    last prompt position through the answer's last-but-one: masks.Context.answer_side) to all
    latent keys, summed over the latents, averaged over heads, layers and those positions, then
    over samples. None for a model or prompt without latents. (Paper: 0.076 for LIVR, 0.028
    latents-only, "all heads, layers, positions".)"""
    if not m.num_latents:
        return None
    values = []
    for r in records[:limit]:
        try:
            enc = processor.encode(r, with_answer=True)
        except Exception:
            continue                      # bad samples are reported by evaluate()
        predicts = masks.Context(enc["kinds"]).answer_side
        latent = enc["kinds"] == masks.LATENT
        if not latent.any() or not predicts.any():
            continue
        per_layer = []
        # att[0]: (nh, L, L) -> predicting queries x latent keys, summed over the keys
        _forward_one(m, enc, mask, lambda i, att: per_layer.append(
            att[0][:, predicts.to(att.device)][:, :, latent.to(att.device)].float().sum(-1).mean().item()))
        values.append(sum(per_layer) / len(per_layer))
    return sum(values) / len(values) if values else None


@torch.no_grad()
def latent_image_attention(m, processor, record, mask="causal"):
    """Each latent's attention to each image's tokens, averaged over heads and layers:
    a list with one (K, h/2, w/2) array per image (its merged-token grid, image_grid_thw)."""
    enc = processor.encode(record, with_answer=False)
    latent, image = enc["kinds"] == masks.LATENT, enc["kinds"] == masks.IMAGE
    if not latent.any():
        raise ValueError("no latent tokens in the prompt: attention maps need a LIVR checkpoint")
    total = []

    def reduce(i, att):                   # (1, nh, L, L) -> (K, n_image_tokens), mean over heads
        a = att[0][:, latent.to(att.device)][:, :, image.to(att.device)].float().mean(0).cpu()
        total.append(a)
    _forward_one(m, enc, mask, reduce)
    att = torch.stack(total).mean(0)                                        # (K, N)
    merge = m.cfg.vision.spatial_merge_size
    maps, start = [], 0
    for t, h, w in enc["image_grid_thw"].tolist():
        n = t * (h // merge) * (w // merge)
        # image tokens are in raster order over the merged grid (vision.py); frames averaged
        maps.append(att[:, start:start + n].view(-1, t, h // merge, w // merge).mean(1).numpy())
        start += n
    return maps


# perceptual dark-to-bright ramp (inferno's anchor colours): more attention = brighter
RAMP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], np.float32)


def overlay(image, heat, alpha=0.6):
    """image: PIL; heat: (gh, gw) >= 0. The map, scaled to its maximum, upsampled to the image's
    own size (so the image's aspect ratio is kept even though the model saw it resized to a
    multiple of 28) and blended over it."""
    heat = np.asarray(heat, np.float32)
    heat = heat / heat.max() if heat.max() > 0 else heat
    up = np.asarray(Image.fromarray(heat).resize(image.size, Image.BILINEAR)).clip(0, 1)
    pos = up * (len(RAMP) - 1)
    lo = np.minimum(pos.astype(int), len(RAMP) - 2)
    f = (pos - lo)[..., None]
    color = ((1 - f) * RAMP[lo] + f * RAMP[lo + 1]).astype(np.uint8)        # (H, W, 3)
    # over a grey copy, so the colours read as attention rather than as the image's own
    return Image.blend(image.convert("L").convert("RGB"), Image.fromarray(color), alpha)


def attention_maps(m, processor, records, indices, out_dir, per_latent=False, mask="causal",
                   results=None, title="LIVR latent attention maps"):
    """For each chosen record: latent->image attention (mean over latents, and per latent on
    request) overlaid on each input image as PNGs in out_dir, plus out_dir/index.html showing
    question, images, maps, answer and prediction. `results`: evaluate()'s dicts by index, for
    the predictions (decoded here when missing). Returns the index.html path."""
    os.makedirs(out_dir, exist_ok=True)
    results = dict(results or {})
    missing = [i for i in indices if i not in results]
    if missing:
        for i, r in zip(missing, evaluate(m, processor, [records[i] for i in missing], mask=mask)):
            results[i] = {**r, "index": i}
    sections = []
    for i in indices:
        r, res = records[i], results[i]
        head = (f"<h2>#{i} {html.escape(r.task)} <small>{html.escape(r.id)} {html.escape(r.where)}"
                f"</small></h2>\n<pre>{html.escape(r.text)}</pre>\n")
        verdict = "ok" if res["correct"] else "bad"
        head += (f"<p>answer <b>{html.escape(str(r.answer))}</b> · prediction "
                 f"<b class={verdict}>{html.escape(res['pred'] or '?')}</b> "
                 f"(output: <code>{html.escape(res['output'] or '')}</code>)"
                 + (f" · <span class=bad>{html.escape(res['error'])}</span>" if res["error"] else "")
                 + "</p>\n")
        try:
            maps = latent_image_attention(m, processor, r, mask)
        except Exception as e:
            sections.append(head + f"<p class=bad>no maps: {html.escape(f'{type(e).__name__}: {e}')}</p>")
            continue
        rows = []
        for j, (image, heat) in enumerate(zip(r.images, maps)):
            img = data.to_rgb(image)
            stem = f"s{i:05d}_img{j}"
            img.save(os.path.join(out_dir, stem + ".png"))
            figs = [_figure(stem + ".png", f"image {j + 1} ({img.width}×{img.height})")]
            named = [("mean", heat.mean(0), "all latents")]
            if per_latent:
                named += [(f"latent{k}", heat[k], f"latent {k}") for k in range(len(heat))]
            for tag, h, who in named:
                overlay(img, h).save(os.path.join(out_dir, f"{stem}_{tag}.png"))
                # mass: how much of the latents' attention this image gets at all; peak: the share
                # of the hottest token -- near 100% means an attention sink, not evidence
                figs.append(_figure(f"{stem}_{tag}.png", f"{who} → image {j + 1}: mass "
                                    f"{h.sum():.3f}, peak token {100 * h.max() / max(h.sum(), 1e-12):.0f}%",
                                    small=tag != "mean"))
            rows.append("<div>" + "".join(figs) + "</div>")
        sections.append(head + "\n".join(rows))
    page = _page(title, mask, sections)
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def _page(title, mask, sections):
    return (f"<!doctype html>\n<meta charset=utf-8>\n<title>{html.escape(title)}</title>\n<style>"
            "body{font-family:sans-serif;max-width:1400px;margin:auto;padding:0 1em}"
            "section{border-top:1px solid #ccc;padding:.5em 0}figure{display:inline-block;margin:4px;"
            "vertical-align:top;text-align:center}figure img{width:200px;height:auto}"
            "figcaption{font-size:12px;color:#555;max-width:200px}.small img{width:110px}"
            ".small figcaption{max-width:110px;font-size:10px}.ok{color:#070}.bad{color:#b00}"
            "pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em}</style>\n"
            f"<h1>{html.escape(title)}</h1>\n<p>Attention from the latent tokens' queries to each "
            f"image's tokens, averaged over all heads and layers (mask: {html.escape(mask)}); each "
            "map is scaled to its own maximum.</p>\n"
            + "\n".join(f"<section>{s}</section>" for s in sections) + "\n")


def _figure(src, caption, small=False):
    return (f'<figure{" class=small" if small else ""}><img src="{html.escape(src)}" '
            f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>')


# ----------------------------------------------------------------------------------------------
# Checkpoints and data

def load_checkpoint(path, device="cpu", dtype=torch.float32):
    """(model, processor, meta) for a LIVR checkpoint from train.py (LoRA merged for speed) or a
    plain hub checkpoint (zero-shot, no latents; or export.py's, whose config.json names its
    latents). The tokenizer lives with the base checkpoint."""
    if path == DEMO_CHECKPOINT and not os.path.exists(path):
        raise EvalError(f"no checkpoint at {path}: train the built-in demo first:\n  {TRAIN_DEMO}")
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in
                                       ("livr.json", "config.json")):
        raise EvalError(f"{path} is not a checkpoint: it has neither livr.json (train.py) nor "
                        "config.json (a hub checkpoint)")
    try:
        m, meta = checkpoint.load_livr(path, dtype=dtype, device=device, merge=True)
        base = checkpoint.resolve(meta["base"])
    except Exception as e:
        raise EvalError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
    try:
        processor = data.Processor.from_pretrained(base, num_latents=m.num_latents,
                                                   latent_position=meta.get("latent_position", "after"))
    except Exception as e:
        raise EvalError(f"no tokenizer for {path} (looked in {base}): {e}") from e
    if m.num_latents and processor.latent_token_id != m.latent_token_id:
        raise EvalError(f"{path}: the tokenizer at {base} puts <|latent_0|> at id "
                        f"{processor.latent_token_id}, the checkpoint at {m.latent_token_id}")
    return m, processor, meta


def load_records(path, image_root=None, limit=None):
    """(samples, problems): the dataset's parseable records in file order, and a 'file:line:
    reason' line for each one that could not be parsed at all. Records with a bad image or no
    answer are kept: evaluate() reports them one by one and scores them wrong."""
    if path == DEMO_DATA and not os.path.exists(path):
        raise EvalError(f"no data at {path}: train the built-in demo first (it writes the "
                        f"synthetic data):\n  {TRAIN_DEMO}")
    if not os.path.exists(path):
        raise EvalError(f"{path}: no such dataset file")
    try:
        entries = data.read_records(path, image_root)[:limit]
    except (data.DataError, OSError) as e:
        raise EvalError(str(e)) from None
    samples = [s for _, s, err in entries if err is None]
    problems = [f"{where}: {err}" for where, s, err in entries if err is not None]
    if not samples:
        raise EvalError(f"{path}: no usable records" + "".join(f"\n  {p}" for p in problems[:10]))
    if not any(s.answer for s in samples):
        raise EvalError(f"{path} has no answers: evaluation scores predictions against each "
                        "record's gold \"answer\" (e.g. \"A\" or \"7\"); BLINK's test split hides "
                        "them, use its val split")
    return samples, problems


# ----------------------------------------------------------------------------------------------
# CLI

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--checkpoint", action="append", metavar="[NAME=]PATH",
                   help="LIVR checkpoint (train.py) or hub checkpoint; repeat for a side-by-side "
                        f"table (default: {DEMO_CHECKPOINT})")
    p.add_argument("--data", default=DEMO_DATA, help="test set, .jsonl or LLaVA .json (default: %(default)s)")
    p.add_argument("--image-root", help="resolve image paths here instead of next to --data")
    p.add_argument("--mask", choices=masks.RULES, default="causal",
                   help="bottleneck: the stage-1 mask at test time, only latents see the image "
                        "(default: %(default)s)")
    p.add_argument("--no-latents", action="store_true", help="drop the latent tokens from the prompt")
    p.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, help="DataLoader processes that decode images ahead of "
                                               "the model (default: up to 4 on GPU, 0 on CPU: in-process)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--attention-samples", type=int, default=64,
                   help="samples for the answer->latent attention, 0 to skip (default: %(default)s)")
    p.add_argument("--maps", metavar="I,J,...", help="record indices: latent->image attention maps "
                                                     "for the last checkpoint")
    p.add_argument("--per-latent", action="store_true", help="a map per latent, not only the mean")
    p.add_argument("--out", help="table.md, results.json and maps/ go here (default: RUN_DIR/eval "
                   "when the last --checkpoint is a run's RUN_DIR/stageN/NAME, where the export's "
                   f"card looks for its test results; else {os.path.join(demo.DIR, 'eval')})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="(default: %(default)s)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--lmms-task", metavar="DIR", help="write an lmms-eval task for --data to DIR "
                   "(YAML + a utils.py with this file's prompt and scoring; lmms.py) and exit")
    return p.parse_args(argv)


def checkpoint_name(spec):
    """'NAME=PATH' -> (NAME, PATH); a bare PATH is named by its last two components."""
    name, eq, path = spec.partition("=")
    if eq and "/" not in name:
        return name, path
    return "/".join(os.path.normpath(spec).split(os.sep)[-2:]), spec


def default_out(spec):
    """RUN_DIR/eval for a checkpoint RUN_DIR/stageN/NAME (the run's own results, beside its
    stages); the demo's eval directory for anything else (a base, an export, a hub id)."""
    path = os.path.normpath(checkpoint_name(spec)[1])
    stage_dir = os.path.dirname(path)
    if re.fullmatch(r"stage\d+", os.path.basename(stage_dir)):
        return os.path.join(os.path.dirname(stage_dir), "eval")
    return os.path.join(demo.DIR, "eval")


def check_args(args):
    for flag, low in (("batch_size", 1), ("max_new_tokens", 1), ("limit", 1), ("attention_samples", 0)):
        v = getattr(args, flag)
        if v is not None and v < low:
            raise EvalError(f"--{flag.replace('_', '-')} {v}: must be at least {low}")


def main(argv=None):
    faults.safe_output()              # paths and task names never reach the terminal raw
    args = parse_args(argv)
    try:
        check_args(args)
        return run(args)
    except (EvalError, lmms.TaskError, data.DataError, checkpoint.CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args):
    if args.lmms_task:            # an lmms-eval task for --data, no model run (lmms.py)
        return lmms.write_task_cli(args)
    specs = args.checkpoint or [DEMO_CHECKPOINT]
    args.out = args.out or default_out(specs[-1])
    dtype = checkpoint.DTYPES[args.dtype or ("bf16" if str(args.device).startswith("cuda") else "fp32")]
    workers = args.workers if args.workers is not None else batching.default_workers(args.device)
    if workers < 0:
        raise EvalError(f"--workers {workers}: a number of processes, 0 or more")
    unwritable = rundir.unwritable(args.out)       # before the evaluation, not after it
    if unwritable:
        raise EvalError(unwritable)
    records, problems = load_records(args.data, args.image_root, args.limit)
    map_indices = parse_maps(args.maps, len(records)) if args.maps else None
    for p in problems:
        print(f"skipped {p}", file=sys.stderr)
    setting = f"mask {args.mask}, latents {'dropped' if args.no_latents else 'as trained'}"
    print(f"{args.data}: {len(records)} records | {setting}", file=sys.stderr)
    report, used = [], set()
    for spec in specs:
        name, path = checkpoint_name(spec)
        while name in used:
            name += "'"
        used.add(name)
        maps = map_indices if spec == specs[-1] else None      # maps: of the last checkpoint
        report.append(score_checkpoint(args, name, path, records, dtype, workers, maps))
        report[-1]["unparseable"] = problems
    md = table({e["name"]: e["samples"] for e in report},
               {e["name"]: e["answer_latent_attention"] for e in report})
    os.makedirs(args.out, exist_ok=True)         # each file whole or not at all (a kill, a full disk)
    table_file = os.path.join(args.out, "table.md")
    with open(table_file + ".part", "w") as f:
        f.write(f"{args.data} | {setting}\n\n{md}\n")
    os.replace(table_file + ".part", table_file)
    out = {"data": args.data, "mask": args.mask, "latents": not args.no_latents, "checkpoints": report}
    checkpoint.write_json(out, os.path.join(args.out, "results.json"), default=str)
    print(md)
    for e in report:
        if e["errors"]:
            print(f"{e['name']}: {e['errors']} sample(s) failed and were scored wrong")
    if problems:
        print(f"{len(problems)} record(s) could not be parsed and were left out (listed above)")
    print(f"results: {os.path.join(args.out, 'results.json')}")
    last = report[-1]
    print(f"mean accuracy {last['mean']:.1f}% (chance {last['chance_mean']:.1f}%)")
    return out


def parse_maps(spec, n_records):
    """--maps "0,3,7" -> [0, 3, 7], each a record index of the data."""
    try:
        indices = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise EvalError(f"--maps takes record indices like 0,3,7, not {spec!r}")
    bad = [i for i in indices if not 0 <= i < n_records]
    if bad:
        raise EvalError(f"--maps: no record {bad} (the data has {n_records})")
    return indices


def score_checkpoint(args, name, path, records, dtype, workers, map_indices=None):
    """One checkpoint's row of the report: its samples' results, accuracy, answer->latent
    attention, and (map_indices) its attention maps. The model leaves memory before the next."""
    m, processor, meta = load_checkpoint(path, args.device, dtype)
    t0 = time.time()

    def progress(done, n):
        if sys.stderr.isatty() or done == n:      # a live counter on a terminal, one line in logs
            print(f"\r{name}: {done}/{n} samples, {time.time() - t0:.0f}s",
                  end="" if done < n else "\n", file=sys.stderr, flush=True)
    results = evaluate(m, processor, records, args.batch_size, args.mask, not args.no_latents,
                       args.max_new_tokens, progress, workers)
    attn = None
    if args.attention_samples and m.num_latents and not args.no_latents:
        attn = answer_latent_attention(m, processor, records, args.mask, args.attention_samples)
    for r in results:
        if r["error"]:
            print(f"{name}: {r['where']}: {r['error']} (scored wrong)", file=sys.stderr)
    if map_indices and (args.no_latents or not m.num_latents):
        print(f"--maps skipped: {name} has no latent tokens" +
              (" (--no-latents)" if m.num_latents else ""), file=sys.stderr)
    elif map_indices:
        page = attention_maps(m, processor, records, map_indices, os.path.join(args.out, "maps"),
                              args.per_latent, args.mask, {r["index"]: r for r in results},
                              title=f"{name}: latent→image attention")
        print(f"attention maps: {page}", file=sys.stderr)
    del m                                         # one model in memory at a time
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"name": name, "path": path, "meta": meta, **accuracy(results),
            "answer_latent_attention": attn, "samples": results}


if __name__ == "__main__":
    main()
