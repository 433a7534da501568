"""Training protocol: configs, augmentation, the Lightning module and the cross-validation engine."""
