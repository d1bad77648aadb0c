"""The benchmarks run end to end (tiny configurations): ``numres bench`` (numres alone) and
``benchmarks/bench.py`` (beside torch and ONNX Runtime)."""

import json
import os
import subprocess
import sys

from numres import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--models", "resnet18", "--batches", "1", "--sizes", "32", "--rounds", "2",
        "--warmup", "0", "--min-time", "0"]


def test_bench_numres_only(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", *TINY, "--layers", "3", "--backends", "numpy", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| numres-numpy |" in text and "torch" not in text
    assert "slowest numres-numpy ops" in text and " CHW" in text
    data = json.loads(out.read_text())
    (result,) = data["results"]
    row = result["rows"][0]
    assert row["contender"] == "numres-numpy" and row["img_s"] > 0
    assert len(result["layers"]) == 3 and data["environment"]["sgemm_peak_gflops"][0] > 0


def test_bench_memory_child_reports_a_peak(tmp_path):
    import numres
    ckpt = tmp_path / "r18.pth"
    numres.save_pth(numres.resnet18(backend="numpy").state_dict(), ckpt)
    from numres import bench
    got = bench.measure_memory([sys.executable, "-m", "numres.bench"], "numres-numpy",
                               "resnet18", 1, 32, str(ckpt))
    assert got["peak_mib"] > 0


def test_bench_beside_torch(tv, tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), *TINY,
                           "--layers", "2", "--backends", "numba", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| torch-nchw |" in done.stdout and "| torch-cl |" in done.stdout
    assert "| numres-numba |" in done.stdout and "HWC" in done.stdout
    (result,) = json.loads(out.read_text())["results"]
    assert result["rows"][0]["vs_torch"] > 0
