"""Where a copy edit pasted the image into a larger canvas: box labels for a learned overlay detector.

D2LV trained a YOLOv5 on its own generated pastes to find pasted regions in queries. Edits here know
where they paste, so a generator can record it: inside :func:`record_pastes`, an edit that pastes the
image onto a canvas (:class:`~isc.augment.PasteOnBackground`, :class:`~isc.augment.ImageOverlay`,
:class:`~isc.augment.ScreenshotFrame`, :class:`~isc.augment.MemeFormat`) calls :func:`pasted`, and
every later edit that moves pixels calls :func:`moved` with how it maps a box (or ``None`` when the box
would no longer be an exact axis-aligned rectangle). Outside :func:`record_pastes` both are no-ops.

What the final record means (see :class:`PasteRecord`):

* ``box`` set: the pasted image occupies exactly that rectangle of the output (``x0, y0, x1, y1`` in
  output pixels, ``x1``/``y1`` exclusive as PIL's ``crop``), up to the sub-pixel rounding of resizes.
  Crops, pads, flips and resizes after the paste are mapped; a crop cuts the box to what stays visible.
  Edits that draw over part of the canvas (text, emoji, pastes over) leave the box as it is.
* ``lost``: something was pasted, but a later rotation or perspective made the region a non-rectangle
  (or cropped it away), so no exact box exists; training should skip such an image, not take it as
  unpasted.
* neither: no paste happened.

With several pastes the latest (outermost) one is recorded: it holds all earlier canvases.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = ["Box", "PasteRecord", "moved", "pasted", "record_pastes", "scaled", "shifted"]

Box = tuple[float, float, float, float]

_MIN_SIDE = 1.0  # a box thinner than this after a crop is gone


@dataclass
class PasteRecord:
    """The pasted rectangle of one edited image, in the pixels of the image as it is now."""

    box: Box | None = None
    lost: bool = False

    @property
    def pasted(self) -> bool:
        """Whether any paste happened (exact box or not)."""
        return self.box is not None or self.lost


_CURRENT: contextvars.ContextVar[PasteRecord | None] = contextvars.ContextVar("paste_record", default=None)


@contextlib.contextmanager
def record_pastes() -> Iterator[PasteRecord]:
    """Record the paste of the edits run inside the block; yields the record they fill in."""
    record = PasteRecord()
    token = _CURRENT.set(record)
    try:
        yield record
    finally:
        _CURRENT.reset(token)


def pasted(box: Box, canvas: tuple[int, int]) -> None:
    """An edit pasted the image so that it shows on ``box`` of its ``canvas`` (w, h) output."""
    record = _CURRENT.get()
    if record is None:
        return
    record.box, record.lost = None, True
    clipped = _clip(box, canvas)
    if clipped is not None:
        record.box, record.lost = clipped, False


def moved(mapping: Callable[[Box], Box] | None, canvas: tuple[int, int]) -> None:
    """An edit moved pixels: map the recorded box with ``mapping`` (``None``: no exact box survives)
    and clip it to the edit's ``canvas`` (w, h) output."""
    record = _CURRENT.get()
    if record is None or record.box is None:
        return
    box = None if mapping is None else _clip(mapping(record.box), canvas)
    record.box, record.lost = box, box is None


def shifted(dx: float, dy: float) -> Callable[[Box], Box]:
    """The mapping of a translation by ``(dx, dy)`` (a pad, or a crop at ``(-dx, -dy)``)."""
    return lambda b: (b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy)


def scaled(kx: float, ky: float, dx: float = 0.0, dy: float = 0.0) -> Callable[[Box], Box]:
    """The mapping of ``x -> (x + dx) * kx``, ``y -> (y + dy) * ky`` (a crop then a resize)."""
    return lambda b: ((b[0] + dx) * kx, (b[1] + dy) * ky, (b[2] + dx) * kx, (b[3] + dy) * ky)


def _clip(box: Box, canvas: tuple[int, int]) -> Box | None:
    w, h = canvas
    x0, y0 = max(0.0, float(box[0])), max(0.0, float(box[1]))
    x1, y1 = min(float(w), float(box[2])), min(float(h), float(box[3]))
    if x1 - x0 < _MIN_SIDE or y1 - y0 < _MIN_SIDE:
        return None
    return (x0, y0, x1, y1)
