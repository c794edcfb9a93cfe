"""Datasets: the MVTec AD folder layout, plain folders of images, and lists of files.

MVTec AD layout (Bergmann et al., CVPR 2019)::

    CATEGORY/train/good/*.png
    CATEGORY/test/good/*.png
    CATEGORY/test/<defect>/*.png
    CATEGORY/ground_truth/<defect>/<stem>_mask.png

VisA converted to this layout works the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import DatasetError
from .io import is_image_file


@dataclass(frozen=True)
class Sample:
    """One test image with its ground truth.

    Attributes:
        path: the image file.
        gt_label: 0 for a normal ("good") image, 1 for a defective one.
        defect_type: the defect folder name (``"good"`` for normal images).
        mask_path: the ground-truth mask file, or None for normal images (all-zero mask).
    """

    path: Path
    gt_label: int
    defect_type: str
    mask_path: Path | None = None


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Sorted image files in ``folder`` (by extension, see :data:`anomalens.io.IMAGE_EXTENSIONS`).

    Raises:
        DatasetError: the folder does not exist, is not a folder, or holds no image file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DatasetError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in it if p.is_file() and is_image_file(p) and not p.name.startswith("."))
    if not files:
        raise no_images_error(folder)
    return files


def no_images_error(folder: str | os.PathLike) -> DatasetError:
    """The error for a folder (or folders, comma-separated) that holds no image file."""
    return DatasetError(
        f"folder {folder} contains no image files (looked for {', '.join(sorted({'.png', '.jpg', '.bmp', '.tif', '.webp'}))})"
    )


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Every input to score, in order: files as given, folders searched recursively.

    Nothing is dropped silently: a missing file, a dangling link, a link loop, an unreadable file or a
    folder named like an image is kept, so that scoring gives it a row with its error. In folders, an
    entry is kept when its name has an image extension (hidden entries are skipped); links to folders
    are not followed (no loops). A folder that cannot be listed is kept as one input (its row says why).
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        try:
            is_dir = p.is_dir() and not p.is_symlink()
        except OSError:
            is_dir = False
        if not is_dir:
            out.append(p)
            continue
        found: list[Path] = []
        failed: list[Path] = []
        for root, dirs, files in os.walk(p, onerror=lambda e: failed.append(Path(e.filename))):
            dirs[:] = sorted(x for x in dirs if not x.startswith("."))
            names = files + [x for x in dirs if is_image_file(x)]  # a folder named x.png gets a row
            found.extend(Path(root) / x for x in names if is_image_file(x) and not x.startswith("."))
        out.extend(sorted(found) + failed)
    return out


def is_mvtec_category(root: str | os.PathLike) -> bool:
    """True when ``root`` looks like an MVTec AD category (has ``train/good``)."""
    return (Path(root) / "train" / "good").is_dir()


@dataclass
class MVTecCategory:
    """One category in the MVTec AD layout.

    Args:
        root: the category folder (holding ``train``, ``test``, ``ground_truth``).

    Raises:
        DatasetError: ``train/good`` is missing or empty, or a defective test image has no mask.
    """

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not is_mvtec_category(self.root):
            raise DatasetError(
                f"{self.root} is not an MVTec AD category folder: expected {self.root / 'train' / 'good'}"
            )

    @property
    def name(self) -> str:
        return self.root.name

    def train_paths(self) -> list[Path]:
        """The normal training images, ``train/good/*``, sorted."""
        return list_images(self.root / "train" / "good")

    def test_samples(self) -> list[Sample]:
        """Every test image with label, defect type and mask path; sorted by defect type then name.

        Raises:
            DatasetError: no ``test`` folder, or a defective image without its ``*_mask.png``.
        """
        test_root = self.root / "test"
        if not test_root.is_dir():
            raise DatasetError(f"{self.root} has no test folder ({test_root})")
        samples: list[Sample] = []
        for defect_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for img in list_images(defect_dir):
                if defect == "good":
                    samples.append(Sample(img, 0, defect, None))
                    continue
                mask = self.root / "ground_truth" / defect / f"{img.stem}_mask.png"
                if not mask.exists():
                    alt = self.root / "ground_truth" / defect / f"{img.stem}.png"
                    if not alt.exists():
                        raise DatasetError(f"defective test image {img} has no mask (expected {mask})")
                    mask = alt
                samples.append(Sample(img, 1, defect, mask))
        if not samples:
            raise DatasetError(f"{test_root} contains no test images")
        return samples


def training_paths(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Normal training images from an MVTec category (``train/good``), a folder, or a list of files/folders.

    Raises:
        DatasetError: nothing found.
    """
    if isinstance(data, (str, os.PathLike)):
        if is_mvtec_category(data):
            return MVTecCategory(Path(data)).train_paths()
        data = [data]
    paths = expand_inputs(data)
    if not paths:
        folders = [str(d) for d in data if os.path.isdir(d)]
        if folders:
            raise no_images_error(", ".join(folders))
        raise DatasetError("no training images given")
    return paths


def normal_images(images) -> list:
    """Normal images as a list: an :class:`MVTecCategory` or its path gives its ``train/good``, a
    folder its images; a list of paths, PIL images or arrays is kept as it is.

    Raises:
        DatasetError: a folder that does not exist or holds no image.
    """
    if isinstance(images, MVTecCategory):
        return images.train_paths()
    if isinstance(images, (str, os.PathLike)):
        return training_paths(images)
    return list(images)
