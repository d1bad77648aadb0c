"""The streaming pipeline: files in, results out, in order, whatever the files hold."""

import os
import signal
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest

import numres
from numres import pipeline
from numres.pipeline import ImageError, iter_results, read_image, write_arrays

Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (image decoding)")


def photo(rng, h=60, w=80):
    """A smooth image (JPEG-friendly), not noise."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 3, y * 4, (x + y) * 2], axis=-1) % 256
    return np.clip(base + rng.integers(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Good images of every common kind, and the broken files users have."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    good = {}
    for i in range(5):
        Image.fromarray(photo(rng)).save(root / f"{i}.jpg", quality=92)
        good[f"{i}.jpg"] = True
    jpeg = (root / "1.jpg").read_bytes()
    (root / "1b_truncated.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (root / "2b_empty.jpg").write_bytes(b"")
    (root / "2c_text.png").write_text("not an image at all")
    (root / "3b_garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "3c_folder.jpg").mkdir()
    return root


def listing(root):
    return sorted(str(p) for p in root.iterdir())


@pytest.fixture(scope="module")
def model():
    return numres.resnet18(num_classes=7, backend="numpy")


def direct(model, paths, output="logits"):
    """The same files without the pipeline: decode, preprocess, one batch."""
    x = np.stack([numres.transforms.ImageClassification()(read_image(p)) for p in paths])
    return model.features(x) if output == "features" else model(x)


def test_results_in_order_with_failures_in_place(folder, model):
    paths = listing(folder)
    got = list(iter_results(model, paths, batch_size=2, decode_threads=2))
    assert [r.path for r in got] == paths and [r.index for r in got] == list(range(len(paths)))
    reasons = {os.path.basename(r.path): r.reason for r in got if not r.ok}
    assert set(reasons) == {"1b_truncated.jpg", "2b_empty.jpg", "2c_text.png",
                            "3b_garbage.png", "3c_folder.jpg"}
    assert "truncated" in reasons["1b_truncated.jpg"]
    assert "empty" in reasons["2b_empty.jpg"]
    assert "cannot identify" in reasons["2c_text.png"]
    assert "directory" in reasons["3c_folder.jpg"]
    good = [r for r in got if r.ok]
    expected = direct(model, [r.path for r in good])
    np.testing.assert_allclose(np.stack([r.value for r in good]), expected, rtol=1e-5,
                               atol=1e-5)
    assert all(r.value.dtype == np.float32 and r.value.shape == (7,) for r in good)


def test_on_error_fail_stops_at_the_first_bad_file(folder, model):
    with pytest.raises(ImageError, match="1b_truncated.jpg: image file is truncated"):
        list(iter_results(model, listing(folder), on_error="fail"))


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="output must be"):
        list(iter_results(model, [], output="probs"))
    with pytest.raises(ValueError, match="on_error"):
        list(iter_results(model, [], on_error="ignore"))


def write_image(path, array, mode=None, **save):
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(path, **save)


@pytest.mark.parametrize("kind", ["grey", "cmyk-jpeg", "palette-png", "rgba-png", "la-png",
                                  "16bit-png", "webp", "tiff", "bmp", "gif"])
def test_real_world_images_decode_as_torchvision_loads_them(tmp_path, kind):
    """torchvision's ImageFolder loader is ``Image.open(f).convert("RGB")``: numres equals it
    for every mode Pillow reads."""
    rng = np.random.default_rng(1)
    rgb = photo(rng, 30, 40)
    path = tmp_path / {"grey": "g.png", "cmyk-jpeg": "c.jpg", "palette-png": "p.png",
                       "rgba-png": "a.png", "la-png": "la.png", "16bit-png": "d.png",
                       "webp": "w.webp", "tiff": "t.tiff", "bmp": "b.bmp", "gif": "g.gif"}[kind]
    if kind == "grey":
        write_image(path, rgb, "L")
    elif kind == "cmyk-jpeg":
        write_image(path, rgb, "CMYK", quality=95)
    elif kind == "palette-png":
        write_image(path, rgb, "P")
    elif kind == "rgba-png":
        write_image(path, np.dstack([rgb, rng.integers(0, 255, (30, 40), np.uint8)]))
    elif kind == "la-png":
        write_image(path, rgb, "LA")
    elif kind == "16bit-png":
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(path)
    elif kind == "webp":
        pytest.importorskip("PIL.WebPImagePlugin", reason="Pillow built without WebP")
        write_image(path, rgb, lossless=True)
    else:
        write_image(path, rgb)
    with Image.open(path) as img:
        expected = np.asarray(img.convert("RGB"))
    got = read_image(path)
    assert got.dtype == np.uint8 and got.shape == (30, 40, 3)
    np.testing.assert_array_equal(got, expected)


def test_exif_orientation_is_not_applied_as_in_torchvision(tmp_path):
    rgb = photo(np.random.default_rng(2), 20, 50)
    exif = Image.Exif()
    exif[0x0112] = 6                                      # "rotate 90 CW to display"
    Image.fromarray(rgb).save(tmp_path / "r.jpg", exif=exif, quality=95)
    got = read_image(tmp_path / "r.jpg")
    assert got.shape == (20, 50, 3)                      # stored orientation, not rotated


def test_decompression_bomb_is_skipped_not_fatal(tmp_path, model, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2x this raises in Pillow
    write_image(tmp_path / "big.png", photo(np.random.default_rng(3), 60, 80))
    [result] = iter_results(model, [tmp_path / "big.png"])
    assert not result.ok and "too large" in result.reason


def test_draft_decoding_is_close_to_exact(tmp_path):
    """Reduced-size JPEG decoding (opt-in): the DCT-scaled image resized to the same target."""
    rgb = photo(np.random.default_rng(4), 1200, 1600)
    Image.fromarray(rgb).save(tmp_path / "big.jpg", quality=90)
    exact = numres.transforms.ImageClassification()(read_image(tmp_path / "big.jpg"))
    drafted_image = read_image(tmp_path / "big.jpg", draft_size=256)
    assert min(drafted_image.shape[:2]) >= 256 and drafted_image.shape[0] < 1200
    drafted = numres.transforms.ImageClassification()(drafted_image)
    # In normalised units (std ~0.22 per 1/255 step ~0.017): close, not equal.
    assert not np.array_equal(exact, drafted)
    assert np.abs(exact - drafted).mean() < 0.05


def test_memory_stays_bounded(tmp_path):
    """At most about two batches of decoded images exist at once, however many files."""
    rgb = photo(np.random.default_rng(5), 24, 24)
    paths = []
    for i in range(60):
        write_image(tmp_path / f"{i}.png", rgb)
        paths.append(tmp_path / f"{i}.png")
    alive, peak, lock = [0], [0], threading.Lock()

    def released():
        with lock:
            alive[0] -= 1

    class Tracked(np.ndarray):
        pass

    def transform(image):
        out = np.zeros((3, 8, 8), np.float32).view(Tracked)
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        weakref.finalize(out, released)
        return out

    class Slow:
        weights = None

        def __call__(self, x):
            time.sleep(0.01)                       # the model is the slow part
            return x.reshape(len(x), -1)[:, :2].copy()

    results = iter_results(Slow(), paths, batch_size=4, decode_threads=2,
                           transform=transform)
    assert sum(1 for r in results if r.ok) == 60
    assert peak[0] <= 2 * 4 + 2 + 4, peak[0]


def read_outputs(out):
    names = pipeline.output_names(str(out))
    with open(names["files"]) as f:
        files = f.read()
    with open(names["errors"]) as f:
        errors = f.read()
    return out.read_bytes(), files, errors


def test_write_arrays_lists_good_and_bad_files(folder, model, tmp_path):
    out = tmp_path / "feats.npy"
    rows, skipped = write_arrays(model, listing(folder), out, batch_size=3)
    assert (rows, skipped) == (5, 5)
    data, files, errors = read_outputs(out)
    feats = np.load(out)
    assert feats.shape == (5, 512) and feats.dtype == np.float32
    good = [p for p in listing(folder) if p.endswith(tuple(f"{i}.jpg" for i in range(5)))]
    assert files.splitlines() == good
    assert [line.split("\t")[0] for line in errors.splitlines()] == \
        [p for p in listing(folder) if p not in good]
    np.testing.assert_allclose(feats, direct(model, good, "features"), rtol=1e-5, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["feats.errors.txt", "feats.files.txt", "feats.npy"]


def interrupted_after(count):
    """An ``observe`` hook that lets ``count`` results through, then interrupts the run (as
    Ctrl-C would)."""
    def observe(results):
        for i, item in enumerate(results):
            if i == count:
                raise KeyboardInterrupt
            yield item
    return observe


def test_resume_after_an_interruption_equals_an_uninterrupted_run(folder, model, tmp_path):
    paths = listing(folder)
    write_arrays(model, paths, tmp_path / "whole.npy", batch_size=2)
    out = tmp_path / "part.npy"
    with pytest.raises(KeyboardInterrupt):
        write_arrays(model, paths, out, batch_size=2, observe=interrupted_after(4))
    assert not out.exists() and (tmp_path / "part.npy.partial").exists()
    computed = []

    def record(results):
        for item in results:
            computed.append(item.path)
            yield item

    write_arrays(model, paths, out, batch_size=2, resume=True, observe=record)
    assert computed == paths[len(paths) - len(computed):] and len(computed) < len(paths)
    whole = read_outputs(tmp_path / "whole.npy")
    part = read_outputs(out)
    assert part[1:] == whole[1:]
    np.testing.assert_array_equal(np.load(out), np.load(tmp_path / "whole.npy"))
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path))


def test_kill_inside_finish_resumes(folder, model, tmp_path, monkeypatch):
    """A kill after the rows were trimmed but before anything was renamed: --resume ends the
    job with the files an uninterrupted run writes."""
    paths = listing(folder)
    write_arrays(model, paths, tmp_path / "whole.npy", batch_size=2)
    real_replace = os.replace

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_arrays(model, paths, tmp_path / "f.npy", batch_size=2)
    monkeypatch.setattr(pipeline.os, "replace", real_replace)
    assert np.load(tmp_path / "f.npy.partial").shape == (5, 512)        # already trimmed
    computed = []

    def record(results):
        for item in results:
            computed.append(item.path)
            yield item

    write_arrays(model, paths, tmp_path / "f.npy", batch_size=2, resume=True, observe=record)
    assert computed == []
    assert read_outputs(tmp_path / "f.npy")[1:] == read_outputs(tmp_path / "whole.npy")[1:]
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), np.load(tmp_path / "whole.npy"))


def test_a_log_line_cut_by_a_kill_is_computed_again(folder, model, tmp_path):
    paths = listing(folder)
    write_arrays(model, paths, tmp_path / "whole.npy", batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        write_arrays(model, paths, tmp_path / "f.npy", batch_size=2,
                     observe=interrupted_after(4))
    log = tmp_path / "f.npy.partial.log"
    with open(log, "a") as f:
        f.write('{"path": "' + paths[4][:10])              # the kill hit mid-line
    write_arrays(model, paths, tmp_path / "f.npy", batch_size=2, resume=True)
    assert read_outputs(tmp_path / "f.npy")[1:] == read_outputs(tmp_path / "whole.npy")[1:]
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), np.load(tmp_path / "whole.npy"))


def test_paths_and_reasons_with_tabs_and_newlines(model, tmp_path):
    odd = tmp_path / "a\tb.png"
    odd.write_bytes(b"not an image\twith\ttabs")
    write_arrays(model, [str(odd)], tmp_path / "o.npy")
    [line] = (tmp_path / "o.errors.txt").read_text().splitlines()
    path, reason = line.rsplit("\t", 1)             # the reason is one tab-free field
    assert path == str(odd) and "cannot identify" in reason
    assert pipeline._one_line("broken\tstream\nat byte 7") == "broken stream at byte 7"


def test_resume_refuses_another_input(folder, model, tmp_path):
    paths = listing(folder)
    with pytest.raises(KeyboardInterrupt):
        write_arrays(model, paths, tmp_path / "f.npy", batch_size=1,
                     observe=interrupted_after(3))
    with pytest.raises(ValueError, match="cannot resume .* differ"):
        write_arrays(model, paths[::-1], tmp_path / "f.npy", resume=True)


def run_cli(*args, check_rc=0):
    done = subprocess.run([sys.executable, "-m", "numres", *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == check_rc, done.stderr
    return done


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("ckpt") / "r18.pth"
    numres.save_pth(model.state_dict(), path)
    return path


def test_cli_features_skips_bad_files(folder, checkpoint, tmp_path):
    out = tmp_path / "f.npy"
    done = run_cli("features", str(folder), "--out", str(out), "--weights", str(checkpoint),
                   "--arch", "resnet18", "--backend", "numpy", "--batch-size", "2")
    # (the folder named 3c_folder.jpg is walked into, not read as a file)
    lines = done.stderr.strip().splitlines()
    assert sum("numres: skipped" in line for line in lines) == 4
    assert lines[-1] == "numres: 5 images, 4 skipped"
    assert np.load(out).shape == (5, 512)
    assert len((tmp_path / "f.errors.txt").read_text().splitlines()) == 4
    failed = run_cli("features", str(folder), "--out", str(tmp_path / "g.npy"), "--weights",
                     str(checkpoint), "--arch", "resnet18", "--backend", "numpy",
                     "--on-error", "fail", check_rc=1)
    assert failed.stderr.strip().splitlines()[-1].startswith("numres: error: ")
    assert "1b_truncated.jpg" in failed.stderr and not (tmp_path / "g.npy").exists()


def test_cli_predict_json_reports_errors(folder, checkpoint):
    import json
    done = run_cli("predict", str(folder), "--json", "--weights", str(checkpoint),
                   "--arch", "resnet18", "--backend", "numpy")
    entries = json.loads(done.stdout)
    assert [e["file"] for e in entries] == numres.predict.find_images([folder])
    assert sum("error" in e for e in entries) == 4 and sum("top" in e for e in entries) == 5


def test_cli_resume_after_sigkill(tmp_path, checkpoint):
    """A run killed by SIGKILL (no cleanup at all) resumes to the files a whole run writes."""
    rng = np.random.default_rng(6)
    for i in range(40):
        write_image(tmp_path / f"img{i:02d}.png", photo(rng, 40, 40))
    common = [str(tmp_path / "img*.png"), "--weights", str(checkpoint), "--arch", "resnet18",
              "--backend", "numpy", "--batch-size", "2"]
    run_cli("features", "--out", str(tmp_path / "whole.npy"), *common)
    partial_list = tmp_path / "killed.npy.partial.log"
    proc = subprocess.Popen([sys.executable, "-m", "numres", "features", "--out",
                             str(tmp_path / "killed.npy"), *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if partial_list.exists() and len(partial_list.read_text().splitlines()) >= 6:
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed; make it longer")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    done_before = len(partial_list.read_text().splitlines())
    assert 6 <= done_before < 40
    run_cli("features", "--out", str(tmp_path / "killed.npy"), "--resume", *common)
    assert read_outputs(tmp_path / "killed.npy") == read_outputs(tmp_path / "whole.npy")


def test_progress_bar_shows_rate_and_eta(capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    monkeypatch.setitem(sys.modules, "tqdm", None)        # the built-in bar
    bar = pipeline.image_progress(10, 0)
    bar.update(10)
    bar.close()
    err = capsys.readouterr().err
    assert "10/10 images" in err and "img/s" in err and "ETA" in err
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    quiet = pipeline.image_progress(10, 0)                 # not a terminal: nothing
    quiet.update(5)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_zarr_output_equals_npy_and_resumes(folder, model, tmp_path):
    zarr = pytest.importorskip("zarr", reason="zarr is not installed (zarr output)")
    paths = listing(folder)
    write_arrays(model, paths, tmp_path / "n.npy", batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        write_arrays(model, paths, tmp_path / "z.zarr", batch_size=2,
                     observe=interrupted_after(5))
    assert (tmp_path / "z.zarr.partial").is_dir()
    write_arrays(model, paths, tmp_path / "z.zarr", batch_size=2, resume=True)
    stored = zarr.open_array(str(tmp_path / "z.zarr"), mode="r")
    np.testing.assert_array_equal(stored[:], np.load(tmp_path / "n.npy"))
    for kind in ("files", "errors"):
        assert (tmp_path / f"z.{kind}.txt").read_text() == \
            (tmp_path / f"n.{kind}.txt").read_text()
    assert not any(name.endswith(".partial") for name in os.listdir(tmp_path))
