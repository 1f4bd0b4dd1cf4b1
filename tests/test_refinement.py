"""Tests of insid3_med.refinement: the random walk's labels and the 3D boundary refinement of a label map."""

from __future__ import annotations

import numpy as np
import pytest

from insid3_med.refinement import area_keeping_weights, random_walk_labels, refine_boundaries


def ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]]
    return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius**2


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum()))


def test_a_walk_on_a_flat_path_splits_it_halfway_and_one_on_an_edge_splits_it_there() -> None:
    seeds = np.zeros(11, dtype=np.int64)
    seeds[0], seeds[10] = 1, 2
    flat = random_walk_labels(np.zeros(11), seeds, beta=130.0)
    np.testing.assert_array_equal(flat, [1] * 5 + [1] + [2] * 5)  # voxel 5 is a tie: the first label wins
    edge = np.r_[np.zeros(3), np.ones(8)]  # a step between voxels 2 and 3, far from halfway
    np.testing.assert_array_equal(random_walk_labels(edge, seeds, beta=130.0), [1] * 3 + [2] * 8)


def test_the_walk_gives_scikit_image_random_walker_labels() -> None:
    segmentation = pytest.importorskip("skimage.segmentation", reason="scikit-image (the dev extra) is not installed")
    rng = np.random.default_rng(0)
    image = rng.random((10, 18, 16))
    image[:, 4:14, 4:12] += 1.0
    seeds = np.zeros(image.shape, dtype=np.int64)
    seeds[:, :2] = 1
    seeds[:, 8:10, 7:9] = 2
    seeds[2:4, 16:, :] = 3
    expected = segmentation.random_walker(image, seeds, beta=130, mode="cg_j", tol=1e-6)
    np.testing.assert_array_equal(random_walk_labels(image, seeds, beta=130.0, tol=1e-8), expected)


def test_refinement_pulls_a_grown_mask_back_onto_the_edge_and_keeps_slices_and_labelled_slices() -> None:
    rng = np.random.default_rng(1)
    truth = ball((20, 32, 32), (10, 16, 16), 7.5)
    image = np.where(truth, 0.8, 0.2) + 0.03 * rng.standard_normal(truth.shape)
    grown = np.zeros(truth.shape, dtype=np.int64)
    for k in range(truth.shape[0]):  # one pixel too wide in every slice plane
        padded = np.pad(truth[k], 1)
        grown[k] = (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2]
                    | padded[1:-1, 2:]) * 3
    refined = refine_boundaries(grown, image, 0, beta=130.0, band=1, keep_slices=[10])
    assert refined.dtype == np.int64 and set(np.unique(refined)) == {0, 3}
    assert dice(grown != 0, truth) < 0.9 and dice(refined != 0, truth) > 0.97
    np.testing.assert_array_equal(refined[10], grown[10])  # a kept (labelled) slice stays as given
    present = lambda labels: np.flatnonzero((labels != 0).any(axis=(1, 2)))  # noqa: E731
    np.testing.assert_array_equal(present(refined), present(grown))  # no slice gains or loses the structure


def test_a_structure_thinner_than_the_band_keeps_its_place_and_neighbours_keep_their_labels() -> None:
    image = np.full((3, 16, 16), 0.2)
    labels = np.zeros(image.shape, dtype=np.int64)
    labels[:, 4:12, 7] = 1  # one pixel wide: no pixel lies deeper than the band
    labels[:, 4:12, 8:12] = 2  # a neighbour on the same slices
    image[labels == 1], image[labels == 2] = 0.9, 0.5
    refined = refine_boundaries(labels, image, 0, beta=130.0, band=1)
    assert np.count_nonzero(refined == 1) >= 0.9 * np.count_nonzero(labels == 1)
    assert dice(refined == 2, labels == 2) > 0.9


def test_refinement_of_nothing_is_nothing() -> None:
    labels = np.zeros((4, 8, 8), dtype=np.int64)
    np.testing.assert_array_equal(refine_boundaries(labels, np.random.default_rng(0).random(labels.shape), 0,
                                                    beta=130.0), labels)
    with pytest.raises(ValueError, match="differ in shape"):
        random_walk_labels(np.zeros((4, 4)), np.zeros((4, 5), dtype=np.int64), beta=1.0)


def test_area_keeping_weights_give_each_label_its_drawn_count() -> None:
    probabilities = np.array([[0.7, 0.6, 0.55, 0.2, 0.1], [0.3, 0.4, 0.45, 0.8, 0.9]])  # labels 1 and 2
    drawn = np.array([1, 2, 2, 2, 2])  # the walk gives label 2 only two of the four voxels drawn with it
    weights = area_keeping_weights(probabilities, np.array([1, 2]), drawn)
    assert weights[2] > 1.0
    assert np.count_nonzero(weights[2] * probabilities[1] > probabilities[0]) == 4
    assert area_keeping_weights(probabilities, np.array([1, 2]), np.array([1, 1, 1, 2, 2])) == {1: 1.0, 2: 1.0}


def test_calibration_keeps_labels_drawn_outside_the_image_edge_where_they_are() -> None:
    # The user's structure is a ball of radius 8 whose bright core (the image's edge) has radius 7, as a cardiac
    # cavity's label holds the rim around the blood pool: the walk alone pulls every boundary onto the edge, the
    # walk calibrated on the labelled slice keeps the drawn size.
    rng = np.random.default_rng(2)
    drawn = ball((20, 32, 32), (10, 16, 16), 8.0)
    image = np.where(ball((20, 32, 32), (10, 16, 16), 7.0), 0.8, 0.2) + 0.03 * rng.standard_normal(drawn.shape)
    labels = drawn.astype(np.int64)
    walked = refine_boundaries(labels, image, 0, beta=130.0, keep_slices=[10], label_weights={})
    calibrated = refine_boundaries(labels, image, 0, beta=130.0, keep_slices=[10])
    assert dice(walked != 0, drawn) < 0.91 and dice(calibrated != 0, drawn) > dice(walked != 0, drawn) + 0.03
    np.testing.assert_array_equal(calibrated[10], labels[10])


def test_the_walks_memory_follows_the_undecided_voxels_not_the_image() -> None:
    import tracemalloc

    from insid3_med.refinement import random_walk_probabilities

    image = np.random.default_rng(0).random((120, 120, 120)).astype(np.float32)
    seeds = np.ones(image.shape, dtype=np.int32)
    seeds[40:80, 40:80, 40:80] = 2
    seeds[38:42, 38:82, 38:82] = 0  # 7,744 undecided voxels in 1.7 million
    tracemalloc.start()
    try:
        free, labels, probabilities = random_walk_probabilities(image, seeds, beta=130.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert free.size == 7744 and list(labels) == [1, 2] and probabilities.shape == (2, 7744)
    assert peak < 4 * image.nbytes  # a graph of the whole image took 17 times the image
