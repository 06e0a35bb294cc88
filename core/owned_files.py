"""What the toolkit may delete or replace: only files it wrote, known by its own record, inside the folder it owns.

Deleting by a name pattern (``shard-*.safetensors``), by a path read from an editable file (a
manifest listing ``../../victim.txt``) or a whole folder found under a name (``models/..``) once
removed a user's files. So every removal in the toolkit goes through this module, by one rule:

* a file is removed only when the caller's own record names it (a checksummed manifest entry, or
  the list in a folder's marker), and only after :func:`inside` has resolved it (symlinks too)
  and found it inside the folder the caller owns; anything else is refused in one line;
* a folder the toolkit builds carries a marker, :data:`MARKER`. While it is built (``scratch``,
  :func:`start_scratch`) everything in it is the toolkit's; once complete, :func:`seal` lists its
  files in the marker with a checksum, and :func:`remove_sealed` removes those files and nothing
  else. :func:`replace_folder` puts a built folder in place of an old one only when the old one
  holds nothing the toolkit did not write, and :func:`check_replaceable` says so before any work;
* a single output file at a path the user names (``--out FILE``) carries the toolkit's mark
  (:class:`FileMark`: a first line, or a JSON ``written_by`` key), and :func:`check_output_file`
  refuses, before any work, to overwrite an existing file without it.

The one removal outside this module is ``core.safe_io`` deleting the temporary file it created
itself a moment before (a write that failed, a probe of a folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.safe_io import atomic_write_json, current_umask

MARKER = ".moe-router-study.json"
SCRATCH, SEALED = "scratch", "sealed"


class OwnershipError(RuntimeError):
    """A path lies outside the folder the toolkit owns, or holds what the toolkit did not write; one line."""


def _few(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` resolved (symlinks followed), refused in one line unless it lies in ``root`` (resolved too)."""
    base, target = Path(root).resolve(), Path(path).resolve()
    if target != base and base not in target.parents:
        raise OwnershipError(f"{path} resolves to {target}, outside {base}, the folder this command writes; refused")
    return target


def _relative(name: str | os.PathLike) -> str:
    """A record's entry: a path relative to its folder, without ``..`` or a leading ``/``."""
    text = str(name)
    parts = Path(text).parts
    if not text or Path(text).is_absolute() or any(p in ("..", ".") for p in text.replace("\\", "/").split("/")) or not parts:
        raise OwnershipError(f"a record names {text!r}, which is not a file inside its folder; refused")
    return text


def remove_file(folder: str | os.PathLike, name: str | os.PathLike) -> bool:
    """Remove ``folder/name``, a file the caller's own record names; False if it is not there.

    ``name`` is relative to ``folder``; one that leaves the folder (``..``, an absolute path, a
    symlink pointing out) or names a folder is refused in one line, and nothing is removed.
    """
    path = Path(folder) / _relative(name)
    if not path.exists() and not path.is_symlink():
        return False
    inside(folder, path)
    if path.is_dir() and not path.is_symlink():
        raise OwnershipError(f"{path} is a folder, not the file its record names; refused")
    path.unlink(missing_ok=True)  # (another process may have removed it a moment before)
    return True


def remove_empty_folder(root: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Remove ``folder`` inside ``root`` if nothing is left in it (a cache folder whose files were removed)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir() or any(folder.iterdir()):
        return False
    inside(root, folder)
    folder.rmdir()
    return True


# ---------------------------------------------------------------------------- folders with a marker
def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The folder's marker (``kind`` and, once sealed, ``files``), None without one; a damaged one is one line."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
        stored = body.pop("sha256")
        ok = stored == _digest(body) and body.get("kind") in (SCRATCH, SEALED)
        files = body.get("files", [])
        ok = ok and isinstance(files, list) and all(isinstance(f, str) for f in files)
        for f in files if ok else ():
            _relative(f)  # every entry a file inside the folder, checked before anything is removed
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OwnershipError):
        ok = False
    if not ok:
        raise OwnershipError(f"{path} is damaged or edited (it fails its checksum): the toolkit cannot tell which files "
                             f"of {folder} it wrote; move the folder away")
    return body


