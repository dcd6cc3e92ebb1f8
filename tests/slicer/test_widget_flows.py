"""The module's Widget code run end to end with the Qt layer replaced by small stand-ins.

3D Slicer's Qt classes do not exist outside Slicer, so ``qt``, the ``ScriptedLoadableModule``
base classes and the parameter node wrapper are replaced here by minimal stand-ins (timers that
the test fires, widgets that hold ``text``/``value``/``enabled``, buttons whose clicks the test
calls). Everything else is real: ``ThyroidNodule.py`` itself, the logic, the MRML scene
(slicer-core) and the servers. This checks that the widget glue runs: buttons start worker
tasks, answers reach the panel, errors become one message box, and the address history is kept.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from .conftest import CONFIRMED
from .helpers import MODULE_DIR, FakeServer, closed_port_url, json_answer, load_like_slicer


# ---------------------------------------------------------------------------- Qt stand-ins
class Signal:
    def __init__(self) -> None:
        self.slots = []

    def connect(self, slot) -> None:
        self.slots.append(slot)


class QTimer:
    #: every timer made since the panel was built (the test fires them as Qt's event loop would)
    created: list = []

    def __init__(self) -> None:
        self.timeout = Signal()
        self.active = False
        self.interval = 0
        QTimer.created.append(self)

    def fire(self) -> None:
        for slot in list(self.timeout.slots):
            slot()

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


class QSettings:
    store: dict = {}

    def value(self, key, default=None):
        return QSettings.store.get(key, default)

    def setValue(self, key, value) -> None:
        QSettings.store[key] = value


class Widget:
    """Any widget of the .ui file: the properties the module reads and writes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.enabled = True
        self.text = ""
        self.value = 0
        self.clicked = Signal()
        self.buttonsVisible = False
        self.placeMultipleMarkups = None
        self.escaped = []

    def setMRMLScene(self, scene) -> None:
        self.scene = scene

    def click(self) -> None:
        """Call the slots as PythonQt does: an exception a slot lets escape (after
        ``tryWithErrorDisplay`` showed it) is printed to Slicer's console, not raised."""
        for slot in self.clicked.slots:
            try:
                slot()
            except Exception as e:  # noqa: BLE001 - recorded like PythonQt's console output
                self.escaped.append(e)


class ComboBox(Widget):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.items = []
        self.currentText = ""

    def clear(self) -> None:
        self.items = []

    def addItem(self, text: str) -> None:
        self.items.append(text)

    def setCurrentIndex(self, index: int) -> None:
        self.currentText = self.items[index]

    def setEditText(self, text: str) -> None:
        self.currentText = text


def parameter_node_wrapper(cls):
    """Stand-in of ``slicer.parameterNodeWrapper.parameterNodeWrapper``: typed attributes with
    defaults, a ModifiedEvent on every change (like the real wrapper's MRML node)."""
    import vtk

    fields = {name: getattr(cls, name, None) for name in cls.__annotations__}

    class Wrapped:
        def __init__(self, _node=None) -> None:
            object.__setattr__(self, "_observed", vtk.vtkObject())
            for name, default in fields.items():
                object.__setattr__(self, name, default)

        def __setattr__(self, name, value) -> None:
            object.__setattr__(self, name, value)
            self._observed.Modified()

        def AddObserver(self, *args):
            return self._observed.AddObserver(*args)

        def RemoveObserver(self, *args):
            return self._observed.RemoveObserver(*args)

        def connectGui(self, ui):
            type(self).connected = self  # the node the panel shows (as the real wrapper binds it)
            return "tag"

        def disconnectGui(self, tag) -> None:
            pass

    Wrapped.__name__ = cls.__name__
    Wrapped.connected = None
    return Wrapped


