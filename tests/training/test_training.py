"""`python -m training` end to end on a tiny model: one run (75×75, six phantom studies, one
epoch of two steps) shared by every test here, then `python -m training.evaluate` on it."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from ich.decision import StudyRule
from ich.labels import DEFAULT_THRESHOLDS, LABELS
from ich.model import ModelCard, load_artifact
from training import calibrate, data as training_data, synthetic, train
from tests.modelfactory import LOOP_ENGINE
from training.__main__ import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Phantoms with one truncated slice, trained through the real CLI with a config file that
    the flags partly override."""
    root = tmp_path_factory.mktemp("training")
    phantoms = root / "phantoms"
    synthetic.generate(phantoms, studies=6, seed=5, slices=(8, 12))
    broken = sorted((phantoms / "stage_2_train").glob("*.dcm"))[7]
    broken.write_bytes(broken.read_bytes()[:4000])
    (root / "run.toml").write_text("batch_size = 8\nepochs = 4\ninput_size = 75\nverbose = 0\n")
    argv = ["--synthetic-studies", "6", "--synthetic-slices", "8", "12",
            "--synthetic-dir", str(phantoms), "--config", str(root / "run.toml"),
            "--epochs", "1", "--steps-per-epoch", "2", "--seed", "3", "--site-studies", "3", "--context",
            "--operating-studies", "14",
            "--out", str(root / "models"), "--version", "tiny-1", "--promote", "--allow-failed",
            "--jit-compile", "on"]   # the whole run under XLA (auto would leave 2 steps without it)
    assert main(argv) == 0   # two steps learn nothing: --allow-failed exports and promotes it
    return {"root": root, "phantoms": phantoms, "broken": broken.stem,
            "artifact": root / "models" / "tiny-1"}


def test_artifact_loads_and_scores_windows(run):
    model, card = load_artifact(run["artifact"])
    assert card.version == "tiny-1" and card.input_size == 75 and card.labels == list(LABELS)
    x = np.random.default_rng(0).random((2, 75, 75, 3), np.float32)
    p = np.asarray(model(x, training=False))
    assert p.shape == (2, 6) and np.all(np.isfinite(p) & (p >= 0) & (p <= 1))  # may saturate


def test_promote_points_current_at_the_new_version(run):
    current = run["root"] / "models" / "current"
    assert current.is_symlink() and current.resolve() == run["artifact"].resolve()


def test_model_card_holds_thresholds_metrics_and_data(run):
    card = ModelCard.read(run["artifact"])
    assert set(card.thresholds) == set(LABELS) and all(0 < t < 1 for t in card.thresholds.values())
    m = card.metrics
    assert m["weighted_log_loss"] > 0 and m["prevalence_log_loss"] > 0 and m["best_epoch"] == 1
    for label in LABELS:
        assert {"log_loss", "auc", "threshold", "recall", "precision", "specificity"} <= set(m["per_label"][label])
        assert m["per_label"][label]["threshold"] == card.slice_thresholds[label]
    assert m["split"] == "test" and m["study"]["studies"] == card.data["studies"]["test"]
    assert card.data["site"] == "randomised"   # and the site's digest, which names default folders
    assert card.data["site_digest"] == synthetic.site_digest("randomised")
    assert card.data["faint_bleeds"] == synthetic.SITES["randomised"].faint_bleeds > 0
    assert card.data["seed"] == 5      # the phantoms it reused (trained with --seed 3)
    calibration = m["calibration"]["study"]
    if calibration["positive_studies"]:   # target study recall 0.95, chosen on calibration
        assert calibration["recall"] >= 0.95 and len(m["calibration"]["rules"]) == 5
    assert card.study_rule == m["study"]["rule"]
    assert {"auc", "recall", "specificity", "ppv", "false_alerts_per_100_normal",
            "alert_delay_slices", "subtype_auc"} <= set(m["study"])
    d = card.data
    assert d["source"] == "synthetic" and d["split"] == "study"
    assert d["train_images"] + d["calibration_images"] + d["test_images"] + d["skipped"]["skipped"] == d["read"]["images"]
    assert sum(d["studies"].values()) == 6 and min(d["studies"].values()) >= 1
    assert card.status == ("ok" if card.verdict["passed"] else "failed")
    assert card.verdict["loss_ratio"] == pytest.approx(m["weighted_log_loss"] / m["prevalence_log_loss"], abs=1e-4)


