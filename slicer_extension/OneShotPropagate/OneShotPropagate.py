"""One-shot Propagate: label one slice, get the whole volume, and other studies, segmented (INSID3, DINOv3).

The Slicer-facing layer only: it reads nodes into arrays (``OneShotPropagateLib.mrml``), hands them to the
plain-Python core (``OneShotPropagateLib``: validation, export, the ``insid3-med`` command in a PythonSlicer
subprocess, reading the results), polls the subprocess with a ``QTimer`` and writes the results back into
segmentation nodes. It also registers the "One-shot propagate" Segment Editor effect at startup.
"""

import logging
import os
from typing import Annotated

import ctk
import qt
import slicer
import vtk
from OneShotPropagateLib import dependencies, jobs, slices, validation, weights
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Minimum, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

EFFECT_NAME = "One-shot propagate"
MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS_PATH = os.path.join(MODULE_DIR, "Resources", "requirements.txt")
STAND_IN_TOOL_PATH = os.path.join(MODULE_DIR, "Testing", "Python", "stand_in_insid3_med.py")
MINIMUM_TORCH_VERSION = "2.2"


#
# OneShotPropagate
#


class OneShotPropagate(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("One-shot Propagate")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["insid3-med contributors"]
        self.parent.helpText = _(
            "Label one (or a few) slices of a volume in Segment Editor, then propagate the labelled segments "
            "through the volume and to other loaded studies. Training-free: frozen DINOv3 features (INSID3). "
            "The same propagation is available in Segment Editor as the 'One-shot propagate' effect."
        )
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = _(
            "Built on INSID3 (CVPR 2026) and Meta's DINOv3 backbones (DINOv3 licence). The Segment Editor "
            "effect follows the preview / apply / cancel workflow of Slicer's Fill between slices effect."
        )
        slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)


def registerSegmentEditorEffect():
    """Register the "One-shot propagate" Segment Editor effect (once)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    factory = effects.qSlicerSegmentEditorEffectFactory.instance()
    if any(effect.name == EFFECT_NAME for effect in factory.registeredEffects()):
        return
    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    effectPath = os.path.join(MODULE_DIR, "SegmentEditorOneShotPropagateLib", "SegmentEditorEffect.py")
    instance.setPythonSource(effectPath.replace("\\", "/"))
    instance.self().register()


#
# Parameter node
#


@parameterNodeWrapper
class OneShotPropagateParameterNode:
    """
    inputVolume - the study in which one or a few slices are labelled.
    inputSegmentation - the segmentation holding the labelled slice(s).
    axis - "auto" (the axis with the fewest labelled slices) or an array axis: k (slices), j (rows), i (columns).
    useSliceRange, firstSlice, lastSlice - propagate only through these slices (0-based, both included).
    device, precision, imageSize - where and how the backbone runs.
    cropEnsemble - propagate with three crop scales and keep each voxel's majority label (2-3x slower).
    randomWalk - decide the voxels next to each boundary again in 3D, on the image's edges (isotropic MRI).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    axis: Annotated[str, Choice(["auto", "k", "j", "i"])] = "auto"
    useSliceRange: bool = False
    firstSlice: Annotated[int, Minimum(0)] = 0
    lastSlice: Annotated[int, Minimum(0)] = 0
    device: Annotated[str, Choice(list(validation.DEVICE_CHOICES))] = "auto"
    precision: Annotated[str, Choice(list(validation.PRECISION_CHOICES))] = "auto"
    imageSize: Annotated[int, WithinRange(*validation.IMAGE_SIZE_LIMITS)] = 448
    cropEnsemble: bool = False
    randomWalk: bool = True


#
# Dialogs shared by the module widget and the Segment Editor effect
#


