"""3D boundary refinement of a propagated label map: a random walk on the image near the structures' boundaries.

The chain decides each slice from patch features, so its boundaries are as coarse as the patch grid and are
decided slice by slice. Here every voxel within ``band`` pixels (in the slice plane) of a boundary is decided
again by a random walk on the volume's grey values (Grady, "Random walks for image segmentation", IEEE TPAMI
2006), with the voxels farther inside and outside each structure as its seeds. The walk's graph links each voxel
to its six neighbours, across slices too, with weights that fall with the grey-value difference, so a boundary
settles on an edge of the image and agrees with the slices above and below. A structure keeps the slices it had:
the band is taken in each slice's plane, so no structure is added to a slice without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import cg


def random_walk_labels(image: np.ndarray, seeds: np.ndarray, beta: float,
                       spacing: Sequence[float] | None = None, tol: float = 1e-3) -> np.ndarray:
    """Label the unseeded voxels of ``image`` by the seed label a random walker from each reaches first most likely.

    image: (K, J, I) (or 2D) grey values; seeds: int array of the same shape, 0 where unknown, a label (> 0)
    elsewhere; beta: edge sharpness. The edge weight between neighbours is exp(-beta d^2 / (10 std)) + 1e-10, with
    d their grey-value difference divided by the spacing along their axis and std the image's standard
    deviation: the weighting of scikit-image's ``random_walker``, whose labels this reproduces. Only the edges that
    touch an unknown voxel enter the linear systems (one per label, solved by conjugate gradients with a Jacobi
    preconditioner to relative tolerance ``tol``), so the cost grows with the number of unknown voxels. Returns an
    int64 array of ``image``'s shape: the seeds as given, each unknown voxel the label of highest probability.
    """
    image = np.asarray(image, dtype=np.float64)
    seeds = np.asarray(seeds)
    if seeds.shape != image.shape:
        raise ValueError(f"seeds {seeds.shape} and image {image.shape} differ in shape")
    output = seeds.astype(np.int64).ravel()
    unknown = output == 0
    labels = np.unique(output[~unknown])
    if not unknown.any() or labels.size == 0:
        return output.reshape(image.shape)
    spacing = [1.0] * image.ndim if spacing is None else [float(s) for s in spacing]
    scale = beta / (10.0 * float(image.std()) + 1e-12)
    index = np.arange(image.size).reshape(image.shape)
    heads, tails, weights = [], [], []
    for axis in range(image.ndim):
        low = tuple(slice(None, -1) if a == axis else slice(None) for a in range(image.ndim))
        high = tuple(slice(1, None) if a == axis else slice(None) for a in range(image.ndim))
        head, tail = index[low].ravel(), index[high].ravel()
        touches = unknown[head] | unknown[tail]
        difference = (image[low].ravel()[touches] - image[high].ravel()[touches]) / spacing[axis]
        heads.append(head[touches])
        tails.append(tail[touches])
        weights.append(np.exp(-scale * difference**2) + 1e-10)
    head, tail, weight = np.concatenate(heads), np.concatenate(tails), np.concatenate(weights)
    adjacency = sparse.coo_matrix((np.concatenate([weight, weight]), (np.concatenate([head, tail]),
                                   np.concatenate([tail, head]))), shape=(image.size, image.size)).tocsr()
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    free, fixed = np.flatnonzero(unknown), np.flatnonzero(~unknown)
    rows = adjacency[free]
    laplacian = (sparse.diags(degree[free]) - rows[:, free]).tocsr()
    to_seeds = rows[:, fixed]
    jacobi = sparse.diags(1.0 / degree[free])
    fixed_labels = output[fixed]
    probabilities = np.empty((labels.size, free.size))
    for number, label in enumerate(labels):
        solution, _ = cg(laplacian, to_seeds @ (fixed_labels == label).astype(np.float64), rtol=tol, M=jacobi)
        probabilities[number] = solution
    output[free] = labels[np.argmax(probabilities, axis=0)]
    return output.reshape(image.shape)


def refine_boundaries(labels: np.ndarray, image: np.ndarray, axis: int, *, beta: float, band: int = 1,
                      keep_slices: Sequence[int] = (), spacing: Sequence[float] | None = None) -> np.ndarray:
    """Re-decide the voxels near the boundaries of ``labels`` by :func:`random_walk_labels` on ``image``.

    labels: (K, J, I) int label map (0 background); image: (K, J, I) grey values (any scale); axis: the slicing
    axis. In each slice, the pixels within ``band`` pixels of a boundary (in the plane) are re-decided; the
    pixels deeper inside each structure seed it (a structure thinner than that on a slice is seeded at its deepest
    pixels) and the rest seeds the background. keep_slices: slice indices (along ``axis``) that stay as they are
    and seed the walk (the labelled slices). spacing: voxel spacing per array axis (the walk's gradients). The walk
    runs in the bounding box of the band. Returns a new int64 label map; a structure stays on the slices it had.
    """
    labels = np.asarray(labels)
    output = labels.astype(np.int64, copy=True)
    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values or band < 1:
        return output
    plane = np.zeros((3, 3, 3), dtype=bool)
    plane[tuple(1 if a == axis else slice(None) for a in range(3))] = ndimage.generate_binary_structure(2, 1)
    foreground = labels != 0
    near = ndimage.binary_dilation(foreground, plane, iterations=band)
    box = tuple(slice(max(0, int(i.min()) - 1), int(i.max()) + 2) for i in np.nonzero(near))
    sub, near = labels[box], near[box]
    seeds = np.where(near, 0, 1).astype(np.int64)  # 1: the background's seed, beyond the band
    for number, value in enumerate(values):
        mask = sub == value
        core = ndimage.binary_erosion(mask, plane, iterations=band, border_value=1)
        planes_mask, planes_core = np.moveaxis(mask, axis, 0), np.moveaxis(core, axis, 0)
        for k in np.flatnonzero(planes_mask.any(axis=(1, 2)) & ~planes_core.any(axis=(1, 2))):
            depth = ndimage.distance_transform_edt(planes_mask[k])
            planes_core[k] = depth >= depth.max()
        seeds[core] = number + 2
    seed_planes, label_planes = np.moveaxis(seeds, axis, 0), np.moveaxis(sub, axis, 0)
    first = box[axis].start
    for n in keep_slices:
        if 0 <= n - first < seed_planes.shape[0]:
            drawn = label_planes[n - first]
            seed_planes[n - first] = 1
            for number, value in enumerate(values):
                seed_planes[n - first][drawn == value] = number + 2
    image_box = np.asarray(image, dtype=np.float64)[box]
    walked = random_walk_labels(image_box, seeds, beta, spacing)
    refined = np.where(walked == 1, 0, sub)  # a voxel walked to a structure absent from its slice keeps its label
    shape = [sub.shape[axis] if a == axis else 1 for a in range(3)]
    for number, value in enumerate(values):
        present = np.moveaxis(sub == value, axis, 0).any(axis=(1, 2)).reshape(shape)
        refined = np.where((walked == number + 2) & present, value, refined)
    output[box] = refined
    return output
