"""A fresh machine's first calls: NumPy stands in while a child process compiles the kernels.

Numba compiles numres's kernels the first time they run on a machine (~20 s on 2 CPUs) and
keeps them in its on-disk cache; later processes load them in well under a second. A fresh
container, CI job or serverless function meets the compile on its first call. Instead, the
first :class:`~.backend.NumbaBackend` of a process that finds the cache empty starts
``python -m numres.backends.numba.background`` (this module: :func:`~.backend.warmup` at low
priority, one at a time per machine by a file lock), and until that child has finished,
models on the Numba backend run their calls on the NumPy backend (:meth:`stand_in`): same
results to float32 rounding, a few times slower, and no compiling in the caller's process.
The first call after the child has finished loads the compiled kernels from the cache and
runs on Numba, as every later one does.

``NUMRES_BACKGROUND_COMPILE=0`` compiles in the process at the first call instead;
``numres warmup`` (run while building an image, say) fills the cache ahead, and then none of
this happens.
"""

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings

try:
    import fcntl
except ImportError:             # Windows: no lock, at worst two children compile at once
    fcntl = None

_lock = threading.Lock()
_child = None          # the running compilation (a _Compilation), or None
_started = False       # one child per process at most (a failed one is not retried)
_here = 0              # warmup() running in this process: it must not start a child


class _Compilation:
    """The child process compiling the kernels, and what it printed (for a failure)."""

    def __init__(self):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))))
        # The child imports the same numres as this process, wherever it came from (its
        # folder first on the path, and the working directory), and starts no child itself.
        env = dict(os.environ, NUMRES_BACKGROUND_COMPILE="0")
        if not _installed(root):      # a checkout: its folder first (not site-packages,
            env["PYTHONPATH"] = os.pathsep.join(      # which would go before the stdlib)
                p for p in (root, env.get("PYTHONPATH")) if p)
        self.log = tempfile.TemporaryFile()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "numres.backends.numba.background"], env=env, cwd=root,
                stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        except BaseException:
            self.log.close()
            raise
        self.pid = os.getpid()

    def finished(self):
        """Whether the child has ended (successfully or not); a failure is warned once. In
        a process forked from the one that started it: whether the compile lock is free."""
        if os.getpid() != self.pid:
            # Not this process's child: over once it no longer holds the machine's lock
            # (then either the kernels are cached, or this process compiles them).
            return not _compile_running()
        code = self.process.poll()
        if code is None:
            return False
        if code != 0:
            self.log.seek(0)
            tail = self.log.read()[-2000:].decode("utf-8", "replace").strip()
            warnings.warn(f"numres: compiling the CPU kernels in the background failed (exit "
                          f"status {code}); they compile in this process instead:\n{tail}",
                          RuntimeWarning, stacklevel=3)
        self.log.close()
        return True


def _installed(root):
    """Whether ``root`` (numres's parent folder) is a site-packages folder."""
    import site
    folders = list(getattr(site, "getsitepackages", lambda: [])())
    folders.append(getattr(site, "getusersitepackages", lambda: "")())
    return any(f and os.path.abspath(f) == root for f in folders)


def _lock_path():
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"numres-compile-{uid}.lock")


def _compile_running():
    """Whether some process holds the machine's compile lock now."""
    if fcntl is None:
        return False
    try:
        with open(_lock_path(), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    return False


def enabled():
    """Whether a fresh machine's kernels compile in the background
    (``NUMRES_BACKGROUND_COMPILE``, default on; never in a frozen application, whose
    executable is not a Python that could run the child)."""
    return (os.environ.get("NUMRES_BACKGROUND_COMPILE", "1") != "0" and not _here
            and not getattr(sys, "frozen", False) and bool(sys.executable))


@contextlib.contextmanager
def compiling_here():
    """While :func:`~.backend.warmup` compiles in this process: no child is started."""
    global _here
    with _lock:
        _here += 1
    try:
        yield
    finally:
        with _lock:
            _here -= 1


def start():
    """Start compiling in a child process (once per process). Returns False when none
    runs (it could not be started, or one already ended): the caller compiles here."""
    global _child, _started
    with _lock:
        if _child is None:
            if _started:
                return False
            _started = True
            try:
                _child = _Compilation()
            except OSError as exc:
                warnings.warn(f"numres: could not start compiling the CPU kernels in the "
                              f"background ({exc}); they compile in this process instead",
                              RuntimeWarning, stacklevel=3)
                return False
            sys.stderr.write("numres: compiling the CPU kernels for this machine in the "
                             "background (once; cached); calls run on NumPy until then. "
                             "'numres warmup' does it ahead.\n")
        return True


def stand_in():
    """The NumPy backend while the child compiles, else None (and the child is forgotten)."""
    global _child
    child = _child
    if child is None:
        return None
    with _lock:
        if _child is not None and _child.finished():
            _child = None
        if _child is None:
            return None
    from .. import get_backend
    return get_backend("numpy")


def wait(timeout=None):
    """Wait for a running background compilation (tests, and scripts that want Numba's speed
    from the next call on). Returns True when none is left running."""
    child = _child
    if child is None:
        return True
    if os.getpid() != child.pid:          # a forked process: not its child to wait for
        end = None if timeout is None else time.monotonic() + timeout
        while stand_in() is not None:
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(0.1)
        return True
    try:
        child.process.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    stand_in()
    return True


def _compile():
    """The child: low priority, one compiler per machine at a time, then every kernel."""
    try:
        os.nice(10)             # the parent's calls (on NumPy meanwhile) come first
    except (OSError, AttributeError):       # not allowed, or Windows
        pass
    with open(_lock_path(), "a") as lock:
        if fcntl is not None:
            # Another process compiling now: wait, then find (nearly) everything cached.
            fcntl.flock(lock, fcntl.LOCK_EX)
        from .backend import warmup
        warmup()


def _after_fork():
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


if __name__ == "__main__":
    _compile()
