"""Zero-shot and few-shot rows: image AUROC / pixel AUROC / AUPRO for k = 0 (MuSc) and k = 1, 2, 4, 8
normal images (PatchCore on every patch of the k images), mean and spread over ``--draws`` random
draws of the k images, on the CNN and the ViT, with and without augmentation; plus the observed
false-alarm rate on the good test images at the few-shot threshold and the rate it promises.
Rows "MuSc + k references" score the test set as one batch with the k images as known-good
references (``MuSc().predict(test, references=...)``; the mutual part is computed once per category).

Each draw runs the real ``fit(category, shots=k, seed=draw)`` and ``predict``; the backbone features
of the test images are computed once per backbone and reused across draws (``--no-cache`` turns that
off; the scores are the same, only the time differs).

    python benchmarks/fewshot.py --data ../shared/data --out benchmarks/results/fewshot.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from tables import append_jsonl, print_markdown  # noqa: E402

from anomalens.data import MVTecCategory  # noqa: E402
from anomalens.detectors import create_detector  # noqa: E402
from anomalens.evaluation import compute_metrics  # noqa: E402
from anomalens.zeroshot import MuSc  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def cached_extract(det, cache: dict):
    """Wrap ``det.extract`` so that training images already seen (by content) reuse their features
    (``extract`` returns ``[scale][image]``)."""
    raw = det.extract

    def extract(images):
        keys = [hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).hexdigest() for im in images]
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            feats = raw([images[i] for i in missing])
            for j, i in enumerate(missing):
                cache[keys[i]] = [f[j] for f in feats]
        return [[cache[k][s] for k in keys] for s in range(len(det.image_sizes))]

    det.extract = extract
    return det


def few_shot_row(cat: MVTecCategory, backbone: str, k: int, augment: str, draws: int, cache: dict | None) -> dict:
    samples = cat.test_samples()
    per = {m: [] for m in METRICS}
    fars, fits, preds_s = [], [], []
    for seed in range(draws):
        det = create_detector("patchcore", backbone=backbone)
        if cache is not None:
            cached_extract(det, cache)
        t0 = time.perf_counter()
        det.fit(cat, shots=k, augment=augment, seed=seed)
        t1 = time.perf_counter()
        preds = det.predict(samples)
        t2 = time.perf_counter()
        m = compute_metrics(preds)
        for key in METRICS:
            per[key].append(100 * m[key])
        good = [p for p in preds if p.ok and p.gt_label == 0]
        fars.append(100 * sum(p.pred_label for p in good) / len(good))
        fits.append(t1 - t0)
        preds_s.append(len(samples) / (t2 - t1))
    row = {
        "category": cat.name, "method": "PatchCore few-shot", "backbone": backbone, "k": k, "augment": augment, "draws": draws,
        "promised_far": 100.0 / (k + 1) if k > 1 else math.nan, "observed_far": fars,
        "fit_s": float(np.mean(fits)),
    }
    for key in METRICS:
        row[key] = per[key]
    return row


def zero_shot_row(cat: MVTecCategory) -> dict:
    samples = cat.test_samples()
    t0 = time.perf_counter()
    preds = MuSc().predict(samples)
    dt = time.perf_counter() - t0
    m = compute_metrics(preds)
    good = [p for p in preds if p.gt_label == 0]
    row = {"category": cat.name, "method": "MuSc zero-shot", "backbone": "vit_small_focus", "k": 0, "augment": "none", "draws": 1,
           "promised_far": math.nan, "observed_far": [100 * sum(p.pred_label for p in good) / len(good)], "fit_s": 0.0,
           "seconds": dt}
    for key in METRICS:
        row[key] = [100 * m[key]]
    return row


def reference_row(cat: MVTecCategory, k: int, augment: str, draws: int, mutual: dict) -> dict:
    samples = cat.test_samples()
    model = MuSc(reference_augment=augment)
    raw_score_batch = model.score_batch

    def cached(arrays):  # the mutual part does not depend on the references: once per category
        if "scores" not in mutual:
            mutual["scores"] = raw_score_batch(arrays)
        return mutual["scores"]

    model.score_batch = cached
    per = {m: [] for m in METRICS}
    fars, secs = [], []
    train = cat.train_paths()
    for seed in range(draws):
        refs = [train[i] for i in np.random.default_rng(seed).choice(len(train), size=k, replace=False)]
        t0 = time.perf_counter()
        preds = model.predict(samples, references=refs)
        secs.append(time.perf_counter() - t0)
        m = compute_metrics(preds)
        for name in METRICS:
            per[name].append(100 * m[name])
        good = [p for p in preds if p.gt_label == 0]
        fars.append(100 * sum(p.pred_label for p in good) / len(good))
    row = {"category": cat.name, "method": "MuSc + k references", "backbone": "vit_small_focus+efficientnet_lite0", "k": k,
           "augment": augment, "draws": draws, "promised_far": math.nan, "observed_far": fars, "fit_s": 0.0,
           "seconds": float(np.mean(secs[1:] or secs))}
    for name in METRICS:
        row[name] = per[name]
    return row


def _ms(v: list[float]) -> str:
    return f"{np.mean(v):.1f} ± {np.std(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def _promise(far: float) -> str:
    return "-" if math.isnan(far) else f"≤ {far:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--categories", default="transistor,hazelnut_reduced")
    ap.add_argument("--backbones", default="efficientnet_lite0,vit_small_focus")
    ap.add_argument("--shots", default="1,2,4,8")
    ap.add_argument("--augments", default="none,rotations")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--no-zero-shot", action="store_true")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--no-references", action="store_true", help="skip the MuSc + k references rows")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for name in args.categories.split(","):
        cat = MVTecCategory(os.path.join(args.data, "mvtec_ad", name))
        if not args.no_zero_shot:
            rows.append(zero_shot_row(cat))
            print(rows[-1], flush=True)
        if not args.no_references:
            mutual: dict = {}  # this category's MuSc scores and maps
            for augment in args.augments.split(","):
                for k in (int(x) for x in args.shots.split(",")):
                    rows.append(reference_row(cat, k, augment, args.draws, mutual))
                    print({key: rows[-1][key] for key in ("category", "method", "k", "augment")},
                          {m: _ms(rows[-1][m]) for m in METRICS}, flush=True)
        for backbone in filter(None, args.backbones.split(",")):
            cache = None if args.no_cache else {}
            for augment in args.augments.split(","):
                for k in (int(x) for x in args.shots.split(",")):
                    rows.append(few_shot_row(cat, backbone, k, augment, args.draws, cache))
                    print({key: rows[-1][key] for key in ("category", "backbone", "k", "augment")},
                          {m: _ms(rows[-1][m]) for m in METRICS}, flush=True)
    append_jsonl(args.out, rows)
    print_markdown(
        ["category", "method", "backbone", "k", "augment", "image AUROC", "pixel AUROC", "AUPRO", "false alarms % (promised)", "fit s"],
        [[r["category"], r["method"], r["backbone"], r["k"], r["augment"], _ms(r["image_auroc"]), _ms(r["pixel_auroc"]), _ms(r["aupro"]),
          f"{_ms(r['observed_far'])} ({_promise(r['promised_far'])})", f"{r['fit_s']:.1f}"]
         for r in rows],
    )


if __name__ == "__main__":
    main()
