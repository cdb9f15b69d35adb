"""`python -m training.ensemble`: several models as one artifact (their logits averaged), its
operating point chosen on labelled studies no member trained on."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ich.labels import LABELS
from ich.model import ModelCard, load_artifact, save_artifact
from tests.modelfactory import SIZE, blood_detector
from tests.training.sites import labelled_site
from training import ensemble, evaluate


def logit(p):
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two hand-weighted detectors that disagree (2.5 and 12 blood pixels for `any` = 0.5), six
    bleeding and six normal labelled studies, and a model of another input size."""
    root = tmp_path_factory.mktemp("ensemble")
    a = blood_detector(root / "models", "detector-a", min_pixels=2.5).resolve()
    b = blood_detector(root / "models", "detector-b", min_pixels=12.0).resolve()
    return root, a, b, labelled_site(root / "site", 6, 6)


def other_size(root, size: int = 64):
    import keras

    from ich.model import ModelCard

    inputs = keras.Input((size, size, 3), name="windows")
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(len(LABELS), activation="sigmoid")(pooled))
    return save_artifact(model, ModelCard(version=f"small-{size}", engine="tiny", input_size=size), root)


def test_the_artifact_serves_the_mean_logit_of_its_members_in_a_fresh_process(members, tmp_path, capsys):
    root, a, b, site = members
    code = ensemble.main(["--members", str(a), str(b), "--data", str(site), "--out", str(tmp_path),
                          "--version", "ens-1", "--study-rule", "max"])
    assert code == 0
    x = np.random.default_rng(3).random((4, SIZE, SIZE, 3), dtype=np.float32)
    x[:2, 30:50, 30:50, 0] = 0.9                      # a bright blob: the members' scores differ
    parts = [np.asarray(load_artifact(m)[0](x, training=False)) for m in (a, b)]
    expected = 1 / (1 + np.exp(-(logit(parts[0]) + logit(parts[1])) / 2))
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np; from ich.model import load_artifact; "
              "m, c = load_artifact(sys.argv[1]); "
              "np.save(sys.argv[2], np.asarray(m(np.load(sys.argv[3]), training=False)))")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "ens-1"), str(tmp_path / "p.npy"),
                    str(tmp_path / "x.npy")], check=True, timeout=300)
    served = np.load(tmp_path / "p.npy")
    np.testing.assert_allclose(logit(served), logit(expected), atol=1e-3)
    # Not the mean probability: a confident member is not halved.
    assert np.max(np.abs(logit(served) - logit((parts[0] + parts[1]) / 2))) > 0.5


def test_the_operating_point_is_chosen_on_the_studies_and_the_card_records_every_member(members, tmp_path, capsys):
    root, a, b, site = members
    code = ensemble.main(["--members", str(a), str(b), "--data", str(site), "--out", str(tmp_path),
                          "--version", "ens-2", "--promote"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    folder = tmp_path / "ens-2"
    assert (tmp_path / "current").resolve() == folder.resolve() and printed["promoted"]
    card = ModelCard.read(folder)
    assert card.training["ensemble"]["members"] == ["detector-a", "detector-b"]
    assert card.engine == "test-detector + test-detector" and card.input_size == SIZE
    operating = card.metrics["ensemble_operating"]
    assert (operating["studies"], operating["positive_studies"]) == (12, 6)
    assert [m["version"] for m in operating["members"]] == ["detector-a", "detector-b"]
    assert all("tp" in m["at_its_own_point"] for m in operating["members"])
    # The thresholds are the ensemble's own, chosen here: every bleed kept (6 of 6 at 0.95)...
    chosen = operating["ensemble"]
    assert chosen["tp"] == 6 and card.thresholds["any"] != ModelCard.read(a).thresholds["any"]
    # ...and what a worker serving the artifact decides on these studies is what chose them.
    served = evaluate.evaluate_artifact(folder, site, None)["study"]
    assert (served["tp"], served["fp"], served["tn"]) == (chosen["tp"], chosen["fp"], chosen["tn"])
    assert printed["on_operating_studies"]["detector-b"] == operating["members"][1]["at_its_own_point"]


@pytest.mark.parametrize("case", ["one", "twice", "sizes", "failed", "too few studies", "version taken"])
def test_what_cannot_make_an_ensemble_is_refused_before_anything_is_written(members, tmp_path, case, capsys):
    root, a, b, site = members
    others = {"one": [a], "twice": [a, a], "sizes": [a, other_size(tmp_path / "m")],
              "failed": [a, b], "too few studies": [a, b], "version taken": [a, b]}[case]
    data = site
    if case == "failed":
        card = ModelCard.read(b)
        card.status, card.version = "failed", "detector-b-failed"
        failed = tmp_path / "m" / "detector-b-failed"
        failed.mkdir(parents=True)
        (failed / "model.keras").write_bytes((b / "model.keras").read_bytes())
        card.write(failed)
        others = [a, failed]
    if case == "too few studies":
        data = labelled_site(tmp_path / "small", 2, 3)
    out = tmp_path / "out"
    if case == "version taken":
        (out / "taken").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        ensemble.main(["--members", *map(str, others), "--data", str(data), "--out", str(out),
                       "--version", "taken"])
    assert exit_info.value.code == 2
    assert {"one": "2 to 5 members", "twice": "named twice", "sizes": "different input sizes [64, 96]",
            "failed": "detector-b-failed failed training's quality check",
            "too few studies": "2 bleeding and 3 normal studies",
            "version taken": "taken exists; name another --version"}[case] in capsys.readouterr().err
    if case == "version taken":
        assert [p.name for p in out.iterdir()] == ["taken"]
    else:
        assert not out.exists()


def test_adapt_refuses_an_ensemble_and_says_to_adapt_its_members(members, tmp_path, monkeypatch):
    """`training.adapt`'s "first K BatchNorm layers" are one member's stem in an ensemble."""
    from training import adapt

    root, a, b, site = members
    assert ensemble.main(["--members", str(a), str(b), "--data", str(site), "--out", str(tmp_path),
                          "--version", "ens-3"]) == 0
    monkeypatch.setattr(adapt, "MIN_SLICES", 8)
    with pytest.raises(ValueError, match="ens-3 is an ensemble: adapt each member"):
        adapt.adapt(tmp_path / "ens-3", site, tmp_path / "adapted")
    assert not (tmp_path / "adapted").exists()


def test_floors_choose_the_threshold_as_site_calibration_does(members, tmp_path, capsys):
    """`--floors`, as `training.calibrate` takes them for a site's own studies (H10: an
    ensemble's point is best chosen there); not beside a placement of its own."""
    root, a, b, site = members
    with pytest.raises(SystemExit) as exit_info:
        ensemble.main(["--members", str(a), str(b), "--data", str(site), "--out", str(tmp_path),
                       "--floors", "0.95", "0.85", "--gap-placement", "0.3"])
    assert exit_info.value.code == 2 and "drop --recall-confidence and --gap-placement" in capsys.readouterr().err
    assert ensemble.main(["--members", str(a), str(b), "--data", str(site), "--out", str(tmp_path),
                          "--version", "ens-f", "--floors", "0.95", "0.85"]) == 0
    operating = ModelCard.read(tmp_path / "ens-f").metrics["ensemble_operating"]
    assert operating["floors"] == [0.95, 0.85]
    assert all(row["floors"] == [0.95, 0.85] and "floor_room" in row for row in operating["rules"])
    assert (operating["ensemble"]["tp"], operating["ensemble"]["fp"]) == (6, 0)
