"""The cuBLASLt entry points numres calls, emulated behind real C function pointers.

Each entry point is a ``ctypes.CFUNCTYPE`` callback with the prototype of ``cublasLt.h``, so
numres binds and calls it exactly as it binds the real library (by address, through its own
prototypes): an argument numres packs wrongly arrives here wrongly, as it would on a GPU.

What is checked, after the cuBLASLt documentation (cuBLAS docs, "cuBLASLt API": the
descriptions of ``cublasLtMatmul``, ``cublasLtMatmulAlgoGetHeuristic``,
``cublasLtMatmulDescAttributes_t``, ``cublasLtMatrixLayoutAttribute_t``,
``cublasLtMatmulPreferenceAttributes_t``):

* attribute sizes must match the attribute's type (INVALID_VALUE otherwise), values must be
  known ones;
* layouts: column order, ``ld >= rows``; the operation's shapes must agree (``op(A)`` m x k,
  ``op(B)`` k x n, C and D m x n); A and B of one type, C and D of one type; the type
  combinations of the documented table for COMPUTE_32F (32F/32F/32F, 16F/16F/16F and
  16F/16F/32F) and COMPUTE_32F_FAST_TF32 (32F only); scale type 32F; C laid out as D;
* a BIAS epilogue needs its bias pointer (``m`` elements of D's type);
* ``cublasLtMatmul``: the algorithm must come from a heuristic query for the same problem;
  the workspace must be at least what it needs, in device memory; A, B, C, D aligned as the
  preference told the heuristic (256 bytes unless lowered), each within its block of device
  memory; alpha and beta are host pointers (the default pointer mode); the stream is one that
  exists. The product is enqueued on that stream like any other device work (recorded when
  the stream captures), so its buffers take part in the ordering checks.

The product is computed in float32 (NumPy's sgemm; TF32 mode rounds both inputs to 10
mantissa bits first, to nearest with ties away, as ``cvt.rna.tf32.f32`` does; the tensor
cores' own summation order is not emulated), then the epilogue, then one rounding to D's type.

``refuse_fused_epilogues`` makes the heuristic find no algorithm for any epilogue but the
default (CUBLAS_STATUS_NOT_SUPPORTED), to test numres's fallback.
"""

import ctypes
import itertools

import numpy as np

from .device import CUDARuntimeError, StandinError

SUCCESS, INVALID_VALUE, EXECUTION_FAILED, NOT_SUPPORTED = 0, 7, 13, 15
R_32F, R_16F = 0, 2
TYPES = {R_32F: np.dtype(np.float32), R_16F: np.dtype(np.float16)}
COMPUTE_32F, COMPUTE_32F_PEDANTIC, COMPUTE_32F_FAST_TF32 = 68, 69, 77
COMBINATIONS = {COMPUTE_32F: {(R_32F, R_32F), (R_16F, R_16F), (R_16F, R_32F)},
                COMPUTE_32F_PEDANTIC: {(R_32F, R_32F), (R_16F, R_16F), (R_16F, R_32F)},
                COMPUTE_32F_FAST_TF32: {(R_32F, R_32F)}}
# attribute id -> (name, size in bytes, ctypes type)
DESC_ATTRS = {0: ("compute", 4, ctypes.c_int32), 1: ("scale", 4, ctypes.c_int32),
              2: ("pointer_mode", 4, ctypes.c_int32), 3: ("transa", 4, ctypes.c_int32),
              4: ("transb", 4, ctypes.c_int32), 5: ("transc", 4, ctypes.c_int32),
              7: ("epilogue", 4, ctypes.c_uint32), 8: ("bias", 8, ctypes.c_uint64),
              10: ("bias_batch_stride", 8, ctypes.c_int64)}
LAYOUT_ATTRS = {1: ("order", 4, ctypes.c_int32), 5: ("batch_count", 4, ctypes.c_int32),
                6: ("batch_stride", 8, ctypes.c_int64)}
