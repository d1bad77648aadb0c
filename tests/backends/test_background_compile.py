"""A fresh machine's first calls (``backends/numba/background.py``): NumPy answers while a
child process compiles the kernels into an empty Numba cache, then Numba takes over."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba", reason="Numba is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One model, before and after the kernels are ready; what ran where, and how far from NumPy.
SCRIPT = r"""
import json, sys
import numpy as np
import numres
from numres.backends.numba import background, gemm
if sys.argv[1] == "fail":
    sys.executable = "/bin/false"      # the child cannot start Python: it fails at once
model = numres.resnet18(num_classes=10, backend="numba")
ref = numres.resnet18(num_classes=10, backend="numpy")
ref.load_state_dict(model.state_dict())
x = np.random.default_rng(0).standard_normal((2, 3, 64, 48)).astype(np.float32)
expected = ref(x)
out = {"first_out": float(np.abs(model(x) - expected).max()),
       "first_ran_on": model.active_backend.name,
       # Numba loaded or compiled nothing in this process for the first call:
       "loaded_before": len(gemm.conv_pixels.signatures)}
out["waited"] = background.wait(1200)
out["then_out"] = float(np.abs(model(x) - expected).max())
out["then_ran_on"] = model.active_backend.name
out["loaded_after"] = len(gemm.conv_pixels.signatures)
print(json.dumps(out))
"""


def _run(cache, mode="ok"):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), NUMRES_BACKGROUND_COMPILE="1",
               PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.slow
def test_numpy_answers_while_the_kernels_compile_then_numba_takes_over(tmp_path):
    cache = tmp_path / "numba-cache"
    got, err = _run(cache)
    assert "compiling the CPU kernels for this machine in the background" in err
    assert got["first_ran_on"] == "numpy" and got["loaded_before"] == 0
    assert got["first_out"] < 1e-3
    assert got["waited"] and got["then_ran_on"] == "numba" and got["loaded_after"] >= 1
    assert got["then_out"] < 1e-3
    assert any(name.endswith(".nbi") for _, _, files in os.walk(cache) for name in files)
    # The next process finds the kernels cached: Numba from the first call, no notice.
    again, err = _run(cache)
    assert again["first_ran_on"] == "numba" and again["first_out"] < 1e-3
    assert "compiling" not in err


@pytest.mark.slow
def test_numres_warmup_fills_the_cache_itself_and_says_so_for_later_processes(tmp_path):
    cache = tmp_path / "numba-cache"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), NUMRES_BACKGROUND_COMPILE="1",
               PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "numres", "warmup"], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "background" not in proc.stderr           # it compiled here, no child
    assert any(name.startswith("numres-warm-") for _, _, files in os.walk(cache)
               for name in files)
    got, err = _run(cache)
    assert got["first_ran_on"] == "numba" and "compiling" not in err


@pytest.mark.slow
def test_a_failed_background_compile_is_reported_and_the_process_compiles(tmp_path):
    got, err = _run(tmp_path / "numba-cache", "fail")
    assert "compiling the CPU kernels in the background failed (exit status 1)" in err
    assert got["waited"] and got["then_ran_on"] == "numba" and got["then_out"] < 1e-3


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_a_forked_process_sees_a_compile_by_the_machine_lock(tmp_path, monkeypatch):
    """A process forked from the one that started the child cannot wait for it: it asks
    whether anyone holds the compile lock (the child holds it while it compiles)."""
    import fcntl

    from numres.backends.numba import background
    lock_path = tmp_path / "numres-compile.lock"
    monkeypatch.setattr(background, "_lock_path", lambda: str(lock_path))
    assert not background._compile_running()
    with open(lock_path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert background._compile_running()
    assert not background._compile_running()
