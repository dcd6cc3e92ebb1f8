"""3D Slicer scripted module "Thyroid Nodule": the clinician's side of the thyroid nodule plugin.

Classifies a thyroid nodule in a 2D ultrasound frame as benign or malignant on a MONAI Label
server running the ``thyroid_nodule`` app, shows the saliency mask over the image, records
confirmed diagnoses, fetches the next case proposed by active learning, retrains the model and
classifies the server's whole datastore. It talks to the server over REST only (no torch,
MONAI or thyroid_plugin in Slicer's Python).

The widget is thin: everything is done by :class:`ThyroidNoduleLogic` (``ThyroidNoduleLib``);
network calls run in worker threads (``ThyroidNoduleLib.tasks.BackgroundTasks``) whose results
are delivered on the main thread by a ``qt.QTimer``, so Slicer never freezes.
"""

import logging
import os
import traceback
from typing import Annotated, Any, Callable, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from ThyroidNoduleLib import (
    BackgroundTasks,
    Classification,
    ConnectionFailedError,
    NoduleLogic,
    ServerError,
    ThyroidNoduleError,
    Timeouts,
    TrainingProgress,
    normalize_url,
)
from ThyroidNoduleLib.logic import BatchProgress, ConnectionReport, NextCase
from ThyroidNoduleLib.results import DEFAULT_TABLE_NAME
from ThyroidNoduleLib.settings import DEFAULT_SERVER_URL, SETTINGS_HISTORY_KEY, update_history

POLL_INTERVAL_MS = 100
TRAIN_POLL_INTERVAL_MS = 3000
BATCH_POLL_INTERVAL_MS = 3000
#: consecutive failed progress polls after which polling stops (the error is shown)
MAX_POLL_FAILURES = 3


