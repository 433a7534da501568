"""Builders of synthetic ultrasound DICOMs from the liver-sysu PNGs, for the DICOM tests and benchmark.

Without ../shared/data (a clone), ``liver_pngs`` gives stand-ins instead: the embedded BUSI sample's
images enlarged to a liver-sysu-like 512x400 RGB, large enough for the burned-in text lines.

Each file carries a fictitious patient in its header and burns that patient's name,
ID, exam date and hospital into the pixels with cv2.putText, in the border bands
around the scan as scanners do (and, optionally, inside the scan area).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid
from shared_data import DATA, SAMPLE

DATA_DIR = DATA
LIVER_DIR = DATA_DIR / "liver-sysu"
STAND_IN_SIZE = (512, 400)  # width, height: within liver-sysu's 428x339 .. 950x710

#: Border bands (pixels) around the pasted scan: top, bottom, left, right.
BANDS = (44, 34, 24, 24)


@dataclass(frozen=True)
class Patient:
    """Header values that must never reach any output."""

    name: str = "DOE^JANE"
    patient_id: str = "HX20230405"
    birth_date: str = "19610203"
    study_date: str = "20230405"
    institution: str = "SUN VALLEY HOSPITAL"
    operator: str = "SMITH^ANNA"
    accession: str = "ACC998877"

    def header_values(self) -> list[str]:
        """The values, and the name parts, that a leak check searches for."""
        parts = [*self.name.split("^"), *self.operator.split("^")]
        return [self.name, self.patient_id, self.birth_date, self.study_date, self.institution, self.operator, self.accession, *parts]


@dataclass
class UsCase:
    """A built DICOM and what the test needs to check its conversion."""

    path: Path
    clean: np.ndarray  # full frame before text was drawn (RGB uint8)
    frame: np.ndarray  # full frame as stored in the DICOM
    text_mask: np.ndarray  # pixels changed by the drawn text
    region: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (exclusive) of the scan area
    patient: Patient


def liver_pngs() -> list[Path]:
    """The liver-sysu images, sorted by class then name (without them, stand-ins from the embedded sample)."""
    if LIVER_DIR.is_dir():
        return sorted(LIVER_DIR.glob("*/*.png"))
    return list(_sample_stand_ins())


@functools.cache
def _sample_stand_ins() -> tuple[Path, ...]:
    """The embedded sample's images as 512x400 RGB PNGs in CLASS/ folders of a temporary folder (one per process)."""
    folder = Path(tempfile.mkdtemp(prefix="hsqformer-scans-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    pngs = []
    for source in sorted(SAMPLE.glob("*/*.png")):
        grey = cv2.imread(str(source), cv2.IMREAD_GRAYSCALE)
        scan = cv2.cvtColor(cv2.resize(grey, STAND_IN_SIZE, interpolation=cv2.INTER_CUBIC), cv2.COLOR_GRAY2BGR)
        target = folder / source.parent.name / source.name
        target.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(target), scan)
        pngs.append(target)
    return tuple(pngs)


def _put(canvas: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.6) -> None:
    cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (235, 235, 235), 1, cv2.LINE_AA)


def burn_in(scan_rgb: np.ndarray, patient: Patient, *, text_in_scan: bool) -> tuple[np.ndarray, np.ndarray]:
    """The scanner display: ``scan_rgb`` framed by black bands with patient text; (clean, with text)."""
    top, bottom, left, right = BANDS
    h, w = scan_rgb.shape[:2]
    clean = np.zeros((h + top + bottom, w + left + right, 3), dtype=np.uint8)
    clean[top : top + h, left : left + w] = scan_rgb
    shown = clean.copy()
    date = f"{patient.study_date[:4]}-{patient.study_date[4:6]}-{patient.study_date[6:]}"
    _put(shown, patient.name.replace("^", " "), (left + 4, 28))
    _put(shown, f"ID {patient.patient_id}", (left + 200, 28))
    _put(shown, date, (w + left - 120, 28))
    _put(shown, patient.institution, (left + 4, top + h + 24))
    if text_in_scan:
        _put(shown, f"ID {patient.patient_id}", (left + 12, top + 26), scale=0.55)
    return clean, shown


def write_us_dicom(
    path: Path,
    pixels: np.ndarray,
    patient: Patient,
    *,
    region: tuple[int, int, int, int] | None,
    photometric: str = "RGB",
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> None:
    """Write ``pixels`` ((H, W, 3) RGB, (H, W) grey, or (F, H, W[, 3]) cine) as an ultrasound DICOM."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.StudyDate = patient.study_date
    ds.InstitutionName = patient.institution
    ds.OperatorsName = patient.operator
    ds.AccessionNumber = patient.accession
    multi = pixels.ndim == 4 or (pixels.ndim == 3 and photometric.startswith("MONO"))
    frame_shape = pixels.shape[1:] if multi else pixels.shape
    ds.Rows, ds.Columns = frame_shape[0], frame_shape[1]
    ds.SamplesPerPixel = 3 if len(frame_shape) == 3 else 1
    ds.PhotometricInterpretation = photometric
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if multi:
        ds.NumberOfFrames = pixels.shape[0]
    if region is not None:
        item = Dataset()
        item.RegionSpatialFormat = 1
        item.RegionDataType = 1
        item.RegionFlags = 0
        item.RegionLocationMinX0, item.RegionLocationMinY0 = region[0], region[1]
        item.RegionLocationMaxX1, item.RegionLocationMaxY1 = region[2] - 1, region[3] - 1
        ds.SequenceOfUltrasoundRegions = [item]
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def make_us_case(
    png: Path, path: Path, patient: Patient | None = None, *, with_region: bool = True, text_in_scan: bool = False
) -> UsCase:
    """Build one ultrasound DICOM at ``path`` from a liver-sysu ``png``."""
    patient = patient or Patient()
    scan = cv2.cvtColor(cv2.imread(str(png), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    clean, shown = burn_in(scan, patient, text_in_scan=text_in_scan)
    top, _, left, _ = BANDS
    region = (left, top, left + scan.shape[1], top + scan.shape[0]) if with_region else None
    write_us_dicom(path, shown, patient, region=region)
    text_mask = np.any(shown != clean, axis=-1)
    return UsCase(path=path, clean=clean, frame=shown, text_mask=text_mask, region=region, patient=patient)


def read_png(path: Path) -> np.ndarray:
    """A PNG as written by dicom2png: grey or RGB, 8 or 16 bit, unchanged."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else image

