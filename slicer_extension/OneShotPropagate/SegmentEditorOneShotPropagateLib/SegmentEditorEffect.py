"""Segment Editor effect "One-shot propagate": the visible segments, labelled on one or a few slices, are
propagated through the source volume by the insid3-med tool; Preview / Apply / Cancel as in Fill between slices.

Only the Slicer glue lives here. The work (checks, export, subprocess, reading the result) is done by
``OneShotPropagateLib`` and the ``OneShotPropagate`` module's logic.
"""

import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorAutoCompleteEffect
from slicer.i18n import tr as _

EFFECT_NAME = "One-shot propagate"
AXIS_CHOICES = (
    ("auto", "auto (fewest labelled slices)"),
    ("k", "k (slices of the series)"),
    ("j", "j (rows)"),
    ("i", "i (columns)"),
)
DEVICE_CHOICES = ("auto", "cpu", "cuda")


class SegmentEditorEffect(AbstractScriptedSegmentEditorAutoCompleteEffect):
    """Propagate labelled slices through the volume with frozen DINOv3 features (INSID3)."""

    def __init__(self, scriptedEffect):
        AbstractScriptedSegmentEditorAutoCompleteEffect.__init__(self, scriptedEffect)
        scriptedEffect.name = EFFECT_NAME  # not translated: modules find effects by this name
        scriptedEffect.title = _("One-shot propagate")
        self.minimumNumberOfSegments = 1
        self.minimumNumberOfSegmentsWithEditableArea = 1

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return "<html>" + _(
            """Propagate segments from one labelled slice through the volume (one-shot, no training).<br>
<p><ul>
<li>Paint each structure on one slice (a few slices for long or changing structures) with any effect.</li>
<li>All visible segments are propagated; hide the ones to leave alone.</li>
<li>Click <b>Initialize</b>: the slices of the range are segmented from the labelled ones (progress and Cancel
in a dialog). Check the preview, then <b>Apply</b> or <b>Cancel</b>.</li>
<li>Axis <i>auto</i> propagates across the slices you labelled; a range limits the work to where the
structure is.</li>
</ul><p>
Masking settings are ignored. Where segments overlap, the segment higher in the table wins. Needs DINOv3 weights
(asked for on first use) and runs on the CPU or a GPU. To segment other studies with the same example, use the
One-shot Propagate module.<p>"""
        )

    # Options

    def setupOptionsFrame(self):
        self.axisComboBox = qt.QComboBox()
        for value, text in AXIS_CHOICES:
            self.axisComboBox.addItem(_(text), value)
        self.axisComboBox.setToolTip(_("Array axis to propagate along."))
        self.scriptedEffect.addLabeledOptionsWidget(_("Axis:"), self.axisComboBox)

        self.useRangeCheckBox = qt.QCheckBox(_("only slices"))
        self.useRangeCheckBox.setToolTip(_("Propagate only through this range (0-based, both ends included)."))
        self.firstSliceSpinBox = qt.QSpinBox()
        self.lastSliceSpinBox = qt.QSpinBox()
        for spinBox in (self.firstSliceSpinBox, self.lastSliceSpinBox):
            spinBox.setRange(0, 99999)
        rangeLayout = qt.QHBoxLayout()
        rangeLayout.addWidget(self.useRangeCheckBox)
        rangeLayout.addWidget(self.firstSliceSpinBox)
        rangeLayout.addWidget(qt.QLabel(_("to")))
        rangeLayout.addWidget(self.lastSliceSpinBox)
        self.scriptedEffect.addLabeledOptionsWidget(_("Range:"), rangeLayout)

        self.deviceComboBox = qt.QComboBox()
        for value in DEVICE_CHOICES:
            self.deviceComboBox.addItem(value, value)
        self.deviceComboBox.setToolTip(_("auto: the GPU when PyTorch sees one, else the CPU."))
        self.weightsButton = qt.QPushButton(_("DINOv3 weights..."))
        self.weightsButton.setToolTip(_("Choose the DINOv3 weights (and see where to get them)."))
        deviceLayout = qt.QHBoxLayout()
        deviceLayout.addWidget(self.deviceComboBox)
        deviceLayout.addWidget(self.weightsButton)
        self.scriptedEffect.addLabeledOptionsWidget(_("Device:"), deviceLayout)

        self.cropEnsembleCheckBox = qt.QCheckBox(_("three crop sizes, majority vote (2-3x slower)"))
        self.cropEnsembleCheckBox.setToolTip(_("Propagate three times, zoomed 1.25, 1.5 and 1.75 times the structure, "
                                               "and keep each voxel's majority label: slightly more accurate."))
        self.scriptedEffect.addLabeledOptionsWidget(_("Accuracy:"), self.cropEnsembleCheckBox)
        self.randomWalkCheckBox = qt.QCheckBox(_("boundaries on image edges, in 3D"))
        self.randomWalkCheckBox.setToolTip(_("Decide the voxels next to each boundary again with a random walk on the "
                                             "grey values, linked across slices and calibrated on the labelled "
                                             "slice: slightly more accurate, about a second more."))
        self.scriptedEffect.addLabeledOptionsWidget("", self.randomWalkCheckBox)

        self.axisComboBox.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.deviceComboBox.connect("currentIndexChanged(int)", self.updateMRMLFromGUI)
        self.useRangeCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.firstSliceSpinBox.connect("valueChanged(int)", self.updateMRMLFromGUI)
        self.lastSliceSpinBox.connect("valueChanged(int)", self.updateMRMLFromGUI)
        self.cropEnsembleCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.randomWalkCheckBox.connect("toggled(bool)", self.updateMRMLFromGUI)
        self.weightsButton.connect("clicked()", self.onWeightsButton)

        AbstractScriptedSegmentEditorAutoCompleteEffect.setupOptionsFrame(self)

    def setMRMLDefaults(self):
        # A propagation takes seconds to minutes: no automatic re-run after each brush stroke.
        self.scriptedEffect.setParameterDefault("AutoUpdate", "0")
        self.scriptedEffect.setParameterDefault("Axis", "auto")
        self.scriptedEffect.setParameterDefault("UseSliceRange", "0")
        self.scriptedEffect.setParameterDefault("FirstSlice", "0")
        self.scriptedEffect.setParameterDefault("LastSlice", "0")
        self.scriptedEffect.setParameterDefault("Device", "auto")
        self.scriptedEffect.setParameterDefault("CropEnsemble", "0")
        self.scriptedEffect.setParameterDefault("RandomWalk", "1")
        AbstractScriptedSegmentEditorAutoCompleteEffect.setMRMLDefaults(self)

    def updateGUIFromMRML(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.updateGUIFromMRML(self)
        widgets = (self.axisComboBox, self.deviceComboBox, self.useRangeCheckBox, self.firstSliceSpinBox,
                   self.lastSliceSpinBox, self.cropEnsembleCheckBox, self.randomWalkCheckBox)
        blocked = [widget.blockSignals(True) for widget in widgets]
        for comboBox, name in ((self.axisComboBox, "Axis"), (self.deviceComboBox, "Device")):
            comboBox.setCurrentIndex(max(comboBox.findData(self.scriptedEffect.parameter(name)), 0))
        useRange = self.scriptedEffect.integerParameter("UseSliceRange") != 0
        self.useRangeCheckBox.setChecked(useRange)
        self.firstSliceSpinBox.setValue(self.scriptedEffect.integerParameter("FirstSlice"))
        self.lastSliceSpinBox.setValue(self.scriptedEffect.integerParameter("LastSlice"))
        self.firstSliceSpinBox.setEnabled(useRange)
        self.lastSliceSpinBox.setEnabled(useRange)
        self.cropEnsembleCheckBox.setChecked(self.scriptedEffect.integerParameter("CropEnsemble") != 0)
        self.randomWalkCheckBox.setChecked(self.scriptedEffect.integerParameter("RandomWalk") != 0)
        for widget, wasBlocked in zip(widgets, blocked, strict=True):
            widget.blockSignals(wasBlocked)

    def updateMRMLFromGUI(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.updateMRMLFromGUI(self)
        self.scriptedEffect.setParameter("Axis", self.axisComboBox.currentData)
        self.scriptedEffect.setParameter("Device", self.deviceComboBox.currentData)
        self.scriptedEffect.setParameter("UseSliceRange", 1 if self.useRangeCheckBox.checked else 0)
        self.scriptedEffect.setParameter("FirstSlice", self.firstSliceSpinBox.value)
        self.scriptedEffect.setParameter("LastSlice", self.lastSliceSpinBox.value)
        self.scriptedEffect.setParameter("CropEnsemble", 1 if self.cropEnsembleCheckBox.checked else 0)
        self.scriptedEffect.setParameter("RandomWalk", 1 if self.randomWalkCheckBox.checked else 0)

    def onWeightsButton(self):
        from OneShotPropagate import askForWeights

        askForWeights()

    def settings(self, weightsPath):
        from OneShotPropagateLib import slices, validation

        sliceRange = None
        if self.scriptedEffect.integerParameter("UseSliceRange"):
            sliceRange = (self.scriptedEffect.integerParameter("FirstSlice"),
                          self.scriptedEffect.integerParameter("LastSlice"))
        return validation.PropagationSettings(
            axis=slices.parse_axis(self.scriptedEffect.parameter("Axis")), slice_range=sliceRange,
            device=self.scriptedEffect.parameter("Device") or "auto", weights=weightsPath,
            crop_ensemble=self.scriptedEffect.integerParameter("CropEnsemble") != 0,
            random_walk=self.scriptedEffect.integerParameter("RandomWalk") != 0)

    # Preview

    def preview(self):
        from OneShotPropagateLib import jobs

        try:
            AbstractScriptedSegmentEditorAutoCompleteEffect.preview(self)
        except jobs.JobCancelledError:
            self.reset()
            slicer.util.showStatusMessage(_("One-shot propagation cancelled; nothing was changed."), 3000)
        except Exception:
            self.reset()  # no half-made preview is left behind; the error is shown by the caller
            raise

    def computePreviewLabelmap(self, mergedImage, outputLabelmap):
        """Propagate the merged label map (visible segment n = label n + 1) through the source volume.

        Works on the whole source extent (not only around the labels, as Fill between slices does), because the
        slices to fill are usually far from the labelled one.
        """
        from OneShotPropagate import OneShotPropagateLogic, askForWeights, runWithProgressDialog
        from OneShotPropagateLib import conversion, jobs, labels, mrml, runs, validation

        logic = OneShotPropagateLogic()
        if not logic.ensureDependencies(askUser=True):
            raise RuntimeError(_("One-shot propagation needs its Python packages; their installation was declined."))
        sourceImage = self.scriptedEffect.sourceVolumeImageData()
        sourceArray, imageToWorld, sourceExtent = mrml.oriented_image_to_array(sourceImage)
        labelArray, _labelToWorld, labelExtent = mrml.oriented_image_to_array(mergedImage)
        labelMap = labels.paste_into_extent(labelArray, labelExtent, sourceExtent)
        volume = conversion.volume_from_slicer(
            sourceArray, conversion.ijk_to_ras_for_extent(imageToWorld, sourceExtent), name="source volume")
        result = None
        for attempt in range(2):
            settings = self.settings(logic.weightsForRun())
            plan = validation.plan_propagation(labelMap, settings, volume_shape=volume.shape)
            run = runs.PropagationRun.prepare(volume, labelMap, plan, logic.toolCommand())
            title = _("Propagating {count} labelled slice(s) through {slices} slice(s)...").format(
                count=len(plan.labelled), slices=plan.slices_to_segment)
            try:
                runWithProgressDialog(run, title)
                result = run.read_result()
                break
            except jobs.WeightsMissingError as error:
                if attempt or not askForWeights(reason=str(error)):
                    raise
            finally:
                run.cleanup()
        mrml.array_to_oriented_image(result, imageToWorld, sourceExtent, output=outputLabelmap)
