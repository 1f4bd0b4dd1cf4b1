"""The pipeline on a CUDA GPU gives what it gives on the CPU (skipped where no GPU is visible, as in CI).

Run on a GPU machine with ``pytest tests/test_cuda.py``. The volume checks use the grey-level stand-in backbone of
``test_volume`` (its features are exact on both devices, so any difference comes from the pipeline's own GPU code);
the backbone checks use a DINOv3 ViT-S/16 with seeded random weights through the real ``Backbone`` facade.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_volume import GreyLevelBackbone, dice, drifting_pair, only_slice, synthetic_study

from insid3_med.backbones import BACKBONES, Backbone, DINOv3ViT
from insid3_med.predictor import OneShotSegmenter
from insid3_med.propagation import PropagationParams
from insid3_med.volume import propagate_through_slices, transfer_to_study

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class GreyLevelOnDevice(GreyLevelBackbone):
    """The grey-level stand-in, run on ``device``: features come back on that device, as the real facade's do."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)

    def encode(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        return super().encode(images.to(self.device, torch.float32), batch_size)


def both_devices(run) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    return run(GreyLevelOnDevice("cpu")), run(GreyLevelOnDevice("cuda"))


def test_volume_propagation_on_cuda_matches_the_cpu() -> None:
    volume, truth = synthetic_study()
    on_cpu, on_gpu = both_devices(lambda backbone: propagate_through_slices(
        SimpleNamespace(backbone=backbone), volume, only_slice(truth, 5), axis="k"))  # type: ignore[arg-type]
    assert on_gpu.dtype == np.int64 and on_gpu.shape == truth.shape
    assert dice(on_cpu == 1, truth == 1) > 0.8
    assert dice(on_gpu == 1, on_cpu == 1) > 0.99


def test_a_joint_chain_with_hand_offs_on_cuda_matches_the_cpu() -> None:
    volume, truth = drifting_pair()
    labelled = int(np.argmax((truth > 0).sum(axis=(1, 2))))
    on_cpu, on_gpu = both_devices(lambda backbone: propagate_through_slices(
        SimpleNamespace(backbone=backbone), volume, only_slice(truth, labelled), axis="k"))  # type: ignore[arg-type]
    for label in (1, 2):
        assert dice(on_gpu == label, on_cpu == label) > 0.99


def test_a_transfer_on_cuda_matches_the_cpu() -> None:
    reference, reference_truth = synthetic_study()
    target, target_truth = synthetic_study(shift=(1, 3, -4), seed=1)
    on_cpu, on_gpu = both_devices(lambda backbone: transfer_to_study(
        SimpleNamespace(backbone=backbone), reference, only_slice(reference_truth, 5), target,  # type: ignore[arg-type]
        axis="k", params=PropagationParams()))
    assert dice(on_cpu == 1, target_truth == 1) > 0.8
    assert dice(on_gpu == 1, on_cpu == 1) > 0.99


def random_backbone(device: str, precision: str) -> Backbone:
    torch.manual_seed(0)
    spec = BACKBONES["dinov3_vits16"]
    return Backbone(DINOv3ViT(spec), spec, location="random", device=torch.device(device), precision=precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dinov3_features_on_cuda_match_the_cpu(precision: str) -> None:
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    on_cpu = random_backbone("cpu", precision).encode(images)
    on_gpu = random_backbone("cuda", precision).encode(images)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32 and on_gpu.shape == (2, 384, 14, 14)
    cosine = torch.nn.functional.cosine_similarity(on_gpu.cpu(), on_cpu, dim=1)
    assert float(cosine.min()) > (0.999 if precision == "fp32" else 0.98)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_2d_episode_on_cuda_gives_a_cpu_mask(precision: str) -> None:
    rows, cols = np.mgrid[:96, :96]
    image = np.where((rows - 48) ** 2 + (cols - 40) ** 2 < 400, 200, 40).astype(np.uint8)
    masks = []
    for device in ("cpu", "cuda"):
        segmenter = OneShotSegmenter(random_backbone(device, precision), image_size=224)
        segmenter.set_reference(image, image > 100)
        masks.append(segmenter.segment(image))
    on_cpu, on_gpu = masks
    assert isinstance(on_gpu, np.ndarray) and on_gpu.shape == image.shape
    assert dice(on_gpu > 0, on_cpu > 0) > 0.9
