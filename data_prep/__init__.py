"""Dataset preparation: MVTec AD download, the embedded synthetic dataset, validation, MVTec-Shift."""
