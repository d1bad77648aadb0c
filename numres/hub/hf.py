"""Weights from the Hugging Face Hub: ``weights="hf-hub:timm/resnet50.a1_in1k"``.

timm publishes its ResNets there as ``model.safetensors`` with a ``config.json``; for the
architectures numres builds, timm's parameter names are torchvision's. A spec is
``hf-hub:<org>/<name>[@<revision>]`` (timm's spelling; ``hf_hub:`` is accepted too).

Files go where ``huggingface_hub`` keeps them, so either library finds what the other fetched:
``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``), then
``models--<org>--<name>/blobs/<etag>`` for the content, ``snapshots/<commit>/<file>`` linking to
the blob, and ``refs/<revision>`` holding the commit. When ``huggingface_hub`` is installed it
downloads (it also knows the token ``hf auth login`` stored); otherwise ``requests`` does, with
the Hub's protocol: ``HEAD {endpoint}/{repo}/resolve/{revision}/{file}`` gives the commit
(``X-Repo-Commit``), the content's id (``X-Linked-Etag`` for LFS files, which is their sha256,
else ``ETag``) and, for large files, a redirect to the CDN, where the token is not sent.

Behaviour:

* The cache is looked at first: a file already there for that revision is used without any
  request (so a branch such as ``main`` is not re-checked; pin ``@<commit>`` to be exact).
* ``HF_HUB_OFFLINE=1``: the cache only; a file not there is a :class:`DownloadError` naming the
  repo, file and cache folder.
* ``HF_ENDPOINT`` replaces ``https://huggingface.co`` (mirrors); ``HF_TOKEN`` is sent as
  ``Authorization: Bearer`` to the endpoint, never to the CDN.
* Downloads go to a temporary file and are renamed into place; an LFS file's sha256 is checked
  against its ``X-Linked-Etag``.
* ``model.safetensors`` is preferred; ``pytorch_model.bin`` (read by numres's pickle-free
  reader) when a repo has no safetensors file.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urljoin, urlparse

from .. import imagenet
from ..checkpoint import read_checkpoint
from ..errors import CheckpointError, DownloadError
from ..transforms import ImageClassification
from . import download as _download
from .registry import Weights

__all__ = ["HubWeights", "hub_cache", "hub_file", "hub_weights", "is_hub_spec", "parse_spec",
           "repo_architecture"]

PREFIXES = ("hf-hub:", "hf_hub:")
DEFAULT_ENDPOINT = "https://huggingface.co"
CONFIG_NAME = "config.json"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
# timm's config.json is ~1 kB (a few tens with label names); a larger one is not a config.
MAX_CONFIG_BYTES = 1 << 20
MAX_REDIRECTS = 10
# Tests set this False to take the plain-requests path although huggingface_hub is installed.
USE_HUGGINGFACE_HUB = True

_NAME_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"(?:{_NAME_PART}/)?{_NAME_PART}")
_REVISION = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Server-given names that become file names in the cache: no separators, no leading dot.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TRUE = {"1", "ON", "YES", "TRUE"}


class _MissingFile(DownloadError):
    """The repo (or, offline, the cache) has no such file; the caller may try another name."""


class _NotCached(_MissingFile):
    """Offline, and the cache has no such file."""


# -- where things are --------------------------------------------------------------------
def is_hub_spec(value):
    """True for a string naming Hub weights (``"hf-hub:org/name[@revision]"``)."""
    return isinstance(value, str) and value.startswith(PREFIXES)


def parse_spec(spec):
    """Split ``"hf-hub:org/name@revision"`` into ``(repo_id, revision)``.

    Raises:
        ValueError: not a Hub spec, or a repo id or revision the Hub would not accept.
    """
    if not is_hub_spec(spec):
        raise ValueError(f"not a Hub weights spec (hf-hub:org/name[@revision]): {spec!r:.100}")
    body = spec.split(":", 1)[1]
    repo_id, _, revision = body.partition("@")
    revision = revision or "main"
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ValueError(f"{spec!r:.100}: {repo_id!r:.100} is not a Hub repo id (org/name of "
                         "letters, digits, '.', '_' and '-')")
    if (not _REVISION.fullmatch(revision) or ".." in revision or len(revision) > 200
            or revision.startswith(".")):
        raise ValueError(f"{spec!r:.100}: {revision!r:.100} is not a branch, tag or commit")
    return repo_id, revision


def endpoint():
    """The Hub's URL: ``$HF_ENDPOINT`` or ``https://huggingface.co``."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_cache():
    """huggingface_hub's cache folder, by its rules (read at each call, not at import)."""
    folder = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
        folder = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def is_offline():
    """``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) set to 1/ON/YES/TRUE."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def resolve_url(repo_id, filename, revision="main"):
    """``{endpoint}/{repo_id}/resolve/{revision}/{filename}``, as ``hf_hub_url`` builds it."""
    return f"{endpoint()}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"


def _repo_folder(repo_id):
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def _token():
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        path = os.environ.get("HF_TOKEN_PATH") or os.path.join(
            os.environ.get("HF_HOME") or os.path.join(
                os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                "huggingface"), "token")
        try:
            token = Path(os.path.expanduser(path)).read_text().strip()
        except (OSError, UnicodeDecodeError):
            token = None
    return token or None


def _cached(repo_id, filename, revision):
    """The snapshot file for ``revision`` if the cache has it, else None."""
    folder = _repo_folder(repo_id)
    commit = revision
    if not _COMMIT.fullmatch(revision):
        try:
            commit = (folder / "refs" / revision).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not _SAFE_NAME.fullmatch(commit):
            return None
    path = folder / "snapshots" / commit / filename
    return path if path.is_file() else None


# -- fetching one file ---------------------------------------------------------------------
def hub_file(repo_id, filename, revision="main", progress=True):
    """A local path for one file of a Hub model repo, downloading it into the cache if needed.

    Args:
        repo_id: ``"org/name"``.
        filename: a file in the repo, e.g. ``"model.safetensors"``.
        revision: branch, tag or 40-digit commit.
        progress: progress bar on stderr (terminals only).

    Returns:
        pathlib.Path of ``snapshots/<commit>/<filename>`` in the Hub cache.

    Raises:
        DownloadError: not in the cache while ``HF_HUB_OFFLINE`` is set, no such repo, file
            or revision, HTTP or network failure, or a sha256 mismatch; the message names the
            repo, the file and the URL.

    Example:
        >>> hub_file("timm/resnet50.a1_in1k", "config.json")
        PosixPath('/home/me/.cache/huggingface/hub/models--timm--resnet50.a1_in1k/snapshots/...')
    """
    path = _cached(repo_id, filename, revision)
    if path is not None:
        return path
    url = resolve_url(repo_id, filename, revision)
    if is_offline():
        raise _NotCached(f"hf-hub:{repo_id}: {filename} (revision {revision}) is not in the "
                         f"Hugging Face cache {_repo_folder(repo_id)} and HF_HUB_OFFLINE is set, "
                         f"so {url} was not fetched. Run once online (or unset HF_HUB_OFFLINE), "
                         "or copy the cache folder from a machine that has it")
    hf_hub_download = _huggingface_hub()
    if hf_hub_download is not None:
        return _via_huggingface_hub(hf_hub_download, repo_id, filename, revision, url)
    return _via_requests(repo_id, filename, revision, url, progress)


def _huggingface_hub():
    if not USE_HUGGINGFACE_HUB:
        return None
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    return hf_hub_download


def _hf_errors():
    """huggingface_hub's exception classes, wherever its version keeps them."""
    import huggingface_hub
    modules = [getattr(huggingface_hub, "errors", None), getattr(huggingface_hub, "utils", None)]
    names = ("LocalEntryNotFoundError", "EntryNotFoundError", "RepositoryNotFoundError",
             "RevisionNotFoundError")
    found = {}
    for name in names:
        for module in modules:
            if module is not None and hasattr(module, name):
                found[name] = getattr(module, name)
                break
        else:
            found[name] = type(f"_Absent{name}", (Exception,), {})
    return found


