"""Hostile and careless inputs on files, names and outputs (issue 28): nothing lost, nothing silently wrong.

Each case ends in a one-line error (exit code 2, or 1 for a full or read-only disk met during the
work, with one line on stderr and no traceback) or in a correct result, and every command that
writes or deletes runs inside a canary tree (``tests/canary.py``): no file outside the folders it
owns may change, vanish or appear. Groups: names and paths, foreign files, edited outputs, faults.
The micro model is trained once and one lean micro run is shared by the module.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import core.owned_files as owned_files
import core.safe_io as safe_io
from core.array_files import ArrayFileError, load_array, load_metrics, write_metrics
from core.collection.checkpoints import parse_checkpoint_name
from core.collection.collector import ActivationCollector
from core.collection.sweep import model_slug, sweep_checkpoints
from core.commands import basic_routing_analysis, caches, train_moe
from core.owned_files import MARKER, OwnershipError, inside, remove_file
from core.paths import CONFIGS
from core.store.cache import RoutingCache
from core.store.cache_format import sealed_manifest
from tests.canary import CanaryTree
from tests.shared_runs import micro_models_copy
from tests.fakes import FakeWrapper, make_rows

LEAN = ["--micro", "--static", "none", "--no-progress", "--no-ablation", "--no-collaboration", "--no-pruning",
        "--resamples", "0", "--max-checkpoints", "2"]
TRAIN_MICRO = str(CONFIGS / "train_micro.yaml")


@dataclass
class Micro:
    models: Path  # the trained micro model's models folder (read by the tests, never written)
    results: Path  # one lean micro run "base" and its caches


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Micro:
    root = tmp_path_factory.mktemp("hostile")
    models, results = micro_models_copy(tmp_path_factory, root / "models"), root / "results"
    assert basic_routing_analysis.main(LEAN + ["--models-dir", str(models), "--results-dir", str(results),
                                               "--run-name", "base"]) == 0
    return Micro(models, results)


def one_line_error(capsys, code: int, expected: int, says: str) -> str:
    """The command exited with ``expected`` and wrote one error line (containing ``says``) and no traceback.

    Progress bars of the model's weight loading (carriage-return lines of transformers) are not
    the command's own output and are left out.
    """
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "\r" not in line and "it/s]" not in line]
    assert code == expected, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert says in lines[0], lines[0]
    return lines[0]


def copy_results(micro: Micro, root: Path) -> Path:
    """The shared run's results folder (run "base" and its caches) copied under ``root``."""
    shutil.copytree(micro.results, root / "results")
    return root / "results"


def cache_folders(results: Path) -> list[Path]:
    return sorted(p.parent for p in (results / "cache").rglob("manifest.json"))


# ================================================================== names and paths
@pytest.mark.parametrize("name, says", [
    ("..", "'.' and '..' name no folder"),
    ("../escape", "path separator"),
    (".hidden", "starts with a dot"),
    ("a" * 5000, "5000 characters long"),
    ("two\nlines", "control character"),
])
def test_train_run_names_that_are_not_one_folder_are_refused_before_training(tmp_path, capsys, name, says):
    """``train_moe --run-name .. --overwrite`` trained, then removed ``models/..`` (the repository root)."""
    canary = CanaryTree(tmp_path)
    code = train_moe.main(["--config", TRAIN_MICRO, "--run-name", name, "--overwrite", "--models-dir",
                           str(tmp_path / "models"), "--no-progress"])
    one_line_error(capsys, code, 2, says)
    canary.check()


@pytest.mark.parametrize("flags, says", [
    (["--run-name", ".."], "run-name '..' cannot name a folder"),
    (["--run-name", "a/b"], "path separator"),
    (["--run-name", "x" * 5000], "5000 characters long"),
    (["--model", "m" * 5000], "model"),
    (["--model", "org/" + "m" * 300], "more than 255"),
    (["--revision", "../../escape"], "revision"),
    (["--checkpoints", "step-000000,../x"], "revision"),
    (["--datasets", "../wikitext2"], "dataset"),
])
def test_names_that_become_paths_are_checked_before_any_work(tmp_path, capsys, flags, says):
    """``M --run-name ..`` wrote its report into the repository root and 38 files into the data/ package."""
    canary = CanaryTree(tmp_path)
    models = tmp_path / "fresh-models"
    code = basic_routing_analysis.main(LEAN + ["--results-dir", str(tmp_path / "results"), "--models-dir", str(models)]
                                       + flags)
    one_line_error(capsys, code, 2, says)
    assert not models.exists()  # before the embedded model is trained: before any work
    canary.check()


