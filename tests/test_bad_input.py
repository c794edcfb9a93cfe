"""Bad input gets a clear error naming the file, and loses nothing else."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from anomalens.data import MVTecCategory, list_images
from anomalens.errors import DatasetError, ImageReadError
from anomalens.io import read_image


@pytest.fixture
def a_real_image(hazelnut):
    return sorted((hazelnut / "test" / "crack").glob("*.png"))[0]


def test_corrupt_and_truncated_files_name_the_file(tmp_path, a_real_image):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a png at all")
    with pytest.raises(ImageReadError, match="junk.png"):
        read_image(junk)
    data = a_real_image.read_bytes()
    trunc = tmp_path / "truncated.png"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated.png.*(corrupt|truncated)"):
        read_image(trunc)
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "missing.png")


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="contains no image files"):
        list_images(tmp_path)


def test_modes_and_exif_rotation(tmp_path, a_real_image, fitted_patchcore):
    """Grayscale, RGBA, palette, 16-bit and EXIF-rotated inputs are all scored, maps at their own size."""
    det, _ = fitted_patchcore
    rgb = Image.open(a_real_image).convert("RGB").resize((200, 150))
    paths = {}
    rgb.convert("L").save(paths.setdefault("gray", tmp_path / "gray.png"))
    rgb.convert("RGBA").save(paths.setdefault("rgba", tmp_path / "rgba.png"))
    rgb.convert("P").save(paths.setdefault("palette", tmp_path / "palette.png"))
    g16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(g16).save(paths.setdefault("gray16", tmp_path / "gray16.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    rgb.save(paths.setdefault("exif", tmp_path / "exif.jpg"), exif=exif.tobytes())

    assert read_image(paths["exif"]).shape == (200, 150, 3)  # transposed per EXIF
    assert read_image(paths["gray16"]).dtype == np.uint8
    np.testing.assert_allclose(read_image(paths["gray16"])[..., 0].astype(int), np.asarray(rgb.convert("L")).astype(int), atol=1)
    preds = det.predict(list(paths.values()))
    for name, p in zip(paths, preds):
        assert p.ok, (name, p.error)
        assert np.isfinite(p.pred_score)
        expected = (150, 200) if name != "exif" else (200, 150)
        assert p.anomaly_map.shape == expected and p.anomaly_map.dtype == np.float32
        assert p.pred_mask.shape == expected and p.pred_mask.dtype == bool
    # the grayscale version of a defective image still scores above every good test image
    good = det.predict(sorted((a_real_image.parents[1] / "good").glob("*.png")))
    assert preds[0].pred_score > max(p.pred_score for p in good)


def test_one_bad_file_does_not_lose_the_batch(tmp_path, hazelnut, fitted_patchcore):
    det, _ = fitted_patchcore
    good = sorted((hazelnut / "test" / "good").glob("*.png"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    batch = [good[0], bad, good[1]]
    preds = det.predict(batch)
    assert [p.ok for p in preds] == [True, False, True]
    assert "broken.png" in preds[1].error and np.isnan(preds[1].pred_score) and preds[1].pred_label is None
    ref = det.predict([good[0], good[1]])
    assert [preds[0].pred_score, preds[2].pred_score] == [ref[0].pred_score, ref[1].pred_score]


def test_mask_that_does_not_match_its_image(tmp_path, hazelnut, fitted_patchcore):
    """A wrong-size ground-truth mask is reported for that image; the rest is evaluated."""
    det, _ = fitted_patchcore
    root = tmp_path / "cat"
    shutil.copytree(hazelnut, root)
    mask = sorted((root / "ground_truth" / "crack").glob("*_mask.png"))[0]
    Image.open(mask).resize((100, 100)).save(mask)
    samples = MVTecCategory(root).test_samples()
    preds = det.predict(samples)
    errors = [p for p in preds if not p.ok]
    assert len(errors) == 1 and mask.name in errors[0].error and "100x100" in errors[0].error
    assert sum(p.ok for p in preds) == len(samples) - 1


def test_missing_mask_and_wrong_layout(tmp_path, hazelnut):
    root = tmp_path / "cat"
    shutil.copytree(hazelnut, root)
    victim = sorted((root / "ground_truth" / "hole").glob("*_mask.png"))[0]
    victim.unlink()
    with pytest.raises(DatasetError, match="has no mask"):
        MVTecCategory(root).test_samples()
    with pytest.raises(DatasetError, match="not an MVTec AD category"):
        MVTecCategory(tmp_path)


def test_unreadable_training_image_stops_fit_and_names_it(tmp_path, hazelnut):
    from anomalens import PatchCore

    bad = tmp_path / "000_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = sorted((hazelnut / "train" / "good").glob("*.png"))[:3]
    with pytest.raises(ImageReadError, match="000_broken.png"):
        PatchCore(pretrained=False, false_alarm_rate=0.3).fit([bad, *good])
