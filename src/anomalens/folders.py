"""Labelled test images from the folder layouts people have, masks optional.

Three layouts give the same list of :class:`~anomalens.data.Sample`:

(a) An MVTec AD category::

        ROOT/test/good/*.png                      normal
        ROOT/test/<defect>/*.png                  defective, defect type <defect>
        ROOT/ground_truth/<defect>/<stem>_mask.png    its mask (or <stem>.png), optional

(b) A folder of good parts and folders of rejects (what a quality engineer keeps)::

        ROOT/good/*.png                           normal (``ok`` or ``normal`` also accepted)
        ROOT/<any other folder>/*.png             defective, defect type = the folder's name
        ROOT/ground_truth/<folder>/<stem>[_mask].png  its mask, optional (also ``ROOT/masks/<folder>/``;
                                                  for ROOT = an MVTec ``test`` folder, its sibling ``ground_truth``)

(c) anomalib's ``Folder`` layout: ``normal_dir`` (normal images), ``abnormal_dir`` (one or several
    folders of defective images) and ``mask_dir`` (masks, matched to defective images by file stem,
    ``<stem>.png`` or ``<stem>_mask.png``, searched recursively; where a stem repeats in several
    sub-folders, the one named like the image's folder); relative folders are taken from ROOT.

Masks are optional everywhere: a defective image without one has ``mask_path`` None, and the
evaluation then leaves out the pixel metrics and says why (:func:`anomalens.evaluation.evaluate`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .data import Sample, list_images
from .errors import ConfigError, DatasetError
from .io import is_image_file

#: folder names taken as the normal images in layout (b), case-insensitive
NORMAL_NAMES = ("good", "ok", "normal")
#: folder names of layout (b) that hold masks, not defective images
MASK_FOLDERS = ("ground_truth", "masks")

PathArg = str | os.PathLike


def layout_of(data: PathArg | None = None, *, normal_dir: PathArg | None = None, abnormal_dir=None) -> str:
    """Which layout ``data`` is in: ``"folder"`` (anomalib's, when ``normal_dir`` or ``abnormal_dir`` is
    given), ``"mvtec"`` (``ROOT/test/`` holds folders) or ``"good+defective"`` (``ROOT/good/``).

    Raises:
        DatasetError: none of the three (the message shows them).
    """
    if normal_dir is not None or abnormal_dir is not None:
        return "folder"
    if data is None:
        raise DatasetError("no test data given: pass a folder, or --normal-dir / --abnormal-dir")
    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"test data {root} does not exist or is not a folder")
    test = root / "test"
    if test.is_dir() and any(p.is_dir() for p in test.iterdir()):
        return "mvtec"
    if _normal_folder(root) is not None:
        return "good+defective"
    plain = any(p.is_file() and is_image_file(p) for p in root.iterdir())
    raise DatasetError(
        f"{root} is not a labelled test set: expected (a) an MVTec AD category (test/good/, test/<defect>/, masks "
        f"optional in ground_truth/), (b) good/ beside one or more folders of defective images (ng/, ...), or "
        f"(c) --normal-dir and --abnormal-dir (anomalib's Folder layout)"
        + ("; it holds images without labels: score them with `anomalens predict`" if plain else "")
    )


def labelled_samples(
    data: PathArg | None = None,
    *,
    normal_dir: PathArg | None = None,
    abnormal_dir: PathArg | Sequence[PathArg] | None = None,
    mask_dir: PathArg | None = None,
) -> list[Sample]:
    """Labelled test images of any of the three layouts (module docstring), masks optional.

    Args:
        data: the root folder: an MVTec AD category, a folder with ``good/`` and defect folders, or
            the folder relative ``normal_dir`` / ``abnormal_dir`` / ``mask_dir`` are taken from (may
            be None when they are absolute or relative to the working directory).
        normal_dir, abnormal_dir, mask_dir: anomalib's ``Folder`` layout (``abnormal_dir``: one
            folder or a list of them); either of the first two selects this layout.

    Returns:
        Samples sorted good first, then by defect type and file name: ``gt_label`` 0 (``defect_type``
        ``"good"``, ``mask_path`` None: an all-normal mask) or 1 (``mask_path`` the mask file, or None
        when the image has none).

    Raises:
        DatasetError: a folder is missing or holds no image, or ``data`` is in no known layout.
        ConfigError: ``mask_dir`` without ``abnormal_dir``.
    """
    layout = layout_of(data, normal_dir=normal_dir, abnormal_dir=abnormal_dir)
    if layout == "folder":
        return _folder_samples(data, normal_dir, abnormal_dir, mask_dir)
    if mask_dir is not None:
        raise ConfigError("a mask folder (--mask-dir) goes with --normal-dir / --abnormal-dir (anomalib's Folder layout)")
    root = Path(data)  # type: ignore[arg-type]
    if layout == "mvtec":
        test = root / "test"
        normal = _normal_folder(test)
        defect_dirs = [p for p in _subfolders(test) if p != normal]
        mask_roots = [root / "ground_truth"]
    else:
        normal = _normal_folder(root)
        defect_dirs = [p for p in _subfolders(root) if p != normal and p.name not in MASK_FOLDERS]
        mask_roots = [root / m for m in MASK_FOLDERS] + ([root.parent / "ground_truth"] if root.name == "test" else [])
    samples = [Sample(p, 0, "good") for p in list_images(normal)] if normal is not None else []
    for d in defect_dirs:
        folders = [m / d.name for m in mask_roots if (m / d.name).is_dir()]
        for img in list_images(d):
            samples.append(Sample(img, 1, d.name, _find_mask(img.stem, folders)))
    if not samples:
        raise DatasetError(f"{root} holds no test image")
    return samples


def _subfolders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _normal_folder(root: Path) -> Path | None:
    """The one sub-folder of ``root`` named like :data:`NORMAL_NAMES`, or None.

    Raises:
        DatasetError: more than one (``good`` and ``ok``, say).
    """
    found = [p for p in _subfolders(root) if p.name.lower() in NORMAL_NAMES]
    if len(found) > 1:
        raise DatasetError(f"{root} has several folders of normal images ({', '.join(p.name for p in found)}): keep one")
    return found[0] if found else None


def _find_mask(stem: str, folders: Sequence[Path]) -> Path | None:
    """``<stem>_mask.png`` or ``<stem>.png`` (any image extension) in the first of ``folders`` that has it."""
    for f in folders:
        for name in (f"{stem}_mask", stem):
            for p in sorted(f.glob(f"{name}.*")):
                if p.is_file() and is_image_file(p):
                    return p
    return None


def _resolve(root: PathArg | None, path: PathArg) -> Path:
    p = Path(path)
    return p if p.is_absolute() or root is None else Path(root) / p


def _folder_samples(root, normal_dir, abnormal_dir, mask_dir) -> list[Sample]:
    """anomalib's ``Folder`` layout (see :func:`labelled_samples`)."""
    if mask_dir is not None and abnormal_dir is None:
        raise ConfigError("--mask-dir needs --abnormal-dir: masks belong to defective images")
    samples: list[Sample] = []
    if normal_dir is not None:
        samples += [Sample(p, 0, "good") for p in list_images(_resolve(root, normal_dir))]
    masks: dict[str, list[Path]] = {}
    if mask_dir is not None:
        for p in list_images(_resolve(root, mask_dir), recursive=True):
            stems = {p.stem, p.stem[: -len("_mask")]} if p.stem.endswith("_mask") else {p.stem}
            for s in stems:
                masks.setdefault(s, []).append(p)
    dirs = [] if abnormal_dir is None else [abnormal_dir] if isinstance(abnormal_dir, (str, os.PathLike)) else list(abnormal_dir)
    for d in dirs:
        d = _resolve(root, d)
        for img in list_images(d):
            found = masks.get(img.stem, [])
            exact = [m for m in found if m.stem in (img.stem, f"{img.stem}_mask")]
            if len(exact) > 1:  # the same stem in several sub-folders: the one named like the image's folder
                exact = [m for m in exact if m.parent.name == d.name] or exact
            if len(exact) > 1:
                raise DatasetError(
                    f"defective image {img} matches several masks by its stem ({', '.join(map(str, exact))}): keep one"
                )
            samples.append(Sample(img, 1, d.name, exact[0] if exact else None))
    return samples
