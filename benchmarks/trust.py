"""Benchmark of the trust features: does the threshold keep its false-alarm promise, and how well are
defect types discovered?

1. False alarms. For each detector and each calibration source, the conformal threshold at
   alpha in {0.01, 0.05, 0.1} is applied to the good test images; the table gives the false alarms,
   the observed rate, the central 95% binomial band of Binomial(n_good, alpha)/n_good, and the
   detection rate. Sources: the default out-of-sample calibration on all training images
   (PatchCore leave-one-out, PaDiM 5-fold cross-fit), and split conformal with half of the training
   images held out, over several random draws (the mean observed rate over draws is judged against
   the band, since the guarantee is on average over the calibration draw; per-draw counts are shown).
2. Defect types. Regions of the defective test images clustered without labels; NMI and ARI
   against the defect folders, with k chosen by silhouette and with k given.
3. Time: evaluate (predict + all metrics) and the report.

Usage::

    python benchmarks/trust.py --data ../shared/data [--draws 5] [--out benchmarks/results/trust.jsonl]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--draws", type=int, default=5, help="random hold-out draws for split conformal")
    ap.add_argument("--detectors", default="patchcore,padim")
    ap.add_argument("--out", default="benchmarks/results/trust.jsonl")
    args = ap.parse_args()

    from anomalens import create_detector
    from anomalens.data import MVTecCategory
    from anomalens.discovery import agreement, discover_defect_types
    from anomalens.evaluation import evaluate
    from anomalens.report import render_report

    out_rows: list[dict] = []
    mvtec = Path(args.data) / "mvtec_ad"
    for name in args.detectors.split(","):
        # 1. false alarms on transistor (60 good test images)
        cat = MVTecCategory(mvtec / "transistor")
        det = create_detector(name)
        t0 = time.perf_counter()
        det.fit(cat)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = evaluate(det, cat)
        eval_s = time.perf_counter() - t0
        out_rows += far_rows(det, res.predictions, det.calibration.source, "transistor")
        defective = [p for p in res.predictions if p.gt_label == 1]
        t0 = time.perf_counter()
        clusters = discover_defect_types(det, defective)
        disc_s = time.perf_counter() - t0
        auto = agreement([defective[i].defect_type for i, _ in clusters.refs], clusters.labels)
        c4 = discover_defect_types(det, defective, k_range=(4, 4))
        given = agreement([defective[i].defect_type for i, _ in c4.refs], c4.labels)
        t0 = time.perf_counter()
        render_report(res, det, title="bench", clusters=clusters, cluster_preds=defective, agreement=auto)
        report_s = time.perf_counter() - t0
        out_rows.append({
            "category": "transistor", "detector": name, "kind": "defect_types", "n_regions": len(clusters.refs),
            "k_auto": clusters.n_clusters, "nmi_auto": auto["nmi"], "ari_auto": auto["ari"],
            "nmi_k4": given["nmi"], "ari_k4": given["ari"],
            "fit_s": round(fit_s, 1), "evaluate_s": round(eval_s, 1), "discovery_s": round(disc_s, 1), "report_s": round(report_s, 1),
        })
        # split conformal over random draws: fit on half the training images, calibrate on the other half
        draws = []
        for seed in range(args.draws):
            d = create_detector(name).fit(cat, holdout=0.5, seed=seed)
            r = evaluate(d, cat, per_defect=False)
            draws.append(far_rows(d, r.predictions, f"held-out 50% (seed {seed})", "transistor"))
        for j, alpha in enumerate(ALPHAS):
            rs = [dr[j] for dr in draws]
            out_rows.append({
                "category": "transistor", "detector": name, "calibration": f"held-out 50%, {args.draws} draws", "alpha": alpha,
                "n_calibration": rs[0]["n_calibration"], "n_good": rs[0]["n_good"],
                "false_alarms": [r["false_alarms"] for r in rs], "observed_far": float(np.mean([r["observed_far"] for r in rs])),
                "band": rs[0]["band"],
                # the guarantee is on average over the calibration draw: judge the mean rate
                "within_band": bool(rs[0]["band"][0] <= np.mean([r["observed_far"] for r in rs]) <= rs[0]["band"][1]),
                "draws_within": sum(bool(r["within_band"]) for r in rs),
                "detection_rate": float(np.mean([r["detection_rate"] for r in rs])),
            })
        # 2. defect types on hazelnut_reduced (8 defective images, 4 types)
        hz = MVTecCategory(mvtec / "hazelnut_reduced")
        dh = create_detector(name, false_alarm_rate=0.05).fit(hz)
        rh = evaluate(dh, hz, per_defect=False)
        dfh = [p for p in rh.predictions if p.gt_label == 1]
        ch = discover_defect_types(dh, dfh)
        ah = agreement([dfh[i].defect_type for i, _ in ch.refs], ch.labels)
        c4h = discover_defect_types(dh, dfh, k_range=(4, 4))
        gh = agreement([dfh[i].defect_type for i, _ in c4h.refs], c4h.labels)
        out_rows.append({
            "category": "hazelnut_reduced", "detector": name, "kind": "defect_types", "n_regions": len(ch.refs),
            "k_auto": ch.n_clusters, "nmi_auto": ah["nmi"], "ari_auto": ah["ari"], "nmi_k4": gh["nmi"], "ari_k4": gh["ari"],
        })

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for r in out_rows:
            f.write(json.dumps(r) + "\n")
    print("| detector | calibration | alpha | n cal | false alarms / good | observed % | 95% band % | within | detected % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in out_rows:
        if r.get("kind") == "defect_types" or "error" in r:
            continue
        fa = r["false_alarms"]
        fa_s = f"{fa}/{r['n_good']}" if isinstance(fa, int) else f"{'+'.join(map(str, fa))} / {len(fa)}x{r['n_good']}"
        within = "yes" if r["within_band"] else "no"
        if "draws_within" in r:
            within += f" ({r['draws_within']}/{len(fa)} draws)"
        print(f"| {r['detector']} | {r['calibration']} | {r['alpha']} | {r['n_calibration']} | {fa_s} | {100 * r['observed_far']:.1f} | "
              f"{100 * r['band'][0]:.1f}-{100 * r['band'][1]:.1f} | {within} | {100 * r['detection_rate']:.1f} |")
    print()
    print("| category | detector | regions | k (silhouette) | NMI | ARI | NMI at k=4 | ARI at k=4 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in out_rows:
        if r.get("kind") == "defect_types":
            print(f"| {r['category']} | {r['detector']} | {r['n_regions']} | {r['k_auto']} | {r['nmi_auto']:.3f} | {r['ari_auto']:.3f} | {r['nmi_k4']:.3f} | {r['ari_k4']:.3f} |")
    print()
    for r in out_rows:
        if "evaluate_s" in r:
            print(f"{r['detector']} on transistor: fit {r['fit_s']} s, evaluate {r['evaluate_s']} s, discovery {r['discovery_s']} s, report {r['report_s']} s")


if __name__ == "__main__":
    main()