def _write_marker(folder: Path, body: dict) -> None:
    atomic_write_json(folder / MARKER, {**body, "sha256": _digest(body)})


def start_scratch(folder: str | os.PathLike) -> Path:
    """A new folder the toolkit builds in, marked as all its own; an earlier scratch folder of that name is cleared.

    A folder of that name without a scratch marker is the user's, and is refused in one line.
    """
    folder = Path(folder)
    if folder.exists() or folder.is_symlink():
        remove_scratch(folder)
    folder.mkdir(parents=True)
    _write_marker(folder, {"kind": SCRATCH})
    return folder


def remove_scratch(folder: str | os.PathLike) -> None:
    """Remove a folder the toolkit was building (its marker says scratch), all of it; refuse any other folder."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    marker = None if folder.is_symlink() else read_marker(folder)
    if marker is None or marker["kind"] != SCRATCH:
        raise OwnershipError(f"{folder} is in the way and is not a folder this toolkit was building (no scratch marker "
                             f"{MARKER}); move it away")
    shutil.rmtree(folder)


def _files(folder: Path) -> list[str]:
    """Every file and link below ``folder`` (its marker aside), relative, in sorted order."""
    out = []
    for dirpath, dirs, files in os.walk(folder):
        here = Path(dirpath)
        for name in files + [d for d in dirs if (here / d).is_symlink()]:
            rel = (here / name).relative_to(folder).as_posix()
            if rel != MARKER:
                out.append(rel)
    return sorted(out)


def _folders(folder: Path) -> list[str]:
    """Every folder below ``folder`` (links aside), relative, each ending in ``/``."""
    return sorted((Path(d) / name).relative_to(folder).as_posix() + "/" for d, dirs, _ in os.walk(folder)
                  for name in dirs if not (Path(d) / name).is_symlink())


def _parents(files: list[str]) -> set[str]:
    return {p.as_posix() + "/" for f in files for p in Path(f).parents if p != Path(".")}


def seal(folder: str | os.PathLike) -> Path:
    """Record every file now in a finished scratch folder as the toolkit's: only these are ever removed.

    Its files get the umask's permissions here: libraries that wrote some of them (transformers'
    ``save_pretrained`` makes 0600 safetensors) would otherwise leave a model collaborators cannot read.
    """
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None or marker["kind"] != SCRATCH:
        raise OwnershipError(f"{folder} is not a folder this toolkit built (no scratch marker); it cannot be sealed")
    files = _files(folder)
    mode = 0o666 & ~current_umask()
    for rel in files:
        if not (folder / rel).is_symlink():
            os.chmod(folder / rel, mode)
    _write_marker(folder, {"kind": SEALED, "files": files})
    return folder


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """What in ``folder`` the toolkit did not write, by its marker (folders end in ``/``); everything without a marker."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is not None and marker["kind"] == SCRATCH:
        return []
    listed = set(marker["files"]) if marker else set()
    return [f for f in _files(folder) if f not in listed] + [d for d in _folders(folder) if d not in _parents(list(listed))]


def check_replaceable(folder: str | os.PathLike, hint: str = "choose another name") -> None:
    """Refuse in one line, before any work, to replace a folder that holds what the toolkit did not write."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise OwnershipError(f"{folder} is in the way and is not a folder this toolkit wrote; move it away or {hint}")
    marker = read_marker(folder)
    if marker is None:
        raise OwnershipError(f"{folder} exists but has no record ({MARKER}) of the files this toolkit wrote there, so "
                             f"none of it is the toolkit's to remove; move it away or {hint}")
    foreign = foreign_files(folder)
    if foreign:
        raise OwnershipError(f"{folder} holds files this toolkit did not write ({_few(foreign)}); move them out or {hint}")


def remove_sealed(folder: str | os.PathLike) -> list[str]:
    """Remove the files a sealed folder's marker lists, then its emptied folders; returns what is left (not the toolkit's)."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None or marker["kind"] != SEALED:
        raise OwnershipError(f"{folder} has no record ({MARKER}) of the files this toolkit wrote; nothing removed")
    for rel in marker["files"]:
        remove_file(folder, rel)
    for rel in sorted(_parents(marker["files"]), key=lambda p: -p.count("/")):
        d = folder / rel
        if d.is_dir() and not d.is_symlink() and not any(d.iterdir()):
            d.rmdir()
    left = _files(folder) + _folders(folder)
    if not left:
        remove_file(folder, MARKER)
        if not any(folder.iterdir()):
            folder.rmdir()
    return left


