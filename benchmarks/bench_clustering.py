"""Speed of the average-linkage clustering (step 7) against scipy and scikit-learn, and their agreement.

    python benchmarks/bench_clustering.py [--sizes 1024 4096] [--channels 384] [--threshold 0.4]
                                          [--repeats 3] [--threads N] [--source synthetic|standin]

For each N it times, best of ``--repeats`` (wall clock, seconds):
- scipy: ``pdist(x, "cosine")`` + ``linkage(method="average")`` + ``fcluster(t, criterion="distance")`` (float64);
- sklearn: the reference code's route, a float64 N x N cosine-distance matrix (numpy) +
  ``AgglomerativeClustering(metric="precomputed", linkage="average", distance_threshold=t)`` (if installed);
- ours: ``average_linkage_clusters`` from the features (float64, the default), and with ``dtype=float32``;
and checks that each partition equals scipy's.

Features: ``synthetic`` (default) draws unit vectors around random directions with cluster-specific spreads (a
mixture of tight and loose groups, like ViT patch features); ``standin`` encodes a real dermoscopy image
(../shared/data/ph2) with the DINOv2 ViT-S/14 stand-in (../shared/weights/dinov2-small-standin) at the side
giving N patches (needs transformers; N must be a square).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from insid3_med.clustering import average_linkage_clusters

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


def synthetic_features(n: int, channels: int, seed: int = 0) -> torch.Tensor:
    """(n, channels) float32 unit rows: 70% in tight groups, 30% in loose ones."""
    generator = torch.Generator().manual_seed(seed)
    n_tight = int(0.7 * n)
    parts = []
    for count, n_groups, spread in ((n_tight, max(2, n // 40), 0.5), (n - n_tight, max(2, n // 16), 1.5)):
        centres = torch.nn.functional.normalize(torch.randn(n_groups, channels, generator=generator), dim=1)
        scales = spread * (0.5 + torch.rand(n_groups, generator=generator))
        which = torch.randint(0, n_groups, (count,), generator=generator)
        noise = torch.randn(count, channels, generator=generator) / math.sqrt(channels)
        parts.append(centres[which] + scales[which, None] * noise)
    features = torch.cat(parts)[torch.randperm(n, generator=generator)]
    return torch.nn.functional.normalize(features, dim=1)


def standin_features(n: int) -> torch.Tensor:
    """(n, 384) unit patch features of a real PH2 image from the DINOv2 ViT-S/14 stand-in."""
    from PIL import Image
    from transformers import AutoModel

    grid = math.isqrt(n)
    if grid * grid != n:
        raise SystemExit(f"--source standin needs a square N, got {n}")
    weights = SHARED / "weights" / "dinov2-small-standin"
    images = sorted((SHARED / "data" / "ph2" / "images").glob("*.jpg"))
    if not weights.is_dir() or not images:
        raise SystemExit(f"--source standin needs {weights} and ../shared/data/ph2/images")
    model = AutoModel.from_pretrained(str(weights)).eval()
    image = Image.open(images[0]).convert("RGB").resize((14 * grid, 14 * grid), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        tokens = model(pixel_values=((pixels - mean) / std)[None]).last_hidden_state[0, 1:]
    return torch.nn.functional.normalize(tokens, dim=1)


def best_time(function: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def same_partition(first: np.ndarray, second: np.ndarray) -> bool:
    pairs = set(zip(np.asarray(first).tolist(), np.asarray(second).tolist(), strict=True))
    return len(pairs) == len(set(np.asarray(first).tolist())) == len(set(np.asarray(second).tolist()))


def scipy_clusters(features: np.ndarray, threshold: float) -> np.ndarray:
    return fcluster(linkage(pdist(features, "cosine"), method="average"), threshold, criterion="distance")


def sklearn_clusters(features: np.ndarray, threshold: float) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    distances = 1.0 - np.clip(features @ features.T, -1.0, 1.0)
    model = AgglomerativeClustering(
        n_clusters=None, metric="precomputed", linkage="average", distance_threshold=threshold
    )
    return model.fit(distances).labels_


def bench_size(features: torch.Tensor, threshold: float, repeats: int, have_sklearn: bool) -> str:
    """One row of the table for (N, C) float32 unit features."""
    features64 = features.double().numpy()
    t_scipy, reference = best_time(partial(scipy_clusters, features64, threshold), repeats)
    t_sklearn, labels_sklearn = (
        best_time(partial(sklearn_clusters, features64, threshold), repeats) if have_sklearn else (math.nan, None)
    )
    t_ours, labels = best_time(partial(average_linkage_clusters, features, threshold), repeats)
    t_ours32, labels32 = best_time(partial(average_linkage_clusters, features, threshold, dtype=torch.float32), repeats)
    agreement = [
        f"ours64={'same' if same_partition(labels.numpy(), reference) else 'DIFFERENT'}",
        f"ours32={'same' if same_partition(labels32.numpy(), reference) else 'DIFFERENT'}",
    ]
    if labels_sklearn is not None:
        agreement.append(f"sklearn={'same' if same_partition(labels_sklearn, reference) else 'DIFFERENT'}")
    n, channels = features.shape
    return (
        f"{n:>6} {channels:>5} {int(reference.max()):>5} {t_scipy:>8.3f} {t_sklearn:>8.3f} "
        f"{t_ours:>8.3f} {t_ours32:>8.3f} {t_scipy / t_ours:>8.1f} {t_sklearn / t_ours:>9.1f}  " + " ".join(agreement)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--threshold", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--source", choices=["synthetic", "standin"], default="synthetic")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import sklearn  # noqa: F401

        have_sklearn = True
    except ImportError:
        have_sklearn = False
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; features: {args.source}; "
        f"threshold {args.threshold}; best of {args.repeats}, seconds"
    )
    print(
        f"{'N':>6} {'C':>5} {'K':>5} {'scipy':>8} {'sklearn':>8} {'ours64':>8} {'ours32':>8} "
        f"{'x scipy':>8} {'x sklearn':>9}  agreement"
    )
    for n in args.sizes:
        features = synthetic_features(n, args.channels) if args.source == "synthetic" else standin_features(n)
        print(bench_size(features, args.threshold, args.repeats, have_sklearn), flush=True)


if __name__ == "__main__":
    main()
