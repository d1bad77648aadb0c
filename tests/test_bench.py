"""The benchmark harness runs end to end (tiny configuration) and writes its JSON."""

import json

from numres import cli


def test_bench_numres_only(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--no-torch", "--models", "resnet18", "--batches", "1",
                   "--sizes", "32", "--rounds", "2", "--warmup", "0", "--min-time", "0",
                   "--layers", "3", "--backends", "numpy", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| numres-numpy |" in text and "torch | unavailable" in text
    data = json.loads(out.read_text())
    (result,) = data["results"]
    row = result["rows"][0]
    assert row["contender"] == "numres-numpy" and row["img_s"] > 0 and row["vs_torch"] is None
    assert len(result["layers"]) == 3 and data["environment"]["sgemm_peak_gflops"][0] > 0


def test_bench_with_torch(tv, tmp_path, capsys):
    rc = cli.main(["bench", "--models", "resnet18", "--batches", "1", "--sizes", "32",
                   "--rounds", "1", "--warmup", "0", "--min-time", "0", "--layers", "0",
                   "--backends", "numpy"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| torch-nchw |" in text and "| torch-cl |" in text
