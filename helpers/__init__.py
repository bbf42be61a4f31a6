"""Tested logic behind the study notebooks: data, features, detectors, metrics, experiments, report."""