def test_held_out_site_is_generated_apart_and_reported_on_its_own(run):
    """Phantoms of site-d (ranges the training data never had), with their own seed, scored by
    the final model under the card's rule: the external figures, never pooled with test."""
    import pydicom

    card = ModelCard.read(run["artifact"])
    site = card.metrics["heldout"]["site-d"]
    folder = run["root"] / synthetic.folder_name(7922, 3, (8, 12), "site-d")
    assert site["data"] == str(folder) and card.data["site"] == "randomised"
    files = sorted((folder / "stage_2_train").glob("*.dcm"))
    assert pydicom.dcmread(files[0]).InstitutionName == "ICH Watch phantom site site-d"
    assert site["images"] == len(files) and site["study"]["studies"] == 3
    assert site["study"]["rule"] == card.study_rule
    train_studies = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID
                     for f in (run["phantoms"] / "stage_2_train").glob("*.dcm")}
    assert not train_studies & {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files}
    assert {"weighted_log_loss", "per_label", "alerting_studies"} <= set(site)
    # the phantoms' site draws sit beside them, so each error can be traced to a scanner axis
    errors = site["errors_by_acquisition"]
    assert errors["studies_matched"] == 3 and errors["studies_unmatched"] == 0
    streaks = errors["axes"]["streaks"]
    assert sum(b["normal_studies"] + b["bleeding_studies"] for b in streaks) == 3
    assert sum(b["false_alerts"] for b in streaks) == site["study"]["fp"]
    assert sum(b["missed"] for b in streaks) == site["study"]["fn"]
    lo, hi = synthetic.SITES["site-d"].streaks
    assert lo <= streaks[0]["from"] and streaks[-1]["to"] <= hi


def test_operating_point_is_chosen_on_separate_operating_studies(run, tmp_path):
    """--operating-studies: the rule and study thresholds the card ships are chosen on phantoms
    of the training site's natural mix with their own seed, exactly as `training.calibrate`
    chooses on that folder; the epoch and Platt scaling stay calibration's, and calibration's
    own choice of operating point stays on record."""
    import pydicom

    card = ModelCard.read(run["artifact"])
    operating = card.metrics["operating"]
    seed, natural = 3 + train.OPERATING_SEED_OFFSET, synthetic.natural_mix("randomised")
    folder = run["root"] / synthetic.folder_name(seed, 14, (8, 12), natural)
    assert operating["data"] == str(folder) and "operating studies" in card.notes
    assert synthetic.read_manifest(folder)["site_digest"] == synthetic.site_digest(natural)
    assert operating["study"]["studies"] == 14 and operating["study"]["rule"] == card.study_rule
    assert len(operating["rules"]) == 5 and operating["images"] == len(list(folder.glob("stage_2_train/*.dcm")))
    here = card.metrics["calibration"]["chosen_here"]    # calibration's own point, restorable
    assert here["name"] in ("max", "consecutive", "topk") and set(here["thresholds"]) == set(LABELS)
    rows = card.metrics["calibration"]["rules"]   # none: calibration held no bleeding study
    assert any(r["rule"] == str(StudyRule.from_card(here, here["thresholds"]))
               and r["threshold"] == here["thresholds"]["any"] for r in rows) or (
        not rows and here == {"name": "max", "k": 1, "thresholds": DEFAULT_THRESHOLDS})
    uids = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID
            for f in (*run["phantoms"].glob("stage_2_train/*.dcm"), *folder.glob("stage_2_train/*.dcm"))}
    assert len(uids) == 6 + 14                   # no study shared with training's phantoms
    again = ModelCard.read(calibrate.calibrate(run["artifact"], folder, tmp_path, "again", study_rule="auto"))
    assert again.study_rule == card.study_rule
    assert again.thresholds == pytest.approx(card.thresholds, abs=1e-6)


