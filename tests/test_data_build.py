"""The maintainer's bundle builder writes byte-exact, decompressible copies."""

import lzma
import sys
import sysconfig
from pathlib import Path

import pytest

from data.build_corpora import CORPORA_DIR, TEXT_FILES, build


@pytest.fixture
def fake_source(tmp_path):
    src = tmp_path / "src"
    for rel, _ in TEXT_FILES:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"contents of {rel}\n", encoding="utf-8")
    (src / "gsm8k" / "LICENSE").write_text("MIT\n")
    return src


def test_build_round_trips(tmp_path, fake_source):
    out = tmp_path / "out"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sizes = build(fake_source, stdlib, out)
    for rel, dst in TEXT_FILES:
        assert lzma.decompress((out / dst).read_bytes()).decode() == f"contents of {rel}\n"
        assert sizes[dst] == (out / dst).stat().st_size
    assert (out / "gsm8k" / "LICENSE").read_text() == "MIT\n"
    assert (out / "python_source" / "LICENSE.txt").is_file()
    if sys.version_info[:3] == (3, 11, 7):  # the interpreter the bundle was built from
        bundled = CORPORA_DIR / "python_source" / "stdlib.jsonl.xz"
        assert (out / "python_source" / "stdlib.jsonl.xz").read_bytes() == bundled.read_bytes()


def test_build_names_a_missing_file(tmp_path, fake_source):
    (fake_source / "alice" / "alice.txt").unlink()
    with pytest.raises(FileNotFoundError, match="alice.txt"):
        build(fake_source, Path(sysconfig.get_paths()["stdlib"]), tmp_path / "out")
