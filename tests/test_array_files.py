"""metrics.json with its big arrays in arrays.safetensors: same content, atomic, one-line errors, small at OLMoE's shape."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from core.analysis.resampling import Estimate
from core.analysis.results import ResultMixin
from core.array_files import (ARRAY_FILE, INDEX_KEY, ArrayFileError, is_reference, load_array, load_metrics,
                              write_metrics)
from core.safe_io import atomic_write_json, to_jsonable


@dataclass
class Table(ResultMixin):
    """A result dataclass like the analyses': arrays of every kind, and a bulky field left out of the JSON."""

    corr: np.ndarray
    dead: np.ndarray
    per_expert: np.ndarray
    per_layer: np.ndarray
    counts: torch.Tensor
    names: list[str]
    estimate: Estimate
    groups: dict
    bulky: np.ndarray | None = None
    _not_serialized = ("bulky",)


def _estimate(shape: tuple[int, ...], rng: np.random.Generator) -> Estimate:
    v = rng.normal(size=shape)
    return Estimate(v, v - 1, v + 1, np.zeros(shape), -np.ones(shape), np.ones(shape), "shuffled", 200,
                    diff_low=v - 1, diff_high=v + 1)


def _metrics(rng: np.random.Generator) -> dict:
    corr = rng.normal(size=(12, 12))
    corr[3, 4] = np.nan
    table = Table(corr=corr, dead=rng.random((4, 8)) < 0.3, per_expert=rng.random(300).astype(np.float32),
                  per_layer=rng.random(16), counts=torch.arange(40, dtype=torch.int32).reshape(5, 8),
                  names=["a", "b"], estimate=_estimate((4, 3), rng),
                  groups={"wikitext2 - gsm8k": {"diff": rng.normal(size=(6, 6))}}, bulky=np.ones((50, 50)))
    return {"options": {"micro": True}, "headline": {"tokens": 123, "estimates": {"layer": _estimate((16,), rng)}},
            "findings": ["one", "two"], "warnings": [], "table": table, "nan": float("nan"),
            "draws": [rng.normal(size=(200, 4)), rng.normal(size=3)], "strings": np.array([["x", "y"]])}


def test_round_trip_equals_the_json_of_before(tmp_path):
    metrics = _metrics(np.random.default_rng(0))
    write_metrics(tmp_path / "metrics.json", metrics)
    atomic_write_json(tmp_path / "before.json", metrics)  # what metrics.json held before the arrays moved out
    back = load_metrics(tmp_path)
    assert to_jsonable(back) == json.loads((tmp_path / "before.json").read_text())
    t = back["table"]
    assert t["corr"].dtype == np.float64 and np.isnan(t["corr"][3, 4]) and np.array_equal(t["corr"], metrics["table"].corr, equal_nan=True)
    assert t["dead"].dtype == np.bool_ and np.array_equal(t["dead"], metrics["table"].dead)
    assert t["per_expert"].dtype == np.float32 and t["counts"].dtype == np.int32
    assert isinstance(t["per_layer"], list) and len(t["per_layer"]) == 16  # per-layer values stay in the JSON
    assert t["estimate"]["distinguishable"].dtype == np.bool_ and "bulky" not in t
    assert np.array_equal(load_array(tmp_path, "table/groups/wikitext2 - gsm8k/diff"), metrics["table"].groups["wikitext2 - gsm8k"]["diff"])
    raw = json.loads((tmp_path / "metrics.json").read_text())
    assert raw["table"]["corr"] == {"array_file": ARRAY_FILE, "key": "table/corr", "shape": [12, 12], "dtype": "float64"}
    assert raw["draws"][0]["key"] == "draws/0" and raw["draws"][1] == metrics["draws"][1].tolist()
    assert raw["strings"] == [["x", "y"]]  # no safetensors form: kept in the JSON
    assert raw["nan"] is None and "load_metrics" in raw[INDEX_KEY]["how_to_load"] and raw[INDEX_KEY]["count"] == 15
    assert list(raw)[:2] == [INDEX_KEY, "options"]


def test_without_a_sink_nothing_changes():
    metrics = _metrics(np.random.default_rng(0))
    plain = to_jsonable(metrics)
    assert plain["table"]["corr"][0] == metrics["table"].corr[0].tolist() and plain["table"]["corr"][3][4] is None
    assert not any(is_reference(v) for v in plain["table"].values())
    assert metrics["table"].estimate.to_dict()["distinguishable"] == metrics["table"].estimate.distinguishable.tolist()


