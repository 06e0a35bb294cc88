"""Checkpoint names, Hub and local listings, subsampling, and the per-checkpoint cache sweep."""

from __future__ import annotations

import json
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from core.collection.checkpoints import (
    Checkpoint,
    CheckpointError,
    list_hub_checkpoints,
    list_local_checkpoints,
    parse_checkpoint_name,
    select_checkpoints,
)
from core.collection.sweep import checkpoint_loader, load_sweep_index, open_sweep, sweep_checkpoints
from tests.fakes import FakeWrapper, make_rows

B = 10**9


@pytest.mark.parametrize(
    "name, step, tokens, stage",
    [
        ("step5000-tokens20B", 5000, 20 * B, None),
        ("step1200000-tokens5033B", 1200000, 5033 * B, None),
        ("step1220000-tokens5117B", 1220000, 5117 * B, None),
        ("step0-tokens0B", 0, 0, None),
        ("stage1-step140000-tokens1174B", 140000, 1174 * B, "stage1"),
        ("stage2-ingredient1-step1000-tokens5B", 1000, 5 * B, "stage2-ingredient1"),
        ("step1000-tokens4B", 1000, 4 * B, None),
        ("step3000", 3000, None, None),  # Pythia style
        ("step-000250", 250, None, None),  # the toolkit's own runs
        ("checkpoint-500", 500, None, None),  # HF Trainer
        ("step10-tokens2.5T", 10, 2500 * B, None),
        ("step7-tokens40960", 7, 40960, None),
        ("main", None, None, None),
        ("fp32", None, None, None),
        ("load-balancing", None, None, None),
    ],
)
def test_parse_olmoe_and_other_branch_names(name, step, tokens, stage):
    c = parse_checkpoint_name(name)
    assert (c.name, c.step, c.tokens, c.stage) == (name, step, tokens, stage)
    assert c.revision == name


def test_parse_rejects_empty():
    with pytest.raises(ValueError, match="non-empty"):
        parse_checkpoint_name("")


def fake_refs(names):
    return SimpleNamespace(branches=[SimpleNamespace(name=n) for n in names])


def test_list_hub_checkpoints_sorted_by_step(monkeypatch):
    names = ["main", "step20000-tokens83B", "fp32", "step5000-tokens20B", "step1200000-tokens5033B", "step10000-tokens41B"]
    monkeypatch.setattr(huggingface_hub, "list_repo_refs", lambda repo_id: fake_refs(names))
    got = list_hub_checkpoints("allenai/OLMoE-1B-7B-0924")
    assert [c.name for c in got] == [
        "step5000-tokens20B", "step10000-tokens41B", "step20000-tokens83B", "step1200000-tokens5033B", "main"
    ]
    assert [c.name for c in list_hub_checkpoints("x", include_final=False, include_other=True)][-1] == "fp32"


def test_list_hub_checkpoints_offline_is_one_clear_error():
    with pytest.raises(CheckpointError, match="could not list the branches of allenai/OLMoE-1B-7B-0924"):
        list_hub_checkpoints("allenai/OLMoE-1B-7B-0924")  # tests run with HF_HUB_OFFLINE=1


