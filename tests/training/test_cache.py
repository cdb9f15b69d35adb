"""`python -m training.prepare` and the prepared-slice cache: decoded once, by a process pool,
resumable, with the headers the split needs, refused in one line when it does not fit."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from ich.imaging import load_hu
from training import data, synthetic
from training.cache import CacheError, SliceCache, shard_path
from training.prepare import prepare


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Three phantom studies (7 slices each), one file truncated."""
    root = tmp_path_factory.mktemp("phantoms")
    synthetic.generate(root, studies=3, seed=21, slices=(7, 7))
    files = sorted((root / "stage_2_train").glob("*.dcm"))
    files[4].write_bytes(files[4].read_bytes()[:3000])
    return root, files[4].stem


@pytest.fixture(scope="module")
def prepared(phantoms, tmp_path_factory):
    root, _ = phantoms
    out = tmp_path_factory.mktemp("prepared") / "cache"
    proc = subprocess.run([sys.executable, "-m", "training.prepare", "--data", str(root), "--out", str(out),
                           "--input-size", "75", "--processes", "2", "--shard-size", "8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_prepare_writes_shards_manifest_headers_and_failures(phantoms, prepared):
    root, truncated = phantoms
    out, proc = prepared
    summary = json.loads(proc.stdout)
    assert summary["slices"] == 20 and summary["failed"]["reasons"] == {"truncated": 1}
    meta = json.loads((out / "cache.json").read_text())
    assert meta["complete"] and meta["shards"] == 3 and meta["images"] == 21 and meta["failed"] == 1
    assert [f.name for f in sorted((out / "shards").iterdir())] == [
        f"shard-0000{i}{ext}" for i in range(3) for ext in (".json", ".npy")]
    # progress: one line per shard, with a rate and the time left
    progress = [line for line in proc.stderr.splitlines() if " done: " in line]
    assert len(progress) == 3 and all("slices/s" in line and " left" in line for line in progress)

    trainset = data.read_trainset(root)
    with open(out / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert [r["image_id"] for r in manifest] == list(trainset.ids)            # label-file order
    assert {r["image_id"]: r["reason"] for r in manifest if r["ok"] == "0"} == {truncated: "truncated"}
    cache = SliceCache.open(out, 75)
    ok = np.flatnonzero(trainset.ids != truncated)
    assert list(cache.slices.ids) == list(trainset.ids[ok])
    assert np.array_equal(cache.slices.labels, trainset.labels[ok])
    # the headers read in the same pass are those a header-only read finds: no second pass
    headers = data.slice_headers(trainset.paths[ok])
    assert list(cache.headers.studies) == list(headers.studies)
    assert np.array_equal(cache.headers.positions, headers.positions)
    assert np.array_equal(cache.headers.instances, headers.instances)
    assert [p.tolist() for p in data.split(cache.slices, "study", cache.headers.studies)] == \
        [p.tolist() for p in data.split(cache.slices, "study", headers.studies)]
    # HU as ich.imaging.load_hu computes it, to float16's resolution
    hu = cache.read(cache.slices.rows)
    for image, path in zip(hu, cache.slices.paths):
        expected = load_hu(path, 75)
        assert np.allclose(image.astype(np.float32), expected, rtol=2 ** -10, atol=0.01)


def test_prepare_resumes_after_an_interruption_and_reuses_a_complete_cache(phantoms, prepared, tmp_path, caplog):
    """State a kill leaves: one shard without its JSON (the marker written last) and its
    half-written temporary file, cache.json not complete. Re-running decodes that shard only."""
    root, _ = phantoms
    out, _ = prepared
    copy = tmp_path / "cache"
    shutil.copytree(out, copy)
    meta = json.loads((copy / "cache.json").read_text())
    (copy / "cache.json").write_text(json.dumps({**meta, "complete": False}))
    shard_path(copy, 1, ".json").unlink()
    shard_path(copy, 1).rename(shard_path(copy, 1, ".npy.tmp"))
    with open(shard_path(copy, 1, ".npy.tmp"), "r+b") as f:
        f.truncate(1000)
    untouched = {i: os.stat(shard_path(copy, i)).st_mtime_ns for i in (0, 2)}
    time.sleep(0.05)
    with caplog.at_level("INFO", logger="training.prepare"):
        cache = prepare(root, copy, 75, processes=1, shard_size=4096)   # its own shard size wins
    assert "decoding 8 slices in 1 shards with 1 processes (2 shards already done)" in caplog.text
    assert {i: os.stat(shard_path(copy, i)).st_mtime_ns for i in (0, 2)} == untouched
    assert not shard_path(copy, 1, ".npy.tmp").exists()
    assert np.array_equal(cache.read(cache.slices.rows), SliceCache.open(out).read(cache.slices.rows))
    caplog.clear()
    with caplog.at_level("INFO", logger="training.prepare"):
        prepare(root, copy, 75, processes=1)
    assert "is complete" in caplog.text and "decoding" not in caplog.text


def test_a_cache_that_does_not_fit_is_refused_in_one_line(phantoms, prepared, tmp_path, capsys):
    root, _ = phantoms
    out, _ = prepared
    with pytest.raises(CacheError, match="prepared at input size 75, not 96"):
        SliceCache.open(out, 96)
    with pytest.raises(CacheError, match="input size 75, not 128"):
        prepare(root, out, 128)
    other = tmp_path / "other"
    synthetic.generate(other, studies=1, seed=3, slices=(6, 6))
    with pytest.raises(CacheError, match="other data"):
        prepare(other, out, 75)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    meta = json.loads((unfinished / "cache.json").read_text())
    (unfinished / "cache.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(CacheError, match="not complete"):
        SliceCache.open(unfinished)
    # the training CLI: exit 2, one line, before any training
    code, err = _train(["--data", str(out), "--input-size", "96", "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and _error_lines(err) == [
        f"error: {out} was prepared at input size 75, not 96: prepare another cache "
        "(python -m training.prepare --input-size 96)"]


def test_bad_weights_file_and_label_file_are_named_before_any_work(tmp_path, capsys):
    """The command itself once (its exit status, no traceback), then main() in this process."""
    proc = subprocess.run([sys.executable, "-m", "training", "--data", str(tmp_path), "--weights",
                           str(tmp_path / "nope.h5")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(_error_lines(proc.stderr)) == 1 and "Traceback" not in proc.stderr
    assert f"--weights {tmp_path / 'nope.h5'}: no such file" in proc.stderr
    (tmp_path / "stage_2_train").mkdir()
    (tmp_path / "stage_2_train.csv").write_text("image,label\n")
    code, err = _train(["--data", str(tmp_path), "--input-size", "75", "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and len(_error_lines(err)) == 1 and "expected the header ID,Label" in err
    (tmp_path / "stage_2_train.csv").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)))   # gzip
    code, err = _train(["--data", str(tmp_path), "--input-size", "75", "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and len(_error_lines(err)) == 1 and "is not a CSV label file" in err
    code, err = _train(["--data", str(tmp_path / "absent"), "--input-size", "75", "--out", str(tmp_path / "m")],
                       capsys)
    assert code == 2 and len(_error_lines(err)) == 1 and "cannot read" in err


def _train(argv, capsys) -> tuple[int, str]:
    """`python -m training` in this process (TensorFlow is imported once): exit code, stderr."""
    from training.__main__ import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error") or "Traceback" in line]