# --------------------------------------------------------------------------------------- module
class ThyroidNodule(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Thyroid Nodule"
        self.parent.categories = ["Ultrasound"]
        self.parent.dependencies = []
        self.parent.contributors = ["Thyroid Nodule plugin developers"]
        self.parent.helpText = """
Benign/malignant classification of a thyroid nodule in a 2D ultrasound frame, with a saliency mask,
by a MONAI Label server running the <i>thyroid_nodule</i> app. Connect to the server, select a frame
(optionally place a box around the nodule), press <b>Classify nodule</b>; confirm the diagnosis to
add the case to the server's training data; <b>Next case</b> loads the image the model is least sure
about; <b>Train</b> retrains the model on the confirmed cases.
<br><b>Research software. Not a medical device; not for diagnosis.</b>
"""
        self.parent.acknowledgementText = """
Method: "Self-supervised saliency-guided dual-attention fusion for benign-malignant thyroid nodule
diagnosis in ultrasound" (Neurocomputing 685, 2026). Built on MONAI Label and 3D Slicer.
"""


# ------------------------------------------------------------------------------- parameter node
@parameterNodeWrapper
class ThyroidNoduleParameterNode:
    """The module's state, saved with the scene.

    inputVolume: the ultrasound frame (scalar or vector volume, one slice).
    roi: optional markups ROI around the nodule.
    maskSegmentation: the (editable) saliency mask of the last classification.
    resultsTable: the results table.
    heatOpacity: opacity of the saliency heat overlay, 0..1.
    includeMask: send the mask segmentation with a confirmed diagnosis.
    trainEpochs: epochs of a training run.
    publishAlways: use the newly trained model even if it is not better.
    inferTimeout: time limit of one classification request, seconds.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    roi: vtkMRMLMarkupsROINode
    maskSegmentation: vtkMRMLSegmentationNode
    resultsTable: vtkMRMLTableNode
    heatOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    includeMask: bool = True
    trainEpochs: Annotated[int, WithinRange(1, 1000)] = 20
    publishAlways: bool = False
    inferTimeout: Annotated[float, WithinRange(10.0, 3600.0)] = 180.0


# ----------------------------------------------------------------------------------------- widget
class ThyroidNoduleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: binds the UI to the parameter node and runs logic calls."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[ThyroidNoduleLogic] = None
        self._parameterNode: Optional[ThyroidNoduleParameterNode] = None
        self._parameterNodeGuiTag = None
        self._tasks = BackgroundTasks()
        self._lastOpacity: Optional[float] = None
        self._pollFailures = {"train": 0, "batch": 0}

    # ----------------------------------------------------------------------------- set up
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ThyroidNodule.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = ThyroidNoduleLogic()

        self._taskTimer = qt.QTimer()
        self._taskTimer.setInterval(POLL_INTERVAL_MS)
        self._taskTimer.timeout.connect(self._deliverTasks)
        self._trainTimer = qt.QTimer()
        self._trainTimer.setInterval(TRAIN_POLL_INTERVAL_MS)
        self._trainTimer.timeout.connect(self._pollTraining)
        self._batchTimer = qt.QTimer()
        self._batchTimer.setInterval(BATCH_POLL_INTERVAL_MS)
        self._batchTimer.timeout.connect(self._pollBatch)

        self.ui.roiPlaceWidget.buttonsVisible = True
        self.ui.roiPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.testConnectionButton.clicked.connect(self.onTestConnectionClicked)
        self.ui.classifyButton.clicked.connect(self.onClassifyClicked)
        self.ui.nextCaseButton.clicked.connect(self.onNextCaseClicked)
        self.ui.confirmBenignButton.clicked.connect(self.onConfirmBenignClicked)
        self.ui.confirmMalignantButton.clicked.connect(self.onConfirmMalignantClicked)
        self.ui.editMaskButton.clicked.connect(self.onEditMaskClicked)
        self.ui.trainButton.clicked.connect(self.onTrainClicked)
        self.ui.stopTrainingButton.clicked.connect(self.onStopTrainingClicked)
        self.ui.classifyAllButton.clicked.connect(self.onClassifyAllClicked)

        self._loadServerHistory()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        for timer in (self._taskTimer, self._trainTimer, self._batchTimer):
            timer.stop()
        self._tasks.shutdown()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode: Optional[ThyroidNoduleParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        p = self._parameterNode
        hasVolume = bool(p and p.inputVolume)
        self.ui.classifyButton.enabled = hasVolume and not self._tasks.busy("classify")
        self.ui.confirmBenignButton.enabled = hasVolume and not self._tasks.busy("confirm")
        self.ui.confirmMalignantButton.enabled = hasVolume and not self._tasks.busy("confirm")
        self.ui.editMaskButton.enabled = bool(p and p.maskSegmentation and p.inputVolume)
        if p and self._lastOpacity != p.heatOpacity:
            self._lastOpacity = p.heatOpacity
            self.logic.set_heat_opacity(p.inputVolume, p.heatOpacity)

    # ------------------------------------------------------------------- server and tasks
    def _loadServerHistory(self) -> None:
        history = qt.QSettings().value(SETTINGS_HISTORY_KEY)
        if isinstance(history, str):
            history = [history]
        history = list(history or [])
        self.ui.serverComboBox.clear()
        for url in history or [DEFAULT_SERVER_URL]:
            self.ui.serverComboBox.addItem(url)
        self.ui.serverComboBox.setCurrentIndex(0)

    def _rememberServer(self, url: str) -> None:
        settings = qt.QSettings()
        history = settings.value(SETTINGS_HISTORY_KEY)
        history = [history] if isinstance(history, str) else list(history or [])
        history = update_history(history, url)
        settings.setValue(SETTINGS_HISTORY_KEY, history)
        current = self.ui.serverComboBox.currentText
        self.ui.serverComboBox.clear()
        for item in history:
            self.ui.serverComboBox.addItem(item)
        self.ui.serverComboBox.setEditText(current)

    def _ensureClient(self):
        """The logic's client for the address and credentials currently entered."""
        url = normalize_url(self.ui.serverComboBox.currentText)
        timeouts = Timeouts(infer=float(self._parameterNode.inferTimeout if self._parameterNode else 180.0))
        username, password = self.ui.usernameLineEdit.text.strip(), self.ui.passwordLineEdit.text
        client = self.logic.client
        if (client is None or client.base_url != url or client.username != username or client.password != password
                or client.timeouts != timeouts):
            client = self.logic.connect(url, username, password, timeouts)
        return client

    def _run(self, name: str, work: Callable[[], Any], onDone: Callable[[Any], None], busyMessage: str = "",
             onError: Optional[Callable[[BaseException], None]] = None) -> None:
        """Run ``work()`` (network only) in a worker thread; ``onDone(result)`` or the error
        display then run on the main thread."""
        if busyMessage:
            self._setStatus(busyMessage)

        def done(result):
            self._onParameterNodeModified()
            with slicer.util.tryWithErrorDisplay("The server's answer could not be shown.", waitCursor=False):
                onDone(result)

        def failed(error):
            self._onParameterNodeModified()
            (onError or self._showError)(error)

        self._tasks.submit(name, work, done, failed)
        self._onParameterNodeModified()
        self._taskTimer.start()

    def _deliverTasks(self) -> None:
        self._tasks.poll()
        if not self._tasks.busy():
            self._taskTimer.stop()

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text
        if text:
            slicer.util.showStatusMessage(text, 5000)

    def _showError(self, error: BaseException) -> None:
        if isinstance(error, ThyroidNoduleError):
            self._setStatus(str(error))
            slicer.util.errorDisplay(str(error), detailedText=getattr(error, "detail", "") or None)
        else:
            trace = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            logging.error("Thyroid Nodule: unexpected error: %s", trace)
            self._setStatus(f"Unexpected error: {error}")
            slicer.util.errorDisplay(f"Unexpected error: {error}", detailedText=trace)

    # ------------------------------------------------------------------------ connection
    def onTestConnectionClicked(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot test the connection.", waitCursor=True):
            client = self._ensureClient()
            self.ui.serverStatusLabel.text = f"Connecting to {client.base_url}..."

            def done(report: ConnectionReport) -> None:
                self._rememberServer(report.url)
                self.ui.serverStatusLabel.text = report.message()
                self._setStatus("")

            def failed(error: BaseException) -> None:
                self.ui.serverStatusLabel.text = str(error)
                self._showError(error)

            self._run("connect", self.logic.test_connection, done, onError=failed)

    # ------------------------------------------------------------------------ classify
    def onClassifyClicked(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot classify the image.", waitCursor=True):
            self._ensureClient()
            p = self._parameterNode
            prepared = self.logic.prepare_frame(p.inputVolume, p.roi)
            self.ui.resultLabel.text = ""
            self._run("classify", lambda: self.logic.request_classification(prepared),
                      lambda response: self._showClassification(
                          self.logic.apply_classification(prepared, response, p.resultsTable, p.heatOpacity)),
                      f"Classifying {prepared.volume_name}...")

    def _showClassification(self, c: Classification) -> None:
        colour = "#c0392b" if c.label == "malignant" else "#1e8449"
        self.ui.resultLabel.text = (f"<span style='font-size:14pt; color:{colour}'><b>{c.summary()}</b></span>"
                                    f"<br>malignant probability {c.prob_malignant:.2f} (threshold {c.threshold:.2f})"
                                    f"<br><small>model {c.model}</small>")
        p = self._parameterNode
        if c.mask_segmentation is not None:
            p.maskSegmentation = c.mask_segmentation
        if c.server_box is not None and p.roi is None:
            p.roi = c.server_box  # the localiser's box becomes the input box: move it and classify again
        if not p.resultsTable:
            p.resultsTable = slicer.mrmlScene.GetFirstNodeByName(DEFAULT_TABLE_NAME)
        self._setStatus(c.warning or " ".join(t for t in (f"{c.volume_name}: {c.summary()}.", c.advice) if t))
        if c.warning:
            slicer.util.warningDisplay(c.warning)

    def onEditMaskClicked(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot open the mask in Segment Editor.", waitCursor=True):
            p = self._parameterNode
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(p.maskSegmentation)
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(p.inputVolume)
            else:
                editor.setMasterVolumeNode(p.inputVolume)

    # ------------------------------------------------------------------------- confirm
    def onConfirmBenignClicked(self) -> None:
        self._confirm("benign")

    def onConfirmMalignantClicked(self) -> None:
        self._confirm("malignant")

    def _confirm(self, diagnosis: str) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot record the diagnosis.", waitCursor=True):
            self._ensureClient()
            p = self._parameterNode
            prepared = self.logic.prepare_confirmation(p.inputVolume, diagnosis, p.maskSegmentation if p.includeMask else None,
                                                       p.roi)

            def done(stored) -> None:
                image_id = self.logic.apply_confirmation(prepared, stored, p.resultsTable)
                extra = " with the nodule mask" if prepared.mask_data is not None else ""
                self._setStatus(f"Recorded on the server: {image_id} is {diagnosis}{extra}.")

            self._run("confirm", lambda: self.logic.send_confirmation(prepared), done, f"Recording {diagnosis}...")

    # ------------------------------------------------------------------------ next case
    def onNextCaseClicked(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot get the next case.", waitCursor=True):
            self._ensureClient()
            self._run("next", self.logic.request_next_case, self._loadCase, "Asking the server for the next case...")

    def _loadCase(self, case: Optional[NextCase]) -> None:
        if case is None:
            self._setStatus("The server has no unconfirmed image left.")
            slicer.util.infoDisplay("The server has no unconfirmed image left.")
            return
        volume = self.logic.load_next_case(case)
        self._parameterNode.inputVolume = volume
        self._parameterNode.maskSegmentation = None
        self.ui.resultLabel.text = ""
        slicer.util.setSliceViewerLayers(background=volume, foreground=None, fit=True)
        p = case.sample.get("prob_malignant")
        u = case.sample.get("uncertainty")
        shown = f": malignant probability {float(p):.2f}, uncertainty {float(u):.2f}" if p is not None and u is not None else ""
        self._setStatus(f"Next case {case.image_id}{shown}.")

    # ------------------------------------------------------------------------- training
    def onTrainClicked(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot start training.", waitCursor=True):
            self._ensureClient()
            p = self._parameterNode
            epochs, publish = int(p.trainEpochs), "always" if p.publishAlways else "if_better"

            def started(_task) -> None:
                self.ui.trainStatusLabel.text = "Training started."
                self.ui.trainProgressBar.value = 0
                self._setTraining(True)
                self._pollFailures["train"] = 0
                self._trainTimer.start()

            self._run("train", lambda: self.logic.start_training(epochs, publish), started, "Starting training...")

    def onStopTrainingClicked(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot stop training.", waitCursor=True):
            self._ensureClient()
            self._run("trainStop", self.logic.stop_training, lambda _: self._pollTraining(), "Stopping training...")

    def _setTraining(self, running: bool) -> None:
        self.ui.trainButton.enabled = not running
        self.ui.stopTrainingButton.enabled = running

    def _pollTraining(self) -> None:
        if self._tasks.busy("trainStatus"):
            return

        def failed(error: BaseException) -> None:
            self._pollFailures["train"] += 1
            self.ui.trainStatusLabel.text = str(error)
            if self._pollFailures["train"] >= MAX_POLL_FAILURES:
                self._trainTimer.stop()
                self._setTraining(False)
                self._showError(error)

        self._run("trainStatus", self.logic.training_progress, self._showTraining, onError=failed)

    def _showTraining(self, progress: TrainingProgress) -> None:
        self._pollFailures["train"] = 0
        self.ui.trainStatusLabel.text = progress.message()
        if progress.fraction is not None:
            self.ui.trainProgressBar.value = int(round(100 * progress.fraction))
        self._setTraining(progress.running)
        if not progress.running:
            self._trainTimer.stop()
            self._setStatus(progress.message())

    # ---------------------------------------------------------------------------- batch
    def onClassifyAllClicked(self) -> None:
        with slicer.util.tryWithErrorDisplay("Cannot start classifying the server's images.", waitCursor=True):
            self._ensureClient()

            def started(_task) -> None:
                self.ui.classifyAllButton.enabled = False
                self.ui.batchProgressBar.value = 0
                self._pollFailures["batch"] = 0
                self._batchTimer.start()

            self._run("batch", self.logic.start_batch, started, "Classifying the server's images...")

    def _pollBatch(self) -> None:
        if self._tasks.busy("batchStatus"):
            return

        def failed(error: BaseException) -> None:
            self._pollFailures["batch"] += 1
            if self._pollFailures["batch"] >= MAX_POLL_FAILURES:
                self._batchTimer.stop()
                self.ui.classifyAllButton.enabled = True
                self._showError(error)

        self._run("batchStatus", self.logic.batch_progress, self._showBatch, onError=failed)

    def _showBatch(self, progress: BatchProgress) -> None:
        self._pollFailures["batch"] = 0
        if progress.total:
            self.ui.batchProgressBar.value = int(round(100 * (progress.done or 0) / progress.total))
        self._setStatus(progress.message())
        if progress.running:
            return
        self._batchTimer.stop()
        self.ui.classifyAllButton.enabled = True
        if progress.status == "DONE":
            p = self._parameterNode

            def show(batch) -> None:
                count = self.logic.add_batch_rows(batch, p.resultsTable)
                if not p.resultsTable:
                    p.resultsTable = slicer.mrmlScene.GetFirstNodeByName(DEFAULT_TABLE_NAME)
                self.ui.batchProgressBar.value = 100
                self._setStatus(f"Classified {count} images of the server; see the results table.")

            self._run("batchResults", self.logic.batch_results, show, "Reading the batch results...")
        else:
            slicer.util.errorDisplay(progress.message())


# ------------------------------------------------------------------------------------------ logic
def loadVolumeWithSlicer(scene, path: str, name: str):
    """Load an image file with Slicer's readers (ITK; DICOM files included)."""
    return slicer.util.loadVolume(path, {"name": name, "singleFile": True, "show": False})


class ThyroidNoduleLogic(NoduleLogic, ScriptedLoadableModuleLogic):
    """The module logic: :class:`ThyroidNoduleLib.NoduleLogic` over ``slicer.mrmlScene`` with
    Slicer's file readers, plus Slicer's parameter node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        NoduleLogic.__init__(self, slicer.mrmlScene, loader=loadVolumeWithSlicer)
        self.download_dir = os.path.join(slicer.app.temporaryPath, "ThyroidNodule")
        os.makedirs(self.download_dir, exist_ok=True)

    def getParameterNode(self) -> ThyroidNoduleParameterNode:
        return ThyroidNoduleParameterNode(super().getParameterNode())


# ------------------------------------------------------------------------------------------- test
class ThyroidNoduleTest(ScriptedLoadableModuleTest):
    """Self-test run inside 3D Slicer (Developer mode > Reload and Test, or the module's test).

    Without a server it checks the frame file against Slicer's own NRRD reader, the ROI box and
    the client's handling of a server that is down, answers 5xx, or answers JSON only (small
    local fake servers). With the environment variable ``THYROID_NODULE_SERVER_URL`` set to a
    running server it also classifies a synthetic frame there and checks the mask's geometry.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_FrameFileMatchesSlicer()
        self.setUp()
        self.test_RoiBox()
        self.setUp()
        self.test_ClientFailures()
        self.setUp()
        self.test_LiveServer()

    def _frame(self, rgb: bool):
        import numpy as np

        rng = np.random.default_rng(0)
        shape = (1, 40, 60, 3) if rgb else (1, 40, 60)
        array = rng.integers(0, 255, size=shape, dtype=np.uint8)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVectorVolumeNode" if rgb else "vtkMRMLScalarVolumeNode",
                                                  "rgb frame" if rgb else "gray frame")
        slicer.util.updateVolumeFromArray(node, array)
        node.SetSpacing(0.3, 0.4, 1.0)
        node.SetOrigin(12.5, -7.0, 3.0)
        directions = vtk.vtkMatrix4x4()
        directions.SetElement(0, 0, -1.0)
        directions.SetElement(1, 1, -1.0)
        node.SetIJKToRASDirectionMatrix(directions)
        return node, array

    def test_FrameFileMatchesSlicer(self) -> None:
        """The NRRD the module uploads loads in Slicer with the same voxels and geometry."""
        import numpy as np

        self.delayDisplay("Frame file versus Slicer's NRRD reader")
        logic = NoduleLogic(slicer.mrmlScene)
        for rgb in (False, True):
            node, array = self._frame(rgb)
            data, layout, grid = logic.frame_file(node)
            path = os.path.join(slicer.app.temporaryPath, f"ThyroidNoduleSelfTest{'RGB' if rgb else 'Gray'}.nrrd")
            with open(path, "wb") as fp:
                fp.write(data)
            loaded = slicer.util.loadVolume(path, {"singleFile": True, "show": False})
            self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(loaded), array))
            a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(a)
            loaded.GetIJKToRASMatrix(b)
            for r in range(4):
                for c in range(4):
                    self.assertAlmostEqual(a.GetElement(r, c), b.GetElement(r, c), places=6)
            self.assertEqual(grid["size"], [60, 40])
        self.delayDisplay("Frame file test passed")

    def test_RoiBox(self) -> None:
        """A markups ROI becomes the pixel box of the pixels whose centres it contains."""
        self.delayDisplay("ROI box")
        node, _ = self._frame(False)
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        # pixel (i, j) is at RAS (12.5 - 0.3 i, -7 - 0.4 j, 3): cover i in [10, 20], j in [5, 15]
        roi.SetCenter(12.5 - 0.3 * 15, -7.0 - 0.4 * 10, 3.0)
        roi.SetSize(0.3 * 10.5, 0.4 * 10.5, 1.0)
        self.assertEqual(NoduleLogic(slicer.mrmlScene).roi_box(node, roi), [10, 5, 21, 16])
        self.delayDisplay("ROI test passed")

    def test_ClientFailures(self) -> None:
        """Server down, 5xx and JSON-only answers become messages; no exception escapes raw."""
        import http.server
        import json
        import socket
        import threading

        from ThyroidNoduleLib import MonaiLabelClient

        self.delayDisplay("Client failure handling")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        with self.assertRaises(ConnectionFailedError):
            MonaiLabelClient(f"http://127.0.0.1:{closed_port}", Timeouts(quick=5)).info()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps({"detail": "the model file is damaged"}).encode()
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                self.rfile.read(length)
                body = json.dumps({"label": "benign", "probabilities": {"benign": 0.8, "malignant": 0.2}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            client = MonaiLabelClient(f"http://127.0.0.1:{server.server_address[1]}", Timeouts(quick=5, infer=5))
            with self.assertRaises(ServerError) as caught:
                client.info()
            self.assertIn("the model file is damaged", str(caught.exception))
            logic = NoduleLogic(slicer.mrmlScene, client)
            node, _ = self._frame(False)
            c = logic.classify(node)
            self.assertEqual(c.label, "benign")
            self.assertIsNone(c.heat_volume)
            self.assertIn("without a saliency mask", c.warning)
        finally:
            server.shutdown()
            server.server_close()
        self.delayDisplay("Client failure test passed")

    def test_LiveServer(self) -> None:
        """Classify a synthetic frame on the server named by THYROID_NODULE_SERVER_URL."""
        url = os.environ.get("THYROID_NODULE_SERVER_URL", "")
        if not url:
            self.delayDisplay("THYROID_NODULE_SERVER_URL is not set: live server test skipped")
            return
        self.delayDisplay(f"Classifying on {url}")
        logic = NoduleLogic(slicer.mrmlScene)
        logic.connect(url)
        report = logic.test_connection()
        self.assertTrue(report.model, report.message())
        node, _ = self._frame(True)
        c = logic.classify(node)
        self.assertIn(c.label, ("benign", "malignant"))
        self.assertEqual(c.warning, "")
        self.assertEqual(c.heat_volume.GetImageData().GetDimensions(), node.GetImageData().GetDimensions())
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(a)
        c.heat_volume.GetIJKToRASMatrix(b)
        for r in range(4):
            for col in range(4):
                self.assertAlmostEqual(a.GetElement(r, col), b.GetElement(r, col), places=6)
        self.delayDisplay("Live server test passed")
