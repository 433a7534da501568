"""Ultrasound DICOM ingestion: lossless DICOM-to-PNG conversion with de-identification.

``hsqformer dicom2png`` (see :mod:`hsqformer.dicom.cli`) turns a folder of DICOM
files into PNG images plus a ``manifest.csv`` that the training pipeline reads,
without carrying any patient data from the header or from burned-in text.
"""
