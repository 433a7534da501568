"""Ablation grids and hyper-parameter searches built from ``hsqformer cv`` runs.

``hsqformer sweep`` trains every point of a grid (GRID.yaml: named points and/or a product
of settings of any config key) as a cross-validation run on the same folds and reads the grid
with ``hsqformer compare``: a table with CIs, paired tests against the base config and the
paper's kind of figure. ``hsqformer tune`` searches hyper-parameters with Optuna (seeded TPE,
median pruning on per-epoch validation AUC) with the patient-level CV AUC on the training data
as objective. Both resume after an interruption and run in parallel as separate processes.
"""
