"""Every command that writes or deletes, inside a canary tree (issue 28): it writes only its outputs, never over a user's file.

``COMMANDS`` lists every module of ``core/commands/`` with where its canary case is; a new module
fails :func:`test_every_command_module_is_listed` until it is listed. Each command here runs twice
on tiny inputs inside ``CanaryTree`` (the second run overwrites its own outputs, as before), then
once with a user's file where an output goes: a one-line error (exit 2) before any work, that
file unchanged. The main run, ``caches prune`` and a single ``train_moe`` run have theirs in
``tests/test_hostile_files.py``.
"""

from __future__ import annotations

import json
import pkgutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import core.commands
from core.commands import (
    benchmark_alignment,
    benchmark_collection,
    benchmark_memory,
    benchmark_moe,
    calibrate,
    train_moe,
    visualize_training_log,
)
from core.owned_files import COMMENT_MARK, JSON_MARK, FileMark, read_marker
from core.paths import CONFIGS
from tests.canary import PLANTED, CanaryTree

HERE = "tests/test_hostile_commands.py"
COMMANDS = {  # every module of core/commands/: where its canary case is
    "basic_routing_analysis": "tests/test_hostile_files.py",
    "caches": "tests/test_hostile_files.py",
    "train_moe": "tests/test_hostile_files.py (one run); " + HERE + " (the grid's results)",
    "benchmark_collection": HERE,
    "benchmark_moe": HERE,
    "visualize_training_log": HERE,
    "calibrate": HERE,
    "benchmark_memory": HERE + " (writes nothing)",
    "benchmark_alignment": HERE + " (writes nothing)",
    "compare_runs": "tests/test_compare_runs.py (its page twice inside a canary tree; a foreign --out refused)",
    "disk_errors": None,  # not a command: the one-line message of a disk error, used by the others
}

LOG = "".join(json.dumps({"epoch": e, "routing_acc": 0.5, "entropy": 1.3, "utilization": [0.3, 0.3, 0.2, 0.2],
                          "metrics": {"loss": 3.0 - 0.1 * e}}) + "\n" for e in range(1, 4)).encode()
USERS = b'{"a user\'s": "file"}\n'


@dataclass
class Case:
    """A command on tiny inputs whose outputs all go under ``out/``; ``outputs``: (path, its mark; None: a marked folder)."""

    main: Callable
    argv: Callable[[Path], list[str]]
    outputs: list[tuple[str, FileMark | None]]
    ok: tuple[int, ...] = (0,)
    planted: dict[str, bytes] = field(default_factory=dict)


WRITERS = {
    "benchmark_collection": Case(
        benchmark_collection.main,
        lambda r: ["--model", "tiny-olmoe", "--rows", "2", "--seq-len", "8", "--batch-size", "2", "--repeats", "1",
                   "--threads", "1", "--models-dir", str(r / "out" / "models"), "--out", str(r / "out" / "bench.json")],
        [("out/bench.json", JSON_MARK)]),
    "benchmark_moe": Case(
        benchmark_moe.main,
        lambda r: ["--experts", "4", "--top-k", "1", "--capacity", "none", "--hidden", "16", "--intermediate", "16",
                   "--tokens", "32", "--repeats", "1", "--out", str(r / "out" / "bench")],
        [("out/bench/benchmark.json", JSON_MARK), ("out/bench/benchmark.html", COMMENT_MARK)]),
    "visualize_training_log": Case(
        visualize_training_log.main,
        lambda r: ["--log", str(r / "logs" / "training_log.txt"), "--out", str(r / "out" / "report"), "--static", "none"],
        [("out/report", None)], planted={"logs/training_log.txt": LOG}),
    "calibrate": Case(  # exit 1: a verdict missed the bar on one seed, the files are written all the same
        calibrate.main,
        lambda r: ["--layers", "10", "--experts", "8", "--top-k", "2", "--docs", "8", "--doc-len", "40", "--worlds", "iid",
                   "--analyses", "routing_consistency", "--seeds", "1", "--no-progress",
                   "--out", str(r / "out" / "CALIBRATION.md"), "--csv", str(r / "out" / "calibration.csv")],
        [("out/CALIBRATION.md", FileMark(calibrate.TITLE)), ("out/calibration.csv", FileMark(calibrate.CSV_HEADER))],
        ok=(0, 1)),
    "train_moe --grid": Case(
        train_moe.main,
        lambda r: ["--config", str(CONFIGS / "train_micro.yaml"), "--set", "steps=2", "--set", "num_checkpoints=1",
                   "--set", "eval_every=2", "--run-name", "g", "--grid", "--no-progress",
                   "--models-dir", str(r / "out" / "models"), "--results-dir", str(r / "out" / "results")],
        [("out/results/g-grid/grid_results.md", COMMENT_MARK), ("out/results/g-grid/grid_results.json", JSON_MARK)]),
}
SILENT = {  # commands that write nothing: run in the tree as their working folder, nothing may appear
    "benchmark_memory": (benchmark_memory.main, ["--tokens", "64", "--growth", "2", "--layers", "2", "--experts", "4",
                                                 "--top-k", "2", "--vocab", "64", "--threads", "1"]),
    "benchmark_alignment": (benchmark_alignment.main, ["--layers", "1", "--experts", "2", "--intermediate", "8",
                                                       "--hidden", "16", "--reference-experts", "1", "--threads", "1"]),
}