def test_too_few_operating_studies_are_refused_before_training(tmp_path, capsys):
    few = synthetic.generate(tmp_path / "few", studies=3, seed=1, slices=(4, 5))["studies"]
    assert main(["--synthetic-studies", "2", "--synthetic-dir", str(tmp_path / "p"), "--operating",
                 str(tmp_path / "few"), "--out", str(tmp_path / "m")]) == 2
    assert "at least 5 of each" in capsys.readouterr().err and few == 3
    assert not (tmp_path / "p").exists()         # nothing generated, nothing trained
    # Studies the model would train on cannot choose its operating point: refused before training.
    shared = tmp_path / "shared"
    synthetic.generate(shared, studies=18, seed=2, slices=(4, 5))     # 6 bleeding, 12 normal
    assert main(["--synthetic-studies", "18", "--synthetic-slices", "4", "5", "--synthetic-dir",
                 str(shared), "--operating", str(shared), "--input-size", "75", "--out",
                 str(tmp_path / "m"), "--version", "v"]) == 2
    assert "also in the training data" in capsys.readouterr().err
    assert not (tmp_path / "m" / "runs" / "v" / "history.csv").exists()


def test_context_head_is_measured_beside_the_slice_model(run):
    """--context: the head is trained on the training studies' features, its rule chosen on
    calibration, and its figures reported on test and on the held-out site, never served."""
    import keras

    card = ModelCard.read(run["artifact"])
    ctx = card.metrics["context"]
    assert ctx["test"]["study"]["studies"] == card.metrics["study"]["studies"]
    assert ctx["heldout:site-d"]["study"]["studies"] == 3
    assert ctx["rule"]["name"] in ("max", "consecutive", "topk") and ctx["history"]
    head = keras.models.load_model(run["artifact"] / "context.keras", compile=False)
    assert head.output_shape[-1] == len(LABELS)


def test_unreadable_slice_was_skipped_and_reported(run):
    """Decoded once into the prepared cache (beside the phantoms), which names the failure;
    the split, training and scoring see only the decodable slices."""
    data = ModelCard.read(run["artifact"]).data
    assert data["skipped"] == {"skipped": 1, "reasons": {"truncated": 1}, "examples": [run["broken"]]}
    assert data["read"]["images"] == data["train_images"] + data["calibration_images"] + data["test_images"] + 1
    for part in ("calibration", "test"):
        assert data[f"{part}_images_scored"] == data[f"{part}_images"]
    assert data["cache"].startswith(str(run["root"] / "cache" / "phantoms-"))
    meta = json.loads((run["root"] / data["cache"] / "cache.json").read_text())
    assert meta["complete"] and meta["input_size"] == 75 and meta["failed"] == 1


def test_resolved_config_history_and_plots_are_saved(run):
    folder = run["artifact"]
    resolved = json.loads((folder / "config.json").read_text())
    assert resolved["batch_size"] == 8          # from the file
    assert resolved["epochs"] == 1              # the flag beats the file's 4
    assert resolved["input_size"] == 75 and resolved["split"] == "study"   # file, recipe
    assert resolved["synthetic_slices"] == [8, 12]
    history = json.loads((folder / "history.json").read_text())
    assert len(history["loss"]) == 1 and len(history["val_weighted_log_loss"]) == 1
    with open(folder / "history.csv", newline="") as f:       # appended per epoch during the run
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0"] and float(rows[0]["loss"]) == pytest.approx(history["loss"][0])
    card = ModelCard.read(folder)
    assert card.training["replicas"] == 1 and card.training["global_batch"] == 8
    assert resolved["jit_compile"] == card.training["jit_compile"] == "on"
    run_dir = run["root"] / "models" / "runs" / "tiny-1"
    assert json.loads((run_dir / "config.json").read_text())["version"] == "tiny-1"
    assert not (run_dir / "checkpoint").exists() and not (run_dir / "best.weights.npz").exists()
    for plot in ("loss.png", "precision_recall.png", "study_curves.png"):
        assert (folder / plot).read_bytes()[:8] == PNG
    data = ModelCard.read(folder).data
    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    studies = {part: {r["study_instance_uid"] for r in rows if r["split"] == part}
               for part in ("calibration", "test")}
    assert sum(r["split"] == "test" for r in rows) == data["test_images_scored"]
    assert sum(r["split"] == "calibration" for r in rows) == data["calibration_images_scored"]
    assert studies["test"].isdisjoint(studies["calibration"]) and len(studies["test"]) == data["studies"]["test"]


