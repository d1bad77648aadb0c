"""Files in, answers out: a streaming image pipeline that never loses work to one bad file.

Decoding and preprocessing run on a small pool of threads (Pillow's decoders and NumPy's
array work release the GIL), a bounded number of images ahead of the model, so reading files
overlaps with the network and memory stays flat whatever the number of files. Results come
out in input order. A file that cannot be read becomes a :class:`Failure` in its place
(``on_error="skip"``, the default) or stops the run (``on_error="fail"``).

:func:`write_arrays` stores the rows as they come, in a memory-mapped ``.npy`` beside two
lists (good files, skipped files with reasons), so a killed run can be resumed where it
stopped and ends with the same files an uninterrupted run writes.

Example:
    >>> model = numres.resnet50(weights="DEFAULT")
    >>> for r in numres.pipeline.iter_results(model, ["a.jpg", "broken.jpg"], output="features"):
    ...     print(r.path, r.value.shape if r.ok else r.reason)
    a.jpg (2048,)
    broken.jpg cannot identify image file 'broken.jpg'
"""

import collections
import concurrent.futures
import json
import os
import shutil
import struct
from dataclasses import dataclass

import numpy as np

from .backends import available_cores
from .progress import ProgressBar
from .transforms import ImageClassification

OUTPUTS = ("logits", "features")


class ImageError(ValueError):
    """A file that is not an image numres can read; the message names the file and why."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class Result:
    """One image's output row (``value``: logits or features, float32)."""

    index: int
    path: str
    value: np.ndarray
    ok = True


@dataclass(frozen=True)
class Failure:
    """A file that could not be read, in its place in the input order."""

    index: int
    path: str
    reason: str
    ok = False


def default_decode_threads(cores=None):
    """Decode threads for a machine of ``cores``: a quarter of them, at least two."""
    cores = cores or available_cores()
    return max(2, cores // 4)


def split_threads(cores=None, decode_threads=None, compute_threads=None):
    """``(decode threads, compute threads)`` for a machine of ``cores``.

    The compute threads default to every core, not to the cores the decode threads leave:
    decoding a photo takes a few milliseconds and its threads mostly wait for the model, while
    a model on fewer threads is slower all the time (whole ``numres features`` commands:
    README's "Command line"; ``benchmarks/end_to_end.py`` measures the defaults beside
    torch)."""
    cores = cores or available_cores()
    return decode_threads or default_decode_threads(cores), compute_threads or cores


def read_image(path, draft_size=None):
    """Decode ``path`` to an (H, W, 3) uint8 RGB array, as torchvision's ``pil_loader`` does.

    Every mode Pillow reads is converted with ``Image.convert("RGB")`` (greyscale repeated,
    palette expanded, alpha dropped, CMYK converted, 16-bit greyscale clipped at 255), and the
    EXIF orientation is not applied: torchvision's ``ImageFolder``/``pil_loader`` do neither.

    Args:
        path: the image file.
        draft_size: for JPEGs, let the decoder scale down by 1/2, 1/4 or 1/8 while keeping
            both sides at least this long (``Image.draft``): much faster for photos far larger
            than the model's input, and no longer identical to the exact path.

    Raises:
        ImageError: unreadable, truncated, empty, not an image, or too large for Pillow's
            decompression-bomb limit; the message says which.
        ImportError: Pillow is missing.
    """
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("decoding image files needs Pillow: pip install numres[image]") \
            from None
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageError(path, "file is empty (0 bytes)")
        with Image.open(path) as img:
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            return np.asarray(img.convert("RGB"))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"image too large ({exc})") from None
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, MemoryError,
            struct.error, ZeroDivisionError, KeyError, TypeError) as exc:
        # Pillow's plugins raise all of these for damaged files (SyntaxError from parsers).
        raise ImageError(path, str(exc) or type(exc).__name__) from None


