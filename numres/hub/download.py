"""Download checkpoints into a cache, verified, never leaving a partial file behind.

Cache: ``$NUMRES_HOME/checkpoints`` (default ``~/.cache/numres/checkpoints``). A file already
in torch's hub cache (``$TORCH_HOME/hub/checkpoints``) is used as it is. A download streams to
a temporary file beside its destination and is moved into place (an atomic rename) only after
its length matches the server's ``Content-Length`` and its sha256 matches the prefix in its
name. ``NUMRES_WEIGHTS_URL`` replaces ``https://download.pytorch.org/models`` for mirrors and
air-gapped sites.

Faults, and what happens (the constants below; tests pass small values):

* Timeouts: ``CONNECT_TIMEOUT_S`` to connect, ``READ_TIMEOUT_S`` without a byte (a server
  that stalls mid-body), and ``TOTAL_TIMEOUT_S`` (or ``$NUMRES_DOWNLOAD_TIMEOUT``) for the
  whole call, retries, backoff and waiting for another process included.
* Retries: up to ``ATTEMPTS`` attempts, each restarting the body from its first byte into a
  fresh temporary file, after ``BACKOFF_S`` then twice that, for connect and read timeouts, a
  connection dropped mid-response, a truncated body and HTTP 429/5xx (a ``Retry-After`` of up
  to ``RETRY_AFTER_CAP_S`` is honoured; a longer one ends the download). Never retried: other
  HTTP statuses, a connection that cannot be opened at all (refused, unknown host: an offline
  machine, and the error says what to do), TLS errors, redirect loops (more than
  ``MAX_REDIRECTS``), a body longer than announced, a hash mismatch and the total time limit.
* Two processes fetching one file: an exclusive lock (``fcntl.flock``) on a hidden
  ``.<name>.lock`` beside the file makes the second wait and then use the first one's file;
  the lock file is removed again. Without ``fcntl`` (Windows) both download and the atomic
  rename leaves one complete, verified file either way.
"""

import contextlib
import email.utils
import hashlib
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

from ..errors import DownloadError
from ..progress import ProgressBar
from .registry import OFFICIAL_BASE, hash_prefix

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the atomic rename alone keeps the cache sane
    fcntl = None

CHUNK = 1 << 17
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
TIMEOUT_S = READ_TIMEOUT_S  # the name before connect/read/total were split
# 500 MB (the largest official file) in an hour needs 140 kB/s: slow links still finish, a
# server trickling a few bytes a second does not hold a job forever.
TOTAL_TIMEOUT_S = 3600.0
TOTAL_TIMEOUT_ENV = "NUMRES_DOWNLOAD_TIMEOUT"
ATTEMPTS = 3
BACKOFF_S = 1.0
RETRY_AFTER_CAP_S = 60.0
MAX_REDIRECTS = 10
# Once the announced length has arrived, how long to wait for the end of the connection (to
# see whether the server sends more than it announced) when it ignores "Connection: close".
END_GRACE_S = 1.0
LOCK_POLL_S = 0.1

# Identity: Content-Length then counts the bytes that are hashed and stored. Close: this
# connection carries one response, so extra bytes after it are a fault, not the next response.
HEADERS = {"User-Agent": "numres", "Accept-Encoding": "identity", "Connection": "close"}

_log = logging.getLogger(__name__)
_sleep = time.sleep  # tests replace it to check waits without sleeping


class UnverifiedDownloadWarning(UserWarning):
    """A file was downloaded without a sha256 to check it against (no ``-<hex>`` in its name)."""


class _Transient(Exception):
    """A failure that another attempt may not meet; ``retry_after`` from the server, if any."""

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


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


def cached_file(url, progress=True, **options):
    """Return a local path for ``url``, downloading it into the cache if needed.

    The cached file is named after the last part of ``url``'s path (not after where redirects
    lead), so the hash in that name is what the download is checked against.

    Args:
        url: http(s) URL of a checkpoint. If its file name ends ``-<hex>.<ext>``, the hex is
            a sha256 prefix the download must match; without it the file is stored
            unverified and an :class:`UnverifiedDownloadWarning` says so.
        progress: show a progress bar on stderr when stderr is a terminal.
        **options: ``connect_timeout``, ``read_timeout``, ``total_timeout``, ``attempts``,
            as for :func:`download`.

    Returns:
        pathlib.Path of the verified file.

    Raises:
        DownloadError: network/HTTP failure, timeout, a body shorter or longer than
            announced, or a hash mismatch; the message names the URL and where to put the
            file by hand.
    """
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise DownloadError(f"URL has no file name: {url}")
    for folder in (cache_dir(), torch_cache_dir()):
        if (folder / name).is_file():
            return folder / name
    dst = cache_dir() / name
    expected = hash_prefix(name)
    download(mirrored(url), dst, expected, progress=progress, reuse_existing=True, **options)
    if not expected:
        warnings.warn(
            f"{name} from {url} is not verified: its name has no sha256 prefix (-<hex>.), so "
            "only its length was checked (where the server announced one). It is cached at "
            f"{dst} under that name alone: another URL ending in the same name would get "
            "this file. To have it verified, "
            "name the file <stem>-<first 8 or more hex digits of its sha256>.pth (as "
            "torchvision's files are) and use that URL.", UnverifiedDownloadWarning,
            stacklevel=2)
    return dst


