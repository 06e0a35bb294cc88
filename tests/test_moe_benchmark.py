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


class Allocates(nn.Module):
    def forward(self, x):
        return torch.ones(1000, 1000) + x.sum()


def test_peak_memory_counts_a_known_allocation():
    peak = peak_memory(Allocates(), torch.zeros(1, 4), backward=False)
    # ones [1000, 1000] (4 MB) and the sum's result (4 MB) are alive together, plus a 4-byte scalar
    assert 8_000_000 <= peak < 8_100_000


def test_benchmark_config_measures_all_three_in_one_run():
    row = benchmark_config(16, 24, 4, 2, 1.25, tokens=64, repeats=1, device=torch.device("cpu"))
    for name in ("ours", "dense", "olmoe"):
        assert row[f"{name}_fwd_tok_s"] > 0 and row[f"{name}_fwdbwd_tok_s"] > 0
        assert row[f"{name}_fwdbwd_peak_bytes"] > 0
    for other in ("dense", "olmoe"):
        assert row[f"speed_ratio_vs_{other}_fwd"] > 0
        assert row[f"memory_ratio_vs_{other}_fwdbwd"] == pytest.approx(
            row["ours_fwdbwd_peak_bytes"] / row[f"{other}_fwdbwd_peak_bytes"])


def test_cli_writes_json_and_plot(tmp_path):
    assert main(["--experts", "4", "--top-k", "1", "--capacity", "none", "--hidden", "16", "--intermediate", "16",
                 "--tokens", "32", "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["capacity_factor"] is None
    assert (tmp_path / "benchmark.html").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["--experts", "2", "--top-k", "4"])
