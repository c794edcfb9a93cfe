"""Checks of the options every detector takes (:class:`~anomalens.detectors.base.Detector`)."""

from __future__ import annotations

from typing import Sequence

from ..backbones import BackboneSpec
from ..errors import ConfigError


def check_image_size(size, multiple: int, what: str = "image_size") -> None:
    """Raise :class:`ConfigError` unless ``size`` is an int multiple of ``multiple`` in [56, 1024] pixels."""
    if isinstance(size, bool) or not isinstance(size, int) or size % multiple or not 56 <= size <= 1024:
        raise ConfigError(f"{what} must be a multiple of {multiple} in [56, 1024] pixels, got {size!r}")


def check_options(
    spec: BackboneSpec,
    detector,
    *,
    image_size: int | Sequence[int] | None,
    patch_size: int,
    border_pad: int,
    blur_sigma: float,
    false_alarm_rate: float | None,
    batch_size: int,
) -> tuple[int, ...]:
    """Validate a detector's options; return its image sizes (short sides in pixels, ascending).

    ``image_size`` None gives the backbone's default size (the ViT's 448) or ``detector.default_image_sizes``.

    Raises:
        ConfigError: a size that is not a multiple of the backbone's ``size_multiple`` (16 for the
            CNNs, 14 for the ViT) in [56, 1024], more sizes than ``detector.max_scales``, a border on
            the ViT, or another invalid value.
    """
    if image_size is None:
        sizes: tuple = (spec.default_size,) if spec.default_size else tuple(detector.default_image_sizes)
    elif isinstance(image_size, (list, tuple)):
        sizes = tuple(image_size)
    else:
        sizes = (image_size,)
    if spec.size_multiple != 16 and border_pad:
        raise ConfigError(f"backbone {spec.name} takes no border padding (border_pad=0), got {border_pad}")
    if not sizes or len(sizes) > detector.max_scales or len(set(sizes)) != len(sizes):
        raise ConfigError(f"{type(detector).__name__} takes 1 to {detector.max_scales} different image sizes, got {image_size!r}")
    for size in sizes:
        check_image_size(size, spec.size_multiple, f"image_size for {spec.name}")
    if patch_size < 1 or patch_size % 2 == 0:
        raise ConfigError(f"patch_size must be an odd number >= 1, got {patch_size}")
    if false_alarm_rate is not None and not 0.0 < false_alarm_rate < 1.0:
        raise ConfigError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if border_pad < 0 or border_pad % 16 or border_pad >= min(sizes):
        raise ConfigError(f"border_pad must be a multiple of 16 in [0, image_size) pixels, got {border_pad}")
    if blur_sigma < 0:
        raise ConfigError(f"blur_sigma must be >= 0 pixels, got {blur_sigma}")
    return tuple(sorted(int(x) for x in sizes))