def download(url, dst, expected_prefix=None, progress=True, *, connect_timeout=None,
             read_timeout=None, total_timeout=None, attempts=None, reuse_existing=False,
             headers=None):
    """Stream ``url`` to ``dst`` through a temporary file; verify; rename into place.

    Args:
        url: http(s) URL; redirects are followed (at most ``MAX_REDIRECTS``).
        dst: destination path; its folder is created.
        expected_prefix: hex digits the sha256 of the body must start with, or None.
        progress: show a progress bar on stderr when stderr is a terminal.
        connect_timeout: seconds to open a connection (default ``CONNECT_TIMEOUT_S``).
        read_timeout: seconds without a byte before the attempt fails (default
            ``READ_TIMEOUT_S``).
        total_timeout: seconds for the whole call, retries and waiting for another
            process's download of ``dst`` included (default ``$NUMRES_DOWNLOAD_TIMEOUT``,
            else ``TOTAL_TIMEOUT_S``).
        attempts: attempts for faults that may pass (default ``ATTEMPTS``; see the module
            docstring for which).
        reuse_existing: if ``dst`` exists once the lock is held (another process has just
            downloaded it), return it instead of downloading again.
        headers: extra request headers, e.g. ``Authorization`` (which requests drops on a
            redirect to another host).

    Returns:
        ``dst`` as a pathlib.Path.

    Raises:
        DownloadError: the file could not be fetched and verified; nothing is left at
            ``dst`` or beside it, and the message names the URL, what happened, the attempts
            made and what to do when offline.
    """
    dst = Path(dst)
    total_timeout = _total_timeout(total_timeout)
    deadline = time.monotonic() + total_timeout
    limits = {"url": url, "connect": connect_timeout or CONNECT_TIMEOUT_S,
              "read": read_timeout or READ_TIMEOUT_S, "total": total_timeout,
              "deadline": deadline, "headers": {**HEADERS, **(headers or {})},
              "hint": (f"If this machine is offline, download {url} elsewhere and place it at "
                       f"{dst}, set NUMRES_WEIGHTS_URL to a mirror, or pass "
                       "weights='/path/to/file.pth'.")}
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create cache folder {dst.parent}: {exc}") from None
    with _locked(dst, deadline, progress) as locked:
        if reuse_existing and dst.is_file():
            return dst
        if locked:
            _remove_stale_partials(dst)
        _download_with_retries(dst, expected_prefix, progress, limits,
                               ATTEMPTS if attempts is None else max(1, int(attempts)))
    return dst


def _total_timeout(value):
    """The total time limit in seconds: the argument, else the environment, else the default."""
    if value is not None:
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"total_timeout must be a number of seconds above 0, got {value!r}")
    else:
        text = os.environ.get(TOTAL_TIMEOUT_ENV, "").strip()
        if not text:
            return TOTAL_TIMEOUT_S
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not (value > 0 and math.isfinite(value)):
            raise DownloadError(f"{TOTAL_TIMEOUT_ENV} must be a number of seconds above 0, "
                                f"got {text!r}")
    return float(value)


def _download_with_retries(dst, expected_prefix, progress, limits, attempts):
    import requests

    url, hint = limits["url"], limits["hint"]
    with requests.Session() as session:
        session.max_redirects = MAX_REDIRECTS
        for attempt in range(1, attempts + 1):
            try:
                _attempt(session, dst, expected_prefix, progress, limits)
                return
            except _Transient as exc:
                failure = exc
            tried = f"after {attempt} attempt{'s' if attempt > 1 else ''}"
            if attempt == attempts:
                break
            wait = BACKOFF_S * 2 ** (attempt - 1)
            if failure.retry_after is not None:
                if failure.retry_after > RETRY_AFTER_CAP_S:
                    raise DownloadError(
                        f"download of {url} failed {tried}: {failure}; the server asks to "
                        f"retry after {failure.retry_after:.0f} s, longer than numres waits "
                        f"({RETRY_AFTER_CAP_S:.0f} s). Try again later. {hint}")
                wait = max(wait, failure.retry_after)
            if time.monotonic() + wait >= limits["deadline"]:
                tried += f", stopped within the total time limit of {limits['total']:g} s"
                break
            _log.info("download of %s: %s; attempt %d of %d in %.1f s", url, failure,
                      attempt + 1, attempts, wait)
            _sleep(wait)
    raise DownloadError(f"download of {url} failed {tried}: {failure}. {hint}")


