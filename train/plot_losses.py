"""Draws the loss curves of a training run (the losses-*.json train_sd.py and train_wan.py write) into one
PNG with PIL: one panel per file, loss on a log scale against step.

Usage: python train/plot_losses.py OUT.png losses-a.json [losses-b.json ...]
"""

import json
import math
import os
import sys

from PIL import Image, ImageDraw


def main():
    out, files = sys.argv[1], sys.argv[2:]
    pw, ph, pad = 360, 220, 40
    img = Image.new("RGB", (pw * len(files), ph), "white")
    d = ImageDraw.Draw(img)
    for k, path in enumerate(files):
        rows = json.load(open(path))
        steps = [r["step"] for r in rows]
        logs = [math.log10(max(r["loss"], 1e-6)) for r in rows]
        lo, hi = math.floor(min(logs)), math.ceil(max(logs))
        x0 = k * pw + pad
        to_xy = lambda s, l: (x0 + (pw - 1.5 * pad) * s / max(steps[-1], 1), ph - pad - (ph - 1.6 * pad) * (l - lo) / max(hi - lo, 1e-9))
        d.rectangle([x0, pad * 0.6, x0 + pw - 1.5 * pad, ph - pad], outline="black")
        for e in range(lo, hi + 1):
            y = to_xy(0, e)[1]
            d.line([x0 - 4, y, x0, y], fill="black")
            d.text((x0 - 36, y - 6), f"1e{e}", fill="black")
        d.line([to_xy(s, l) for s, l in zip(steps, logs)], fill=(40, 80, 220), width=2)
        d.text((x0, 4), f"{os.path.basename(path)}: {steps[-1] + 1} steps, last {rows[-1]['loss']:.4f}", fill="black")
        d.text((x0 + pw - 2.5 * pad, ph - pad + 6), "step", fill="black")
    img.save(out)


if __name__ == "__main__":
    main()
