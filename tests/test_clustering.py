"""Average-linkage clustering cut at a distance threshold: same partition as scipy's linkage + fcluster."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

import insid3_med.clustering as clustering
from insid3_med.clustering import (
    ClusteringInputError,
    average_linkage_clusters,
    average_linkage_clusters_from_distances,
    cosine_distance_matrix,
    resolve_merge_device,
)


def scipy_clusters_of_features(features: torch.Tensor, threshold: float) -> np.ndarray:
    """The reference: scipy cosine pdist (float64) + average linkage + fcluster(criterion="distance")."""
    condensed = pdist(features.double().numpy(), "cosine")
    return fcluster(linkage(condensed, method="average"), threshold, criterion="distance")


def scipy_clusters_of_distances(distances: torch.Tensor, threshold: float) -> np.ndarray:
    condensed = squareform(distances.double().numpy(), checks=False)
    return fcluster(linkage(condensed, method="average"), threshold, criterion="distance")


def same_partition(first: np.ndarray | torch.Tensor, second: np.ndarray | torch.Tensor) -> bool:
    """True when the two labelings group the points identically (a one-to-one contingency table)."""
    first = np.asarray(first).ravel()
    second = np.asarray(second).ravel()
    if first.shape != second.shape:
        return False
    pairs = set(zip(first.tolist(), second.tolist(), strict=True))
    return len(pairs) == len(set(first.tolist())) == len(set(second.tolist()))


def planted_clusters(n: int, channels: int, n_clusters: int, spread: float, seed: int) -> torch.Tensor:
    """(n, channels) unit rows drawn around n_clusters random directions, with cluster-specific spreads."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_clusters, channels, generator=generator), dim=1)
    scales = spread * (0.5 + torch.rand(n_clusters, generator=generator))
    which = torch.randint(0, n_clusters, (n,), generator=generator)
    noise = torch.randn(n, channels, generator=generator) / math.sqrt(channels)
    return torch.nn.functional.normalize(centres[which] + scales[which, None] * noise, dim=1)


def random_unit_rows(n: int, channels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, channels, generator=generator), dim=1)


def test_same_partition_helper_detects_differences() -> None:
    assert same_partition([0, 0, 1, 2], [5, 5, 3, 1])
    assert not same_partition([0, 0, 1, 2], [5, 5, 5, 1])
    assert not same_partition([0, 1, 1, 2], [5, 5, 3, 1])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("n", "channels"), [(2, 3), (3, 5), (17, 3), (150, 8), (400, 32)])
def test_random_features_match_scipy(seed: int, n: int, channels: int) -> None:
    features = random_unit_rows(n, channels, seed)
    # Thresholds across the distance distribution (concentrated near 1 +- 1/sqrt(C) in C dimensions).
    for threshold in (0.2, 0.6, 0.9, 1.0, 1.1, 1.5):
        ours = average_linkage_clusters(features, threshold)
        assert ours.dtype == torch.int64 and ours.shape == (n,)
        assert same_partition(ours, scipy_clusters_of_features(features, threshold)), (seed, n, threshold)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("n", "channels", "n_clusters"), [(64, 16, 5), (300, 64, 12), (600, 384, 30)])
def test_planted_clusters_match_scipy(seed: int, n: int, channels: int, n_clusters: int) -> None:
    features = planted_clusters(n, channels, n_clusters, spread=0.8, seed=seed)
    for threshold in (0.1, 0.4, 0.7):
        ours = average_linkage_clusters(features, threshold)
        reference = scipy_clusters_of_features(features, threshold)
        assert same_partition(ours, reference), (seed, n, threshold)
    # The default threshold is 0.4 (tau = 0.6) and gives a non-trivial partition here.
    ours = average_linkage_clusters(features)
    assert 1 < int(ours.max()) + 1 < n


def test_realistic_size_1024_matches_scipy() -> None:
    # A mixture of tight and loose groups, as patch features of one image (h = w = 32, C = 384).
    tight = planted_clusters(700, 384, 25, spread=0.5, seed=11)
    loose = planted_clusters(324, 384, 60, spread=1.5, seed=12)
    features = torch.cat([tight, loose])[torch.randperm(1024, generator=torch.Generator().manual_seed(13))]
    for threshold in (0.3, 0.4, 0.6):
        ours = average_linkage_clusters(features.float(), threshold)
        reference = scipy_clusters_of_features(features, threshold)
        assert same_partition(ours, reference), threshold
        assert 10 < int(ours.max()) + 1 < 1000