PREF_ATTRS = {0: ("search_mode", 4, ctypes.c_uint32), 1: ("max_workspace", 8, ctypes.c_uint64),
              5: ("align_A", 4, ctypes.c_uint32), 6: ("align_B", 4, ctypes.c_uint32),
              7: ("align_C", 4, ctypes.c_uint32), 8: ("align_D", 4, ctypes.c_uint32)}
EPILOGUES = {1: (False, False), 2: (True, False), 4: (False, True), 6: (True, True)}
ALGO_WORKSPACE = 1 << 20            # what every emulated algorithm asks for, at most


class HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspaceSize", ctypes.c_size_t),
                ("state", ctypes.c_int), ("wavesCount", ctypes.c_float),
                ("reserved", ctypes.c_int * 4)]


_P, _I, _S = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
PROTOTYPES = {        # from cublasLt.h; every handle and pointer is a void*
    "cublasLtCreate": [_P],
    "cublasLtDestroy": [_P],
    "cublasLtMatmulDescCreate": [_P, _I, _I],
    "cublasLtMatmulDescDestroy": [_P],
    "cublasLtMatmulDescSetAttribute": [_P, _I, _P, _S],
    "cublasLtMatrixLayoutCreate": [_P, _I, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64],
    "cublasLtMatrixLayoutDestroy": [_P],
    "cublasLtMatrixLayoutSetAttribute": [_P, _I, _P, _S],
    "cublasLtMatmulPreferenceCreate": [_P],
    "cublasLtMatmulPreferenceDestroy": [_P],
    "cublasLtMatmulPreferenceSetAttribute": [_P, _I, _P, _S],
    "cublasLtMatmulAlgoGetHeuristic": [_P, _P, _P, _P, _P, _P, _P, _I, _P, _P],
    "cublasLtMatmul": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _S, _P],
}


