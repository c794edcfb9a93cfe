"""Zero-shot and few-shot benchmark over every MVTec-layout category under ``--data``.

Rows (image AUROC / pixel AUROC / AUPRO in %, mean ± SD over ``--draws`` random draws of the k images):

* ``MuSc zero-shot`` (k = 0): the test set scored as one batch against itself, on the ViT at 224 px
  and 448 px (``--musc-sizes``; 448 only on test sets of at most 150 images, the pairwise work grows
  16-fold), to show what the resolution buys;
* ``AnomalyDINO`` (k = 1, 2, 4, 8): ViT tokens at 448 px, cosine distance, top-1% image score; with
  ``rotations45`` for the smaller k (``--rot-shots``);
* ``PatchCore`` (k = 1, 2, 4, 8): the CNN (the default EfficientNet-Lite2, 256 + 320 px), every patch
  kept; ``--methods patchcore_vit`` on the ViT, ``patchcore_lite0`` / ``patchcore_mobilenet`` on the
  other CNNs; ``--augments`` chooses the support-set augmentations (RegAD's flips / 90-degree turns
  of the k images; ``default``, the detector's own: 90-degree turns for PatchCore, none for
  AnomalyDINO; ``--augments none,rotations`` compares two).

Each few-shot draw runs the real ``fit(category, shots=k, seed=draw)`` and ``predict``. The backbone
features of each image are computed once per detector configuration and reused across k and draws
(keyed by the image's bytes; the scores are the same as without the cache, only the time differs).
The published anchors are printed beside: AnomalyDINO (WACV 2025) 1-shot, MuSc (ICLR 2024) zero-shot.
Times: ``fit_s`` is one fit (features of the k images included), ``ms_per_image`` the prediction
time per test image without the cache (the ViT pass measured once per category, plus the scoring).

    python benchmarks/fewshot.py --data ../shared/data --out benchmarks/results/fewshot.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from run import find_categories  # noqa: E402
from tables import append_jsonl, print_markdown  # noqa: E402

from anomalens.data import MVTecCategory  # noqa: E402
from anomalens.detectors import create_detector  # noqa: E402
from anomalens.evaluation import compute_metrics  # noqa: E402
from anomalens.io import to_rgb_array  # noqa: E402
from anomalens.zeroshot import REFERENCE_BACKBONE, MuSc  # noqa: E402

METRICS = ("image_auroc", "pixel_auroc", "aupro")
#: published numbers (image AUROC %), MVTec AD; "-" where the paper has no such category
ANCHORS = {
    ("AnomalyDINO", 1): "96.6 MVTec mean (DINOv2 ViT-S/14, 448 px)",
    ("MuSc zero-shot", 0): "97.8 MVTec mean; transistor 99.4, screw 82.2 (CLIP ViT-L/14, 518 px)",
}
METHODS = {
    "anomalydino": ("AnomalyDINO", "anomalydino", {}),
    "patchcore": ("PatchCore", "patchcore", {}),  # the default backbone, EfficientNet-Lite2
    "patchcore_lite0": ("PatchCore", "patchcore", {"backbone": "efficientnet_lite0"}),  # the default until 2026-11-25
    "patchcore_mobilenet": ("PatchCore", "patchcore", {"backbone": "mobilenet_v2"}),
    "patchcore_vit": ("PatchCore", "patchcore", {"backbone": "vit_small_focus"}),
}


def cache_features(det, cache: dict):
    """Wrap ``det._group_features`` so that images already seen (by content and model-input shape)
    reuse their features; returns ``det``."""
    import torch

    raw = det._group_features

    def group_features(images, shapes):
        keys = [hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).hexdigest() + str(shapes) for im in images]
        missing = [i for i, k in enumerate(keys) if k not in cache]
        if missing:
            feats = raw([images[i] for i in missing], shapes)
            for j, i in enumerate(missing):
                cache[keys[i]] = [f[j].clone() for f in feats]
        return [torch.stack([cache[k][s] for k in keys]) for s in range(len(shapes))]

    det._group_features = group_features
    return det


def few_shot_row(
    cat: MVTecCategory, method: str, k: int, augment: str, draws: int, cache: dict, masking: bool = False, extra: dict | None = None
) -> dict:
    label, name, params = METHODS[method]
    params = dict(params, **(extra or {}))
    if masking:
        params["masking"] = True
    samples = cat.test_samples()
    per = {m: [] for m in METRICS}
    fars, fits, scoring = [], [], []
    for seed in range(draws):
        det = cache_features(create_detector(name, **params), cache)
        t0 = time.perf_counter()
        det.fit(cat, shots=k, augment=None if augment == "default" else augment, seed=seed)
        t1 = time.perf_counter()
        preds = det.predict(samples)
        t2 = time.perf_counter()
        m = compute_metrics(preds)
        for key in METRICS:
            per[key].append(100 * m[key])
        good = [p for p in preds if p.ok and p.gt_label == 0]
        fars.append(100 * sum(p.pred_label for p in good) / len(good))
        fits.append(t1 - t0)
        scoring.append(1000 * (t2 - t1) / len(samples))
    row = {
        "category": cat.name, "method": label + (" masked" if masking else ""), "backbone": det.backbone_name,
        "image_size": det.size_label, "k": k, "augment": det.fit_info["augment"], "image_score": det.image_score, "draws": draws,
        "promised_far": 100.0 / (k + 1) if k > 1 else math.nan, "observed_far": fars,
        "fit_s": float(np.mean(fits)), "scoring_ms_per_image": float(np.mean(scoring[1:] or scoring)),
    }
    if extra:
        row["extra"] = extra
    for key in METRICS:
        row[key] = per[key]
    return row


def feature_ms(cat: MVTecCategory, method: str, n: int = 4) -> float:
    """Backbone features of ``n`` test images, ms per image (uncached; after one warm-up image)."""
    _, name, params = METHODS[method]
    det = create_detector(name, **params)
    imgs = [to_rgb_array(s.path) for s in cat.test_samples()[: n + 1]]
    det.extract(imgs[:1])
    t0 = time.perf_counter()
    det.extract(imgs[1:])
    return 1000 * (time.perf_counter() - t0) / max(1, len(imgs) - 1)


def cached_musc(mutual: dict | None, **params) -> MuSc:
    """A :class:`MuSc` whose mutual scores are computed once per ``mutual`` dict (one category's test
    set) and reused by later rows; ``mutual=None``: no cache."""
    model = MuSc(**params)
    if mutual is None:
        return model
    raw_parts = model.mutual_parts

    def cached(arrays):
        if "scores" not in mutual:
            t0 = time.perf_counter()
            mutual["scores"] = raw_parts(arrays)
            mutual["seconds"] = time.perf_counter() - t0
        return mutual["scores"]

    model.mutual_parts = cached
    return model


def _musc_backbone(model: MuSc) -> str:
    return "+".join(("vit_small_focus",) + model.cnn_backbones)


def zero_shot_row(cat: MVTecCategory, size: int, max_references: int | None, mutual: dict | None = None, **musc) -> dict:
    samples = cat.test_samples()
    model = cached_musc(mutual, image_size=size, max_references=max_references, **musc)
    t0 = time.perf_counter()
    preds = model.predict(samples)
    dt = time.perf_counter() - t0
    m = compute_metrics(preds)
    good = [p for p in preds if p.gt_label == 0]
    row = {"category": cat.name, "method": "MuSc zero-shot", "backbone": _musc_backbone(model), "image_size": f"{size} px",
           "k": 0, "augment": "none", "draws": 1, "promised_far": math.nan,
           "observed_far": [100 * sum(p.pred_label for p in good) / len(good)], "fit_s": 0.0,
           "ms_per_image": 1000 * dt / len(samples), "max_references": max_references,
           "cnn_views": list(model.cnn_views)}
    for key in METRICS:
        row[key] = [100 * m[key]]
    return row


def reference_row(cat: MVTecCategory, k: int, draws: int, mutual: dict, **musc) -> dict:
    """``MuSc + k references`` (few-shot with the batch): the mutual part is computed once per category
    (shared with the 224 px zero-shot row)."""
    samples = cat.test_samples()
    model = cached_musc(mutual, **musc)
    per = {m: [] for m in METRICS}
    fars, secs = [], []
    train = cat.train_paths()
    for seed in range(draws):
        refs = [train[i] for i in np.random.default_rng(seed).choice(len(train), size=k, replace=False)]
        fresh = "scores" not in mutual
        t0 = time.perf_counter()
        preds = model.predict(samples, references=refs)
        secs.append(time.perf_counter() - t0 - (mutual["seconds"] if fresh else 0.0))
        m = compute_metrics(preds)
        for name in METRICS:
            per[name].append(100 * m[name])
        good = [p for p in preds if p.gt_label == 0]
        fars.append(100 * sum(p.pred_label for p in good) / len(good))
    row = {"category": cat.name, "method": "MuSc + k references", "backbone": _musc_backbone(model), "reference_backbone": REFERENCE_BACKBONE,
           "image_size": "224 px", "k": k, "augment": model.reference_augment, "draws": draws, "promised_far": math.nan, "observed_far": fars,
           "fit_s": 0.0, "ms_per_image": 1000 * (float(np.mean(secs)) + mutual["seconds"]) / len(samples)}
    for name in METRICS:
        row[name] = per[name]
    return row


def _ms(v: list[float]) -> str:
    return f"{np.mean(v):.1f} ± {np.std(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def _promise(far: float) -> str:
    return "-" if math.isnan(far) else f"≤ {far:.0f}"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--categories", default=None, help="comma-separated folder names (default: every category found)")
    ap.add_argument("--methods", default="anomalydino,patchcore")
    ap.add_argument("--shots", default="1,2,4,8")
    ap.add_argument("--rot-shots", default="1", help="k for which AnomalyDINO also runs with rotations45 ('' = none)")
    ap.add_argument("--masking", action="store_true", help="also AnomalyDINO with background masking")
    ap.add_argument("--augments", default="default",
                    help="support-set augmentations of the PatchCore rows, comma-separated (default = the detector's own, "
                    "none, flips, rotations, dihedral)")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--musc-sizes", default="224,448", help="ViT sizes of the zero-shot rows ('' = no zero-shot)")
    ap.add_argument("--max-references", type=int, default=100)
    ap.add_argument("--musc-max-images-448", type=int, default=150,
                    help="skip zero-shot above 224 px on test sets larger than this (the pairwise work grows 16-fold)")
    ap.add_argument("--references", action="store_true", help="also MuSc with the k images as references (few-shot with the batch)")
    ap.add_argument("--musc-cnn", default=None, help="CNNs of MuSc's mutual score, comma-separated (default: MuSc's own; 'none' = the ViT alone)")
    ap.add_argument("--reference-augment", default=None, help="views of the references in the MuSc + k references rows (default: MuSc's own)")
    ap.add_argument("--extra", default="{}", help="JSON of further arguments for every few-shot detector (a probe; recorded in the rows)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    extra = json.loads(args.extra)
    musc = {}  # MuSc arguments for every MuSc row
    if args.musc_cnn:
        musc["cnn_backbone"] = None if args.musc_cnn.lower() == "none" else args.musc_cnn.split(",")
    if args.reference_augment:
        musc["reference_augment"] = args.reference_augment
    cats = find_categories(Path(args.data))
    if args.categories:
        wanted = args.categories.split(",")
        cats = sorted((c for c in cats if c.name in wanted), key=lambda c: wanted.index(c.name))  # in the order given
    rows = []

    def show(r: dict) -> None:
        append_jsonl(args.out, [r])  # each row as soon as it exists
        print({key: r.get(key) for key in ("category", "method", "backbone", "image_size", "k", "augment")},
              {m: _ms(r[m]) for m in METRICS}, flush=True)

    for path in cats:
        cat = MVTecCategory(path)
        mutual: dict = {}  # the default MuSc's scores of this test set, shared by zero-shot and references
        for size in _ints(args.musc_sizes):
            if size > 224 and len(cat.test_samples()) > args.musc_max_images_448:
                print(f"{cat.name}: zero-shot at {size} px skipped ({len(cat.test_samples())} test images)", flush=True)
                continue
            default = size == 224 and args.max_references == 100
            rows.append(zero_shot_row(cat, size, args.max_references, mutual if default else None, **musc))
            show(rows[-1])
        if args.references:
            for k in _ints(args.shots):
                rows.append(reference_row(cat, k, args.draws, mutual, **musc))
                show(rows[-1])
        for method in filter(None, args.methods.split(",")):
            cache: dict = {}
            ms = feature_ms(cat, method)
            if METHODS[method][1] == "patchcore":  # the support-set augmentations are PatchCore's
                variants = [(k, a, False) for a in args.augments.split(",") for k in _ints(args.shots)]
            else:
                variants = [(k, "none", False) for k in _ints(args.shots)]
            if method == "anomalydino":
                variants += [(k, "rotations45", False) for k in _ints(args.rot_shots)]
                if args.masking:
                    variants += [(k, "none", True) for k in _ints(args.shots)]
            for k, augment, masking in variants:
                r = few_shot_row(cat, method, k, augment, args.draws, cache, masking, extra)
                r["ms_per_image"] = ms + r["scoring_ms_per_image"]
                rows.append(r)
                show(r)
            cache.clear()
    print_markdown(
        ["category", "method", "backbone", "input", "k", "augment", "image AUROC", "pixel AUROC", "AUPRO", "false alarms % (promised)",
         "fit s", "ms / image", "published"],
        [[r["category"], r["method"], r["backbone"], r["image_size"], r["k"], r["augment"], _ms(r["image_auroc"]), _ms(r["pixel_auroc"]), _ms(r["aupro"]),
          f"{_ms(r['observed_far'])} ({_promise(r['promised_far'])})", f"{r['fit_s']:.1f}", f"{r['ms_per_image']:.0f}",
          ANCHORS.get((r["method"], r["k"]), "")]
         for r in rows],
    )
    # the worst category of each (method, k, augment): the number the targets are about
    summary = {}
    for r in rows:
        summary.setdefault((r["method"], r["backbone"], r["image_size"], r["k"], r["augment"]), []).append((np.mean(r["image_auroc"]), r["category"]))
    print()
    print_markdown(
        ["method", "backbone", "input", "k", "augment", "mean image AUROC", "worst category"],
        [[m, b, s, k, a, f"{np.mean([v for v, _ in vals]):.1f}", "{1} {0:.1f}".format(*min(vals))] for (m, b, s, k, a), vals in summary.items()],
    )


if __name__ == "__main__":
    main()
