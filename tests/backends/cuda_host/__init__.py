"""numres's CUDA kernels compiled for the CPU and launched over their grid, from Python.

The program text is the one the CuPy backend hands to NVRTC (``kernels.program_source()``,
byte for byte) with the same preprocessor options; ``shim.h`` is force-included ahead of it
and a launcher per kernel is appended after it. A launcher takes what ``cuLaunchKernel``
takes: the grid, the block and ``void **args`` (one pointer per kernel parameter), sets the
host's ``gridDim``/``blockDim``, then calls the kernel once per (block, thread) with
``blockIdx``/``threadIdx`` set, in order. So a kernel computes on the CPU exactly what its text
says, one thread after another.

Launchers are generated from the explicit instantiations at the end of each ``.cu`` file
(``template __global__ void name<args>(parameter types);``): those are the names NVRTC looks
up, and their parameter types say how many bytes each argument takes.

Compiled libraries are cached in the temporary folder under a hash of everything that goes
into them (text, shim, options, compiler), so a session compiles each build once (~1 s).
"""

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

SHIM = Path(__file__).with_name("shim.h")
_INSTANTIATION = re.compile(
    r"template\s+__global__\s+void\s+(\w+)\s*<([^>]*)>\s*\(([^)]*)\)\s*;", re.S)
#: Bytes of each scalar parameter type the kernels use (pointers are 8).
SCALAR_TYPES = {"int": np.int32, "unsigned": np.uint32, "float": np.float32,
                "index_t": np.int64, "long long": np.int64}
_lock = threading.Lock()


class Unavailable(RuntimeError):
    """No host compiler (or no ``cuda_fp16.h`` for the half build): the reason, for a skip."""


class Param:
    """One kernel parameter: its C type, whether it is a pointer (and to const), its size."""

    def __init__(self, ctype):
        self.ctype = " ".join(ctype.split())
        self.pointer = self.ctype.endswith("*")
        self.const = self.pointer and self.ctype.startswith("const ")
        if self.pointer:
            self.size, self.scalar = 8, None
        elif self.ctype in SCALAR_TYPES:
            self.scalar = np.dtype(SCALAR_TYPES[self.ctype])
            self.size = self.scalar.itemsize
        else:
            raise ValueError(f"kernel parameter type {ctype!r} is not emulated")

    def __repr__(self):
        return self.ctype


def instantiations(text):
    """``{"name<args>": [Param, ...]}`` for every explicit kernel instantiation in ``text``."""
    found = {}
    for name, targs, params in _INSTANTIATION.findall(text):
        expr = f"{name}<{', '.join(a.strip() for a in targs.split(','))}>"
        found[expr] = [Param(p) for p in params.split(",") if p.strip()]
    return found


def compiler():
    """The host C++ compiler (``$CXX`` or g++).

    Raises:
        Unavailable: none is installed.
    """
    cxx = shutil.which(os.environ.get("CXX") or "g++")
    if not cxx:
        raise Unavailable("no host C++ compiler (g++, or $CXX) to emulate the CUDA kernels: "
                          f"{os.environ.get('CXX') or 'g++'} is not installed")
    return cxx


def _candidate_include_dirs():
    """Folders that may hold ``cuda_fp16.h``: a CUDA toolkit's, then the pip wheels' (the
    ``nvidia-cuda-runtime`` wheel has it, but it also needs ``crt/host_defines.h`` from
    ``nvidia-cuda-crt`` and ``nv/target`` from ``nvidia-cuda-cccl``)."""
    toolkits = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH")
                if os.environ.get(v)] + [Path("/usr/local/cuda/include")]
    wheels = []
    for site in sys.path:
        nvidia = Path(site) / "nvidia"
        if nvidia.is_dir():
            for include in sorted(nvidia.glob("*/include")):
                wheels += [include] + ([include / "cccl"] if (include / "cccl").is_dir() else [])
    return [[d] for d in toolkits if (d / "cuda_fp16.h").is_file()], wheels


