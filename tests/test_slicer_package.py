"""What can be checked of the Slicer extension without Slicer: CMake files, the .ui file, Python sources, icons,
the extension index entry, and that the plain-Python core stays free of Slicer and Qt.

The CMake configure test uses a small STAND-IN for Slicer's CMake package (SlicerConfig.cmake and the two macros an
extension calls), written to a temporary folder: it checks that the extension's CMake code runs, that every file it
lists exists and that the extension metadata is set, not that Slicer would build it.
"""

from __future__ import annotations

import ast
import json
import py_compile
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = ROOT / "slicer_extension"
MODULE_DIR = EXTENSION / "OneShotPropagate"
MODULE_FILE = MODULE_DIR / "OneShotPropagate.py"
EFFECT_FILE = MODULE_DIR / "SegmentEditorOneShotPropagateLib" / "SegmentEditorEffect.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "OneShotPropagate.ui"
LIB_DIR = MODULE_DIR / "OneShotPropagateLib"


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def class_named(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found")


# --- Python sources -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXTENSION.rglob("*.py")), ids=lambda p: str(p.relative_to(EXTENSION)))
def test_every_python_file_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "compiled.pyc"), doraise=True)


def test_module_has_the_scripted_module_classes_and_a_typed_parameter_node():
    tree = module_tree()
    bases = {
        "OneShotPropagate": "ScriptedLoadableModule",
        "OneShotPropagateWidget": "ScriptedLoadableModuleWidget",
        "OneShotPropagateLogic": "ScriptedLoadableModuleLogic",
        "OneShotPropagateTest": "ScriptedLoadableModuleTest",
    }
    for name, base in bases.items():
        assert base in [b.id for b in class_named(tree, name).bases if isinstance(b, ast.Name)], name
    parameter_node = class_named(tree, "OneShotPropagateParameterNode")
    assert any(isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in parameter_node.decorator_list)
    fields = [n.target.id for n in parameter_node.body if isinstance(n, ast.AnnAssign)]
    assert {"inputVolume", "inputSegmentation", "axis", "device", "precision"} <= set(fields)
    test_methods = {n.name for n in class_named(tree, "OneShotPropagateTest").body if isinstance(n, ast.FunctionDef)}
    assert {"setUp", "runTest"} <= test_methods and len({m for m in test_methods if m.startswith("test_")}) >= 4


def test_effect_is_an_autocomplete_effect_with_a_preview_computation_and_the_registered_name():
    tree = ast.parse(EFFECT_FILE.read_text(encoding="utf-8"))
    effect = class_named(tree, "SegmentEditorEffect")
    bases = [b.id for b in effect.bases if isinstance(b, ast.Name)]
    assert bases == ["AbstractScriptedSegmentEditorAutoCompleteEffect"]
    methods = {n.name for n in effect.body if isinstance(n, ast.FunctionDef)}
    assert {"computePreviewLabelmap", "clone", "icon", "helpText", "setupOptionsFrame", "setMRMLDefaults"} <= methods

    def constant(tree_: ast.Module, name: str) -> str:
        for node in tree_.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
                return node.value.value  # type: ignore[attr-defined]
        raise AssertionError(f"{name} not found")

    assert constant(tree, "EFFECT_NAME") == constant(module_tree(), "EFFECT_NAME") == "One-shot propagate"
    assert (EFFECT_FILE.parent / "SegmentEditorEffect.png").is_file()


def test_plain_python_core_imports_neither_slicer_nor_qt():
    """Everything but the MRML adapter must run in CI and in the PythonSlicer child without Slicer or Qt."""
    forbidden = {"slicer", "qt", "ctk", "vtk", "PythonQt"}
    for path in LIB_DIR.glob("*.py"):
        if path.name == "mrml.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            assert not {n.split(".")[0] for n in names} & forbidden, f"{path.name} imports {names}"
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from OneShotPropagateLib import commands, conversion, dependencies, exchange, jobs, labels, runs, slices,"
        " validation, weights;"
        "bad = {'slicer', 'qt', 'ctk', 'vtk'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", script, str(MODULE_DIR)], check=True, timeout=120)