def call(main: Callable, argv: list[str]) -> int:
    """The exit code of a command's ``main`` (a returned result, not a code, is 0)."""
    try:
        code = main(argv)
    except SystemExit as e:
        return int(e.code)
    return code if isinstance(code, int) else 0


def one_line_error(capsys, code: int, says: str) -> str:
    """Exit 2 and one ``error:`` line on stderr (containing ``says``), no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    assert says in lines[0], lines[0]
    return lines[0]


def test_every_command_module_is_listed():
    """A new command module must say where its canary case is (or be listed as no command)."""
    modules = {m.name for m in pkgutil.iter_modules(core.commands.__path__)}
    assert modules == set(COMMANDS), f"list in COMMANDS: {sorted(modules - set(COMMANDS))}; gone: {sorted(set(COMMANDS) - modules)}"
    here = {name for name, where in COMMANDS.items() if where and HERE in where}
    assert here == {name.split()[0] for name in WRITERS} | set(SILENT)


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_command_writes_only_its_outputs_and_overwrites_its_own(name, tmp_path, monkeypatch):
    case = WRITERS[name]
    canary = CanaryTree(tmp_path, owned=["out"], planted={**PLANTED, **case.planted})
    scratch = tmp_path / "out" / "tmp"
    scratch.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # a command's own temporary folders: removed, by the end
    for _ in range(2):  # the second run replaces what the first wrote
        assert call(case.main, case.argv(tmp_path)) in case.ok
        for rel, mark in case.outputs:
            path = tmp_path / rel
            assert mark.found_in(path) if mark else read_marker(path)["kind"] == "sealed", rel
    assert not list(scratch.glob("bench-cache-*"))  # (torch keeps its own compile cache there: not the toolkit's)
    canary.check()


@pytest.mark.parametrize("name, output", [(n, i) for n, c in WRITERS.items() for i in range(len(c.outputs))])
def test_a_users_file_where_an_output_goes_is_refused_before_any_work(name, output, tmp_path, capsys):
    case = WRITERS[name]
    rel, mark = case.outputs[output]
    users = rel if mark else f"{rel}/notes.txt"  # a folder output: the user's file inside it
    canary = CanaryTree(tmp_path, owned=["out"], planted={**PLANTED, **case.planted, users: USERS})
    code = call(case.main, case.argv(tmp_path))
    one_line_error(capsys, code, "was not written by this toolkit" if mark else "has no record")
    assert (tmp_path / users).read_bytes() == USERS
    canary.check()
    written = [p.relative_to(tmp_path).as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written == [users]  # nothing else: refused before any work


def test_an_output_that_is_a_link_is_refused(tmp_path, capsys):
    case = WRITERS["benchmark_collection"]
    canary = CanaryTree(tmp_path, owned=["out"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "bench.json").symlink_to(tmp_path / "victim.txt")
    one_line_error(capsys, call(case.main, case.argv(tmp_path)), "is in the way")
    canary.check()


@pytest.mark.parametrize("name", list(SILENT))
def test_a_command_that_writes_nothing_leaves_its_working_folder_as_it_was(name, tmp_path, monkeypatch):
    main, argv = SILENT[name]
    canary = CanaryTree(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert call(main, argv) == 0
    canary.check()
