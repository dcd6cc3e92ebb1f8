"""DICOM objects this app writes to the archive, and reads back (highdicom 0.22).

- A classification result: a **Comprehensive SR, TID 1500** (Imaging Measurement Report) with one
  Planar ROI group (TID 1410): the region (the ROI, or the whole frame, as image coordinates of
  the source frame), the finding (benign/malignant), the malignant probability and the decision
  threshold as measurements, the model as the algorithm (name and version = its identity) and as
  the device observer, and the note "research use, not for diagnosis".
- The saliency of a result: a **DICOM SEG** (fractional, probability, 8-bit: the same values as
  the mask the REST answer returns) on the source frame. A frame of a multi-frame clip cannot be
  the source of a SEG here (highdicom needs a position per frame, which US clips do not have):
  its saliency is a Secondary Capture image (the REST mask as DICOM) that references the clip
  and the frame, which every viewer opens.
- A confirmed diagnosis: a TID 1500 SR whose observer is the confirming user (a person), with the
  diagnosis as the finding and the ROI when one was given.

UIDs of results are derived from (model identity, source instance, frame) and of their series
from (study, model), so writing the same result twice is recognised (no duplicate); each
confirmation is a new SR, and the latest per frame is the ground truth.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

RESEARCH_NOTE = "research use, not for diagnosis"
RESULT_SERIES = "Thyroid nodule classification (research use, not for diagnosis)"
SALIENCY_SERIES = "Thyroid nodule saliency (research use, not for diagnosis)"
CONFIRMED_SERIES = "Thyroid nodule confirmed diagnosis"
ALGORITHM_NAME = "thyroid_plugin classify_nodule"
_SCHEME = "99THYROID"  # a local coding scheme (DICOM PS3.16: designators starting with 99)


def _codes():
    from pydicom.sr.coding import Code

    return {
        "benign": Code("3898006", "SCT", "Neoplasm, benign"),
        "malignant": Code("363346000", "SCT", "Malignant neoplastic disease"),
        "classification": Code("NODCLASS", _SCHEME, "Thyroid nodule classification"),
        "nodule": Code("27925004", "SCT", "Nodule"),
        "thyroid": Code("69748006", "SCT", "Thyroid structure"),
        "procedure": Code("16310003", "SCT", "Ultrasonography"),
        "probability": Code("PMALIG", _SCHEME, "Probability of malignancy"),
        "threshold": Code("PTHRESH", _SCHEME, "Malignancy decision threshold"),
        "unit": Code("1", "UCUM", "no units"),
        "comment": Code("121106", "DCM", "Comment"),
        "confirmed": Code("CONFIRMED", _SCHEME, "Confirmed diagnosis"),
        "saliency": Code("SALIENCY", _SCHEME, "Saliency"),
        "morph": Code("49755003", "SCT", "Morphologically Altered Structure"),
    }


def derived_uid(*parts: Any) -> str:
    """A UID derived from ``parts`` (the ``2.25`` UUID form, 128 bits of SHA-256)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]
    return f"2.25.{int(digest, 16)}"


@dataclass
class Finding:
    """What an SR says about one frame (a result or a confirmed diagnosis)."""

    sop: str
    frame: Optional[int]
    label: str
    roi: Optional[list]
    probability: Optional[float] = None
    threshold: Optional[float] = None
    model: Optional[str] = None
    observer: Optional[str] = None
    when: str = ""
    kind: str = "result"
    note: Optional[str] = None


def _source_region(source, frame: Optional[int], roi: Optional[Sequence[float]]):
    import highdicom as hd

    h, w = int(source.Rows), int(source.Columns)
    x0, y0, x1, y1 = [float(v) for v in roi] if roi else (0.0, 0.0, float(w), float(h))
    ref = hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID,
                                     referenced_frame_numbers=[frame] if frame else None)
    polyline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)
    return hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=polyline, source_image=ref)


