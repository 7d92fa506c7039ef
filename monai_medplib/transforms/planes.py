"""The anatomical planes a volume is cut along: the one home of the axis names and their display convention.

Kept free of MONAI and torch, so the command line can offer the names without loading either.
"""

from __future__ import annotations

# plane -> (world axis normal to it, (world axis, direction) of rows, (world axis, direction) of columns);
# world axes are RAS (0 = x towards Right, 1 = y towards Anterior, 2 = z towards Superior), direction -1
# means the row/column index grows towards the negative end (towards Posterior, Left or Inferior).
PLANES: dict[str, tuple[int, tuple[int, int], tuple[int, int]]] = {
    "axial": (2, (1, -1), (0, -1)),
    "coronal": (1, (2, -1), (0, -1)),
    "sagittal": (0, (2, -1), (1, -1)),
}
AXES: tuple[str, ...] = tuple(PLANES)  # the plane names every front end offers

__all__ = ["AXES", "PLANES"]
