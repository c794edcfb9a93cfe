"""Zero-shot MuSc on real images: no normal image, the batch is scored against itself."""

from __future__ import annotations

import csv

import numpy as np
from typer.testing import CliRunner

from anomalens.cli import app


def test_zero_shot_ranks_defects_and_localises(hazelnut):
    from anomalens.data import MVTecCategory
    from anomalens.metrics import image_auroc, pixel_auroc
    from anomalens.zeroshot import MuSc

    samples = MVTecCategory(hazelnut).test_samples()
    paths = [s.path for s in samples]
    preds = MuSc(chunk=16).predict(paths)
    labels = [s.gt_label for s in samples]
    assert image_auroc(labels, [p.pred_score for p in preds]) >= 0.9
    from anomalens.io import read_mask

    masks = [read_mask(s.mask_path, (256, 256)) if s.mask_path else np.zeros((256, 256), bool) for s in samples]
    assert pixel_auroc(masks, [p.anomaly_map for p in preds]) >= 0.9
    # bounded memory: a chunk of 3 query images gives the same scores as one block of all 10
    small = MuSc(chunk=3).predict(paths)
    np.testing.assert_allclose([p.pred_score for p in small], [p.pred_score for p in preds], rtol=1e-5)


def test_zero_shot_cli(hazelnut, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n cut")
    r = CliRunner().invoke(app, ["zero-shot", str(hazelnut / "test"), str(bad), "--out", str(tmp_path / "zs")])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "zs" / "predictions.csv")))
    assert len(rows) == 11 and sum(1 for x in rows if x["error"]) == 1
    assert len(list((tmp_path / "zs" / "overlays").glob("*.png"))) == 10
    r = CliRunner().invoke(app, ["zero-shot", str(hazelnut / "test" / "good"), "--out", str(tmp_path / "z2")])
    assert r.exit_code == 2 and "at least 3 readable images" in r.output
