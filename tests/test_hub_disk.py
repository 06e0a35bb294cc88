"""The HF cache footprint of Hub checkpoint sweeps: sizes, the plan shown first, freeing what a sweep downloaded.

No network: a fake HF cache in the hub layout (``models--owner--name/{blobs,snapshots/<commit>,refs/<branch>}``)
under tmp_path, and ``HfApi.model_info`` replaced where download sizes are needed.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from core.collection import hub_disk
from core.collection.checkpoints import Checkpoint, parse_checkpoint_name
from core.collection.hub_disk import (
    LEDGER_FILE,
    cached_revision_size,
    free_revision,
    human_bytes,
    is_hub_repo,
    plan_text,
    revision_download_size,
)
from core.collection.sweep import index_path, sweep_checkpoints
from tests.fakes import FakeWrapper, Killed, make_rows

REPO = "owner/moe"
GB = 10**9
SHARED = b"{\"tokenizer\": true}" * 3  # the same tokenizer file in every revision: one blob


def commit_of(ref: str) -> str:
    return hashlib.sha1(ref.encode()).hexdigest()


def put_revision(cache, ref: str, weights: int, repo: str = REPO, commit: str | None = None) -> str:
    """One revision in the real hub layout: blobs by content hash, snapshot symlinks, refs/<ref> holding the commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    commit = commit or commit_of(ref)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    for name, payload in {"model.safetensors": ref.encode().ljust(weights, b"w"), "tokenizer.json": SHARED}.items():
        blob = root / "blobs" / hashlib.sha256(payload).hexdigest()
        blob.write_bytes(payload)
        (snap / name).symlink_to(f"../../blobs/{blob.name}")
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return commit


def snapshot(cache, ref: str, repo: str = REPO):
    return cache / ("models--" + repo.replace("/", "--")) / "snapshots" / commit_of(ref)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF hub cache that huggingface_hub and hub_disk read (the constant is read at import, so it is patched)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------------------- sizes in the cache, freeing
def test_cached_revision_size_counts_the_revisions_blobs(hf_cache):
    assert cached_revision_size(REPO, "step1") == 0  # nothing cached yet
    commit = put_revision(hf_cache, "step1", 1000)
    put_revision(hf_cache, "step2", 2000)
    assert cached_revision_size(REPO, "step1") == 1000 + len(SHARED)
    assert cached_revision_size(REPO, "step2") == 2000 + len(SHARED)
    assert cached_revision_size(REPO, commit) == 1000 + len(SHARED)  # by commit hash too
    assert cached_revision_size(REPO, "step3") == 0
    assert cached_revision_size("other/repo", "step1") == 0
    assert cached_revision_size(REPO, "step1", cache_dir=hf_cache.parent / "missing") == 0


def test_free_revision_removes_only_that_revision_and_returns_the_bytes(hf_cache):
    put_revision(hf_cache, "step1", 1000)
    put_revision(hf_cache, "step2", 2000)
    assert free_revision(REPO, "step2") == 2000  # the tokenizer blob is step1's too: it stays
    assert not snapshot(hf_cache, "step2").exists()
    assert not (hf_cache / "models--owner--moe" / "refs" / "step2").exists()
    assert (snapshot(hf_cache, "step1") / "tokenizer.json").read_bytes() == SHARED
    assert cached_revision_size(REPO, "step1") == 1000 + len(SHARED)
    assert free_revision(REPO, "step2") == 0  # not cached any more
    assert free_revision(REPO, "step1") == 1000 + len(SHARED)  # the last one takes the shared blob with it
    assert not (hf_cache / "models--owner--moe").exists()


def test_is_hub_repo_tells_hub_names_from_folders(tmp_path):
    assert is_hub_repo("allenai/OLMoE-1B-7B-0924") and is_hub_repo("gpt2")
    assert not is_hub_repo(str(tmp_path)) and not is_hub_repo(None) and not is_hub_repo("a/b/c")


# ---------------------------------------------------------------------------- the sweep frees what it downloaded
class HubFake(FakeWrapper):
    """A model 'loaded from the Hub': loading puts the revision in the fake HF cache, as from_pretrained would."""

    def __init__(self, cache, ckpt: Checkpoint, loads: list, weights: int = 3000):
        super().__init__()
        self.source, self.revision = REPO, ckpt.revision
        loads.append(ckpt.name)
        if not snapshot(cache, ckpt.revision).exists():
            put_revision(cache, ckpt.revision, weights)

    def get_router_weights(self):
        return {0: torch.ones(8, 4), 2: torch.zeros(8, 4)}