def _via_huggingface_hub(hf_hub_download, repo_id, filename, revision, url):
    errors = _hf_errors()
    blobs = _repo_folder(repo_id) / "blobs"
    before = set(os.listdir(blobs)) if blobs.is_dir() else set()
    where = f"hf-hub:{repo_id}: {filename} (revision {revision}, {url})"
    try:
        # Settings are passed explicitly: huggingface_hub reads its environment variables once,
        # at import, and numres honours them as they are at each call.
        path = hf_hub_download(repo_id, filename, revision=revision,
                               cache_dir=str(hub_cache()), endpoint=endpoint(),
                               library_name="numres")
    except errors["LocalEntryNotFoundError"] as exc:
        raise DownloadError(f"{where}: not in the cache and the Hub could not be reached "
                            f"({_first_line(exc)}). Set HF_HUB_OFFLINE=1 to use only the cache, "
                            "or HF_ENDPOINT for a mirror.") from None
    except errors["EntryNotFoundError"] as exc:
        raise _MissingFile(f"{where}: the repo has no such file ({_first_line(exc)})") from None
    except errors["RevisionNotFoundError"] as exc:
        raise DownloadError(f"{where}: no revision {revision!r} ({_first_line(exc)})") from None
    except errors["RepositoryNotFoundError"] as exc:
        raise DownloadError(f"{where}: repository not found, or private or gated (set HF_TOKEN "
                            f"or log in) ({_first_line(exc)})") from None
    except Exception as exc:   # HTTP, network and validation errors of any version
        raise DownloadError(f"{where}: {type(exc).__name__}: {_first_line(exc)}") from None
    path = Path(path)
    blob = path.resolve()
    # huggingface_hub checks sizes, not hashes: check what it has just fetched.
    if blob.parent == blobs.resolve() and blob.name not in before and _SHA256.fullmatch(blob.name):
        digest = _sha256(blob)
        if digest != blob.name:
            for stale in (path, blob):
                stale.unlink(missing_ok=True)
            raise DownloadError(f"{where}: sha256 mismatch: the Hub names the file {blob.name}, "
                                f"its content hashes to {digest}; the file was deleted.")
    return path