def iter_results(model, paths, *, output="logits", batch_size=16, transform=None,
                 decode_threads=None, on_error="skip", draft=False):
    """Run image files through ``model``, yielding one :class:`Result` or :class:`Failure`
    per file, in input order, as batches complete.

    Args:
        model: a numres model (its backend's threads do the compute; see
            :func:`split_threads` for why they stay on every core).
        paths: image file paths (any iterable; read lazily).
        output: ``"logits"`` or ``"features"`` (pooled, before ``fc``).
        batch_size: images per forward pass.
        transform: preprocessing of an (H, W, 3) uint8 array; default the model's weights'
            (torchvision's evaluation preset), else ImageNet's V1 preset.
        decode_threads: threads decoding ahead of the model (default
            :func:`default_decode_threads`).
        on_error: ``"skip"`` (a Failure in the file's place) or ``"fail"`` (raise
            :class:`ImageError` at the first bad file).
        draft: decode large JPEGs at a reduced size first (see :func:`read_image`).

    Yields:
        :class:`Result` (``.value``: (num_classes,) or (num_features,) float32) or
        :class:`Failure`, each with ``index`` and ``path``.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if transform is None:
        weights = getattr(model, "weights", None)
        transform = weights.transforms() if weights is not None else ImageClassification()
    draft_size = getattr(transform, "resize_size", None) if draft else None
    threads = decode_threads or default_decode_threads()
    run = model.features if output == "features" else model
    # Enough decoded images ahead to fill the next batch while this one computes, and no more:
    # memory stays at about two batches of images.
    ahead = 2 * batch_size + threads
    pending = collections.deque()      # futures, in input order
    batch = []                         # (index, path, array or Failure) awaiting the model
    files = iter(enumerate(paths))
    with concurrent.futures.ThreadPoolExecutor(threads, "numres-decode") as pool:
        try:
            while True:
                while len(pending) < ahead:
                    item = next(files, None)
                    if item is None:
                        break
                    index, path = item
                    pending.append((index, os.fspath(path), pool.submit(
                        _prepare, os.fspath(path), transform, draft_size)))
                if not pending:
                    break
                index, path, future = pending.popleft()
                try:
                    batch.append((index, path, future.result()))
                except ImageError as exc:
                    if on_error == "fail":
                        raise
                    batch.append((index, path, Failure(index, path, exc.reason)))
                if sum(1 for _, _, x in batch if not isinstance(x, Failure)) == batch_size:
                    yield from _flush(run, batch)
                    batch = []
            yield from _flush(run, batch)
        finally:
            for _, _, future in pending:
                future.cancel()


def _prepare(path, transform, draft_size):
    image = read_image(path, draft_size)
    try:
        return transform(image)
    except (ValueError, TypeError) as exc:
        raise ImageError(path, f"cannot preprocess: {exc}") from None


def _flush(run, batch):
    good = [x for _, _, x in batch if not isinstance(x, Failure)]
    rows = iter(run(np.stack(good)) if good else ())
    for index, path, item in batch:
        yield item if isinstance(item, Failure) else Result(index, path, next(rows))


def write_arrays(model, paths, out, *, output="features", resume=False, progress=True,
                 observe=None, **options):
    """Run image files through ``model`` and write the rows to ``out`` (a ``.npy``, or a
    ``.zarr`` array with zarr installed) as they come, with ``<out>.files.txt`` (the good
    files, one per line, in row order) and ``<out>.errors.txt`` (skipped files:
    ``path<TAB>reason``).

    While running, everything goes to ``<out>.partial*`` files; they are renamed into place
    when the run ends. A killed run leaves them behind, and ``resume=True`` continues from
    them (the input must list the same files in the same order), computing only what is not
    done yet: the final files equal an uninterrupted run's.

    Args:
        model: a numres model.
        paths: image file paths, in the order the rows should have.
        out: the ``.npy`` (or ``.zarr``) path.
        output: ``"features"`` (default) or ``"logits"``.
        resume: continue a killed run of the same command instead of starting over.
        progress: a progress bar with img/s and ETA on stderr, when it is a terminal.
        observe: a function from the stream of results to the same stream (to report
            skipped files as they come, say).
        **options: for :func:`iter_results` (batch_size, decode_threads, on_error, draft,
            transform).

    Returns:
        ``(rows written, files skipped)``.

    Raises:
        ImageError: ``on_error="fail"`` and a file could not be read (nothing is renamed into
            place; ``resume=True`` continues after the file is fixed).
        ValueError: ``resume=True`` but the input differs from the killed run's.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("no image files given")
    out = os.fspath(out)
    names = output_names(out)
    width = model.num_features if output == "features" else model.fc.params["weight"].shape[0]
    state = _Partial(names, len(paths), width, resume)
    done = state.done
    if not state.is_prefix_of(paths):
        state.close()
        raise ValueError(f"cannot resume {out}: the input's first {done} files differ from "
                         f"those the killed run processed ({names['partial_log']}); run "
                         "without --resume to start over")
    bar = image_progress(len(paths), done, enabled=progress)
    try:
        results = iter_results(model, paths[done:], output=output, **options)
        if observe is not None:
            results = observe(results)
        for chunk in _chunks(results, options.get("batch_size", 16)):
            state.append(chunk)
            bar.update(state.done)
    finally:
        bar.close()
        state.close()
    return state.finish()


