"""AG-VAS Edge: calibration."""