def test_a_model_name_becomes_one_bounded_folder_name():
    """The cache and run folders are named from the model: never ``..``, never a path, never too long."""
    for name in ("..", ".", "../../x", ".hidden/model"):
        slug = model_slug(name)
        assert "/" not in slug and not slug.startswith(".") and slug not in ("", ".", "..")
    long = model_slug("org/" + "m" * 5000)
    assert len(long) <= 120 and long != model_slug("org/" + "m" * 4999)  # cut, with a digest of the whole name
    assert model_slug("allenai/OLMoE-1B-7B-0924") == "allenai__OLMoE-1B-7B-0924"  # short names as before


def test_paths_out_of_the_owned_folder_are_refused_links_included(tmp_path):
    canary = CanaryTree(tmp_path, owned=["owned"])
    owned = tmp_path / "owned"
    owned.mkdir()
    (owned / "link").symlink_to(tmp_path / "victim.txt")
    for path in (owned / ".." / "victim.txt", owned / "link", tmp_path / "victim.txt"):
        with pytest.raises(OwnershipError) as e:
            inside(owned, path)
        assert "\n" not in str(e.value)
    for name in ("../victim.txt", "link", str(tmp_path / "victim.txt")):
        with pytest.raises(OwnershipError):
            remove_file(owned, name)
    (owned / "link").unlink()  # (the test's own link)
    canary.check()


# ================================================================== foreign files
def _built(folder: Path, files: dict[str, str]) -> Path:
    """A folder the toolkit builds (scratch), holding ``files``."""
    from core.owned_files import start_scratch

    start_scratch(folder)
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def test_a_built_folder_replaces_only_an_old_one_all_of_whose_files_it_wrote(tmp_path):
    from core.owned_files import foreign_files, replace_folder

    canary = CanaryTree(tmp_path, owned=["models/run", "models/.new"])
    dest = tmp_path / "models" / "run"
    replace_folder(_built(tmp_path / "models" / ".new", {"a.txt": "old", "sub/b.txt": "old"}), dest)
    assert foreign_files(dest) == []
    replace_folder(_built(tmp_path / "models" / ".new", {"a.txt": "new"}), dest)  # all of the old one was the toolkit's
    assert (dest / "a.txt").read_text() == "new" and not (dest / "sub").exists()
    (dest / "notes.txt").write_text("the user's")
    (dest / "empty-folder").mkdir()
    with pytest.raises(OwnershipError, match="did not write \\('notes.txt', 'empty-folder/'\\)") as e:
        replace_folder(_built(tmp_path / "models" / ".new", {"a.txt": "newer"}), dest)
    assert "\n" not in str(e.value) and (dest / "a.txt").read_text() == "new" and (dest / "notes.txt").exists()
    canary.check()


def test_a_folder_without_the_toolkits_record_or_with_an_edited_one_is_never_removed(tmp_path):
    from core.owned_files import _digest as marker_digest
    from core.owned_files import replace_folder, seal

    theirs = tmp_path / "models" / "theirs"  # a folder of the user's, with no marker
    theirs.mkdir(parents=True)
    (theirs / "config.json").write_text("{}")
    edited = []
    for name, recompute in (("by-hand", False), ("hostile", True)):
        folder = seal(_built(tmp_path / "models" / name, {"a.txt": "x"}))
        marker = json.loads((folder / MARKER).read_text())
        marker.pop("sha256")
        marker["files"].append("../../victim.txt")  # by hand the checksum no longer matches; recomputed, the entry leaves
        (folder / MARKER).write_text(json.dumps({**marker, "sha256": marker_digest(marker) if recompute else "0" * 64}))
        edited.append(folder)
    canary = CanaryTree(tmp_path, owned=["models/.new"])
    with pytest.raises(OwnershipError, match="has no record"):
        replace_folder(_built(tmp_path / "models" / ".new", {"a.txt": "x"}), theirs)
    for folder in edited:
        with pytest.raises(OwnershipError, match="damaged or edited"):
            replace_folder(_built(tmp_path / "models" / ".new", {"a.txt": "y"}), folder)
        assert (folder / "a.txt").read_text() == "x"
    canary.check()


def _copy_model(micro: Micro, models: Path) -> Path:
    run_dir = models / "study-moe-micro"
    shutil.copytree(micro.models / "study-moe-micro", run_dir)
    return run_dir


