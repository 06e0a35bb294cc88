"""Every streaming analysis of the main run keeps a state that does not grow with the tokens (OLMoE's routing shape)."""

from __future__ import annotations

from core.commands.benchmark_memory import measure

MB = 2**20
# what each analysis may keep at 16 layers x 64 experts, top-8, a 50k vocabulary (stated in the README)
STATED_MB = {
    "correlation_topk": 290, "vocabulary_specialization": 230, "collaboration": 85, "routing_paths": 60,
    # datasets x 8 document blocks x (L E)² moments (float64), and 64 blocks of L E² joint and shuffle counts
    "dataset_difference": 210, "coactivation_lift": 55,
    "expert_cards": 80,  # (token, expert, block) counts capped at 4M keys (~64 MB), and each expert's top contexts
}


def test_state_is_bounded_and_does_not_grow_with_tokens():
    res = measure(tokens=1500, growth=3)
    # grow until their stated cap, then stop (routed_text: the first documents of each domain, up to its token limit)
    capped = {"routing_paths", "collaboration", "routed_text", "expert_cards"}
    for name, r in res.items():
        assert r["grown"] <= STATED_MB.get(name, 10) * MB, (name, r["grown"] / MB)
        if name not in capped:
            assert r["grown"] <= r["first"], (name, r)
    total = sum(r["grown"] for r in res.values())
    assert total < 720 * MB  # 653 MB measured on 2026-12-06, with the co-activation lift, |Δr| null and expert cards
