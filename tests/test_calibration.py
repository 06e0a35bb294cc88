"""The calibration suite's fast subset: every registered verdict holds its false-positive rate on null worlds and
finds strong planted effects, at a small shape (the full table: ``uv run exp/calibrate.py``, docs/CALIBRATION.md)."""

from __future__ import annotations

import numpy as np
import pytest

from core.analysis.resampling import holm, null_p_value
from core.analysis.shuffles import shift_within_documents
from core.calibration.catalogue import worlds
from core.calibration.runner import calibrate
from core.calibration.table import markdown, passes, summary
from core.calibration.worlds import Shape, World, boost_for, simulate, topic_offsets
from core.pipeline.spec import decisions_of, registered

SMALL = Shape(layers=10, experts=16, top_k=2, docs=24, doc_len=120, vocab=300)
SEEDS = range(8)


# planted effects strong enough to be found every time at this small shape (the catalogue's sizes need the full one)
STRONG = [(World("copy_20%", "", doc_sd=0.5, copy_rate=0.2, target=("corr_layer_pairs", (3, 4))), ("corr_adjacent",)),
          (World("dominant_4x", "", doc_sd=0.2, dominant_factor=4.0, target=("dominant_experts", (2, 0))),
           ("load_balance", "dominant_experts", "dead_experts"))]


@pytest.fixture(scope="module")
def table():
    names = ["iid", "documents", "topical", "sticky_documents", "few_documents_3", "sticky_0.3", "dead", "domain_2x"]
    return calibrate(worlds(names) + STRONG, SMALL, SEEDS, resamples=100, progress=False)


def test_every_verdict_of_every_registered_analysis_is_calibrated(table):
    """Nothing lists the verdicts: each "pass" analysis with estimates or decisions shows up in the table by being registered."""
    have = set(table.verdict)
    assert {"load_balance", "dominant_experts", "dead_experts", "corr_layer_pairs", "corr_adjacent", "domain_top_ratio",
            "domain_divergence", "vocabulary", "consistency_same_top1"} <= have
    specs = [s for s in registered() if s.stage == "pass" and not s.all_checkpoints and (s.decisions or s.estimates)]
    assert {"routing_stats", "correlation_topk", "domain_specialization", "vocabulary_specialization",
            "routing_consistency"} <= {s.name for s in specs}


def test_null_worlds_hold_the_false_positive_rate(table):
    """Pooled over the null worlds, each verdict's flags are what a 7% element rate and a 10% run rate allow (binomial 99.9%).

    8 draws per world are few for a one-element verdict, so the bound is a binomial quantile:
    tight for verdicts with many elements, loose (but far below "always") for one-element ones.
    """
    from scipy.stats import binom

    nulls = table[(table.role == "null") & (table.tested > 0)]
    assert len(nulls) >= 40
    by = nulls.groupby("verdict")
    flagged = by.apply(lambda g: float((g.element_rate * g.tested * g.runs).sum()))
    tested = by.apply(lambda g: float((g.tested * g.runs).sum()))
    runs_flagging = by.apply(lambda g: float((g.any_rate * g.runs).sum()))
    runs = by.runs.sum()
    assert (flagged <= binom.ppf(0.999, tested.round().astype(int), 0.07) + 1e-9).all(), (flagged / tested).to_string()
    assert (runs_flagging <= binom.ppf(0.999, runs, 0.10) + 1e-9).all(), (runs_flagging / runs).to_string()
    assert float(flagged.sum() / tested.sum()) <= 0.02


def test_few_documents_give_no_verdict_rather_than_false_ones(table):
    few = table[table.world == "few_documents_3"]
    assert (few.element_rate.fillna(0) == 0).all(), few.to_string()


def test_strong_planted_effects_are_found(table):
    power = table[table.role == "power"].set_index("world").power
    assert power["sticky_0.3"] >= 0.9 and power["copy_20%"] >= 0.9 and power["dead"] == 1.0
    assert power["dominant_4x"] >= 0.8 and power["domain_2x"] >= 0.75, power.to_string()


def test_the_table_reads_as_markdown_with_a_verdict_per_row(table):
    text = markdown(table, "uv run exp/calibrate.py --seeds 8", "# t")
    assert "| verdict |" in text and "Reproduce: `uv run exp/calibrate.py --seeds 8`" in text
    s = summary(table)
    assert set(s.verdict) == set(table.verdict) and all(isinstance(passes(r), bool) for _, r in s.iterrows())


def test_a_world_is_reproducible_and_its_topics_keep_the_load_balanced():
    w = World("t", "", topics=4)
    a, b = simulate(w, SMALL, 3), simulate(w, SMALL, 3)
    assert (a.topk_idx == b.topk_idx).all() and (a.token_ids == b.token_ids).all()
    assert not (simulate(w, SMALL, 4).topk_idx == a.topk_idx).all()
    off = topic_offsets(4, 3, 16, 0.5, np.random.default_rng(0))  # every expert gets every topic's value once
    assert np.allclose(np.sort(off, 0), np.sort(off, 0)[:, :, :1])