@functools.lru_cache(maxsize=1)
def fp16_include_dirs():
    """Include folders under which the host compiler builds ``cuda_fp16.h``.

    Raises:
        Unavailable: no set of folders works (the message says what was tried).
    """
    cxx = compiler()
    toolkits, wheels = _candidate_include_dirs()
    tried = toolkits + ([wheels] if wheels else [])
    probe = "#include <cuda_fp16.h>\nfloat f(__half h) { return __half2float(h); }\n"
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text(probe)
        for dirs in tried:
            done = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", str(src)]
                                  + [f"-I{d}" for d in dirs], capture_output=True, text=True)
            if done.returncode == 0:
                return tuple(str(d) for d in dirs)
            errors.append(f"{[str(d) for d in dirs]}: {done.stderr.strip().splitlines()[-1:]}")
    raise Unavailable("cuda_fp16.h does not compile for the host (needed by the __half "
                      f"kernels); tried {errors or 'no folder holding it'}")


def _launcher(index, expr, params):
    """C++ source of ``numres_launch_<index>``: the grid loop around one instantiation."""
    args = ", ".join(f"*({p.ctype}*)args[{i}]" for i, p in enumerate(params))
    return f"""
extern "C" void numres_launch_{index}(const unsigned* grid, const unsigned* block,
                                      unsigned long long first, unsigned long long count,
                                      void** args) {{
    gridDim = {{grid[0], grid[1], grid[2]}};
    blockDim = {{block[0], block[1], block[2]}};
    for (unsigned long long bx = first; bx < first + count; ++bx)
        for (unsigned by = 0; by < grid[1]; ++by)
            for (unsigned bz = 0; bz < grid[2]; ++bz) {{
                blockIdx = {{(unsigned)bx, by, bz}};
                for (unsigned tz = 0; tz < block[2]; ++tz)
                    for (unsigned ty = 0; ty < block[1]; ++ty)
                        for (unsigned tx = 0; tx < block[0]; ++tx) {{
                            threadIdx = {{tx, ty, tz}};
                            {expr}({args});
                        }}
            }}
}}
"""


class HostProgram:
    """A program text compiled for the CPU, its kernels launchable by name expression.

    Args:
        text: the CUDA C++ program (``kernels.program_source()``).
        options: options as given to NVRTC: ``-D``, ``-U`` and ``-I`` are used; a build
            without ``-DNUMRES_NO_HALF`` needs ``cuda_fp16.h``.

    Raises:
        Unavailable: no compiler, or no usable ``cuda_fp16.h`` for a half build.
        RuntimeError: the compiler rejected the program (its output in the message).
    """

    def __init__(self, text, options=()):
        self.text = text
        # -D/-U/-I as NVRTC takes them; the rest (-std=, -arch=) is NVRTC's business
        defines = tuple(o for o in options if o.startswith(("-D", "-U", "-I")))
        half = "-DNUMRES_NO_HALF" not in defines
        includes = fp16_include_dirs() if half else ()
        cxx = compiler()
        flags = ["-std=c++17", "-O2", "-fPIC", "-fno-strict-aliasing", "-include", str(SHIM),
                 *defines, *(f"-I{d}" for d in includes)]
        # The kernels this build has: the text's instantiations that survive preprocessing
        # (the __half ones are inside #ifndef NUMRES_NO_HALF).
        signatures = instantiations(text)
        kept = _preprocessed_names(cxx, tuple(flags), text)
        self.signatures = {e: p for e, p in signatures.items() if "".join(e.split()) in kept}
        self.names = sorted(self.signatures)
        launchers = "".join(_launcher(i, expr, self.signatures[expr])
                            for i, expr in enumerate(self.names))
        source = text + "\n// ---- host launchers (tests/backends/cuda_host)\n" + launchers
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256("\0".join([source, SHIM.read_text(), " ".join(flags), cxx,
                                        version]).encode()).hexdigest()[:24]
        self.library_path = _compile(cxx, flags + ["-shared"], source, key)
        self._lib = ctypes.CDLL(str(self.library_path))
        self._entries = {}
        for i, expr in enumerate(self.names):
            fn = getattr(self._lib, f"numres_launch_{i}")
            fn.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                           ctypes.c_ulonglong, ctypes.c_ulonglong,
                           ctypes.POINTER(ctypes.c_void_p)]
            fn.restype = None
            self._entries[expr] = fn

    def kernel(self, expr):
        """The kernel ``expr`` (e.g. ``"im2col_nhwc<float, 4>"``).

        Raises:
            KeyError: no such instantiation in the text.
        """
        if expr not in self._entries:
            raise KeyError(f"{expr!r} is not instantiated in the program (have {self.names})")
        return HostKernel(expr, self.signatures[expr], self._entries[expr])


