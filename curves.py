"""
A training stage's metrics.jsonl drawn as a PNG: loss, learning rate and validation accuracy
against the step, side by side. Pillow only (no matplotlib), so every run gets its curves
whether or not TensorBoard or W&B is installed.

    python curves.py runs/demo/stage1/metrics.jsonl        # writes runs/demo/stage1/metrics.png

train.py draws it at the end of each stage (tracking.Tracker.finish).
"""
import json
import math
import os
import sys

from PIL import Image, ImageDraw, ImageFont

SIZE = (1200, 360)
# (metrics.jsonl key, panel title, colour, fixed value range or None: the data's own)
PANELS = [("loss", "training loss", (31, 119, 180), None), ("lr", "learning rate", (44, 160, 44), None),
          ("val_acc", "validation accuracy", (214, 39, 40), (0.0, 1.0))]


def read_series(path):
    """{key: [(step, value), ...]} for each panel's key, in file order. Lines that do not parse
    (a line torn by a kill) and non-finite values (a skipped step's loss) are left out."""
    series = {p[0]: [] for p in PANELS}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), (int, float)):
                continue
            for key in series:
                v = row.get(key)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    series[key].append((row["step"], float(v)))
    return series


def draw(path, out=None, size=SIZE):
    """Draw metrics.jsonl at `path` into `out` (default: metrics.png beside it). Returns out."""
    out = out or os.path.join(os.path.dirname(path), "metrics.png")
    series = read_series(path)
    img = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    w = size[0] // len(PANELS)
    for i, (key, title, colour, fixed) in enumerate(PANELS):
        panel(pen, font, (i * w, 0, (i + 1) * w, size[1]), title, series[key], colour, fixed)
    tmp = out + ".part"
    img.save(tmp, format="PNG")
    os.replace(tmp, out)             # a reader never sees half an image
    return out


def panel(pen, font, box, title, points, colour, fixed=None):
    """One chart in `box` (x0, y0, x1, y1): title, frame, axis labels at the ends, the curve.
    fixed: the value axis's range (accuracy: 0..1), else the data's."""
    x0, y0, x1, y1 = box
    left, top, right, bottom = x0 + 70, y0 + 30, x1 - 20, y1 - 35
    pen.text((x0 + 70, y0 + 8), title, fill="black", font=font)
    pen.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    if not points:
        pen.text((left + 10, (top + bottom) // 2), "no data", fill=(120, 120, 120), font=font)
        return
    steps, values = [p[0] for p in points], [p[1] for p in points]
    s_lo, s_hi = min(steps), max(steps)
    v_lo, v_hi = fixed or (min(values), max(values))
    if v_hi == v_lo:                  # a flat line sits in the middle of the frame
        v_lo, v_hi = v_lo - 0.5 * (abs(v_lo) or 1), v_hi + 0.5 * (abs(v_hi) or 1)
    sx = lambda s: left + (right - left) * ((s - s_lo) / (s_hi - s_lo) if s_hi > s_lo else 0.5)
    sy = lambda v: bottom - (bottom - top) * (v - v_lo) / (v_hi - v_lo)
    xy = [(sx(s), sy(v)) for s, v in points]
    if len(xy) > 1:
        pen.line(xy, fill=colour, width=2)
    for x, y in xy if len(xy) <= 50 else xy[-1:]:      # few points (validation): mark each
        pen.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    label = lambda v: f"{v:.3g}"
    pen.text((x0 + 5, top - 6), label(v_hi), fill="black", font=font)
    pen.text((x0 + 5, bottom - 6), label(v_lo), fill="black", font=font)
    pen.text((left, bottom + 6), f"step {s_lo:g}", fill="black", font=font)
    pen.text((right - 60, bottom + 6), f"step {s_hi:g}", fill="black", font=font)
    pen.text((left + 10, top + 6), f"last {label(values[-1])}", fill=colour, font=font)


if __name__ == "__main__":
    for p in sys.argv[1:] or [os.path.join("runs", "demo", "stage1", "metrics.jsonl")]:
        print(draw(p))
