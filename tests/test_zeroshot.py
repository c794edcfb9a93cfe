"""Zero-shot MuSc on real images: no normal image, the batch is scored against itself."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from anomalens.cli import app
from anomalens.errors import ConfigError


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
    # comparing each image with 4 others drawn at random (large batches) still ranks the defects
    sampled = MuSc(chunk=3, max_references=4).predict(paths)
    assert image_auroc(labels, [p.pred_score for p in sampled]) >= 0.9
    # the ViT alone (no CNN mutual score) ranks them too
    vit = MuSc(chunk=16, cnn_backbone=None).predict(paths)
    assert image_auroc(labels, [p.pred_score for p in vit]) >= 0.9
    # the default votes: the ViT and two CNNs, each part ranks the defects, and the score is their z-sum
    from anomalens.io import read_image
    from anomalens.zeroshot import z_sum

    model = MuSc(chunk=16)
    assert model.cnn_backbones == ("efficientnet_lite0", "mobilenet_v2")
    parts = model.mutual_parts([read_image(p) for p in paths])
    assert len(parts) == 3 and parts[0][1].shape == parts[1][1].shape == (10, 224, 224)
    assert parts[2][1] is None  # MobileNetV2 votes on the image score only: the map is the ViT's and Lite0's
    for scores, _ in parts[1:]:
        assert image_auroc(labels, scores.numpy()) >= 0.9
    np.testing.assert_allclose(z_sum(parts)[0].numpy(), [p.pred_score for p in preds], rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError):  # retired options
        MuSc(cnn_maps=2)
    with pytest.raises(TypeError):
        MuSc(reference_backbone="efficientnet_lite0")


def test_closest_patch_in_blocks_matches_brute_force():
    """The blockwise closest-patch search (bounded memory) gives the brute-force distances."""
    import torch
    import torch.nn.functional as F

    from anomalens.zeroshot import closest_patch_distances

    g = torch.Generator().manual_seed(0)
    tok = F.normalize(torch.randn(7, 20, 16, generator=g), dim=2)
    q = tok[2]
    others = torch.tensor([0, 3, 4, 6])
    brute = torch.cdist(q, tok[others].reshape(-1, 16)).view(20, 4, 20).amin(2)
    for budget in (1, 50, 400, 1 << 26):  # one image per block .. all in one block
        torch.testing.assert_close(closest_patch_distances(q, tok, others, budget), brute, atol=1e-5, rtol=1e-5)


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
    r = CliRunner().invoke(app, ["zero-shot", str(hazelnut / "test"), "--cnn", "resnet_nope", "--out", str(tmp_path / "z3")])
    assert r.exit_code == 2 and "resnet_nope" in r.output, r.output
    r = CliRunner().invoke(app, ["zero-shot", str(hazelnut / "test"), "--cnn", "mobilenet_v2,mobilenet_v2", "--out", str(tmp_path / "z4")])
    assert r.exit_code == 2 and "twice" in r.output, r.output
    r = CliRunner().invoke(
        app, ["zero-shot", str(hazelnut / "test"), "--cnn", "efficientnet_lite0", "--cnn-augment", "none", "--no-heatmaps", "--out", str(tmp_path / "z5")]
    )
    assert r.exit_code == 0, r.output  # one CNN, without the turns
    r = CliRunner().invoke(app, ["zero-shot", str(hazelnut / "test"), "--cnn-augment", "sideways", "--out", str(tmp_path / "z6")])
    assert r.exit_code == 2 and "sideways" in r.output, r.output


def test_few_shot_references_with_the_batch(hazelnut, tmp_path):
    """k good images as references: scored against them and against the batch; a bad reference is an error."""
    from anomalens.data import MVTecCategory
    from anomalens.evaluation import compute_metrics
    from anomalens.zeroshot import MuSc

    cat = MVTecCategory(hazelnut)
    refs = cat.train_paths()[:4]
    model = MuSc(chunk=16)
    preds = model.predict(cat.test_samples(), references=refs)
    m = compute_metrics(preds)
    assert m["image_auroc"] >= 0.9 and m["pixel_auroc"] >= 0.9, m
    # the reference part really scores: each test image against the bank of the 4 good images
    from anomalens.io import read_image

    ref_scores, ref_maps = model.reference_scores([read_image(s.path) for s in cat.test_samples()], refs)
    labels = np.array([s.gt_label for s in cat.test_samples()])
    assert ref_scores[labels == 1].max() > ref_scores[labels == 0].max() and ref_maps.shape == (10, 224, 224)

    bad = tmp_path / "bad_ref.png"
    bad.write_bytes(b"not a png")
    r = CliRunner().invoke(app, ["zero-shot", str(hazelnut / "test"), "--reference", str(bad), "--out", str(tmp_path / "zr")])
    assert r.exit_code == 2 and "bad_ref.png" in r.output, r.output
    r = CliRunner().invoke(app, ["zero-shot", str(hazelnut / "test"), "-r", str(refs[0]), "-r", str(refs[1]), "--out", str(tmp_path / "zr")])
    assert r.exit_code == 0 and "against 2 good image(s)" in r.output, r.output
    assert len(list(csv.DictReader(open(tmp_path / "zr" / "predictions.csv")))) == 10


def test_cnn_turns_let_a_part_at_another_angle_match(transistor):
    """``cnn_augment="rotations"`` (the default): a good transistor turned 180 degrees finds its patches
    in the other images' turns. Without them its CNN mutual score stands out of the batch of good
    parts, as a misplaced part's does; with them it falls back among them. More views never raise a
    patch's distance."""
    from anomalens.io import read_image
    from anomalens.zeroshot import MuSc, robust_z

    good = sorted((transistor / "test" / "good").glob("*.png"))[:12]
    arrays = [read_image(p) for p in good]
    arrays[-1] = np.ascontiguousarray(np.rot90(arrays[-1], 2))  # the same good part, upside down
    model = MuSc(cnn_backbone="efficientnet_lite0")
    assert model.cnn_views == ("rot90", "rot180", "rot270")
    feats = [model.cnn_features(arrays, "efficientnet_lite0")]
    views = [[model.cnn_features(arrays, "efficientnet_lite0", v)] for v in model.cnn_views]
    plain = model.mutual_scores(feats, degrees=(1,))
    turned = model.mutual_scores(feats, degrees=(1,), views=views)
    assert bool((turned <= plain + 1e-6).all())
    z_plain, z_turned = robust_z(plain.flatten(1).amax(1)), robust_z(turned.flatten(1).amax(1))
    assert z_plain[-1] > 2.5 and z_plain.argmax() == len(arrays) - 1, z_plain
    assert z_turned[-1] < 3 and z_turned[-1] < z_plain[-1] / 2, z_turned
    with pytest.raises(ConfigError, match="augment"):
        MuSc(cnn_augment="sideways")