def replace_folder(built: str | os.PathLike, dest: str | os.PathLike, hint: str = "choose another name") -> Path:
    """Seal ``built`` (a scratch folder) and put it at ``dest``, removing an old ``dest`` only if all of it is the toolkit's."""
    built, dest = Path(built), Path(dest)
    check_replaceable(dest, hint)
    seal(built)
    if dest.exists():
        left = remove_sealed(dest)
        if left:  # written there while this command ran
            raise OwnershipError(f"{dest} holds files this toolkit did not write ({_few(left)}); the new one is kept "
                                 f"at {built}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(built, dest)
    return dest



@contextlib.contextmanager
def built_in_scratch(dest: str | os.PathLike, hint: str = "choose another name",
                     scratch: str | os.PathLike | None = None) -> Iterator[Path]:
    """``with built_in_scratch(dest) as work:`` build into ``work``; once the block ends, ``work`` replaces ``dest``.

    ``work`` is a scratch folder beside ``dest`` (``.NAME.tmp``, or ``scratch``). When the block
    or the replacement fails, it is removed, unless it was sealed already: then it is complete,
    and it stays where the error (``replace_folder``'s) says it is kept.
    """
    work = start_scratch(scratch if scratch is not None else Path(dest).with_name(f".{Path(dest).name}.tmp"))
    try:
        yield work
        replace_folder(work, dest, hint)
    except BaseException:
        with contextlib.suppress(OwnershipError):
            remove_scratch(work)
        raise

# ---------------------------------------------------------------------------- single files with a mark
WRITTEN_BY = "moe-router-study"
MARK_READ_BYTES = 1 << 20  # a marked JSON is read whole up to this size; a bigger one is not the toolkit's


@dataclass(frozen=True)
class FileMark:
    """How a file the toolkit wrote is known: its first line starts with ``first_line``; None: a JSON object whose
    ``written_by`` is :data:`WRITTEN_BY` (JSON has no comment line)."""

    first_line: str | None = None

    def found_in(self, path: Path) -> bool:
        """Whether the file at ``path`` carries this mark (an unreadable or undecodable file does not)."""
        try:
            with open(path, "rb") as f:
                head = f.read(MARK_READ_BYTES if self.first_line is None else len(self.first_line.encode()) + 1)
        except OSError:
            return False
        if self.first_line is not None:
            return head.startswith(self.first_line.encode())
        try:
            body = json.loads(head)
        except (ValueError, UnicodeDecodeError):
            return False
        return isinstance(body, dict) and body.get("written_by") == WRITTEN_BY


JSON_MARK = FileMark()
COMMENT_MARK = FileMark(f"<!-- written by {WRITTEN_BY} -->")  # HTML and Markdown: invisible where they are shown


def marked_json(body: dict) -> dict:
    """``body`` with :data:`JSON_MARK` as its first key."""
    return {"written_by": WRITTEN_BY, **body}


def marked_text(text: str) -> str:
    """An HTML page or Markdown text with :data:`COMMENT_MARK` as its first line."""
    return f"{COMMENT_MARK.first_line}\n{text}"


def check_output_file(path: str | os.PathLike, mark: FileMark, hint: str = "choose another path") -> Path:
    """Refuse in one line, before any work, an output path holding a file the toolkit did not write (no ``mark``).

    A missing file, or one with the mark (the toolkit's earlier output), may be overwritten; a
    folder or a link in its place is refused too.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return path
    if path.is_symlink() or not path.is_file():
        raise OwnershipError(f"{path} is in the way and is not a file this toolkit wrote; move it away or {hint}")
    if not mark.found_in(path):
        what = "a written_by key" if mark.first_line is None else f"the first line {mark.first_line!r}"
        raise OwnershipError(f"{path} exists and was not written by this toolkit (it lacks {what}), so it is not the "
                             f"toolkit's to overwrite; move it away or {hint}")
    return path
