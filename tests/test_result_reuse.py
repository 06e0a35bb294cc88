"""Stored results of the one pass and of the forward-pass analyses (ablation, pruning): reused on an unchanged rerun, bit for bit, and only then.

A micro run stores them all; a rerun takes them (no cache read, no forward pass, the same metrics
to the bit, the stage table says "reused"); another ``ablation_tokens`` recomputes the ablation
only; ``--recompute pruning`` the pruning only, ``--recompute pass`` the one pass only; one
dataset's cache collected again recomputes the pass (every pass analysis reads every dataset) and
nothing else; a pass analysis whose stored result is gone is computed alone; a cache whose shard is
not its recorded size is read, never trusted; a damaged stored file is recomputed with one line; the
stored form gives back every field of a result exactly (arrays by their bytes and dtype).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.array_files import load_metrics
from core.pipeline.analyses import ablation as ablation_spec
from core.pipeline.analyses import pruning as pruning_spec
from core.pipeline import suite
from core.pipeline.pass_reuse import pass_identity
from core.pipeline.reuse import routers_digest
from core.pipeline.options import REUSED_ANALYSES, OptionsError, parse_options
from core.pipeline.result_codec import CodecError, decode, encode
from core.pipeline.result_store import ARRAY_FILE, RESULT_FILE, STORE_FOLDER, ResultStore
from core.pipeline.run import BasicRoutingAnalysis
from core.pipeline.spec import reusable_names
from tests.shared_runs import micro_models_copy

STAGES = ("ablation", "pruning")
WEIGHT_RESULTS = ("router_similarity", "expert_alignment")  # keyed on the final routers (and the experts' weights)
PASS_RESULTS = ("routing_stats", "correlation_topk", "domain_specialization", "collaboration", "checkpoint_dynamics")


def assert_identical(a, b, path: str = "result") -> None:
    """Equal to the bit: arrays by dtype, shape and bytes, floats exactly (NaN equals NaN), types kept."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), f"{path}: values differ"
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_identical(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


class Runner:
    """Micro runs into one results folder, counting (and keeping) each forward-pass study's computations."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.kwargs = dict(micro=True, results_dir=str(root / "results"), models_dir=str(root / "models"),
                           progress=False, static="none", run_name="micro")
        self.computed: dict[str, list] = {name: [] for name in STAGES}
        self.fed: list[list[str]] = []  # the pass analyses each run's one pass fed (none: every result was stored)

    def run(self, **options):
        """One run; returns its summary, its metrics and how many times each study (and the pass) was computed."""
        before = {k: len(v) for k, v in self.computed.items()}
        fed_before = len(self.fed)
        with pytest.MonkeyPatch.context() as mp:
            for name, module, fn in [("ablation", ablation_spec, "ablation_study"), ("pruning", pruning_spec, "pruning_study")]:
                mp.setattr(module, fn, self._counting(name, getattr(module, fn)))
            mp.setattr(suite, "_one_pass", self._feeding(suite._one_pass))
            summary = BasicRoutingAnalysis(**self.kwargs, **options).run()
        metrics = load_metrics(summary.run_dir)
        counts = {k: len(v) - before[k] for k, v in self.computed.items()}
        counts["pass"] = sorted(n for fed in self.fed[fed_before:] for n in fed)
        return summary, metrics, counts

    def _feeding(self, real):
        def wrapped(sweep, accs, *args, **kwargs):
            self.fed.append(list(accs))
            return real(sweep, accs, *args, **kwargs)
        return wrapped

    def _counting(self, name, real):
        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            self.computed[name].append(out)
            return out
        return wrapped

    def entries(self, name: str) -> list[Path]:
        return sorted(p for p in (self.root / "results" / "cache" / STORE_FOLDER / name).iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = Runner(tmp_path_factory.mktemp("reuse"))
    micro_models_copy(tmp_path_factory, r.root / "models")  # trained once per session
    r.first = r.run()
    r.second = r.run()
    return r


def test_second_run_reuses_both_and_matches_to_the_bit(runner):
    _, first, computed_first = runner.first
    summary, second, computed_second = runner.second
    assert computed_first["ablation"] == 1 and computed_first["pruning"] == 1
    assert set(PASS_RESULTS) <= set(computed_first["pass"])
    assert computed_second == {"ablation": 0, "pruning": 0, "pass": []}, "an unchanged rerun recomputed a stored result"
    for name in STAGES + PASS_RESULTS:
        assert_identical(first[name], second[name], name)
        assert len(runner.entries(name)) == 1
    table = (summary.run_dir / "summary.md").read_text()
    assert "| ablation (reused) |" in table and "| pruning (reused) |" in table
    assert "one pass over the caches (reused: no cache read) |" in table
    for name in WEIGHT_RESULTS:
        assert f"| {name} (reused) |" in table
        assert_identical(first[name], second[name], name)
    assert "(reused" not in runner.first[0].stages.markdown()


def test_another_ablation_size_recomputes_the_ablation_only(runner):
    _, metrics, computed = runner.run(ablation_tokens=200)
    assert computed == {"ablation": 1, "pruning": 0, "pass": []}
    assert len(runner.entries("ablation")) == 2 and len(runner.entries("pruning")) == 1
    assert_identical(metrics["pruning"], runner.first[1]["pruning"], "pruning")


def test_recompute_pruning_recomputes_it_only_and_gives_the_same(runner):
    _, metrics, computed = runner.run(recompute=["pruning"])
    assert computed == {"ablation": 0, "pruning": 1, "pass": []}
    assert_identical(metrics["pruning"], runner.first[1]["pruning"], "pruning")  # recomputed equals the stored one


def test_recompute_pass_reads_the_caches_again_and_gives_the_same(runner):
    _, metrics, computed = runner.run(recompute=["pass"])
    assert computed["ablation"] == 0 and computed["pruning"] == 0
    assert computed["pass"] == runner.first[2]["pass"]
    for name in PASS_RESULTS:
        assert_identical(metrics[name], runner.first[1][name], name)
        assert len(runner.entries(name)) == 1  # the same identity: the entry is replaced, not added


def test_a_pass_analysis_without_a_stored_result_is_computed_alone(runner):
    for entry in runner.entries("collaboration"):
        shutil.rmtree(entry)
    _, metrics, computed = runner.run()
    assert computed == {"ablation": 0, "pruning": 0, "pass": ["collaboration"]}
    assert_identical(metrics["collaboration"], runner.first[1]["collaboration"], "collaboration")


def test_one_datasets_cache_collected_again_recomputes_the_pass_only(runner):
    caches = sorted((runner.root / "results" / "cache").glob("embedded__*/step-*/gsm8k__*"))
    shutil.rmtree(caches[-1])  # the final checkpoint's cache of one dataset: collected again, a new sealed manifest
    _, metrics, computed = runner.run()
    assert computed["pass"] == runner.first[2]["pass"], "a changed cache did not recompute the pass"
    assert computed["ablation"] == 0 and computed["pruning"] == 0  # the same model and tokens, the same statistics
    for name in PASS_RESULTS:
        assert_identical(metrics[name], runner.first[1][name], name)  # collection is deterministic: the same bits
        assert len(runner.entries(name)) == 2  # stored under the new cache's identity beside the old


@pytest.mark.parametrize("damage", ["arrays", "json"])
def test_a_damaged_stored_result_is_recomputed_with_one_line(runner, capsys, damage):
    entry = next(e for e in runner.entries("ablation")
                 if '"max_tokens": 300' in (e / RESULT_FILE).read_text())  # the default (micro) size's entry
    target = entry / (ARRAY_FILE if damage == "arrays" else RESULT_FILE)
    data = bytearray(target.read_bytes())
    if damage == "arrays":
        data[-3] ^= 0xFF  # a flipped bit in an array's last bytes
    else:
        data = bytearray(bytes(data).replace(b'"seed": 0', b'"seed": 1', 1))  # an edited value: still valid JSON
    target.write_bytes(bytes(data))
    capsys.readouterr()
    _, metrics, computed = runner.run()
    err = capsys.readouterr().err
    assert computed == {"ablation": 1, "pruning": 0, "pass": []}
    lines = [line for line in err.splitlines() if "stored ablation result" in line]
    assert len(lines) == 1 and "checksum" in lines[0] and "recomputing" in lines[0], err
    assert_identical(metrics["ablation"], runner.first[1]["ablation"], "ablation")
    _, _, again = runner.run()  # the recomputed result replaced the damaged one
    assert again == {"ablation": 0, "pruning": 0, "pass": []}


def test_stored_results_round_trip_field_by_field(runner, tmp_path):
    store = ResultStore(tmp_path)
    for name in STAGES:
        original = runner.computed[name][0]
        identity = {"analysis": name, "model": {"weights": "abc"}, "fractions": (0.25, 0.5)}
        assert store.save(name, identity, original) is not None
        assert_identical(store.load(name, identity), original, name)
        assert store.load(name, {**identity, "model": {"weights": "abd"}}) is None  # another identity: nothing
    assert_identical(runner.computed["ablation"][0].estimate, runner.computed["ablation"][-1].estimate)


def test_codec_keeps_types_and_refuses_what_it_cannot_store():
    value = {1: [0.1, float("nan"), -float("inf")], "t": (np.float32(1.5), np.int64(3), True, None),
             "np64": [np.float64(0.25), np.float64("nan"), np.float64("-inf")],  # np.float64 is a float too
             "a": np.arange(6, dtype=np.int16).reshape(2, 3), "e": np.zeros((0, 2))}
    arrays: dict = {}
    assert_identical(decode(encode(value, arrays), arrays), value)
    with pytest.raises(CodecError):
        encode({"x": object()}, {})
    with pytest.raises(CodecError):  # a stored document naming a class outside core.analysis
        decode({"dataclass": "subprocess:Popen", "fields": {}}, {})


def test_a_folder_with_foreign_files_is_not_overwritten(tmp_path, capsys):
    store = ResultStore(tmp_path)
    identity = {"analysis": "ablation", "x": 1}
    entry = store.entry("ablation", identity)
    entry.mkdir(parents=True)
    (entry / RESULT_FILE).write_text('{"mine": true}\n')
    assert store.load("ablation", identity) is None
    assert "not written by this toolkit" in capsys.readouterr().err
    assert store.save("ablation", identity, {"v": np.ones(3)}) is None
    assert "not stored" in capsys.readouterr().err
    assert (entry / RESULT_FILE).read_text() == '{"mine": true}\n'  # the user's file is left as it was


def test_a_cache_whose_shard_is_not_its_recorded_size_is_never_trusted(runner, tmp_path):
    class Cache:
        def __init__(self, folder, size):
            self.dir = folder
            self.manifest = {"shards": [{"file": "shard-00000.safetensors", "bytes": size}], "sha256": "abc"}

    class Options:
        class analysis:
            recompute = []

    (tmp_path / "shard-00000.safetensors").write_bytes(b"x" * 10)
    sweep = type("Sweep", (), {"datasets": ["d"], "checkpoints": [type("C", (), {"name": "main", "step": None})()]})

    def identity(size):
        sweep.caches = {"d": [Cache(tmp_path, size)]}
        ctx = type("Ctx", (), {"sweep": sweep, "resamples": 0, "seed": 0, "micro": True, "frequent_ids": [1, 2],
                               "options": Options})()
        return pass_identity(ctx)

    first = identity(10)["caches"]
    assert first[0][:3] == ["d", "main", None] and identity(10)["caches"] == first
    assert identity(11) is None  # truncated, replaced or grown: read (and its checksums checked), not trusted
    shard = tmp_path / "shard-00000.safetensors"
    before = shard.stat().st_mtime_ns
    shard.write_bytes(b"y" * 10)  # rewritten at its size: a flipped byte
    os.utime(shard, ns=(before + 1_000_000, before + 1_000_000))
    assert identity(10)["caches"] != first, "a shard written since the result was stored was trusted unread"


def test_the_routers_digest_sees_one_changed_weight_and_its_dtype():
    routers = {0: torch.arange(12, dtype=torch.float32).reshape(3, 4), 1: torch.ones(3, 4)}
    same = {1: torch.ones(3, 4), 0: torch.arange(12, dtype=torch.float32).reshape(3, 4)}  # another order, the same routers
    edited = {**routers, 1: routers[1].clone()}
    edited[1][2, 3] = 1.0000001
    assert routers_digest(routers) == routers_digest(same)
    assert routers_digest(edited) != routers_digest(routers)
    assert routers_digest({**routers, 1: routers[1].to(torch.bfloat16)}) != routers_digest(routers)


def test_recompute_option_names_reused_analyses():
    assert sorted(reusable_names()) == sorted(REUSED_ANALYSES)
    opts = parse_options(["--micro", "--recompute", "ablation", "--recompute", "pruning", "--recompute", "pass"])
    assert opts.analysis.recompute == ["ablation", "pruning", "pass"]
    assert parse_options(["--micro", "--recompute", "ablation,all"]).analysis.recompute == ["ablation", "all"]
    with pytest.raises(OptionsError, match="recompute must be one of pass, router_similarity, expert_alignment, ablation, pruning, generated_text, all, not 'nosuch'"):
        parse_options(["--micro", "--recompute", "nosuch"])


def test_generated_text_is_reused_only_for_the_same_continuations(runner, monkeypatch):
    from core.pipeline.analyses import generated_text as generated_spec

    calls: list[int] = []
    real = generated_spec.generated_text

    def counting(wrapper, text, per_domain, prompt_tokens, new_tokens):
        calls.append(new_tokens)
        return real(wrapper, text, per_domain, prompt_tokens, new_tokens)

    monkeypatch.setattr(generated_spec, "generated_text", counting)
    runner.run()
    assert calls == [], "an unchanged rerun generated the continuations again"
    _, _, first = runner.run(generate_tokens=5)
    assert calls == [5] and first["ablation"] == 0, "another length of continuation must regenerate it, and only it"
    runner.run(generate_tokens=5)
    assert calls == [5], "the same length was generated again"
    runner.run(generate_tokens=5, recompute=["generated_text"])
    assert calls == [5, 5], "--recompute generated_text did not regenerate it"
