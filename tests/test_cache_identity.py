"""A cache is reused only when it is the same routing: model, config, weights, dtype, device type, data and settings."""

from __future__ import annotations

import json

import pytest
import torch

from core.collection.checkpoints import Checkpoint, parse_checkpoint_name
from core.collection.collector import ActivationCollector
from core.collection.loaded_identity import state_dict_digest
from core.collection.sweep import sweep_checkpoints
from core.model_access.wrapper import MoEModelWrapper
from core.store.cache_format import CacheMismatchError
from core.store.identity import model_identity
from tests.fakes import FakeWrapper, make_rows
from tests.tiny_models import VOCAB, build


def _rows(n=3, t=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, t), generator=g)
    return ids, torch.ones_like(ids)


def test_a_changed_config_gets_its_own_cache_not_the_old_routing(tmp_path):
    """Reproduction: top-2 caches were reused after num_experts_per_tok was set to 1 in config.json."""
    folder = tmp_path / "olmoe"
    build("olmoe", seed=1).save_pretrained(folder)
    ckpt = Checkpoint(name="main", path=str(folder))
    data = {"toy": make_rows(3, 8, vocab=VOCAB)}
    kw = dict(model_name="local-olmoe", batch_size=2, shard_tokens=8, progress=False)
    first = sweep_checkpoints([ckpt], data, lambda c: MoEModelWrapper(c.path), tmp_path / "cache", **kw)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_experts_per_tok"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    second = sweep_checkpoints([ckpt], data, lambda c: MoEModelWrapper(c.path), tmp_path / "cache", **kw)
    assert first.final("toy").dir != second.final("toy").dir
    assert first.final("toy").load().top_k == 2 and second.final("toy").load().top_k == 1


def test_dtype_and_device_type_are_part_of_the_identity(tmp_path):
    folder = tmp_path / "olmoe"
    build("olmoe", seed=1).save_pretrained(folder)
    base = model_identity(folder)
    assert model_identity(folder, dtype="bfloat16") != base
    assert model_identity(folder, dtype="bf16") == model_identity(folder, dtype="bfloat16")
    assert model_identity(folder, device="cuda:1")["device_type"] == "cuda" != base["device_type"]
    assert model_identity(folder, device="cuda:0") == model_identity(folder, device="cuda:1")  # same kind of device
    ckpt = Checkpoint(name="main", path=str(folder))
    kw = dict(model_name="m", batch_size=2, shard_tokens=8, progress=False)
    data = {"toy": make_rows(3, 6)}
    a = sweep_checkpoints([ckpt], data, lambda c: FakeWrapper(), tmp_path / "c", **kw)
    b = sweep_checkpoints([ckpt], data, lambda c: FakeWrapper(), tmp_path / "c", model_dtype="bfloat16", **kw)
    assert a.final("toy").dir != b.final("toy").dir


def test_two_in_memory_models_of_one_class_do_not_share_a_cache(tmp_path):
    """Reproduction: model B collected into model A's cache directory returned A's routing."""
    a, b = build("olmoe", seed=1), build("olmoe", seed=2)
    assert state_dict_digest(a) != state_dict_digest(b) and state_dict_digest(a) == state_dict_digest(build("olmoe", seed=1))
    ids, mask = _rows()
    from data.tokenization import TokenizedDataset

    tok = TokenizedDataset(input_ids=ids, attention_mask=mask, doc_ids=torch.arange(3)[:, None].expand_as(ids).clone(),
                           positions=torch.arange(8).expand_as(ids).clone(), domain_ids=torch.zeros_like(ids),
                           dataset_ids=torch.zeros_like(ids), domain_names=["d"], dataset_names=["toy"], documents=[],
                           max_length=8, packed=False)
    ActivationCollector(MoEModelWrapper(a), progress=False).collect(tok, tmp_path / "cache", batch_size=2)
    with pytest.raises(CacheMismatchError, match="model_identity"):
        ActivationCollector(MoEModelWrapper(b), progress=False).collect(tok, tmp_path / "cache", batch_size=2)


def test_changing_a_setting_never_blocks_and_every_cache_stays_usable(tmp_path):
    """Reproduction: another --batch-size on the same results directory stopped with "collected differently"."""
    ckpt = parse_checkpoint_name("step5-tokens1B")
    loads = []

    def make(c):
        loads.append(c.name)
        return FakeWrapper()

    data = {"toy": make_rows(5, 6)}
    kw = dict(model_name="m", shard_tokens=8, progress=False)
    one = sweep_checkpoints([ckpt], data, make, tmp_path, batch_size=2, **kw)
    other = sweep_checkpoints([ckpt], data, make, tmp_path, batch_size=3, **kw)
    compact = sweep_checkpoints([ckpt], data, make, tmp_path, batch_size=2, storage="compact", **kw)
    assert len({one.final("toy").dir, other.final("toy").dir, compact.final("toy").dir}) == 3 and len(loads) == 3
    again = sweep_checkpoints([ckpt], data, make, tmp_path, batch_size=2, **kw)
    assert again.final("toy").dir == one.final("toy").dir and len(loads) == 3  # reused, no model loaded
    fresh = sweep_checkpoints([ckpt], data, make, tmp_path, batch_size=2, force=True, **kw)
    assert fresh.final("toy").dir == one.final("toy").dir and len(loads) == 4  # --recollect: collected again


