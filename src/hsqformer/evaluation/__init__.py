"""Evaluation: dataset audit, metrics and reports."""
