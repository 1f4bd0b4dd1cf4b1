"""Where the DINOv3 backbone weights come from, and whether a path the user picked looks like weights.

DINOv3 weights are gated: Meta releases them after a request form (https://ai.meta.com/dinov3/), and the same
checkpoints are on the Hugging Face hub (``facebook/dinov3-vit{s,b,l}16-pretrain-lvd1689m``, after accepting the
licence on the model page). The module stores the chosen path in Slicer's settings under
:data:`WEIGHTS_SETTINGS_KEY` and passes it to the tool as ``--weights``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

WEIGHTS_SETTINGS_KEY = "OneShotPropagate/WeightsPath"
WEIGHTS_ENVIRONMENT_VARIABLE = "INSID3_MED_WEIGHTS"
WEIGHTS_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")
WEIGHTS_FILE_FILTER = "Backbone weights (*.pth *.pt *.safetensors)"
DINOV3_HUB_IDS = {
    "ViT-S/16": "facebook/dinov3-vits16-pretrain-lvd1689m",
    "ViT-B/16": "facebook/dinov3-vitb16-pretrain-lvd1689m",
    "ViT-L/16": "facebook/dinov3-vitl16-pretrain-lvd1689m",
}
META_REQUEST_URL = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
GITHUB_URL = "https://github.com/facebookresearch/dinov3"
HUB_URL = "https://huggingface.co/{hub_id}"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class WeightsPathError(ValueError):
    """A weights path that does not exist or does not hold backbone weights."""


def weights_help_html() -> str:
    """Text of the missing-weights dialog (HTML): why, where to get them, what to pick."""
    hub_links = "".join(
        f'<li>{size}: <a href="{HUB_URL.format(hub_id=hub_id)}">{hub_id}</a></li>'
        for size, hub_id in DINOV3_HUB_IDS.items()
    )
    return (
        "<p>One-shot propagation needs the weights of a DINOv3 vision transformer (DINOv3 licence). They are "
        "<b>gated</b>: Meta e-mails a download link after you fill in its request form, and Hugging Face shows "
        "the files once you accept the licence on the model page while logged in.</p>"
        f'<p>Request form: <a href="{META_REQUEST_URL}">{META_REQUEST_URL}</a> (see also '
        f'<a href="{GITHUB_URL}">{GITHUB_URL}</a>)<br>Hugging Face hub:</p>'
        f"<ul>{hub_links}</ul>"
        "<p>Download a checkpoint (<code>.pth</code> from Meta, or the model folder from Hugging Face) and pick "
        "it below. ViT-S/16 runs on a CPU; ViT-B/16 and ViT-L/16 are more accurate and want a GPU. The choice "
        "is remembered.</p>"
    )


def check_weights_path(value: str | Path) -> str:
    """The weights argument for ``--weights``, after checking it.

    Accepts a checkpoint file (``.pth``, ``.pt``, ``.safetensors``), a Hugging Face model folder (with
    ``config.json`` and a weights file), or a hub id such as ``facebook/dinov3-vits16-pretrain-lvd1689m``.
    """
    text = str(value).strip()
    if not text:
        raise WeightsPathError("no weights chosen")
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() not in WEIGHTS_FILE_SUFFIXES:
            raise WeightsPathError(f"{path}: not a weights file (expected {', '.join(WEIGHTS_FILE_SUFFIXES)})")
        if path.stat().st_size == 0:
            raise WeightsPathError(f"{path}: the file is empty (an interrupted download?)")
        return str(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsPathError(f"{path}: folder without config.json; pick a Hugging Face model folder or a .pth")
        if not any(p.suffix.lower() in (".safetensors", ".bin", ".pth") for p in path.iterdir() if p.is_file()):
            raise WeightsPathError(f"{path}: config.json but no weights file (.safetensors, .bin) in the folder")
        return str(path)
    if _HUB_ID.match(text) and not text.startswith((".", "~")) and not os.path.isabs(text):
        return text
    raise WeightsPathError(f"{path}: no such file or folder")


def configured_weights(setting: str | None, environment: Mapping[str, str] | None = None) -> str | None:
    """The weights to pass: the saved setting, else ``$INSID3_MED_WEIGHTS``, else ``None`` (the tool's default)."""
    if setting and str(setting).strip():
        return str(setting).strip()
    env = os.environ if environment is None else environment
    value = env.get(WEIGHTS_ENVIRONMENT_VARIABLE, "").strip()
    return value or None
