"""3D boundary refinement of a propagated label map: a random walk on the image near the structures' boundaries.

The chain decides each slice from patch features, so its boundaries are as coarse as the patch grid and are
decided slice by slice. Here every voxel within ``band`` pixels (in the slice plane) of a boundary is decided
again by a random walk on the volume's grey values (Grady, "Random walks for image segmentation", IEEE TPAMI
2006), with the voxels farther inside and outside each structure as its seeds. The walk's graph links each voxel
to its six neighbours, across slices too, with weights that fall with the grey-value difference, so a boundary
settles on an edge of the image and agrees with the slices above and below. A structure keeps the slices it had:
the band is taken in each slice's plane, so no structure is added to a slice without it.

Where a user's boundaries do not lie on the edges the walk finds (cardiac cine MRI: the ventricles' labels lie
outside them), the walk would move every boundary the same wrong way. The labelled slices show by how much: the
walk is first run with their boundary pixels undecided too, and each structure's probability is weighted so that
it keeps its drawn area there (:func:`area_keeping_weights`); the walk that decides the other slices uses those
weights, with the labelled slices as drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import cg


def random_walk_probabilities(image: np.ndarray, seeds: np.ndarray, beta: float,
                              spacing: Sequence[float] | None = None,
                              tol: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each unseeded voxel of ``image``, the probability that a random walker from it first reaches each label.

    image: (K, J, I) (or any-dimensional) grey values; seeds: int array of the same shape, 0 where unknown, a
    label (> 0) elsewhere; beta: edge sharpness. The edge weight between neighbours is exp(-beta d^2 / (10 std)) +
    1e-10, with d their grey-value difference divided by the spacing along their axis and std the image's standard
    deviation: the weighting of scikit-image's ``random_walker``. Only the unknown voxels' edges are built (one
    linear system per label, solved by conjugate gradients with a Jacobi preconditioner to relative tolerance
    ``tol``), so time and memory grow with the number of unknown voxels, not with the image. Returns (U,) flat
    indices of the unknown voxels, the (M,) seed labels in increasing order and their (M, U) probabilities.
    """
    image = np.asarray(image)
    seeds = np.asarray(seeds)
    if seeds.shape != image.shape:
        raise ValueError(f"seeds {seeds.shape} and image {image.shape} differ in shape")
    flat_seeds = seeds.reshape(-1)
    unknown = flat_seeds == 0
    free = np.flatnonzero(unknown)
    labels = np.unique(flat_seeds)
    labels = labels[labels != 0].astype(np.int64)
    if free.size == 0 or labels.size == 0:
        return free, labels, np.zeros((labels.size, free.size))
    spacing = [1.0] * image.ndim if spacing is None else [float(s) for s in spacing]
    flat_image = image.reshape(-1)
    scale = beta / (10.0 * float(np.std(flat_image, dtype=np.float64)) + 1e-12)
    values = flat_image[free].astype(np.float64)
    rows, neighbours, weights = [], [], []
    for axis in range(image.ndim):
        stride = int(np.prod(image.shape[axis + 1 :], dtype=np.int64))
        position = (free // stride) % image.shape[axis]
        for step, inside in ((-stride, position > 0), (stride, position < image.shape[axis] - 1)):
            row = np.flatnonzero(inside)
            neighbour = free[row] + step
            difference = (values[row] - flat_image[neighbour].astype(np.float64)) / spacing[axis]
            rows.append(row)
            neighbours.append(neighbour)
            weights.append(np.exp(-scale * difference**2) + 1e-10)
    row, neighbour, weight = np.concatenate(rows), np.concatenate(neighbours), np.concatenate(weights)
    degree = np.bincount(row, weights=weight, minlength=free.size)
    to_free = unknown[neighbour]
    laplacian = (sparse.diags(degree) - sparse.coo_matrix(
        (weight[to_free], (row[to_free], np.searchsorted(free, neighbour[to_free]))),
        shape=(free.size, free.size))).tocsr()
    jacobi = sparse.diags(1.0 / degree)
    seeded_row, seeded_weight = row[~to_free], weight[~to_free]
    seeded_label = flat_seeds[neighbour[~to_free]]
    probabilities = np.empty((labels.size, free.size))
    for number, label in enumerate(labels):
        reach = np.bincount(seeded_row, weights=seeded_weight * (seeded_label == label), minlength=free.size)
        solution, _ = cg(laplacian, reach, rtol=tol, M=jacobi)
        probabilities[number] = solution
    return free, labels, probabilities


def random_walk_labels(image: np.ndarray, seeds: np.ndarray, beta: float,
                       spacing: Sequence[float] | None = None, tol: float = 1e-3,
                       label_weights: Mapping[int, float] | None = None) -> np.ndarray:
    """Label the unseeded voxels of ``image`` by the seed label a random walker from each most likely reaches first
    (:func:`random_walk_probabilities`; with no ``label_weights`` the labels of scikit-image's ``random_walker``).

    label_weights: label -> factor on its probability before the choice (default 1). Returns an int64 array of
    ``image``'s shape: the seeds as given, each unknown voxel the label of highest (weighted) probability.
    """
    free, labels, probabilities = random_walk_probabilities(image, seeds, beta, spacing, tol)
    output = np.asarray(seeds).astype(np.int64).ravel()
    if free.size and labels.size:
        if label_weights:
            factors = np.array([label_weights.get(int(label), 1.0) for label in labels])
            probabilities = probabilities * factors[:, None]
        output[free] = labels[np.argmax(probabilities, axis=0)]
    return output.reshape(np.shape(image))


def area_keeping_weights(probabilities: np.ndarray, labels: np.ndarray, drawn: np.ndarray,
                         factors: np.ndarray | None = None) -> dict[int, float]:
    """Per label, the factor on its probability that makes the walk give it as many voxels as ``drawn`` does.

    probabilities: (M, U) walk probabilities of U voxels for the (M,) ``labels``; drawn: (U,) the label each of
    those voxels should have. Each label's factor is searched on its own (the others at 1) among ``factors``
    (default: 61 values from e^-1.5 to e^1.5, evenly spaced in log); on a tie the one nearest 1 wins. Returns
    label -> factor for the labels present in ``drawn``.
    """
    factors = np.exp(np.linspace(-1.5, 1.5, 61)) if factors is None else np.asarray(factors, dtype=np.float64)
    order = factors[np.argsort(np.abs(np.log(factors)), kind="stable")]  # nearest 1 first: it wins ties
    weights: dict[int, float] = {}
    for row, label in enumerate(labels):
        wanted = int(np.count_nonzero(drawn == label))
        if wanted == 0:
            continue
        others = np.delete(probabilities, row, axis=0).max(axis=0, initial=0.0)
        areas = np.array([np.count_nonzero(factor * probabilities[row] > others) for factor in order])
        weights[int(label)] = float(order[int(np.argmin(np.abs(areas - wanted)))])
    return weights


def boundary_box(labels: np.ndarray, axis: int, band: int = 1) -> tuple[slice, slice, slice] | None:
    """The part of a (K, J, I) label map that :func:`refine_boundaries` works in: the structures' bounding box grown
    by ``band`` + 1 pixels in the slice plane and by one slice across (clipped to the map); None if it is empty
    or ``band`` < 1."""
    if band < 1:
        return None
    foreground = np.asarray(labels) != 0
    box = []
    for a in range(3):
        present = np.flatnonzero(foreground.any(axis=tuple(b for b in range(3) if b != a)))
        if present.size == 0:
            return None
        grow = 1 if a == axis else band + 1
        box.append(slice(max(0, int(present[0]) - grow), min(foreground.shape[a], int(present[-1]) + grow + 1)))
    return box[0], box[1], box[2]


@dataclass
class _BoundaryWalk:
    """The walk's set-up on the part of a label map it works in: ``box`` of the map; ``sub``, the labels there;
    ``values``, the structures (the walk numbers value ``values[n]`` as n + 2 and the background as 1);
    ``walk_labels``, ``sub`` in those numbers; ``band_seeds``, the seeds with every slice's band undecided."""

    box: tuple[slice, slice, slice]
    sub: np.ndarray
    values: list[int]
    walk_labels: np.ndarray
    band_seeds: np.ndarray

    def kept(self, axis: int, keep_slices: Sequence[int]) -> list[int]:
        first = self.box[axis].start
        return [n - first for n in keep_slices if 0 <= n - first < self.sub.shape[axis]]


def _boundary_walk(labels: np.ndarray, axis: int, band: int) -> _BoundaryWalk | None:
    box = boundary_box(labels, axis, band)
    if box is None:
        return None
    sub = np.asarray(labels)[box]
    values = [int(v) for v in np.unique(sub) if v != 0]
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[tuple(1 if a == axis else slice(None) for a in range(3))] = ndimage.generate_binary_structure(2, 1)
    near = ndimage.binary_dilation(sub != 0, plane, iterations=band)
    walk_labels = np.ones(sub.shape, dtype=np.int32)
    band_seeds = (~near).astype(np.int32)  # the background (1) seeds it beyond the band
    for number, value in enumerate(values):
        mask = sub == value
        walk_labels[mask] = number + 2
        core = ndimage.binary_erosion(mask, plane, iterations=band, border_value=1)
        planes_mask, planes_core = np.moveaxis(mask, axis, 0), np.moveaxis(core, axis, 0)
        for k in np.flatnonzero(planes_mask.any(axis=(1, 2)) & ~planes_core.any(axis=(1, 2))):
            depth = ndimage.distance_transform_edt(planes_mask[k])
            planes_core[k] = depth >= depth.max()
        band_seeds[core] = number + 2
    return _BoundaryWalk(box, sub, values, walk_labels, band_seeds)


def walk_calibration(labels: np.ndarray, image: np.ndarray, axis: int, keep_slices: Sequence[int], *, beta: float,
                     band: int = 1, spacing: Sequence[float] | None = None) -> dict[int, float]:
    """Label value -> factor on its walk probability that keeps its drawn area on the slices ``keep_slices``.

    The walk of :func:`refine_boundaries` is run with the boundary pixels of the kept (labelled) slices undecided
    too, and each structure's factor is the one with which it gets as many of those pixels as drawn
    (:func:`area_keeping_weights`). labels, image, axis, band, spacing: as for :func:`refine_boundaries`. Empty
    if no kept slice holds a structure.
    """
    setup = _boundary_walk(labels, axis, band)
    if setup is None:
        return {}
    image_box = _grey(image)[setup.box]
    weights = _calibrated_weights(setup, image_box, axis, setup.kept(axis, keep_slices), beta, spacing)
    return {setup.values[label - 2]: factor for label, factor in weights.items()}


def _calibrated_weights(setup: _BoundaryWalk, image_box: np.ndarray, axis: int, kept: Sequence[int], beta: float,
                        spacing: Sequence[float] | None) -> dict[int, float]:
    """:func:`walk_calibration` in the walk's own numbers (structures from 2; the background left out)."""
    if not kept:
        return {}
    free, walk_values, probabilities = random_walk_probabilities(image_box, setup.band_seeds, beta, spacing)
    on_kept = np.zeros(setup.sub.shape, dtype=bool)
    np.moveaxis(on_kept, axis, 0)[list(kept)] = True
    chosen = on_kept.ravel()[free]
    if not chosen.any():
        return {}
    weights = area_keeping_weights(probabilities[:, chosen], walk_values, setup.walk_labels.ravel()[free][chosen])
    return {label: factor for label, factor in weights.items() if label >= 2}


def _grey(image: np.ndarray) -> np.ndarray:
    """``image`` as floating-point grey values: as given when it already is (no copy), else float64."""
    image = np.asarray(image)
    return image if np.issubdtype(image.dtype, np.floating) else image.astype(np.float64)


def refine_boundaries(labels: np.ndarray, image: np.ndarray, axis: int, *, beta: float, band: int = 1,
                      keep_slices: Sequence[int] = (), spacing: Sequence[float] | None = None,
                      label_weights: Mapping[int, float] | None = None) -> np.ndarray:
    """Re-decide the voxels near the boundaries of ``labels`` by :func:`random_walk_labels` on ``image``.

    labels: (K, J, I) int label map (0 background); image: (K, J, I) grey values (any scale); axis: the slicing
    axis. In each slice, the pixels within ``band`` pixels of a boundary (in the plane) are re-decided; the
    pixels deeper inside each structure seed it (a structure thinner than that on a slice is seeded at its deepest
    pixels) and the rest seeds the background. keep_slices: slice indices (along ``axis``) that stay as they are
    and seed the walk (the labelled slices). label_weights: label value -> factor on its walk probability (default:
    :func:`walk_calibration` on the kept slices; ``{}`` for none). spacing: voxel spacing per array axis (the
    walk's gradients). The walk runs in :func:`boundary_box` (callers with large volumes may pass that part alone,
    as :func:`insid3_med.volume.refine_volume_boundaries` does). Returns a new int64 label map; a structure stays
    on the slices it had.
    """
    output = np.asarray(labels).astype(np.int64, copy=True)
    setup = _boundary_walk(output, axis, band)
    if setup is None:
        return output
    image_box = _grey(image)[setup.box]
    kept = setup.kept(axis, keep_slices)
    if label_weights is None:  # calibrated on the kept slices, with the set-up the walk itself uses
        weights = _calibrated_weights(setup, image_box, axis, kept, beta, spacing)
    else:
        weights = {n + 2: label_weights[value] for n, value in enumerate(setup.values) if value in label_weights}
    seeds = setup.band_seeds.copy()
    np.moveaxis(seeds, axis, 0)[kept] = np.moveaxis(setup.walk_labels, axis, 0)[kept]
    walked = random_walk_labels(image_box, seeds, beta, spacing, label_weights=weights)
    shape = [setup.sub.shape[axis] if a == axis else 1 for a in range(3)]
    presence = [np.moveaxis(setup.sub == value, axis, 0).any(axis=(1, 2)).reshape(shape) for value in setup.values]
    refined = output[setup.box]  # a view of output, as setup.sub is: the slices' presence is taken first
    refined[walked == 1] = 0  # a voxel walked to a structure absent from its slice keeps its label
    for number, (value, present) in enumerate(zip(setup.values, presence, strict=True)):
        refined[(walked == number + 2) & present] = value
    return output
