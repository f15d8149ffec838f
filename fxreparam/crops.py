"""Crops and zero pads composed exactly (REPARAM §10), for every pass that reads a conv through a crop.

A conv with padding ``p`` on ``x`` cropped by ``c`` pixels on a side reads, at that border,
``p`` padded values where ``x`` itself would give ``c`` values: the pair is a plain padding (``p``, when
``c == 0``) or a plain crop (``-c``, when ``p == 0``) of the uncropped ``x`` only where one of
the two is zero. Elsewhere no padding of ``x`` gives the same function, and the fold is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from . import ops

__all__ = ["CropRead", "crop_then_pad", "read_through_crop"]


@dataclass(frozen=True)
class CropRead:
    """A conv input read through a symmetric crop: the uncropped ``source`` and the padding that composes the crop
    with the conv's own (``None`` with ``why_not`` when no padding of ``source`` does)."""

    source: fx.Node
    crops: tuple[int, ...]
    padding: tuple[int, ...] | None
    why_not: str | None


def crop_then_pad(crops: tuple[int, ...], padding: tuple[int, ...]) -> tuple[int, ...] | None:
    """Per dim, the padding of the uncropped input (negative: a crop) equal to cropping by ``crops`` then padding by
    ``padding``; ``None`` where a dim is both cropped and padded (the pad puts zeros where the input has values)."""
    if any(c > 0 and p > 0 for c, p in zip(crops, padding)):
        return None
    return tuple(p - c for c, p in zip(crops, padding))


def read_through_crop(node: fx.Node, padding: tuple[int, ...]) -> CropRead | None:
    """``node`` (a conv's input, padded by ``padding``) as a symmetric crop of an earlier tensor
    (``ops.symmetric_crop``), if it is one, with the composed padding where it exists."""
    found = ops.symmetric_crop(node, len(padding))
    if found is None:
        return None
    source, crops = found
    composed = crop_then_pad(crops, padding)
    if composed is None:
        return CropRead(source, crops, None, f"{node.name} crops {source.name} by {crops} and the conv then pads it "
                                             f"by {padding}: no padding of {source.name} is that (REPARAM §10)")
    return CropRead(source, crops, composed, None)