class Panel:
    """The stand-in environment and the module's widget built in it."""

    def __init__(self, monkeypatch, scene, tmp_path: Path) -> None:
        import slicer
        import slicer.util

        self.errors, self.infos = [], []
        qt = types.ModuleType("qt")
        qt.QTimer, qt.QSettings = QTimer, QSettings
        QTimer.created = []
        qt.Qt = types.SimpleNamespace(WaitCursor=3)
        QSettings.store = {}
        slm = types.ModuleType("slicer.ScriptedLoadableModule")

        class ScriptedLoadableModule:
            def __init__(self, parent) -> None:
                self.parent = parent

        class ScriptedLoadableModuleWidget:
            def __init__(self, parent=None) -> None:
                self.parent = parent or types.SimpleNamespace(isEntered=True)

            def setup(self) -> None:
                self.layout = types.SimpleNamespace(addWidget=lambda w: None)

            def resourcePath(self, name: str) -> str:
                return str(MODULE_DIR / "Resources" / name)

        class ScriptedLoadableModuleLogic:
            def __init__(self, parent=None) -> None:
                self.moduleName = "ThyroidNodule"

            def getParameterNode(self):
                return None

        import unittest

        class ScriptedLoadableModuleTest(unittest.TestCase):
            def delayDisplay(self, message, msec=None) -> None:
                self.shown = getattr(self, "shown", []) + [message]

        slm.ScriptedLoadableModule = ScriptedLoadableModule
        slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
        slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
        slm.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
        pnw = types.ModuleType("slicer.parameterNodeWrapper")
        pnw.parameterNodeWrapper = parameter_node_wrapper
        pnw.WithinRange = lambda lo, hi: (lo, hi)
        monkeypatch.setitem(sys.modules, "qt", qt)
        monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
        monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", pnw)
        monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
        monkeypatch.setattr(slicer, "app", types.SimpleNamespace(
            temporaryPath=str(tmp_path), setOverrideCursor=lambda c: None, restoreOverrideCursor=lambda: None,
            testingEnabled=lambda: False), raising=False)
        monkeypatch.setattr(slicer, "qSlicerMarkupsPlaceWidget", types.SimpleNamespace(ForcePlaceSingleMarkup=2),
                            raising=False)
        names = [w.get("name") for w in ET.parse(MODULE_DIR / "Resources" / "UI" / "ThyroidNodule.ui").getroot().iter("widget")]
        self.ui = types.SimpleNamespace(**{n: (ComboBox(n) if n.endswith("ComboBox") else Widget(n)) for n in names})
        self.ui.passwordLineEdit.text = ""
        self.ui.usernameLineEdit.text = ""
        root = Widget("ThyroidNodule")
        monkeypatch.setattr(slicer.util, "loadUI", lambda path: root)
        monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda w: self.ui)
        monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: self.errors.append(text))
        monkeypatch.setattr(slicer.util, "warningDisplay", lambda text, **kw: self.infos.append(text))
        monkeypatch.setattr(slicer.util, "infoDisplay", lambda text, **kw: self.infos.append(text))
        monkeypatch.setattr(slicer.util, "showStatusMessage", lambda text, ms=0: None)
        monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kw: None)
        from ThyroidNoduleLib.volumes import load_frame_file

        monkeypatch.setattr(slicer.util, "loadVolume", lambda path, props: load_frame_file(scene, path, props.get("name")))
        monkeypatch.syspath_prepend(str(MODULE_DIR))
        sys.modules.pop("ThyroidNodule", None)
        self.module = importlib.import_module("ThyroidNodule")
        self.widget = self.module.ThyroidNoduleWidget()
        self.widget.setup()
        self.main = threading.get_ident()

    @property
    def params(self):
        """The parameter node the panel is bound to."""
        return self.module.ThyroidNoduleParameterNode.connected

    def active_timer(self, interval_ms: int) -> QTimer:
        """The one running timer of this period (e.g. the module's ``TRAIN_POLL_INTERVAL_MS``)."""
        running = [t for t in QTimer.created if t.active and t.interval == interval_ms]
        assert len(running) == 1, f"{len(running)} running timers of {interval_ms} ms"
        return running[0]

    def wait(self, timeout: float = 300.0) -> None:
        """Fire the task timer (as Qt's event loop would) until the widget stops it: every
        worker task has been delivered."""
        deadline = time.monotonic() + timeout
        tasks = [t for t in QTimer.created if t.interval == self.module.POLL_INTERVAL_MS]
        while any(t.active for t in tasks):
            assert time.monotonic() < deadline, "worker tasks still running"
            for timer in tasks:
                if timer.active:
                    timer.fire()
            time.sleep(0.02)

    def close(self) -> None:
        self.widget.cleanup()
        sys.modules.pop("ThyroidNodule", None)


@pytest.fixture
def panel(monkeypatch, scene, tmp_path):
    p = Panel(monkeypatch, scene, tmp_path)
    yield p
    p.close()