# --- .ui file -------------------------------------------------------------------------------------------------


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def test_ui_file_is_valid_xml_with_a_mrml_root_and_declared_custom_widgets():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.find("class").text == "OneShotPropagate"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "OneShotPropagate"
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if not c.startswith("Q")}
    assert custom <= declared, custom - declared
    widgets = ui_widgets()
    for connection in root.iter("connection"):
        assert connection.find("sender").text in widgets and connection.find("receiver").text in widgets
        assert connection.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"
    scene_users = {w for w, e in widgets.items() if e.get("class", "").startswith("qMRML") and w != "OneShotPropagate"}
    receivers = {c.find("receiver").text for c in root.iter("connection")}
    assert scene_users <= receivers, scene_users - receivers


def test_every_widget_the_code_uses_is_in_the_ui_file():
    referenced = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert len(referenced) > 10
    missing = referenced - set(ui_widgets())
    assert not missing, f"widgets used by OneShotPropagate.py but absent from the .ui file: {sorted(missing)}"


def test_parameter_names_in_the_ui_match_the_parameter_node():
    parameter_node = class_named(module_tree(), "OneShotPropagateParameterNode")
    fields = {n.target.id for n in parameter_node.body if isinstance(n, ast.AnnAssign)}
    bound = {}
    for widget in ui_widgets().values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    assert set(bound) == fields, (set(bound) ^ fields)
    # Widget kinds the parameter node wrapper can connect to each field type.
    assert bound["inputVolume"] == bound["inputSegmentation"] == "qMRMLNodeComboBox"
    assert {bound[f] for f in ("axis", "device", "precision")} == {"QComboBox"}
    assert {bound[f] for f in ("firstSlice", "lastSlice", "imageSize")} == {"QSpinBox"}
    assert bound["useSliceRange"] == bound["cropEnsemble"] == bound["randomWalk"] == "QCheckBox"


# --- CMake ------------------------------------------------------------------------------------------------------


def cmake_commands(text: str) -> list[tuple[str, str]]:
    """(command, arguments) pairs of a CMake file, comments removed; asserts parentheses balance."""
    code = "\n".join(line.split("#", 1)[0] if '"' not in line else line for line in text.splitlines())
    depth = 0
    for char in code:
        depth += {"(": 1, ")": -1}.get(char, 0)
        assert depth >= 0, "a ')' closes nothing"
    assert depth == 0, "unbalanced parentheses"
    return [(m.group(1), m.group(2)) for m in re.finditer(r"(\w+)\s*\(([^()]*(?:\([^()]*\)[^()]*)*)\)", code)]


def test_top_level_cmake_sets_the_extension_metadata_and_includes_slicer():
    found = cmake_commands((EXTENSION / "CMakeLists.txt").read_text())
    names = [c for c, _ in found]
    for command in ("cmake_minimum_required", "project", "find_package", "add_subdirectory", "include"):
        assert command in names, command
    variables = {args.split()[0]: args for c, args in found if c == "set"}
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert variable in variables, variable
    includes = [args.strip() for c, args in found if c == "include"]
    assert includes == ["${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"]
    assert ("add_subdirectory", "OneShotPropagate") in found


def test_module_cmake_lists_every_module_file_and_each_exists():
    found = cmake_commands((MODULE_DIR / "CMakeLists.txt").read_text())
    assert "slicerMacroBuildScriptedModule" in [c for c, _ in found]
    variables = {args.split()[0]: args.split()[1:] for c, args in found if c == "set"}
    module_name = variables["MODULE_NAME"][0]
    assert module_name == "OneShotPropagate"
    listed = {
        token.replace("${MODULE_NAME}", module_name)
        for key in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES")
        for token in variables[key]
    }
    for item in listed:
        assert (MODULE_DIR / item).is_file(), f"CMakeLists lists {item}, which does not exist"
    shipped = {
        p.relative_to(MODULE_DIR).as_posix()
        for p in MODULE_DIR.rglob("*")
        if p.is_file() and p.suffix in (".py", ".ui", ".png", ".txt") and p.name != "CMakeLists.txt"
        and "__pycache__" not in p.parts
    }
    assert shipped == listed, f"not listed: {sorted(shipped - listed)}; listed but absent: {sorted(listed - shipped)}"


