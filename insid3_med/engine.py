"""The INSID3 one-shot method on feature tensors (ALGORITHM.md steps 2 to 9). No file I/O, no image handling.

Shapes: C feature channels, a (h, w) patch grid, N = h * w patches. Features are L2-normalised per patch.
"plain" features are the backbone's; "debiased" ones have the positional basis projected out (step 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from insid3_med.clustering import average_linkage_clusters


class EmptyReferenceError(ValueError):
    """A reference mask holds no foreground, so there is nothing to look for."""


@dataclass(frozen=True)
class EngineParams:
    """Parameters of the method, with the published defaults.

    tau: clustering granularity; the average-linkage tree is cut at distance ``1 - tau`` (larger tau, finer parts).
    merge_threshold: a cluster joins the prediction when cross * intra * area > this.
    basis_rank: r, the number of positional directions removed; None uses the backbone's registry default. Must be
        well below C (the reference's r = 500 exceeds ViT-S's C = 384 and then removes everything).
    probe: the content-free image that reveals the positional basis: "black" (all-zero image before normalisation,
        as the reference code does) or "noise" (uniform noise, as its docstring says).
    """

    tau: float = 0.6
    merge_threshold: float = 0.2
    basis_rank: int | None = None
    probe: str = "black"

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], not {self.tau}")
        if self.probe not in ("black", "noise"):
            raise ValueError(f"probe must be 'black' or 'noise', not {self.probe!r}")
        if self.basis_rank is not None and self.basis_rank < 0:
            raise ValueError(f"basis_rank must be >= 0, not {self.basis_rank}")


def flatten_features(feature_map: torch.Tensor) -> torch.Tensor:
    """(C, h, w) -> (N, C) L2-normalised rows."""
    return F.normalize(feature_map.flatten(1).transpose(0, 1).float(), dim=1)


def positional_basis(probe_features: torch.Tensor, rank: int) -> torch.Tensor:
    """Step 2. probe_features: (N, C) normalised features of a content-free image -> U (C, rank) orthonormal.

    The patch mean is removed first, so U spans how features vary with position alone.
    """
    channels = probe_features.shape[1]
    if not 0 <= rank < channels:
        raise ValueError(f"basis rank r = {rank} must be in [0, C) with C = {channels} (r >= C removes everything)")
    centred = (probe_features - probe_features.mean(dim=0, keepdim=True)).double()
    left, _, _ = torch.linalg.svd(centred.transpose(0, 1), full_matrices=False)
    return left[:, :rank].to(probe_features.dtype)


def debias(features: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Step 3. (N, C) features, (C, r) basis -> (N, C): x - U U^T x, L2-normalised again."""
    if basis.shape[1] == 0:
        return features
    return F.normalize(features - (features @ basis) @ basis.transpose(0, 1), dim=1)