def _group(source, frame, finding: Finding, codes, algorithm=None, measurements=()):
    import highdicom as hd

    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid("tracking", finding.kind, source.SOPInstanceUID,
                                                                     frame, finding.model), identifier="thyroid nodule"),
        referenced_region=_source_region(source, frame, finding.roi),
        finding_type=codes["nodule"],
        finding_sites=[hd.sr.FindingSite(codes["thyroid"])],
        algorithm_id=algorithm,
        measurements=list(measurements) or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes["classification"], codes[finding.label])],
    )
    note = hd.sr.TextContentItem(name=codes["comment"], value=RESEARCH_NOTE,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    group[0].ContentSequence.append(note)
    return group


def result_sr(source, frame: Optional[int], result: dict, software_version: str):
    """The TID 1500 SR of a classification ``result`` (the REST answer's JSON) of ``source``
    (the archive instance, pixel data not needed) and ``frame`` (1-based, or None)."""
    import highdicom as hd

    codes = _codes()
    model = str(result["model"])
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=model)
    finding = Finding(source.SOPInstanceUID, frame, result["label"], result.get("roi"), model=model)
    measurements = [
        hd.sr.Measurement(codes["probability"], float(result["probabilities"]["malignant"]), codes["unit"],
                          algorithm_id=algorithm),
        hd.sr.Measurement(codes["threshold"], float(result["threshold"]), codes["unit"], algorithm_id=algorithm),
    ]
    device = hd.sr.ObserverContext(
        observer_type=codes_DCM().Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", model), name="classify_nodule", manufacturer_name="thyroid_plugin",
            model_name=model[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes["procedure"],
        imaging_measurements=[_group(source, frame, finding, codes, algorithm, measurements)])
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=derived_uid("results", source.StudyInstanceUID, model),
        series_number=9301, sop_instance_uid=result_uid("sr", model, source.SOPInstanceUID, frame), instance_number=1,
        manufacturer="thyroid_plugin", is_complete=True, series_description=RESULT_SERIES)
    sr.SoftwareVersions = software_version
    return sr


def result_uid(kind: str, model: str, sop: str, frame: Optional[int]) -> str:
    """The SOP instance UID of the ``kind`` (``sr`` or ``saliency``) result of a model for a frame."""
    return derived_uid("result", kind, model, sop, frame or 1)


