"""Benchmark the toolkit's MoE layer against a dense FFN and transformers' OLMoE MoE block.

For every (expert count, top-k, capacity factor) it measures, in the same run, forward and
forward+backward tokens per second and peak extra memory of

* ``ours``  — ``StudyMoeSparseBlock`` (router + sparse experts, with the capacity factor) with
  the grouped expert dispatch (two ``grouped_mm`` calls per layer, ``core.study_moe.dispatch``);
* ``loop``  — the same block, same weights, with the reference dispatch (a Python loop over experts);
* ``dense`` — a gated FFN with the same *active* parameters (intermediate size k * I), i.e.
  the compute one token pays in the MoE, without routing;
* ``olmoe`` — transformers' ``OlmoeSparseMoeBlock`` (router + ``OlmoeExperts``, eager
  implementation, no capacity limit) with the same E, k, H and I.

Repeats alternate the order of the three so a shared CPU slows them alike; a ratio is the
median over repeats of ours/other; ``speedup_over_loop_<name>`` is the median of loop time / that
implementation's time, for ours (grouped) and for OLMoE's block. Peak memory: on CUDA ``max_memory_allocated``; on CPU the
largest running sum of the profiler's allocation events during one call (memory allocated
above what existed before it). Writes ``benchmark.json`` and ``benchmark.html`` (plotly).

    uv run exp/benchmark_moe.py                      # E in {8, 64}, k in {2, 8}: a few minutes on 1 CPU thread
    uv run exp/benchmark_moe.py --experts 8 --top-k 2 --capacity none 1.0 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from core.owned_files import COMMENT_MARK, JSON_MARK, OwnershipError, check_output_file, marked_json, marked_text
from core.safe_io import atomic_write_text

IMPLEMENTATIONS = ("ours", "loop", "dense", "olmoe")


class DenseGatedFFN(nn.Module):
    """The dense baseline: one gated FFN of intermediate size ``k * I`` (the MoE's active size)."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu"):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_up = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(g) * u)


def build_modules(hidden: int, intermediate: int, experts: int, top_k: int, capacity: float | None, seed: int = 0) -> dict[str, nn.Module]:
    """The four implementations with equal H, I, E and k, randomly initialised (ours and loop share weights)."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    torch.manual_seed(seed)
    cfg = SimpleNamespace(
        num_experts=experts, num_experts_per_tok=top_k, hidden_size=hidden, intermediate_size=intermediate,
        hidden_act="silu", routing="topk", norm_topk_prob=False, capacity_factor=capacity, router_jitter_noise=0.0,
        expert_dispatch="grouped",
    )
    from core.study_moe.layer import StudyMoeSparseBlock

    ours = StudyMoeSparseBlock(cfg)
    ocfg = OlmoeConfig(hidden_size=hidden, intermediate_size=intermediate, num_experts=experts, num_experts_per_tok=top_k)
    ocfg._experts_implementation = "eager"
    olmoe = OlmoeSparseMoeBlock(ocfg)
    for block in (ours, olmoe):
        nn.init.normal_(block.gate.weight, std=0.1)
        nn.init.normal_(block.experts.gate_up_proj, std=0.05)
        nn.init.normal_(block.experts.down_proj, std=0.05)
    loop = StudyMoeSparseBlock(SimpleNamespace(**{**vars(cfg), "expert_dispatch": "loop"}))
    loop.load_state_dict(ours.state_dict())
    return {"ours": ours, "loop": loop, "dense": DenseGatedFFN(hidden, top_k * intermediate), "olmoe": olmoe}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call_once(module: nn.Module, x: torch.Tensor, backward: bool):
    """A closure running one forward (and backward) pass on a fresh leaf copy of ``x``."""
    module.zero_grad(set_to_none=True)
    inp = x.detach().requires_grad_(backward)

    def call() -> None:
        if backward:
            module(inp).sum().backward()
        else:
            with torch.no_grad():
                module(inp)

    return call


def time_call(module: nn.Module, x: torch.Tensor, backward: bool) -> float:
    """Seconds for one forward (and backward) pass."""
    call = _call_once(module, x, backward)
    _sync(x.device)
    start = time.perf_counter()
    call()
    _sync(x.device)
    return time.perf_counter() - start


@contextlib.contextmanager
def _stderr_silenced():
    """Mute file descriptor 2: the C++ profiler logs a start/stop line on every use."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def peak_memory(module: nn.Module, x: torch.Tensor, backward: bool) -> int:
    """Peak bytes allocated above the starting point during one call."""
    call = _call_once(module, x, backward)
    if x.device.type == "cuda":
        _sync(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        call()
        _sync(x.device)
        return int(torch.cuda.max_memory_allocated(x.device) - base)
    from torch.profiler import ProfilerActivity, profile

    # The collector off, so that no block from before the profile is freed inside it (collecting first took 0.3 s a
    # call in a process holding many objects, a test's)
    enabled = gc.isenabled()
    gc.disable()
    try:
        with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
    finally:
        if enabled:
            gc.enable()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    running = peak = 0
    for e in events:
        running += e.self_cpu_memory_usage
        peak = max(peak, running)
    return int(peak)


def benchmark_config(hidden: int, intermediate: int, experts: int, top_k: int, capacity: float | None,
                     tokens: int, repeats: int, device: torch.device) -> dict:
    """Throughput, memory and same-run ratios of the four implementations for one setting."""
    modules = {k: m.to(device) for k, m in build_modules(hidden, intermediate, experts, top_k, capacity).items()}
    x = torch.randn(1, tokens, hidden, device=device)
    for m in modules.values():  # warm-up
        time_call(m, x, False)
        time_call(m, x, True)
    times = {(name, bwd): [] for name in IMPLEMENTATIONS for bwd in (False, True)}
    for r in range(repeats):
        order = IMPLEMENTATIONS if r % 2 == 0 else IMPLEMENTATIONS[::-1]
        for bwd in (False, True):
            for name in order:
                times[(name, bwd)].append(time_call(modules[name], x, bwd))
    row = {"experts": experts, "top_k": top_k, "capacity_factor": capacity, "tokens": tokens}
    for name in IMPLEMENTATIONS:
        for bwd, tag in ((False, "fwd"), (True, "fwdbwd")):
            row[f"{name}_{tag}_tok_s"] = tokens / statistics.median(times[(name, bwd)])
            row[f"{name}_{tag}_peak_bytes"] = peak_memory(modules[name], x, bwd)
    for other in ("dense", "olmoe"):
        for bwd, tag in ((False, "fwd"), (True, "fwdbwd")):
            ratios = [o / s for s, o in zip(times[("ours", bwd)], times[(other, bwd)])]  # speed ours / speed other
            row[f"speed_ratio_vs_{other}_{tag}"] = statistics.median(ratios)
            row[f"memory_ratio_vs_{other}_{tag}"] = row[f"ours_{tag}_peak_bytes"] / max(1, row[f"{other}_{tag}_peak_bytes"])
    for name in ("ours", "olmoe"):
        for bwd, tag in ((False, "fwd"), (True, "fwdbwd")):
            ratios = [loop / t for loop, t in zip(times[("loop", bwd)], times[(name, bwd)])]
            row[f"speedup_over_loop_{name}_{tag}"] = statistics.median(ratios)
    return row


def plot(rows: list[dict], path: Path) -> Path:
    """Write ``benchmark_figure(rows)`` as a self-contained HTML file, marked as the toolkit's (``core.owned_files``)."""
    return atomic_write_text(path, marked_text(benchmark_figure(rows).to_html(include_plotlyjs=True)))


def benchmark_figure(rows: list[dict]) -> "plotly.graph_objects.Figure":  # noqa: F821
    """Grouped bars of tokens/s (forward, forward+backward) and peak memory per setting, in the report's template."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from viz._common import finish

    labels = [f"E={r['experts']} k={r['top_k']} cf={r['capacity_factor']}" for r in rows]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=("forward tokens/s", "forward+backward tokens/s", "forward+backward peak memory (MiB)"))
    colors = {"ours": "#1f77b4", "loop": "#2ca02c", "dense": "#7f7f7f", "olmoe": "#ff7f0e"}
    for name in IMPLEMENTATIONS:
        for i, key in enumerate((f"{name}_fwd_tok_s", f"{name}_fwdbwd_tok_s", f"{name}_fwdbwd_peak_bytes"), start=1):
            values = [r[key] / (2**20 if "bytes" in key else 1) for r in rows]
            fig.add_trace(go.Bar(name=name, x=labels, y=values, marker_color=colors[name], showlegend=i == 1,
                                 legendgroup=name), row=i, col=1)
    fig.update_layout(barmode="group")
    finish(fig, "MoE layer (grouped, loop) vs dense FFN (same active params) vs OLMoE block", "", "", height=900)
    for row, unit in ((1, "tokens/s"), (2, "tokens/s"), (3, "MiB")):
        fig.update_yaxes(title_text=unit, row=row, col=1)
    fig.update_xaxes(title_text="setting (experts, top-k, capacity factor)", row=3, col=1)
    return fig


def _capacity(value: str) -> float | None:
    if value.lower() in ("none", "null"):
        return None
    cf = float(value)
    if cf <= 0:
        raise argparse.ArgumentTypeError(f"capacity factor must be > 0 or 'none', got {value}")
    return cf


def summary_line(row: dict) -> str:
    """One setting's line: ours' throughput, its ratios to dense and OLMoE, and the speed-ups over the loop."""
    return (f"E={row['experts']:3d} k={row['top_k']} cf={str(row['capacity_factor']):5s}  ours fwd {row['ours_fwd_tok_s']:9.0f} "
            f"tok/s, fwd+bwd {row['ours_fwdbwd_tok_s']:9.0f} tok/s | over loop: ours fwd "
            f"{row['speedup_over_loop_ours_fwd']:.2f} fwd+bwd {row['speedup_over_loop_ours_fwdbwd']:.2f}, olmoe fwd "
            f"{row['speedup_over_loop_olmoe_fwd']:.2f} fwd+bwd {row['speedup_over_loop_olmoe_fwdbwd']:.2f} | speed vs dense "
            f"fwd {row['speed_ratio_vs_dense_fwd']:.2f} fwd+bwd {row['speed_ratio_vs_dense_fwdbwd']:.2f} | vs olmoe fwd "
            f"{row['speed_ratio_vs_olmoe_fwd']:.2f} fwd+bwd {row['speed_ratio_vs_olmoe_fwdbwd']:.2f} | mem vs dense "
            f"{row['memory_ratio_vs_dense_fwdbwd']:.2f} vs olmoe {row['memory_ratio_vs_olmoe_fwdbwd']:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    p.add_argument("--top-k", type=int, nargs="+", default=[2, 8], help="settings with top-k > experts are skipped")
    p.add_argument("--capacity", type=_capacity, nargs="+", default=[None, 1.25], help="capacity factors; 'none' = no limit")
    p.add_argument("--hidden", type=int, default=256, help="default: OLMoE's H=2048, I=1024 scaled by 1/8")
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable ratios on a shared CPU; 0 = torch's choice)")
    p.add_argument("--out", default="results/benchmark_moe", help="output folder")
    args = p.parse_args(argv)
    settings = [(e, k, cf) for e in args.experts for k in args.top_k if k <= e for cf in args.capacity]
    if not settings:
        p.error("no setting has --top-k <= --experts")
    out = Path(args.out)
    try:  # before any work: the two files go into any folder, and never over a file this toolkit did not write
        if out.exists() and not out.is_dir():
            raise OwnershipError(f"{out} is a file, not a folder; choose another --out")
        check_output_file(out / "benchmark.json", JSON_MARK, "choose another --out")
        check_output_file(out / "benchmark.html", COMMENT_MARK, "choose another --out")
    except OwnershipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for e, k, cf in settings:
        rows.append(benchmark_config(args.hidden, args.intermediate, e, k, cf, args.tokens, args.repeats, device))
        print(summary_line(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "benchmark.json", json.dumps(marked_json({"args": vars(args), "rows": rows}), indent=2))
    html = plot(rows, out / "benchmark.html")
    print(f"wrote {out / 'benchmark.json'} and {html}")
    return 0
