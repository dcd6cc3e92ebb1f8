"""The Slicer extension's structure, checked without Slicer (its Qt module file cannot be
imported here): imports allowed in Slicer's Python, CMake lists, UI file, icon, thin widget."""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.support.paths import REPO

from .helpers import EXAMPLE, LIB_DIR, MODULE_DIR

MODULE_FILE = MODULE_DIR / "ThyroidNodule.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "ThyroidNodule.ui"
ICON = MODULE_DIR / "Resources" / "Icons" / "ThyroidNodule.png"
LIB_FILES = sorted(LIB_DIR.glob("*.py"))
#: never available in Slicer's Python (or not wanted there)
FORBIDDEN = {"torch", "torchvision", "monai", "monailabel", "thyroid_plugin", "ignite", "requests", "requests_toolbelt",
             "PIL", "nrrd", "itk", "SimpleITK", "pydicom", "nibabel", "scipy"}
#: what the Lib may import besides the standard library
LIB_ALLOWED = {"numpy", "vtk", "vtkmodules", "slicer"}


def imports(path: Path) -> set:
    """Top-level names of every absolute import in a file (relative imports excluded)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", [MODULE_FILE, *LIB_FILES], ids=lambda p: p.name)
def test_no_torch_monai_or_library_imports(path):
    assert not imports(path) & FORBIDDEN


@pytest.mark.parametrize("path", LIB_FILES, ids=lambda p: p.name)
def test_lib_imports_only_stdlib_numpy_vtk_slicer(path):
    others = {n for n in imports(path) if n not in sys.stdlib_module_names and n not in LIB_ALLOWED}
    assert not others, f"{path.name} imports {others}"


def test_module_imports_only_what_slicer_has():
    allowed = LIB_ALLOWED | {"qt", "ctk", "ThyroidNoduleLib"}
    others = {n for n in imports(MODULE_FILE) if n not in sys.stdlib_module_names and n not in allowed}
    assert not others
    top_level = set()
    for node in module_tree().body:  # the self-test's fake server imports http.server locally; fine
        if isinstance(node, ast.Import):
            top_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    network = {"urllib", "http", "socket"}
    assert not top_level & network
    widget_names = {n.id for n in ast.walk(classes()["ThyroidNoduleWidget"]) if isinstance(n, ast.Name)}
    assert not widget_names & network, "the widget must not do network I/O itself"


def test_cmake_lists_every_module_file_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = set(re.findall(r"\$\{MODULE_NAME\}Lib/(\w+\.py)", text))
    assert scripts == {p.name for p in LIB_FILES}
    assert "${MODULE_NAME}.py" in text and "slicerMacroBuildScriptedModule" in text
    for resource in re.findall(r"(Resources/\S+)", text):
        assert (MODULE_DIR / resource.replace("${MODULE_NAME}", "ThyroidNodule")).is_file(), resource
    extension = (REPO / "slicer_module" / "CMakeLists.txt").read_text()
    assert "add_subdirectory(ThyroidNodule)" in extension and "find_package(Slicer REQUIRED)" in extension
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_icon_is_a_real_png():
    from PIL import Image

    for path in (ICON, REPO / "slicer_module" / "ThyroidNodule.png"):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (128, 128)
            assert len(set(im.convert("RGB").getdata())) > 50  # a picture, not a flat square


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text())


def classes() -> dict:
    return {n.name: n for n in module_tree().body if isinstance(n, ast.ClassDef)}


def test_slicer_module_classes_follow_the_conventions():
    c = classes()
    bases = {name: [ast.unparse(b) for b in node.bases] for name, node in c.items()}
    assert bases["ThyroidNodule"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in bases["ThyroidNoduleWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["ThyroidNoduleLogic"] and "NoduleLogic" in bases["ThyroidNoduleLogic"]
    assert bases["ThyroidNoduleTest"] == ["ScriptedLoadableModuleTest"]
    assert [ast.unparse(d) for d in c["ThyroidNoduleParameterNode"].decorator_list] == ["parameterNodeWrapper"]
    tests = [f.name for f in c["ThyroidNoduleTest"].body if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")]
    run = next(f for f in c["ThyroidNoduleTest"].body if isinstance(f, ast.FunctionDef) and f.name == "runTest")
    called = {n.func.attr for n in ast.walk(run) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert set(tests) <= called, "runTest must run every self-test"


def test_ui_file_matches_the_widget_and_the_parameter_node():
    root = ET.parse(UI_FILE).getroot()
    widgets = {w.get("name") for w in root.iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used <= widgets, f"widgets missing from the .ui file: {used - widgets}"
    bound = {w.get("name"): w.find("./property[@name='SlicerParameterName']/string").text
             for w in root.iter("widget") if w.find("./property[@name='SlicerParameterName']") is not None}
    fields = {n.target.id for n in classes()["ThyroidNoduleParameterNode"].body if isinstance(n, ast.AnnAssign)}
    assert set(bound.values()) == fields, "every parameter has a widget and every bound widget a parameter"
    for connection in root.iter("connection"):
        assert connection.find("sender").text in widgets | {"ThyroidNodule"}
        assert connection.find("receiver").text in widgets


NETWORK_METHODS = {"test_connection", "request_classification", "send_confirmation", "request_next_case",
                   "start_training", "training_progress", "stop_training", "start_batch", "batch_progress",
                   "batch_results", "classify", "confirm", "next_case", "classify_all"}


def test_widget_is_thin_and_never_blocks_on_the_network():
    """Every network call of the widget goes through ``self._run`` (worker thread); every button
    handler wraps its work in ``slicer.util.tryWithErrorDisplay``; the address history lives in
    ``qt.QSettings``."""
    widget = classes()["ThyroidNoduleWidget"]
    inside_run = set()
    for node in ast.walk(widget):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "_run":
            inside_run |= {id(n) for arg in node.args for n in ast.walk(arg)}
    for node in ast.walk(widget):
        if isinstance(node, ast.Attribute) and node.attr in NETWORK_METHODS and ast.unparse(node.value) == "self.logic":
            assert id(node) in inside_run, f"self.logic.{node.attr} is called outside self._run"
    methods = {f.name: f for f in widget.body if isinstance(f, ast.FunctionDef)}
    handlers = [name for name in methods if re.fullmatch(r"on\w+Clicked", name)]
    assert len(handlers) >= 9
    for name in handlers:
        body = methods[name]
        wrapped = any(isinstance(n, ast.With) and "tryWithErrorDisplay" in ast.unparse(n.items[0].context_expr)
                      for n in ast.walk(body))
        delegated = [ast.unparse(n.func) for n in ast.walk(body) if isinstance(n, ast.Call)]
        assert wrapped or any(
            d.startswith("self._") and any(isinstance(n, ast.With) and "tryWithErrorDisplay" in ast.unparse(n)
                                           for n in ast.walk(methods[d[len("self."):]]))
            for d in delegated if d[len("self."):] in methods), name
    assert "qt.QSettings" in ast.unparse(widget)
    assert len(ast.unparse(widget).splitlines()) < 400


def test_example_is_runnable_python():
    tree = ast.parse(EXAMPLE.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    assert "PIL" in imports(EXAMPLE) or "from PIL import Image" in EXAMPLE.read_text()


def test_readme_explains_install_and_self_test():
    text = (REPO / "slicer_module" / "README.md").read_text()
    for words in ("Extension Wizard", "additional module path", "self-test", "THYROID_NODULE_SERVER_URL",
                  "classify_with_slicer_core.py"):
        assert words.lower() in text.lower(), words
