"""Calibration of every registered analysis's verdicts on simulated worlds (``exp/calibrate.py``, docs/CALIBRATION.md)."""
