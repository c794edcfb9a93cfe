"""Benchmark of the trust features: does the threshold keep its false-alarm promise, and how well are
defect types discovered?

1. False alarms. For each detector, each category of ``--categories`` (transistor: 60 good test
   images; magnetic_tile: 100, held out of every choice the threshold rules were made on) and each calibration source, the conformal threshold at
   alpha in {0.01, 0.05, 0.1} is applied to the good test images; the table gives the false alarms,
   the observed rate, the central 95% binomial band of Binomial(n_good, alpha)/n_good, and the
   detection rate. Sources: the default out-of-sample calibration on all training images
   (PatchCore leave-one-out, PaDiM 5-fold cross-fit), and split conformal with half of the training
   images held out, over several random draws (the mean observed rate over draws is judged against
   the band, since the guarantee is on average over the calibration draw; per-draw counts are shown).
2. Defect types. Regions of the defective test images clustered without labels; NMI and ARI
   against the defect folders, with k chosen by silhouette and with k given (the number of folders):
   the categories above and hazelnut_reduced.
3. Time: evaluate (predict + all metrics) and the report.

Usage::

    python benchmarks/trust.py --data ../shared/data [--categories transistor,magnetic_tile] [--draws 5] [--out benchmarks/results/trust.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ALPHAS = (0.01, 0.05, 0.1)


def far_rows(det, preds, label: str, category: str) -> list[dict]:
    from anomalens.evaluation import threshold_table

    rows = []
    for r in threshold_table(det, preds, ALPHAS):
        r = {"category": category, "detector": det.name, "calibration": label, **r}
        rows.append(r)
    return rows


def defect_type_row(det, preds, category: str, name: str) -> tuple[dict, object, list, dict]:
    """Defect types of the defective predictions, without labels: k chosen by silhouette, and k given
    (the number of defect folders); NMI / ARI against the folders. Returns the row, and for the
    report the clusters (k by silhouette), the defective predictions and their agreement."""
    from anomalens.discovery import agreement, discover_defect_types

    defective = [p for p in preds if p.gt_label == 1]
    n_types = len({p.defect_type for p in defective})
    t0 = time.perf_counter()
    auto_c = discover_defect_types(det, defective)
    disc_s = time.perf_counter() - t0
    auto = agreement([defective[i].defect_type for i, _ in auto_c.refs], auto_c.labels)
    given_c = discover_defect_types(det, defective, k_range=(n_types, n_types))
    given = agreement([defective[i].defect_type for i, _ in given_c.refs], given_c.labels)
    return {
        "category": category, "detector": name, "kind": "defect_types", "n_regions": len(auto_c.refs), "n_types": n_types,
        "k_auto": auto_c.n_clusters, "nmi_auto": auto["nmi"], "ari_auto": auto["ari"],
        "nmi_given": given["nmi"], "ari_given": given["ari"], "discovery_s": round(disc_s, 1),
    }, auto_c, defective, auto


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--draws", type=int, default=5, help="random hold-out draws for split conformal")
    ap.add_argument("--detectors", default="patchcore,padim")
    ap.add_argument("--categories", default="transistor,magnetic_tile",
                    help="categories whose good test images check the threshold and whose defect folders check the defect types")
    ap.add_argument("--out", default="benchmarks/results/trust.jsonl")
    args = ap.parse_args()

    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from run import find_categories

    from anomalens import create_detector
    from anomalens.data import MVTecCategory
    from anomalens.evaluation import evaluate
    from anomalens.report import render_report

    out_rows: list[dict] = []
    mvtec = Path(args.data) / "mvtec_ad"
    found = {c.name: MVTecCategory(c) for c in find_categories(Path(args.data))}
    wanted = args.categories.split(",")
    missing = [c for c in wanted if c not in found]
    if missing:
        raise SystemExit(f"categories not found under {args.data}: {missing}")
    for name in args.detectors.split(","):
        for cat_name in wanted:
            # 1. false alarms on the good test images, default calibration
            cat = found[cat_name]
            det = create_detector(name)
            t0 = time.perf_counter()
            det.fit(cat)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = evaluate(det, cat)
            eval_s = time.perf_counter() - t0
            out_rows += far_rows(det, res.predictions, det.calibration.source, cat_name)
            # 2. defect types of its defective test images
            row, clusters, defective, auto = defect_type_row(det, res.predictions, cat_name, name)
            t0 = time.perf_counter()
            render_report(res, det, title="bench", clusters=clusters, cluster_preds=defective, agreement=auto)
            row.update(fit_s=round(fit_s, 1), evaluate_s=round(eval_s, 1), report_s=round(time.perf_counter() - t0, 1))
            out_rows.append(row)
            # split conformal over random draws: fit on half the training images, calibrate on the other half
            draws = []
            for seed in range(args.draws):
                d = create_detector(name).fit(cat, holdout=0.5, seed=seed)
                r = evaluate(d, cat, per_defect=False)
                draws.append(far_rows(d, r.predictions, f"held-out 50% (seed {seed})", cat_name))
            for j, alpha in enumerate(ALPHAS):
                rs = [dr[j] for dr in draws]
                if any("error" in r for r in rs):  # too few held-out images for this rate
                    out_rows.append({"category": cat_name, "detector": name, "calibration": f"held-out 50%, {args.draws} draws",
                                     "alpha": alpha, "error": next(r["error"] for r in rs if "error" in r)})
                    continue
                out_rows.append({
                    "category": cat_name, "detector": name, "calibration": f"held-out 50%, {args.draws} draws", "alpha": alpha,
                    "n_calibration": rs[0]["n_calibration"], "n_good": rs[0]["n_good"],
                    "false_alarms": [r["false_alarms"] for r in rs], "observed_far": float(np.mean([r["observed_far"] for r in rs])),
                    "band": rs[0]["band"],
                    # the guarantee is on average over the calibration draw: judge the mean rate
                    "within_band": bool(rs[0]["band"][0] <= np.mean([r["observed_far"] for r in rs]) <= rs[0]["band"][1]),
                    "draws_within": sum(bool(r["within_band"]) for r in rs),
                    "detection_rate": float(np.mean([r["detection_rate"] for r in rs])),
                })
        # 3. defect types on hazelnut_reduced (8 defective images, 4 types; 50 training images support a 5% rate)
        if "hazelnut_reduced" in wanted:
            continue
        hz = MVTecCategory(mvtec / "hazelnut_reduced")
        dh = create_detector(name, false_alarm_rate=0.05).fit(hz)
        rh = evaluate(dh, hz, per_defect=False)
        out_rows.append(defect_type_row(dh, rh.predictions, "hazelnut_reduced", name)[0])

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for r in out_rows:
            f.write(json.dumps(r) + "\n")
    print("| category | detector | calibration | alpha | n cal | false alarms / good | observed % | 95% band % | within | detected % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in out_rows:
        if r.get("kind") == "defect_types" or "error" in r:
            continue
        fa = r["false_alarms"]
        fa_s = f"{fa}/{r['n_good']}" if isinstance(fa, int) else f"{'+'.join(map(str, fa))} / {len(fa)}x{r['n_good']}"
        within = "yes" if r["within_band"] else "no"
        if "draws_within" in r:
            within += f" ({r['draws_within']}/{len(fa)} draws)"
        print(f"| {r['category']} | {r['detector']} | {r['calibration']} | {r['alpha']} | {r['n_calibration']} | {fa_s} | {100 * r['observed_far']:.1f} | "
              f"{100 * r['band'][0]:.1f}-{100 * r['band'][1]:.1f} | {within} | {100 * r['detection_rate']:.1f} |")
    print()
    print("| category | detector | regions | k (silhouette) | NMI | ARI | k given (folders) | NMI at k given | ARI at k given |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in out_rows:
        if r.get("kind") == "defect_types":
            print(f"| {r['category']} | {r['detector']} | {r['n_regions']} | {r['k_auto']} | {r['nmi_auto']:.3f} | {r['ari_auto']:.3f} | {r['n_types']} | {r['nmi_given']:.3f} | {r['ari_given']:.3f} |")
    print()
    for r in out_rows:
        if "evaluate_s" in r:
            print(f"{r['detector']} on {r['category']}: fit {r['fit_s']} s, evaluate {r['evaluate_s']} s, discovery {r['discovery_s']} s, report {r['report_s']} s")


if __name__ == "__main__":
    main()