def _via_requests(repo_id, filename, revision, url, progress):
    headers = {"User-Agent": "numres", "Accept-Encoding": "identity"}
    token = _token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    where = f"hf-hub:{repo_id}: {filename} (revision {revision}, {url})"
    response, location = _head(url, headers, where)
    commit = response.headers.get("X-Repo-Commit")
    etag = _etag(response.headers.get("X-Linked-Etag") or response.headers.get("ETag"))
    if not (commit and etag and _SAFE_NAME.fullmatch(commit) and _SAFE_NAME.fullmatch(etag)):
        raise DownloadError(f"{where}: the response has no usable X-Repo-Commit/ETag headers "
                            f"(got {commit!r:.50}, {etag!r:.80}); is HF_ENDPOINT a Hub?")
    size = response.headers.get("X-Linked-Size")
    if size is None and location == url:
        size = response.headers.get("Content-Length")
    size = int(size) if size and size.isdigit() else None
    folder = _repo_folder(repo_id)
    blob = folder / "blobs" / etag
    pointer = folder / "snapshots" / commit / filename
    try:
        if revision != commit:
            _write_atomic(folder / "refs" / revision, commit.encode())
        if not pointer.is_file():
            if not blob.is_file():
                sha = etag if _SHA256.fullmatch(etag) else None
                _fetch(location, blob, sha, size, headers, where, progress,
                       small=filename == CONFIG_NAME)
            _link(blob, pointer)
    except OSError as exc:
        raise DownloadError(f"{where}: cannot write the Hugging Face cache {folder}: "
                            f"{exc}") from None
    return pointer


