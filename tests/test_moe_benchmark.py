"""The MoE benchmark: its baselines, its memory measurement and a tiny end-to-end run."""

import json

import pytest
import torch
from torch import nn

from core.commands.benchmark_moe import benchmark_config, build_modules, main, peak_memory


def test_dense_baseline_has_the_moe_active_parameters():
    h, i, e, k = 16, 24, 4, 2
    mods = build_modules(h, i, e, k, None)
    dense_params = sum(p.numel() for p in mods["dense"].parameters())
    expert_params_per_token = k * 3 * h * i  # k experts, each gate+up [2I,H] and down [H,I]
    assert dense_params == expert_params_per_token
    assert mods["ours"].experts.gate_up_proj.shape == mods["olmoe"].experts.gate_up_proj.shape


def test_loop_row_is_the_same_block_with_the_reference_dispatch():
    mods = build_modules(16, 24, 8, 2, 1.0)
    ours, loop = mods["ours"], mods["loop"]
    assert (ours.experts.expert_dispatch, loop.experts.expert_dispatch) == ("grouped", "loop")
    x = torch.randn(1, 40, 16)
    assert torch.allclose(ours(x), loop(x), rtol=1e-5, atol=1e-6)


class Allocates(nn.Module):
    def forward(self, x):
        return torch.ones(1000, 1000) + x.sum()


def test_peak_memory_counts_a_known_allocation():
    peak = peak_memory(Allocates(), torch.zeros(1, 4), backward=False)
    # ones [1000, 1000] (4 MB) and the sum's result (4 MB) are alive together, plus a 4-byte scalar
    assert 8_000_000 <= peak < 8_100_000


def test_benchmark_config_measures_all_four_in_one_run(monkeypatch):
    import core.commands.benchmark_moe as bench

    seconds = {"ours": 1.0, "loop": 4.0, "dense": 0.5, "olmoe": 2.0}  # a fixed clock per module: known ratios
    monkeypatch.setattr(bench, "time_call", lambda m, x, bwd: seconds[m.bench_name] * (3 if bwd else 1))
    original = bench.build_modules

    def named(*a, **kw):
        mods = original(*a, **kw)
        for name, m in mods.items():
            m.bench_name = name
        return mods

    monkeypatch.setattr(bench, "build_modules", named)
    row = benchmark_config(16, 24, 4, 2, 1.25, tokens=64, repeats=3, device=torch.device("cpu"))
    for tag in ("fwd", "fwdbwd"):
        assert row[f"speedup_over_loop_ours_{tag}"] == pytest.approx(4.0)
        assert row[f"speedup_over_loop_olmoe_{tag}"] == pytest.approx(2.0)
        assert row[f"speed_ratio_vs_olmoe_{tag}"] == pytest.approx(2.0)
    assert row["loop_fwdbwd_tok_s"] == pytest.approx(64 / 12.0)
    for name in ("ours", "loop", "dense", "olmoe"):
        assert row[f"{name}_fwd_tok_s"] > 0 and row[f"{name}_fwdbwd_tok_s"] > 0
        assert row[f"{name}_fwdbwd_peak_bytes"] > 0
    for other in ("dense", "olmoe"):
        assert row[f"speed_ratio_vs_{other}_fwd"] > 0
        assert row[f"memory_ratio_vs_{other}_fwdbwd"] == pytest.approx(
            row["ours_fwdbwd_peak_bytes"] / row[f"{other}_fwdbwd_peak_bytes"])


def test_cli_writes_json_and_plot(tmp_path):
    assert main(["--experts", "2", "4", "--top-k", "3", "--capacity", "none", "--hidden", "16", "--intermediate", "16",
                 "--tokens", "32", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["capacity_factor"] is None and rows[0]["experts"] == 4  # E=2, k=3 skipped
    assert rows[0]["speedup_over_loop_ours_fwdbwd"] > 0 and rows[0]["loop_fwd_tok_s"] > 0
    assert (tmp_path / "benchmark.html").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["--experts", "2", "--top-k", "4"])