class HostKernel:
    """One kernel of a :class:`HostProgram`: ``launch`` takes CUDA's arguments, ``__call__``
    takes NumPy arrays and Python numbers for the tests."""

    def __init__(self, expr, params, entry):
        self.expr, self.params, self._entry = expr, params, entry

    def launch(self, grid, block, packed, first_block=0, blocks=None):
        """Run the kernel as ``cuLaunchKernel(grid, block, args)`` would.

        Args:
            grid, block: up to 3 dimensions each.
            packed: one ``bytes`` per parameter, of the parameter's size: its value as the
                device would receive it (a pointer's address, an ``int``'s 4 bytes, ...).
            first_block, blocks: run only x-blocks ``first_block .. first_block + blocks - 1``
                of the grid (``gridDim`` stays the whole grid): a spot check of a grid too
                large to run.

        Raises:
            ValueError: wrong number or size of arguments.
        """
        if len(packed) != len(self.params):
            raise ValueError(f"{self.expr} takes {len(self.params)} arguments, "
                             f"got {len(packed)}")
        for i, (param, value) in enumerate(zip(self.params, packed)):
            if len(value) != param.size:
                raise ValueError(f"argument {i} of {self.expr} ({param}) takes {param.size} "
                                 f"bytes, got {len(value)}")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        buffers = [ctypes.create_string_buffer(bytes(v), len(v)) for v in packed]
        argv = (ctypes.c_void_p * len(buffers))(*(ctypes.addressof(b) for b in buffers))
        count = grid[0] - first_block if blocks is None else blocks
        if first_block < 0 or count < 0 or first_block + count > grid[0]:
            raise ValueError(f"blocks {first_block}..{first_block + count} outside the grid")
        self._entry((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), first_block,
                    count, argv)

    def __call__(self, grid, block, *args, first_block=0, blocks=None):
        """Launch with NumPy arrays (their data pointer) or an address (``int``) for pointer
        parameters, and Python numbers for the others (converted to the declared type)."""
        if len(args) != len(self.params):
            raise ValueError(f"{self.expr} takes {len(self.params)} arguments, got {len(args)}")
        self.launch(grid, block, [self.pack(p, a) for p, a in zip(self.params, args)],
                    first_block=first_block, blocks=blocks)

    @staticmethod
    def pack(param, value):
        """``value`` as the bytes the kernel receives for ``param``."""
        if param.pointer:
            if value is None:
                return bytes(8)
            address = value if isinstance(value, int) else value.__array_interface__["data"][0]
            return int(address).to_bytes(8, "little")
        return np.asarray(value, param.scalar).tobytes()


@functools.lru_cache(maxsize=None)
def _preprocessed_names(cxx, flags, text):
    """Every ``name<args>`` explicitly instantiated in ``text`` once preprocessed with
    ``flags`` (shim included, so ``__global__`` is gone), whitespace removed."""
    done = subprocess.run([cxx, *flags, "-E", "-P", "-x", "c++", "-"], input=text,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the host preprocessor rejected the kernels:\n{done.stderr}")
    flat = "".join(done.stdout.split())
    return frozenset(m.group(1) for m in re.finditer(r"templatevoid(\w+<[^>]*>)\(", flat))


def cache_dir():
    """Where compiled programs are kept (per user, under the temporary folder)."""
    folder = Path(tempfile.gettempdir()) / f"numres-cuda-host-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _compile(cxx, flags, source, key):
    target = cache_dir() / f"{key}.so"
    with _lock:
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            src = Path(tmp) / "program.cpp"
            src.write_text(source)
            out = Path(tmp) / "program.so"
            done = subprocess.run([cxx, *flags, "-x", "c++", str(src), "-o", str(out)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"the host compiler rejected the kernels:\n{done.stderr}")
            os.replace(out, target)    # atomic: another process may be compiling the same
    return target


@functools.lru_cache(maxsize=None)
def program(ctype):
    """numres's kernel program built for the host, for element type ``ctype`` (``"float"``
    or ``"__half"``), with the options the backend compiles it with.

    Raises:
        Unavailable: see :class:`HostProgram`.
    """
    from numres.backends.cupy import kernels
    return HostProgram(kernels.program_source(), kernels.compile_options(ctype))
