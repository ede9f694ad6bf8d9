"""The test session's AOTInductor compile cache: identical programs are compiled once per session.

`package_aoti(program, path, constants)` (fastmmoe_compile/lower/inductor.py) is wrapped: the key is a
hash of everything the package is made from (the program's graph with every node's target, arguments
and fake value, its signature, range constraints and guards, every weight and constant tensor's name,
dtype, shape, strides and bytes, the `constants` flag, torch's version), so a hit is a package of the
same program. The first caller compiles (with AOTInductor, as without the cache) and copies the
package into the cache directory; a later caller with the same key, in this process, another xdist
worker or a subprocess (the README's commands), gets a copy of that file. A file lock per key (flock)
makes a second caller wait for the first instead of compiling the same program again.

Standard library only (and torch, at call time): tests/conftest.py imports it as
tests.compile_cache.fastmmoe_test_cache, and sitecustomize.py beside it loads it from its file.

On only while FASTMMOE_TEST_AOTI_CACHE names a directory: tests/conftest.py points it at a directory
of this session's temporary root (shared by the xdist workers, new every session: nothing is reused
from one run to the next). FASTMMOE_TEST_AOTI_CACHE_LOG, when set, gets one line per call: key, hit
or miss, seconds."""
from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import re
import shutil
import time
from pathlib import Path

ENV = "FASTMMOE_TEST_AOTI_CACHE"
LOG_ENV = "FASTMMOE_TEST_AOTI_CACHE_LOG"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
CALLS = 0  # package_aoti calls in this process, hits included (tests/conftest.py checks the aoti marker)


def _tensor_bytes(h, name: str, t) -> None:
    import torch

    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{tuple(t.stride())}|{type(t).__name__}\n".encode())
    if isinstance(t, torch.Tensor):
        data = t.detach().cpu().contiguous()
        if data.numel():
            h.update(data.view(torch.uint8).numpy().tobytes() if data.dtype != torch.bool
                     else data.to(torch.uint8).numpy().tobytes())


def program_key(program, constants: bool) -> str:
    """sha256 of what AOTInductor compiles `program` from (see the module docstring)."""
    import torch

    h = hashlib.sha256()
    h.update(f"torch {torch.__version__} constants={constants}\n".encode())
    for node in program.graph.nodes:
        val = node.meta.get("val")
        line = f"{node.op}|{node.name}|{node.target}|{node.args}|{node.kwargs}|{val!r}\n"
        h.update(_ADDRESS.sub("", line).encode())  # <function sym_min at 0x7f..>: the same function in every process
    h.update(repr(program.graph_signature).encode())
    h.update(repr(sorted((str(k), str(v)) for k, v in program.range_constraints.items())).encode())
    h.update(repr(getattr(program, "_guards_code", None)).encode())
    h.update(repr([(e.fqn, e.signature) for e in program.module_call_graph]).encode())
    for name, t in sorted(program.state_dict.items()):
        _tensor_bytes(h, "state:" + name, t)
    for name, t in sorted(program.constants.items()):
        if isinstance(t, torch.Tensor):
            _tensor_bytes(h, "const:" + name, t)
        else:
            h.update(f"const:{name}|{t!r}\n".encode())
    return h.hexdigest()


def _log(key: str, what: str, seconds: float, path) -> None:
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a") as f:
            f.write(f"{key[:16]}\t{what}\t{seconds:.1f}\t{os.getpid()}\t{path}\n")


def cached(package_aoti):
    """package_aoti with the session's cache in front of it (a pass-through without FASTMMOE_TEST_AOTI_CACHE)."""
    if getattr(package_aoti, "_test_cache", False):
        return package_aoti

    @functools.wraps(package_aoti)
    def wrapper(program, path, constants: bool = True):
        global CALLS
        CALLS += 1
        root = os.environ.get(ENV)
        if not root:
            return package_aoti(program, path, constants)
        start = time.time()
        key = program_key(program, constants)
        entry = Path(root) / f"{key}.pt2"
        Path(root).mkdir(parents=True, exist_ok=True)
        with open(str(entry) + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            if entry.is_file():
                shutil.copyfile(entry, path)
                _log(key, "hit", time.time() - start, path)
                return str(path)
            result = package_aoti(program, path, constants)
            partial = entry.with_suffix(f".{os.getpid()}.partial")
            shutil.copyfile(result, partial)
            os.replace(partial, entry)
        _log(key, "miss", time.time() - start, path)
        return result

    wrapper._test_cache = True
    return wrapper


def install() -> None:
    """Wrap fastmmoe_compile.lower.inductor.package_aoti (its callers look it up at call time)."""
    from fastmmoe_compile.lower import inductor

    inductor.package_aoti = cached(inductor.package_aoti)