def run_sweep(hf_cache, tmp_path, ckpts, loads, **kw):
    return sweep_checkpoints(ckpts, {"toy": make_rows(3, 6)}, lambda c: HubFake(hf_cache, c, loads), tmp_path / "caches",
                             model_name=REPO, batch_size=2, shard_tokens=8, router_weights=True, **kw)


def test_a_sweep_frees_what_it_downloaded_and_never_what_the_user_had(hf_cache, tmp_path, capsys):
    put_revision(hf_cache, "step1", 1000)  # the user's, before the sweep
    loads: list[str] = []
    ckpts = [parse_checkpoint_name(n) for n in ("step1", "step2", "step3")]
    sweep = run_sweep(hf_cache, tmp_path, ckpts, loads)
    assert loads == ["step1", "step2", "step3"] and len(sweep.router_weights) == 3
    assert snapshot(hf_cache, "step1").exists()
    assert not snapshot(hf_cache, "step2").exists() and not snapshot(hf_cache, "step3").exists()
    out = capsys.readouterr().out
    assert f"freed 3.0 kB of {REPO}@step2 from the HF cache" in out and f"{REPO}@step3" in out
    assert f"{REPO}@step1" not in out
    assert not (index_path(tmp_path / "caches", REPO).parent / LEDGER_FILE).exists()  # nothing left to free


def test_keep_checkpoints_keeps_every_download(hf_cache, tmp_path, capsys):
    loads: list[str] = []
    run_sweep(hf_cache, tmp_path, [parse_checkpoint_name("step2")], loads, keep_checkpoints=True)
    assert loads == ["step2"] and snapshot(hf_cache, "step2").exists()
    assert "freed" not in capsys.readouterr().out


def test_a_branch_on_a_commit_the_user_had_is_not_freed(hf_cache, tmp_path):
    """The final step's branch can be the very commit of ``main``: deleting it would take the user's ``main`` too."""
    commit = put_revision(hf_cache, "main", 1000)
    loads: list[str] = []

    def alias(c):
        w = HubFake(hf_cache, Checkpoint("main"), loads)  # nothing to download: main's snapshot is there
        (hf_cache / "models--owner--moe" / "refs" / c.revision).write_text(commit)  # what from_pretrained records
        return w

    sweep_checkpoints([parse_checkpoint_name("step9")], {"toy": make_rows(3, 6)}, alias, tmp_path / "c",
                      model_name=REPO, batch_size=2, shard_tokens=8, progress=False)
    assert loads == ["main"] and (snapshot(hf_cache, "main") / "model.safetensors").exists()


def test_a_cached_branch_that_moved_on_the_hub_is_left_alone(hf_cache, tmp_path):
    """The user had ``step9`` cached; the Hub branch moved, so loading it downloads a new commit: the user's ref stays."""
    old = put_revision(hf_cache, "step9", 1000)
    new = hashlib.sha1(b"moved").hexdigest()

    def moved(c):
        put_revision(hf_cache, c.revision, 2000, commit=new)  # from_pretrained fetches the new commit, moves refs/step9
        return HubFake(hf_cache, c, [])

    sweep_checkpoints([parse_checkpoint_name("step9")], {"toy": make_rows(3, 6)}, moved, tmp_path / "c",
                      model_name=REPO, batch_size=2, shard_tokens=8, progress=False)
    root = hf_cache / "models--owner--moe"
    assert (root / "refs" / "step9").read_text() == new and cached_revision_size(REPO, "step9") == 2000 + len(SHARED)
    assert (root / "snapshots" / old / "model.safetensors").exists()


def test_a_repo_the_scan_calls_corrupted_is_still_the_users(hf_cache, tmp_path):
    """One broken link makes scan_cache_dir skip the whole repo; its revisions must still count as the user's."""
    put_revision(hf_cache, "step1", 1000)
    broken = snapshot(hf_cache, "step1") / "extra.json"
    broken.symlink_to("../../blobs/missing")

    def repair(c):  # loading fetches the missing file, as from_pretrained would
        (hf_cache / "models--owner--moe" / "blobs" / "missing").write_bytes(b"{}")
        return HubFake(hf_cache, c, [])

    sweep_checkpoints([parse_checkpoint_name("step1")], {"toy": make_rows(3, 6)}, repair, tmp_path / "c",
                      model_name=REPO, batch_size=2, shard_tokens=8, progress=False)
    assert (snapshot(hf_cache, "step1") / "model.safetensors").exists()


