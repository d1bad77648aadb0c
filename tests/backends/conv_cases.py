"""Convolution cases and reference helpers shared by the backend tests.

Kept apart from ``test_ops.py`` (which skips as a whole where Numba is missing) so that the
CUDA tests collect on any machine.
"""

import threading

import numpy as np


def calls_from_two_threads_differ(model, inputs, rounds):
    """Call ``model`` on ``inputs[0]`` and ``inputs[1]`` from two threads at once, ``rounds``
    times each; return the indices whose output ever differed from a call made alone (a
    model's reused buffers must not leak between threads). A call that raised re-raises."""
    expected = [model(x) for x in inputs]
    errors, raised = [], []

    def worker(i):
        try:
            for _ in range(rounds):
                if not np.array_equal(model(inputs[i]), expected[i]):
                    errors.append(i)
        except Exception as exc:    # a thread's exception would otherwise vanish
            raised.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if raised:
        raise raised[0]
    return errors


def run_conv(backend, x, w, b, stride, padding, groups, relu=False, residual=None):
    """Run one convolution on ``backend`` with NCHW arrays in and out."""
    conv = backend.prepare_conv(w, b, stride, padding, groups)
    act = backend.from_nchw(x)
    res = None if residual is None else backend.from_nchw(residual)
    out = backend.conv2d(act, conv, relu=relu, residual=res)
    return backend.to_numpy(backend.to_nchw(out))


def reference_conv(x, w, b, stride, padding, groups):
    """Direct convolution by definition, float64: independent of every backend."""
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding,) * 2, (padding,) * 2))
    oh, ow = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    y = np.zeros((n, o, oh, ow))
    og = o // groups
    for g in range(groups):
        for i in range(k):
            for j in range(k):
                patch = xp[:, g * cg:(g + 1) * cg, i:i + stride * oh:stride,
                           j:j + stride * ow:stride]            # (N, Cg, oh, ow)
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch,
                                                       w[g * og:(g + 1) * og, :, i, j])
    return y + (0 if b is None else b[None, :, None, None])


def case_id(case):
    return "n{}c{}h{}w{}o{}k{}s{}p{}g{}".format(*case)


CONV_CASES = [
    # (n, c, h, w, o, k, stride, padding, groups)
    (1, 3, 23, 19, 8, 7, 2, 3, 1),     # stem-like, odd size
    (2, 3, 2, 3, 8, 7, 2, 3, 1),       # stem on an image smaller than its kernel
    (2, 5, 6, 13, 70, 3, 1, 1, 1),     # few channels, stride 1, a partial weight panel
    (2, 16, 9, 11, 12, 3, 1, 1, 1),    # 3x3 stride 1, partial tiles
    (1, 16, 12, 12, 24, 3, 2, 1, 1),   # 3x3 stride 2
    (3, 32, 7, 7, 16, 1, 1, 0, 1),     # 1x1
    (1, 32, 9, 9, 64, 1, 2, 0, 1),     # strided 1x1 (downsample)
    (2, 32, 8, 10, 32, 3, 1, 1, 8),    # grouped (ResNeXt)
    (1, 64, 5, 6, 64, 3, 2, 1, 32),    # grouped, strided
    (2, 64, 6, 31, 64, 3, 1, 1, 4),    # 16 per group, a ragged row
    (2, 32, 5, 9, 32, 3, 2, 1, 4),     # 8 per group, strided
    (1, 24, 6, 6, 24, 3, 1, 1, 6),     # 4 per group, channels not a multiple of a vector
    (1, 16, 7, 8, 16, 3, 1, 1, 16),    # depthwise (1 per group)
    (1, 48, 7, 9, 48, 3, 1, 1, 2),     # 24 per group
    (1, 8, 1, 1, 8, 3, 1, 1, 1),       # 1x1 image through a 3x3
    (2, 32, 28, 28, 48, 3, 2, 1, 1),   # 3x3 stride 2, a partial weight panel
    (1, 16, 14, 14, 32, 3, 1, 1, 1),   # 3x3 stride 1
    (2, 32, 28, 27, 40, 1, 2, 0, 1),   # strided 1x1, odd width
    (1, 64, 7, 7, 48, 3, 1, 1, 1),     # 49 pixels, partial panel
    (1, 256, 28, 28, 272, 3, 2, 1, 1),  # few tiles, 2.6 MB of weights
    (1, 64, 9, 10, 64, 3, 2, 1, 4),    # 16 per group, strided
    (1, 48, 5, 7, 48, 3, 1, 1, 12),    # 4 per group, 48 channels: 3 vectors, 1.5 of pairs
    (1, 33, 7, 9, 20, 3, 1, 1, 1),     # an odd number of channels (no bf16 pairs)
    (1, 36, 6, 6, 36, 3, 1, 1, 4),     # 9 per group (no bf16 pairs)
    (1, 64, 7, 7, 64, 3, 1, 1, 2),     # 32 per group, 7x7: whole 7-row grouped tiles
    (2, 64, 14, 14, 64, 3, 2, 1, 4),   # 16 per group, strided to 7x7, with residual rows
    (2, 64, 6, 17, 64, 3, 1, 1, 2),    # 32 per group (wide tiles), a ragged row
    (1, 512, 6, 9, 512, 3, 2, 1, 32),  # 16 per group, row stride 1024 (a constant-stride body)
    (2, 1024, 3, 7, 1024, 3, 1, 1, 32),  # 32 per group, wide 7-row tiles, row stride 1024
]
