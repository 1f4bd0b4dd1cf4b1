"""Shared helpers of the benchmark scripts: models, FLOP counts, a matmul yardstick, timers, memory, machine facts.

The scripts in this folder import it as ``common`` (Python puts a script's own folder on ``sys.path``), before
torch. It puts this checkout's root on ``sys.path`` (the benchmarks measure the code they sit beside, installed or
not), and it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise. With OpenMP's default (spinning)
policy, every parallel region waits for threads the OS has descheduled once the cores are shared with other work:
small operations ran 30 to 50 times slower on this 2-core machine under load (debiasing 80 ms instead of 2 ms).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import torch  # noqa: E402

from insid3_med.backbones import BACKBONES, Backbone, BackboneSpec, DINOv3ViT, load_backbone  # noqa: E402

SHARED = ROOT / ".." / "shared"
STANDIN = SHARED / "weights" / "dinov2-small-standin"
MODEL_CHOICES = ("standin", "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16")


def random_dinov3(name: str, seed: int = 0) -> DINOv3ViT:
    """A DINOv3 ViT of registry entry ``name`` with seeded random weights (honest timings, meaningless features).

    RoPE periods are set as in the real checkpoints (100^(j / P)) and LayerScale to 0.1, so activations stay in a
    realistic range.
    """
    spec = BACKBONES[name]
    torch.manual_seed(seed)
    network = DINOv3ViT(spec)
    with torch.no_grad():
        periods = network.rope_embed.periods
        periods.copy_(100.0 ** (torch.arange(periods.numel(), dtype=torch.float32) / periods.numel()))
        for block in network.blocks:
            block.ls1.gamma.fill_(0.1)
            block.ls2.gamma.fill_(0.1)
        torch.nn.init.normal_(network.cls_token, std=0.02)
        torch.nn.init.normal_(network.storage_tokens, std=0.02)
    return network


def load_model(name: str, precision: str = "fp32", device: str = "cpu", feature_block: int | None = None) -> Backbone:
    """``standin`` (the DINOv2 ViT-S/14 stand-in from ../shared/weights) or a random-weight DINOv3 ViT-S/B/L."""
    if name == "standin":
        if not STANDIN.is_dir():
            raise SystemExit(f"the stand-in weights are not at {STANDIN}")
        return load_backbone(STANDIN, device=device, precision=precision, feature_block=feature_block)
    if name not in BACKBONES or BACKBONES[name].family != "dinov3":
        raise SystemExit(f"unknown model {name!r}: choose one of {', '.join(MODEL_CHOICES)}")
    return Backbone(random_dinov3(name), BACKBONES[name], location=f"random:{name}", device=torch.device(device),
                    precision=precision, feature_block=feature_block)


def backbone_flops(spec: BackboneSpec, side: int, blocks: int, batch: int = 1) -> float:
    """Floating-point operations (2 x multiply-adds) of one forward of ``batch`` images of side ``side``.

    Counts the matrix products: patch embedding, and per block run qkv, output projection, the two MLP layers and
    attention's QK^T and AV over all tokens (class and register tokens included). Norms, GELU, softmax, RoPE and
    residual additions are left out (a few per cent).
    """
    grid = side // spec.patch_size
    patches = grid * grid
    tokens = patches + 1 + spec.num_register_tokens
    width = spec.embed_dim
    embed = 2.0 * patches * width * 3 * spec.patch_size**2
    linear = 2.0 * tokens * (3 * width * width + width * width + 2 * width * spec.mlp_dim)
    attention = 2.0 * 2.0 * tokens * tokens * width
    return batch * (embed + blocks * (linear + attention))


def yardstick_side(spec: BackboneSpec, side: int, batch: int) -> int:
    """Side n of the square matmul with as many multiply-adds as the backbone's MLP product (tokens x C x 4C),
    rounded to a multiple of 64 (at least 256)."""
    grid = side // spec.patch_size
    tokens = batch * (grid * grid + 1 + spec.num_register_tokens)
    n = (tokens * spec.embed_dim * spec.mlp_dim) ** (1.0 / 3.0)
    return max(256, int(round(n / 64.0)) * 64)


def synchronise(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class MatmulYardstick:
    """A square n x n matrix product at a precision on a device, the yardstick of achieved FLOP/s.

    ``rate()``: the best of ``repeats`` single products, FLOP/s. ``sustained_rate(flops)``: products back to back
    for about ``flops`` operations (at least 3), total FLOP / total seconds: on a shared machine this sees the same
    mix of quiet and busy moments as a backbone call of similar length, which a single short product does not.
    """

    def __init__(self, n: int, precision: str, device: torch.device | str) -> None:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        generator = torch.Generator().manual_seed(0)
        self.n = n
        self.device = torch.device(device)
        self.a = torch.randn(n, n, generator=generator).to(self.device, dtype)
        self.b = torch.randn(n, n, generator=generator).to(self.device, dtype)
        self.rate()  # warm-up

    @property
    def flops(self) -> float:
        return 2.0 * self.n**3

    def rate(self, repeats: int = 3) -> float:
        best = math.inf
        for _ in range(repeats):
            synchronise(self.device)
            start = time.perf_counter()
            torch.mm(self.a, self.b)
            synchronise(self.device)
            best = min(best, time.perf_counter() - start)
        return self.flops / best

    def sustained_rate(self, flops: float) -> float:
        count = max(3, math.ceil(flops / self.flops))
        synchronise(self.device)
        start = time.perf_counter()
        for _ in range(count):
            torch.mm(self.a, self.b)
        synchronise(self.device)
        return count * self.flops / (time.perf_counter() - start)


class StageTimer:
    """Wall-clock seconds per named stage, over repeats; ``best``/``median`` per stage (device synchronised)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.samples: dict[str, list[float]] = {}
        self._current: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        synchronise(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronise(self.device)
            self._current[name] = self._current.get(name, 0.0) + time.perf_counter() - start

    def end_repeat(self) -> None:
        for name, seconds in self._current.items():
            self.samples.setdefault(name, []).append(seconds)
        self._current = {}

    def best(self) -> dict[str, float]:
        return {name: min(values) for name, values in self.samples.items()}

    def median(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.samples.items()}


def best_of(function: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> float:
    """Smallest wall-clock seconds of ``repeats`` calls."""
    best = math.inf
    for _ in range(repeats):
        synchronise(device)
        start = time.perf_counter()
        function()
        synchronise(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    """Resident memory now, MiB (from /proc/self/status; the peak where that is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mib()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine(device: torch.device | str = "cpu") -> dict[str, object]:
    """What ran the benchmark: CPU or GPU name, cores, threads, load average, torch version."""
    flags = cpu_flags()
    facts: dict[str, object] = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }
    if torch.device(device).type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def describe_machine(facts: dict[str, object]) -> str:
    gpu = f", GPU {facts['gpu']}" if "gpu" in facts else ""
    bf16 = ",".join(facts["cpu_bf16"]) or "no native bf16"  # type: ignore[arg-type]
    return (f"{facts['cpu']} ({facts['cpu_cores']} cores, {bf16}), {facts['torch_threads']} torch threads, "
            f"OMP_WAIT_POLICY={facts.get('omp_wait_policy') or 'unset'}, load {facts['load_average']}, "
            f"torch {facts['torch']}{gpu}")


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as JSON through a temporary file in the same folder (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1))
    os.replace(temporary, path)