def askForWeights(parent=None, reason=""):
    """Explain where DINOv3 weights come from and let the user pick them; returns the saved path or None."""
    dialog = qt.QDialog(parent or slicer.util.mainWindow())
    dialog.setWindowTitle(_("DINOv3 weights needed"))
    layout = qt.QVBoxLayout(dialog)
    if reason:
        reasonLabel = qt.QLabel(reason)
        reasonLabel.wordWrap = True
        layout.addWidget(reasonLabel)
    helpLabel = qt.QLabel(weights.weights_help_html())
    helpLabel.wordWrap = True
    helpLabel.openExternalLinks = True
    helpLabel.textFormat = qt.Qt.RichText
    layout.addWidget(helpLabel)
    pathEdit = ctk.ctkPathLineEdit()
    pathEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Readable
    pathEdit.nameFilters = [weights.WEIGHTS_FILE_FILTER, "All files (*)"]
    pathEdit.settingKey = "OneShotPropagate/WeightsPathHistory"
    current = OneShotPropagateLogic.savedWeights()
    if current:
        pathEdit.currentPath = current
    layout.addWidget(pathEdit)
    buttons = qt.QDialogButtonBox(qt.QDialogButtonBox.Ok | qt.QDialogButtonBox.Cancel)
    buttons.connect("accepted()", dialog.accept)
    buttons.connect("rejected()", dialog.reject)
    layout.addWidget(buttons)
    while dialog.exec_() == qt.QDialog.Accepted:
        try:
            chosen = weights.check_weights_path(pathEdit.currentPath)
        except weights.WeightsPathError as error:
            slicer.util.errorDisplay(str(error), parent=dialog)
            continue
        OneShotPropagateLogic.saveWeights(chosen)
        return chosen
    return None


def runWithProgressDialog(run, title, parent=None):
    """Start ``run``'s job and wait for it in a local event loop, showing a cancellable progress dialog.

    Slicer keeps repainting and the Cancel button works meanwhile (a ``QTimer`` polls the job). Raises the
    job's error (``JobCancelledError`` when cancelled) unless it succeeded.
    """
    logic = OneShotPropagateLogic()
    job = run.start(env=logic.childEnvironment())
    dialog = qt.QProgressDialog(title, _("Cancel"), 0, 1000, parent or slicer.util.mainWindow())
    dialog.setWindowTitle(_("One-shot propagation"))
    dialog.setWindowModality(qt.Qt.WindowModal)
    dialog.autoClose = False
    dialog.autoReset = False
    dialog.minimumDuration = 0
    dialog.connect("canceled()", lambda: job.cancel())
    loop = qt.QEventLoop()
    timer = qt.QTimer()
    timer.setInterval(100)

    def onTimeout():
        update = job.poll()
        for line in update.new_lines:
            logging.info(line)
        if update.fraction is not None:
            dialog.setValue(int(round(1000 * update.fraction)))
            dialog.setLabelText(_("{title}\nslice {done} of {total}").format(
                title=title, done=update.done, total=update.total))
        if update.state.finished:
            timer.stop()
            loop.quit()

    timer.connect("timeout()", onTimeout)
    dialog.show()
    # Callers may show a wait cursor; the dialog's Cancel button must look clickable.
    qt.QApplication.setOverrideCursor(qt.QCursor(qt.Qt.ArrowCursor))
    try:
        timer.start()
        loop.exec_()
    finally:
        qt.QApplication.restoreOverrideCursor()
        timer.stop()
        dialog.close()
    job.raise_for_failure()


#
# OneShotPropagateWidget
#


class OneShotPropagateWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._onRunSucceeded = None
        self._retry = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.connect("timeout()", self.onPollJob)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/OneShotPropagate.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = OneShotPropagateLogic()

        self.ui.segmentsTableView.selectionMode = qt.QAbstractItemView.ExtendedSelection
        self.ui.segmentsTableView.setReadOnly(True)
        self.ui.weightsPathLineEdit.filters = (
            ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Readable
        )
        self.ui.weightsPathLineEdit.nameFilters = [weights.WEIGHTS_FILE_FILTER, "All files (*)"]
        self.ui.weightsPathLineEdit.currentPath = self.logic.savedWeights() or ""
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.propagateButton.connect("clicked(bool)", self.onPropagateButton)
        self.ui.transferButton.connect("clicked(bool)", self.onTransferButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependenciesButton)
        self.ui.weightsHelpButton.connect("clicked(bool)", self.onWeightsHelpButton)
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)", self.onWeightsPathChanged)
        self.ui.segmentsTableView.connect("selectionChanged(QItemSelection,QItemSelection)", self.updateSlicesInfo)
        self.ui.targetVolumesComboBox.connect("checkedNodesChanged()", self.updateButtons)

        self.initializeParameterNode()

    def cleanup(self):
        self._pollTimer.stop()
        if self._run is not None and self._run.job is not None:
            self._run.job.cancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume
        if not self._parameterNode.inputSegmentation:
            firstSegmentation = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if firstSegmentation:
                self._parameterNode.inputSegmentation = firstSegmentation

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        segmentation = self._parameterNode.inputSegmentation if self._parameterNode else None
        if self.ui.segmentsTableView.segmentationNode() != segmentation:
            self.ui.segmentsTableView.setSegmentationNode(segmentation)
            if segmentation:
                self.ui.segmentsTableView.setSelectedSegmentIDs(self.logic.segmentIds(segmentation))
        self.updateSlicesInfo()

    # State of the controls

    def chosenSegmentIds(self):
        return list(self.ui.segmentsTableView.selectedSegmentIDs())

    def targetVolumes(self):
        reference = self._parameterNode.inputVolume if self._parameterNode else None
        return [node for node in self.ui.targetVolumesComboBox.checkedNodes() if node != reference]

    def updateButtons(self):
        busy = self._run is not None
        p = self._parameterNode
        ready = bool(p and p.inputVolume and p.inputSegmentation and self.chosenSegmentIds())
        self.ui.propagateButton.enabled = ready and not busy
        self.ui.transferButton.enabled = ready and not busy and bool(self.targetVolumes())
        self.ui.cancelButton.enabled = busy
        self.ui.installDependenciesButton.enabled = not busy

    def updateSlicesInfo(self, *unused):
        p = self._parameterNode
        text = "-"
        if p and p.inputVolume and p.inputSegmentation and self.chosenSegmentIds() and self._run is None:
            try:
                text = self.logic.labelledSlicesSummary(
                    p.inputVolume, p.inputSegmentation, self.chosenSegmentIds(), p.axis)
            except Exception as error:  # shown, not raised: this is only an information label
                text = str(error)
        self.ui.labelledSlicesLabel.text = text
        self.updateButtons()

    def settings(self):
        p = self._parameterNode
        sliceRange = (p.firstSlice, p.lastSlice) if p.useSliceRange else None
        return validation.PropagationSettings(
            axis=slices.parse_axis(p.axis), slice_range=sliceRange, device=p.device, precision=p.precision,
            image_size=p.imageSize, weights=self.logic.weightsForRun(), crop_ensemble=p.cropEnsemble,
            random_walk=p.randomWalk)

    # Actions

    def onInstallDependenciesButton(self):
        with slicer.util.tryWithErrorDisplay(_("Installing Python packages failed."), waitCursor=True):
            self.logic.ensureDependencies(askUser=True)
            self.ui.statusLabel.text = _("All Python packages are installed.")

    def onWeightsHelpButton(self):
        chosen = askForWeights(self.parent)
        if chosen:
            self.ui.weightsPathLineEdit.currentPath = chosen

    def onWeightsPathChanged(self, path):
        path = path.strip()
        if not path:
            self.logic.saveWeights(None)
            return
        try:
            self.logic.saveWeights(weights.check_weights_path(path))
        except weights.WeightsPathError as error:
            self.ui.statusLabel.text = str(error)

    def onPropagateButton(self):
        with slicer.util.tryWithErrorDisplay(_("Propagation could not start."), waitCursor=True):
            p = self._parameterNode
            if not self.logic.ensureDependencies(askUser=True):
                return
            run = self.logic.preparePropagation(
                p.inputVolume, p.inputSegmentation, self.chosenSegmentIds(), self.settings())
            segmentation, ids, volume = p.inputSegmentation, self.chosenSegmentIds(), p.inputVolume

            def apply(finishedRun):
                self.logic.applyPropagation(finishedRun, segmentation, ids, volume)
                self.ui.statusLabel.text = _("Propagated {count} segment(s) through {slices} slice(s).").format(
                    count=len(ids), slices=finishedRun.plan.slices_to_segment)

            self.startRun(run, apply, self.onPropagateButton, _("Propagating through the volume..."))

    def onTransferButton(self):
        with slicer.util.tryWithErrorDisplay(_("Propagation to other studies could not start."), waitCursor=True):
            p = self._parameterNode
            if not self.logic.ensureDependencies(askUser=True):
                return
            targets = self.targetVolumes()
            ids = self.chosenSegmentIds()
            run = self.logic.prepareTransfer(p.inputVolume, p.inputSegmentation, ids, targets, self.settings())
            segmentation = p.inputSegmentation

            def apply(finishedRun):
                created = self.logic.applyTransfer(finishedRun, segmentation, ids, targets)
                self.ui.statusLabel.text = _("Created {names}.").format(
                    names=", ".join(node.GetName() for node in created))

            self.startRun(run, apply, self.onTransferButton, _("Propagating to {count} other stud(ies)...").format(
                count=len(targets)))

    def startRun(self, run, onSucceeded, retry, description):
        try:
            run.start(env=self.logic.childEnvironment())
        except Exception:
            run.cleanup()
            raise
        self._run, self._onRunSucceeded, self._retry = run, onSucceeded, retry
        self.ui.logTextEdit.clear()
        self.ui.logTextEdit.appendPlainText(" ".join(run.command))
        self.ui.statusLabel.text = description
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = _("starting...")
        self.ui.progressBar.show()
        self.updateButtons()
        self._pollTimer.start()

    def onCancelButton(self):
        if self._run is not None and self._run.job is not None:
            self.ui.statusLabel.text = _("Cancelling...")
            self._run.job.cancel()

    def onPollJob(self):
        run = self._run
        if run is None or run.job is None:
            self._pollTimer.stop()
            return
        update = run.job.poll()
        for line in update.new_lines:
            self.ui.logTextEdit.appendPlainText(line)
        if update.fraction is not None:
            self.ui.progressBar.value = int(round(1000 * update.fraction))
            self.ui.progressBar.format = _("slice {done} of {total}").format(done=update.done, total=update.total)
        if not update.state.finished:
            return
        self._pollTimer.stop()
        onSucceeded, retry = self._onRunSucceeded, self._retry
        self._run = self._onRunSucceeded = self._retry = None
        self.ui.progressBar.hide()
        try:
            if update.state is jobs.JobState.SUCCEEDED:
                with slicer.util.tryWithErrorDisplay(_("The results could not be loaded."), waitCursor=True):
                    onSucceeded(run)
                return
            error = run.job.error()
            if isinstance(error, jobs.JobCancelledError):
                self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
            elif isinstance(error, jobs.WeightsMissingError):
                self.ui.statusLabel.text = _("DINOv3 weights are needed.")
                if askForWeights(self.parent, str(error)):
                    self.ui.weightsPathLineEdit.currentPath = self.logic.savedWeights() or ""
                    qt.QTimer.singleShot(0, retry)
            else:
                self.ui.statusLabel.text = _("Failed.")
                slicer.util.errorDisplay(str(error), detailedText="\n".join(run.job.log))
        finally:
            run.cleanup()
            self.updateSlicesInfo()


