"""Frozen ViT backbones: weights -> patch features.

One registry holds every supported variant and its defaults (feature block, patch size, where its weights come
from). Two kinds of weights load:

- official Meta DINOv3 ``.pth`` checkpoints (ViT-S/B/L/16), into :class:`DINOv3ViT`, this module's own
  implementation of the architecture (every key used and shape-checked; ``torch.load(weights_only=True)``);
- Hugging Face model folders or hub ids of DINOv3 (``DINOv3ViTModel``) and DINOv2 (``Dinov2Model``).

Features are the patch tokens after the final LayerNorm applied to the output of a chosen block (1-based), as a
``(B, C, H / p, W / p)`` float32 map. The backbone always runs in eval mode without gradients.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_ENV_VAR = "INSID3_MED_WEIGHTS"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STANDIN_SHA256 = "8b38fc0f3652d5a3cd0a5f3b71eb3b0b68a34460a68814528cb1e25177fe6e30"

DINOV3_HELP = (
    "DINOv3 weights are gated: request access at https://ai.meta.com/dinov3/ (Meta's download form) or on the "
    "Hugging Face hub (facebook/dinov3-vits16-pretrain-lvd1689m, -vitb16-, -vitl16-), then point insid3-med at them "
    "with --weights PATH (an official .pth file such as dinov3_vits16_pretrain_lvd1689m-08c60483.pth, or a Hugging "
    f"Face model folder), or set {WEIGHTS_ENV_VAR}=PATH, or log in with `huggingface-cli login` and download the "
    "hub model into the Hugging Face cache. The ungated DINOv2 (facebook/dinov2-small) also works."
)


class WeightsNotFoundError(FileNotFoundError):
    """No usable backbone weights: the message says what was looked for and how to get DINOv3 weights."""


class WeightsFormatError(ValueError):
    """A weights file or folder exists but is not a checkpoint this package can load."""


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone variant: architecture sizes, default feature block (1-based) and where its weights come from."""

    name: str
    family: str  # "dinov3" or "dinov2"
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    num_register_tokens: int
    default_block: int
    checkpoint_file: str | None = None
    hub_id: str | None = None
    default_basis_rank: int = 16

    @property
    def mlp_dim(self) -> int:
        return 4 * self.embed_dim


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("dinov3_vits16", "dinov3", 384, 12, 6, 16, 4, 12,
                     "dinov3_vits16_pretrain_lvd1689m-08c60483.pth", "facebook/dinov3-vits16-pretrain-lvd1689m"),
        BackboneSpec("dinov3_vitb16", "dinov3", 768, 12, 12, 16, 4, 12,
                     "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", "facebook/dinov3-vitb16-pretrain-lvd1689m"),
        BackboneSpec("dinov3_vitl16", "dinov3", 1024, 24, 16, 16, 4, 24,
                     "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", "facebook/dinov3-vitl16-pretrain-lvd1689m"),
        BackboneSpec("dinov2_vits14", "dinov2", 384, 12, 6, 14, 0, 12, None, "facebook/dinov2-small"),
        BackboneSpec("dinov2_vitb14", "dinov2", 768, 12, 12, 14, 0, 12, None, "facebook/dinov2-base"),
        BackboneSpec("dinov2_vitl14", "dinov2", 1024, 24, 16, 14, 0, 24, None, "facebook/dinov2-large"),
        # The offline stand-in (../shared/weights/dinov2-small-standin): its last block is weak; block 9 measured far
        # better (pooled IoU 75 vs 26 on dermoscopy pairs). Recognised by the sha256 of its model.safetensors.
        BackboneSpec("dinov2_vits14_standin", "dinov2", 384, 12, 6, 14, 0, 9, None, None),
    )
}
DINOV3_SEARCH_ORDER = ("dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16")
HUB_SEARCH_ORDER = (*DINOV3_SEARCH_ORDER, "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14")


# ---------------------------------------------------------------------------------------------------------------
# DINOv3 ViT, the official architecture
# ---------------------------------------------------------------------------------------------------------------