def output_names(out):
    """The files :func:`write_arrays` writes for ``out``, and its partial files."""
    stem = out
    for suffix in (".npy", ".zarr"):
        if out.endswith(suffix):
            stem = out[:-len(suffix)]
    return {"out": out, "files": stem + ".files.txt", "errors": stem + ".errors.txt",
            "partial": out + ".partial", "partial_log": out + ".partial.log",
            "partial_files": stem + ".files.txt.partial",
            "partial_errors": stem + ".errors.txt.partial"}


def _chunks(results, size):
    chunk = []
    for item in results:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Partial:
    """A run in progress: rows in a memory-mapped ``.npy`` (or zarr array) sized for every
    input and trimmed at the end, and one log of the processed files, a JSON line each in
    input order (``{"path": ...}`` or ``{"path": ..., "error": ...}``), appended after the
    rows it vouches for are flushed. One log rather than the two lists, so that a kill can
    never leave them disagreeing; JSON, so that any path or reason fits on its line."""

    def __init__(self, names, total, width, resume):
        self.names, self.total, self.width = names, total, width
        store = _ZarrRows if names["out"].endswith(".zarr") else _NpyRows
        log = names["partial_log"]
        if resume and os.path.exists(names["partial"]) and os.path.exists(log):
            self.entries = _read_log(log)               # cuts an unfinished last line off
            # rows stored so far: kept as a counter, not recounted per batch (a million files)
            self.written = sum(1 for _, error in self.entries if error is None)
            # A kill inside finish() may have trimmed the rows already.
            rows = (total, self.written) if len(self.entries) == total else (total,)
            self.rows = store.open(names["partial"], rows, width)
        else:
            self.rows = store.create(names["partial"], total, width)
            self.entries, self.written = [], 0
            open(log, "w").close()
        self.log = open(log, "a", encoding="utf-8")

    def is_prefix_of(self, paths):
        """Whether the killed run processed the first files of ``paths``, in this order."""
        return [path for path, _ in self.entries] == paths[:len(self.entries)]

    @property
    def done(self):
        return len(self.entries)

    @property
    def good(self):
        return [path for path, error in self.entries if error is None]

    @property
    def bad(self):
        return [(path, error) for path, error in self.entries if error is not None]

    def append(self, chunk):
        row = self.written
        for item in chunk:
            if item.ok:
                self.rows[row] = item.value
                row += 1
        self.rows.flush()                  # rows on disk before the log says they are done
        entries = [(item.path, None if item.ok else item.reason) for item in chunk]
        self.log.write("".join(_log_line(path, error) for path, error in entries))
        self.log.flush()
        os.fsync(self.log.fileno())
        self.entries += entries
        self.written = row

    def close(self):
        if not self.log.closed:
            self.log.close()

    def finish(self):
        """Trim the rows to the good files; write the lists; rename everything into place.

        The order keeps a kill anywhere recoverable: the lists are written under temporary
        names first, the old lists go before the new array arrives (never a new array beside
        old lists), and ``--resume`` after a kill between the trim and the renames finishes
        the job."""
        if self.done != self.total:
            return len(self.good), len(self.bad)      # stopped early: stays partial
        names, good, bad = self.names, self.good, self.bad
        with open(names["partial_files"], "w", encoding="utf-8") as f:
            f.writelines(f"{path}\n" for path in good)
        with open(names["partial_errors"], "w", encoding="utf-8") as f:
            f.writelines(f"{path}\t{_one_line(reason)}\n" for path, reason in bad)
        self.rows.trim(len(good))
        self.rows = None
        for old in (names["files"], names["errors"]):
            if os.path.exists(old):
                os.remove(old)
        if os.path.isdir(names["out"]):               # a zarr store from an earlier run
            shutil.rmtree(names["out"])
        os.replace(names["partial"], names["out"])
        os.replace(names["partial_files"], names["files"])
        os.replace(names["partial_errors"], names["errors"])
        os.remove(names["partial_log"])
        return len(good), len(bad)