def test_an_array_becomes_what_converting_each_element_gives():
    """Arrays go to lists in one call, not a Python call per element: the same values, non-finite floats as None."""
    rng = np.random.default_rng(0)
    arrays = [rng.random((3, 4)), np.array([1.0, np.nan, np.inf, -np.inf, 2.5], np.float32), np.arange(6).reshape(2, 3),
              np.array([True, False]), np.zeros((0, 3)), rng.random((2, 2, 2)).astype(np.float16), np.array(3.5),
              np.array(np.nan), np.array([[np.nan]]), np.arange(4, dtype=np.uint8)]
    for a in arrays:
        each = to_jsonable(a.tolist()) if a.ndim else to_jsonable(a.item())
        assert to_jsonable(a) == each and json.dumps(to_jsonable(a)) == json.dumps(each), a
    assert to_jsonable(np.array([0.123456]), digits=2) == [0.12]


def test_lists_of_plain_numbers_keep_their_values_and_lose_only_non_finite_ones():
    """A row of Python numbers takes a fast path: the values a person would write, nothing else changed."""
    nan, inf = float("nan"), float("inf")
    assert to_jsonable([1, 2.5, nan, -inf, 3]) == [1, 2.5, None, None, 3]
    assert to_jsonable((1, "a", 2)) == [1, "a", 2] and to_jsonable({4}) == [4]
    assert to_jsonable([True, 1.0, nan]) == [True, 1.0, None]  # bools stay bools
    assert to_jsonable([np.float32(1.5), 2.0, np.int64(3)]) == [1.5, 2.0, 3]  # numpy scalars become numbers
    assert to_jsonable([0.123456, nan], digits=2) == [0.12, None]
    assert to_jsonable([[1, nan], [2.5, "x", None]]) == [[1, None], [2.5, "x", None]]


def test_a_failed_write_leaves_the_old_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    write_metrics(tmp_path, _metrics(rng))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = {**_metrics(rng), "zz": object()}  # no JSON form, after the arrays were taken
    with pytest.raises(TypeError):
        write_metrics(tmp_path, broken)
    real = os.replace

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)  # the array file's write fails: neither file changes
    with pytest.raises(OSError):
        write_metrics(tmp_path, _metrics(rng))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either
    monkeypatch.setattr(os, "replace", lambda src, dst: disk_full(src, dst) if dst.name == "metrics.json" else real(src, dst))
    with pytest.raises(OSError):
        write_metrics(tmp_path, _metrics(rng))
    assert (tmp_path / "metrics.json").read_bytes() == before["metrics.json"]
    with pytest.raises(ArrayFileError, match="does not belong to") as e:  # a new array file beside the old metrics.json
        load_metrics(tmp_path)
    assert "\n" not in str(e.value)


def _one_line_error(path: Path, match: str, key: str | None = None) -> str:
    with pytest.raises(ArrayFileError, match=match) as e:
        load_array(path, key) if key else load_metrics(path)
    msg = str(e.value)
    assert "\n" not in msg and ARRAY_FILE in msg
    return msg


def test_missing_corrupt_and_keyless_files_are_one_line_errors(tmp_path):
    from safetensors.numpy import save_file

    metrics = _metrics(np.random.default_rng(2))
    write_metrics(tmp_path, metrics)
    file = tmp_path / ARRAY_FILE
    assert "'nope'" in _one_line_error(tmp_path, "no array", key="nope")
    digest = json.loads((tmp_path / "metrics.json").read_text())[INDEX_KEY]["digest"]
    save_file({"table/dead": np.zeros((4, 8), bool)}, str(file), metadata={"digest": digest})  # right pair, a key missing
    assert "'table/corr'" in _one_line_error(tmp_path, "no array 'table/corr'")
    save_file({"table/corr": np.zeros((2, 2))}, str(file), metadata={"digest": digest})
    _one_line_error(tmp_path, "expects float64 \\[12, 12\\]")
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    _one_line_error(tmp_path, "not a readable safetensors file")
    write_metrics(tmp_path, metrics)
    file.write_bytes(file.read_bytes()[:-100])  # cut short
    _one_line_error(tmp_path, "not a readable safetensors file")
    file.unlink()
    _one_line_error(tmp_path, "no such array file")
    _one_line_error(tmp_path, "no such array file", key="table/corr")


