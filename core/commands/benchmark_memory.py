"""Memory of every streaming analysis of the main run, and whether it grows with the number of tokens.

Feeds synthetic routing at a model's routing shape (default OLMoE-1B-7B: 16 MoE layers x 64
experts, top-8, a 50k vocabulary, two checkpoints so the dynamics run too) through the main
run's accumulators, and measures the arrays each one keeps between chunks after ``--tokens``
and after four times as many. The ratio (state after 4x tokens / state after 1x) is the check:
1.00 means the memory does not grow with the data. Chunks are the main run's (at most the
tokens whose dense ``[tokens, L, E]`` view is 64 MB).

    uv run python exp/benchmark_memory.py                    # OLMoE shape, ~2 min on 2 CPU threads
    uv run python exp/benchmark_memory.py --layers 4 --experts 8 --top-k 2 --vocab 4096
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from core.analysis.streaming import chunk_tokens, state_nbytes
from core.routing_data import RoutingData


def synthetic_routing(tokens: int, layers: int, experts: int, k: int, vocab: int, first_doc: int, seed: int) -> RoutingData:
    """Random routing with full logits, Zipf-like token ids, documents of 300 tokens, three domains."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, layers, experts, generator=g)
    w, idx = logits.softmax(-1).topk(k, dim=-1)
    token_ids = (vocab * torch.rand(tokens, generator=g) ** 3).long().clamp(max=vocab - 1)  # many frequent ids
    docs = first_doc + torch.arange(tokens) // 300
    return RoutingData(
        moe_layers=list(range(layers)), num_experts=experts, top_k=k, router_logits=logits, topk_idx=idx, topk_weight=w,
        token_ids=token_ids, doc_ids=docs, positions=torch.arange(tokens) % 300, domain_ids=docs % 3,
        dataset_ids=torch.zeros(tokens, dtype=torch.long), domain_names=["a", "b", "c"], dataset_names=["data"],
    )


def main_run_accumulators(resamples: int = 200) -> dict:
    """The accumulators of the main run (two checkpoints, so the dynamics are included)."""
    from core.pipeline.context import RunContext
    from core.pipeline.options import make_options
    from core.pipeline.suite import pass_accumulators

    ckpts = [SimpleNamespace(name="step1", step=1), SimpleNamespace(name="main", step=2)]
    ctx = RunContext(make_options(resamples=resamples), None, SimpleNamespace(checkpoints=ckpts), {}, token_ids=list(range(1024)))
    return pass_accumulators(ctx)[0]


def _inner(acc) -> object:
    """What holds the state: the accumulator itself, under the adapter that picks a checkpoint."""
    return getattr(acc, "acc", acc)


def measure(tokens: int, layers: int = 16, experts: int = 64, k: int = 8, vocab: int = 50_304,
            growth: int = 4, resamples: int = 200) -> dict[str, dict[str, float]]:
    """State bytes of each accumulator after ``tokens`` and after ``growth`` times as many."""
    accs = main_run_accumulators(resamples)
    size = chunk_tokens(layers, experts)
    out: dict[str, dict[str, float]] = {name: {} for name in accs}
    fed, doc, seconds = 0, 0, {name: 0.0 for name in accs}
    for label, target in (("first", tokens), ("grown", tokens * growth)):
        while fed < target:
            n = min(size, target - fed)
            final = synthetic_routing(n, layers, experts, k, vocab, doc, seed=fed)
            early = synthetic_routing(n, layers, experts, k, vocab, doc, seed=fed + 1)
            early.token_ids, early.doc_ids = final.token_ids, final.doc_ids
            for name, acc in accs.items():
                t0 = time.perf_counter()
                acc.update([early, final])
                seconds[name] += time.perf_counter() - t0
            fed += n
            doc += n // 300 + 1
        for name, acc in accs.items():
            out[name][label] = state_nbytes(_inner(acc))
    for name in accs:
        out[name]["ratio"] = out[name]["grown"] / max(out[name]["first"], 1)
        out[name]["seconds"] = seconds[name]
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tokens", type=int, default=8192, help="tokens before the first measurement")
    p.add_argument("--growth", type=int, default=4, help="the second measurement is after this many times the tokens")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50_304)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if min(args.tokens, args.growth, args.layers, args.experts, args.top_k, args.vocab) < 1 or args.top_k > args.experts:
        _parser().error("every size must be >= 1 and --top-k at most --experts")
    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(args.tokens, args.layers, args.experts, args.top_k, args.vocab, args.growth)
    print(f"state kept between chunks, {args.layers} layers x {args.experts} experts, top-{args.top_k}, "
          f"vocabulary {args.vocab}; chunks of {chunk_tokens(args.layers, args.experts)} tokens")
    print(f"{'analysis':34}{f'{args.tokens} tokens':>16}{f'{args.tokens * args.growth} tokens':>16}{'ratio':>8}{'update s':>10}")
    for name, r in res.items():
        print(f"{name:34}{r['first'] / 2**20:13.1f} MB{r['grown'] / 2**20:13.1f} MB{r['ratio']:8.2f}{r['seconds']:10.1f}")
    total = sum(r["grown"] for r in res.values())
    print(f"{'all':34}{sum(r['first'] for r in res.values()) / 2**20:13.1f} MB{total / 2**20:13.1f} MB")
    return res