def _attempt(session, dst, expected_prefix, progress, limits):
    """One attempt: fetch into a fresh temporary file, check it, rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _fetch(session, out, dst.name, progress, limits)
        if expected_prefix and not digest.startswith(expected_prefix):
            raise DownloadError(f"hash mismatch for {limits['url']}: expected sha256 starting "
                                f"{expected_prefix}, got {digest}; the file was deleted. The "
                                "download may be corrupted or the server serves another file.")
        try:
            os.replace(tmp, dst)
        except OSError as exc:
            # Windows refuses to replace a file another process has open; that file was
            # verified by the process that stored it, so it is as good as ours.
            if not dst.is_file():
                raise DownloadError(f"cannot store {dst}: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _fetch(session, out, name, progress, limits):
    """Stream the body into ``out``; return its sha256 hex digest."""
    import requests
    from urllib3.exceptions import NewConnectionError

    url, hint = limits["url"], limits["hint"]
    remaining = _remaining(limits, 0, None)
    try:
        response = session.get(url, stream=True, headers=limits["headers"],
                               timeout=(min(limits["connect"], remaining),
                                        min(limits["read"], remaining)))
    except requests.TooManyRedirects:
        raise DownloadError(f"download of {url} failed: more than {MAX_REDIRECTS} redirects "
                            f"(a redirect loop?). {hint}") from None
    except requests.exceptions.SSLError as exc:
        raise DownloadError(f"download of {url} failed: {_reason(exc)}. {hint}") from None
    except requests.ConnectionError as exc:
        if isinstance(_reason(exc), NewConnectionError):  # refused, unknown host: offline
            raise DownloadError(f"download of {url} failed: {_reason(exc)}. {hint}") from None
        raise _Transient(_reason(exc)) from None  # ConnectTimeout is a ConnectionError too
    except requests.Timeout:
        raise _Transient(f"no response within {limits['read']:g} s") from None
    except requests.RequestException as exc:
        raise DownloadError(f"download of {url} failed: {exc}. {hint}") from None
    with response:
        status = f"HTTP {response.status_code} {response.reason}"
        if response.status_code == 429 or 500 <= response.status_code < 600:
            raise _Transient(status, _retry_after(response.headers.get("Retry-After")))
        if response.status_code != 200:
            raise DownloadError(f"download of {url} failed: {status}. {hint}")
        total = _content_length(response.headers.get("Content-Length"))
        return _read_body(response.raw, out, total, name, progress, limits)


def _read_body(raw, out, total, name, progress, limits):
    """Copy the body from urllib3's response ``raw`` to ``out``, checking time and length."""
    from urllib3.exceptions import HTTPError as Urllib3Error
    from urllib3.exceptions import ReadTimeoutError

    url, hint = limits["url"], limits["hint"]
    of_total = f" of {total}" if total is not None else ""
    checks_excess = total is not None and _read_past_announced_length(raw)
    # read1 returns what one receive brings, so a trickle cannot hold a read for long: the
    # deadline is checked between reads and also bounds each one (the socket's timeout).
    # urllib3 1.x has only read(), which waits for a whole chunk.
    read = getattr(raw, "read1", raw.read)
    sha = hashlib.sha256()
    bar = ProgressBar(total, label=f"Downloading {name}: ", unit="MB", rate_unit="MB/s",
                      scale=1e6, interval=0.1, enabled=progress)
    got = 0  # bytes received on the wire (what Content-Length counts)
    try:
        while True:
            at_end = total is not None and got >= total
            wait = _remaining(limits, got, total)
            by_deadline = wait < (END_GRACE_S if at_end else limits["read"])
            _set_read_timeout(raw, wait if by_deadline else
                              END_GRACE_S if at_end else limits["read"])
            amount = CHUNK if total is None else max(1, min(CHUNK, total + 1 - got))
            try:
                chunk = read(amount, decode_content=True)
            except (Urllib3Error, OSError) as exc:
                if at_end:
                    break  # all announced bytes came and no more: a complete body
                if by_deadline:
                    _remaining(limits, got, total, force=True)
                if isinstance(exc, ReadTimeoutError):
                    raise _Transient(f"stalled: no data for {limits['read']:g} s after {got}"
                                     f"{of_total} bytes") from None
                raise _Transient(f"connection lost after {got}{of_total} bytes: "
                                 f"{_reason(exc)}") from None
            if not chunk:
                break
            out.write(chunk)
            sha.update(chunk)
            got = raw.tell()
            bar.update(got)
            if checks_excess and got > total:
                raise DownloadError(f"download of {url} failed: the server sent more than the "
                                    f"{total} bytes it announced (Content-Length); the file "
                                    f"was deleted. {hint}")
    finally:
        bar.close()
    if total is not None and got < total:
        raise _Transient(f"the body was truncated: got {got} of {total} bytes")
    return sha.hexdigest()