def test_overwrite_refuses_a_run_folder_holding_a_users_file_before_training(micro, tmp_path, capsys):
    run_dir = _copy_model(micro, tmp_path / "models")
    (run_dir / "notes.txt").write_text("a user's notes about this model")
    canary = CanaryTree(tmp_path)
    code = train_moe.main(["--config", TRAIN_MICRO, "--overwrite", "--models-dir", str(tmp_path / "models"), "--no-progress"])
    one_line_error(capsys, code, 2, "holds files this toolkit did not write ('notes.txt')")
    assert not (tmp_path / "models" / ".study-moe-micro.tmp").exists()  # refused before training started
    canary.check()


@pytest.mark.parametrize("older_code", [False, True])
def test_an_embedded_model_without_its_record_is_not_retrained_over_a_users_files(micro, tmp_path, capsys, older_code):
    """A model folder lacking training_data.json was retrained through rmtree, deleting what the user had put there."""
    run_dir = _copy_model(micro, tmp_path / "models")
    (run_dir / "training_data.json").unlink()
    (run_dir / "notes.txt").write_text("a user's notes")
    if older_code:  # a folder written before the toolkit kept a record of its files
        (run_dir / MARKER).unlink()
    canary = CanaryTree(tmp_path)
    code = basic_routing_analysis.main(LEAN + ["--models-dir", str(tmp_path / "models"), "--results-dir",
                                               str(tmp_path / "results")])
    says = "has no record (.moe-router-study.json)" if older_code else "holds files this toolkit did not write ('notes.txt')"
    line = one_line_error(capsys, code, 2, says)
    assert "lacks training_data.json" in line
    canary.check()


def _stale_cache(root: Path) -> tuple[Path, Path]:
    """Two sweeps of one model with other settings: the first one's cache is stale (prune removes it)."""
    ckpt, data = parse_checkpoint_name("step5-tokens1B"), {"toy": make_rows(5, 6)}
    kw = dict(model_name="m", shard_tokens=8, progress=False)
    old = sweep_checkpoints([ckpt], data, lambda c: FakeWrapper(), root, batch_size=2, **kw).final("toy").dir
    new = sweep_checkpoints([ckpt], data, lambda c: FakeWrapper(), root, batch_size=3, **kw).final("toy").dir
    return old, new


def _edit_manifest(folder: Path, edit, *, reseal: bool) -> None:
    """Edit a cache's manifest by hand (its checksum left as it was), or as a hostile editor would (checksum recomputed)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if reseal:
        manifest = sealed_manifest({k: v for k, v in manifest.items() if k != "sha256"})
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("reseal, says", [(False, "fails its checksum"), (True, "which is not a file of its folder")])
def test_prune_never_follows_a_manifest_out_of_the_cache_folder(tmp_path, capsys, reseal, says):
    """A manifest's shard path ``../../../../victim.txt`` was followed and deleted; manifests had no checksum."""
    cache_root = tmp_path / "results" / "cache"
    old, new = _stale_cache(cache_root)
    escape = os.path.relpath(tmp_path / "victim.txt", old)

    def edit(m):
        m["shards"][0]["file"] = escape
    canary = CanaryTree(tmp_path, owned=["results/cache"])
    _edit_manifest(old, edit, reseal=reseal)
    before = sorted(p.name for p in old.iterdir())
    code = caches.main(["prune", "--cache-dir", str(cache_root)])
    one_line_error(capsys, code, 2, says)
    assert sorted(p.name for p in old.iterdir()) == before and (new / "manifest.json").exists()  # nothing removed
    canary.check()


def test_prune_refuses_a_shard_that_links_out_of_the_cache_folder(tmp_path, capsys):
    cache_root = tmp_path / "results" / "cache"
    old, _ = _stale_cache(cache_root)
    canary = CanaryTree(tmp_path, owned=["results/cache"])
    shard = old / json.loads((old / "manifest.json").read_text())["shards"][0]["file"]
    shard.unlink()
    shard.symlink_to(tmp_path / "victim.txt")
    code = caches.main(["prune", "--cache-dir", str(cache_root)])
    one_line_error(capsys, code, 2, "outside")
    assert shard.is_symlink()
    canary.check()