# --------------------------------------------------------------------------------- flows
@pytest.mark.slow
def test_connect_classify_confirm_and_next_case_from_the_panel(panel, scene, server):
    ui = panel.ui
    assert ui.serverComboBox.items == ["http://127.0.0.1:8000"]  # the default until one is used
    ui.serverComboBox.currentText = server.url + "/"
    ui.testConnectionButton.click()
    panel.wait()
    assert ui.serverStatusLabel.text.startswith("Connected to Thyroid Nodule")
    assert QSettings.store["ThyroidNodule/serverUrlHistory"][0] == server.url

    assert not ui.classifyButton.enabled
    volume = load_like_slicer(scene, Path(CONFIRMED[6]["file"]))
    panel.params.inputVolume = volume
    assert ui.classifyButton.enabled
    ui.classifyButton.click()
    panel.wait()
    assert panel.errors == []
    assert ("Benign" in ui.resultLabel.text) or ("Malignant" in ui.resultLabel.text)
    seg = panel.params.maskSegmentation
    assert seg is not None and seg.IsA("vtkMRMLSegmentationNode")
    assert panel.params.resultsTable.GetNumberOfRows() == 1

    panel.params.heatOpacity = 0.8
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundOpacity() == pytest.approx(0.8)

    ui.confirmMalignantButton.click()
    panel.wait()
    assert panel.errors == []
    image_id = volume.GetAttribute("ThyroidNodule.ServerImageId")
    assert ui.statusLabel.text.startswith(f"Recorded on the server: {image_id} is malignant")
    assert panel.widget.logic.client.image_info(image_id)["diagnosis"] == "malignant"

    ui.nextCaseButton.click()
    panel.wait()
    assert panel.errors == []
    nxt = panel.params.inputVolume
    assert nxt is not volume and nxt.GetAttribute("ThyroidNodule.ServerImageId")
    assert ui.statusLabel.text.startswith("Next case ")


def test_panel_shows_one_message_when_the_server_is_down(panel, scene):
    ui = panel.ui
    url = closed_port_url()
    ui.serverComboBox.currentText = url
    gray = np.zeros((1, 40, 40), np.uint8)
    from .helpers import RASTER_IJK_TO_RAS, add_volume

    panel.params.inputVolume = add_volume(scene, gray, RASTER_IJK_TO_RAS, "frame")
    ui.classifyButton.click()
    panel.wait()
    assert len(panel.errors) == 1 and "connection refused" in panel.errors[0] and url in panel.errors[0]
    assert ui.statusLabel.text == panel.errors[0]
    assert ui.classifyButton.enabled  # ready for another try

    ui.serverComboBox.currentText = "ftp://nowhere"
    ui.testConnectionButton.click()
    panel.wait()
    assert len(panel.errors) == 2 and "http:// or https://" in panel.errors[1]
    assert panel.errors[1].startswith("Cannot test the connection.")
    assert "ThyroidNodule/serverUrlHistory" not in QSettings.store  # a failed address is not remembered


