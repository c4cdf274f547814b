"""Datasets: sources, versions named by their content, splits, preprocessing,
augmentation and analysis."""
