"""Figures, the per-run HTML report, static images and W&B logging for the toolkit.

Figures: ``viz.plotting`` (plain numpy arrays in, Plotly figures out). Report:
``viz.report.Report``. Static images: ``viz.static_export``. W&B: ``viz.wandb_logger``
(imported on demand; wandb is slow to import).
"""

from viz.plotting import *  # every figure function, as listed in viz.plotting
from viz.plotting import __all__ as _figure_names
from viz.report import Report
from viz.static_export import export_many, export_static, static_export_unavailable

__all__ = list(_figure_names) + ["Report", "export_many", "export_static", "static_export_unavailable"]
