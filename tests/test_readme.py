"""The README cannot drift from the code: its commands parse, its files exist, its Python example runs."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest

from insid3_med.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
STANDIN = ROOT / ".." / "shared" / "weights" / "dinov2-small-standin"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def shell_commands() -> list[str]:
    commands = []
    for block in code_blocks("bash"):
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return commands


def test_every_insid3_med_command_in_the_readme_parses() -> None:
    commands = [c for c in shell_commands() if c.startswith("insid3-med ")]
    subcommands = {shlex.split(c)[1] for c in commands}
    assert {"demo", "propagate", "transfer", "segment", "info", "evaluate"} <= subcommands
    parser = build_parser()
    for command in commands:
        parser.parse_args(shlex.split(command)[1:])  # raises SystemExit on an unknown option or argument


def test_install_test_and_demo_commands_are_the_ones_ci_runs() -> None:
    commands = shell_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[:2] == ["pip install -e .", "insid3-med demo -o demo_out"]
    assert "python -m pytest -q" in commands and "python -m pytest -q" in ci
    assert "insid3-med demo -o" in ci and 'pip install -q -e ".[dev]"' in ci


def test_bundle_commands_name_real_config_files() -> None:
    bundle = [c for c in shell_commands() if "monai.bundle run" in c]
    assert len(bundle) == 2 and any(c.startswith("torchrun --nproc_per_node=2") for c in bundle)
    for path in re.findall(r"monai_bundle/configs/[a-z_]+\.json", " ".join(bundle)):
        assert (ROOT / path).is_file(), path


DOCUMENTS = ("README.md", "reports/RESULTS.md", "reports/ablation/README.md", "reports/performance/README.md",
             "monai_bundle/docs/README.md", "slicer_extension/README.md")


@functools.cache
def heading_anchors(document: Path) -> frozenset[str]:
    """The anchors GitHub gives ``document``'s headings: lower case, punctuation dropped, spaces as hyphens, a
    repeated heading suffixed -1, -2, ..."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in document.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"#{1,6} (.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return frozenset(anchors)


@pytest.mark.parametrize("name", DOCUMENTS)
def test_links_lead_to_files_and_headings_that_exist(name: str) -> None:
    document = ROOT / name
    for link in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = link.partition("#")
        target = (document.parent / path).resolve() if path else document
        assert target.exists(), f"{name}: {link}: no such file"
        if anchor and target.suffix == ".md":
            assert anchor in heading_anchors(target), f"{name}: {link}: no such heading"


def test_heading_anchors_follow_github() -> None:
    document = ROOT / "README.md"
    anchors = heading_anchors(document)
    assert "one-labelled-slice---the-whole-volume" in anchors  # "->" loses ">", its spaces become hyphens
    assert "3d-slicer-extension" in anchors and "speed" in anchors


@pytest.mark.skipif(not STANDIN.is_dir(), reason=f"stand-in weights not found at {STANDIN}")
def test_python_example_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (example,) = code_blocks("python")
    monkeypatch.chdir(ROOT)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "lesion pixels" in printed and int(printed.split(")")[1].split()[0]) > 1000
