"""Runs side by side: per-layer differences tested (paired over shared documents, or from intervals), bad input refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from core.analysis.routing_stats import routing_stats
from core.analysis.run_difference import document_counts, paired_difference, shared_documents, summary_difference
from core.array_files import write_metrics
from core.commands.compare_runs import main
from core.pipeline.run_comparison import compare, check_runs
from tests.canary import CanaryTree
from tests.fakes import routing

E, K, L, DOCS, LEN = 4, 1, 3, 40, 30


def _routed(skew: float = 0.0, seed: int = 0, token_seed: int = 0):
    """DOCS documents of two domains, top-1 routing uniform at random, except layer 1: expert 0 takes ``skew`` more."""
    rng = np.random.default_rng(seed)
    n = DOCS * LEN
    doc = np.repeat(np.arange(DOCS), LEN)
    top = rng.integers(0, E, (n, L))
    take = rng.random(n) < skew
    top[take, 1] = 0
    return routing(top[..., None], E, doc_ids=doc, dataset_ids=np.zeros(n, int), domain_ids=doc % 2,
                   token_ids=np.random.default_rng(token_seed).integers(0, 50, n), positions=np.tile(np.arange(LEN), DOCS),
                   domain_names=["a", "b"], dataset_names=["d"])


def test_the_statistic_is_the_run_s_own_load_balance():
    rd = _routed(0.3)
    counts = document_counts(rd.iter_chunks(97))
    d = paired_difference(counts, counts, "load_balance")
    np.testing.assert_allclose(d.value_a, routing_stats(rd).utilization_entropy_norm, rtol=1e-12)
    assert (d.diff == 0).all() and not d.distinguishable.any()


def test_a_planted_imbalance_at_one_layer_is_told_apart_paired_and_the_others_are_not():
    a, b = document_counts(_routed(0.0, seed=0).iter_chunks(200)), document_counts(_routed(0.5, seed=0).iter_chunks(200))
    d = paired_difference(a, b, "load_balance")
    assert d.units >= 6 and "paired over 40 shared documents" in d.method
    assert d.distinguishable.tolist() == [False, True, False]
    assert d.diff[1] < 0 and d.high[1] < 0 and d.diff[0] == 0 and d.diff[2] == 0
    same = paired_difference(a, document_counts(_routed(0.0, seed=1).iter_chunks(200)), "load_balance")
    assert not same.distinguishable.any()  # another draw of uniform routing: nothing to tell apart


def test_runs_on_other_tokens_are_not_paired():
    a, b = document_counts(_routed(0.0).iter_chunks(100)), document_counts(_routed(0.0, token_seed=1).iter_chunks(100))
    assert "other token ids" in shared_documents(a, b)
    with pytest.raises(ValueError, match="same documents"):
        paired_difference(a, b, "load_balance")


def test_the_difference_from_two_intervals():
    far = summary_difference("x", (np.array([0.5]), np.array([0.4]), np.array([0.6])), (np.array([0.8]), np.array([0.7]), np.array([0.9])))
    np.testing.assert_allclose(far.diff, [0.3])
    np.testing.assert_allclose(far.high - far.low, [2 * np.sqrt(2) * 0.1], rtol=1e-9)  # the two half-widths added in quadrature
    assert far.distinguishable.all() and far.units == 0 and "intervals" in far.method
    near = summary_difference("x", (np.array([0.5]), np.array([0.4]), np.array([0.6])), (np.array([0.52]), np.array([0.42]), np.array([0.62])))
    assert not near.distinguishable.any()


def _estimate(value, half):
    value = np.asarray(value, float)
    return {"value": value.tolist(), "low": (value - half).tolist(), "high": (value + half).tolist()}


def _run(folder: Path, balance, layers: int = L, name: str = "m") -> Path:
    """A run folder with a metrics.json as the study writes it (the parts the comparison reads)."""
    metrics = {"options": {"output": {"results_dir": str(folder.parent)}}, "findings": [f"Load balance (null: x): lowest {min(balance):.2f}."],
               "model": {"name": name, "moe_layers": list(range(layers)), "num_experts": E, "top_k": K, "final_checkpoint": None},
               "datasets": ["d"], "tokens": {"d": 100},
               "headline": {"estimates": {"load_balance": _estimate(balance, 0.01), "domain_divergence": _estimate([0.1] * layers, 0.02)}}}
    write_metrics(folder / "metrics.json", metrics)
    return folder


def test_the_page_from_summaries_says_how_it_tested(tmp_path, capsys):
    a = _run(tmp_path / "results" / "a", [0.9, 0.9, 0.9])
    b = _run(tmp_path / "results" / "b", [0.9, 0.5, 0.9])
    out = tmp_path / "results" / "cmp"
    canary = CanaryTree(tmp_path, owned=["results/cmp"])  # the page's folder is all it may write
    assert main([str(a), str(b), "--out", str(out)]) == 0
    assert "summaries only" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "data" / "differences.csv").open()))
    balance = [r for r in rows if r["metric"].startswith("Load balance")]
    assert [r["verdict"] for r in balance] == ["not told apart", "different", "not told apart"]
    assert all("own 95% intervals" in r["method"] for r in rows)
    page = (out / "report.html").read_text()
    assert "Findings side by side" in page and "lowest 0.50" in page and "b at 1 of 3 layers" in page
    assert main([str(a), str(b), "--out", str(out)]) == 0  # its own earlier page is replaced
    canary.check()


def test_paired_where_the_runs_share_documents(tmp_path):
    runs = check_runs([_run(tmp_path / "a", [0.9] * 3), _run(tmp_path / "b", [0.9] * 3), _run(tmp_path / "c", [0.9] * 3)])
    runs[0].documents = document_counts(_routed(0.0).iter_chunks(300))
    runs[1].documents = document_counts(_routed(0.5).iter_chunks(300))
    runs[2].documents = document_counts(_routed(0.5, token_seed=3).iter_chunks(300))
    comp = compare(runs)
    assert comp.shared == {"b": "", "c": comp.shared["c"]} and "other token ids" in comp.shared["c"]
    (name_b, paired), (name_c, from_intervals) = comp.differences["load_balance"]
    assert paired.units > 0 and paired.distinguishable.tolist() == [False, True, False]
    assert from_intervals.units == 0 and not from_intervals.distinguishable.any()  # the intervals say the runs agree


@pytest.mark.parametrize("case, words", [
    ("not a run", "is not a run folder: it has no metrics.json"),
    ("one run", "at least two run folders"),
    ("layers", "different numbers of MoE layers (a: 3, b: 2)"),
    ("twice", "is given twice"),
    ("foreign out", "none of it is the toolkit's to remove"),
])
def test_bad_input_gets_one_line_before_any_work(tmp_path, capsys, case, words):
    a = _run(tmp_path / "a", [0.9] * 3)
    b = {"layers": lambda: _run(tmp_path / "b", [0.9] * 2, layers=2), "not a run": lambda: tmp_path}.get(case, lambda: _run(tmp_path / "b", [0.9] * 3))()
    out = tmp_path / "out"
    if case == "foreign out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    argv = {"one run": [str(a)], "twice": [str(a), str(a)]}.get(case, [str(a), str(b)])
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err
    assert case == "foreign out" and (out / "notes.txt").read_text() == "mine" or not out.exists()


def test_the_page_draws_in_a_browser(tmp_path):
    from viz.browser_check import BrowserUnavailable, check_page

    a, b = _run(tmp_path / "a", [0.9, 0.8, 0.7]), _run(tmp_path / "b", [0.9, 0.5, 0.9])
    assert main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    try:
        result, (traces,) = check_page(tmp_path / "cmp" / "report.html", evaluate=[
            "JSON.stringify(Array.from(document.querySelectorAll('.js-plotly-plot')).map(d => d.data.length))"])
    except BrowserUnavailable as e:
        pytest.skip(str(e))
    assert result.ok, result
    assert result.figures_total >= 4 and result.figures_drawn == result.figures_total
    assert json.loads(traces)[0] == 2  # one line per run on the same axes


def test_the_script_has_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "exp" / "compare_runs.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "RUN_DIR" in out.stdout and "--out" in out.stdout, out.stderr