#
# OneShotPropagateLogic
#


class OneShotPropagateLogic(ScriptedLoadableModuleLogic):
    """No GUI: nodes in, nodes out. Usable from the Python console and from other modules.

    ``tool``: the command that runs insid3-med (default ``[PythonSlicer, "-m", "insid3_med"]``); tests set it to a
    stand-in.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.tool = None

    def getParameterNode(self):
        return OneShotPropagateParameterNode(super().getParameterNode())

    # Environment

    def toolCommand(self):
        from OneShotPropagateLib import commands

        if self.tool:
            return list(self.tool)
        binFolder = os.path.dirname(slicer.app.applicationFilePath())
        searchFolders = [binFolder, os.path.join(os.path.dirname(binFolder), "bin")]
        pythonSlicer = commands.find_python_slicer(searchFolders, fallback=None)
        if pythonSlicer is None:
            raise RuntimeError(_("PythonSlicer was not found next to Slicer ({folder}) nor on PATH.").format(
                folder=binFolder))
        return commands.module_command(pythonSlicer)

    @staticmethod
    def childEnvironment():
        """Environment for the PythonSlicer child: Slicer's startup environment, so the launcher sets it up."""
        startupEnvironment = getattr(slicer.util, "startupEnvironment", None)
        return dict(startupEnvironment()) if startupEnvironment else dict(os.environ)

    @staticmethod
    def savedWeights():
        value = qt.QSettings().value(weights.WEIGHTS_SETTINGS_KEY)
        return str(value) if value else None

    @staticmethod
    def saveWeights(path):
        settings = qt.QSettings()
        if path:
            settings.setValue(weights.WEIGHTS_SETTINGS_KEY, str(path))
        else:
            settings.remove(weights.WEIGHTS_SETTINGS_KEY)

    def weightsForRun(self):
        return weights.configured_weights(self.savedWeights())

    # Dependencies

    @staticmethod
    def missingDependencies():
        """Pinned requirements not yet installed (``[(requirement, installed version or None)]``)."""
        return dependencies.unmet_requirements(dependencies.read_requirements(REQUIREMENTS_PATH))

    @staticmethod
    def torchInstalled():
        import importlib.util

        return importlib.util.find_spec("torch") is not None

    def ensureDependencies(self, askUser=True):
        """Install what is missing, after asking: PyTorch through the PyTorch extension, then the pinned
        requirements with ``slicer.packaging.pip_ensure`` (Slicer >= 5.12) or ``slicer.util.pip_install``.
        Returns False when the user declines."""
        if not self.torchInstalled():
            try:
                import PyTorchUtils
            except ModuleNotFoundError as error:
                raise RuntimeError(_(
                    "This module needs PyTorch. Install the 'PyTorch' extension from the Extension Manager, "
                    "restart Slicer, and try again.")) from error
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=askUser, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
            if torch is None:
                return False
        unmet = self.missingDependencies()
        if not unmet:
            return True
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            try:
                packaging.pip_ensure(
                    packaging.load_requirements(REQUIREMENTS_PATH), requester=_("One-shot Propagate"),
                    prompt_install=askUser, skip_packages=list(dependencies.PROVIDED_BY_SLICER))
            except RuntimeError:
                if self.missingDependencies():
                    return False
                raise
            return not self.missingDependencies()
        if askUser and not slicer.util.confirmOkCancelDisplay(
            _("One-shot Propagate needs these Python packages in Slicer's Python. Install them now?"),
            windowTitle=_("Install Python packages"), detailedText=dependencies.describe_unmet(unmet)):
            return False
        slicer.util.pip_install(" ".join(str(requirement) for requirement, _found in unmet))
        return not self.missingDependencies()

    # Nodes <-> arrays

    @staticmethod
    def segmentIds(segmentationNode):
        from OneShotPropagateLib import mrml

        return mrml.segment_ids(segmentationNode)

    def labelledSlicesSummary(self, volumeNode, segmentationNode, segmentIds, axis="auto"):
        """One line for the user: which slices of the chosen segments are labelled, along which axis."""
        from OneShotPropagateLib import mrml

        labels, overlapping = mrml.label_map_from_segments(segmentationNode, segmentIds, volumeNode)
        chosenAxis = slices.parse_axis(axis)
        try:
            arrayAxis = chosenAxis if chosenAxis is not None else slices.choose_propagation_axis(labels)
        except slices.SliceSelectionError:
            return _("none: paint at least one slice of the chosen segments")
        labelled = slices.labelled_slices(labels, arrayAxis)
        plane = slices.anatomical_plane(mrml.node_ijk_to_ras(volumeNode), arrayAxis)
        text = _("{slices} along {letter} ({plane}), of {count}").format(
            slices=slices.describe_slices(labelled), letter=slices.AXIS_LETTERS[arrayAxis], plane=plane,
            count=labels.shape[arrayAxis])
        if overlapping:
            text += _("; {voxels} overlapping voxels go to the upper segment").format(voxels=overlapping)
        return text

    def preparePropagation(self, volumeNode, segmentationNode, segmentIds, settings):
        """Check the request and export it; returns a ``PropagationRun`` ready to ``start``."""
        from OneShotPropagateLib import mrml, runs

        if volumeNode is None or segmentationNode is None:
            raise validation.ParameterError(_("Choose a volume and a segmentation."))
        ids = validation.validate_segments(segmentIds, mrml.segment_ids(segmentationNode))
        volume = mrml.volume_from_node(volumeNode)
        labels, _overlapping = mrml.label_map_from_segments(segmentationNode, ids, volumeNode)
        plan = validation.plan_propagation(labels, settings, volume_shape=volume.shape)
        return runs.PropagationRun.prepare(volume, labels, plan, self.toolCommand())

    def applyPropagation(self, run, segmentationNode, segmentIds, volumeNode):
        """Replace the chosen segments by the propagated label map (segment n = label n + 1)."""
        from OneShotPropagateLib import labels, mrml

        masks = labels.split_label_map(run.read_result(), len(segmentIds))
        mrml.set_segment_masks(segmentationNode, segmentIds, masks, volumeNode)

    def prepareTransfer(self, volumeNode, segmentationNode, segmentIds, targetVolumeNodes, settings):
        """Check the request and export the reference and the targets; returns a ``TransferRun``."""
        from OneShotPropagateLib import mrml, runs

        if volumeNode is None or segmentationNode is None:
            raise validation.ParameterError(_("Choose a volume and a segmentation."))
        targets = [node for node in targetVolumeNodes if node is not None and node != volumeNode]
        ids = validation.validate_segments(segmentIds, mrml.segment_ids(segmentationNode))
        reference = mrml.volume_from_node(volumeNode)
        labels, _overlapping = mrml.label_map_from_segments(segmentationNode, ids, volumeNode)
        plan = validation.plan_transfer(labels, settings, [node.GetID() for node in targets],
                                        volume_shape=reference.shape)
        targetVolumes = [mrml.volume_from_node(node) for node in targets]
        return runs.TransferRun.prepare(reference, labels, targetVolumes, plan, self.toolCommand())

    def applyTransfer(self, run, segmentationNode, segmentIds, targetVolumeNodes):
        """One new segmentation per target, with the chosen segments' names and colours; returns the nodes."""
        from OneShotPropagateLib import labels, mrml

        targets = [node for node in targetVolumeNodes if node is not None]
        results = run.read_results()
        if len(results) != len(targets):
            raise ValueError(f"{len(results)} results for {len(targets)} target volumes")
        created = []
        for targetNode, result in zip(targets, results, strict=True):
            name = slicer.mrmlScene.GenerateUniqueName(f"{targetNode.GetName()} one-shot segmentation")
            node = mrml.new_segmentation_like(segmentationNode, segmentIds, targetNode, name)
            node.CreateDefaultDisplayNodes()
            mrml.set_segment_masks(node, segmentIds, labels.split_label_map(result, len(segmentIds)), targetNode)
            created.append(node)
        return created

    def runBlocking(self, run, timeout=None):
        """Start ``run``, keep Slicer responsive until it finishes, raise its error if it failed."""
        import time

        job = run.start(env=self.childEnvironment())
        deadline = None if timeout is None else time.monotonic() + timeout
        while not job.poll().state.finished:
            slicer.app.processEvents()
            if deadline is not None and time.monotonic() > deadline:
                job.cancel(grace_seconds=1.0)
                deadline = None
            time.sleep(0.05)
        job.raise_for_failure()


