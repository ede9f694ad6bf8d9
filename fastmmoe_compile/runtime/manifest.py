"""The engine directory's manifest, and writing the directory atomically."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from ..errors import UserInputError

FORMAT = "fastmmoe-engine"
# 2: manifest["programs"] names each role's file (1 had fixed names); 3: the weights stored once
# (manifest["weights"], runtime/backends.py), which an older reader would load without weights;
# 4: the token-embedding table stored once too, in the weights file (manifest["embeddings"]["tensor"]
# names its key; a version-3 reader would look for it in a file of its own), and ONNX programs
# whose initializers are external data in that same file.
FORMAT_VERSION = 4
READABLE_VERSIONS = (2, 3, 4)
MANIFEST = "manifest.json"
# manifest["integrity"] = {"fields": {dotted path of each leaf: sha256 of its JSON}}: the fields that
# describe the compiled program (model facts, configuration, pass record, versions, ...) as the
# compile wrote them, so that an edited one is refused by name at load (check_integrity) instead of
# being reported by inspect while the programs do otherwise. Not a signature: it catches edits, not
# forgery. Engines written before it (no "integrity") load as before.
INTEGRITY = "integrity"
# Inside a partial engine dir while it is written: who writes it, so that a later compile can
# prove a partial left by a killed one (SIGKILL runs no cleanup) abandoned and remove it.
OWNER = ".fastmmoe-owner.json"


class EngineFormatError(UserInputError, RuntimeError):
    """The directory is not a (complete, intact, compatible) fastmmoe engine."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, manifest: dict) -> None:
    """Record every file of the directory with its size and hash, then the manifest itself."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, OWNER):
            files[str(p.relative_to(directory))] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    body[INTEGRITY] = {"fields": field_digests(body)}  # sealed last: over the fields as written
    (directory / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")


def field_digests(manifest: dict) -> dict[str, str]:
    """{dotted path: sha256 hex of the canonical JSON of the value} for every leaf of the manifest
    (objects are walked, lists and scalars are leaves), "files" (hashed file by file already) and
    "integrity" itself left out. The path is part of what is hashed, so a value cannot move."""
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            text = json.dumps([prefix, value], sort_keys=True, separators=(",", ":"))
            out[prefix] = hashlib.sha256(text.encode()).hexdigest()

    walk("", {k: v for k, v in manifest.items() if k not in ("files", INTEGRITY)})
    return out


def check_integrity(directory: str | os.PathLike, manifest: dict) -> None:
    """EngineFormatError "engine manifest was edited: FIELD" (the first such field, in sorted order)
    when a field differs from what the compile wrote, or was added or removed. A manifest without
    "integrity" (an engine written before it existed) passes."""
    seal = manifest.get(INTEGRITY)
    if seal is None:
        return
    written = seal.get("fields") if isinstance(seal, dict) else None
    if not isinstance(written, dict):
        raise EngineFormatError(f"{directory}: engine manifest was edited: {INTEGRITY} (recompile the model)")
    now = field_digests(manifest)
    for field in sorted(set(now) | set(written)):
        if now.get(field) != written.get(field):
            raise EngineFormatError(f"{directory}: engine manifest was edited: {field} (the manifest must say what "
                                    "the compile wrote; recompile the model to change it)")


def read_manifest(directory: str | os.PathLike, verify_hashes: bool = True) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise EngineFormatError(f"{directory} is not a directory")
    if not path.is_file():
        raise EngineFormatError(f"{directory} has no {MANIFEST}: not a fastmmoe engine (or a half-written one)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineFormatError(f"{path} is corrupt: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EngineFormatError(f"{path} is not a {FORMAT} manifest (format={manifest.get('format')!r})"
                                if isinstance(manifest, dict) else f"{path} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise EngineFormatError(
            f"{path}: engine format version {version} was written by a newer fastmmoe-compile (this one reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}): upgrade fastmmoe-compile, or recompile the model "
            "with this one")
    if version not in READABLE_VERSIONS:
        raise EngineFormatError(
            f"{path}: engine format version {manifest.get('format_version')} is not supported "
            f"(this fastmmoe-compile reads versions {', '.join(map(str, READABLE_VERSIONS))}); recompile the model"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):  # without it nothing below would be checked: a corrupt engine, not a lax one
        raise EngineFormatError(
            f"{path} {'has no' if files is None else 'has a malformed'} \"files\" table (each file of the engine "
            "with its bytes and sha256, which load_engine verifies): a corrupt or hand-edited manifest; "
            "recompile the model")
    for name, info in files.items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or parts in ((".",), ()) or name == MANIFEST:
            raise EngineFormatError(f"{path}: the manifest lists the file {name!r}, which is not a path inside "
                                    "the engine directory (a corrupt or hand-edited manifest)")
        if not isinstance(info, dict) or not _size(info.get("bytes")) or not _digest(info.get("sha256")):
            shown = repr(info) if len(repr(info)) <= 80 else repr(info)[:77] + "..."
            raise EngineFormatError(f"{path}: the manifest's entry for {name} is {shown}, not "
                                    '{"bytes": <int>, "sha256": <64 hex digits>} (a corrupt or hand-edited '
                                    "manifest)")
        f = directory / name
        if not f.is_file():
            raise EngineFormatError(f"{directory}: file {name} listed in the manifest is missing")
        if f.stat().st_size != info["bytes"]:
            raise EngineFormatError(f"{directory}: {name} has {f.stat().st_size} bytes, manifest says {info['bytes']}")
        if verify_hashes and sha256(f) != info["sha256"]:
            raise EngineFormatError(f"{directory}: {name} does not match its sha256 in the manifest (corrupt?)")
    return manifest


def check_out(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail before any work if the engine cannot be written to `out`: it exists and overwrite is
    off, it exists and is not an engine (overwrite replaces an engine, never the user's other
    files), or no directory can be created there."""
    out = Path(out).absolute()
    _check_replaceable(out, overwrite)
    parent = next(p for p in out.parents if p.exists())  # atomic_directory creates the missing ones
    try:  # a real try, not os.access: root passes os.access on a read-only mount
        os.rmdir(tempfile.mkdtemp(prefix=".fastmmoe-write-check.", dir=parent))
    except OSError as e:
        raise PermissionError(f"cannot write the engine {out}: cannot create a directory in {parent} "
                              f"({e.strerror})") from None
    return out