def _log_line(path, error):
    entry = {"path": path} if error is None else {"path": path, "error": error}
    return json.dumps(entry, ensure_ascii=False) + "\n"


def _read_log(path):
    """The complete lines of a log a killed run may have left mid-line; the file is cut
    back to them, so that appending continues cleanly."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    entries = []
    for line in data[:end].decode("utf-8").splitlines():
        entry = json.loads(line)
        entries.append((entry["path"], entry.get("error")))
    return entries


def _one_line(text):
    """A reason fit for one tab-separated line."""
    return " ".join(str(text).split())


class _NpyRows:
    """Rows in a memory-mapped ``.npy`` with one row per input; trimmed at the end by
    rewriting the header (same length) and truncating the file."""

    def __init__(self, path, array):
        self.path, self.array = path, array

    @classmethod
    def create(cls, path, total, width):
        return cls(path, np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                                   shape=(total, width)))

    @classmethod
    def open(cls, path, rows, width):
        array = np.load(path, mmap_mode="r+")
        _check_resumable(path, array.shape, array.dtype, rows, width)
        return cls(path, array)

    def __setitem__(self, index, value):
        self.array[index] = value

    def flush(self):
        self.array.flush()

    def trim(self, rows):
        width = self.array.shape[1]
        del self.array                               # unmap before rewriting the header
        _trim_npy(self.path, rows, width)


class _ZarrRows:
    """Rows in a zarr array (``pip install zarr``): written a chunk of rows at a time, resized
    to the good rows at the end."""

    CHUNK_ROWS = 1024

    def __init__(self, array):
        self.array, self.pending = array, {}

    @classmethod
    def create(cls, path, total, width):
        zarr = _zarr()
        array = zarr.open_array(path, mode="w", shape=(total, width), dtype="float32",
                                chunks=(min(total, cls.CHUNK_ROWS), width))
        return cls(array)

    @classmethod
    def open(cls, path, rows, width):
        array = _zarr().open_array(path, mode="r+")
        _check_resumable(path, array.shape, array.dtype, rows, width)
        return cls(array)

    def __setitem__(self, index, value):
        self.pending[index] = value

    def flush(self):
        if self.pending:
            first, last = min(self.pending), max(self.pending)
            block = np.stack([self.pending[i] for i in range(first, last + 1)])
            self.array[first:last + 1] = block        # (rows, width), one write
            self.pending = {}

    def trim(self, rows):
        self.flush()
        self.array.resize((rows, self.array.shape[1]))


def _zarr():
    try:
        import zarr
    except ImportError:
        raise ImportError("writing .zarr output needs zarr: pip install numres[zarr]") \
            from None
    return zarr


def _check_resumable(path, shape, dtype, rows, width):
    """``rows``: the row counts the killed run can have left (all inputs, or the good ones
    once trimmed)."""
    if tuple(shape) not in {(n, width) for n in rows} or np.dtype(dtype) != np.float32:
        raise ValueError(f"cannot resume: {path} holds {tuple(shape)} {dtype}, this run needs "
                         f"({rows[0]}, {width}) float32")


def _trim_npy(path, rows, width):
    """Rewrite the ``.npy`` header for ``rows`` rows (same header length) and truncate."""
    with open(path, "r+b") as f:
        version = np.lib.format.read_magic(f)
        header_len = _header_length(f, version)
        text = repr({"descr": "<f4", "fortran_order": False, "shape": (rows, width)})
        body = header_len - (8 + (2 if version == (1, 0) else 4))
        line = text.ljust(body - 1).encode("latin-1") + b"\n"
        if len(line) != body:
            raise RuntimeError(f"{path}: header does not fit the space of the old one")
        f.seek(8 + (2 if version == (1, 0) else 4))
        f.write(line)
        f.truncate(header_len + rows * width * 4)


def _header_length(f, version):
    f.seek(8)
    size = 2 if version == (1, 0) else 4
    n = int.from_bytes(f.read(size), "little")
    return 8 + size + n


def image_progress(total, done=0, enabled=True):
    """The progress bar of a run over image files: img/s and ETA on stderr when it is a
    terminal (tqdm's when installed)."""
    return ProgressBar(total, done, unit="images", rate_unit="img/s", eta=True,
                       tqdm_unit="img", enabled=enabled and total > 0)