def test_training_and_batch_progress_in_the_panel(panel, scene):
    ui = panel.ui
    # log lines that disagree with the declared fields: the panel shows the declared ones
    train_states = iter([
        {"status": "RUNNING", "details": ["[train] epoch 2/2 step 1/2 loss 0.70"]},
        {"status": "DONE", "details": ["[train] epoch 1/2 done in 3.1s loss 0.52", "[train] published sha256:abc"]},
    ])
    stats = iter([
        {"status": "running", "epoch": 1, "total_epochs": 4},
        {"status": "done", "epoch": 2, "total_epochs": 2, "published": True, "model": "sha256:abc", "best_metric": 0.75,
         "metrics": {"auc": 0.75, "accuracy": 0.7, "sensitivity": 0.6, "specificity": 0.8, "threshold": 0.62}},
    ])
    result = {"label": "malignant", "probabilities": {"benign": 0.1, "malignant": 0.9}, "model": "sha256:abc"}
    store = {"objects": {"a": {"labels": {"original": {"info": {"params": result}}}}, "b": {"labels": {}}}}
    routes = {
        "POST /train/classify_nodule": lambda h, b: json_answer(200, {"status": "SUBMITTED", "request": json_body(b)}),
        "GET /train/": lambda h, b: json_answer(200, next(train_states)),
        "GET /info/": lambda h, b: json_answer(200, {"train_stats": {"classify_nodule": next(stats)}}),
        "POST /batch/infer/classify_nodule": lambda h, b: json_answer(200, {"status": "SUBMITTED"}),
        "GET /batch/infer": lambda h, b: json_answer(200, {"status": "DONE", "details": [
            '{"batch_progress": {"done": 2, "total": 2, "unit": "images"}}', "[batch] 1/2 images"]}),
        "GET /datastore/": lambda h, b: json_answer(200, store),
    }
    with FakeServer(routes) as fake:
        ui.serverComboBox.currentText = fake.url
        panel.params.trainEpochs = 2
        ui.trainButton.click()
        panel.wait()
        assert fake.requests[0][3] == b'{"max_epochs": 2, "publish": "if_better"}'
        poll = panel.active_timer(panel.module.TRAIN_POLL_INTERVAL_MS)
        assert not ui.trainButton.enabled and ui.stopTrainingButton.enabled
        poll.fire()
        panel.wait()
        assert ui.trainProgressBar.value == 25 and ui.trainStatusLabel.text == "Training: 1 of 4 epochs done."
        poll.fire()
        panel.wait()
        assert ui.trainProgressBar.value == 100 and not poll.active
        assert ui.trainStatusLabel.text.startswith(
            "Training finished (2/2 epochs): validation auc 0.75, accuracy 0.70, sensitivity 0.60, specificity 0.80 at threshold 0.62;")
        assert ui.trainButton.enabled and not ui.stopTrainingButton.enabled

        ui.classifyAllButton.click()
        panel.wait()
        poll = panel.active_timer(panel.module.BATCH_POLL_INTERVAL_MS)
        assert not ui.classifyAllButton.enabled
        poll.fire()
        panel.wait()
        assert not poll.active
        assert ui.classifyAllButton.enabled and ui.batchProgressBar.value == 100
        assert ui.statusLabel.text == "Classified 1 images of the server; see the results table."
        from ThyroidNoduleLib.results import table_rows

        rows = table_rows(panel.params.resultsTable)
        assert rows[-1]["Image ID"] == "a" and rows[-1]["Label"] == "malignant" and rows[-1]["Source"] == "batch"
    assert panel.errors == []


@pytest.mark.slow
def test_the_modules_self_test_passes(panel, server, monkeypatch):
    """ThyroidNoduleTest, the self-test shipped for running inside Slicer, passes here too (with
    Slicer's NRRD reader from slicer-core and the live-server part against the real server)."""
    monkeypatch.setenv("THYROID_NODULE_SERVER_URL", server.url)
    test = panel.module.ThyroidNoduleTest()
    test.runTest()
    assert test.shown[-1] == "Live server test passed"
    assert {"Frame file test passed", "ROI test passed", "Client failure test passed"} <= set(test.shown)


def json_body(body: bytes):
    import json

    return json.loads(body or b"{}")


def test_validation_metrics_say_the_threshold_they_are_at():
    from ThyroidNoduleLib import ConnectionReport, TrainingProgress

    served = {"auc": 0.899, "accuracy": 0.808, "sensitivity": 0.774, "specificity": 1.0, "f1": 0.873, "threshold": 0.879}
    report = ConnectionReport(url="http://s", app="Thyroid Nodule", model="sha256:ab", metrics=served, model_error="",
                              auth=False, datastore={})
    assert "Model sha256:ab: validation auc 0.90, accuracy 0.81, sensitivity 0.77, specificity 1.00 at threshold 0.88." in report.message()
    # a model whose thresholded figures are unknown at the served threshold: the AUC alone, no threshold
    report.metrics = {"auc": 0.9, "threshold": 0.879}
    assert "Model sha256:ab: validation auc 0.90." in report.message()
    # whether the probability a user reads is calibrated, and how well, as the server's record says
    assert "Probabilities not calibrated" in report.message()
    report.calibration = {"method": "platt", "scale": 1.3, "shift": 0.9, "val_ece_before": 0.2694, "val_ece_after": 0.0313}
    assert "Probabilities calibrated on validation cases (Platt scaling): calibration error 0.27 before, 0.03 after." \
        in report.message()
    report.calibration = {"method": "none"}
    assert "Probabilities not calibrated" in report.message()
    done = TrainingProgress(status="DONE", epoch=1, total_epochs=1, metrics=served, published=True, model="sha256:cd")
    assert "validation auc 0.90, accuracy 0.81, sensitivity 0.77, specificity 1.00 at threshold 0.88;" in done.message()