def _olmoe_shaped(L: int = 16, E: int = 64, D: int = 3, rng: np.random.Generator | None = None) -> dict:
    """A metrics object at OLMoE's shape, its arrays at the real run's shapes (16 x 64: the correlations 1024 x 1024)."""
    rng = rng or np.random.default_rng(3)
    n = lambda *shape: rng.normal(size=shape)  # noqa: E731
    ds = ["wikitext2", "gsm8k", "humaneval"][:D]
    corr = lambda: {"corr": n(L * E, L * E), "layer_mean_abs": n(L, L), "layer_max_abs": n(L, L),  # noqa: E731
                    "moe_layers": list(range(L)), "pairs": [[a, a + 1] for a in range(L - 1)]}
    stats = lambda: {"utilization": n(L, E), "counts": n(L, E), "mean_prob": n(L, E), "selection_rate": n(L, E),  # noqa: E731
                     "dead": n(L, E) > 2, "dominant": n(L, E) > 2, "entropy": n(L), "cv": n(L), "gini": n(L),
                     "estimates": {"cv": _estimate((L,), rng), "entropy": _estimate((L,), rng)}}
    spec = lambda: {"counts": n(L, D, E), "share": n(L, D, E), "ratio": n(L, D, E), "score": n(L, E),  # noqa: E731
                    "kl": n(L, D), "preferred_group": rng.integers(0, D, (L, E)), "group_names": ds,
                    "estimate": _estimate((L,), rng)}
    return {
        "options": {"micro": False, "datasets": ds}, "findings": ["a finding of two hundred characters " * 6] * 40,
        "headline": {"tokens": 3 * 50_000, "estimates": {"ablation_delta": _estimate((2 * L, D), rng),
                                                          "correlation": _estimate((L,), rng)}},
        "routing_stats": stats(), "routing_stats_by_dataset": {"groups": {d: stats() for d in ds}},
        "correlation_topk": {**corr(), "estimates": {"layer_mean_abs": _estimate((L, L), rng)}},
        "correlation_probs": corr(), "correlation_by_dataset": {"groups": {d: corr() for d in ds}},
        "correlation_difference": {f"{a} - {b}": {"diff": n(L * E, L * E), "layer_mean_abs_diff": n(L, L)}
                                   for a, b in zip(ds, ds[1:])},
        "coactivation": {"conditional": n(L, E, E), "lift": n(L, E, E), "joint": n(L, E, E), "counts": n(L, E),
                         "transitions": n(L - 1, E, E), "transition_probs": n(L - 1, E, E)},
        "expert_alignment": {"cross": n(L, E, E), "own": n(L, E), "ranks": rng.integers(0, 2048, (L, E)),
                             "per_expert": n(L * E)},
        "collaboration": {"atoms": n(16, L, E), "meta_atoms": n(4, L, E), "specialization": spec()},
        "domain_specialization": spec(), "dataset_specialization": spec(),
        "vocabulary_specialization": {"concentration": n(144, L), "preferred_expert": rng.integers(0, E, (144, L))},
        "routing_consistency": {"bootstrap_draws": n(200, L), "value": n(L)},
        "pruning": {"delta": n(4, 3, 3), "beats_random": n(4, 3) > 0, "fractions": [0.125, 0.25, 0.5]},
    }


def test_metrics_json_at_olmoe_shape_is_small(tmp_path):
    metrics = _olmoe_shaped()
    t = time.perf_counter()
    write_metrics(tmp_path, metrics)
    seconds = time.perf_counter() - t
    size, arrays = (tmp_path / "metrics.json").stat().st_size, (tmp_path / ARRAY_FILE).stat().st_size
    assert size < 2_000_000, f"metrics.json is {size / 1e6:.1f} MB"
    assert arrays > 7 * 1024 * 1024 * 8  # the seven 1024 x 1024 float64 correlation matrices are in the array file
    back = load_metrics(tmp_path)
    assert back["correlation_difference"]["wikitext2 - gsm8k"]["diff"].shape == (1024, 1024)
    assert isinstance(back["routing_stats"]["entropy"], list)  # per-layer summaries stay readable in the JSON
    print(f"16 x 64: metrics.json {size / 1e6:.2f} MB, {ARRAY_FILE} {arrays / 1e6:.1f} MB, written in {seconds:.2f} s")


def test_the_headline_stays_whole_in_the_json(tmp_path):
    """What a person quotes reads from metrics.json alone, whatever the shape of its estimates."""
    import json

    metrics = _olmoe_shaped()
    write_metrics(tmp_path / "metrics.json", metrics)
    plain = json.loads((tmp_path / "metrics.json").read_text())
    delta = plain["headline"]["estimates"]["ablation_delta"]
    assert not is_reference(delta) and not is_reference(delta["value"]) and len(delta["value"]) == 32
    assert is_reference(plain["correlation_topk"]["corr"])
