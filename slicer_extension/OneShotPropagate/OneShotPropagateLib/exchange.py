"""Files handed to the ``insid3-med`` command line and read back from it, in a private temporary folder.

NIfTI is written and read with SimpleITK, which Slicer bundles and which speaks the same LPS (i, j, k) geometry as
:class:`~insid3_med.imaging.geometry.Geometry`. Every write goes to a temporary name in the same folder, then
``os.replace``: a cancelled or failed run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from insid3_med.imaging.geometry import Geometry, Volume

from .labels import label_dtype


class ExchangeError(ValueError):
    """A file that cannot be written or read back as expected; the message names the file."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ExchangeFolder:
    """A fresh temporary folder for one run; removed by :meth:`cleanup` or on leaving a ``with`` block."""

    def __init__(self, parent: str | Path | None = None, prefix: str = "oneshot-propagate-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=None if parent is None else str(parent)))

    def file(self, name: str) -> Path:
        """Path of ``name`` inside the folder (a plain file name, no folders)."""
        if Path(name).name != name or name in ("", ".", ".."):
            raise ExchangeError(self.path / name, "expected a plain file name inside the exchange folder")
        return self.path / name

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> ExchangeFolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


def _nifti_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    if name.endswith(".nii"):
        return ".nii"
    raise ExchangeError(path, "expected a .nii or .nii.gz file name")


def _write_image(array_kji: np.ndarray, geometry: Geometry, path: Path, overwrite: bool) -> Path:
    import SimpleITK as sitk

    path = Path(path)
    suffix = _nifti_suffix(path)
    if path.exists() and not overwrite:
        raise ExchangeError(path, "already exists (pass overwrite=True to replace it)")
    if not path.parent.is_dir():
        raise ExchangeError(path, "its folder does not exist")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    image.SetSpacing([float(s) for s in geometry.spacing])
    image.SetOrigin([float(o) for o in geometry.origin])
    image.SetDirection([float(v) for v in geometry.direction_matrix().ravel()])
    temporary = path.with_name(f".{path.name[: -len(suffix)]}.{os.getpid()}.partial{suffix}")
    try:
        sitk.WriteImage(image, str(temporary), True)
        os.replace(temporary, path)
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ExchangeError(path, f"cannot be written as NIfTI ({message})") from error
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def write_volume(volume: Volume, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a grey (K, J, I) volume to NIfTI with its geometry; returns the path."""
    if volume.is_rgb or volume.array.ndim != 3:
        raise ExchangeError(path, f"only grey (K, J, I) volumes can be exported, got shape {volume.array.shape}")
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    return _write_image(array, volume.geometry, Path(path), overwrite)


def write_label_map(label_map: np.ndarray, geometry: Geometry, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a (K, J, I) label map (non-negative integers) as uint8/uint16 NIfTI on ``geometry``."""
    labels = np.asarray(label_map)
    if labels.ndim != 3:
        raise ExchangeError(path, f"a label map is a (K, J, I) array, got shape {labels.shape}")
    if labels.dtype.kind not in "iub":
        raise ExchangeError(path, f"a label map holds integers, got {labels.dtype}")
    high = int(labels.max()) if labels.size else 0
    if labels.size and int(labels.min()) < 0:
        raise ExchangeError(path, f"negative label {int(labels.min())}")
    return _write_image(labels.astype(label_dtype(high)), geometry, Path(path), overwrite)


def _signed_permutation(
    expected: Geometry, expected_shape: tuple[int, int, int], found: Geometry, found_shape: tuple[int, int, int]
) -> tuple[list[int], list[bool]] | None:
    """For each expected voxel axis (i, j, k): the file's voxel axis and whether it runs backwards; None if the
    file's grid is not the expected grid with axes permuted or flipped."""
    mapping = np.linalg.inv(found.ijk_to_lps()) @ expected.ijk_to_lps()
    linear, shift = mapping[:3, :3], mapping[:3, 3]
    rounded = np.round(linear)
    if not np.allclose(linear, rounded, atol=1e-3) or not np.all(np.abs(rounded).sum(axis=0) == 1):
        return None
    if not np.all(np.abs(rounded).sum(axis=1) == 1):
        return None
    expected_ijk = expected_shape[::-1]
    found_ijk = found_shape[::-1]
    order, flips = [], []
    for axis in range(3):
        source = int(np.flatnonzero(rounded[:, axis])[0])
        backwards = rounded[source, axis] < 0
        start = expected_ijk[axis] - 1 if backwards else 0
        if found_ijk[source] != expected_ijk[axis] or abs(shift[source] - start) > 1e-2:
            return None
        order.append(source)
        flips.append(bool(backwards))
    return order, flips


def read_label_map(path: str | Path, geometry: Geometry, shape: tuple[int, int, int]) -> np.ndarray:
    """A result label map as a (K, J, I) uint8/uint16 array on the grid (``geometry``, ``shape``) it was asked on.

    A file whose grid is the same one with voxel axes permuted or flipped (a reader that reorients) is mapped
    back; any other grid, a missing file, non-integer or negative values raise :class:`ExchangeError`.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise ExchangeError(path, "no such result file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ExchangeError(path, f"cannot be read ({message})") from error
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ExchangeError(path, "expected a 3D label map with one value per voxel")
    array = sitk.GetArrayFromImage(image)
    found = Geometry(
        spacing=tuple(float(s) for s in image.GetSpacing()),
        origin=tuple(float(o) for o in image.GetOrigin()),
        direction=tuple(tuple(float(v) for v in row) for row in np.reshape(image.GetDirection(), (3, 3))),
    )
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    mapping = _signed_permutation(geometry, shape, found, tuple(int(s) for s in array.shape))  # type: ignore[arg-type]
    if mapping is None:
        raise ExchangeError(
            path,
            f"result grid (shape {tuple(array.shape)}, spacing {found.spacing}, origin {found.origin}) does not "
            f"match the volume's (shape {shape}, spacing {geometry.spacing}, origin {geometry.origin})",
        )
    order, flips = mapping
    ijk = array.transpose(2, 1, 0).transpose(order)
    for axis, backwards in enumerate(flips):
        if backwards:
            ijk = np.flip(ijk, axis=axis)
    labels = np.ascontiguousarray(ijk.transpose(2, 1, 0))
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise ExchangeError(path, "holds non-integer values; expected integer labels")
    elif labels.dtype.kind not in "iub":
        raise ExchangeError(path, f"voxel type {labels.dtype} cannot hold labels")
    if labels.size and labels.min() < 0:
        raise ExchangeError(path, f"negative label {labels.min()}")
    high = int(labels.max()) if labels.size else 0
    return labels.astype(label_dtype(high))