def test_prune_with_a_hostile_index_entry_is_one_line(tmp_path, capsys):
    from core.collection.sweep import _index_digest

    cache_root = tmp_path / "results" / "cache"
    _stale_cache(cache_root)
    canary = CanaryTree(tmp_path, owned=["results/cache"])
    idx = cache_root / "m" / "index.json"
    index = json.loads(idx.read_text())
    index.pop("sha256")
    index["entries"][0]["path"] = "../../.."
    idx.write_text(json.dumps({**index, "sha256": _index_digest(index)}))
    code = caches.main(["prune", "--cache-dir", str(cache_root)])
    one_line_error(capsys, code, 2, "outside")
    index["entries"][0] = "not an entry"
    idx.write_text(json.dumps({**index, "sha256": _index_digest(index)}))
    code = caches.main(["list", "--cache-dir", str(cache_root)])
    one_line_error(capsys, code, 2, "malformed entry")
    canary.check()


def test_prune_removes_only_what_the_stale_cache_wrote(tmp_path, capsys):
    cache_root = tmp_path / "results" / "cache"
    old, new = _stale_cache(cache_root)
    canary = CanaryTree(tmp_path, owned=["results/cache"])
    (old / "shard-00099.safetensors").write_bytes(b"the user's, named like a shard")
    (old / "my-notes.txt").write_text("the user's")
    assert caches.main(["prune", "--cache-dir", str(cache_root)]) == 0
    assert sorted(p.name for p in old.iterdir()) == ["my-notes.txt", "shard-00099.safetensors"]
    assert RoutingCache.open(new).num_tokens > 0
    canary.check()


def test_recollect_keeps_a_users_file_named_like_a_shard(tmp_path):
    """``--recollect`` deleted a user's ``shard-00099.safetensors`` (the writer cleaned by name pattern)."""
    folder = tmp_path / "results" / "cache" / "c"
    ActivationCollector(FakeWrapper(), progress=False).collect(make_rows(), folder, batch_size=3, shard_tokens=10)
    canary = CanaryTree(tmp_path, owned=["results/cache/c"])
    for name in ("shard-00099.safetensors", ".shard-00099.safetensors.tmp", "shard-00001.safetensors.tmp"):
        (folder / name).write_bytes(b"the user's")
    cache = ActivationCollector(FakeWrapper(), progress=False).collect(make_rows(), folder, batch_size=3, shard_tokens=10,
                                                                      force=True)
    cache.verify()
    assert all((folder / n).read_bytes() == b"the user's"
               for n in ("shard-00099.safetensors", ".shard-00099.safetensors.tmp", "shard-00001.safetensors.tmp"))
    canary.check()


# ================================================================== edited outputs
@pytest.fixture
def run_copy(micro, tmp_path) -> Path:
    """The shared run's folder, copied: its metrics.json and arrays.safetensors, to be edited."""
    shutil.copytree(micro.results / "base", tmp_path / "run")
    return tmp_path / "run"


def test_the_run_outputs_load_as_written(run_copy):
    metrics = load_metrics(run_copy)
    again = load_metrics(run_copy / "metrics.json")
    keys = [k for k in metrics if isinstance(metrics[k], dict)]
    assert keys and metrics["options"] == again["options"]
    corr = load_array(run_copy, "correlation_topk/corr")
    np.testing.assert_array_equal(corr, again["correlation_topk"]["corr"])


def test_a_byte_flipped_in_the_array_data_fails_on_load(run_copy):
    """A byte flipped in arrays.safetensors came back as a changed value (1.0623 for 1.0): the data was not re-hashed."""
    path = run_copy / "arrays.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last array's data; the header and the digest stay as they were
    path.write_bytes(bytes(data))
    with pytest.raises(ArrayFileError, match="fails its checksum") as e:
        load_metrics(run_copy)
    assert "\n" not in str(e.value)


def test_an_edited_value_in_metrics_json_fails_on_load(run_copy):
    path = run_copy / "metrics.json"
    shutil.copy(path, run_copy.parent / "original.json")
    metrics = json.loads(path.read_text())
    metrics["headline"] = {**metrics["headline"], "edited": 1.0}
    path.write_text(json.dumps(metrics, indent=1))
    with pytest.raises(ArrayFileError, match="metrics.json fails its checksum") as e:
        load_metrics(run_copy)
    assert "\n" not in str(e.value)
    shutil.copy(run_copy.parent / "original.json", path)
    tokens = metrics["headline"]["tokens"]
    text = path.read_text()
    assert f'"tokens": {tokens},' in text
    path.write_text(text.replace(f'"tokens": {tokens},', f'"tokens": {tokens + 1},', 1))  # one number, as an editor would
    with pytest.raises(ArrayFileError, match="fails its checksum"):
        load_metrics(run_copy)


