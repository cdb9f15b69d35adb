"""`python -m training.calibrate`: a site's own labelled studies re-choose the operating point
of an unchanged network, written as a new version."""
from __future__ import annotations

import json

import pytest

from ich.model import MODEL_FILE, ModelCard, load_artifact
from tests.modelfactory import blood_detector
from training import calibrate
from tests.training.sites import labelled_site as _site


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """The detector with an `any` threshold that pages on every normal study of this site (its
    normal studies score ~5e-5), as a model moved to a new scanner does."""
    root = tmp_path_factory.mktemp("calibrate")
    model = blood_detector(root / "models").resolve()   # the version, not `current`: tests promote
    card = ModelCard.read(model)
    card.thresholds["any"] = 1e-6
    card.write(model.resolve())
    return root, model, _site(root / "site", 6, 6)


def test_site_calibration_writes_a_new_version_with_local_thresholds(detector, capsys, caplog):
    root, model, site = detector
    before = ModelCard.read(model)
    code = calibrate.main(["--model", str(model), "--data", str(site), "--out", str(root / "models"),
                           "--version", "detector-site", "--promote", "--recall-confidence", "0.9"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    folder = root / "models" / "detector-site"
    card = ModelCard.read(folder)
    assert (folder / MODEL_FILE).read_bytes() == (model.resolve() / MODEL_FILE).read_bytes()
    assert (root / "models" / "current").resolve() == folder.resolve()
    site_figures = card.metrics["site_calibration"]
    assert site_figures["studies"] == 12 and site_figures["positive_studies"] == 6
    assert site_figures["from_version"] == before.version and card.study_rule == before.study_rule
    after, was = site_figures["study_after"], site_figures["study_before"]
    assert (was["tp"], was["fp"]) == (6, 6), "before: every normal study alerted"
    assert (after["tp"], after["fp"]) == (6, 0), "split-conformal at 0.95 keeps all 6 local bleeds"
    assert 1e-4 < card.thresholds["any"] < 0.5
    assert printed["on_calibration_studies"]["study_after"]["tp"] == 6
    # Six bleeds cannot make recall >= 0.95 on new studies 90 % sure: the card and log say so.
    assert printed["recall_confidence"] == site_figures["recall_confidence"] == 0.2649
    assert "6 local bleeding studies cannot hold recall >= 0.95 with confidence 0.9" in caplog.text
    assert "(45 reach it)" in caplog.text
    assert "training.calibrate" in card.notes


def test_too_few_local_studies_are_refused(detector, tmp_path, capsys):
    _, model, _ = detector
    small = _site(tmp_path / "small", 2, 3)
    with pytest.raises(SystemExit) as exit_info:
        calibrate.main(["--model", str(model), "--data", str(small), "--out", str(tmp_path / "m")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "m").exists()
    with pytest.raises(SystemExit) as exit_info:      # refused before anything is scored
        calibrate.main(["--model", str(model), "--data", str(small), "--out", str(tmp_path / "m"),
                        "--gap-placement", "0"])
    assert exit_info.value.code == 2 and not (tmp_path / "m").exists()
    err = capsys.readouterr().err
    assert "--gap-placement" in err and "must be in (0, 1]" in err


def test_floors_choose_the_threshold_with_the_most_room_above_both(detector, capsys):
    """`--floors 0.95 0.85`: on a site the detector separates, every bleed alerts and every
    normal is silent, the room is what the floors leave (min(0.05, 0.15)), and the card says
    which floors chose it."""
    root, model, site = detector
    code = calibrate.main(["--model", str(model), "--data", str(site), "--out", str(root / "models"),
                           "--version", "detector-floors", "--floors", "0.95", "0.85"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    card = ModelCard.read(root / "models" / "detector-floors")
    figures = card.metrics["site_calibration"]
    assert printed["floors"] == figures["floors"] == [0.95, 0.85]
    assert (figures["study_after"]["tp"], figures["study_after"]["fp"]) == (6, 0)
    assert figures["rules"][0]["floor_room"] == 0.05 and figures["recall_confidence"] is None
    assert printed["thresholds"]["any"] == card.thresholds["any"]
    assert 1e-4 < card.thresholds["any"] < 0.5


def test_floors_no_threshold_can_meet_are_said_and_the_nearest_is_kept(detector, tmp_path, caplog):
    """A normal study labelled as a bleed scores like the normals: recall 1 and specificity 1
    cannot both hold, so the log says so, and the threshold kept is the one nearest both."""
    root, model, _ = detector
    noisy = _site(tmp_path / "noisy", 6, 6, mislabelled=1)
    assert calibrate.main(["--model", str(model), "--data", str(noisy), "--out", str(tmp_path / "m"),
                           "--version", "noisy", "--floors", "1", "1"]) == 0
    figures = ModelCard.read(tmp_path / "m" / "noisy").metrics["site_calibration"]
    assert figures["rules"][0]["floor_room"] < 0
    assert "no threshold meets recall >= 1.0 and specificity >= 1.0 on these 12 studies" in caplog.text
    after = figures["study_after"]
    assert (after["tp"], after["fp"]) == (6, 0), "the 6 real bleeds alert, the 5 normals do not"


@pytest.mark.parametrize("extra, message", [
    (["--floors", "0", "0.85"], "must be in (0, 1]"),
    (["--floors", "0.95", "nan"], "must be in (0, 1]"),
    (["--floors", "0.95", "0.85", "--recall-confidence", "0.9"], "drop --recall-confidence"),
    (["--floors", "0.95", "0.85", "--gap-placement", "0.3"], "drop --recall-confidence"),
])
def test_floors_out_of_range_or_with_another_choice_are_refused_before_scoring(
        detector, tmp_path, capsys, extra, message):
    _, model, site = detector
    with pytest.raises(SystemExit) as refused:
        calibrate.main(["--model", str(model), "--data", str(site), "--out", str(tmp_path / "m"), *extra])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------ --normals: normal studies only


def _normals(folder, studies: int):
    """`studies` normal phantoms as a PACS export might leave them: one folder per study and
    series, a stray text file, and a file that is not DICOM at all. No labels."""
    from training.synthetic import make_study, to_bytes

    for index in range(studies):
        for s in make_study(43, index, slices=(8, 10), subtypes=(), variant="default", site="legacy"):
            target = folder / f"study{index}" / s.dataset.SeriesInstanceUID[-8:]
            target.mkdir(parents=True, exist_ok=True)
            (target / f"{s.image_id}.dcm").write_bytes(to_bytes(s.dataset))
    (folder / "README.txt").write_text("exported from the PACS\n")
    (folder / "study0" / "broken.dcm").write_bytes(b"not a DICOM file")
    return folder


@pytest.fixture(scope="module")
def normals(tmp_path_factory):
    return _normals(tmp_path_factory.mktemp("normals"), 24)


def test_normals_place_the_any_threshold_where_the_site_normals_are_silent(detector, normals, capsys):
    """The detector pages on every normal study here (threshold 1e-6), below the default band.
    From 24 normal studies alone, --normals raises `any` to the band's low end, where 22 of them
    (k = ⌈0.88 · 25⌉) are silent, keeps every other part of the card, and the site's labelled
    bleeds, which it never saw, still alert."""
    from training import evaluate, studies

    root, model, site = detector
    before = ModelCard.read(model)
    assert calibrate.main(["--model", str(model), "--normals", str(normals), "--out",
                           str(root / "models"), "--version", "detector-normals"]) == 0
    printed = json.loads(capsys.readouterr().out)
    folder = root / "models" / "detector-normals"
    card = ModelCard.read(folder)
    figures = card.metrics["site_calibration"]
    assert (folder / MODEL_FILE).read_bytes() == (model.resolve() / MODEL_FILE).read_bytes()
    assert figures["normal_studies"] == 24 and figures["specificity_target"] == [0.88, 0.93]
    assert (figures["alerting_before"], figures["alerting_after"], figures["moved"]) == (24, 2, "raised")
    assert figures["recall"] is None and "recall at the site was not measured" in card.notes
    assert figures["decode"]["skipped"] == 2, "the text file and the broken one, with reasons"
    assert printed["threshold_after"] == card.thresholds["any"] > figures["threshold_before"]
    assert printed["shift_logits"] > 0
    assert card.study_rule == before.study_rule and card.slice_thresholds == before.slice_thresholds
    assert {k: v for k, v in card.thresholds.items() if k != "any"} == \
        {k: v for k, v in before.thresholds.items() if k != "any"}
    # Judged on the labelled site's 12 other studies, as the worker would decide them.
    served, served_card = load_artifact(folder)
    local, *_ = calibrate.labelled_studies(evaluate.compiled_forward(served), served_card.input_size, site)
    m = studies.study_metrics(local, served_card.rule())
    assert (m["tp"], m["fn"], m["fp"]) == (6, 0, 0)


def test_a_band_keeps_a_threshold_the_site_normals_allow_and_moves_one_they_do_not(detector, normals,
                                                                                    tmp_path, capsys):
    """`--specificity LO HI`: the detector's threshold (1e-6) pages on all 24 normals, so the
    band [0.5, 0.6] raises it to its low end, where at least k = ⌈0.5 · 25⌉ = 13 are silent;
    that version calibrated again with the band [0.4, 0.95] around it is kept as it is."""
    _, model, _ = detector
    out = tmp_path / "m"
    assert calibrate.main(["--model", str(model), "--normals", str(normals), "--out", str(out),
                           "--version", "raised", "--specificity", "0.5", "0.6"]) == 0
    raised = json.loads(capsys.readouterr().out)
    assert raised["moved"] == "raised" and raised["specificity_target"] == [0.5, 0.6]
    assert raised["alerting_before"] == 24 and raised["alerting_after"] <= 11
    assert calibrate.main(["--model", str(out / "raised"), "--normals", str(normals), "--out", str(out),
                           "--version", "kept", "--specificity", "0.4", "0.95"]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert kept["moved"] == "kept" and kept["shift_logits"] == 0
    assert kept["threshold_after"] == kept["threshold_before"] == raised["threshold_after"]
    assert kept["alerting_after"] == raised["alerting_after"]
    assert ModelCard.read(out / "kept").thresholds["any"] == raised["threshold_after"]


@pytest.mark.parametrize("extra, message", [
    (["--floors", "0.95", "0.85"], "drop --floors"),
    (["--gap-placement", "0.3", "--study-rule", "max"], "drop --gap-placement, --study-rule"),
    (["--specificity", "1"], "--specificity is one share S or a band LO HI, each in (0, 1)"),
    (["--specificity", "0.8", "0.85", "0.9"], "--specificity is one share S or a band LO HI"),
    (["--specificity", "0.93", "0.88"], "LO must not be above HI"),
])
def test_normals_with_a_labelled_choice_are_refused_before_scoring(detector, normals, tmp_path,
                                                                   capsys, extra, message):
    _, model, _ = detector
    with pytest.raises(SystemExit) as refused:
        calibrate.main(["--model", str(model), "--normals", str(normals), "--out", str(tmp_path / "m"),
                        *extra])
    assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_normals_refuses_bleeds_too_few_studies_and_a_lone_specificity(detector, tmp_path, capsys):
    _, model, site = detector
    cases = [(["--normals", str(site)], "labels 6 studies as bleeding"),
             (["--normals", str(_normals(tmp_path / "few", 5))], "holds 5 studies; at least 20"),
             (["--data", str(site), "--specificity", "0.9"], "--specificity goes with --normals")]
    for args, message in cases:
        with pytest.raises(SystemExit) as refused:
            calibrate.main(["--model", str(model), "--out", str(tmp_path / "m"), *args])
        assert refused.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    # An RSNA-layout folder whose labels are all normal is taken as it is.
    rsna = _site(tmp_path / "rsna", 0, 20)
    assert calibrate.main(["--model", str(model), "--normals", str(rsna), "--out", str(tmp_path / "m"),
                           "--version", "rsna-normals"]) == 0
    figures = ModelCard.read(tmp_path / "m" / "rsna-normals").metrics["site_calibration"]
    assert figures["normal_studies"] == 20 and figures["decode"]["skipped"] == 0


@pytest.mark.parametrize("source", ["--data", "--normals"])
def test_a_taken_version_is_refused_before_the_studies_are_read(detector, tmp_path, capsys, source):
    """Both modes name the version before scoring: a folder that would be refused for its
    studies is not even read when the version exists (minutes of scoring saved)."""
    _, model, _ = detector
    few = _site(tmp_path / "few", 2, 3) if source == "--data" else _normals(tmp_path / "few", 5)
    (tmp_path / "m" / "taken").mkdir(parents=True)
    with pytest.raises(SystemExit) as refused:
        calibrate.main(["--model", str(model), source, str(few), "--out", str(tmp_path / "m"),
                        "--version", "taken"])
    assert refused.value.code == 2 and "taken exists; name another --version" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["taken"]