def _head(url, headers, where):
    """HEAD ``url``, following redirects within the endpoint; stop at one to another host
    (the CDN): the Hub's headers are on that redirect. Returns ``(response, location)``."""
    import requests

    current = url
    for _ in range(MAX_REDIRECTS):
        try:
            response = requests.head(current, headers=headers, allow_redirects=False,
                                     timeout=_timeouts())
        except requests.RequestException as exc:
            raise DownloadError(f"{where}: cannot reach the Hub ({exc}). Set HF_HUB_OFFLINE=1 "
                                "to use only the cache, or HF_ENDPOINT for a mirror.") from None
        if response.is_redirect and response.headers.get("Location"):
            target = urljoin(current, response.headers["Location"])
            if _origin(target) == _origin(current):
                current = target            # a renamed repo, or a mirror's own layout
                continue
            return response, target
        _raise_for_status(response, where)
        return response, current
    raise DownloadError(f"{where}: more than {MAX_REDIRECTS} redirects")


def _raise_for_status(response, where):
    status = response.status_code
    if status < 400:
        return
    code = response.headers.get("X-Error-Code", "")
    detail = f"HTTP {status}" + (f" {code}" if code else "")
    if code == "EntryNotFound" or (status == 404 and not code):
        raise _MissingFile(f"{where}: the repo has no such file ({detail})")
    if code == "RevisionNotFound":
        raise DownloadError(f"{where}: no such revision ({detail})")
    if code in ("RepoNotFound", "GatedRepo") or status in (401, 403):
        raise DownloadError(f"{where}: repository not found, or private or gated: set HF_TOKEN "
                            f"to a token that may read it ({detail})")
    raise DownloadError(f"{where}: {detail} {response.reason}")


def _fetch(location, blob, sha, size, headers, where, progress, small):
    """Download into ``blob`` (atomically, verified when ``sha`` is given)."""
    auth = {"Authorization": headers["Authorization"]} if "Authorization" in headers else {}
    same_host = _origin(location) == _origin(endpoint())
    if small:
        # config.json: read bounded, with the token, whoever serves it.
        data = _get_small(location, headers if same_host else _without(headers, auth), where)
        if sha and hashlib.sha256(data).hexdigest() != sha:
            raise DownloadError(f"{where}: sha256 mismatch: expected {sha}, got "
                                f"{hashlib.sha256(data).hexdigest()}")
        _write_atomic(blob, data)
        return
    try:
        _download.download(location, blob, sha, progress=progress,
                           headers=auth if same_host else None)
    except DownloadError as exc:
        raise DownloadError(f"{where}: {exc}") from None
    if size is not None and blob.stat().st_size != size:
        got = blob.stat().st_size
        blob.unlink(missing_ok=True)
        raise DownloadError(f"{where}: the Hub announced {size} bytes, the download has {got}; "
                            "the file was deleted")


def _get_small(url, headers, where):
    import requests

    try:
        with requests.get(url, headers=headers, stream=True,
                          timeout=_timeouts()) as response:
            _raise_for_status(response, where)
            data = b""
            for chunk in response.iter_content(1 << 16):
                data += chunk
                if len(data) > MAX_CONFIG_BYTES:
                    raise DownloadError(f"{where}: more than {MAX_CONFIG_BYTES} bytes; not a "
                                        "model config")
    except requests.RequestException as exc:
        raise DownloadError(f"{where}: download failed ({exc})") from None
    return data


def _timeouts():
    """(connect, read) seconds: download.py's settings, whichever of them it has."""
    read = getattr(_download, "READ_TIMEOUT_S", None) or _download.TIMEOUT_S
    return getattr(_download, "CONNECT_TIMEOUT_S", None) or read, read


def _without(headers, auth):
    return {k: v for k, v in headers.items() if k not in auth}


