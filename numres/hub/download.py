"""Download checkpoints into a cache, verified, never leaving a partial file behind.

Cache: ``$NUMRES_HOME/checkpoints`` (default ``~/.cache/numres/checkpoints``). A file already
in torch's hub cache (``$TORCH_HOME/hub/checkpoints``) is used as it is. A download streams to
a temporary file beside its destination and is moved into place (an atomic rename) only after
its sha256 matches the prefix in its name. ``NUMRES_WEIGHTS_URL`` replaces
``https://download.pytorch.org/models`` for mirrors and air-gapped sites.
"""

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from ..errors import DownloadError
from .registry import OFFICIAL_BASE, hash_prefix

CHUNK = 1 << 17
TIMEOUT_S = 30


def cache_dir():
    """Where numres keeps checkpoints: ``$NUMRES_HOME/checkpoints``."""
    root = os.environ.get("NUMRES_HOME") or os.path.join(_xdg_cache(), "numres")
    return Path(root).expanduser() / "checkpoints"


def torch_cache_dir():
    """torch.hub's checkpoint folder, read (never written) so files are not fetched twice."""
    root = os.environ.get("TORCH_HOME") or os.path.join(_xdg_cache(), "torch")
    return Path(root).expanduser() / "hub" / "checkpoints"


def _xdg_cache():
    return os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")


def mirrored(url):
    """Apply ``NUMRES_WEIGHTS_URL`` to an official URL."""
    mirror = os.environ.get("NUMRES_WEIGHTS_URL")
    if mirror and url.startswith(OFFICIAL_BASE + "/"):
        return mirror.rstrip("/") + url[len(OFFICIAL_BASE):]
    return url


def cached_file(url, progress=True):
    """Return a local path for ``url``, downloading it into the cache if needed.

    Args:
        url: http(s) URL of a checkpoint. If its file name ends ``-<hex>.<ext>``, the hex is
            a sha256 prefix the download must match.
        progress: show a progress bar on stderr when stderr is a terminal.

    Returns:
        pathlib.Path of the verified file.

    Raises:
        DownloadError: network/HTTP failure, truncated body or hash mismatch; the message
            names the URL and where to put the file by hand.
    """
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise DownloadError(f"URL has no file name: {url}")
    for folder in (cache_dir(), torch_cache_dir()):
        if (folder / name).is_file():
            return folder / name
    dst = cache_dir() / name
    download(mirrored(url), dst, hash_prefix(name), progress=progress)
    return dst


def download(url, dst, expected_prefix=None, progress=True):
    """Stream ``url`` to ``dst`` through a temporary file; verify; rename into place."""
    import requests

    dst = Path(dst)
    hint = (f"If this machine is offline, download {url} elsewhere and place it at {dst}, "
            "set NUMRES_WEIGHTS_URL to a mirror, or pass weights='/path/to/file.pth'.")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create cache folder {dst.parent}: {exc}") from None
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".partial")
    try:
        sha = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with requests.get(url, stream=True, timeout=TIMEOUT_S,
                                  headers={"User-Agent": "numres"}) as response:
                    if response.status_code != 200:
                        raise DownloadError(f"download of {url} failed: HTTP "
                                            f"{response.status_code} {response.reason}. {hint}")
                    total = int(response.headers.get("Content-Length") or 0) or None
                    bar = _Progress(dst.name, total, progress)
                    received = 0
                    for chunk in response.iter_content(CHUNK):
                        out.write(chunk)
                        sha.update(chunk)
                        received += len(chunk)
                        bar.update(received)
                    bar.close()
            except requests.RequestException as exc:
                raise DownloadError(f"download of {url} failed: {exc}. {hint}") from None
        if total is not None and received != total:
            raise DownloadError(f"download of {url} was truncated: got {received} of {total} "
                                f"bytes. {hint}")
        digest = sha.hexdigest()
        if expected_prefix and not digest.startswith(expected_prefix):
            raise DownloadError(f"hash mismatch for {url}: expected sha256 starting "
                                f"{expected_prefix}, got {digest}; the file was deleted. The "
                                "download may be corrupted or the server serves another file.")
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, name, total, enabled):
        self.name, self.total = name, total
        self.enabled = enabled and sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, done):
        self.done = done
        now = time.monotonic()
        if self.enabled and now - self.last >= 0.1:
            self.last = now
            self._draw(now)

    def _draw(self, now):
        mb = self.done / 1e6
        rate = mb / max(now - self.start, 1e-6)
        if self.total:
            frac = self.done / self.total
            bar = "#" * int(30 * frac)
            text = f"{frac:4.0%} [{bar:<30}] {mb:.1f}/{self.total / 1e6:.1f} MB"
        else:
            text = f"{mb:.1f} MB"
        sys.stderr.write(f"\rDownloading {self.name}: {text} {rate:.1f} MB/s")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            self._draw(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()