def test_a_planted_factor_is_what_it_does_to_a_share():
    E, k, n = 16, 2, 200_000
    b = boost_for(2.0, E, k)
    g = np.random.default_rng(1).gumbel(size=(n, E))
    g[:, 0] += b
    share = (np.argsort(-g, 1)[:, :k] == 0).any(1).mean()
    assert share / (k / E) == pytest.approx(2.0, rel=0.03)


def test_holm_matches_its_definition():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.005])
    assert np.allclose(holm(p)[[4, 0, 2, 1]], [0.02, 0.03, 0.06, 0.06]) and np.isnan(holm(p)[3])


def test_the_t_prediction_p_value_is_uniform_under_its_null():
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(4000, 9))
    p = np.array([null_p_value(d[0], d[1:]) for d in draws])
    for a in (0.01, 0.05, 0.2):
        assert abs((p < a).mean() - a) < 3 * np.sqrt(a / 4000) + 0.002


def test_a_shift_keeps_each_document_and_its_runs():
    from tests.fakes import routing

    docs = np.repeat([0, 1, 2], [5, 1, 7])
    rd = routing(np.zeros((13, 1, 1), int), 2, doc_ids=docs, positions=np.concatenate([np.arange(5), [0], np.arange(7)]))
    idx = shift_within_documents(rd, 3, times=4)
    for t in idx:
        assert (docs[t] == docs).all()  # tokens stay in their document
        first = t[:5]
        assert sorted(first) == list(range(5)) and first[0] != 0  # a shift, never the identity on a long document
        assert ((np.diff(first) % 5) == 1).all() or ((np.diff(first) == -4) | (np.diff(first) == 1)).all()


def test_decisions_default_to_the_estimates():
    spec = next(s for s in registered() if s.name == "routing_consistency")
    assert spec.decisions is None and decisions_of(spec, type("R", (), {"estimates": {}})()) == {}


def test_weight_and_loss_verdicts_are_calibrated_through_their_registered_analyses():
    from core.calibration.losses import calibrate_losses
    from core.calibration.weights import calibrate_routers

    routers = calibrate_routers(32, range(4), num_null=20).set_index("world")
    assert routers.loc["anisotropic_routers", "any_rate"] <= 0.25 and routers.loc["corresponding_routers", "power"] == 1.0
    losses = calibrate_losses(range(6)).set_index("world")
    assert losses.loc["loss_null", "element_rate"] <= 0.05 and losses.loc["loss_shift", "power"] >= 0.8
    assert losses.loc["loss_null_few", "tested"] < 24  # 6 documents in 64 blocks: some domains get no verdict
    # pruning: criteria that know nothing are not said to beat random; one that knows the costs is, in some runs
    assert losses.loc["prune_null_spread", "any_rate"] <= 1 / 6 and losses.loc["prune_null_equal", "element_rate"] <= 0.05
    assert losses.loc["prune_informed_0.5", "power"] > 0 and losses.loc["prune_null_spread", "tested"] == 6


def test_the_command_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    from core.commands.calibrate import main

    mine = tmp_path / "notes.md"
    mine.write_text("my notes\n")
    assert main(["--seeds", "1", "--worlds", "iid", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert mine.read_text() == "my notes\n" and err.count("\n") == 1 and "was not written by this toolkit" in err
    assert main(["--seeds", "1", "--worlds", "iid", "--out", "-", "--csv", str(mine)]) == 2
    assert mine.read_text() == "my notes\n" and "choose another --csv" in capsys.readouterr().err


def test_a_longer_look_at_a_few_cells_runs_only_the_named_analyses_on_fresh_seeds(tmp_path):
    import pandas as pd

    from core.commands.calibrate import main

    csv = tmp_path / "c.csv"
    main(["--layers", "10", "--experts", "8", "--top-k", "2", "--docs", "8", "--doc-len", "40", "--worlds", "iid",
          "--analyses", "routing_consistency", "--seeds", "2", "--first-seed", "30", "--out", "-", "--csv", str(csv),
          "--no-progress"])
    long = pd.read_csv(csv, keep_default_na=False)
    assert set(long.verdict) == {"consistency_same_top1", "consistency_next_in_topk"} and (long.runs == 2).all()


def test_the_oracle_finds_a_strong_domain_effect_and_not_a_null():
    """The oracle bounds what any domain verdict could find; it must see 2x with documents alike and rarely a null."""
    from core.calibration.catalogue import worlds
    from core.calibration.oracle import oracle_power
    from core.calibration.worlds import Shape

    shape = Shape(layers=10, experts=8, top_k=2, docs=16, doc_len=200)
    strong = [w for w, _ in worlds(["domain_2x"])][0]
    assert oracle_power(strong, shape, range(6))["oracle_power"] >= 0.8
    null = [w for w, _ in worlds(["documents"])][0]  # documents differ, no domain effect
    assert oracle_power(null, shape, range(10))["oracle_power"] <= 0.3