def test_labels_are_numbered_in_order_of_first_appearance() -> None:
    features = planted_clusters(200, 16, 8, spread=0.6, seed=3)
    labels = average_linkage_clusters(features, 0.4).tolist()
    seen = -1
    for label in labels:
        assert label <= seen + 1
        seen = max(seen, label)
    assert labels[0] == 0 and seen == max(labels)


def test_row_order_does_not_change_the_partition() -> None:
    features = planted_clusters(300, 32, 10, spread=0.8, seed=5)
    order = torch.randperm(300, generator=torch.Generator().manual_seed(6))
    direct = average_linkage_clusters(features, 0.4)
    permuted = average_linkage_clusters(features[order], 0.4)
    assert same_partition(direct[order], permuted)


def test_rows_are_renormalised_and_input_is_untouched() -> None:
    features = planted_clusters(120, 16, 6, spread=0.7, seed=8)
    scaled = features * torch.linspace(0.5, 3.0, 120).unsqueeze(1)
    before = scaled.clone()
    assert same_partition(average_linkage_clusters(scaled, 0.4), average_linkage_clusters(features, 0.4))
    assert torch.equal(scaled, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_float_input_dtype(dtype: torch.dtype) -> None:
    features = planted_clusters(100, 16, 4, spread=0.3, seed=9).to(dtype)
    ours = average_linkage_clusters(features, 0.4)
    assert ours.dtype == torch.int64 and ours.device == features.device
    assert same_partition(ours, scipy_clusters_of_features(features.double(), 0.4))


def test_float32_working_precision_on_separated_clusters() -> None:
    features = planted_clusters(500, 384, 20, spread=0.6, seed=4)
    ours = average_linkage_clusters(features, 0.4, dtype=torch.float32)
    assert same_partition(ours, scipy_clusters_of_features(features, 0.4))


def test_single_point() -> None:
    assert average_linkage_clusters(torch.ones(1, 8)).tolist() == [0]
    assert average_linkage_clusters_from_distances(torch.zeros(1, 1), 0.4).tolist() == [0]


def test_all_identical_points_form_one_cluster() -> None:
    features = torch.full((300, 384), 0.05)
    assert average_linkage_clusters(features, 0.4).tolist() == [0] * 300
    assert average_linkage_clusters(features, 0.0).tolist() == [0] * 300  # distance 0 <= 0
    assert average_linkage_clusters(features, -0.1).tolist() == list(range(300))  # no height is <= -0.1


def test_duplicated_points_match_scipy() -> None:
    generator = torch.Generator().manual_seed(21)
    distinct = planted_clusters(60, 24, 6, spread=0.9, seed=20)
    features = distinct[torch.randint(0, 60, (500,), generator=generator)]
    for threshold in (1e-9, 0.2, 0.4, 0.8):
        ours = average_linkage_clusters(features, threshold)
        assert same_partition(ours, scipy_clusters_of_features(features, threshold)), threshold
    # Copies of one row always share a cluster.
    labels = average_linkage_clusters(features, 1e-9)
    assert int(labels.max()) + 1 == torch.unique(features, dim=0).shape[0]


def test_thresholds_zero_and_two() -> None:
    features = random_unit_rows(80, 3, seed=2)
    assert average_linkage_clusters(features, 0.0).tolist() == list(range(80))
    assert average_linkage_clusters(features, 2.0).tolist() == [0] * 80
    for threshold in (0.0, 2.0):
        reference = scipy_clusters_of_features(features, threshold)
        assert same_partition(average_linkage_clusters(features, threshold), reference)


def test_threshold_is_inclusive_like_fcluster() -> None:
    distances = torch.tensor([[0.0, 0.5, 1.5], [0.5, 0.0, 1.25], [1.5, 1.25, 0.0]])
    for threshold, expected in ((0.5, [0, 0, 1]), (0.49, [0, 1, 2]), (1.375, [0, 0, 0]), (1.37, [0, 0, 1])):
        ours = average_linkage_clusters_from_distances(distances, threshold)
        assert ours.tolist() == expected, threshold
        assert same_partition(ours, scipy_clusters_of_distances(distances, threshold))


@pytest.mark.parametrize("seed", range(4))
def test_distances_api_matches_scipy(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(250, 4, generator=generator, dtype=torch.float64)
    points[:120] *= 0.3
    distances = torch.cdist(points, points)
    distances.fill_diagonal_(0.0)
    before = distances.clone()
    for threshold in (0.3, 1.0, 2.5):
        ours = average_linkage_clusters_from_distances(distances.float(), threshold)
        assert same_partition(ours, scipy_clusters_of_distances(distances.float(), threshold)), threshold
    assert torch.equal(distances, before)


def test_distances_api_equals_features_api() -> None:
    features = planted_clusters(300, 64, 10, spread=0.8, seed=14)
    distances = cosine_distance_matrix(features)
    assert distances.dtype == torch.float64 and torch.equal(distances, distances.T)
    assert torch.all(distances.diagonal() == 0) and float(distances.min()) >= 0.0 and float(distances.max()) <= 2.0
    for threshold in (0.3, 0.5):
        assert torch.equal(
            average_linkage_clusters_from_distances(distances, threshold),
            average_linkage_clusters(features, threshold),
        )


def test_chain_of_single_merges_matches_scipy() -> None:
    # Points on a line with growing gaps: one merge per round, each round absorbing the next point.
    positions = torch.tensor([1.3**i for i in range(70)], dtype=torch.float64)
    distances = (positions[:, None] - positions[None, :]).abs()
    for threshold in (5.0, 500.0, 1e6):
        ours = average_linkage_clusters_from_distances(distances, threshold)
        assert same_partition(ours, scipy_clusters_of_distances(distances, threshold)), threshold


def test_exact_ties_merge_in_few_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    rounds = []
    choose_pairs = clustering._choose_pairs

    def counting(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        rounds.append(1)
        return choose_pairs(*args)

    monkeypatch.setattr(clustering, "_choose_pairs", counting)
    n = 512
    distances = torch.ones(n, n) - torch.eye(n)  # every pair at the same distance
    assert average_linkage_clusters_from_distances(distances, 1.0).tolist() == [0] * n
    assert len(rounds) <= 4 * math.ceil(math.log2(n))  # groups of tied clusters halve, not one merge a round
    assert average_linkage_clusters_from_distances(distances, 0.999).tolist() == list(range(n))
    # Two tied groups, far apart.
    group = torch.arange(n) % 2
    distances = torch.where(group[:, None] == group[None, :], 1.0, 3.0)
    distances.fill_diagonal_(0.0)
    assert same_partition(average_linkage_clusters_from_distances(distances, 2.0), group)


def test_tie_broken_grid_matches_scipy() -> None:
    # L1 distances on an integer grid (many exact ties, which may resolve either way), made tie-free by a tiny
    # symmetric perturbation: then the partition is unique and must equal scipy's.
    generator = torch.Generator().manual_seed(30)
    points = torch.randint(0, 6, (300, 3), generator=generator).double()
    noise = torch.triu(torch.rand(300, 300, generator=generator, dtype=torch.float64), diagonal=1) * 1e-6
    distances = torch.cdist(points, points, p=1) + noise + noise.T
    for threshold in (0.5, 1.3, 2.2, 3.1):
        ours = average_linkage_clusters_from_distances(distances, threshold)
        assert same_partition(ours, scipy_clusters_of_distances(distances, threshold)), threshold


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (torch.ones(4), "must be \\(N, C\\)"),
        (torch.ones(0, 3), "N = 0"),
        (torch.ones(3, 0), "no channels"),
        (torch.ones(3, 2, dtype=torch.int64), "floating point"),
        (torch.tensor([[1.0, float("nan")], [1.0, 0.0]]), "NaN"),
        (torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "row 1 is all zeros"),
    ],
)
def test_bad_features_are_rejected(features: torch.Tensor, message: str) -> None:
    with pytest.raises(ClusteringInputError, match=message):
        average_linkage_clusters(features)
    assert issubclass(ClusteringInputError, ValueError)


def test_bad_threshold_is_rejected() -> None:
    with pytest.raises(ClusteringInputError, match="NaN"):
        average_linkage_clusters(torch.eye(3), float("nan"))


@pytest.mark.parametrize(
    ("distances", "message"),
    [
        (torch.zeros(3, 2), "square"),
        (torch.zeros(0, 0), "empty"),
        (torch.tensor([[0.0, 1.0], [2.0, 0.0]]), "not symmetric"),
        (torch.tensor([[1.0, 1.0], [1.0, 0.0]]), "non-zero diagonal"),
        (torch.tensor([[0.0, float("inf")], [float("inf"), 0.0]]), "NaN or infinite"),
        (torch.zeros(2, 2, dtype=torch.int32), "floating point"),
    ],
)
def test_bad_distances_are_rejected(distances: torch.Tensor, message: str) -> None:
    with pytest.raises(ClusteringInputError, match=message):
        average_linkage_clusters_from_distances(distances, 0.4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_scipy() -> None:
    features = planted_clusters(2048, 384, 40, spread=0.8, seed=17)
    reference = scipy_clusters_of_features(features, 0.4)
    on_gpu = average_linkage_clusters(features.cuda(), 0.4)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.int64
    assert torch.equal(on_gpu.cpu(), average_linkage_clusters(features, 0.4))
    assert same_partition(on_gpu.cpu(), reference)
    assert same_partition(average_linkage_clusters(features.cuda(), 0.4, dtype=torch.float32).cpu(), reference)
    distances = cosine_distance_matrix(features.cuda())
    assert same_partition(average_linkage_clusters_from_distances(distances, 0.4).cpu(), reference)
    # The merge rounds run on the CPU by default; on the GPU when asked, with the same partition.
    on_gpu_rounds = average_linkage_clusters(features.cuda(), 0.4, merge_device="cuda")
    assert on_gpu_rounds.device.type == "cuda" and torch.equal(on_gpu_rounds, on_gpu)
    from_distances = average_linkage_clusters_from_distances(distances, 0.4, merge_device="cuda")
    assert same_partition(from_distances.cpu(), reference)


def test_merge_rounds_run_on_the_cpu_unless_a_device_is_named() -> None:
    cuda, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert resolve_merge_device(cuda) == torch.device("cpu")  # the rounds are latency-bound on a GPU
    assert resolve_merge_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_merge_device(cuda1, "cuda") == cuda1  # a bare "cuda" means the input's own GPU
    assert resolve_merge_device(cuda1, "cuda:0") == cuda
    assert resolve_merge_device(cuda, "cpu") == torch.device("cpu")
    features = planted_clusters(300, 16, 6, spread=0.8, seed=3)
    assert torch.equal(average_linkage_clusters(features, 0.4, merge_device="cpu"),
                       average_linkage_clusters(features, 0.4))


def test_thread_setting_is_restored() -> None:
    threads = torch.get_num_threads()
    average_linkage_clusters(planted_clusters(200, 16, 5, spread=0.6, seed=1), 0.4)
    assert torch.get_num_threads() == threads
    with pytest.raises(ClusteringInputError):
        average_linkage_clusters_from_distances(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), 0.4)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(("group", "chunk_elements", "compact_fraction"), [(5, 1 << 10, 0.75), (3, 1 << 8, 0.95)])
def test_small_groups_chunks_and_compactions_match_scipy(
    monkeypatch: pytest.MonkeyPatch, group: int, chunk_elements: int, compact_fraction: float
) -> None:
    # Many column groups per round, many chunks per pass and frequent compactions: the paths that large inputs
    # take, on a small one.
    monkeypatch.setattr(clustering, "_COLUMN_GROUP", group)
    monkeypatch.setattr(clustering, "_COMPACT_FRACTION", compact_fraction)
    monkeypatch.setattr(clustering, "_chunk_rows", lambda side, device: max(1, chunk_elements // side))
    features = planted_clusters(400, 32, 15, spread=0.9, seed=23)
    for threshold in (0.2, 0.4, 0.7):
        ours = average_linkage_clusters(features, threshold)
        assert same_partition(ours, scipy_clusters_of_features(features, threshold)), threshold
