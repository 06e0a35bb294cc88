"""Tests run offline: no test may reach the Hugging Face Hub."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# pytest-xdist runs two workers on two cores (pyproject's addopts): one math thread each, not two that fight.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# The files with the longest end-to-end runs, longest first. pytest-xdist hands out whole files in collection order
# (pyproject: --dist loadfile --no-loadscope-reorder), so these start first and the short files fill the gaps
# after them; started last, one of them would run alone on one core at the end.
LONGEST_FIRST = [  # by the --durations profile of 2026-12-06 (README's test command)
    "test_pipeline.py", "test_olmoe_shape.py", "test_calibration.py", "test_report_scale.py", "test_hostile_files.py",
    "test_generation_routing.py", "test_findings.py", "test_hostile_config.py", "test_all_moe_families.py",
    "test_moe_benchmark.py", "test_random_shapes.py", "test_result_reuse.py", "test_analysis_merge.py",
]


def pytest_collection_modifyitems(items) -> None:
    """Put the tests of LONGEST_FIRST's files first, in that order; the rest keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: a file's own order is kept


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium per test process for the page checks (each page in a context of its own: Chromium's
    start, about a second, is paid once); None where there is no Chromium (those tests are skipped)."""
    from viz.browser_check import Browser, BrowserUnavailable

    try:
        shared = Browser()
    except BrowserUnavailable:
        yield None
        return
    yield shared
    shared.close()


def pytest_collection_finish(session: object) -> None:
    """Every module the tests use is imported by now: freeze its objects out of the cyclic garbage collector.

    A collection walks every tracked object: with torch's and transformers' millions of them, each
    ``gc.collect()`` (the sweep's after each checkpoint, Python's own as objects pile up) took 0.3 s in
    a test process. Frozen (``gc.freeze``), they are never walked again; what the tests make still is.
    """
    import gc

    gc.collect()
    gc.freeze()
