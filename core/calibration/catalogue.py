"""The worlds every finding is calibrated on: issue 27's null worlds and planted effects, by name.

A null world's routing has no effect any finding looks for; a planted world has one, and names
the verdict that should flag it (``target``) and every verdict whose null it breaks
(``affects``: those are not counted as false positives there). Sizes follow the issue: shares
1.3x and 2x, stickiness 0.02 and 0.3, a token 2x toward one expert, a layer copying the
previous one for 5% of tokens, a dominant expert at 3x its share, a dead expert; and an early
checkpoint that already routes 5% of tokens as the final one does (saturation).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.calibration.worlds import World

CONSISTENCY = ("consistency_same_top1", "consistency_next_in_topk", "consistency_topk_any_overlap")
CORRELATION = ("corr_adjacent", "corr_nonadjacent", "corr_layer_pairs")
LOAD = ("load_balance", "dominant_experts", "dead_experts")
DOMAIN = ("domain_divergence", "domain_top_ratio")


@dataclass(frozen=True)
class Planted:
    """A planted world with what it should flag and which nulls it breaks."""

    world: World
    affects: tuple[str, ...]


NULL_WORLDS = (
    Planted(World("iid", "i.i.d. balanced routing"), ()),
    Planted(World("documents", "document-clustered routing (per-document logit offsets, sd 0.5), balanced overall load",
                  doc_sd=0.5), ()),
    Planted(World("topical", "8 topics that shift routing (sd 0.5) and choose the vocabulary; no token-level preference",
                  topics=8), ()),
    Planted(World("sticky_documents", "document offsets (sd 0.5) and stickiness 0.3: a null for all but consistency",
                  doc_sd=0.5, stickiness=0.3), CONSISTENCY),
    Planted(World("two_datasets", "document offsets (sd 0.5), documents dealt in turn to two datasets that route alike",
                  doc_sd=0.5, datasets=2), ()),
    Planted(World("few_documents_3", "3 documents x 3,000 tokens, document offsets sd 0.5", doc_sd=0.5, docs=3,
                  doc_len=3000), ()),
    Planted(World("few_documents_8", "8 documents x 1,250 tokens, document offsets sd 0.5", doc_sd=0.5, docs=8,
                  doc_len=1250), ()),
)

PLANTED = (
    Planted(World("domain_1.3x", "expert 0 of layer 1 takes 1.3x its share in domain 0", doc_sd=0.5, domain_factor=1.3,
                  target=("domain_top_ratio", 0)), DOMAIN + LOAD[:1]),
    Planted(World("domain_1.3x_even_documents", "expert 0 of layer 1 takes 1.3x its share in domain 0; documents alike",
                  domain_factor=1.3, target=("domain_top_ratio", 0)), DOMAIN + LOAD[:1]),
    Planted(World("domain_2x", "expert 0 of layer 1 takes 2x its share in domain 0", doc_sd=0.5, domain_factor=2.0,
                  target=("domain_top_ratio", 0)), DOMAIN + LOAD),
    Planted(World("sticky_0.02", "a token keeps the previous token's experts with chance 0.02", doc_sd=0.5,
                  stickiness=0.02, target=("consistency_same_top1", None)), CONSISTENCY),
    Planted(World("sticky_0.3", "a token keeps the previous token's experts with chance 0.3", doc_sd=0.5,
                  stickiness=0.3, target=("consistency_same_top1", None)), CONSISTENCY),
    Planted(World("token_2x", "the most frequent token id takes expert 0 2x as often, every layer", topics=8,
                  token_factor=2.0, target=("vocabulary_tokens", 0)), ("vocabulary", "vocabulary_tokens",
                                                                     "saturation_earlier") + LOAD),
    Planted(World("copy_5%", "layer 4 copies layer 3's experts for 5% of tokens", doc_sd=0.5, copy_rate=0.05,
                  target=("corr_layer_pairs", (3, 4))), CORRELATION),
    Planted(World("coupled_pair", "expert 0 at layer 5 brings expert 0 at layer 9 for 30% of its tokens", doc_sd=0.5,
                  couple_rate=0.3, target=("corr_layer_pairs", (5, 9))), CORRELATION + LOAD),
    Planted(World("team_5%", "experts 0 and 1 of layer 6 picked together for 5% of tokens", doc_sd=0.5, team_rate=0.05,
                  target=("coactivation_lift_pairs", (6, 0, 1))), ("coactivation_lift_pairs",) + LOAD),
    Planted(World("dataset_copy_30%", "in the second of two datasets, layer 4 copies layer 3 for 30% of tokens",
                  doc_sd=0.5, datasets=2, dataset_copy_rate=0.3, target=("corr_diff_layers simulated0 - simulated1", (3, 4))),
            CORRELATION + ("corr_diff simulated0 - simulated1", "corr_diff_layers simulated0 - simulated1")),
    Planted(World("dominant_3x", "expert 0 of layer 2 takes 3x its share", doc_sd=0.5, dominant_factor=3.0,
                  target=("dominant_experts", (2, 0))), LOAD),
    Planted(World("dead", "expert 1 of layer 3 is never chosen", doc_sd=0.5, dead=True,
                  target=("dead_experts", (3, 1))), LOAD),
    Planted(World("saturation_5%", "the early checkpoint already has the final experts for 5% of tokens", doc_sd=0.5,
                  saturation=0.05, target=("saturation_earlier", 0)), ("saturation_earlier",)),
)


def worlds(names: list[str] | None = None) -> list[tuple[World, tuple[str, ...]]]:
    """(world, the verdicts it is not a null for) for every world, or those named (unknown names: a ValueError)."""
    everything = [(p.world, p.affects) for p in NULL_WORLDS + PLANTED]
    if names is None:
        return everything
    known = {w.name: (w, a) for w, a in everything}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown world(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]
