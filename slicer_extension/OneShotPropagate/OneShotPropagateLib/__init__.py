"""Plain-Python core of the OneShotPropagate Slicer module: no Slicer, no Qt.

Submodules (import the one you need; none is imported here, so that the light ones work before the
``insid3-med`` package is installed in Slicer's Python):

- ``conversion``: Slicer (K, J, I) arrays + IJKToRAS matrices <-> ``insid3_med`` ``Volume``/``Geometry``;
  segment masks <-> one label map; sub-extents of oriented image data.
- ``slices``: which slices are labelled along an array axis, which axis to propagate along.
- ``validation``: checks of the user's parameters (slice range, segments, device, precision, image size).
- ``exchange``: the temporary folder of NIfTI files handed to the ``insid3-med`` command line, and reading its
  results back onto the volume's grid.
- ``commands``: the ``insid3-med propagate`` / ``transfer`` command lines.
- ``jobs``: runs a command in a subprocess, parses its ``PROGRESS <done> <total>`` lines, cancels it.
- ``dependencies``: the pinned requirements and which of them are missing.
- ``weights``: where DINOv3 weights come from and whether a chosen path looks like weights.
- ``mrml``: the thin MRML adapter (needs Slicer, or PyPI ``slicer-core``, for ``vtk`` and ``slicer``).
"""

__all__ = [
    "commands",
    "conversion",
    "dependencies",
    "exchange",
    "jobs",
    "mrml",
    "slices",
    "validation",
    "weights",
]
