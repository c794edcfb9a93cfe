"""The fast core against plain references: coreset, nearest neighbours, calibration, backbones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalens.backbones import BACKBONES, Backbone
from anomalens.calibration import Calibration, conformal_threshold
from anomalens.errors import CalibrationError, ConfigError
from anomalens.knn import NearestNeighbours
from anomalens.sampler import greedy_coreset


def plain_greedy(x, n, first):
    chosen = [first]
    d = ((x - x[first]) ** 2).sum(1)
    for _ in range(n - 1):
        i = int(d.argmax())
        chosen.append(i)
        d = torch.minimum(d, ((x - x[i]) ** 2).sum(1))
    return chosen


def coverage(x, idx):
    return float(torch.cdist(x, x[idx]).min(1).values.max())


def test_greedy_coreset_is_exact_greedy_k_center():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 16, generator=g) * torch.rand(3000, 1, generator=g)
    idx = greedy_coreset(x, 60, projection_dim=0, two_stage=False)
    assert idx.tolist() == plain_greedy(x, 60, int(idx[0]))


def test_two_stage_coreset_covers_nearly_as_well():
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(50, 32, generator=g) * 5
    x = centers[torch.randint(50, (60000,), generator=g)] + torch.randn(60000, 32, generator=g)
    x[:40] += 40 * torch.randn(40, 32, generator=g)  # rare outlying patches: what the coreset must keep
    one = greedy_coreset(x, 300, projection_dim=0, two_stage=False)
    two = greedy_coreset(x, 300, projection_dim=0, two_stage=True)
    assert len(set(two.tolist())) == 300
    assert coverage(x, two) <= 1.15 * coverage(x, one)
    assert coverage(x, two) < 0.8 * coverage(x, torch.randperm(60000, generator=g)[:300])


def test_torch_and_faiss_nearest_neighbours_agree():
    g = torch.Generator().manual_seed(3)
    bank, q = torch.randn(5000, 64, generator=g), torch.randn(700, 64, generator=g)
    d_t, i_t = NearestNeighbours(bank, "torch", max_chunk_elems=100_000).search(q, 3)
    d_f, i_f = NearestNeighbours(bank, "faiss").search(q, 3)
    ref = torch.cdist(q, bank).topk(3, largest=False)
    torch.testing.assert_close(d_t, ref.values, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(d_f, ref.values, atol=1e-3, rtol=1e-4)
    assert (i_t == ref.indices).float().mean() > 0.999 and (i_f == ref.indices).float().mean() > 0.999


def test_conformal_threshold_and_p_values():
    scores = np.arange(1, 200, dtype=float)  # n = 199
    assert conformal_threshold(scores, 0.01) == 198.0  # rank ceil(200 * 0.99) = 198
    assert conformal_threshold(scores[:99], 0.01) == 99.0  # 99 images: the largest one
    with pytest.raises(CalibrationError, match="needs at least 99 normal calibration images, got 50"):
        conformal_threshold(scores[:50], 0.01)
    with pytest.raises(CalibrationError, match="needs at least 19 .* got 0"):
        conformal_threshold(scores[:0], 0.05)
    cal = Calibration.from_scores(scores, scores, 0.05)
    assert cal.p_value(1000.0) == pytest.approx(1 / 200)
    assert cal.p_value(0.0) == 1.0
    # empirical guarantee on exchangeable data: false alarms at most about alpha
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(300):
        s = rng.standard_normal(300)
        t = conformal_threshold(s[:200], 0.05)
        rates.append(np.mean(s[200:] > t))
    assert np.mean(rates) <= 0.05 + 0.01
    with pytest.raises(ConfigError, match="in \\(0, 1\\)"):
        conformal_threshold(scores, 1.5)


@pytest.mark.parametrize("name", sorted(n for n, spec in BACKBONES.items() if spec.build is not None))
def test_backbones_give_the_documented_feature_maps(name):
    """The CNNs (the ViT is covered in test_vit.py: its weights cannot be randomised)."""
    b = Backbone(name, pretrained=False)
    feats = b(torch.rand(1, 3, 160, 160))
    assert [f.shape[1] for f in feats] == b.channels
    assert [160 // f.shape[-1] for f in feats] == b.strides == [8, 16]


def test_unknown_backbone_and_layer_are_clear_errors():
    with pytest.raises(ConfigError, match="known backbones: efficientnet_lite0, efficientnet_lite2, mobilenet_v2"):
        Backbone("wide_resnet50")
    with pytest.raises(ConfigError, match="valid layers: stem, blocks.0"):
        Backbone("efficientnet_lite0", ["layer2"], pretrained=False)


def test_patchcore_scoring_module_against_a_plain_reference(fitted_patchcore, hazelnut):
    """The scoring module that Python prediction runs and the ONNX export traces, against the method
    written out plainly in float64 on real features: each patch's distance to its nearest bank
    feature (cdist), per scale the largest of them (the image score), standardised by the scale's
    leave-one-out statistics and averaged over scales; the grids standardised, bilinearly resized
    to the largest scale's grid and averaged."""
    import torch.nn.functional as F

    from anomalens.common import to_model_input
    from anomalens.io import read_image

    det, _ = fitted_patchcore
    assert len(det.image_sizes) == 2
    img = read_image(sorted((hazelnut / "test" / "crack").glob("*.png"))[0])
    with torch.inference_mode():
        feats = det.model.features([to_model_input([img], hw) for hw in det.input_shapes(img.shape[:2])])
        score, grid, patch_features = det.model.scorer(feats)
    h, w = feats[-1].shape[-2:]
    ref_scores, ref_grids = [], []
    for k, f in enumerate(feats):
        q = f[0].flatten(1).T.double()
        dist, idx = torch.cdist(q, det.banks[k].bank.double()).min(1)
        mu, sd = (float(v) for v in det.scale_stats[k])
        ref_scores.append((dist.max() - mu) / sd)
        g = ((dist - mu) / sd).view(1, 1, *f.shape[-2:]).float()
        ref_grids.append(F.interpolate(g, size=(h, w), mode="bilinear", align_corners=False)[0, 0])
    assert float(score[0]) == pytest.approx(float(sum(ref_scores) / 2), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(grid[0], sum(ref_grids) / 2, rtol=1e-4, atol=1e-4)
    _, rows = det.model.scorer.nearest(len(feats) - 1, patch_features[0].reshape(-1, patch_features.shape[-1]))
    assert (rows == idx).float().mean() > 0.999  # the largest scale's nearest rows (evidence)
    assert float(score[0]) > det.threshold  # a crack: not a comparison of two all-normal outputs


def test_model_input_is_bilinear_antialiased_when_shrinking(hazelnut, transistor):
    """The model input (the same arrays on torch and the torch-free runtime) against torch's float
    bilinear resize of the decoded image: equal to float rounding when enlarging a hazelnut image
    256 -> 320, within one grey level (the ``uint8`` rounding) when shrinking a transistor image
    512 -> 256 x 320 with antialiasing, where plain bilinear sampling would be several levels off."""
    import torch.nn.functional as F

    from anomalens.io import read_image
    from anomalens.resampling import model_inputs

    for img, hw, tol in [
        (read_image(sorted((hazelnut / "test" / "crack").glob("*.png"))[0]), (320, 320), 1e-5),
        (read_image(sorted((transistor / "test" / "bent_lead").glob("*.png"))[0]), (256, 320), 1.01 / 255),
    ]:
        (x,) = model_inputs([img, img[::-1]], [hw])
        assert x.dtype == np.float32 and x.shape == (2, 3, *hw) and x.flags.c_contiguous
        t = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255.0
        ref = F.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=True)[0].numpy()
        assert np.abs(x[0] - ref).max() <= tol
        flipped = F.interpolate(t.flip(2), size=hw, mode="bilinear", align_corners=False, antialias=True)[0].numpy()
        assert np.abs(x[1] - flipped).max() <= tol  # each image of a batch its own
        if img.shape[0] > hw[0]:
            aliased = F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0].numpy()
            assert np.abs(aliased - ref).max() > 5 / 255