FAKE_SLICER_CONFIG = r"""
# Stand-in for Slicer's CMake package: defines what an extension's CMake code calls and records it.
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/GenerateConfig.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/CPack.cmake)
"""
FAKE_USE_SLICER = r"""
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT MY_NAME OR NOT MY_SCRIPTS)
    message(FATAL_ERROR "slicerMacroBuildScriptedModule needs NAME and SCRIPTS")
  endif()
  foreach(file ${MY_SCRIPTS} ${MY_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${file})
      message(FATAL_ERROR "listed file does not exist: ${file}")
    endif()
    file(APPEND ${CMAKE_BINARY_DIR}/fake-slicer.log "file ${MY_NAME} ${file}\n")
  endforeach()
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
  if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT})
    message(FATAL_ERROR "unittest script does not exist: ${MY_SCRIPT}")
  endif()
  file(APPEND ${CMAKE_BINARY_DIR}/fake-slicer.log "unittest ${MY_SCRIPT}\n")
endfunction()
"""
FAKE_GENERATE_CONFIG = r"""
foreach(variable EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION
        EXTENSION_ICONURL EXTENSION_DEPENDS)
  if(NOT DEFINED ${variable} OR "${${variable}}" STREQUAL "")
    message(FATAL_ERROR "${variable} is not set")
  endif()
  file(APPEND ${CMAKE_BINARY_DIR}/fake-slicer.log "meta ${variable}=${${variable}}\n")
endforeach()
"""
FAKE_CPACK = 'file(APPEND ${CMAKE_BINARY_DIR}/fake-slicer.log "cpack ${PROJECT_NAME}\\n")\n'


HAS_CMAKE_AND_COMPILER = shutil.which("cmake") is not None and any(
    shutil.which(name) for name in ("c++", "g++", "clang++", "cl")
)


@pytest.mark.skipif(not HAS_CMAKE_AND_COMPILER, reason="cmake or a C++ compiler (needed by project()) is missing")
def test_cmake_configures_against_a_stand_in_slicer_package(tmp_path):
    fake = tmp_path / "FakeSlicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(FAKE_SLICER_CONFIG)
    (fake / "UseSlicer.cmake").write_text(FAKE_USE_SLICER)
    (fake / "GenerateConfig.cmake").write_text(FAKE_GENERATE_CONFIG)
    (fake / "CPack.cmake").write_text(FAKE_CPACK)
    build = tmp_path / "build"
    result = subprocess.run(
        ["cmake", "-S", str(EXTENSION), "-B", str(build), f"-DSlicer_DIR={fake}", "-DBUILD_TESTING=ON"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (build / "fake-slicer.log").read_text().splitlines()
    assert "unittest OneShotPropagate.py" in log
    assert "file OneShotPropagate SegmentEditorOneShotPropagateLib/SegmentEditorEffect.py" in log
    assert "meta EXTENSION_DEPENDS=PyTorch" in log and "meta EXTENSION_CATEGORY=Segmentation" in log
    assert log[-1] == "cpack OneShotPropagate"


# --- icons, index entry, requirements -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "size"),
    [(MODULE_DIR / "Resources" / "Icons" / "OneShotPropagate.png", (128, 128)),
     (MODULE_DIR / "SegmentEditorOneShotPropagateLib" / "SegmentEditorEffect.png", (21, 21))],
)
def test_icons_are_png_of_the_usual_size(path, size):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size


def test_extension_index_entry_follows_the_catalog_schema_and_matches_cmake():
    # Keys of Slicer's slicer-extension-catalog-entry-schema-v1.0.2.json (additionalProperties: false).
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
    entry = json.loads((EXTENSION / "OneShotPropagate.json").read_text())
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    cmake = (EXTENSION / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake
    assert f'set(EXTENSION_DEPENDS "{";".join(entry["build_dependencies"])}")' in cmake
    assert 1 <= entry["tier"] <= 5 and entry["scm_type"] in ("git", "local")


def test_readme_covers_installation_and_the_clinicians_steps():
    text = (EXTENSION / "README.md").read_text(encoding="utf-8")
    for phrase in ("Extension Manager", "Additional module paths", "PyTorch", "DINOv3", "Segment Editor",
                   "One-shot propagate", "Save", "CPU", "GPU", "--testing"):
        assert phrase in text, phrase
