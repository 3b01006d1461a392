"""The compiler stages: capture, IR, calibration, sensitivity, search, fine-tuning, export, report, pipeline."""