def mask_to_patch_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Step 4. (H, W) bool mask -> (h, w) bool patch mask: bilinear > 0.5, else nearest > 0.5, else the centroid."""
    if not bool(mask.any()):
        raise EmptyReferenceError("the reference mask is empty: label the structure in the reference first")
    as_float = mask.float()[None, None]
    patch = F.interpolate(as_float, size=grid, mode="bilinear", align_corners=False)[0, 0] > 0.5
    if not bool(patch.any()):
        patch = F.interpolate(as_float, size=grid, mode="nearest")[0, 0] > 0.5
    if not bool(patch.any()):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        height, width = mask.shape
        row = min(int((rows.float().mean() + 0.5) * grid[0] / height), grid[0] - 1)
        col = min(int((cols.float().mean() + 0.5) * grid[1] / width), grid[1] - 1)
        patch = torch.zeros(grid, dtype=torch.bool, device=mask.device)
        patch[row, col] = True
    return patch


@dataclass
class ReferenceShot:
    """One encoded reference: debiased features (N, C) and the patch mask (N,) bool of one structure."""

    debiased: torch.Tensor
    patch_mask: torch.Tensor


def prototype(shots: list[ReferenceShot]) -> torch.Tensor:
    """Step 5. Mean debiased foreground feature per shot, averaged over shots, normalised: q (C,)."""
    means = [shot.debiased[shot.patch_mask].mean(dim=0) for shot in shots if bool(shot.patch_mask.any())]
    if not means:
        raise EmptyReferenceError("every reference shot has an empty mask")
    return F.normalize(torch.stack(means).mean(dim=0), dim=0)


def candidates(target_debiased: torch.Tensor, query: torch.Tensor, shots: list[ReferenceShot]) -> torch.Tensor:
    """Step 6. (N,) bool: forward (q . x' > 0, or the top decile if none) AND backward (majority of shots whose
    nearest reference patch lies inside their mask)."""
    scores = target_debiased @ query
    forward = scores > 0
    if not bool(forward.any()):
        forward = scores >= torch.quantile(scores.float(), 0.9)
    votes = torch.zeros_like(forward, dtype=torch.int32)
    for shot in shots:
        nearest = (target_debiased @ shot.debiased.transpose(0, 1)).argmax(dim=1)
        votes += shot.patch_mask[nearest].int()
    backward = votes >= math.ceil(len(shots) / 2)
    return forward & backward


def cluster_prototypes(features: torch.Tensor, clusters: torch.Tensor, count: int) -> torch.Tensor:
    """(N, C) features, (N,) ids in [0, count) -> (count, C) L2-normalised cluster means."""
    sums = torch.zeros(count, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, clusters, features)
    return F.normalize(sums, dim=1)


def seed_and_merge(plain: torch.Tensor, debiased: torch.Tensor, query: torch.Tensor, clusters: torch.Tensor,
                   candidate: torch.Tensor, merge_threshold: float) -> torch.Tensor:
    """Step 8. Keep clusters whose cross * intra * area score exceeds ``merge_threshold`` -> (N,) bool."""
    if not bool(candidate.any()):
        return torch.zeros_like(candidate)
    count = int(clusters.max()) + 1
    sizes = torch.bincount(clusters, minlength=count).float()
    hits = torch.bincount(clusters[candidate], minlength=count).float()
    area = hits / sizes
    debiased_protos = cluster_prototypes(debiased, clusters, count)
    plain_protos = cluster_prototypes(plain, clusters, count)
    seed_scores = (debiased_protos @ query).masked_fill(hits == 0, -torch.inf)
    seed = int(seed_scores.argmax())
    intra = plain_protos @ plain_protos[seed]
    patch_scores = debiased @ query
    cross = torch.zeros(count, dtype=patch_scores.dtype, device=patch_scores.device)
    cross.index_add_(0, clusters, patch_scores)
    cross = cross / sizes
    area[seed] = 1.0
    keep = cross * intra * area > merge_threshold
    return keep[clusters]


def resolve_overlaps(masks: torch.Tensor, target_debiased: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(L, N) bool per-label patch masks -> (L, N) exclusive masks: a patch claimed by several labels goes to the
    label whose prototype it resembles most (debiased cosine)."""
    if masks.shape[0] < 2:
        return masks
    similarity = (queries @ target_debiased.transpose(0, 1)).masked_fill(~masks, -torch.inf)  # (L, N)
    best = similarity.argmax(dim=0)
    exclusive = torch.zeros_like(masks)
    exclusive[best, torch.arange(masks.shape[1], device=masks.device)] = True
    return exclusive & masks


def segment_patches(target_plain: torch.Tensor, target_debiased: torch.Tensor,
                    references: list[list[ReferenceShot]], params: EngineParams,
                    clusters: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 5 to 8 for L structures at once, sharing the target's clustering.

    target_plain, target_debiased: (N, C). references[l]: the shots of structure l. Returns (L, N) bool, exclusive.
    ``clusters`` (N,) may be given to reuse a clustering already computed for this target.
    """
    if clusters is None:
        clusters = average_linkage_clusters(target_plain, distance_threshold=1.0 - params.tau)
    masks, queries = [], []
    for shots in references:
        query = prototype(shots)
        candidate = candidates(target_debiased, query, shots)
        masks.append(seed_and_merge(target_plain, target_debiased, query, clusters, candidate,
                                    params.merge_threshold))
        queries.append(query)
    return resolve_overlaps(torch.stack(masks), target_debiased, torch.stack(queries))


def upsample_masks(patch_masks: torch.Tensor, grid: tuple[int, int], model_size: tuple[int, int],
                   output_size: tuple[int, int]) -> torch.Tensor:
    """Step 9. (L, N) bool patch masks -> (L, H, W) bool: bilinear to the model input size, > 0.5, then bilinear to
    the output size, > 0.5."""
    as_float = patch_masks.float().reshape(-1, 1, *grid)
    model = F.interpolate(as_float, size=model_size, mode="bilinear", align_corners=False) > 0.5
    if tuple(model_size) == tuple(output_size):
        return model[:, 0]
    out = F.interpolate(model.float(), size=output_size, mode="bilinear", align_corners=False) > 0.5
    return out[:, 0]


def labels_from_masks(masks: torch.Tensor, label_values: list[int]) -> torch.Tensor:
    """(L, H, W) bool -> (H, W) int64 label map; where upsampled masks overlap, the first label wins."""
    labels = torch.zeros(masks.shape[1:], dtype=torch.int64, device=masks.device)
    for index in range(masks.shape[0] - 1, -1, -1):
        labels[masks[index]] = label_values[index]
    return labels
