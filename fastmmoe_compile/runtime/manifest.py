"""The engine directory's manifest, and writing the directory atomically."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

FORMAT = "fastmmoe-engine"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class EngineFormatError(RuntimeError):
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
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(directory))] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    (directory / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")


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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EngineFormatError(
            f"{path}: engine format version {manifest.get('format_version')} is not supported "
            f"(this fastmmoe-compile reads version {FORMAT_VERSION}); recompile the model"
        )
    for name, info in manifest.get("files", {}).items():
        f = directory / name
        if not f.is_file():
            raise EngineFormatError(f"{directory}: file {name} listed in the manifest is missing")
        if f.stat().st_size != info["bytes"]:
            raise EngineFormatError(f"{directory}: {name} has {f.stat().st_size} bytes, manifest says {info['bytes']}")
        if verify_hashes and sha256(f) != info["sha256"]:
            raise EngineFormatError(f"{directory}: {name} does not match its sha256 in the manifest (corrupt?)")
    return manifest


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory beside `out`; on success it becomes `out`, on failure it vanishes."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the engine should be as readable as a plain mkdir
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
