"""Images of chat requests: data: URLs, local files under an allowed directory, http(s) when allowed.

Every image is checked before its pixels are decoded: its encoded size (max_image_bytes) and its
width x height from the file header (max_image_pixels), so a small file that decodes to a huge
image (a decompression bomb) is refused without allocating it. Decoding itself is Pillow's.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import APIError


@dataclass(frozen=True)
class MediaPolicy:
    """What a request may point at. allowed_local_media: the one directory (and below) whose files
    file:// URLs may name (None: no local files). allow_fetch: http(s) URLs, each read within
    fetch_timeout seconds and max_image_bytes bytes."""

    max_image_bytes: int = 20 * 2 ** 20
    max_image_pixels: int = 4096 * 4096
    allowed_local_media: Path | None = None
    allow_fetch: bool = False
    fetch_timeout: float = 10.0


def bad_image(message: str) -> APIError:
    return APIError(400, message, code="invalid_image")


def load_image_url(url: str, policy: MediaPolicy):
    """An image_url part's url -> an RGB PIL image; APIError 400 for anything refused or unreadable."""
    if not isinstance(url, str) or not url:
        raise bad_image("image_url.url must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url(url, policy)
    elif scheme == "file":
        data = _local_file(url, policy)
    elif scheme in ("http", "https"):
        data = _fetch(url, policy)
    else:
        raise bad_image("image_url.url must be a data: URL (base64), a file:// URL (with --allowed-local-media-path) "
                        "or an http(s) URL (with --allow-image-fetch)")
    return decode_image(data, policy)


def _data_url(url: str, policy: MediaPolicy) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64") or not header.lower().startswith("data:image/"):
        raise bad_image("a data: URL image must be data:image/<type>;base64,<data>")
    if len(payload) > policy.max_image_bytes * 4 // 3 + 4:
        raise APIError(413, f"an image is larger than the {policy.max_image_bytes} bytes allowed "
                            "(--max-image-bytes)", code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_image(f"the data: URL's base64 payload is corrupt: {e}") from e


def _local_file(url: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_media is None:
        raise APIError(403, "file:// image URLs are refused: the server was started without "
                            "--allowed-local-media-path", code="local_media_forbidden")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_image(f"a file:// URL names a host ({parsed.netloc!r}): only local files are read")
    root = Path(os.path.realpath(policy.allowed_local_media))
    path = Path(os.path.realpath(urllib.parse.unquote(parsed.path)))  # symlinks resolved before the check
    if not path.is_relative_to(root):
        raise APIError(403, f"image files must be under the allowed directory {root}", code="local_media_forbidden")
    if not path.is_file():
        raise bad_image(f"no image file {path}")
    if path.stat().st_size > policy.max_image_bytes:
        raise APIError(413, f"{path.name} is larger than the {policy.max_image_bytes} bytes allowed "
                            "(--max-image-bytes)", code="image_too_large")
    return path.read_bytes()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect could lead anywhere: refuse it
        return None


def _fetch(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_fetch:
        raise APIError(403, "http(s) image URLs are refused: the server was started without --allow-image-fetch; "
                            "send the image as a data: URL", code="image_fetch_forbidden")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=policy.fetch_timeout) as response:
            data = response.read(policy.max_image_bytes + 1)
    except Exception as e:  # noqa: BLE001  (any network failure is the client's URL's)
        raise bad_image(f"could not fetch the image: {type(e).__name__}: {e}") from e
    if len(data) > policy.max_image_bytes:
        raise APIError(413, f"the fetched image is larger than the {policy.max_image_bytes} bytes allowed",
                       code="image_too_large")
    return data


def decode_image(data: bytes, policy: MediaPolicy):
    """Encoded image bytes -> an RGB PIL image; the pixel count is checked from the header first."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > policy.max_image_bytes:
        raise APIError(413, f"an image is larger than the {policy.max_image_bytes} bytes allowed "
                            "(--max-image-bytes)", code="image_too_large")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > policy.max_image_pixels:
                    raise APIError(413, f"the image is {width}x{height} = {width * height} pixels; at most "
                                        f"{policy.max_image_pixels} are allowed (--max-image-pixels)",
                                   code="image_too_large")
                im.load()
                return im.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise APIError(413, f"the image was refused as a decompression bomb: {e}", code="image_too_large") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise bad_image(f"the image is corrupt or not a format Pillow reads: {e}") from e