def test_list_and_prune_old_caches(tmp_path, capsys):
    from core.commands.caches import main

    ckpt = parse_checkpoint_name("step5-tokens1B")
    data = {"toy": make_rows(5, 6)}
    kw = dict(model_name="m", shard_tokens=8, progress=False)
    old = sweep_checkpoints([ckpt], data, lambda c: FakeWrapper(), tmp_path, batch_size=2, **kw).final("toy").dir
    (old / "my-notes.txt").write_text("not the cache's")  # prune must not delete what the cache did not write
    new = sweep_checkpoints([ckpt], data, lambda c: FakeWrapper(), tmp_path, batch_size=3, **kw).final("toy").dir
    assert main(["list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not in the latest run" in out and "(latest run)" in out and "2 cache(s)" in out
    assert main(["prune", "--cache-dir", str(tmp_path), "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and (old / "manifest.json").exists()
    assert main(["prune", "--cache-dir", str(tmp_path)]) == 0
    assert not (old / "manifest.json").exists() and not list(old.glob("shard-*")) and (old / "my-notes.txt").exists()
    assert (new / "manifest.json").exists()
    assert main(["list", "--cache-dir", str(tmp_path)]) == 0
    assert "1 cache(s)" in capsys.readouterr().out


def _collect_into(cache_dir: str, delay: float) -> None:
    """One process's collection (for the concurrency test): a slow fake model, small shards."""
    import time

    class Slow(FakeWrapper):
        def trace_routing(self, *a, **k):
            time.sleep(delay)
            return super().trace_routing(*a, **k)

    ActivationCollector(Slow(), progress=False).collect(make_rows(24, 9), cache_dir, batch_size=2, shard_tokens=10)


def test_two_processes_writing_one_cache_neither_crash_nor_corrupt_it(tmp_path):
    import multiprocessing

    from core.store.cache import RoutingCache

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_collect_into, args=(str(tmp_path / "shared"), 0.02)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    _collect_into(str(tmp_path / "alone"), 0.0)
    shared, alone = RoutingCache.open(tmp_path / "shared"), RoutingCache.open(tmp_path / "alone")
    shared.verify()
    assert [s["sha256"] for s in shared.manifest["shards"]] == [s["sha256"] for s in alone.manifest["shards"]]


def test_resume_deletes_only_files_the_cache_wrote(tmp_path):
    from tests.fakes import Killed

    with pytest.raises(Killed):
        ActivationCollector(FakeWrapper(fail_on_call=4), progress=False).collect(make_rows(12, 9), tmp_path, batch_size=2,
                                                                                 shard_tokens=10)
    mine = [tmp_path / "shard-notes.txt", tmp_path / "results.tmp", tmp_path / ".shard-backup.tmp", tmp_path / "README"]
    for f in mine:
        f.write_text("the user's")
    (tmp_path / "shard-00099.safetensors").write_bytes(b"the user's")  # a shard name the writer uses, in no record of it
    ActivationCollector(FakeWrapper(), progress=False).collect(make_rows(12, 9), tmp_path, batch_size=2, shard_tokens=10)
    assert all(f.read_text() == "the user's" for f in mine + [tmp_path / "shard-00099.safetensors"])


def test_an_in_memory_model_edited_in_place_gets_a_new_identity():
    """The digest is kept on the wrapper for speed, but not past a change to a weight."""
    from core.collection.loaded_identity import wrapper_identity

    model = build("olmoe", seed=1)
    w = MoEModelWrapper(model)
    first = wrapper_identity(w)
    assert wrapper_identity(w) == first
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    changed = wrapper_identity(w)
    assert changed["weights"] != first["weights"]
    assert changed["weights"] == state_dict_digest(model)


def _counting_opens(monkeypatch) -> list[str]:
    """Every file core.store.identity opens, in order (the weight files it hashes)."""
    import builtins

    import core.store.identity as identity

    opened: list[str] = []

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(identity, "open", counting_open, raising=False)
    return opened


def _age(path, seconds: float) -> None:
    """Set a file's modification time ``seconds`` into the past (files written long ago)."""
    import os
    import time

    t = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(t, t))


def test_a_models_weights_are_hashed_once_per_process_while_unchanged(tmp_path, monkeypatch):
    """The run (weights_digest), the sweep (checkpoint_identity) and the collector (wrapper_identity) share one read."""
    from types import SimpleNamespace

    from core.collection.loaded_identity import wrapper_identity
    from core.store.identity import checkpoint_identity, weights_digest

    for name, payload in (("model-00001.safetensors", b"\x01" * 3000), ("model-00002.safetensors", b"\x02" * 500)):
        (tmp_path / name).write_bytes(payload)
        _age(tmp_path / name, 3600)
    opened = _counting_opens(monkeypatch)
    digests = {weights_digest(tmp_path) for _ in range(3)}
    digests.add(checkpoint_identity("m", Checkpoint(name="main", path=str(tmp_path)))["weights"])
    digests.add(wrapper_identity(SimpleNamespace(source=str(tmp_path), revision=None))["weights"])
    assert len(digests) == 1 and len(opened) == 2  # each weight file read once
    assert weights_digest(tmp_path, whole_file_limit=10) not in digests and len(opened) == 4  # another limit: read again

    (tmp_path / "model-00002.safetensors").write_bytes(b"\x03" * 500)  # retrained: same size, new bytes, new mtime
    _age(tmp_path / "model-00002.safetensors", 60)
    retrained = weights_digest(tmp_path)
    assert retrained not in digests and len(opened) == 6
    assert weights_digest(tmp_path) == retrained and len(opened) == 6


def test_weight_files_written_just_now_are_read_every_time(tmp_path, monkeypatch):
    """A same-size rewrite within a file time's resolution keeps the mtime, so fresh files are not remembered."""
    from core.store.identity import weights_digest

    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 1000)
    opened = _counting_opens(monkeypatch)
    first = weights_digest(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")
    assert weights_digest(tmp_path) != first and len(opened) == 2