def _remaining(limits, got, total, force=False):
    """Seconds left before the deadline; DownloadError (not retried) when none are."""
    left = limits["deadline"] - time.monotonic()
    if left > 0 and not force:
        return left
    done = ""
    if got or total is not None:  # in the body: say how far it came
        done = f" after {got}{f' of {total}' if total is not None else ''} bytes"
    raise DownloadError(f"download of {limits['url']} exceeded the total time limit of "
                        f"{limits['total']:g} s{done} (set {TOTAL_TIMEOUT_ENV} to allow more). "
                        f"{limits['hint']}")


def _read_past_announced_length(raw):
    """Let ``raw`` read beyond Content-Length, so that a body longer than announced shows.

    http.client stops reading at Content-Length and urllib3 then drops the connection
    (measured with urllib3 2.8 / requests 2.34: a 1000-byte body announced as 600 arrives as
    600 bytes and no error), so the extra bytes would go unseen. Private attributes, checked
    before use: on a urllib3 without them the stack's behaviour stays (the hash still checks).
    """
    inner = getattr(raw, "_fp", None)
    if inner is None or not hasattr(inner, "length") or not hasattr(raw, "length_remaining"):
        return False
    inner.length = None               # http.client: read to the end of the connection
    raw.length_remaining = None       # urllib3: no cap of its own ...
    raw.enforce_content_length = False  # ... and no IncompleteRead: the length is ours to check
    return True


def _set_read_timeout(raw, seconds):
    """Best effort: the socket timeout of the next receive (it stays the read timeout if not)."""
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    if sock is None:
        # With "Connection: close" http.client detaches the socket from the connection; the
        # response still reads it through its file object (a SocketIO over the socket).
        sock = getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None),
                       "_sock", None)
    with contextlib.suppress(AttributeError, OSError):
        if sock is not None:
            sock.settimeout(max(seconds, 0.001))


def _content_length(text):
    try:
        value = int(text)
    except (TypeError, ValueError):
        return None  # absent or unreadable: no length check, the hash still applies
    return value if value >= 0 else None


def _retry_after(text):
    """Seconds from a ``Retry-After`` header (a number or an HTTP date), or None."""
    if not text:
        return None
    text = text.strip()
    if text.isdigit():
        return float(text)
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        when = email.utils.parsedate_to_datetime(text)
        return max(0.0, when.timestamp() - time.time())
    return None


def _reason(exc):
    """The cause inside requests' wrapping (``MaxRetryError(reason=...)``), else ``exc``."""
    inner = exc.args[0] if getattr(exc, "args", None) else None
    return getattr(inner, "reason", None) or exc


@contextlib.contextmanager
def _locked(dst, deadline, progress):
    """Hold an exclusive lock for ``dst`` (on ``.<name>.lock`` beside it); yield whether held.

    The holder deletes the lock file before releasing it, so none is left behind. That is
    safe because a waiter, once it holds its lock, checks that the file it locked is still
    the one at the path (else it locks the new one): the lock file at the path is always the
    current holder's.
    """
    fd = _acquire(dst.parent / f".{dst.name}.lock", dst.name, deadline, progress)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(dst.parent / f".{dst.name}.lock")
        os.close(fd)


def _acquire(path, name, deadline, progress):
    """A descriptor of ``path`` holding its flock, or None where locks are not available."""
    if fcntl is None:
        return None
    told = False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DownloadError(f"cannot create lock file {path}: {exc}") from None
        try:
            while not _try_flock(fd):
                if time.monotonic() >= deadline:
                    raise DownloadError(f"gave up waiting for another process downloading "
                                        f"{name} (it holds {path}); try again, or delete the "
                                        "lock file if no download is running.")
                if not told and progress and sys.stderr.isatty():
                    sys.stderr.write(f"Waiting for another process downloading {name}\n")
                    told = True
                time.sleep(LOCK_POLL_S)
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        except OSError:
            # flock unsupported here (some network file systems): go on unlocked, as on
            # Windows; the atomic rename still leaves one whole file.
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)  # the previous holder removed the file we waited on: lock the new one


def _try_flock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _remove_stale_partials(dst):
    """Delete temporary files of ``dst`` left by a killed process (called under the lock,
    so no live download of ``dst`` owns one)."""
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.[A-Za-z0-9_]+\.partial")
    with contextlib.suppress(OSError):
        for entry in os.scandir(dst.parent):
            if pattern.fullmatch(entry.name):
                with contextlib.suppress(OSError):
                    os.remove(entry.path)