#
# OneShotPropagateTest
#


class OneShotPropagateTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (``Slicer --testing``). The model is replaced by the stand-in tool in
    ``Testing/Python/stand_in_insid3_med.py`` (copies the nearest labelled slice): these tests exercise the
    Slicer-facing code (nodes, subprocess, progress, results, effect), not the segmentation quality."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def requireLibrary(self):
        try:
            import insid3_med  # noqa: F401
        except ImportError:
            self.skipTest("insid3-med is not installed in Slicer's Python: use the module's 'Check and install'")

    def runTest(self):
        self.setUp()
        self.test_EffectIsRegistered()
        self.setUp()
        self.test_NodeConversionRoundTrip()
        self.setUp()
        self.test_PropagationWithStandInTool()
        self.setUp()
        self.test_TransferWithStandInTool()
        self.setUp()
        self.test_ValidationErrors()

    def _syntheticStudy(self, name="Study", shape=(12, 24, 20)):
        import numpy as np
        from OneShotPropagateLib import mrml

        from insid3_med.imaging.geometry import Geometry, Volume

        k, j, i = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
        ball = ((k - shape[0] / 2) * 2.5) ** 2 + ((j - shape[1] / 2) * 0.8) ** 2 + ((i - shape[2] / 2) * 0.9) ** 2
        array = np.where(ball < 64.0, 300.0, 20.0).astype(np.float32)
        geometry = Geometry(spacing=(0.9, 0.8, 2.5), origin=(-12.0, 30.0, 5.0),
                            direction=((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, -1.0, 0.0)))
        return mrml.add_volume_node(slicer.mrmlScene, Volume(array, geometry), name), array

    def _labelledSegmentation(self, volumeNode, array, labelledSlice):
        import numpy as np
        from OneShotPropagateLib import mrml

        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Labels")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentation.GetSegmentation().AddEmptySegment("lesion", "Lesion", [1.0, 0.5, 0.0])
        mask = np.zeros(array.shape, np.uint8)
        mask[labelledSlice] = array[labelledSlice] > 100
        mrml.set_segment_masks(segmentation, ["lesion"], [mask], volumeNode)
        return segmentation, mask

    def test_EffectIsRegistered(self):
        self.delayDisplay("Segment Editor effect registration")
        registerSegmentEditorEffect()
        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setMRMLSegmentEditorNode(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
        self.assertIsNotNone(editor.effectByName(EFFECT_NAME))

    def test_NodeConversionRoundTrip(self):
        self.delayDisplay("Volume node <-> insid3_med Volume (RAS <-> LPS)")
        self.requireLibrary()
        import numpy as np
        from OneShotPropagateLib import conversion, mrml

        volumeNode, array = self._syntheticStudy()
        volume = mrml.volume_from_node(volumeNode)
        np.testing.assert_array_equal(volume.array, slicer.util.arrayFromVolume(volumeNode))
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        np.testing.assert_allclose(conversion.ijk_to_ras_from_geometry(volume.geometry),
                                   slicer.util.arrayFromVTKMatrix(matrix), atol=1e-9)
        # Voxel (0, 0, 0) sits at the node's origin, in RAS; the Volume keeps it in LPS.
        ras = np.array(volumeNode.GetOrigin())
        np.testing.assert_allclose(volume.geometry.origin, ras * [-1, -1, 1], atol=1e-9)

    def test_PropagationWithStandInTool(self):
        self.delayDisplay("Propagation through the volume (stand-in tool)")
        self.requireLibrary()
        import numpy as np
        from OneShotPropagateLib import mrml

        if not os.path.isfile(STAND_IN_TOOL_PATH):
            self.skipTest(f"stand-in tool not found at {STAND_IN_TOOL_PATH}")
        volumeNode, array = self._syntheticStudy()
        segmentation, mask = self._labelledSegmentation(volumeNode, array, labelledSlice=6)
        logic = OneShotPropagateLogic()
        logic.tool = [logic.toolCommand()[0], STAND_IN_TOOL_PATH]
        settings = validation.PropagationSettings(axis=None, slice_range=(3, 9), device="cpu")
        run = logic.preparePropagation(volumeNode, segmentation, ["lesion"], settings)
        try:
            self.assertEqual(run.plan.axis, 0)
            logic.runBlocking(run, timeout=120)
            logic.applyPropagation(run, segmentation, ["lesion"], volumeNode)
        finally:
            run.cleanup()
        result = mrml.segment_masks(segmentation, ["lesion"], volumeNode)[0]
        for k in range(3, 10):
            np.testing.assert_array_equal(result[k], mask[6])
        self.assertFalse(result[:3].any() or result[10:].any())

    def test_TransferWithStandInTool(self):
        self.delayDisplay("Propagation to another study (stand-in tool)")
        self.requireLibrary()
        from OneShotPropagateLib import mrml

        if not os.path.isfile(STAND_IN_TOOL_PATH):
            self.skipTest(f"stand-in tool not found at {STAND_IN_TOOL_PATH}")
        volumeNode, array = self._syntheticStudy("Baseline")
        segmentation, mask = self._labelledSegmentation(volumeNode, array, labelledSlice=6)
        targetNode, _targetArray = self._syntheticStudy("Follow-up", shape=(8, 24, 20))
        logic = OneShotPropagateLogic()
        logic.tool = [logic.toolCommand()[0], STAND_IN_TOOL_PATH]
        run = logic.prepareTransfer(volumeNode, segmentation, ["lesion"], [targetNode],
                                    validation.PropagationSettings(device="cpu"))
        try:
            logic.runBlocking(run, timeout=120)
            created = logic.applyTransfer(run, segmentation, ["lesion"], [targetNode])
        finally:
            run.cleanup()
        self.assertEqual(len(created), 1)
        self.assertEqual(mrml.segment_names(created[0], ["lesion"]), ["Lesion"])
        result = mrml.segment_masks(created[0], ["lesion"], targetNode)[0]
        self.assertEqual(result.shape, (8, 24, 20))
        self.assertTrue((result == mask[6][None]).all())

    def test_ValidationErrors(self):
        self.delayDisplay("Parameter validation")
        self.requireLibrary()
        volumeNode, array = self._syntheticStudy()
        segmentation, _mask = self._labelledSegmentation(volumeNode, array, labelledSlice=6)
        logic = OneShotPropagateLogic()
        with self.assertRaises(validation.ParameterError):
            logic.preparePropagation(volumeNode, segmentation, [], validation.PropagationSettings())
        with self.assertRaises(validation.ParameterError):
            logic.preparePropagation(volumeNode, segmentation, ["lesion"],
                                     validation.PropagationSettings(axis=0, slice_range=(0, 3)))
        with self.assertRaises(validation.ParameterError):
            logic.preparePropagation(volumeNode, segmentation, ["lesion"],
                                     validation.PropagationSettings(device="tpu"))