def test_an_edit_that_also_removes_the_checksum_fails_on_load(run_copy):
    """An edit by hand that deletes the JSON's own checksum is not taken for an older file: it is refused too."""
    from core.array_files import INDEX_KEY, JSON_DIGEST

    path = run_copy / "metrics.json"
    metrics = json.loads(path.read_text())
    del metrics[INDEX_KEY][JSON_DIGEST]
    metrics["headline"] = {**metrics["headline"], "edited": 1.0}
    path.write_text(json.dumps(metrics, indent=1))
    with pytest.raises(ArrayFileError, match="has no checksum of its own") as e:
        load_metrics(run_copy)
    assert "\n" not in str(e.value)


def test_a_truncated_metrics_json_is_one_line(run_copy):
    path = run_copy / "metrics.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArrayFileError, match="is not valid JSON") as e:
        load_metrics(run_copy)
    assert "\n" not in str(e.value)
    path.write_bytes(b"\xff\xfe not text")
    with pytest.raises(ArrayFileError, match="not text"):
        load_metrics(run_copy)


# ================================================================== faults
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_umasks_permissions(tmp_path, umask):
    """Atomic writes gave every file 0600 (mkstemp's), so a shared results folder was unreadable to collaborators."""
    old = os.umask(umask)
    try:
        canary = CanaryTree(tmp_path, owned=["out"])
        out = tmp_path / "out"
        safe_io.atomic_write_text(out / "a.txt", "text")
        safe_io.atomic_write_json(out / "b.json", {"a": 1})
        write_metrics(out / "run", {"m": {"x": np.ones((4, 4))}})
        ActivationCollector(FakeWrapper(), progress=False).collect(make_rows(), out / "cache", batch_size=3, shard_tokens=10)
        files = [p for p in out.rglob("*") if p.is_file()]
        assert len(files) >= 6
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}
        canary.check()
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_sealed_folder_gives_files_libraries_wrote_the_umasks_permissions(tmp_path, umask):
    """transformers' save_pretrained writes 0600 weights; sealing a built model folder gives them the umask's."""
    old = os.umask(umask)
    try:
        folder = owned_files.start_scratch(tmp_path / "model")
        (folder / "model.safetensors").write_bytes(b"w")
        os.chmod(folder / "model.safetensors", 0o600)  # as save_pretrained leaves it
        owned_files.seal(folder)
        assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~umask)
    finally:
        os.umask(old)