def _origin(url):
    parts = urlparse(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _etag(value):
    # ETag: W/"<value>" or "<value>", as huggingface_hub normalises it.
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def _write_atomic(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _link(blob, pointer):
    """``snapshots/<commit>/<file>`` -> ``../../blobs/<etag>``: a relative symlink, as
    huggingface_hub makes (a copy where symlinks are not allowed)."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}.tmp")
    try:
        try:
            os.symlink(os.path.relpath(blob, pointer.parent), tmp)
        except OSError:
            shutil.copyfile(blob, tmp)
        os.replace(tmp, pointer)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _sha256(path):
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- timm's config.json and the weights ------------------------------------------------------
def load_config(repo_id, revision="main"):
    """timm's ``config.json`` of a repo, checked: ``(config, pretrained_cfg, num_classes)``.

    Raises:
        DownloadError: no config.json (not a timm repo) or it cannot be fetched.
        CheckpointError: it is not a timm config.
    """
    try:
        path = hub_file(repo_id, CONFIG_NAME, revision)
    except _NotCached:
        raise
    except _MissingFile as exc:
        raise DownloadError(f"{exc}. numres reads timm's repos, which have a config.json "
                            "naming the architecture and preprocessing") from None
    where = f"hf-hub:{repo_id}: {CONFIG_NAME}"
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{where}: larger than {MAX_CONFIG_BYTES} bytes; not a config")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise CheckpointError(f"{where}: not a timm model config (no 'architecture')")
    # timm's older single-level configs keep the preprocessing keys at the top.
    pretrained_cfg = config.get("pretrained_cfg", config)
    if not isinstance(pretrained_cfg, dict):
        raise CheckpointError(f"{where}: pretrained_cfg must be an object")
    num_classes = config.get("num_classes", pretrained_cfg.get("num_classes", 1000))
    if type(num_classes) is not int or num_classes < 1:
        raise CheckpointError(f"{where}: num_classes must be a positive integer, got "
                              f"{num_classes!r:.40}")
    return config, pretrained_cfg, num_classes


def _categories(config, pretrained_cfg, num_classes):
    """Class names: timm's label_descriptions, else its label_names, else ImageNet's names for
    1000 classes (timm's in1k order is torchvision's: sorted WordNet ids), else numbers."""
    for key in ("label_descriptions", "label_names"):
        labels = config.get(key, pretrained_cfg.get(key))
        if isinstance(labels, dict):     # {"0": name, ...} when class ids have gaps
            try:
                labels = [labels.get(str(i), labels.get(i, str(i))) for i in range(num_classes)]
            except TypeError:
                labels = None
        if (isinstance(labels, list) and len(labels) == num_classes
                and all(isinstance(v, str) for v in labels)):
            if num_classes == 1000 and all(re.fullmatch(r"n\d{8}", v) for v in labels):
                break                   # WordNet ids: ImageNet's readable names instead
            return tuple(labels)
    if num_classes == 1000:
        return imagenet.categories()
    return tuple(str(i) for i in range(num_classes))


@dataclass(frozen=True)
class HubWeights(Weights):
    """Weights from a timm repo on the Hugging Face Hub; what ``model.weights`` holds.

    A :class:`~numres.hub.registry.Weights`, so builders treat it the same way: with
    ``num_classes`` other than the repo's, the backbone is loaded and ``fc`` initialised.

    Attributes:
        repo_id, revision: where the files are.
        config: the repo's ``config.json``; ``pretrained_cfg`` its preprocessing.
        labels: class names (see :attr:`categories`).
        config_arch: the architecture ``config.json`` names (``arch`` is the builder's).
    """

    repo_id: str = ""
    revision: str = "main"
    config: dict = field(default=None, compare=False, repr=False)
    pretrained_cfg: dict = field(default=None, compare=False, repr=False)
    labels: tuple = field(default=(), compare=False, repr=False)
    config_arch: str = ""

    @property
    def url(self):
        return resolve_url(self.repo_id, self.file_name, self.revision)

    @property
    def sha256_prefix(self):
        return None             # checked against the Hub's X-Linked-Etag instead

    @property
    def categories(self):
        return self.labels

    @property
    def meta(self):
        return {"categories": list(self.labels), "min_size": (1, 1), "recipe": self.recipe,
                "hf_hub_id": self.repo_id, "revision": self.revision,
                "architecture": self.config_arch, "pretrained_cfg": dict(self.pretrained_cfg)}

    def transforms(self, use_test_size=False):
        """timm's evaluation preprocessing for these weights (see
        :meth:`~numres.transforms.ImageClassification.from_timm_config`).

        Raises:
            ValueError: a preprocessing numres does not reproduce (non-square input...).
        """
        return ImageClassification.from_timm_config(self.pretrained_cfg, use_test_size)


def hub_weights(arch, spec):
    """The :class:`HubWeights` for ``spec``, to be loaded into builder ``arch``; fetches (or
    finds in the cache) the repo's ``config.json``.

    Raises:
        ValueError: a malformed spec. DownloadError, CheckpointError: as :func:`load_config`.
    """
    repo_id, revision = parse_spec(spec)
    config, pretrained_cfg, num_classes = load_config(repo_id, revision)
    try:
        preset = ImageClassification.from_timm_config(pretrained_cfg)
        crop_size, resize_size = preset.crop_size, preset.resize_size
    except ValueError:           # transforms() will say why when asked for
        crop_size, resize_size = 224, None
    tag = f"hf-hub:{repo_id}" + ("" if revision == "main" else f"@{revision}")
    return HubWeights(
        arch=arch, tag=tag, file_name=WEIGHT_NAMES[0], acc1=None, acc5=None, num_params=None,
        gflops=None, file_size_mb=None, resize_size=resize_size,
        recipe=f"{endpoint()}/{repo_id}", crop_size=crop_size, repo_id=repo_id,
        revision=revision, config=config, pretrained_cfg=pretrained_cfg,
        labels=_categories(config, pretrained_cfg, num_classes),
        config_arch=config["architecture"])


def weights_file(repo_id, revision="main", progress=True):
    """``model.safetensors`` of a repo, else its ``pytorch_model.bin``: ``(path, name)``.

    Raises:
        DownloadError: neither exists (or, offline, neither is cached), or fetching failed.
    """
    for name in WEIGHT_NAMES:           # the cache first, for every name
        path = _cached(repo_id, name, revision)
        if path is not None:
            return path, name
    missing = []
    for name in WEIGHT_NAMES:
        try:
            return hub_file(repo_id, name, revision, progress), name
        except _MissingFile as exc:
            missing.append(str(exc))
    raise DownloadError(f"hf-hub:{repo_id}: no weights file ({' or '.join(WEIGHT_NAMES)}) "
                        f"could be found: " + " | ".join(missing))


def load_state_dict(weights, progress=True, check=None):
    """Fetch and read the weights of a :class:`HubWeights`, checked against its builder.

    Args:
        weights: from :func:`hub_weights`.
        progress: progress bar on stderr while downloading (terminals only).
        check: ``state_dict -> list of problems`` (the builder's architecture check,
            ``numres.models.builders.architecture_problems``); None: no check.

    Returns:
        dict name -> array (views of the cached file where possible).

    Raises:
        DownloadError: as :func:`weights_file`.
        CheckpointError: the file is damaged, or ``check`` found problems (each is listed,
            and the message names the repo and what its config.json says).
    """
    path, name = weights_file(weights.repo_id, weights.revision, progress)
    url = resolve_url(weights.repo_id, name, weights.revision)
    try:
        state_dict = read_checkpoint(path).state_dict
    except CheckpointError as exc:
        raise CheckpointError(f"hf-hub:{weights.repo_id} ({url}): {exc}") from None
    problems = check(state_dict) if check is not None else []
    if problems:
        said = (f"config.json: architecture {weights.config_arch!r}, "
                f"num_classes {len(weights.labels)}")
        raise CheckpointError(f"hf-hub:{weights.repo_id} ({said}) does not fit numres's "
                              f"{weights.arch}; {url}: " + " | ".join(problems))
    return state_dict


def repo_architecture(spec):
    """What a repo's ``config.json`` says it holds: ``(repo_id, architecture, num_classes)``.

    Raises:
        ValueError: a malformed spec. DownloadError, CheckpointError: as :func:`load_config`.
    """
    repo_id, revision = parse_spec(spec)
    config, _, num_classes = load_config(repo_id, revision)
    return repo_id, config["architecture"], num_classes
