"""The method on synthetic feature maps with a known answer (no backbone)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from insid3_med.engine import (
    EmptyReferenceError,
    EngineParams,
    ReferenceShot,
    candidates,
    debias,
    mask_to_patch_grid,
    positional_basis,
    prototype,
    segment_patches,
    upsample_masks,
)

C = 32


def planted_features(regions: torch.Tensor, directions: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """(h, w) region ids and (R, C) unit directions -> (h * w, C) normalised features near each region's direction."""
    generator = torch.Generator().manual_seed(seed)
    base = directions[regions.flatten()]
    return F.normalize(base + noise * torch.randn(base.shape, generator=generator), dim=1)


@pytest.fixture()
def directions() -> torch.Tensor:
    return F.normalize(torch.randn(4, C, generator=torch.Generator().manual_seed(0)), dim=1)


def square(grid: int, top: int, left: int, size: int, value: int = 1) -> torch.Tensor:
    regions = torch.zeros(grid, grid, dtype=torch.long)
    regions[top : top + size, left : left + size] = value
    return regions


def test_planted_structure_is_found_wherever_it_moves(directions: torch.Tensor) -> None:
    reference = square(16, 2, 3, 5)
    target = square(16, 9, 8, 6)
    ref_features = planted_features(reference, directions, 0.05, 1)
    tgt_features = planted_features(target, directions, 0.05, 2)
    shots = [[ReferenceShot(ref_features, reference.flatten() == 1)]]
    masks = segment_patches(tgt_features, tgt_features, shots, EngineParams())
    assert masks.shape == (1, 256)
    assert torch.equal(masks[0], target.flatten() == 1)


def test_two_structures_give_two_exclusive_masks(directions: torch.Tensor) -> None:
    reference = square(16, 1, 1, 4, 1) + square(16, 10, 10, 4, 2)
    target = square(16, 3, 9, 5, 1) + square(16, 11, 2, 3, 2)
    ref_features = planted_features(reference, directions, 0.05, 3)
    tgt_features = planted_features(target, directions, 0.05, 4)
    shots = [[ReferenceShot(ref_features, reference.flatten() == v)] for v in (1, 2)]
    masks = segment_patches(tgt_features, tgt_features, shots, EngineParams())
    assert torch.equal(masks[0], target.flatten() == 1)
    assert torch.equal(masks[1], target.flatten() == 2)
    assert not bool((masks[0] & masks[1]).any())


def test_absent_structure_gives_an_empty_mask(directions: torch.Tensor) -> None:
    reference = square(8, 2, 2, 3, 1)
    target = square(8, 0, 0, 8, 2)  # only a structure the reference never marked
    ref_features = planted_features(reference, directions, 0.02, 5)
    tgt_features = planted_features(target, directions, 0.02, 6)
    masks = segment_patches(tgt_features, tgt_features, [[ReferenceShot(ref_features, reference.flatten() == 1)]],
                            EngineParams())
    assert not bool(masks.any())


def test_multi_shot_backward_vote_needs_a_majority(directions: torch.Tensor) -> None:
    target = square(8, 2, 2, 4, 1)
    tgt = planted_features(target, directions, 0.02, 7)
    good = ReferenceShot(planted_features(square(8, 0, 0, 3, 1), directions, 0.02, 8), square(8, 0, 0, 3).flatten() > 0)
    wrong = ReferenceShot(planted_features(square(8, 0, 0, 3, 1), directions, 0.02, 9),
                          square(8, 5, 5, 3).flatten() > 0)  # a mask over background
    query = prototype([good])
    assert torch.equal(candidates(tgt, query, [good]), target.flatten() == 1)
    assert not bool(candidates(tgt, query, [wrong]).any())
    assert torch.equal(candidates(tgt, query, [good, wrong]), target.flatten() == 1)  # ceil(2/2) = 1 vote suffices
    assert not bool(candidates(tgt, query, [good, wrong, wrong]).any())  # 1 of 3 is not a majority


def test_positional_basis_is_removed_by_debias() -> None:
    generator = torch.Generator().manual_seed(0)
    probe = F.normalize(torch.randn(100, C, generator=generator), dim=1)
    basis = positional_basis(probe, 5)
    assert basis.shape == (C, 5)
    torch.testing.assert_close(basis.T @ basis, torch.eye(5), atol=1e-5, rtol=0)
    features = F.normalize(torch.randn(20, C, generator=generator), dim=1)
    cleaned = debias(features, basis)
    assert float((cleaned @ basis).abs().max()) < 1e-5
    torch.testing.assert_close(cleaned.norm(dim=1), torch.ones(20))
    with pytest.raises(ValueError, match="r >= C removes everything"):
        positional_basis(probe, C)


def test_empty_reference_mask_is_a_clear_error() -> None:
    with pytest.raises(EmptyReferenceError, match="empty"):
        mask_to_patch_grid(torch.zeros(64, 64, dtype=torch.bool), (8, 8))


def test_one_pixel_reference_mask_uses_the_centroid_patch() -> None:
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[37, 13] = True
    patch = mask_to_patch_grid(mask, (8, 8))
    assert int(patch.sum()) == 1 and bool(patch[4, 1])


def test_large_reference_mask_maps_bilinearly() -> None:
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:48, 8:40] = True
    assert torch.equal(mask_to_patch_grid(mask, (8, 8)), mask[4::8, 4::8])


def test_upsampling_returns_to_the_original_size() -> None:
    patches = torch.zeros(1, 16, dtype=torch.bool)
    patches[0, 5] = True  # grid (4, 4): row 1, col 1
    masks = upsample_masks(patches, (4, 4), (56, 56), (100, 80))
    assert masks.shape == (1, 100, 80)
    rows, cols = torch.nonzero(masks[0], as_tuple=True)
    assert 25 <= int(rows.float().mean()) <= 45 and 20 <= int(cols.float().mean()) <= 40


def test_parameters_are_validated() -> None:
    with pytest.raises(ValueError):
        EngineParams(tau=0.0)
    with pytest.raises(ValueError):
        EngineParams(probe="grey")