def confirmed_sr(source, frame: Optional[int], diagnosis: str, roi: Optional[list], user: str, software_version: str):
    """The TID 1500 SR of a diagnosis confirmed by ``user`` for ``source`` / ``frame``."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    codes = _codes()
    person = hd.sr.ObserverContext(
        observer_type=codes_DCM().Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=_person_name(user),
                                                                                  login_name=user[:64] or None))
    finding = Finding(source.SOPInstanceUID, frame, diagnosis, roi, kind="confirmed")
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=person),
        procedure_reported=codes["procedure"],
        imaging_measurements=[_group(source, frame, finding, codes)])
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=derived_uid("confirmed", source.StudyInstanceUID),
        series_number=9303, sop_instance_uid=generate_uid(), instance_number=1, manufacturer="thyroid_plugin",
        is_complete=True, is_final=True, series_description=CONFIRMED_SERIES, software_versions=software_version)


def _person_name(user: str) -> str:
    clean = "".join(ch for ch in str(user) if ch.isprintable() and ch not in "\\=")[:60] or "unknown"
    return clean if "^" in clean else clean + "^"  # a family name alone (PS3.5 6.2.1.2)


def saliency_object(source, frame: Optional[int], mask: np.ndarray, model: str, software_version: str, sc_mask=None):
    """The saliency of a result: a fractional SEG on a single-frame source; for a frame of a
    clip, ``sc_mask`` (the REST mask as a DICOM dataset) re-identified as this result."""
    import highdicom as hd

    uid = result_uid("saliency", model, source.SOPInstanceUID, frame)
    series = derived_uid("saliency", source.StudyInstanceUID, model)
    if frame is None:
        codes = _codes()
        algorithm = hd.AlgorithmIdentificationSequence(name=ALGORITHM_NAME, version=model,
                                                       family=codes_DCM().ArtificialIntelligence)
        segment = hd.seg.SegmentDescription(
            segment_number=1, segment_label="saliency", segmented_property_category=codes["morph"],
            segmented_property_type=codes["nodule"], algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        return hd.seg.Segmentation(
            source_images=[_with_lossy_details(source)], pixel_array=(mask.astype(np.float32) / 255.0)[None],
            segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL, segment_descriptions=[segment],
            series_instance_uid=series, series_number=9302, sop_instance_uid=uid, instance_number=1,
            manufacturer="thyroid_plugin", manufacturer_model_name="classify_nodule", software_versions=software_version,
            device_serial_number=model[:64], fractional_type="PROBABILITY", max_fractional_value=255,
            omit_empty_frames=False, series_description=SALIENCY_SERIES, content_label="SALIENCY",
            content_description=RESEARCH_NOTE)
    ds = sc_mask  # its own series: a series holds one modality
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SeriesInstanceUID = derived_uid("saliency-sc", source.StudyInstanceUID, model)
    ds.SeriesNumber, ds.InstanceNumber, ds.Modality = 9304, 1, "OT"
    ds.SeriesDescription = SALIENCY_SERIES
    ds.SourceImageSequence[0].ReferencedFrameNumber = frame
    ds.ImageComments = f"saliency of {ALGORITHM_NAME} {model} for frame {frame}; {RESEARCH_NOTE}"
    return ds


def _with_lossy_details(source):
    """``source``, or a header-only copy that names its lossy compression when the scanner said
    "lossy" without ratio and method (highdicom copies both into the SEG)."""
    if source.get("LossyImageCompression") != "01" or "LossyImageCompressionRatio" in source:
        return source
    import copy

    header = copy.copy(source)
    ts = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", ""))
    header.LossyImageCompressionMethod = "ISO_10918_1" if ts == "1.2.840.10008.1.2.4.50" else "UNKNOWN"
    header.LossyImageCompressionRatio = 1
    return header


def parse_sr(ds) -> list[Finding]:
    """The findings of an SR this module wrote (result or confirmation), read with highdicom."""
    import highdicom as hd

    sr = hd.sr.ComprehensiveSR.from_dataset(ds, copy=False)
    kind = "confirmed" if ds.get("SeriesDescription") == CONFIRMED_SERIES else "result"
    observer = None
    for context in sr.content.get_observer_contexts(observer_type=codes_DCM().Person):
        observer = str(context.observer_identifying_attributes.name)
    when = f"{ds.get('ContentDate', '')}{ds.get('ContentTime', '')}"
    out = []
    for group in sr.content.get_planar_roi_measurement_groups():
        region = group.roi
        if region is None:
            continue
        ref = region.ContentSequence[0].ReferencedSOPSequence[0]
        frames = ref.get("ReferencedFrameNumber")
        frame = int(list(frames)[0] if isinstance(frames, (list, tuple)) or hasattr(frames, "__iter__") else frames) \
            if frames not in (None, "") else None
        pts = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
        roi = [float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())]
        label = None
        for evaluation in group.get_qualitative_evaluations():
            label = {"3898006": "benign", "363346000": "malignant"}.get(evaluation.value.value, label)
        values = {m.name.value: float(m.value) for m in group.get_measurements()}
        notes = [str(item.TextValue) for item in group[0].ContentSequence
                 if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"]
        out.append(Finding(str(ref.ReferencedSOPInstanceUID), frame, label, roi, values.get("PMALIG"),
                           values.get("PTHRESH"), _algorithm_version(group), observer, when, kind,
                           notes[0] if notes else None))
    return out


def _algorithm_version(group) -> Optional[str]:
    for item in group[0].ContentSequence:  # TID 4019 Algorithm Identification
        if item.ConceptNameCodeSequence[0].CodeValue == "111001":  # Algorithm Name
            for sub in item.get("ContentSequence", []):
                if sub.ConceptNameCodeSequence[0].CodeValue == "111003":  # Algorithm Version
                    return str(sub.TextValue)
        if item.ConceptNameCodeSequence[0].CodeValue == "111003":
            return str(item.TextValue)
    return None


def dataset_bytes(ds) -> bytes:
    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()



def codes_DCM():  # noqa: N802 (pydicom's name)
    from pydicom.sr.codedict import codes

    return codes.DCM