def test_select_checkpoints_log_and_linear():
    all_ = [Checkpoint(f"step{s}-tokens{s // 250}B", s, s // 250 * B) for s in range(5000, 1_205_000, 5000)]
    all_.append(parse_checkpoint_name("main"))
    log = select_checkpoints(all_, n=6, spacing="log")
    steps = [c.step for c in log if c.step is not None]
    assert len(steps) == 6 and steps[0] == 5000 and steps[-1] == 1_200_000
    assert steps == sorted(steps) and steps[2] < 100_000  # log spacing is dense early
    assert log[-1].name == "main"
    lin = [c.step for c in select_checkpoints(all_, n=5, spacing="linear") if c.step]
    assert lin == [5000, 305000, 600000, 900000, 1200000]
    assert select_checkpoints(all_[:3], n=8) == all_[:3]
    assert [c.step for c in select_checkpoints(all_, n=1)] == [1_200_000, None]
    assert [c.step for c in select_checkpoints(all_, n=2, spacing="linear")] == [5000, 1_200_000, None]
    with pytest.raises(ValueError, match="spacing"):
        select_checkpoints(all_, spacing="cubic")


def test_log_selection_of_a_run_saved_at_doubling_steps_spreads_over_it():
    """Step 0 plus 4, 8, ..., 2000 (the embedded model's revisions): the picks spread in log steps, not
    spent on the first few (a log range starting at 1 token, measured in linear distance, took 0-62 and 250)."""
    steps = [0, 4, 8, 16, 31, 62, 125, 250, 500, 1000, 2000]
    run = [Checkpoint(f"step-{s:06d}", s, s * 2048) for s in steps]
    picked = [c.step for c in select_checkpoints(run, n=8, spacing="log")]
    assert picked == [0, 4, 8, 31, 125, 250, 1000, 2000]
    assert [c.step for c in select_checkpoints(run, n=4, spacing="log")] == [0, 4, 125, 2000]


def test_list_local_checkpoints(tmp_path):
    run = tmp_path / "run"
    for d in ("step-000000", "step-000500", "step-000125"):
        (run / d).mkdir(parents=True)
        (run / d / "config.json").write_text("{}")
    (run / "notes").mkdir()
    got = list_local_checkpoints(run)
    assert [c.step for c in got] == [0, 125, 500] and got[0].path == str(run / "step-000000")
    assert got[0].revision is None
    listing = [{"revision": "step-000500", "step": 500, "tokens": 1024000, "path": "step-000500"},
               {"revision": "step-000000", "step": 0, "tokens": 0, "path": "step-000000"}]
    (run / "checkpoints.json").write_text(json.dumps(listing))
    got = list_local_checkpoints(run)
    assert [(c.name, c.step, c.tokens) for c in got] == [("step-000000", 0, 0), ("step-000500", 500, 1024000)]
    with pytest.raises(CheckpointError, match="does not exist"):
        list_local_checkpoints(tmp_path / "missing")


def test_sweep_writes_one_cache_per_checkpoint_and_dataset_and_an_index(tmp_path):
    ckpts = [parse_checkpoint_name("step5000-tokens20B"), parse_checkpoint_name("step10000-tokens41B")]
    datasets = {"toy": make_rows(5, 6), "other": make_rows(4, 6, seed=3)}
    loaded = []

    def make_wrapper(c):
        loaded.append(c.name)
        w = FakeWrapper()
        w.revision = c.revision
        return w

    sweep = sweep_checkpoints(ckpts, datasets, make_wrapper, tmp_path, model_name="allenai/OLMoE-1B-7B-0924",
                              batch_size=2, shard_tokens=8, progress=False)
    idx = sweep.index_path
    assert [c.dir.parent for c in sweep.caches["toy"]] == [tmp_path / "allenai__OLMoE-1B-7B-0924" / c.name for c in ckpts]
    assert all(c.dir.name.startswith("toy__") and len(c.dir.name) == len("toy__") + 12 for c in sweep.caches["toy"])
    assert sweep.final("toy").dir == sweep.caches["toy"][-1].dir
    assert sweep.datasets == ["toy", "other"]
    assert idx == tmp_path / "allenai__OLMoE-1B-7B-0924" / "index.json"
    entries = load_sweep_index(idx)["entries"]
    assert [(e["checkpoint"], e["dataset"]) for e in entries] == [
        ("step5000-tokens20B", "other"), ("step5000-tokens20B", "toy"),
        ("step10000-tokens41B", "other"), ("step10000-tokens41B", "toy"),
    ]
    assert all(e["complete"] and e["num_tokens"] == int(datasets[e["dataset"]].attention_mask.sum()) for e in entries)
    assert (sweep.caches["toy"][0].dir / "manifest.json").exists()
    series = open_sweep(idx, "toy")
    assert [(n, s) for n, s, _ in series] == [("step5000-tokens20B", 5000), ("step10000-tokens41B", 10000)]
    assert series[0][2].manifest["revision"] == "step5000-tokens20B"
    # a second sweep finds everything done and loads no model
    sweep_checkpoints(ckpts, datasets, make_wrapper, tmp_path, model_name="allenai/OLMoE-1B-7B-0924",
                      batch_size=2, shard_tokens=8, progress=False)
    assert loaded == ["step5000-tokens20B", "step10000-tokens41B"]


def test_checkpoint_loader_picks_folder_or_revision(monkeypatch):
    import core.model_access.wrapper as mw

    calls = []
    monkeypatch.setattr(mw, "MoEModelWrapper", lambda model, **kw: calls.append((model, kw)) or "wrapper")
    load = checkpoint_loader("allenai/OLMoE-1B-7B-0924", device="cpu")
    load(parse_checkpoint_name("step5000-tokens20B"))
    load(Checkpoint("step-000500", 500, path="/runs/x/step-000500"))
    assert calls == [("allenai/OLMoE-1B-7B-0924", {"revision": "step5000-tokens20B", "device": "cpu"}),
                     ("/runs/x/step-000500", {"device": "cpu"})]


def test_open_sweep_defaults_to_the_latest_sweeps_checkpoints(tmp_path):
    a, b = parse_checkpoint_name("step5000-tokens20B"), parse_checkpoint_name("step10000-tokens41B")
    kw = dict(model_name="m", batch_size=2, shard_tokens=8, progress=False)
    datasets = {"toy": make_rows(3, 5)}
    sweep_checkpoints([a, b], datasets, lambda c: FakeWrapper(), tmp_path, **kw)
    idx = sweep_checkpoints([b], datasets, lambda c: FakeWrapper(), tmp_path, **kw).index_path
    assert [n for n, _, _ in open_sweep(idx, "toy")] == [b.name]
    assert [n for n, _, _ in open_sweep(idx, "toy", checkpoints=[a, b])] == [a.name, b.name]
    with pytest.raises(CheckpointError, match="step1-tokens1B"):
        open_sweep(idx, "toy", checkpoints=["step1-tokens1B"])


def test_router_weights_beside_the_caches_are_checksummed_and_collected_again_when_damaged(tmp_path):
    """Two flipped bytes once turned a drift of 1.99 into 1.5e38 with exit 0."""
    from core.store.cache_format import CacheCorruptError
    from core.collection.sweep import router_weights_path
    from core.store.router_weights import load_router_weights, save_router_weights

    routers = {0: torch.randn(4, 8), 2: torch.randn(4, 8)}
    path = tmp_path / "router_weights.safetensors"
    save_router_weights(path, routers)
    assert all(torch.equal(load_router_weights(path)[k], v) for k, v in routers.items())
    payload = bytearray(path.read_bytes())
    payload[-5] ^= 0x40
    payload[-9] ^= 0x01
    path.write_bytes(bytes(payload))
    with pytest.raises(CacheCorruptError, match="checksum"):
        load_router_weights(path)

    class WithRouters(FakeWrapper):
        def get_router_weights(self):
            loads.append(1)
            return routers

    loads = []
    ckpt = parse_checkpoint_name("step5-tokens1B")
    kw = dict(model_name="m", batch_size=2, shard_tokens=8, progress=False, router_weights=True)
    sweep_checkpoints([ckpt], {"toy": make_rows(3, 6)}, lambda c: WithRouters(), tmp_path / "c", **kw)
    w_path = router_weights_path(tmp_path / "c", "m", ckpt)
    damaged = bytearray(w_path.read_bytes())
    damaged[-3] ^= 0x10
    w_path.write_bytes(bytes(damaged))
    again = sweep_checkpoints([ckpt], {"toy": make_rows(3, 6)}, lambda c: WithRouters(), tmp_path / "c", **kw)
    assert len(loads) == 2 and torch.equal(again.router_weights[0][0], routers[0])  # read from the model again
    assert torch.equal(load_router_weights(w_path)[2], routers[2])


def test_the_sweep_index_is_checksummed_and_a_damaged_one_is_rebuilt(tmp_path):
    ckpt = parse_checkpoint_name("step5-tokens1B")
    kw = dict(model_name="m", batch_size=2, shard_tokens=8, progress=False)
    idx = sweep_checkpoints([ckpt], {"toy": make_rows(3, 6)}, lambda c: FakeWrapper(), tmp_path, **kw).index_path
    index = json.loads(idx.read_text())
    index["entries"][0]["num_tokens"] += 100
    idx.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_sweep_index(idx)
    loads = []
    again = sweep_checkpoints([ckpt], {"toy": make_rows(3, 6)}, lambda c: loads.append(1) or FakeWrapper(), tmp_path, **kw)
    assert not loads and load_sweep_index(again.index_path)["entries"][0]["num_tokens"] == again.final("toy").num_tokens


def test_hub_revisions_that_do_not_exist_are_named_with_what_exists(monkeypatch):
    from core.pipeline.targets import resolve_model
    from core.pipeline.options import parse_options

    names = ["main", "step5000-tokens20B", "step10000-tokens41B"]
    monkeypatch.setattr(huggingface_hub, "list_repo_refs", lambda repo_id: fake_refs(names))
    opts = parse_options(["--model", "allenai/OLMoE-1B-7B-0924", "--checkpoints", "step5000-tokens20B,step7-tokens1B"])
    with pytest.raises(CheckpointError, match="has no revision step7-tokens1B; it has 3: main, step10000"):
        resolve_model(opts)
    ok = parse_options(["--model", "allenai/OLMoE-1B-7B-0924", "--checkpoints", "step5000-tokens20B"])
    assert [c.name for c in resolve_model(ok).checkpoints] == ["step5000-tokens20B", "main"]
