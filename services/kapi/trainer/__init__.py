"""The trainer: datasets, training and hardware-aware hyperparameter search."""
