"""Agglomerative clustering with average linkage, cut at a distance threshold (step 7 of the method).

The partition equals ``scipy.cluster.hierarchy.fcluster(linkage(condensed, "average"), t, "distance")`` (up to
exact ties): the flat clusters are the subtrees of the average-linkage dendrogram whose merge heights are <= t.

How it is computed (exact, vectorised torch, any device; float64 by default):
- Average linkage is *reducible*: merging clusters a and b never brings the merged cluster closer to any k than
  min(d(a, k), d(b, k)). Hence every pair of reciprocal nearest neighbours is a merge of the sequential
  algorithm, and all such pairs at height <= t can be merged at once, round after round, giving the same
  dendrogram below t (the argument behind the NN-chain algorithm). Exact ties are matched so that a group of
  tied clusters halves each round; identical feature rows are merged up front (distance 0).
- The average distances between clusters are kept in one dense matrix, updated in place by the Lance-Williams
  rule of average linkage, d(a+b, k) = (n_a d(a, k) + n_b d(b, k)) / (n_a + n_b), for all pairs of a round.
- Each row caches its nearest neighbour and a lower bound on the others; by reducibility only rows whose
  neighbour merged may need a new scan.
- A cluster farther than t from all others never merges again (every later distance to it is a weighted mean of
  distances > t): it is retired, and the matrix is compacted as clusters disappear.
Cost: one N x N float64 matrix (128 MiB at N = 4096), a Gram product on half of it, then O(N^2) memory traffic
over typically a few tens of rounds (one merge per round in the worst case, e.g. points on a line with growing
gaps). On the CPU all but the Gram product run on one thread (see ``_single_threaded``). The rounds run on the CPU
by default even for GPU features, where they are latency-bound (``resolve_merge_device``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = ["average_linkage_clusters", "average_linkage_clusters_from_distances", "cosine_distance_matrix",
           "resolve_merge_device"]

# Compact the working matrix once the clusters still able to merge fall below this fraction of its side.
_COMPACT_FRACTION = 0.75
# Merged clusters whose new columns are written in one call (a column write costs about one pass per row).
_COLUMN_GROUP = 1024
# Rows per product of the upper block triangle of the Gram matrix, and side of the tiles mirrored in cache.
_GRAM_ROWS = 256
_TILE = 256
# Gram products with at least this many N * N * C multiply-adds use the caller's threads; smaller ones gain too
# little from threads for the cost of waking them on a busy CPU.
_PARALLEL_GRAM_MACS = 1 << 32
# Relative tolerance of the symmetry check on user-given distance matrices.
_SYMMETRY_RTOL = 1e-6


_thread_lock = threading.Lock()
_single_threaded_depth = 0
_saved_threads = 1


@contextlib.contextmanager
def _single_threaded(device: torch.device) -> Iterator[None]:
    """Run torch CPU ops on one thread inside the block (restored after, safe under concurrent callers).

    The clustering is mostly small memory-bound operations: a second thread gains little, while on a CPU shared
    with other work each parallel region waits for descheduled threads (measured 5 to 15 times slower on 2 busy
    cores). Only the Gram product gets the caller's threads back (``_caller_threads``).
    """
    global _single_threaded_depth, _saved_threads
    if device.type != "cpu":
        yield
        return
    with _thread_lock:
        if _single_threaded_depth == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _single_threaded_depth += 1
    try:
        yield
    finally:
        with _thread_lock:
            _single_threaded_depth -= 1
            if _single_threaded_depth == 0:
                torch.set_num_threads(_saved_threads)


@contextlib.contextmanager
def _caller_threads(enabled: bool = True) -> Iterator[None]:
    """Inside ``_single_threaded``: give the block the caller's thread count back (for large BLAS products)."""
    with _thread_lock:
        threads = _saved_threads if enabled and _single_threaded_depth > 0 else 1
    if threads > 1:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(1)


class ClusteringInputError(ValueError):
    """The features or distances given to the clustering are malformed."""


