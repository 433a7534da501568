"""Reading one input file as a DICOM image, with a plain reason when it is not one."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID, MediaStorageDirectoryStorage


class Rejected(Exception):
    """The file cannot be converted; ``str(err)`` is the reason for the errors CSV.

    Reasons never quote header values (see :func:`hsqformer.dicom.deidentify.redact`).
    """


class NotAnImage(Exception):
    """A valid DICOM file that holds no image by design (a DICOMDIR): skipped, not an error."""


def read_dicom(path: Path) -> Dataset:
    """Read ``path`` as a DICOM image dataset whose pixel data can be decoded here.

    Files without the DICM preamble are accepted only when a forced read finds
    image pixel data, so stray non-DICOM files are rejected instead of misread.
    """
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        ds = _forced_read(path)
    except Exception as err:
        raise Rejected(f"unreadable DICOM header ({type(err).__name__})") from err

    meta = getattr(ds, "file_meta", None) or {}
    if MediaStorageDirectoryStorage in (ds.get("SOPClassUID"), meta.get("MediaStorageSOPClassUID")):
        raise NotAnImage("DICOMDIR")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise Rejected("float pixel data is not supported")
        raise Rejected("no pixel data")
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation"):
        if ds.get(keyword) in (None, ""):
            raise Rejected(f"missing image attribute {keyword}")
    _check_transfer_syntax(ds)
    return ds


def _forced_read(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path, force=True)
        has_image = "PixelData" in ds and "Rows" in ds
    except Exception:
        has_image = False
    if not has_image:
        raise Rejected("not a DICOM file")
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        # Without meta information the encoding pydicom detected while reading tells the syntax.
        implicit, little = ds.original_encoding
        syntax = {
            (True, True): pydicom.uid.ImplicitVRLittleEndian,
            (False, True): pydicom.uid.ExplicitVRLittleEndian,
            (False, False): pydicom.uid.ExplicitVRBigEndian,
        }.get((implicit, little), pydicom.uid.ImplicitVRLittleEndian)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _check_transfer_syntax(ds: Dataset) -> None:
    uid = UID(ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else "")
    if not uid:
        raise Rejected("missing transfer syntax")
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as err:
        raise Rejected(f"unsupported transfer syntax {uid.name} ({uid})") from err
    if not decoder.is_available:
        raise Rejected(f"no installed decoder for transfer syntax {uid.name} ({uid})")