def rope_angles(grid_h: int, grid_w: int, periods: torch.Tensor) -> torch.Tensor:
    """RoPE angles for patch centres, (h * w, 4 * len(periods)) in radians.

    Coordinates are patch centres normalised per axis to [-1, 1]; 16 y- then 16 x-frequencies, tiled twice.
    """
    device = periods.device
    ys = (torch.arange(grid_h, device=device, dtype=torch.float32) + 0.5) / grid_h * 2.0 - 1.0
    xs = (torch.arange(grid_w, device=device, dtype=torch.float32) + 0.5) / grid_w * 2.0 - 1.0
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)  # (hw, 2)
    angles = 2.0 * math.pi * coords[:, :, None] / periods.float()[None, None, :]  # (hw, 2, P)
    return angles.flatten(1).tile(2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


BLOCKED_ATTENTION_MIN_TOKENS = 2048
"""bf16 on the CPU from this many tokens on (about 720 px at patch 16) runs attention by blocks of queries."""

ATTENTION_QUERY_BLOCK = 128


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax attention without mask: (B, heads, T, d) queries, keys and values -> (B, heads, T, d).

    The one attention of every backbone here (DINOv3 blocks and, through :func:`use_own_attention`, the Hugging
    Face models): torch's fused ``F.scaled_dot_product_attention``, except for bf16 on the CPU at
    ``BLOCKED_ATTENTION_MIN_TOKENS`` tokens or more, where :func:`blocked_attention` runs 1.2 to 1.5 times faster
    (the fused bf16 kernel reached a third of a bf16 matmul there; reports/performance). fp32 is always fused.
    """
    if query.dtype == torch.bfloat16 and query.device.type == "cpu" and query.shape[-2] >= BLOCKED_ATTENTION_MIN_TOKENS:
        return blocked_attention(query, key, value, scale)
    return F.scaled_dot_product_attention(query, key, value, scale=scale)


def blocked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      scale: float | None = None) -> torch.Tensor:
    """bf16 softmax attention by blocks of ``ATTENTION_QUERY_BLOCK`` queries, each through two bf16 matmuls:
    (B, heads, T, d) -> (B, heads, T, d) bf16. The logits are rounded to bf16 (the fused kernel keeps them in fp32),
    so outputs differ from the fused kernel's by about bf16's own rounding (relative 1e-2)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(query.device.type, enabled=False):
        query = (query * scale).to(torch.bfloat16).contiguous()
        keys_t = key.to(torch.bfloat16).transpose(-2, -1).contiguous()
        value = value.to(torch.bfloat16).contiguous()
        # Written as (B, T, heads, d), returned as a (B, heads, T, d) view: heads merge without a copy.
        out = torch.empty(query.shape[0], query.shape[2], query.shape[1], value.shape[-1], dtype=torch.bfloat16,
                          device=query.device).transpose(1, 2)
        for start in range(0, query.shape[-2], ATTENTION_QUERY_BLOCK):
            stop = start + ATTENTION_QUERY_BLOCK
            out[..., start:stop, :] = torch.softmax(query[..., start:stop, :] @ keys_t, dim=-1) @ value
    return out


class _Attention(nn.Module):
    """The ``attn`` holder of a :class:`DINOv3Block`: ``qkv`` and ``proj`` layers and the ``qkv_bias_mask`` buffer
    (attributes set by the block, typed here for the type checker)."""

    qkv: nn.Linear
    proj: nn.Linear
    qkv_bias_mask: torch.Tensor


class _Mlp(nn.Module):
    """The ``mlp`` holder of a :class:`DINOv3Block`: ``fc1`` and ``fc2``."""

    fc1: nn.Linear
    fc2: nn.Linear


class _LayerScale(nn.Module):
    """The ``ls1`` / ``ls2`` holders of a :class:`DINOv3Block`: a ``gamma`` parameter."""

    gamma: nn.Parameter


class _PatchEmbed(nn.Module):
    """The ``patch_embed`` holder of a :class:`DINOv3ViT`: a ``proj`` convolution."""

    proj: nn.Conv2d


class _RopeEmbed(nn.Module):
    """The ``rope_embed`` holder of a :class:`DINOv3ViT`: a ``periods`` buffer."""

    periods: torch.Tensor


class DINOv3Block(nn.Module):
    """Pre-norm transformer block with LayerScale and RoPE on patch tokens (official key names)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.register_buffer("qkv_bias_mask", torch.ones(3 * dim), persistent=False)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = _LayerScale()
        self.ls1.gamma = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp()
        self.mlp.fc1 = nn.Linear(dim, mlp_dim)
        self.mlp.fc2 = nn.Linear(mlp_dim, dim)
        self.ls2 = _LayerScale()
        self.ls2.gamma = nn.Parameter(torch.ones(dim))

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix: int) -> torch.Tensor:
        batch, tokens, dim = x.shape
        bias = self.attn.qkv.bias * self.attn.qkv_bias_mask.to(self.attn.qkv.bias.dtype)
        qkv = F.linear(x, self.attn.qkv.weight, bias)
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q = torch.cat((q[:, :, :num_prefix], q[:, :, num_prefix:] * cos + rotate_half(q[:, :, num_prefix:]) * sin), 2)
        k = torch.cat((k[:, :, :num_prefix], k[:, :, num_prefix:] * cos + rotate_half(k[:, :, num_prefix:]) * sin), 2)
        out = attention(q, k, v)
        return self.attn.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_prefix: int) -> torch.Tensor:
        x = x + self.ls1.gamma * self.attention(self.norm1(x), cos, sin, num_prefix)
        return x + self.ls2.gamma * self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DINOv3ViT(nn.Module):
    """DINOv3 ViT with the official state_dict layout. ``forward`` returns (B, C, H/16, W/16) patch tokens after the
    final norm applied to block ``num_blocks`` (only the blocks needed are run)."""

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        dim = spec.embed_dim
        self.spec = spec
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, spec.num_register_tokens, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = _PatchEmbed()
        self.patch_embed.proj = nn.Conv2d(3, dim, spec.patch_size, spec.patch_size)
        self.rope_embed = _RopeEmbed()
        self.rope_embed.register_buffer("periods", torch.ones(dim // spec.num_heads // 4))
        self.blocks = nn.ModuleList(DINOv3Block(dim, spec.num_heads, spec.mlp_dim) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, images: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
        batch, _, height, width = images.shape
        p = self.spec.patch_size
        grid_h, grid_w = height // p, width // p
        patches = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        prefix = torch.cat((self.cls_token, self.storage_tokens), dim=1).to(patches.dtype).expand(batch, -1, -1)
        x = torch.cat((prefix, patches), dim=1)
        angles = rope_angles(grid_h, grid_w, self.rope_embed.periods)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        num_prefix = prefix.shape[1]
        for block in self.blocks[: num_blocks or len(self.blocks)]:
            x = block(x, cos, sin, num_prefix)
        x = self.norm(x[:, num_prefix:])
        return x.transpose(1, 2).reshape(batch, -1, grid_h, grid_w)


def load_dinov3_checkpoint(path: Path) -> tuple[DINOv3ViT, BackboneSpec]:
    """Build :class:`DINOv3ViT` from an official Meta ``.pth`` checkpoint; every key used and shape-checked."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for bad files
        raise WeightsFormatError(f"{path}: not a readable PyTorch checkpoint ({error}). {DINOV3_HELP}") from error
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or "patch_embed.proj.weight" not in state or "storage_tokens" not in state:
        raise WeightsFormatError(
            f"{path}: not an official DINOv3 ViT checkpoint (no patch_embed.proj.weight / storage_tokens keys). "
            + DINOV3_HELP
        )
    dim = int(state["patch_embed.proj.weight"].shape[0])
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    matches = [s for s in BACKBONES.values() if s.family == "dinov3" and s.embed_dim == dim and s.depth == depth]
    if not matches:
        raise WeightsFormatError(
            f"{path}: DINOv3 checkpoint with width {dim} and {depth} blocks is not a supported variant "
            "(ViT-S/16, ViT-B/16, ViT-L/16)."
        )
    spec = matches[0]
    model = DINOv3ViT(spec)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    expected.update({f"blocks.{i}.attn.qkv.bias_mask": torch.Size([3 * dim]) for i in range(depth)})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        raise WeightsFormatError(
            f"{path}: checkpoint does not match the {spec.name} layout: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {wrong[:5]}."
        )
    own = {k: v for k, v in state.items() if not k.endswith("qkv.bias_mask")}
    model.load_state_dict(own, strict=True)
    for i, block in enumerate(model.blocks):
        cast(DINOv3Block, block).attn.qkv_bias_mask.copy_(state[f"blocks.{i}.attn.qkv.bias_mask"].float())
    return model, spec


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face models
# ---------------------------------------------------------------------------------------------------------------


HF_ATTENTION = "insid3_med"


def _hf_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: :func:`attention`, or transformers' sdpa where a mask or dropout is asked."""
    if attention_mask is not None or dropout > 0.0 or kwargs.get("output_attentions"):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return attention(query, key, value, scaling).transpose(1, 2).contiguous(), None


def use_own_attention(model: nn.Module) -> None:
    """Make a transformers model call :func:`attention` (registered as ``"insid3_med"``); results are bit-identical
    to transformers' own "sdpa" (tested). Models without ``set_attn_implementation`` keep their own attention."""
    from transformers import AttentionInterface

    set_attn_implementation = getattr(model, "set_attn_implementation", None)
    if set_attn_implementation is not None:
        AttentionInterface.register(HF_ATTENTION, _hf_attention)
        set_attn_implementation(HF_ATTENTION)


def _layer_holder(model: nn.Module, family: str) -> nn.Module:
    """The submodule of a transformers model that holds its ``layer`` list of blocks: ``model.model`` for DINOv3,
    ``model.encoder`` for DINOv2."""
    return cast(nn.Module, model.model if family == "dinov3" else model.encoder)


class HuggingFaceViT(nn.Module):
    """A transformers ``DINOv3ViTModel`` or ``Dinov2Model`` truncated to its first ``num_blocks`` blocks."""

    def __init__(self, model: nn.Module, spec: BackboneSpec) -> None:
        super().__init__()
        use_own_attention(model)
        self.model = model
        self.spec = spec
        self.all_layers = nn.ModuleList(list(cast(nn.ModuleList, _layer_holder(model, spec.family).layer)))

    def forward(self, images: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
        batch, _, height, width = images.shape
        grid_h, grid_w = height // self.spec.patch_size, width // self.spec.patch_size
        kept = nn.ModuleList(list(self.all_layers)[: num_blocks or len(self.all_layers)])
        _layer_holder(self.model, self.spec.family).layer = kept
        hidden = self.model(pixel_values=images).last_hidden_state
        patches = hidden[:, 1 + self.spec.num_register_tokens :]
        return patches.transpose(1, 2).reshape(batch, -1, grid_h, grid_w)


def load_huggingface_model(location: str | Path, local_only: bool) -> tuple[HuggingFaceViT, BackboneSpec]:
    """Load a DINOv3ViTModel / Dinov2Model from a folder or hub id and identify its registry entry."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    try:
        config = AutoConfig.from_pretrained(str(location), local_files_only=local_only)
    except Exception as error:  # noqa: BLE001
        raise WeightsNotFoundError(f"{location}: no Hugging Face model config could be read ({error}). "
                                   + DINOV3_HELP) from error
    family = {"dinov3_vit": "dinov3", "dinov2": "dinov2"}.get(config.model_type)
    if family is None:
        raise WeightsFormatError(f"{location}: model type {config.model_type!r} is not DINOv3 ViT or DINOv2.")
    try:
        model = AutoModel.from_pretrained(str(location), local_files_only=local_only)
    except Exception as error:  # noqa: BLE001
        raise WeightsFormatError(f"{location}: the model weights could not be loaded ({error}).") from error
    spec = _spec_for_hf(config, family, Path(location))
    return HuggingFaceViT(model, spec), spec


def _spec_for_hf(config, family: str, folder: Path) -> BackboneSpec:  # noqa: ANN001 - a transformers config
    weights = folder / "model.safetensors"
    if family == "dinov2" and weights.is_file() and file_sha256(weights) == STANDIN_SHA256:
        return BACKBONES["dinov2_vits14_standin"]
    patch = int(config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0])
    for spec in BACKBONES.values():
        if (spec.family == family and spec.embed_dim == config.hidden_size and spec.depth ==
                config.num_hidden_layers and spec.patch_size == patch and spec.name != "dinov2_vits14_standin"):
            return spec
    registers = int(getattr(config, "num_register_tokens", 0) or 0)
    return BackboneSpec(f"{family}_custom", family, config.hidden_size, config.num_hidden_layers,
                        config.num_attention_heads, patch, registers, config.num_hidden_layers)


# ---------------------------------------------------------------------------------------------------------------
# Resolution of weights, and the Backbone facade
# ---------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime: float) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file (cached per path, size and modification time)."""
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime)


def find_cached_hub_model(cache_dir: str | Path | None = None) -> Path | None:
    """The snapshot folder of the first registry hub model (DINOv3 S/B/L, then DINOv2) in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    for name in HUB_SEARCH_ORDER:
        hub_id = BACKBONES[name].hub_id
        if not hub_id:
            continue
        config = try_to_load_from_cache(hub_id, "config.json", cache_dir=cache_dir)
        if isinstance(config, str) and Path(config).parent.joinpath("model.safetensors").exists():
            return Path(config).parent
    return None


def resolve_weights(weights: str | Path | None, cache_dir: str | Path | None = None) -> tuple[str, str]:
    """Where the weights come from: (location, how it was found). Order: argument, env var, HF cache."""
    if weights is not None and str(weights) != "":
        return str(weights), "argument"
    from_env = os.environ.get(WEIGHTS_ENV_VAR, "")
    if from_env:
        return from_env, f"environment variable {WEIGHTS_ENV_VAR}"
    cached = find_cached_hub_model(cache_dir)
    if cached is not None:
        return str(cached), "Hugging Face cache"
    raise WeightsNotFoundError(
        "No backbone weights found: no --weights argument, no "
        f"{WEIGHTS_ENV_VAR} environment variable, and no DINOv3/DINOv2 model in the Hugging Face cache "
        f"({', '.join(BACKBONES[n].hub_id or n for n in HUB_SEARCH_ORDER)}). " + DINOV3_HELP
    )


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else cuda, mps or cpu, in that order of preference.

    A device that cannot be named or is not available to this PyTorch raises a ValueError that says so.
    """
    if device is not None and str(device) not in ("", "auto"):
        try:
            chosen = torch.device(device)
        except RuntimeError as error:
            raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from error
        if chosen.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ValueError(f"device {str(device)!r}: no CUDA GPU is available to this PyTorch "
                                 f"({torch.__version__}); leave the device out or use cpu")
            if chosen.index is not None and chosen.index >= count:
                raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s), numbered from 0")
        if chosen.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                         and torch.backends.mps.is_available()):
            raise ValueError(f"device {str(device)!r}: Apple's MPS is not available to this PyTorch; leave the "
                             "device out or use cpu")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def native_bf16_cpu() -> bool:
    """True when this CPU multiplies bf16 matrices natively (x86 ``avx512_bf16`` or ``amx_bf16``; Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


BF16_MIN_SPEEDUP = 1.2
"""bf16 is chosen automatically only where its matrix products measure at least this many times faster than fp32."""


@cache
def bf16_matmul_speedup(threads: int) -> float:
    """How many times faster a bf16 matrix product runs than an fp32 one on this CPU with ``threads`` torch threads:
    (1024, 384) x (384, 1536), a ViT-S MLP layer over 1024 tokens, best of 5 after a warm-up. Measured once per
    process and thread count (about 0.1 s). A CPU flag alone is not enough: an Intel Xeon reporting avx512_bf16
    ran these products 1.8 times slower in bf16 than in fp32, an AMD EPYC several times faster."""
    import time

    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        generator = torch.Generator().manual_seed(0)
        left, right = torch.randn(1024, 384, generator=generator), torch.randn(384, 1536, generator=generator)
        best = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = left.to(dtype), right.to(dtype)
            a @ b
            times = []
            for _ in range(5):
                start = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - start)
            best[dtype] = min(times)
    finally:
        torch.set_num_threads(saved)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def bf16_pays_on_cpu() -> bool:
    """True when this CPU has native bf16 matrix units (:func:`native_bf16_cpu`) and they measure at least
    :data:`BF16_MIN_SPEEDUP` times faster than fp32 with the current thread count (:func:`bf16_matmul_speedup`)."""
    return native_bf16_cpu() and bf16_matmul_speedup(torch.get_num_threads()) >= BF16_MIN_SPEEDUP


def resolve_precision(precision: str, device: str | torch.device | None = None, *, chained: bool = False) -> str:
    """``precision`` ("fp32", "bf16" or "auto") -> "fp32" or "bf16".

    "auto" is bf16 only for the chained volume propagation on a CPU where bf16 pays (:func:`bf16_pays_on_cpu`):
    there bf16 and fp32 outputs agreed to a pooled IoU of 0.99+ and bf16 ran about 1.5 times faster on an AMD EPYC
    (reports/performance, ``benchmarks/bench_precision.py``). fp32 elsewhere: on CPUs where bf16 is not faster, for
    the published per-image method (its clustering turned bf16 rounding into different masks: pooled IoU 0.83 to
    0.89) and on GPUs (not measured).
    """
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', not {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if chained and pick_device(device).type == "cpu" and bf16_pays_on_cpu() else "fp32"


def matmul_weights_to(network: nn.Module, dtype: torch.dtype) -> None:
    """Cast the weights of every ``nn.Linear`` and ``nn.Conv2d`` of ``network`` to ``dtype``, in place.

    Under bf16 autocast the result is bit-identical to casting them on every call (what autocast does), without
    the casts (5% of a ViT-S forward here); norms, tokens, LayerScale and the residual stream stay fp32.
    """
    for module in network.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(dtype)


class Backbone:
    """A frozen ViT that turns ImageNet-normalised images into patch feature maps.

    ``encode(images)``: (B, 3, H, W) float with H, W multiples of ``patch_size`` -> (B, C, H/p, W/p) float32
    (not normalised). Runs in eval mode, without gradients, in ``precision``: "fp32", or "bf16" (matrix weights
    held in bf16, run under bf16 autocast: norms and the residual stream stay fp32).
    """

    def __init__(self, network: nn.Module, spec: BackboneSpec, *, location: str, device: torch.device,
                 precision: str = "fp32", feature_block: int | None = None) -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', not {precision!r}")
        block = spec.default_block if feature_block is None else int(feature_block)
        if not 1 <= block <= spec.depth:
            raise ValueError(f"feature_block must be in 1..{spec.depth} for {spec.name}, not {block}")
        self.network = network.eval().requires_grad_(False).to(device)
        if precision == "bf16":
            matmul_weights_to(self.network, torch.bfloat16)
        self.spec = spec
        self.location = location
        self.device = device
        self._precision = precision
        self.feature_block = block

    @property
    def precision(self) -> str:
        """"fp32" or "bf16" (fixed: a bf16 backbone holds its matrix weights in bf16)."""
        return self._precision

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    @property
    def identity(self) -> str:
        """A key naming the weights, block and precision (for caches of derived quantities)."""
        return f"{self.spec.name}:{self.location}:block{self.feature_block}:{self.precision}"

    def weights_sha256(self) -> str | None:
        """sha256 of the weights file (the .pth, or a HF folder's model.safetensors), None if not a local file."""
        path = Path(self.location)
        if path.is_dir():
            path = path / "model.safetensors"
        return file_sha256(path) if path.is_file() else None

    @contextmanager
    def _autocast(self) -> Iterator[None]:
        if self.precision == "bf16":
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    @torch.inference_mode()
    def encode(self, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised -> (B, C, H/p, W/p) float32 patch features (after the final norm)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        p = self.patch_size
        if images.shape[2] % p or images.shape[3] % p:
            raise ValueError(f"image sides {tuple(images.shape[2:])} must be multiples of the patch size {p}")
        self.network.eval()
        outputs = []
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start : start + batch_size].to(self.device, torch.float32)
            with self._autocast():
                outputs.append(self.network(chunk, num_blocks=self.feature_block).float())
        return torch.cat(outputs)


def load_backbone(weights: str | Path | None = None, *, device: str | torch.device | None = None,
                  precision: str = "fp32", feature_block: int | None = None,
                  cache_dir: str | Path | None = None) -> Backbone:
    """Load a backbone from an official DINOv3 ``.pth``, a Hugging Face folder or a hub id.

    ``weights`` None: the ``INSID3_MED_WEIGHTS`` environment variable, then the Hugging Face cache (``cache_dir``,
    default the standard one). Raises
    :class:`WeightsNotFoundError` (with instructions to get DINOv3 weights) or :class:`WeightsFormatError`.
    """
    location, how = resolve_weights(weights, cache_dir)
    path = Path(location).expanduser()
    network: nn.Module
    if path.is_file():
        if path.suffix in (".pth", ".pt"):
            network, spec = load_dinov3_checkpoint(path)
        elif path.name in ("model.safetensors", "config.json"):
            network, spec = load_huggingface_model(path.parent, local_only=True)
            path = path.parent
        else:
            raise WeightsFormatError(f"{path}: expected an official DINOv3 .pth checkpoint or a Hugging Face model "
                                     f"folder. {DINOV3_HELP}")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsFormatError(f"{path}: folder has no config.json, so it is not a Hugging Face model folder. "
                                     + DINOV3_HELP)
        network, spec = load_huggingface_model(path, local_only=True)
    elif "/" in location and not location.startswith((".", "/", "~")) and location.count("/") == 1:
        network, spec = load_huggingface_model(location, local_only=False)
    else:
        raise WeightsNotFoundError(f"{location} (from the {how}): no such file or folder. " + DINOV3_HELP)
    return Backbone(network, spec, location=str(path) if path.exists() else location, device=pick_device(device),
                    precision=precision, feature_block=feature_block)
