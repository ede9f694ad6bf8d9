"""Build a server for an engine directory and run it with uvicorn (`fastmmoe-compile serve`)."""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserInputError
from .media import MediaPolicy
from .protocol import Limits

log = logging.getLogger("fastmmoe_compile.serve")


@dataclass
class ServeOptions:
    """The serve command's flags (README "Serve"); units: bytes, pixels, seconds, tokens."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    served_model_name: str | None = None
    max_model_len: int = 4096
    default_max_tokens: int = 256
    max_images: int = 8
    max_body_bytes: int = 32 * 2 ** 20
    max_image_bytes: int = 20 * 2 ** 20
    max_image_pixels: int = 4096 * 4096
    allowed_local_media_path: str | None = None
    allow_image_fetch: bool = False
    fetch_timeout: float = 10.0
    log_level: str = "info"

    def check(self) -> None:
        """ValueError naming the flag for a value the server cannot use."""
        for flag, value in (("--max-batch", self.max_batch), ("--max-queue", self.max_queue),
                            ("--max-model-len", self.max_model_len), ("--max-tokens", self.default_max_tokens),
                            ("--max-images", self.max_images), ("--max-body-bytes", self.max_body_bytes),
                            ("--max-image-bytes", self.max_image_bytes), ("--max-image-pixels", self.max_image_pixels)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.fetch_timeout <= 0:
            raise ValueError(f"--fetch-timeout must be > 0 seconds, got {self.fetch_timeout}")
        if self.default_max_tokens >= self.max_model_len:
            raise ValueError(f"--max-tokens ({self.default_max_tokens}) must be below --max-model-len "
                             f"({self.max_model_len})")
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise ValueError(f"--allowed-local-media-path {self.allowed_local_media_path} is not a directory")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty")


class ListenError(UserInputError, OSError):
    """--host/--port cannot be listened on (in use, not this machine's address, no permission)."""


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening (port 0: a free one, sock.getsockname()[1]).
    ListenError, one line, when it cannot be: a busy port is found before the engine loads and
    before anything is announced. SO_REUSEADDR as uvicorn sets it (a restart right after a stop
    binds; a port another process listens on is still refused)."""
    try:  # IPv6 only for an IPv6 address, as uvicorn does ("localhost" is 127.0.0.1)
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, family=socket.AF_INET6 if ":" in host else socket.AF_INET, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on --host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as e:
        sock.close()
        why = ("the address is already in use (another server on that port? pick another --port)"
               if e.errno == errno.EADDRINUSE else e.strerror or str(e))
        raise ListenError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def build_server(engine_dir, options: ServeOptions, engine=None):
    """(Server, Scheduler) for the engine at engine_dir (or an already loaded `engine`); the
    scheduler is not started."""
    from ..runtime import load_engine
    from .app import Server
    from .engine_io import EngineIO
    from .metrics import Metrics
    from .scheduler import Scheduler

    options.check()
    engine = engine if engine is not None else load_engine(engine_dir)
    name = options.served_model_name or Path(engine_dir).resolve().name
    io = EngineIO(engine, name, options.max_model_len)
    media = MediaPolicy(options.max_image_bytes, options.max_image_pixels,
                        Path(options.allowed_local_media_path) if options.allowed_local_media_path else None,
                        options.allow_image_fetch, options.fetch_timeout)
    limits = Limits(options.max_images, options.default_max_tokens, options.max_model_len - 1, media,
                    options.max_model_len, io.chars_per_token)
    metrics = Metrics()
    scheduler = Scheduler(io, metrics, options.max_batch, options.max_queue)
    return Server(io, scheduler, metrics, limits, options.api_key, options.max_body_bytes), scheduler


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(engine_dir, options: ServeOptions) -> None:
    """Check the engine dir, bind the port (ListenError when busy), load the engine, start the
    scheduler and serve until interrupted (SIGINT/SIGTERM). Nothing is announced before the port
    is bound: a busy port is one line, found in milliseconds."""
    import uvicorn

    from ..runtime.manifest import read_manifest

    options.check()
    read_manifest(engine_dir, verify_hashes=False)  # not an engine: said before the port is taken
    sock = listen(options.host, options.port)
    try:
        logging.basicConfig(level=options.log_level.upper(), format="%(message)s", stream=sys.stderr)
        server, scheduler = build_server(engine_dir, options)
        if not _loopback(options.host) and options.api_key is None:
            log.warning("serving on %s without --api-key: anyone who can reach it can use it", options.host)
        if server.io.tokenizer is None:
            log.warning("this engine has no tokenizer: only /v1/completions with token-id prompts will be answered")
        scheduler.start()
        port = sock.getsockname()[1]
        log.info("serving %s (%s) on http://%s:%d/v1 (pid %d)", server.io.name, engine_dir, options.host, port,
                 os.getpid())
        config = uvicorn.Config(server.app, log_level=options.log_level, access_log=False,
                                timeout_graceful_shutdown=5)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            scheduler.stop()
    finally:
        sock.close()
