"""`training.adapt`: BatchNorm statistics taken from a site's unlabelled DICOM files, nothing
else changed, written as a new version."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ich.imaging import load_slice
from ich.model import ModelCard, load_artifact
from tests.modelfactory import LOOP_ENGINE, SIZE, random_inception
from training import adapt
from training.synthetic import make_study, to_bytes
from training.train import batchnorm_layers


def _export(folder, studies: int, slices=(6, 7)) -> list:
    """A site's export as a PACS or `storescp` leaves it: study/series folders, files without
    an extension, no label file; plus a text file and a truncated slice, which are skipped."""
    good = []
    for index in range(studies):
        for n, s in enumerate(make_study(61, index, slices=slices, site="site-e")):
            path = folder / f"study{index}" / "series1" / f"IM{n:04d}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(to_bytes(s.dataset))
            good.append(path)
    (folder / "README.txt").write_text("exported by the PACS\n")
    (folder / "study0" / "series1" / "IM9999").write_bytes(good[0].read_bytes()[:3000])
    return good


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return random_inception(tmp_path_factory.mktemp("adapt") / "models", engine=LOOP_ENGINE)


def test_adapted_model_uses_the_sites_statistics_and_keeps_everything_else(model, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(adapt, "MIN_SLICES", 8)
    good = _export(tmp_path / "export", 2)
    folder = adapt.adapt(model, tmp_path / "export", tmp_path / "models", "site-adapted",
                         batch_size=len(good))
    assert folder == tmp_path / "models" / "site-adapted"
    before, after = ModelCard.read(model), ModelCard.read(folder)
    assert after.version == "site-adapted" and after.thresholds == before.thresholds
    assert after.study_rule == before.study_rule
    site = after.metrics["site_adaptation"]
    assert site["from_version"] == before.version and site["slices"] == len(good)
    assert site["files"] == len(good) + 2 and site["decode"]["skipped"] == 2
    assert site["batchnorm_layers"] == site["of_batchnorm_layers"] > 10

    original, _ = load_artifact(model)
    adapted, _ = load_artifact(folder)
    images = np.stack([load_slice(p, SIZE) for p in good])
    # AdaBN's defining property: with the site's statistics, inference on the site's slices is
    # the original network normalising them by their own batch statistics (float32 through
    # MobileNet's 27 BatchNorm layers: agreement to about 1e-4, while the training site's
    # statistics miss by far more).
    expected = np.asarray(original(images, training=True))
    error = np.abs(np.asarray(adapted(images, training=False)) - expected).max()
    unadapted = np.abs(np.asarray(original(images, training=False)) - expected).max()
    assert error < 2e-3 and unadapted > 20 * error
    moving = ("moving_mean", "moving_variance")
    for w0, w1 in zip(original.weights, adapted.weights):
        if not w0.path.endswith(moving):
            np.testing.assert_array_equal(np.asarray(w0), np.asarray(w1), err_msg=w0.path)


def test_only_the_first_layers_are_adapted_when_asked(model, tmp_path, monkeypatch):
    monkeypatch.setattr(adapt, "MIN_SLICES", 8)
    assert len(_export(tmp_path / "export", 2)) >= 8      # one full batch at least
    folder = adapt.adapt(model, tmp_path / "export", tmp_path / "models", "stem", batch_size=8,
                         layers=3)
    assert ModelCard.read(folder).metrics["site_adaptation"]["batchnorm_layers"] == 3
    original, _ = load_artifact(model)
    adapted, _ = load_artifact(folder)
    changed = [not np.array_equal(np.asarray(w0), np.asarray(w1))
               for w0, w1 in zip(original.weights, adapted.weights) if w0.path.endswith("moving_mean")]
    assert changed[:3] == [True] * 3 and not any(changed[3:])


def test_the_stem_alone_gives_the_statistics_the_whole_network_gives_its_first_layers(
        model, tmp_path, monkeypatch):
    """The fast path runs only the layers up to the K-th BatchNorm; those layers must end with
    the statistics a training-mode pass through the whole network leaves in them."""
    monkeypatch.setattr(adapt, "MIN_SLICES", 8)
    assert len(_export(tmp_path / "export", 3)) >= 16     # two batches at least
    stem = adapt.adapt(model, tmp_path / "export", tmp_path / "models", "stem", batch_size=8, layers=4)
    every = adapt.adapt(model, tmp_path / "export", tmp_path / "models", "every", batch_size=8)
    original, _ = load_artifact(model)
    stem, every = batchnorm_layers(load_artifact(stem)[0]), batchnorm_layers(load_artifact(every)[0])
    for k, (fast, full, kept) in enumerate(zip(stem, every, batchnorm_layers(original))):
        for name in ("moving_mean", "moving_variance"):
            fast_v, full_v, kept_v = (np.asarray(getattr(layer, name)) for layer in (fast, full, kept))
            if k < 4:
                np.testing.assert_allclose(fast_v, full_v, rtol=1e-4, atol=1e-6, err_msg=f"{k} {name}")
                assert not np.allclose(fast_v, kept_v)
            else:
                np.testing.assert_array_equal(fast_v, kept_v, err_msg=f"{k} {name}")


def test_more_layers_than_the_model_has_are_refused(model, tmp_path, monkeypatch):
    monkeypatch.setattr(adapt, "MIN_SLICES", 8)
    _export(tmp_path / "export", 1)
    total = len(batchnorm_layers(load_artifact(model)[0]))
    with pytest.raises(ValueError, match=f"the model has {total} BatchNorm layers; adapt at most {total}"):
        adapt.adapt(model, tmp_path / "export", tmp_path / "models", layers=total + 1)
    assert not (tmp_path / "models").exists()


def test_a_folder_too_small_is_refused_and_nothing_is_written(model, tmp_path):
    good = len(_export(tmp_path / "export", 1))
    with pytest.raises(ValueError, match=f"{good + 2} files; at least 256 are needed"):
        adapt.adapt(model, tmp_path / "export", tmp_path / "models")
    assert not (tmp_path / "models").exists()
    with pytest.raises(ValueError, match=f"{good} decodable CT slices of {good + 2} files; at least {good + 1}"):
        with pytest.MonkeyPatch.context() as patch:     # enough files, too few of them CT slices
            patch.setattr(adapt, "MIN_SLICES", good + 1)
            adapt.adapt(model, tmp_path / "export", tmp_path / "models")
    assert not (tmp_path / "models").exists()
    with pytest.raises(ValueError, match="at least one BatchNorm layer"):
        adapt.adapt(model, tmp_path / "export", tmp_path / "models", layers=0)
    with pytest.raises(ValueError, match="not a folder"):
        adapt.adapt(model, tmp_path / "nowhere", tmp_path / "models")


def test_a_taken_version_is_refused_before_anything_is_decoded(model, tmp_path, monkeypatch, capsys):
    """As calibrate and ensemble do: the version is named before the statistics are estimated
    (minutes on a real export), not refused after them. The folder holds no CT slice at all, so
    reading it first would have refused it for that instead."""
    monkeypatch.setattr(adapt, "MIN_SLICES", 8)
    for n in range(10):
        (tmp_path / "export" / f"IM{n}").parent.mkdir(exist_ok=True)
        (tmp_path / "export" / f"IM{n}").write_bytes(b"not a DICOM file")
    (tmp_path / "m" / "taken").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit:
        adapt.main(["--model", str(model), "--data", str(tmp_path / "export"), "--out",
                    str(tmp_path / "m"), "--version", "taken", "--batch-size", "8"])
    assert exit.value.code == 2 and "taken exists; name another --version" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["taken"]


def test_a_large_folder_is_sampled_to_max_slices(tmp_path):
    for n in range(30):
        (tmp_path / f"d{n % 3}").mkdir(exist_ok=True)
        (tmp_path / f"d{n % 3}" / f"f{n}").write_bytes(b"x")
    (tmp_path / ".hidden").write_bytes(b"x")
    (tmp_path / "DICOMDIR").write_bytes(b"x")
    paths, listed = adapt.slice_files(tmp_path, 12, seed=3)
    assert listed == 30 and len(set(paths)) == 12
    assert paths == adapt.slice_files(tmp_path, 12, seed=3)[0]
    everything, total = adapt.slice_files(tmp_path, 100)
    assert total == 30 and not any(p.endswith(("hidden", "DICOMDIR")) for p in everything)


def test_the_command_adapts_the_stem_by_default_and_promotes(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(adapt, "MIN_SLICES", 8)
    good = _export(tmp_path / "export", 2)
    out = tmp_path / "models"
    assert adapt.main(["--model", str(model), "--data", str(tmp_path / "export"), "--out", str(out),
                       "--version", "stem", "--batch-size", "8", "--promote"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["artifact"] == str(out / "stem") and printed["promoted"] is True
    assert printed["batchnorm_layers"] == adapt.STEM_LAYERS < printed["of_batchnorm_layers"]
    assert printed["files"] == len(good) + 2 and printed["skipped"] == 2
    assert (out / "current").resolve() == (out / "stem").resolve()
    assert ModelCard.read(out / "current").metrics["site_adaptation"]["batchnorm_layers"] == adapt.STEM_LAYERS

    assert adapt.main(["--model", str(model), "--data", str(tmp_path / "export"), "--out", str(out),
                       "--version", "every", "--batch-size", "8", "--layers", "all"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["batchnorm_layers"] == printed["of_batchnorm_layers"] and not printed["promoted"]
    assert (out / "current").resolve() == (out / "stem").resolve()     # not promoted: unchanged


@pytest.mark.parametrize("extra, message", [
    (["--layers", "0"], "--layers must be a positive whole number or all"),
    (["--layers", "stem"], "--layers must be a positive whole number or all"),
    (["--max-slices", "10"], "--max-slices must be at least 256"),
])
def test_the_command_refuses_bad_options_before_reading_anything(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit:
        adapt.main(["--model", str(tmp_path / "no-model"), "--data", str(tmp_path), *extra])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_the_command_says_why_a_folder_is_refused(model, tmp_path, capsys):
    _export(tmp_path / "export", 1)
    with pytest.raises(SystemExit) as exit:
        adapt.main(["--model", str(model), "--data", str(tmp_path / "export"), "--out", str(tmp_path / "m")])
    assert exit.value.code == 2 and "at least 256 are needed" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_adapt_then_calibrate_as_deployment_advises(model, tmp_path, monkeypatch, capsys):
    """docs/deployment.md's sequence through both commands: the stem adapted on the site's
    unlabelled export and promoted, then the operating point re-chosen on labelled studies of
    the site from `models/current`. The served version must carry both: the adapted statistics
    and the local thresholds, and the card's record of each step."""
    from training import calibrate
    from training.synthetic import generate

    monkeypatch.setattr(adapt, "MIN_SLICES", 8)
    monkeypatch.setattr(calibrate, "MIN_STUDIES", 2)
    _export(tmp_path / "export", 2)
    generate(tmp_path / "labelled", 8, 62, slices=(6, 7), workers=1, site="site-e")
    out = tmp_path / "models"
    assert adapt.main(["--model", str(model), "--data", str(tmp_path / "export"), "--out", str(out),
                       "--version", "adapted", "--batch-size", "8", "--promote"]) == 0
    assert calibrate.main(["--model", str(out / "current"), "--data", str(tmp_path / "labelled"),
                           "--out", str(out), "--version", "served", "--promote"]) == 0
    capsys.readouterr()
    served = ModelCard.read(out / "current")
    assert (out / "current").resolve() == (out / "served").resolve()
    assert served.metrics["site_adaptation"]["batchnorm_layers"] == adapt.STEM_LAYERS
    assert served.metrics["site_adaptation"]["from_version"] == ModelCard.read(model).version
    assert served.metrics["site_calibration"]["from_version"] == "adapted"
    assert "training.adapt" in served.notes and "training.calibrate" in served.notes
    adapted, _ = load_artifact(out / "adapted")
    final, _ = load_artifact(out / "served")
    for w0, w1 in zip(adapted.weights, final.weights):
        np.testing.assert_array_equal(np.asarray(w0), np.asarray(w1), err_msg=w0.path)
