"""The model input: time to resize one decoded image to the default scales (256 + 320 px, aspect kept)
and scale it to [0, 1], by image size, on one thread.

Compares, in one run:

* ours (:func:`anomalens.resampling.model_inputs`): Pillow's antialiased bilinear filter on the
  ``uint8`` image where it shrinks, OpenCV's bilinear on ``float32`` where it only grows; the same
  arrays on torch and the torch-free runtime;
* ``torch float``: the image to ``float32`` at full size, then torch's antialiased bilinear
  ``interpolate`` (the torch path before 2026-12-08);
* ``Pillow float``: Pillow's filter on each ``float32`` channel (the torch-free runtime before
  2026-12-08).

Also the largest difference of ours from ``torch float`` in grey levels (the ``uint8`` rounding where
the image shrinks).
Image sizes: a hazelnut_reduced test image (256 px) and a transistor one (512 px) as they are, and
the transistor image enlarged to camera sizes (1024 px, 2448 x 2048).

Usage: python benchmarks/model_input.py --data ../shared/data [--out rows.jsonl]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def torch_float(img: np.ndarray, shapes) -> list[torch.Tensor]:
    t = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float().div_(255.0)
    return [t if tuple(t.shape[-2:]) == hw else F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=True) for hw in shapes]


def pillow_float(img: np.ndarray, shapes) -> list[np.ndarray]:
    out = []
    for h, w in shapes:
        chans = [np.ascontiguousarray(img[..., c], dtype=np.float32) / np.float32(255.0) for c in range(3)]
        out.append(np.stack([c if c.shape == (h, w) else np.asarray(Image.fromarray(c, mode="F").resize((w, h), Image.BILINEAR)) for c in chans]))
    return out


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1e3 * statistics.median(times), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--out", default=None, help="append one JSON row per image size")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from anomalens.geometry import model_input_hw
    from anomalens.io import read_image
    from anomalens.resampling import model_inputs

    data = Path(args.data) / "mvtec_ad"
    hazelnut = read_image(sorted((data / "hazelnut_reduced" / "test" / "crack").glob("*.png"))[0])
    transistor = read_image(sorted((data / "transistor" / "test" / "bent_lead").glob("*.png"))[0])
    big = Image.fromarray(transistor)
    images = {"hazelnut_reduced 256 x 256": hazelnut, "transistor 512 x 512": transistor,
              "transistor enlarged to 1024 x 1024": np.asarray(big.resize((1024, 1024), Image.BICUBIC)),
              "transistor enlarged to 2448 x 2048": np.asarray(big.resize((2448, 2048), Image.BICUBIC))}
    print("| image | ours ms | torch float ms | Pillow float ms | largest difference from torch float, grey levels |")
    print("|---|---|---|---|---|")
    for name, img in images.items():
        shapes = [model_input_hw(img.shape[:2], s) for s in (256, 320)]
        ours = model_inputs([img], shapes)
        diff = max(float(np.abs(o[0] - r[0].numpy()).max()) for o, r in zip(ours, torch_float(img, shapes))) * 255
        row = {"kind": "model input", "image": name, "shapes": shapes, "threads": 1,
               "ms_ours": median_ms(lambda: model_inputs([img], shapes), args.reps),
               "ms_torch_float": median_ms(lambda: torch_float(img, shapes), args.reps),
               "ms_pillow_float": median_ms(lambda: pillow_float(img, shapes), args.reps),
               "max_diff_grey_levels": round(diff, 3), "date": datetime.date.today().isoformat()}
        print(f"| {name} | {row['ms_ours']} | {row['ms_torch_float']} | {row['ms_pillow_float']} | {row['max_diff_grey_levels']} |")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
