"""From logits to labels."""

import numpy as np
import pytest

import numres
from numres.predict import find_images


def test_decode_imagenet_and_custom():
    logits = np.zeros((2, 1000), np.float32)
    logits[0, 281], logits[0, 282] = 5.0, 4.0       # tabby, tiger cat
    logits[1, 0] = 9.0
    top = numres.decode(logits, k=2)
    assert [lab for lab, _, _ in top[0]] == ["tabby", "tiger cat"]
    p = numres.softmax(logits)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    assert top[0][0][1] == pytest.approx(float(p[0, 281])) and top[0][0][2] == 281
    assert numres.decode(np.array([[0.0, 2.0, 1.0]]), k=5)[0][0][:1] == ("class 1",)
    assert numres.decode(np.array([[0.0, 2.0]]), categories=["cat", "dog"])[0][0][0] == "dog"
    with pytest.raises(ValueError, match="2 category names for 3 classes"):
        numres.decode(np.zeros((1, 3)), categories=["a", "b"])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        numres.decode(np.zeros(3))


def test_softmax_is_stable():
    p = numres.softmax(np.array([[1000.0, 0.0, -1000.0]]))
    assert np.isfinite(p).all() and p[0, 0] == pytest.approx(1.0)


def test_find_images(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    for name in ["d/b.JPG", "d/a.png", "d/e/c.webp", "d/skip.txt", "x.png"]:
        (tmp_path / name).write_bytes(b"")
    found = find_images([tmp_path / "d", str(tmp_path / "*.png")])
    assert [p.split("/")[-1] for p in found] == ["a.png", "b.JPG", "c.webp", "x.png"]
    with pytest.raises(FileNotFoundError, match="no such file or directory: .*nope"):
        find_images([tmp_path / "nope"])