def test_an_in_memory_model_frees_nothing(hf_cache, tmp_path):
    """A model handed over in memory did not come from the HF cache, even where its revision turns up there meanwhile."""
    def in_memory(c):
        put_revision(hf_cache, c.revision, 1000)  # e.g. another process downloads it while the sweep runs
        return FakeWrapper()  # no ``source``: not loaded from the Hub

    ledger_dir = index_path(tmp_path / "c", REPO).parent
    sweep_checkpoints([parse_checkpoint_name("step9")], {"toy": make_rows(3, 6)}, in_memory, tmp_path / "c",
                      model_name=REPO, batch_size=2, shard_tokens=8, progress=False)
    assert snapshot(hf_cache, "step9").exists() and not (ledger_dir / LEDGER_FILE).exists()


def test_a_stopped_sweep_resumes_without_loading_finished_checkpoints(hf_cache, tmp_path, capsys):
    """Stopped while collecting checkpoint 2 of 3: checkpoint 1 is not loaded again, checkpoint 2's download is freed."""
    ckpts = [parse_checkpoint_name(n) for n in ("step1", "step2", "step3")]
    loads: list[str] = []

    def stop_at_step2(c):
        w = HubFake(hf_cache, c, loads)
        if c.name == "step2":
            w.fail_on_call = 1  # killed mid-collection, after the download
        return w

    with pytest.raises(Killed):
        sweep_checkpoints(ckpts, {"toy": make_rows(3, 6)}, stop_at_step2, tmp_path / "caches", model_name=REPO,
                          batch_size=2, shard_tokens=8, router_weights=True)
    assert loads == ["step1", "step2"] and not snapshot(hf_cache, "step1").exists()
    assert snapshot(hf_cache, "step2").exists()  # left for the resumed run, which knows it is its own
    loads.clear()
    announced: list[list[str]] = []
    sweep = run_sweep(hf_cache, tmp_path, ckpts, loads, announce=lambda cs: announced.append([c.name for c in cs]))
    assert loads == ["step2", "step3"] and announced == [["step2", "step3"]]
    assert all(c.complete for c in sweep.caches["toy"]) and len(sweep.router_weights) == 3
    assert not snapshot(hf_cache, "step2").exists() and not snapshot(hf_cache, "step3").exists()
    assert f"{REPO}@step2 from the HF cache" in capsys.readouterr().out


def test_a_checkpoint_collected_but_not_yet_freed_when_stopped_is_freed_on_resume(hf_cache, tmp_path, capsys):
    """Stopped between finishing step2 and freeing it: the resumed sweep loads nothing, and frees step2 from the ledger."""
    ckpts = [parse_checkpoint_name("step1"), parse_checkpoint_name("step2")]
    loads: list[str] = []
    run_sweep(hf_cache, tmp_path, ckpts, loads, keep_checkpoints=True)  # both collected and still cached
    ledger = index_path(tmp_path / "caches", REPO).parent / LEDGER_FILE
    ledger.write_text(json.dumps({REPO: ["step2"]}))  # what the stopped run had recorded as its own download
    loads.clear()
    run_sweep(hf_cache, tmp_path, ckpts, loads)
    assert loads == [] and snapshot(hf_cache, "step1").exists() and not snapshot(hf_cache, "step2").exists()
    assert f"of {REPO}@step2 from the HF cache" in capsys.readouterr().out and not ledger.exists()


# ---------------------------------------------------------------------------- the plan shown before a sweep
def fake_info(files):
    return SimpleNamespace(siblings=[SimpleNamespace(rfilename=n, size=s) for n, s in files.items()])


def test_revision_download_size_counts_weights_and_configs(monkeypatch):
    files = {"model-00001-of-00002.safetensors": 9 * GB, "model-00002-of-00002.safetensors": 5 * GB,
             "pytorch_model.bin": 15 * GB, "config.json": 1000, "tokenizer.json": 2000, "README.md": 50, ".gitattributes": 5}
    asked = []
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo_id, revision=None, **kw: asked.append((repo_id, revision, kw)) or fake_info(files))
    assert revision_download_size(REPO, "step1") == 14 * GB + 3000
    assert asked[0][:2] == (REPO, "step1") and asked[0][2]["files_metadata"] is True
    del files["model-00001-of-00002.safetensors"], files["model-00002-of-00002.safetensors"]
    assert revision_download_size(REPO, "step1") == 15 * GB + 3000  # no safetensors: the .bin weights


