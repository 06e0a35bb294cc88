"""Training-log visualizer (seed 000): parsing, bad logs named by line, warnings, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.commands.visualize_training_log import main
from viz.training_log import (
    TrainingLogError,
    log_warnings,
    read_affinity_matrix,
    read_training_log,
    utilization_warnings,
)

ROOT = Path(__file__).resolve().parents[1]


def record(epoch, util=(0.2257, 0.1031, 0.0735, 0.2797, 0.1871, 0.1309), **extra):
    rec = {"epoch": epoch, "routing_acc": 0.5 + 0.01 * epoch, "entropy": 1.4,
           "utilization": list(util), "metrics": {"accuracy": 0.43, "loss": 2.59}}
    rec.update(extra)
    return rec


def write_log(path: Path, lines) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


@pytest.fixture
def seed_log(tmp_path):
    return write_log(tmp_path / "training_log.txt", [record(e) for e in range(1, 6)])


def test_reads_seed_format(seed_log):
    log = read_training_log(seed_log)
    assert log.utilization.shape == (5, 6)
    assert list(log.epochs) == [1, 2, 3, 4, 5] and log.x_label == "epoch"
    assert set(log.metrics) == {"accuracy", "loss"}
    assert log.layers is None and log.steps is None
    frame = log.to_frame()
    assert {"epoch", "routing_acc", "util_expert_5", "metric_loss"} <= set(frame.columns)


def test_reads_toolkit_format_with_layers_and_extra_keys(tmp_path):
    lines = [
        record(0, step=s, tokens=1000 * s, lr=1e-3,
               layer_entropy={"3": 1.1, "1": 1.2},
               layer_utilization={"1": [0.5, 0.5, 0, 0, 0, 0], "3": [0.2] * 5 + [0.0]})
        for s in (10, 20, 30)
    ]
    log = read_training_log(write_log(tmp_path / "log.jsonl", lines))
    assert log.layers == [1, 3]
    assert log.layer_entropy.tolist() == [[1.2, 1.1]] * 3
    assert log.layer_utilization.shape == (3, 2, 6)
    assert log.x_label == "training step" and list(log.x) == [10, 20, 30]
    assert list(log.tokens) == [10000, 20000, 30000]


BAD_LOGS = [
    ([record(1), "{not json"], r":2: not valid JSON"),
    ([record(1), record(2), record(1)], r":3: epoch 1 comes after epoch 2 \(out of order\)"),
    ([record(1), record(1)], r":2: epoch 1 repeats"),
    ([record(1), record(2, util=[0.5] * 5)], r":2: utilization has 5 experts but line 1 has 6"),
    ([{"epoch": 1, "utilization": [1.0], "routing_acc": 0.5}], r":1: missing field\(s\) 'entropy', 'metrics'"),
    ([record(1), "[1, 2]"], r":2: expected a JSON object, got list"),
    ([record(1, util=[0.5, -0.1])], r":1: utilization has a negative"),
    ([record(1, util=[])], r":1: utilization must be a non-empty list"),
    ([record(1, routing_acc=1.5)], r":1: routing_acc 1.5 is outside \[0, 1\]"),
    ([record(1, metrics={"loss": "low"})], r":1: metrics.loss must be a number"),
    ([record(1, metrics={"loss": float("nan")})], r":1: metrics.loss is nan \(write null"),
    ([record(1, entropy=float("inf"))], r":1: entropy is inf"),
    ([{**record(1), "epoch": "one"}], r":1: epoch must be a number"),
    ([record(0, step=5), record(0, step=5)], r":2: step 5 does not increase"),
    ([record(1, step=1), record(2)], r":2: lacks 'step' unlike line 1"),
    ([record(0, step=1, layer_entropy=[1, 2]), record(0, step=2, layer_entropy=[1, 2, 3])],
     r":2: layer_entropy covers layers \[0, 1, 2\] but line 1 covers \[0, 1\]"),
    ([record(0, step=1, layer_entropy=[1, 2], layer_utilization={"4": [1.0] * 6, "5": [1.0] * 6})],
     r":1: layer_entropy covers layers \[0, 1\] but layer_utilization covers \[4, 5\]"),
]


@pytest.mark.parametrize("lines, message", BAD_LOGS)
def test_bad_logs_name_the_line_and_problem(tmp_path, lines, message):
    path = write_log(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TrainingLogError, match=rf"^{path!s}{message}"):
        read_training_log(path)


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = write_log(tmp_path / "b.jsonl", [record(1), "", "oops"])
    with pytest.raises(TrainingLogError, match=r"b\.jsonl:3: not valid JSON"):
        read_training_log(path)


def test_empty_and_missing_logs(tmp_path):
    with pytest.raises(TrainingLogError, match="no records"):
        read_training_log(write_log(tmp_path / "e.jsonl", ["", " "]))
    with pytest.raises(TrainingLogError, match="no such file"):
        read_training_log(tmp_path / "absent.jsonl")


def test_affinity_matrix_formats(tmp_path):
    bare = tmp_path / "a.csv"
    bare.write_text("0.1,0.9\n0.4,0.6\n")
    m, rows, cols = read_affinity_matrix(bare)
    assert m.shape == (2, 2) and rows is None and cols is None
    pandas_style = tmp_path / "p.csv"
    pandas_style.write_text(",e0,e1\n0,0.1,0.9\n1,0.4,0.6\n")
    m, rows, cols = read_affinity_matrix(pandas_style)
    assert m.tolist() == [[0.1, 0.9], [0.4, 0.6]] and rows == ["0", "1"] and cols == ["e0", "e1"]
    ragged = tmp_path / "r.csv"
    ragged.write_text("0.1,0.9\n0.4\n")
    with pytest.raises(TrainingLogError, match=r"r\.csv:2: has 1 values but earlier rows have 2"):
        read_affinity_matrix(ragged)
    bad = tmp_path / "b.csv"
    bad.write_text("e0,e1\n0.1,0.9\n0.4,x\n")
    with pytest.raises(TrainingLogError, match=r"b\.csv:3: column 2 is not a number \('x'\)"):
        read_affinity_matrix(bad)


def test_collapse_and_underuse_warnings():
    x = np.array([1, 2, 3])
    balanced = np.full((3, 4), 0.25)
    assert utilization_warnings(balanced, x) == []
    collapsed = np.array([[0.25] * 4, [0.95, 0.05, 0, 0], [0.97, 0.01, 0.01, 0.01]])
    warns = utilization_warnings(collapsed, x)
    assert warns[0].startswith("collapse: expert 0 takes 95.0% of routing at epoch 2")
    assert "still collapsed" in warns[0] and "threshold 90%" in warns[0]
    assert warns[1].startswith("under-use: expert(s) 1, 2, 3") and "epoch 3" in warns[1]
    recovered = np.array([[0.92, 0.08, 0, 0], [0.25] * 4, [0.25] * 4])
    assert "recovers by the end" in utilization_warnings(recovered, x)[0]


def test_per_layer_warnings(tmp_path):
    lines = [record(0, step=s, util=[0.25] * 4,
                    layer_utilization={"5": [0.25] * 4, "7": [0.94, 0.02, 0.02, 0.02]})
             for s in (1, 2)]
    warns = log_warnings(read_training_log(write_log(tmp_path / "l.jsonl", lines)))
    assert any(w.startswith("collapse in layer 7: expert 0") for w in warns)
    assert not any("layer 5" in w for w in warns)


def test_cli_writes_report_with_affinity_beside_log(seed_log, capsys):
    (seed_log.parent / "router_affinity_matrix.csv").write_text("0.1,0.9\n0.4,0.6\n")
    out = seed_log.parent / "out"
    assert main(["--log", str(seed_log), "--out", str(out), "--static", "none"]) == 0
    page = (out / "report.html").read_text()
    for name in ("router_affinity_matrix_heatmap", "expert_utilization", "router_entropy",
                 "routing_accuracy", "metric_loss", "metric_accuracy"):
        assert f"fig-{name}" in page, name
        assert (out / "data" / f"{name}.csv").is_file(), name
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out


def test_cli_warns_about_collapse(tmp_path, capsys):
    log = write_log(tmp_path / "c.jsonl",
                    [record(1), record(2, util=[0.95, 0.01, 0.01, 0.01, 0.01, 0.01])])
    assert main(["--log", str(log), "--out", str(tmp_path / "o"), "--static", "none"]) == 0
    err = capsys.readouterr().err
    assert "warning: collapse: expert 0 takes 95.0%" in err
    assert "warning: under-use" in err
    assert "collapse: expert 0" in (tmp_path / "o" / "report.html").read_text()


def test_cli_bad_log_is_one_line_error(tmp_path, capsys):
    log = write_log(tmp_path / "bad.jsonl", [record(1), "{oops"])
    assert main(["--log", str(log), "--out", str(tmp_path / "o"), "--static", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {log}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    assert not (tmp_path / "o").exists()


def test_cli_runs_as_a_script_from_the_repo_root():
    proc = subprocess.run([sys.executable, "exp/visualize_training_log.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--log" in proc.stdout and "collapse" in proc.stdout


def test_cli_plots_per_layer_curves_from_toolkit_logs(tmp_path):
    lines = [record(0, step=s, tokens=512 * s, routing_acc_chance=0.25,
                    layer_entropy={"1": 1.0, "3": 1.3},
                    layer_utilization={"1": [1 / 6] * 6, "3": [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]})
             for s in (100, 200)]
    log = write_log(tmp_path / "train.jsonl", lines)
    assert main(["--log", str(log), "--out", str(tmp_path / "o"), "--static", "none"]) == 0
    page = (tmp_path / "o" / "report.html").read_text()
    assert "fig-layer_entropy" in page and "fig-layer_utilization" in page
    assert "training step" in page and "<th>tokens</th><td>102,400</td>" in page
    acc = (tmp_path / "o" / "data" / "routing_accuracy.csv").read_text().splitlines()
    assert acc[0] == "training step,routing_accuracy,chance_level" and acc[1].endswith(",0.25")


def test_a_binary_file_is_one_clear_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TrainingLogError, match="not a text file"):
        read_training_log(path)
    path.write_bytes(b"\x00\x00\x00{}\n")
    with pytest.raises(TrainingLogError, match="NUL bytes"):
        read_training_log(path)