class Status(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class Library:
    """The emulated ``libcublasLt``: ``getattr(lib, "cublasLtMatmul")`` is a C function.

    Args:
        runtime: the stand-in's runtime (device memory, streams).
    """

    def __init__(self, runtime):
        self.runtime = runtime
        self.objects = {}
        self._ids = itertools.count(0x1000, 0x10)
        self.calls = []                  # one dict per cublasLtMatmul, for the tests
        self.errors = []                 # every non-success status, with its reason
        self.refuse_fused_epilogues = False
        self._functions = {}
        for name, argtypes in PROTOTYPES.items():
            impl = getattr(self, "_" + name[len("cublasLt"):])
            self._functions[name] = ctypes.CFUNCTYPE(_I, *argtypes)(self._guard(name, impl))

    def __getattr__(self, name):
        try:
            return self.__dict__["_functions"][name]
        except KeyError:
            raise AttributeError(f"{name} is not emulated") from None

    def _guard(self, name, impl):
        device = self.runtime.device

        def call(*args):
            try:
                return impl(*args)
            except Status as status:
                self.errors.append(f"{name}: {status}")
                if status.code != NOT_SUPPORTED:
                    device.violation(f"{name}: {status}")
                return status.code
            except (StandinError, CUDARuntimeError) as exc:     # recorded already
                self.errors.append(f"{name}: {exc}")
                return EXECUTION_FAILED
            except Exception as exc:  # noqa: BLE001 - a C caller cannot take an exception
                device.violation(f"{name}: {type(exc).__name__}: {exc}")
                return EXECUTION_FAILED
        return call

    # -- objects ---------------------------------------------------------------------------
    def _new(self, kind, value, out):
        if not out:
            raise Status(INVALID_VALUE, f"NULL output pointer for a {kind}")
        ident = next(self._ids)
        self.objects[ident] = (kind, value)
        ctypes.c_void_p.from_address(out).value = ident
        return SUCCESS

    def _get(self, kind, ident):
        entry = self.objects.get(ident or 0)
        if entry is None or entry[0] != kind:
            raise Status(INVALID_VALUE if kind != "handle" else 1, f"0x{ident or 0:x} is not "
                         f"a live {kind}")
        return entry[1]

    def _destroy(self, kind, ident):
        self._get(kind, ident)
        del self.objects[ident]
        return SUCCESS

    def _set(self, kind, table, ident, attr, buf, size):
        obj = self._get(kind, ident)
        if attr not in table:
            raise Status(INVALID_VALUE, f"{kind} attribute {attr} is not emulated")
        name, expected, ctype = table[attr]
        if not buf or size != expected:
            raise Status(INVALID_VALUE, f"{kind} attribute {name} takes {expected} bytes, "
                         f"got {size}")
        obj[name] = ctype.from_address(buf).value
        return SUCCESS

    def _Create(self, out):
        return self._new("handle", {}, out)

    def _Destroy(self, handle):
        return self._destroy("handle", handle)

    def _MatmulDescCreate(self, out, compute, scale):
        if compute not in COMBINATIONS or scale not in TYPES:
            raise Status(INVALID_VALUE, f"compute type {compute} / scale type {scale}")
        return self._new("desc", {"compute": compute, "scale": scale, "pointer_mode": 0,
                                  "transa": 0, "transb": 0, "transc": 0, "epilogue": 1,
                                  "bias": 0, "bias_batch_stride": 0}, out)

    def _MatmulDescDestroy(self, desc):
        return self._destroy("desc", desc)

    def _MatmulDescSetAttribute(self, desc, attr, buf, size):
        return self._set("desc", DESC_ATTRS, desc, attr, buf, size)

    def _MatrixLayoutCreate(self, out, dtype, rows, cols, ld):
        if dtype not in TYPES:
            raise Status(INVALID_VALUE, f"data type {dtype} is not emulated")
        return self._new("layout", {"type": dtype, "rows": rows, "cols": cols, "ld": ld,
                                    "order": 0, "batch_count": 1, "batch_stride": 0}, out)

    def _MatrixLayoutDestroy(self, layout):
        return self._destroy("layout", layout)

    def _MatrixLayoutSetAttribute(self, layout, attr, buf, size):
        return self._set("layout", LAYOUT_ATTRS, layout, attr, buf, size)

    def _MatmulPreferenceCreate(self, out):
        return self._new("pref", {"search_mode": 0, "max_workspace": 0, "align_A": 256,
                                  "align_B": 256, "align_C": 256, "align_D": 256}, out)

    def _MatmulPreferenceDestroy(self, pref):
        return self._destroy("pref", pref)

    def _MatmulPreferenceSetAttribute(self, pref, attr, buf, size):
        return self._set("pref", PREF_ATTRS, pref, attr, buf, size)

    # -- the operation ---------------------------------------------------------------------
    def _problem(self, desc, a, b, c, d):
        """The GEMM the descriptors describe, or INVALID_VALUE/NOT_SUPPORTED."""
        desc = self._get("desc", desc)
        a, b, c, d = (self._get("layout", x) for x in (a, b, c, d))
        for name, lay in zip("ABCD", (a, b, c, d)):
            if lay["order"] != 0 or lay["batch_count"] != 1:
                raise Status(NOT_SUPPORTED, f"{name}: only single column-major matrices "
                             "are emulated")
            if lay["rows"] < 1 or lay["cols"] < 1 or lay["ld"] < lay["rows"]:
                raise Status(INVALID_VALUE, f"{name}: {lay['rows']} x {lay['cols']} with "
                             f"ld {lay['ld']} (ld must be >= rows)")
        if desc["pointer_mode"] != 0 or desc["transc"] != 0:
            raise Status(NOT_SUPPORTED, "only host pointer mode and an untransposed C")
        m, n = d["rows"], d["cols"]
        am, ak = (a["rows"], a["cols"]) if desc["transa"] == 0 else (a["cols"], a["rows"])
        bk, bn = (b["rows"], b["cols"]) if desc["transb"] == 0 else (b["cols"], b["rows"])
        if (am, bn) != (m, n) or ak != bk:
            raise Status(INVALID_VALUE, f"shapes: op(A) {am} x {ak}, op(B) {bk} x {bn}, "
                         f"D {m} x {n}")
        if c != d:
            raise Status(INVALID_VALUE, f"C {c} is not laid out as D {d}")
        if a["type"] != b["type"] or (a["type"], d["type"]) not in COMBINATIONS[
                desc["compute"]] or desc["scale"] != R_32F:
            raise Status(NOT_SUPPORTED, f"types A {a['type']} B {b['type']} D {d['type']} "
                         f"with compute {desc['compute']}, scale {desc['scale']}")
        if desc["epilogue"] not in EPILOGUES:
            raise Status(INVALID_VALUE, f"epilogue {desc['epilogue']} is not emulated")
        relu, bias = EPILOGUES[desc["epilogue"]]
        if bias and not desc["bias"]:
            raise Status(INVALID_VALUE, "a BIAS epilogue without a bias pointer")
        return {"m": m, "n": n, "k": ak, "a": a, "b": b, "d": d, "relu": relu,
                "bias": desc["bias"] if bias else 0, "compute": desc["compute"],
                "transa": desc["transa"], "transb": desc["transb"],
                "epilogue": desc["epilogue"]}

    @staticmethod
    def _signature(problem):
        layout = lambda lay: (lay["type"], lay["rows"], lay["cols"], lay["ld"])  # noqa: E731
        return (problem["m"], problem["n"], problem["k"], layout(problem["a"]),
                layout(problem["b"]), layout(problem["d"]), problem["compute"],
                problem["epilogue"], problem["transa"], problem["transb"])

    def _MatmulAlgoGetHeuristic(self, handle, desc, a, b, c, d, pref, requested, results,
                                count):
        self._get("handle", handle)
        pref = self._get("pref", pref)
        if requested < 1 or not results or not count:
            raise Status(INVALID_VALUE, "requested count / output pointers")
        ctypes.c_int.from_address(count).value = 0
        problem = self._problem(desc, a, b, c, d)
        if self.refuse_fused_epilogues and problem["epilogue"] != 1:
            raise Status(NOT_SUPPORTED, "no algorithm (refuse_fused_epilogues)")
        algo = {"signature": self._signature(problem),
                "workspace": min(pref["max_workspace"], ALGO_WORKSPACE),
                "align": {x: pref[f"align_{x}"] for x in "ABCD"},
                "bias_align": _alignment(problem["bias"]) if problem["bias"] else 0}
        ident = next(self._ids)
        self.objects[ident] = ("algo", algo)
        result = HeuristicResult.from_address(results)
        result.algo[0] = ident
        result.workspaceSize, result.state, result.wavesCount = algo["workspace"], 0, 1.0
        ctypes.c_int.from_address(count).value = 1
        return SUCCESS

    def _Matmul(self, handle, desc, alpha, a_ptr, a, b_ptr, b, beta, c_ptr, c, d_ptr, d,
                algo, workspace, workspace_size, stream):
        rt = self.runtime
        device = rt.device
        self._get("handle", handle)
        problem = self._problem(desc, a, b, c, d)
        if not algo:
            raise Status(INVALID_VALUE, "no algorithm given (numres always passes one)")
        chosen = self._get("algo", ctypes.c_uint64.from_address(algo).value)
        if chosen["signature"] != self._signature(problem):
            raise Status(INVALID_VALUE, "the algorithm was chosen for another problem")
        if workspace_size < chosen["workspace"]:
            raise Status(INVALID_VALUE, f"workspace of {workspace_size} bytes, the algorithm "
                         f"needs {chosen['workspace']}")
        scalars = []
        for name, ptr in (("alpha", alpha), ("beta", beta)):
            if not ptr or device.find(ptr) is not None:
                raise Status(INVALID_VALUE, f"{name} must be a host pointer (pointer mode "
                             "host)")
            scalars.append(ctypes.c_float.from_address(ptr).value)
        alpha_v, beta_v = scalars
        views = {}
        accesses = []
        for name, ptr, lay in (("A", a_ptr, problem["a"]), ("B", b_ptr, problem["b"]),
                               ("C", c_ptr, problem["d"]), ("D", d_ptr, problem["d"])):
            if name == "C" and beta_v == 0:
                continue
            dtype = TYPES[lay["type"]]
            if not ptr or ptr % chosen["align"][name]:
                raise Status(INVALID_VALUE, f"{name} at 0x{ptr or 0:x} is not aligned to "
                             f"{chosen['align'][name]} bytes as the algorithm assumes")
            nbytes = ((lay["cols"] - 1) * lay["ld"] + lay["rows"]) * dtype.itemsize
            alloc = device.check_pointer(ptr, nbytes, f"cublasLtMatmul {name}")
            views[name] = _matrix(alloc, ptr, lay, dtype)
            accesses.append((ptr, "w" if name == "D" else "r"))
        bias = None
        if problem["bias"]:
            dtype = TYPES[problem["d"]["type"]]
            if problem["bias"] % max(chosen["bias_align"], dtype.itemsize):
                raise Status(INVALID_VALUE, "bias alignment differs from the heuristic's")
            alloc = device.check_pointer(problem["bias"], problem["m"] * dtype.itemsize,
                                         "cublasLtMatmul bias")
            start = problem["bias"] - alloc.ptr
            bias = alloc.buf[start:start + problem["m"] * dtype.itemsize].view(dtype)
            accesses.append((problem["bias"], "r"))
        if workspace_size:
            device.check_pointer(workspace, workspace_size, "cublasLtMatmul workspace")
            accesses.append((workspace, "w"))
        state = device.stream(stream or 0)
        tf32 = problem["compute"] == COMPUTE_32F_FAST_TF32
        relu = problem["relu"]

        def run():
            from .api import _tf32
            op_a = views["A"] if problem["transa"] == 0 else views["A"].T
            op_b = views["B"] if problem["transb"] == 0 else views["B"].T
            x, y = op_a.astype(np.float32), op_b.astype(np.float32)
            if tf32:
                x, y = _tf32(x), _tf32(y)
            out = np.float32(alpha_v) * np.matmul(x, y)
            if beta_v:
                out += np.float32(beta_v) * views["C"].astype(np.float32)
            if bias is not None:
                out += bias.astype(np.float32)[:, None]
            if relu:
                np.maximum(out, 0, out=out)
            views["D"][...] = out.astype(views["D"].dtype)

        self.calls.append({"m": problem["m"], "n": problem["n"], "k": problem["k"],
                           "dtype": TYPES[problem["a"]["type"]].name,
                           "compute": problem["compute"], "epilogue": problem["epilogue"],
                           "residual": bool(beta_v), "stream": stream or 0,
                           "capturing": state.capture is not None})
        rt.stats["cublaslt_calls"] = rt.stats.get("cublaslt_calls", 0) + 1
        device.enqueue(state, "cublasLtMatmul", run, accesses)
        return SUCCESS


def _matrix(alloc, ptr, layout, dtype):
    """The column-major (rows x cols, ld) matrix at ``ptr`` as a NumPy view of the block."""
    rows, cols, ld = layout["rows"], layout["cols"], layout["ld"]
    start = ptr - alloc.ptr
    nbytes = ((cols - 1) * ld + rows) * dtype.itemsize
    flat = alloc.buf[start:start + nbytes].view(dtype)
    return np.lib.stride_tricks.as_strided(flat, shape=(rows, cols),
                                           strides=(dtype.itemsize, ld * dtype.itemsize))


def _alignment(ptr):
    return 256 if ptr % 256 == 0 else ptr & -ptr
