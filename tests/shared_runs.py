"""Expensive test inputs built once per test session and shared, also between pytest-xdist workers.

Training the embedded micro model took 10-20 s, and seven test files trained it again each. Now the
first test that needs it trains it under a lock in the session's shared temporary folder; every
other test (on either worker) copies the finished folder, so no test can change another's copy.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_MICRO = REPO / "configs" / "train_micro.yaml"


def session_root(tmp_path_factory) -> Path:
    """The temporary folder all workers of this session share (xdist gives each worker a subfolder of it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """``root/name``, built by ``build(folder)`` by the first caller of the session; the others wait and reuse it."""
    root = session_root(tmp_path_factory)
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if build raises
        if not done.exists():
            if folder.exists():  # a build that failed half way in this session
                shutil.rmtree(folder)
            build(folder)
            done.touch()
    return folder


def trained_micro_models(tmp_path_factory) -> Path:
    """A models folder holding the embedded micro model, trained once per session (read it, never write it)."""
    from core.study_moe.training import ensure_default_model

    return build_once(tmp_path_factory, "micro-models",
                      lambda folder: ensure_default_model(folder, config=TRAIN_MICRO, progress=False))


def micro_models_copy(tmp_path_factory, dest: Path) -> Path:
    """``dest`` (a models folder) holding a copy of the session's trained micro model, as ``ensure_default_model`` leaves it."""
    shutil.copytree(trained_micro_models(tmp_path_factory), dest, dirs_exist_ok=True)
    return dest
