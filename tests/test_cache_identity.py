"""A cache is reused only when it is the same routing: model, config, weights, dtype, device type, data and settings."""

from __future__ import annotations

import json

import pytest
import torch

from core.collection.cache_format import CacheMismatchError
from core.collection.checkpoints import Checkpoint, parse_checkpoint_name
from core.collection.collector import ActivationCollector
from core.collection.identity import model_identity, state_dict_digest
from core.collection.sweep import sweep_checkpoints
from core.model_access.wrapper import MoEModelWrapper
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
    from exp.caches import main

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
