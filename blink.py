"""
BLINK, as distributed on the hub (BLINK-Benchmark/BLINK: <Task>/{val,test}-*.parquet), converted
to this project's JSONL records (data.py) with the images as files beside them.

    python blink.py path/to/BLINK --out data/blink         # needs pyarrow
"""
import argparse
import hashlib
import io
import os
import re
import sys
from pathlib import Path

from PIL import Image

from data import SPLITS, Sample, format_prompt, normalize_answer, write_jsonl


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
        raise SystemExit("blink.py needs pyarrow: pip install pyarrow")
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("sources", nargs="+", help="parquet files or directories holding them")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        convert_blink(args.sources, args.out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
