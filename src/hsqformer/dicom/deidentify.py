"""Pseudonyms and redaction: keep header values out of every output.

Output names and patient ids are keyed hashes (HMAC-SHA256) of the SOP Instance
UID and the PatientID under a secret salt, so they cannot be reversed by
hashing guessed IDs without the salt, yet the same patient always maps to the
same pseudonym under the same salt (patient-level splits keep working).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from pydicom.dataset import Dataset

#: Value representations whose values are free text or identifiers.
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})

#: Shorter values (e.g. "M", "US", "1") are too common to redact without mangling messages.
_MIN_REDACT_LENGTH = 3


def new_salt() -> str:
    """A fresh random salt (64 hex characters)."""
    return secrets.token_hex(32)


def pseudonym(salt: str, kind: str, value: str, length: int = 20) -> str:
    """A keyed hash of ``value`` (hex, ``length`` characters); ``kind`` keeps name spaces apart."""
    digest = hmac.new(salt.encode("utf-8"), f"{kind}:{value}".encode("utf-8"), hashlib.sha256)
    return digest.hexdigest()[:length]


def image_stem(salt: str, sop_instance_uid: str) -> str:
    """The output file stem for one DICOM instance."""
    return pseudonym(salt, "sop", sop_instance_uid)


def patient_pseudonym(salt: str, patient_id: str) -> str:
    """The pseudonymous patient id written to the manifest ("" when the header has none)."""
    if not patient_id.strip():
        return ""
    return "P" + pseudonym(salt, "patient", patient_id.strip(), length=16)


def header_text_values(ds: Dataset) -> set[str]:
    """Every textual value in the dataset (nested sequences included), for redaction."""
    values: set[str] = set()

    def collect(dataset: Dataset) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                for item in elem.value or []:
                    collect(item)
            elif elem.VR in _TEXT_VRS and elem.value not in (None, ""):
                items = elem.value if elem.VM > 1 else [elem.value]
                for item in items:
                    text = str(item).strip()
                    if len(text) >= _MIN_REDACT_LENGTH:
                        values.add(text)
                        values.update(p for p in text.split("^") if len(p) >= _MIN_REDACT_LENGTH)

    try:
        collect(ds)
    except Exception:  # a damaged header must not stop redaction of what was read
        pass
    return values


def redact(message: str, values: set[str]) -> str:
    """``message`` with every header value replaced by ``<redacted>`` (longest first)."""
    for value in sorted(values, key=len, reverse=True):
        message = message.replace(value, "<redacted>")
    return message