def _working_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ClusteringInputError(f"clustering dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if tensor.device.type == "mps":  # no float64 there
        return torch.float32
    return torch.float64


def _unit_rows(features: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """(N, C) features -> rows divided by their L2 norm, in the working dtype."""
    x = features.to(_working_dtype(features, dtype))
    norms = torch.linalg.vector_norm(x, dim=1)
    zero = torch.nonzero(norms == 0)
    if zero.numel():
        raise ClusteringInputError(
            f"feature row {int(zero[0, 0])} is all zeros: its cosine distance to other rows is undefined"
        )
    return x / norms.unsqueeze(1)


def _distances_of_unit_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C) unit rows -> (N, N) 1 - clamp(x x^T, -1, 1), exactly symmetric, zero diagonal.

    Only the upper block triangle is multiplied; then, tile by tile while the tile is in cache, the cosine is
    turned into a distance and mirrored into the lower triangle.
    """
    n = x.shape[0]
    out = torch.empty((n, n), dtype=x.dtype, device=x.device)
    rows = max(_GRAM_ROWS, -(-n // 8))
    negated = -x
    with _caller_threads(n * n * x.shape[1] >= _PARALLEL_GRAM_MACS):
        for start in range(0, n, rows):
            torch.mm(x[start : start + rows], negated[start:].T, out=out[start : start + rows, start:])
    tile = _TILE if x.device.type == "cpu" else n
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            block = out[i : i + tile, j : j + tile]
            block.add_(1.0).clamp_(0.0, 2.0)  # 1 - clamp(cosine, -1, 1)
            if j == i:
                block.copy_(torch.triu(block) + torch.triu(block, diagonal=1).T)
            else:
                out[j : j + tile, i : i + tile] = block.T
    out.fill_diagonal_(0.0)
    return out


def cosine_distance_matrix(features: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Distances 1 - cosine between feature rows, cosine clamped to [-1, 1].

    features: (N, C), rows of any non-zero norm. Returns (N, N) in ``dtype`` (default float64; float32 on MPS),
    exactly symmetric, with a zero diagonal, on the features' device.
    """
    with _single_threaded(features.device if isinstance(features, torch.Tensor) else torch.device("cpu")):
        _check_features(features)
        return _distances_of_unit_rows(_unit_rows(features, dtype))


def _check_features(features: torch.Tensor) -> None:
    if not isinstance(features, torch.Tensor):
        raise ClusteringInputError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.ndim != 2:
        raise ClusteringInputError(f"features must be (N, C), got shape {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ClusteringInputError("features hold no rows (N = 0): nothing to cluster")
    if features.shape[1] == 0:
        raise ClusteringInputError("features have no channels (C = 0)")
    if not features.dtype.is_floating_point:
        raise ClusteringInputError(f"features must be floating point, got {features.dtype}")
    if not bool(torch.isfinite(features).all()):
        raise ClusteringInputError("features contain NaN or infinite values")


def _check_threshold(distance_threshold: float) -> float:
    t = float(distance_threshold)
    if t != t:  # NaN
        raise ClusteringInputError("distance_threshold is NaN")
    return t


def _unique_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Exact duplicate rows of x (N, C): (unique rows (M, C), inverse (N,), counts (M,)), or None if none.

    A projection on a fixed vector screens for duplicates first, so the sort of whole rows runs only when
    some projections coincide.
    """
    probe = torch.cos(torch.arange(x.shape[1], device=x.device, dtype=x.dtype) * 1.6180339887498949 + 0.5)
    if torch.unique(x @ probe).numel() == x.shape[0]:
        return None
    unique, inverse, counts = torch.unique(x, dim=0, return_inverse=True, return_counts=True)
    if unique.shape[0] == x.shape[0]:
        return None
    return unique, inverse, counts


def average_linkage_clusters(
    features: torch.Tensor, distance_threshold: float = 0.4, *, dtype: torch.dtype | None = None,
    merge_device: str | torch.device | None = None,
) -> torch.Tensor:
    """Average-linkage clusters of feature vectors under distance 1 - cosine, cut at ``distance_threshold``.

    features: (N, C) L2-normalised rows (any float dtype, any device; rows are renormalised in the working
    precision so that the distance is exactly 1 - cosine). distance_threshold: merges at heights <= it are kept
    (scipy's ``fcluster(..., criterion="distance")``). dtype: working precision (default float64, the exact
    choice; float32 halves memory and time, ties at the 1e-7 level may then resolve differently). merge_device:
    where the merge rounds run (default: see ``resolve_merge_device``); the distances are computed on the
    features' device either way. Returns (N,) int64 cluster ids numbered 0..K-1 in order of first appearance, on
    the features' device.
    """
    t = _check_threshold(distance_threshold)
    with _single_threaded(features.device if isinstance(features, torch.Tensor) else torch.device("cpu")):
        return _clusters_of_features(features, t, dtype, merge_device)


def resolve_merge_device(data_device: torch.device, merge_device: str | torch.device | None = None) -> torch.device:
    """Where the merge rounds run: ``merge_device`` if given, else the CPU.

    The rounds are latency-bound: each is a few dozen small operations and a few host synchronisations on an
    N x N matrix. The clustering stage of a random-weight DINOv3 ViT-S/16 episode at 512 px (N = 1024; 139
    rounds) took 0.26 to 0.32 s on an H200, about 2 ms a round, and 0.08 s on 2 CPU cores for the same features;
    at 1024 px (N = 4096) the GPU took 0.66 to 0.76 s and the CPU 0.55 s (``reports/performance/README.md``).
    So a GPU input has its distances computed on the GPU, then merged on the CPU. ``data_device``: the input's
    device (a ``merge_device`` of its type without an index means that very device).
    """
    if merge_device is None:
        return torch.device("cpu")
    where = torch.device(merge_device)
    if where.type == data_device.type and where.index is None:
        return data_device
    return where


def _clusters_of_features(features: torch.Tensor, t: float, dtype: torch.dtype | None,
                          merge_device: str | torch.device | None = None) -> torch.Tensor:
    _check_features(features)
    n = features.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.int64, device=features.device)
    x = _unit_rows(features, dtype)
    # Identical rows are at distance 0: they merge first, at height 0 (<= t when t >= 0). Clustering each
    # distinct row once, weighted by its count, gives the same dendrogram above height 0.
    duplicates = _unique_rows(x) if t >= 0 else None
    if duplicates is None:
        return _cluster_in_place(_distances_of_unit_rows(x), t, merge_device=merge_device)
    unique, inverse, counts = duplicates
    if unique.shape[0] == 1:
        return torch.zeros(n, dtype=torch.int64, device=features.device)
    unique_labels = _cluster_in_place(_distances_of_unit_rows(unique), t, counts.to(unique.dtype),
                                      merge_device=merge_device)
    return _labels_in_order_of_appearance(unique_labels[inverse])


def average_linkage_clusters_from_distances(
    distances: torch.Tensor, distance_threshold: float, *, dtype: torch.dtype | None = None,
    merge_device: str | torch.device | None = None,
) -> torch.Tensor:
    """Average-linkage clusters from a full distance matrix, cut at ``distance_threshold``.

    distances: (N, N) symmetric (to a relative 1e-6; its upper triangle is used), zero diagonal, finite (any
    float dtype, any device; not modified). merge_device: as for ``average_linkage_clusters``. Returns (N,)
    int64 cluster ids numbered 0..K-1 in order of first appearance, on the same device.
    """
    if not isinstance(distances, torch.Tensor):
        raise ClusteringInputError(f"distances must be a torch.Tensor, got {type(distances).__name__}")
    if distances.ndim != 2 or distances.shape[0] != distances.shape[1]:
        raise ClusteringInputError(f"distances must be a square (N, N) matrix, got {tuple(distances.shape)}")
    if distances.shape[0] == 0:
        raise ClusteringInputError("distances matrix is empty (N = 0): nothing to cluster")
    if not distances.dtype.is_floating_point:
        raise ClusteringInputError(f"distances must be floating point, got {distances.dtype}")
    t = _check_threshold(distance_threshold)
    with _single_threaded(distances.device):
        return _clusters_of_distances(distances, t, dtype, merge_device)


def _clusters_of_distances(distances: torch.Tensor, t: float, dtype: torch.dtype | None,
                           merge_device: str | torch.device | None = None) -> torch.Tensor:
    d = distances.to(_working_dtype(distances, dtype))
    if not bool(torch.isfinite(d).all()):
        raise ClusteringInputError("distances contain NaN or infinite values")
    tol = _SYMMETRY_RTOL * max(float(d.abs().max()), 1.0)
    if float((d - d.T).abs().max()) > tol:
        raise ClusteringInputError("distances matrix is not symmetric")
    if float(d.diagonal().abs().max()) > tol:
        raise ClusteringInputError("distances matrix has a non-zero diagonal")
    if d.shape[0] == 1:
        return torch.zeros(1, dtype=torch.int64, device=distances.device)
    work = torch.triu(d, diagonal=1)  # a fresh copy, made exactly symmetric below
    work += work.T.clone()
    return _cluster_in_place(work, t, merge_device=merge_device)


def _labels_in_order_of_appearance(root: torch.Tensor) -> torch.Tensor:
    """(N,) representative ids -> (N,) int64 ids 0..K-1 numbered by first appearance."""
    n = root.shape[0]
    _, inverse = torch.unique(root, return_inverse=True)
    k = int(inverse.max()) + 1
    positions = torch.arange(n, device=root.device)
    first = torch.full((k,), n, dtype=torch.int64, device=root.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    rank = torch.empty(k, dtype=torch.int64, device=root.device)
    rank[torch.argsort(first)] = torch.arange(k, device=root.device)
    return rank[inverse]


def _chunk_rows(side: int, device: torch.device) -> int:
    """Rows per chunk of temporaries: about 256 Ki elements on CPU (cache-sized, reused), more on GPUs."""
    budget = 1 << 18 if device.type == "cpu" else 1 << 24
    return max(1, budget // max(side, 1))


def _take_columns(matrix: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """matrix[:, columns] for a (R, S) matrix and (K,) int64 columns, as a new (R, K) tensor.

    ``torch.gather`` with a broadcast index is several times faster than ``index_select`` on dim 1 on CPUs.
    """
    return torch.gather(matrix, 1, columns.expand(matrix.shape[0], -1))


def _scan_rows(
    dist: torch.Tensor, rows: torch.Tensor | None, closed: torch.Tensor | None, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest neighbour of ``rows`` of ``dist`` (all rows if None) over the open columns.

    closed: (S,) 0 for open columns, inf for closed ones (None: all open). Returns (nearest distance, nearest
    column, second-nearest distance), each (len(rows),). Among tied nearest columns the first one after the row
    in cyclic order is chosen, so that a group of tied clusters points round a cycle, not all at one cluster.
    """
    side = dist.shape[1]
    device = dist.device
    inf = float("inf")
    n_rows = dist.shape[0] if rows is None else rows.numel()
    nearest = torch.empty(n_rows, dtype=dist.dtype, device=device)
    second = torch.empty(n_rows, dtype=dist.dtype, device=device)
    column = torch.empty(n_rows, dtype=torch.int64, device=device)
    positions = torch.arange(side, device=device)
    for lo in range(0, n_rows, chunk):
        hi = min(lo + chunk, n_rows)
        if rows is None:
            part = dist[lo:hi]  # a view: the masked minimum is put back below
            row_ids = positions[lo:hi]
        else:
            part = dist.index_select(0, rows[lo:hi])
            row_ids = rows[lo:hi]
        if closed is not None:
            part.add_(closed)
        near, col = part.min(dim=1)
        part.scatter_(1, col.unsqueeze(1), inf)
        torch.amin(part, dim=1, out=second[lo:hi])
        part.scatter_(1, col.unsqueeze(1), near.unsqueeze(1))
        tied = (second[lo:hi] == near) & torch.isfinite(near)
        if bool(tied.any()):
            which = torch.nonzero(tied).squeeze(1)
            candidates = part.index_select(0, which) == near[which].unsqueeze(1)
            after = candidates & (positions > row_ids[which].unsqueeze(1))
            first_after = torch.where(after, positions, side).amin(dim=1)
            first_any = torch.where(candidates, positions, side).amin(dim=1)
            col[which] = torch.where(first_after < side, first_after, first_any)
        nearest[lo:hi] = near
        column[lo:hi] = col
    return nearest, column, second


def _choose_pairs(
    nn: torch.Tensor, nn_dist: torch.Tensor, live: torch.Tensor, round_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint pairs (a, b) of clusters that are each other's nearest neighbours, to merge in one round.

    Reciprocal nearest neighbours first; then, among the rest, pairs (i, nn[i]) where i is also among the
    nearest of nn[i] (an exact tie), matched by a deterministic coin (heads propose to tails, each tails keeps
    its lowest proposer) so that groups of tied clusters shrink geometrically instead of one merge per round.
    """
    side = nn.numel()
    device = nn.device
    rows = torch.arange(side, device=device)
    mutual = live & (nn[nn] == rows) & (rows < nn)
    a = rows[mutual]
    b = nn[a]
    matched = torch.zeros(side, dtype=torch.bool, device=device)
    matched[a] = True
    matched[b] = True
    tied = live & ~matched & ~matched[nn] & (nn_dist[nn] == nn_dist)
    if bool(tied.any()):
        coin = ((rows * 2654435761 + round_index * 40503) >> 16) & 1
        proposing = tied & (coin == 1) & (coin[nn] == 0)
        lowest = torch.full((side,), side, dtype=torch.int64, device=device)
        lowest.scatter_reduce_(0, nn[proposing], rows[proposing], reduce="amin")
        accepted = proposing & (lowest[nn] == rows)
        a = torch.cat([a, rows[accepted]])
        b = torch.cat([b, nn[accepted]])
    if a.numel() == 0 and bool(live.any()):
        # Cannot happen with exact nearest neighbours; a guard against a silent loop: the globally closest pair
        # is always a merge of the sequential algorithm.
        first = int(torch.argmin(torch.where(live, nn_dist, float("inf"))))
        a = torch.tensor([first], device=device)
        b = nn[a]
    return a, b


def _merge_pairs(
    dist: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    wa: torch.Tensor,
    wb: torch.Tensor,
    workspace: torch.Tensor,
    chunk: int,
) -> None:
    """Merge cluster b[i] into a[i] for every i, in place (Lance-Williams rule of average linkage).

    dist: (S, S) symmetric; a, b: (P,) row indices, all distinct; wa, wb: (P,) weights n_a / n_c, n_b / n_c;
    workspace: at least S * min(P, group) values. Afterwards rows and columns a hold d(a + b, .) (exactly
    symmetric); rows and columns b hold stale values that the caller must ignore.

    Pairs go in groups whose new columns are written in one call (a column write costs about one pass over the
    rows it touches). Rows of a later group read columns of an earlier group that are already rewritten,
    d(c_j, a_i) and d(c_j, b_i), so the rule gives d(c_i, c_j) there directly; columns of the same or a later
    group are combined from d(c_i, a_j) and d(c_i, b_j).
    """
    side = dist.shape[0]
    n_pairs = a.numel()
    group = max(1, min(n_pairs, workspace.numel() // side))
    for g_lo in range(0, n_pairs, group):
        g_hi = min(g_lo + group, n_pairs)
        cols = workspace[: side * (g_hi - g_lo)].view(side, g_hi - g_lo)  # the new columns of this group
        for lo in range(g_lo, g_hi, chunk):
            hi = min(lo + chunk, g_hi)
            merged = dist.index_select(0, a[lo:hi]).mul_(wa[lo:hi].unsqueeze(1))
            merged.addcmul_(dist.index_select(0, b[lo:hi]), wb[lo:hi].unsqueeze(1))
            dist.index_copy_(0, a[lo:hi], merged)
            cols[:, lo - g_lo : hi - g_lo] = merged.T
        a_g, b_g = a[g_lo:g_hi], b[g_lo:g_hi]
        # block[j, i] = d(c_i, c_j) = wa_j d(c_i, a_j) + wb_j d(c_i, b_j) within the group.
        block = cols.index_select(0, a_g).mul_(wa[g_lo:g_hi].unsqueeze(1))
        block.addcmul_(cols.index_select(0, b_g), wb[g_lo:g_hi].unsqueeze(1))
        block = (block + block.T) * 0.5  # exactly symmetric
        block.fill_diagonal_(float("inf"))
        cols.index_copy_(0, a_g, block)
        dist.index_copy_(1, a_g, cols)


def _compact_in_place(flat: torch.Tensor, side: int, keep: torch.Tensor, chunk: int) -> torch.Tensor:
    """Keep rows and columns ``keep`` (ascending) of the (side, side) matrix stored at the start of ``flat``.

    The (m, m) result is written over the same storage, chunk by chunk: the rows written by one chunk end at
    position hi * m <= keep[hi] * side, where the rows still to be read begin. Returns the (m, m) view.
    """
    m = keep.numel()
    old = flat[: side * side].view(side, side)
    for lo in range(0, m, chunk):
        hi = min(lo + chunk, m)
        rows = old.index_select(0, keep[lo:hi])
        torch.gather(rows, 1, keep.expand(hi - lo, -1), out=flat[lo * m : hi * m].view(hi - lo, m))
    return flat[: m * m].view(m, m)


def _cluster_in_place(dist: torch.Tensor, t: float, size: torch.Tensor | None = None, *,
                      merge_device: str | torch.device | None = None) -> torch.Tensor:
    """``_merge_rounds`` on ``resolve_merge_device``; the (N,) ids come back on ``dist``'s device."""
    where = resolve_merge_device(dist.device, merge_device)
    if where == dist.device:
        return _merge_rounds(dist, t, size)
    with _single_threaded(where):
        labels = _merge_rounds(dist.to(where), t, None if size is None else size.to(where))
    return labels.to(dist.device)


def _merge_rounds(dist: torch.Tensor, t: float, size: torch.Tensor | None = None) -> torch.Tensor:
    """Average-linkage clusters cut at t from a working distance matrix.

    dist: (N, N) contiguous, exactly symmetric, N >= 2; its storage is reused (overwritten). size: (N,) initial
    cluster sizes (weights; default ones). Returns (N,) int64 ids numbered by first appearance.

    Each row caches its nearest neighbour and ``second``, a lower bound on its distance to every other cluster
    (the second-nearest distance at its last scan). By reducibility no merge brings a cluster below either, so
    when a row's nearest neighbour merges into c and d(row, c) < second, c is its new nearest neighbour without
    a scan. Rows that can no longer merge and rows of absorbed clusters are dropped by compaction.
    """
    n = dist.shape[0]
    device = dist.device
    inf = float("inf")
    if not dist.is_contiguous():
        raise RuntimeError("average linkage: the working distance matrix must be contiguous")
    flat = dist.view(-1)
    dist.fill_diagonal_(inf)
    # parent[i]: the original index of the cluster that cluster i merged into (a forest resolved at the end).
    parent = torch.arange(n, device=device)
    # Rows of the working matrix <-> clusters: gid[r] is the original index that represents row r.
    gid = torch.arange(n, device=device)
    size = torch.ones(n, dtype=dist.dtype, device=device) if size is None else size.to(dist)
    closed = torch.zeros(n, dtype=dist.dtype, device=device)  # inf on the columns of absorbed clusters
    nn_dist, nn, second = _scan_rows(dist, None, None, _chunk_rows(n, device))
    # Live rows can still merge. A cluster farther than t from all others never merges again: every later
    # distance to it is a weighted mean of distances > t.
    live = nn_dist <= t
    workspace = torch.empty(n * min(n, _COLUMN_GROUP), dtype=dist.dtype, device=device)
    side = n
    round_index = 0
    while True:
        n_live = int(live.sum())
        if n_live < 2:
            break
        if n_live < _COMPACT_FRACTION * side:
            # Every live row's nearest neighbour is live (it lies within t), so the remapping is complete.
            keep = torch.nonzero(live).squeeze(1)
            dist = _compact_in_place(flat, side, keep, _chunk_rows(side, device))
            new_index = torch.full((side,), -1, dtype=torch.int64, device=device)
            new_index[keep] = torch.arange(n_live, device=device)
            nn, nn_dist, second = new_index[nn[keep]], nn_dist[keep], second[keep]
            gid, size = gid[keep], size[keep]
            closed = torch.zeros(n_live, dtype=dist.dtype, device=device)
            live = torch.ones(n_live, dtype=torch.bool, device=device)
            side = n_live
        chunk = _chunk_rows(side, device)
        a, b = _choose_pairs(nn, nn_dist, live, round_index)
        size_c = size[a] + size[b]
        _merge_pairs(dist, a, b, size[a] / size_c, size[b] / size_c, workspace, chunk)
        closed[b] = inf
        size[a] = size_c
        parent[gid[b]] = gid[a]
        live[b] = False
        nn_dist[b] = inf
        # Rows whose nearest neighbour merged into c: c is the new nearest if d(row, c) < second; the merged
        # clusters and the other such rows are scanned.
        rows = torch.arange(side, device=device)
        slot = rows.clone()
        slot[b] = a
        in_pair = torch.zeros(side, dtype=torch.bool, device=device)
        in_pair[a] = True
        in_pair[b] = True
        follows = live & in_pair[nn]
        follows[a] = False
        followers = rows[follows]
        merged_into = slot[nn[followers]]
        new_dist = dist[followers, merged_into]
        settled = new_dist < second[followers]
        nn[followers[settled]] = merged_into[settled]
        nn_dist[followers[settled]] = new_dist[settled]
        rescan = torch.cat([a, followers[~settled]])
        rescan_dist, rescan_nn, rescan_second = _scan_rows(dist, rescan, closed, chunk)
        nn_dist[rescan] = rescan_dist
        nn[rescan] = rescan_nn
        second[rescan] = rescan_second
        live &= nn_dist <= t
        round_index += 1
    # Resolve the merge forest by pointer jumping.
    while True:
        grand = parent[parent]
        if torch.equal(grand, parent):
            break
        parent = grand
    return _labels_in_order_of_appearance(parent)