def test_evaluate_cli_prints_metrics_json(run, tmp_path):
    site = run["root"] / synthetic.folder_name(7922, 3, (8, 12), "site-d")
    proc = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--model", str(run["root"] / "models" / "current"),
         "--data", str(run["phantoms"]), "--plots", str(tmp_path), "--heldout", str(site)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    card = ModelCard.read(run["artifact"])
    assert result["model"] == "tiny-1"
    assert result["images"] == card.data["read"]["images"] - 1 and result["decode"]["skipped"] == 1
    assert result["weighted_log_loss"] > 0
    for label in LABELS:
        entry = result["per_label"][label]
        assert {"log_loss", "auc", "threshold", "recall", "precision", "specificity"} <= set(entry)
        assert entry["threshold"] == card.slice_thresholds[label]
    study = result["study"]
    assert study["studies"] == 6 and study["rule"] == card.study_rule
    assert study["tp"] + study["fp"] == len(result["alerting_studies"])
    assert study["tp"] + study["fn"] == study["positive_studies"]
    for plot in ("precision_recall.png", "study_curves.png"):
        assert (tmp_path / plot).read_bytes()[:8] == PNG
    held = result["heldout"][site.name]       # the same figures, on their own, as training's
    assert held["study"] == card.metrics["heldout"]["site-d"]["study"]
    assert held["images"] == card.metrics["heldout"]["site-d"]["images"]
    assert held["errors_by_acquisition"] == card.metrics["heldout"]["site-d"]["errors_by_acquisition"]
    assert f"verdict on {site}" in proc.stderr


def test_a_model_that_learned_nothing_is_refused_and_not_promoted(run, tmp_path, capsys, monkeypatch):
    """Labels that carry no signal (drawn at random, whatever the image): the command must exit
    non-zero, keep the artifact marked failed, and leave `current` alone; evaluate says so too."""
    data = tmp_path / "nosignal"
    synthetic.generate(data, studies=5, seed=8, slices=(8, 10))
    rng = np.random.default_rng(0)
    rows = ["ID,Label"]
    for line in (data / "stage_2_train.csv").read_text().splitlines()[1:]:
        image = line.rsplit("_", 1)[0]
        if line.endswith("_epidural,0") or line.endswith("_epidural,1"):
            bleed = int(rng.random() < 0.3)
            rows += [f"{image}_{label},{bleed if label in ('any', 'subdural') else 0}" for label in LABELS]
    (data / "stage_2_train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "models"
    balanced = []                    # --positive-sampling study: what reaches the sampler
    draw = training_data.study_balanced
    monkeypatch.setattr(training_data, "study_balanced",
                        lambda rows, groups, seed, **kw: balanced.append(groups) or draw(rows, groups, seed, **kw))
    code = main(["--engine", LOOP_ENGINE, "--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--input-size", "75", "--batch-size", "8", "--epochs", "1",
                 "--steps-per-epoch", "1", "--verbose", "0", "--seed", "4", "--out", str(out),
                 "--version", "nosignal-1", "--promote",
                 "--flip-average",    # calibrated, judged and exported as the mirror-averaging graph
                 "--positive-sampling", "study"])   # the split's studies reach the sampler
    assert code == 3 and "learned nothing" in capsys.readouterr().err
    assert not (out / "current").exists()
    card = ModelCard.read(out / "nosignal-1")
    assert card.status == "failed" and not card.verdict["passed"] and card.verdict["reasons"]
    # the sampler got the studies of the bleeding training rows: the training split's, not all
    everyone = set(training_data.slice_headers(training_data.read_trainset(data).paths).studies)
    assert len(balanced) == 1 and 2 <= len(set(balanced[0])) and set(balanced[0]) < everyone
    resolved = json.loads((out / "nosignal-1" / "config.json").read_text())
    assert (resolved["recipe"], resolved["positive_sampling"]) == ("scratch", "study")
    model, _ = load_artifact(out / "nosignal-1")      # --flip-average: slice and mirror alike
    x = np.random.default_rng(1).random((2, 75, 75, 3), np.float32)
    np.testing.assert_allclose(np.asarray(model(x[:, :, ::-1].copy(), training=False)),
                               np.asarray(model(x, training=False)), atol=1e-5)
    assert model.get_layer("mirror") is not None
    proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--model", str(out / "nosignal-1"),
                           "--data", str(data), "--plots", str(tmp_path / "plots")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["verdict"]["passed"] is False and "verdict" in proc.stderr


def test_cli_rejects_two_data_sources(run, capsys):
    with pytest.raises(SystemExit):
        main(["--data", "x", "--synthetic-studies", "3"])
    assert main(["--out", str(run["root"])]) == 2
    assert "exactly one" in capsys.readouterr().err