def test_offline_the_plan_says_the_size_is_unknown(hf_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert revision_download_size(REPO, "step1") is None
    text = plan_text(REPO, ["step1", "step2"], keep=False)
    assert text.startswith(f"2 checkpoints of {REPO}: download size unknown: the Hub cannot be reached")
    assert "GB to download" not in text and "deleted from the HF cache" in text


def test_the_plan_gives_totals_peak_and_the_keep_checkpoints_total(hf_cache, monkeypatch):
    revisions = [f"step{i}" for i in range(8)]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, revision=None, **kw:
                        fake_info({"model.safetensors": 14 * GB - 1000, "config.json": 1000}))
    monkeypatch.setattr(hub_disk.shutil, "disk_usage", lambda path: SimpleNamespace(free=500 * GB))
    text = plan_text("allenai/OLMoE-1B-7B-0924", revisions, keep=False)
    lines = text.splitlines()
    assert lines[0] == ("8 checkpoints of allenai/OLMoE-1B-7B-0924: about 14.0 GB to download each "
                        "(112.0 GB in all, 0 B already cached)")
    assert lines[1] == ("peak disk about 14.0 GB at a time (each is deleted after collection; "
                        "--keep-checkpoints keeps them: 112.0 GB)")
    assert lines[2].startswith("500.0 GB free on the disk of ")
    kept = plan_text("allenai/OLMoE-1B-7B-0924", revisions, keep=True)
    assert "about 112.0 GB more, all kept in the HF cache (--keep-checkpoints)" in kept
    monkeypatch.setattr(hub_disk.shutil, "disk_usage", lambda path: SimpleNamespace(free=50 * GB))
    assert "not enough" not in plan_text("allenai/OLMoE-1B-7B-0924", revisions, keep=False)
    assert "only 50.0 GB free on the disk of" in plan_text("allenai/OLMoE-1B-7B-0924", revisions, keep=True)


def test_the_plan_counts_what_is_cached_already(hf_cache, monkeypatch):
    put_revision(hf_cache, "step1", 4000)
    cached = 4000 + len(SHARED)
    text = plan_text(REPO, ["step1", "step2"], keep=False, sizes={"step1": cached, "step2": 10_000})
    assert f"({human_bytes(10_000)} in all, {human_bytes(cached)} already cached)" in text
    assert f"peak disk about {human_bytes(10_000)} at a time" in text
    assert plan_text(REPO, [], keep=False) == f"0 checkpoints of {REPO}: nothing to download"
    assert plan_text(REPO, ["step1"], keep=False, sizes={"step1": cached}) == (
        f"1 checkpoint of {REPO}: about {human_bytes(cached)} each, all in the HF cache already: nothing to download")


def test_the_main_run_shows_the_plan_for_hub_revisions_only(hf_cache, monkeypatch, tmp_path):
    from core.pipeline.targets import ModelTarget, announce_downloads
    from core.pipeline.options import parse_options

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, revision=None, **kw:
                        fake_info({"model.safetensors": 2 * GB}))
    said: list[str] = []
    opts = parse_options(["--model", REPO])
    hub = ModelTarget(name=REPO, source=REPO, revision=None, checkpoints=[], embedded=False)
    text = announce_downloads(opts, hub, [parse_checkpoint_name("step1"), parse_checkpoint_name("main")], say=said.append)
    assert said == [text] and text.startswith(f"2 checkpoints of {REPO}: about 2.0 GB to download each (4.0 GB in all")
    local = ModelTarget(name="run", source=str(tmp_path), revision=None, checkpoints=[], embedded=False)
    assert announce_downloads(opts, local, [Checkpoint("step-1", 1, path=str(tmp_path))], say=said.append) is None
    assert announce_downloads(opts, hub, [], say=said.append) is None and len(said) == 1


# ---------------------------------------------------------------------------- the option
def test_keep_checkpoints_from_the_command_line_and_yaml(tmp_path, capsys):
    from core.pipeline.options import OptionsError, build_parser, parse_options

    assert parse_options([]).model.keep_checkpoints is False
    assert parse_options(["--keep-checkpoints"]).model.keep_checkpoints is True
    cfg = tmp_path / "study.yaml"
    cfg.write_text("model: allenai/OLMoE-1B-7B-0924\nkeep_checkpoints: true\n")
    assert parse_options(["--config", str(cfg)]).model.keep_checkpoints is True
    cfg.write_text("keep-checkpoints: false\n")
    assert parse_options(["--config", str(cfg)]).model.keep_checkpoints is False
    assert parse_options(["--config", str(cfg), "--keep-checkpoints"]).model.keep_checkpoints is True
    cfg.write_text("keep_checkpoints: sometimes\n")
    with pytest.raises(OptionsError, match="keep-checkpoints must be true or false"):
        parse_options(["--config", str(cfg)])
    assert "--keep-checkpoints" in build_parser().format_help() and "Hugging Face cache" in build_parser().format_help()
