"""W&B logging, offline: the run directory holds the metrics, tables, figures and files logged."""

from __future__ import annotations

import contextlib
import io
import json

import pandas as pd
import plotly.graph_objects as go
import pytest

from viz.wandb_logger import WandbLogger, flatten_metrics, read_offline_run, resolve_mode


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb")
    report = root / "report.html"
    report.write_text("<html><body>report</body></html>")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_CONFIG_DIR", str(root / "config"))
        mp.setenv("WANDB_CACHE_DIR", str(root / "cache"))
        logger = WandbLogger("moe-router-study-test", root / "run", name="t1",
                             config={"model": "toy", "top_k": 2})
        logger.log_metrics({"entropy": {"L1": 1.25, "L3": 1.5}, "loss": 2.0}, step=0)
        logger.log_metrics({"loss": 1.5}, step=1)
        logger.log_table("token_table", pd.DataFrame({"token": ["<b>x", "y"], "count": [3, 1]}))
        logger.log_figure("routing_fig", go.Figure(go.Heatmap(z=[[1, 2], [3, 4]])))
        logger.log_file(report)
        logger.log_summary({"collapse_layers": 0})
        said = io.StringIO()
        with contextlib.redirect_stderr(said):
            run_path = logger.finish()
    logger.said = said.getvalue()
    return logger, run_path


def test_offline_when_no_api_key(offline_run):
    logger, run_path = offline_run
    assert logger.mode == "offline"
    assert run_path.name.startswith("offline-run-")
    assert run_path.parent.name == "wandb"


def test_run_directory_holds_metrics_config_and_summary(offline_run):
    _, run_path = offline_run
    run = read_offline_run(run_path)
    assert run["project"] == "moe-router-study-test"
    assert run["config"]["model"] == "toy" and run["config"]["top_k"] == 2
    steps = {h["_step"]: h for h in run["history"]}
    assert steps[0]["entropy/L1"] == 1.25 and steps[0]["entropy/L3"] == 1.5
    assert steps[0]["loss"] == 2.0 and steps[1]["loss"] == 1.5
    logged = {k for h in run["history"] for k in h}
    assert "token_table/path" in logged and "routing_fig/path" in logged
    assert run["summary"]["collapse_layers"] == 0
    assert run["summary"]["loss"] == 1.5


def test_run_directory_holds_table_figure_and_file(offline_run):
    _, run_path = offline_run
    files = run_path / "files"
    tables = list(files.glob("media/table/token_table_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["token", "count"]
    assert table["data"] == [["<b>x", 3], ["y", 1]]
    figs = list(files.glob("media/plotly/routing_fig_*.plotly.json"))
    assert len(figs) == 1
    assert json.loads(figs[0].read_text())["data"][0]["type"] == "heatmap"
    assert (files / "report.html").read_text() == "<html><body>report</body></html>"


def test_finish_says_where_the_run_is(offline_run):
    logger, run_path = offline_run
    assert f"W&B run saved offline in {run_path}" in logger.said
    assert f"wandb sync {run_path}" in logger.said
    assert logger.finish() == run_path  # finishing twice is harmless and returns the same path


def test_mode_resolution(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode() == "offline"
    assert resolve_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match="not one of"):
        resolve_mode("cloud")


def test_metrics_must_be_numbers():
    assert flatten_metrics({"a": {"b": 1, "c": 2.5}}) == {"a/b": 1, "a/c": 2.5}
    with pytest.raises(TypeError, match="metric 'a/b': expected a number"):
        flatten_metrics({"a": {"b": "high"}})
