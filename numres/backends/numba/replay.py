"""Recorded forward passes: the Python around the kernels, paid once per input shape.

At batch 1 a layer's kernels take well under a millisecond, and the Python that prepares
them (shapes, the path to take, a workspace buffer) is a sizeable fraction of that: run
right after a kernel has streamed megabytes through the caches, that Python runs from cold
caches, and the other threads wait meanwhile. So the first pass for an input shape records every
operation as ``(function, arguments)``; later passes of that shape call the functions
again, in order, on the same buffers, and skip the rest.

Recording must not change what the workspace does: its pool reuses a buffer once nothing
refers to it, and a recording that held the layers' buffers would keep the pool from
reusing them within the pass (more memory). So while recording, a workspace buffer is noted
by a weak reference to the memory it lies in, its offset and shape; when the pass ends the
notes become arrays again, which from then on keep that memory for the plan (the pool sees
it as taken and never hands it to anyone else).
"""

import threading
import weakref

import numpy as np

from .._base import copy_tree


class NotReplayable(Exception):
    """An argument the plan could not hold on to (a strided view of a workspace buffer)."""


class _Input:
    """Stands for the pass's input array in a recorded step."""


_INPUT = _Input()


class _Buffer:
    """A recorded workspace array: where it lies in which pool buffer, without a reference."""

    __slots__ = ("owner", "offset", "shape", "dtype")

    def __init__(self, array, owner):
        if not array.flags.c_contiguous:
            raise NotReplayable(f"strided workspace view of shape {array.shape}")
        self.owner = weakref.ref(owner)
        self.offset = array.ctypes.data - owner.ctypes.data
        self.shape = array.shape
        self.dtype = array.dtype

    def resolve(self):
        owner = self.owner()
        if owner is None:        # a one-off allocation the pool did not keep: gone
            raise NotReplayable("a workspace buffer did not outlive the pass")
        nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        return owner[self.offset:self.offset + nbytes].view(self.dtype).reshape(self.shape)


class Recorder:
    """The steps of one pass being recorded (see :meth:`portable`)."""

    def __init__(self, x, pool_owners):
        self.input = x
        self.steps = []
        self.inside = False          # a step running now: its own calls are not steps
        self._pool_owners = pool_owners

    def portable(self, arg):
        """``arg`` as the plan keeps it: the input as a marker, workspace arrays as
        :class:`_Buffer` notes, tuples element by element, anything else as it is."""
        if arg is self.input:
            return _INPUT
        if isinstance(arg, np.ndarray):
            owner = arg.base
            if owner is not None and id(owner) in self._pool_owners():
                return _Buffer(arg, owner)
            return arg
        if isinstance(arg, tuple):
            return _same_tuple(arg, [self.portable(a) for a in arg])
        return arg

    def add(self, fn, args):
        self.steps.append((fn, tuple(self.portable(a) for a in args)))


def _same_tuple(like, items):
    """``items`` as a tuple of ``like``'s type (a namedtuple such as ``kernels.Epilogue``
    stays one: the kernels are compiled for it)."""
    return type(like)(*items) if hasattr(like, "_fields") else tuple(items)


def _resolve(arg):
    if isinstance(arg, _Buffer):
        return arg.resolve()
    if isinstance(arg, tuple):
        return _same_tuple(arg, [_resolve(a) for a in arg])
    if isinstance(arg, dict):
        return {k: _resolve(v) for k, v in arg.items()}
    return arg


class Plan:
    """A recorded pass, replayed by one thread at a time (others run eagerly)."""

    def __init__(self, recorder, output):
        self.steps = []
        for fn, args in recorder.steps:
            args = _resolve(args)
            inputs = tuple(i for i, a in enumerate(args) if a is _INPUT)
            self.steps.append((fn, args, inputs))
        self.output = _resolve(output)
        self.lock = threading.Lock()

    def replay(self, x):
        """Run the pass on ``x`` (same shape as recorded); copies of the outputs."""
        for fn, args, inputs in self.steps:
            if inputs:
                args = tuple(x if i in inputs else a for i, a in enumerate(args))
            fn(*args)
        return copy_tree(self.output)


def portable_output(recorder, out):
    """The pass's result (an array or a dict of them) noted like step arguments."""
    if isinstance(out, dict):
        return {k: recorder.portable(v) for k, v in out.items()}
    return recorder.portable(out)