def _check_replaceable(out: Path, overwrite: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        return
    # The hint names only what works: overwrite replaces an engine, never the user's other files.
    if not is_engine(out):
        raise FileExistsError(f"{out} exists and is not a fastmmoe engine (no {FORMAT} {MANIFEST}): "
                              f"{'overwrite replaces only an engine directory; ' if overwrite else ''}"
                              "remove it yourself or write elsewhere")
    if not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")


def is_engine(path: Path) -> bool:
    """A directory whose manifest says it is an engine (complete or not: enough to replace it)."""
    try:
        return path.is_dir() and json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory beside `out`; on success it becomes `out`, on failure it vanishes."""
    out = check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_partials(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        (tmp / OWNER).write_text(json.dumps(_owner()))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the engine should be as readable as a plain mkdir
        yield tmp
        (tmp / OWNER).unlink()
        if out.exists() or out.is_symlink():
            _check_replaceable(out, overwrite)  # again: something else may have appeared there meanwhile
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_abandoned_partials(parent: Path) -> None:
    """Remove the partial engine dirs in `parent` whose writer is provably gone (killed without
    cleanup); any other partial may still be written, or is not ours, and stays."""
    for p in parent.glob(".*.partial"):
        if p.is_dir() and not p.is_symlink() and _abandoned(p):
            shutil.rmtree(p, ignore_errors=True)


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())}


def _abandoned(partial: Path) -> bool:
    try:
        owner = json.loads((partial / OWNER).read_text())
        pid, host, started = owner["pid"], owner["host"], owner["started"]
    except (OSError, ValueError, TypeError, KeyError):
        return False  # no marker (not ours, or its writer is just creating it): nothing proven
    if host != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False  # another machine's pids say nothing here
    if not _alive(pid):
        return True
    now = _start_time(pid)
    return started is not None and now is not None and now != started  # the pid was reused


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return _stat(pid, 3) != "Z"  # a killed process its parent has not reaped yet is gone too


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), None where unknown."""
    return _stat(pid, 22)


def _stat(pid: int, field: int) -> str | None:
    """Field `field` (1-based, as in proc(5)) of /proc/PID/stat, None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[field - 3]  # the name before ")" may hold spaces
