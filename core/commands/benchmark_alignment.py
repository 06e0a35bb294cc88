"""Benchmark the router-expert alignment analysis at OLMoE-1B-7B's expert shape, against a full SVD per expert.

Every expert's input subspace comes from ``[gate; up]`` (2048 x 2048 at OLMoE's size). The
analysis gets it from the eigendecomposition of the Gram matrix, experts batched, one layer's
weights in memory at a time. The reference, measured in the same run on the first experts, is
the full SVD per expert (what the analysis did before). Weights are random (the cost does not
depend on their values) and are generated one layer at a time; generating them is not timed.

    uv run python exp/benchmark_alignment.py --threads 2 --layers 2            # CPU, 128 experts
    uv run python exp/benchmark_alignment.py --layers 16 --device cuda         # all 1024 experts on a GPU
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping

import torch

from core.analysis.expert_alignment import ExpertAnalyzer


class RandomExperts(Mapping):
    """``{layer: {"gate", "up", "down": None}}`` generated when a layer is read (std 0.02, OLMoE's init); untimed."""

    def __init__(self, layers: int, experts: int, inter: int, hidden: int, seed: int = 0) -> None:
        self.shape, self.layers, self.seed = (experts, inter, hidden), layers, seed
        self.generating_s = 0.0

    def __getitem__(self, layer: int) -> dict:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(self.seed * 1000 + layer)
        out = {"gate": torch.randn(*self.shape, generator=g) * 0.02, "up": torch.randn(*self.shape, generator=g) * 0.02,
               "down": None}
        self.generating_s += time.perf_counter() - t0
        return out

    def __iter__(self):
        return iter(range(self.layers))

    def __len__(self) -> int:
        return self.layers


def reference_svd_seconds(weights: RandomExperts, experts: int, device: str) -> float:
    """Seconds per expert of a full SVD of ``[gate; up]`` (the analysis's former method), on the first experts."""
    mats = weights[0]
    times = []
    for e in range(experts):
        a = torch.cat([mats["gate"][e], mats["up"][e]]).to(device)
        _sync(device)
        t0 = time.perf_counter()
        torch.linalg.svd(a, full_matrices=False)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--layers", type=int, default=2, help="MoE layers (OLMoE has 16)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reference-experts", type=int, default=3, help="experts timed with a full SVD (best of)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (fix it for comparable figures)")
    args = p.parse_args(argv)
    if min(args.layers, args.experts, args.intermediate, args.hidden, args.reference_experts) < 1:
        p.error("sizes must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    hardware = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    weights = RandomExperts(args.layers, args.experts, args.intermediate, args.hidden)
    routers = {layer: torch.randn(args.experts, args.hidden, generator=torch.Generator().manual_seed(layer))
               for layer in range(args.layers)}
    n = args.layers * args.experts
    print(f"{args.layers} layers x {args.experts} experts, [gate; up] of {2 * args.intermediate} x {args.hidden}; {hardware}")
    ref = reference_svd_seconds(weights, min(args.reference_experts, args.experts), args.device)
    weights.generating_s = 0.0
    t0 = time.perf_counter()
    result = ExpertAnalyzer(device=args.device, score_fn="softmax", progress=True).analyze_expert_router_alignment(
        weights, routers, num_permutations=1000)
    _sync(args.device)
    total = time.perf_counter() - t0 - weights.generating_s
    per = total / n
    out = {"hardware": hardware, "layers": args.layers, "experts": n, "alignment_s": total, "per_expert_s": per,
           "reference_svd_per_expert_s": ref, "speedup_vs_svd": ref / per, "olmoe_1024_experts_s": per * 1024,
           "mean_rank": float(result.ranks.mean())}
    print(f"alignment analysis: {total:.1f} s for {n} experts, {per:.3f} s per expert (mean subspace rank "
          f"{out['mean_rank']:.0f} of {args.hidden})")
    print(f"full SVD per expert (reference, same run): {ref:.3f} s; ratio reference/analysis per expert: {ref / per:.2f}x")
    print(f"at OLMoE-1B-7B's 1024 experts: about {per * 1024 / 60:.1f} min here (measured per expert x 1024)")
    return out