def _fail_writes(monkeypatch, which, err: int = errno.ENOSPC, after: int = 0) -> dict:
    """Make the disk full (or read-only) for writes whose target ``which(path)`` picks, from the ``after``-th on."""
    real, seen = safe_io._write_all, {"n": 0}

    def write(fh, data, path):
        if which(path):
            seen["n"] += 1
            if seen["n"] > after:
                fh.write(data[: len(data) // 2])  # part of it reaches the temporary file first
                raise OSError(err, os.strerror(err))
        real(fh, data, path)

    monkeypatch.setattr(safe_io, "_write_all", write)
    return seen


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.tmp")]


def test_a_full_disk_during_collection_is_one_line_and_the_caches_resume(micro, tmp_path, capsys, monkeypatch):
    canary = CanaryTree(tmp_path, owned=["results/cache", "results/full"])
    args = LEAN + ["--models-dir", str(micro.models), "--results-dir", str(tmp_path / "results"), "--run-name", "full"]
    _fail_writes(monkeypatch, lambda p: p.name.startswith("shard-"), after=3)
    code = basic_routing_analysis.main(args)
    one_line_error(capsys, code, 1, "No space left on device [Errno 28]")
    assert not _temp_files(tmp_path / "results")  # the half-written shard's temporary file is gone
    folders = cache_folders(tmp_path / "results")
    assert folders
    for folder in folders:  # every cache is valid: complete, or incomplete and resumable
        RoutingCache.open(folder, allow_incomplete=True).verify()
    canary.check()
    monkeypatch.undo()
    assert basic_routing_analysis.main(args) == 0  # the same command resumes
    assert all(RoutingCache.open(f).complete for f in cache_folders(tmp_path / "results"))
    canary.check()


@pytest.mark.parametrize("err, says", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system")])
def test_a_full_or_read_only_disk_while_writing_the_report_is_one_line(micro, tmp_path, capsys, monkeypatch, err, says):
    results = copy_results(micro, tmp_path)
    canary = CanaryTree(tmp_path, owned=["results/base"])
    _fail_writes(monkeypatch, lambda p: p.name == "report.html", err=err)
    code = basic_routing_analysis.main(LEAN + ["--models-dir", str(micro.models), "--results-dir", str(results),
                                               "--run-name", "base"])
    one_line_error(capsys, code, 1, says)
    assert not _temp_files(results)
    load_metrics(results / "base")  # written before the report, and whole
    canary.check()


def test_a_read_only_run_folder_is_found_before_the_analyses(micro, tmp_path, capsys, monkeypatch):
    """Errno 30 came after every analysis had run. (Tests run as root, which writes anywhere: the folder is made
    read-only where the toolkit opens its files.)"""
    import core.pipeline.suite as suite

    results = copy_results(micro, tmp_path)
    run_dir = results / "base"
    real_open = safe_io._open_temp

    def read_only(path, temp):
        if run_dir in Path(path).parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, temp)

    def no_analyses(*a, **k):
        raise AssertionError("the analyses ran before the read-only folder was found")

    monkeypatch.setattr(safe_io, "_open_temp", read_only)
    monkeypatch.setattr(suite, "run_analyses", no_analyses)
    canary = CanaryTree(tmp_path)
    code = basic_routing_analysis.main(LEAN + ["--models-dir", str(micro.models), "--results-dir", str(results),
                                               "--run-name", "base"])
    one_line_error(capsys, code, 2, f"cannot write to {run_dir} (Read-only file system)")
    canary.check()


def test_a_corrupt_shard_names_the_flag_and_recollect_keeps_a_users_file(micro, tmp_path, capsys):
    """The corrupt-shard error told a command-line user to pass ``force=True``; the flag is ``--recollect``."""
    results = copy_results(micro, tmp_path)
    folder = cache_folders(results)[0]
    shard = folder / json.loads((folder / "manifest.json").read_text())["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    (folder / "shard-00099.safetensors").write_bytes(b"the user's, named like a shard")
    model_caches = folder.relative_to(tmp_path).parents[1]  # results/cache/<model>: what the run writes, and its run folder
    # and the stored results of the analyses (results/cache/analysis_results), written once the recollected caches are read
    canary = CanaryTree(tmp_path, owned=["results/base", str(model_caches), "results/cache/analysis_results"])
    args = LEAN + ["--models-dir", str(micro.models), "--results-dir", str(results), "--run-name", "base"]
    code = basic_routing_analysis.main(args)
    line = one_line_error(capsys, code, 2, "fails its checksum")
    assert "--recollect" in line
    assert basic_routing_analysis.main(args + ["--recollect"]) == 0
    assert (folder / "shard-00099.safetensors").read_bytes() == b"the user's, named like a shard"
    for f in cache_folders(results):
        RoutingCache.open(f).verify()
    canary.check()


def test_caches_that_cannot_fit_the_disk_are_refused_before_any_model_loads(micro, tmp_path, capsys, monkeypatch):
    """A full disk found mid-collection costs the work done so far; the caches' size is known before: say so first."""
    import shutil as sh
    from collections import namedtuple

    import core.collection.sweep as sweep
    import core.store.cache_format as cache_format

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(cache_format.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    loaded = []
    monkeypatch.setattr(sweep, "_collect_plans", lambda *a, **k: loaded.append(1))
    sh.copytree(micro.models, tmp_path / "models")
    canary = CanaryTree(tmp_path, owned=["results"])
    code = basic_routing_analysis.main(LEAN + ["--models-dir", str(tmp_path / "models"),
                                               "--results-dir", str(tmp_path / "results")])
    line = one_line_error(capsys, code, 2, "the routing caches still to collect need about")
    assert "GB free" in line and not loaded
    canary.check()


def test_the_cache_size_estimate_bounds_what_a_shard_holds(tmp_path):
    from core.store.cache_format import bytes_per_token

    fake = FakeWrapper()
    rows = make_rows()
    ActivationCollector(fake, progress=False).collect(rows, tmp_path / "cache", batch_size=3, shard_tokens=10_000)
    shards = sum(p.stat().st_size for p in (tmp_path / "cache").glob("shard-*.safetensors"))
    settings = {"storage": "full", "dtype": "float16", "hidden_layers": []}
    est = bytes_per_token(settings, len(fake.moe_layers), fake.num_experts, fake.top_k) * int(rows.attention_mask.sum())
    assert shards <= est * 1.1 + 4096 and est <= 3 * shards, (shards, est)  # a bound, not a wild guess (4 KB: headers)
