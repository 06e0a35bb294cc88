"""The papers' views (OLMoE Figs. 22-23 and Table 8, Mixtral Fig. 7 and Table 5) on planted routing with known answers."""

import numpy as np
import pytest

from core.analysis.consistency import routing_consistency
from core.analysis.specialization import domain_specialization
from core.analysis.vocabulary import vocabulary_specialization
from core.pipeline.paper_views import expert_token_table, mixtral_table5, paper_layers, paper_views
from tests.planted import planted
from viz.report import Report
from viz.run_report import ReportPage


@pytest.fixture(scope="module")
def rd():
    # 3 layers; domain a prefers experts 0-3, domain b experts 4-7; each token id prefers one expert strongly
    return planted(num_docs=40, doc_len=40, num_experts=8, top_k=2, num_layers=3, domain_pref=3.0, vocab=12,
                   token_pref=30.0, seed=5)


def test_paper_layers_are_first_middle_last():
    assert paper_layers(16) == [0, 8, 15] and paper_layers(2) == [0, 1] and paper_layers(1) == [0]


def test_expert_token_lists_name_the_planted_tokens(rd):
    voc = vocabulary_specialization(rd, min_count=5, permutations=0)
    table = expert_token_table(voc, [0, 2])
    fav = {}  # each token id's most used expert, counted directly
    ids, idx = rd.token_ids.numpy(), rd.topk_idx.numpy()
    for t in np.unique(ids):
        fav[int(t)] = np.bincount(idx[ids == t, 0].ravel(), minlength=8).argmax()
    firsts = table[(table["rank"] == 1) & (table.layer == 0)]
    planted_to = set(fav.values())
    assert len(planted_to) >= 4
    for row in firsts[firsts.expert.isin(planted_to)].itertuples():
        assert fav[row.token_id] == row.expert  # an expert's most specific token is one planted toward it
        assert row.specialization > 0.8  # token_pref 30: nearly every occurrence picks it
        assert row.specialization == pytest.approx(row.routed / row.occurrences)
    others = firsts[~firsts.expert.isin(planted_to)]
    assert (others.specialization < 0.5).all()  # no token was planted toward these


def test_mixtral_table5_per_domain_with_uniform_row(rd):
    cons = routing_consistency(rd, resamples=0)
    t5 = mixtral_table5(cons, [0, 2])
    assert list(t5.index) == ["a", "b", "uniform routing"]
    assert t5.loc["a", "first choice L0"] == pytest.approx(round(cons.domain_same_top1[0, 0], 4))
    assert t5.loc["uniform routing", "first choice L2"] == pytest.approx(1 / 8)


def test_views_draw_the_planted_domain_preference(rd):
    page = ReportPage(Report("t"), decode=None)
    domains = planted(num_docs=40, doc_len=40, num_experts=8, top_k=2, num_layers=3, domain_pref=4.0, seed=6)
    r = {"domain_specialization": domain_specialization(domains, by="domain"),
         "vocabulary_specialization": vocabulary_specialization(rd, min_count=5, permutations=0),
         "routing_consistency": routing_consistency(rd, resamples=0)}
    paper_views(r, page, None)
    fig = page.figures["domain_shares_per_expert"]
    bars = [t for t in fig.data if t.type == "bar" and t.visible]
    a, b = (np.asarray(t.y, float) for t in bars)  # layer 0: domain a, domain b, in % of their tokens
    assert a[:4].min() > 100 * 2 / 8 > a[4:].max() and b[4:].min() > 100 * 2 / 8 > b[:4].max()
    assert {"vocabulary_per_expert", "domain_shares_per_expert"} <= set(page.figures)
    assert "mixtral_table5" in {i.name for s in page.report._sections.values() for i in s.items}
