"""`python -m training.external`: the held-out sites at the card's and the calibration studies'
operating point, against issue 12's bar, with the sets generated once and reused."""
from __future__ import annotations

import io
import json
import logging
import shutil
import sys

import numpy as np
import pytest

from ich.decision import StudyRule
from ich.labels import LABELS
from ich.model import ModelCard
from tests.modelfactory import blood_detector
from training import calibrate, external, synthetic
from training.studies import Study, StudySet, best_specificity, joint_band, passing_band, study_metrics

ARGS = ["--studies", "8", "--calibration-studies", "24", "--slices", "6", "8", "--workers", "1"]


def _studies(bleeding, normal) -> StudySet:
    """One-slice studies with these `any` scores."""
    out = StudySet()
    for i, (score, truth) in enumerate([(s, 1) for s in bleeding] + [(s, 0) for s in normal]):
        out.append(Study(f"1.{i}", np.full((1, len(LABELS)), float(truth)),
                         np.full((1, len(LABELS)), score), np.array(["s"]), np.array([0.0]),
                         np.array([1.0])))
    return out


def test_best_specificity_is_the_best_any_threshold_allows_at_the_recall():
    s = _studies([0.9, 0.8, 0.7, 0.2], [0.1, 0.3, 0.75, 0.85])
    rule = StudyRule("max", 1)
    assert best_specificity(s, rule, 0.75) == 0.5      # threshold 0.7: 0.1 and 0.3 stay silent
    assert best_specificity(s, rule, 1.0) == 0.25      # threshold 0.2: only 0.1 does
    assert best_specificity(_studies([0.9], []), rule, 0.95) is None


def test_passing_band_holds_every_threshold_that_meets_both_figures_and_no_other():
    s = _studies([0.9, 0.8, 0.7, 0.2], [0.1, 0.3, 0.75, 0.85])
    rule = StudyRule("max", 1)
    assert passing_band(s, rule, 0.75, 0.5) == (0.3, 0.7)     # 0.3 itself alerts on the 0.3 normal
    assert passing_band(s, rule, 0.75, 0.75) is None          # 3 silent normals need t > 0.75
    assert passing_band(_studies([0.9, 0.5], [0.5, 0.1]), rule, 1.0, 1.0) is None   # a tie: no t
    assert passing_band(_studies([0.9], []), rule, 0.95, 0.85) is None
    rng = np.random.default_rng(3)
    for _ in range(8):        # against the product's own figures at every threshold that matters
        s = _studies(rng.beta(4, 1, 12), rng.beta(1, 4, 8))
        band = passing_band(s, rule, 0.9, 0.85)
        assert (band is not None) == (best_specificity(s, rule, 0.9) >= 0.85)
        grid = np.unique(np.concatenate([[0.0, 1.0], s.scores(rule)[:, -1],
                                         np.nextafter(s.scores(rule)[:, -1], 2.0)]))
        for t in grid:
            m = study_metrics(s, StudyRule("max", 1, {**rule.thresholds, "any": float(t)}))
            meets = m["recall"] >= 0.9 and m["specificity"] >= 0.85
            assert meets == (band is not None and band[0] < t <= band[1]), t


def test_joint_band_holds_the_thresholds_meeting_both_figures_on_every_set_at_once():
    rule = StudyRule("max", 1)
    a, b = _studies([0.9, 0.8, 0.7, 0.2], [0.1, 0.3, 0.75, 0.85]), _studies([0.9, 0.6], [0.2, 0.5])
    assert joint_band([a, b], rule, 0.75, 0.5) == (0.3, 0.6)      # (0.3, 0.7] and (0.2, 0.6]
    assert joint_band([a, _studies([0.9, 0.25], [0.1, 0.2])], rule, 0.75, 0.5) is None  # (0.1, 0.25]
    assert joint_band([a, _studies([0.9], [])], rule, 0.75, 0.5) is None          # one has none
    rng = np.random.default_rng(5)
    for _ in range(8):        # against the product's own figures on every set at every threshold
        sets = [_studies(rng.beta(5, 1, 12), rng.beta(1, 5, 10)) for _ in range(3)]
        band = joint_band(sets, rule, 0.9, 0.8)
        scores = np.concatenate([s.scores(rule)[:, -1] for s in sets])
        for t in np.unique(np.concatenate([[0.0, 1.0], scores, np.nextafter(scores, 2.0)])):
            every = all(m["recall"] >= 0.9 and m["specificity"] >= 0.8 for m in (
                study_metrics(s, StudyRule("max", 1, {**rule.thresholds, "any": float(t)})) for s in sets))
            assert every == (band is not None and band[0] < t <= band[1]), t


def test_the_table_prints_a_band_squeezed_against_one_apart():
    rule = StudyRule("max", 1, {label: 0.5 for label in LABELS})
    site = _studies([0.99999, 0.99998, 0.99997, 0.99996], [0.9990, 0.2, 0.1, 0.05])
    result = external.judge("v", rule, site, {"site-d": site}, target_recall=0.75)
    assert result["joint_band"]["band"] == [0.9990, 0.99996]     # the bar: every bleed, every normal
    text = external.table(result)
    assert "(0.999000, 0.999960]" in text and "(1.000" not in text
    assert external._p(0.25) == "0.250" and external._p(1.0, 0.0) == "1.000, 0.000"
    assert external._p(0.25, 0.9996) == "0.25000, 0.99960"          # both ends alike


def test_meets_needs_every_figure_of_the_bar():
    assert external.meets({"auc": 0.97, "recall": 0.95, "specificity": 0.85})
    assert not external.meets({"auc": 0.99, "recall": 0.949, "specificity": 1.0})
    assert not external.meets({"auc": None, "recall": 1.0, "specificity": 1.0})


def test_natural_mix_is_the_training_site_without_faint_emphasis():
    site = synthetic.natural_mix("randomised")
    assert site.faint_bleeds == 0.0 < synthetic.SITES["randomised"].faint_bleeds
    assert site.streaks == synthetic.SITES["randomised"].streaks
    assert synthetic.site_digest(site) != synthetic.site_digest("randomised")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One external validation of the hand-weighted detector on tiny sets: (root, model, exit
    code, stdout, stderr)."""
    root = tmp_path_factory.mktemp("external")
    model = blood_detector(root / "models")
    with pytest.MonkeyPatch.context() as patch:
        out, err = io.StringIO(), io.StringIO()
        patch.setattr(sys, "stdout", out)
        patch.setattr(sys, "stderr", err)
        code = external.main(["--model", str(model), "--root", str(root / "data"),
                              "--scores", str(root / "scores"), *ARGS])
    return root, model, code, out.getvalue(), err.getvalue()


def test_external_validation_reports_each_site_at_both_points(run):
    root, model, code, out, err = run
    result = json.loads(out)
    assert set(result["sites"]) == {"site-d", "site-e", "site-f", "site-g"}
    assert code == 0
    calibration = root / "data" / synthetic.folder_name(
        external.CALIBRATION_SEED, 24, (6, 8), synthetic.natural_mix("randomised"))
    assert result["calibration"]["data"] == str(calibration)
    # The calibration point is what `training.calibrate` writes for the same studies.
    calibrated = calibrate.calibrate(model, calibration, root / "calibrated", "v")
    assert result["calibration"]["threshold"] == pytest.approx(ModelCard.read(calibrated).thresholds["any"])
    for name, seed in external.HELDOUT:
        site = result["sites"][name]
        assert site["data"] == str(root / "data" / synthetic.folder_name(seed, 8, (6, 8), name))
        truth = _bleeding_studies(root / "data" / synthetic.folder_name(seed, 8, (6, 8), name))
        for point in ("card", "calibration"):
            figures = site[point]
            assert figures["tp"] + figures["fn"] == truth and figures["tn"] + figures["fp"] == 8 - truth
            assert figures["passed"] == external.meets(figures)
        assert site["calibration"]["threshold"] == pytest.approx(ModelCard.read(calibrated).thresholds["any"])
        assert site["card"]["threshold"] == ModelCard.read(model).rule().thresholds["any"]
    assert result["passed"] == all(s["calibration"]["passed"] for s in result["sites"].values())
    assert "| site-d (8) |" in err and "calibration threshold" in err and "meeting the bar" in err


def _bleeding_studies(folder) -> int:
    """Bleeding studies of a generated folder, from its labels and headers."""
    from training.data import read_trainset, slice_headers

    trainset = read_trainset(folder)
    studies = slice_headers(trainset.paths).studies
    any_column = trainset.labels[:, LABELS.index("any")]
    return len({s for s, a in zip(studies, any_column) if a > 0.5})


def test_saved_scores_give_the_same_figures_without_the_model(run):
    """`--scores` writes every set's slice scores; `judge` on them reproduces the report."""
    root, model, _, out, _ = run
    result = json.loads(out)
    saved = {p.stem: external.read_scores(p) for p in (root / "scores").glob("*.npz")}
    assert set(saved) == {"calibration", "site-d", "site-e", "site-f", "site-g"}
    assert all(len(saved[name]) == site["studies"] for name, site in result["sites"].items())
    calibration = saved.pop("calibration")
    again = external.judge(result["model"], ModelCard.read(model).rule(), calibration, saved)
    assert again["calibration"]["threshold"] == result["calibration"]["threshold"]
    for name, site in result["sites"].items():
        for point in ("card", "calibration"):
            assert again["sites"][name][point] == site[point]
        assert again["sites"][name]["best_specificity"] == site["best_specificity"]
        band = again["sites"][name]["passing_band"]
        assert (list(band) if band else None) == site["passing_band"]
    joint = joint_band(saved.values(), ModelCard.read(model).rule(), 0.95, 0.85)
    assert result["joint_band"] == (joint and {"band": list(joint), "logits": pytest.approx(
        np.log(joint[1] / (1 - joint[1])) - np.log(joint[0] / (1 - joint[0])))})
    # The threshold's place in calibration's gap moves it between the gap's ends, nothing else.
    low, high = (external.judge(result["model"], ModelCard.read(model).rule(), calibration, saved,
                                placement=f) for f in (0.01, 1.0))
    assert low["calibration"]["gap_placement"] == 0.01 and high["calibration"]["gap_placement"] == 1.0
    assert low["calibration"]["threshold"] <= again["calibration"]["threshold"] <= high["calibration"]["threshold"]
    assert low["calibration"]["tn"] == high["calibration"]["tn"] == again["calibration"]["tn"]
    with pytest.raises(SystemExit) as refused:
        external.main(["--model", str(model), "--gap-placement", "1.5"])
    assert refused.value.code == 2


def test_a_scores_folder_is_judged_again_without_the_model(run, capsys, tmp_path):
    root, model, _, out, _ = run
    result = json.loads(out)
    assert ModelCard.read(root / "scores") == ModelCard.read(model)     # --scores keeps the card
    assert external.main(["--from-scores", str(root / "scores")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["sites"].keys() == result["sites"].keys()
    for name, site in result["sites"].items():
        assert again["sites"][name]["calibration"] == site["calibration"]
        assert again["sites"][name]["card"] == site["card"]
    assert external.main(["--from-scores", str(root / "scores"), "--gap-placement", "1"]) == 0
    edge = json.loads(capsys.readouterr().out)["calibration"]
    assert edge["gap_placement"] == 1 and edge["threshold"] >= result["calibration"]["threshold"]
    (tmp_path / "partial").mkdir()
    shutil.copy(root / "scores" / "calibration.npz", tmp_path / "partial")
    with pytest.raises(SystemExit) as refused:
        external.main(["--from-scores", str(tmp_path / "partial")])
    assert refused.value.code == 2 and "lacks site-d.npz, site-e.npz, site-f.npz, site-g.npz" in capsys.readouterr().err
    # a folder saved before site-g existed: judged on the sites it has, as it was then
    shutil.copytree(root / "scores", tmp_path / "older")
    (tmp_path / "older" / "site-g.npz").unlink()
    assert external.main(["--from-scores", str(tmp_path / "older")]) == 0
    older = json.loads(capsys.readouterr().out)
    assert list(older["sites"]) == ["site-d", "site-e", "site-f"]
    for name, site in older["sites"].items():
        assert site["calibration"] == result["sites"][name]["calibration"]
    assert older["passed"] == all(s["calibration"]["passed"] for s in older["sites"].values())


def test_sets_are_reused_and_check_exits_by_the_bar(run, capsys, caplog):
    root, model, _, out, _ = run
    first = json.loads(out)
    stamps = {p: p.stat().st_mtime_ns for p in (root / "data").glob("*/stage_2_train.csv")}
    caplog.set_level(logging.INFO)
    code = external.main(["--model", str(model), "--root", str(root / "data"), "--check", *ARGS])
    again = json.loads(capsys.readouterr().out)
    assert "scored seed6160-studies8-" in caplog.text and "reusing" in caplog.text, "INFO is captured..."
    assert "generating" not in caplog.text, "...and nothing was generated again"
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and len(stamps) == 5
    assert again["sites"] == first["sites"]
    assert code == (0 if again["passed"] else 1)


def test_bootstrap_share_is_judge_on_each_drawn_calibration_set(run, capsys):
    """Each draw's verdict is `judge`'s on the studies drawn (the same indices), so the share
    is the calibration point's verdict averaged over calibration sets, nothing else."""
    root, model, _, _, _ = run
    saved = {p.stem: external.read_scores(p) for p in (root / "scores").glob("*.npz")}
    calibration = saved.pop("calibration")
    rule = StudyRule("consecutive", 2)
    result = external.bootstrap(rule, calibration, saved, draws=12, size=30, placement=0.3, seed=4)
    rng, verdicts = np.random.default_rng(4), []
    for _ in range(12):
        drawn = StudySet(calibration[i] for i in rng.integers(0, len(calibration), 30))
        verdicts.append(external.judge("m", ModelCard.read(model).rule(), drawn, saved, placement=0.3,
                                       calibrated_rule=rule))
    assert result["passed"] == pytest.approx(np.mean([v["passed"] for v in verdicts]))
    for name in saved:
        assert result["sites"][name] == pytest.approx(
            np.mean([v["sites"][name]["calibration"]["passed"] for v in verdicts]))
    assert result["size"] == 30 and result["rule"] == str(rule)
    # From the command line: the calibration point under another rule, and its bootstrap.
    assert external.main(["--from-scores", str(root / "scores"), "--study-rule", "consecutive-2",
                          "--bootstrap", "5"]) == 0
    out, err = capsys.readouterr()
    again = json.loads(out)
    assert again["calibration"]["rule"].startswith("consecutive-2") and again["bootstrap"]["draws"] == 5
    assert again["bootstrap"]["size"] == len(calibration) and "drawn with replacement" in err
    for bad in (["--study-rule", "auto"], ["--bootstrap", "-1"]):
        with pytest.raises(SystemExit) as refused:
            external.main(["--from-scores", str(root / "scores"), *bad])
        assert refused.value.code == 2


def test_adapt_studies_score_each_site_with_its_own_batchnorm_statistics(tmp_path, monkeypatch):
    """`--adapt-studies N`: each site is scored by the model adapted on N other studies of it
    (its seed + ADAPT_SEED_OFFSET); calibration is scored by the model as it is."""
    from tests.modelfactory import LOOP_ENGINE, random_inception
    from training import adapt

    monkeypatch.setattr(adapt, "MIN_SLICES", 4)
    model = random_inception(tmp_path / "models", engine=LOOP_ENGINE)
    args = ["--model", str(model), "--root", str(tmp_path / "data"), "--studies", "2",
            "--calibration-studies", "4", "--slices", "6", "8", "--workers", "1", "--batch-size", "4"]
    assert external.main([*args, "--scores", str(tmp_path / "plain")]) == 0
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert external.main([*args, "--scores", str(tmp_path / "adapted"), "--adapt-studies", "2"]) == 0
    adapted = json.loads(out.getvalue())["adaptation"]
    assert set(adapted) == {name for name, _ in external.HELDOUT}
    for name, seed in external.HELDOUT:
        assert f"seed{seed + external.ADAPT_SEED_OFFSET}-studies2-" in adapted[name]["data"]
        assert adapted[name]["slices"] >= 8
        plain, own = (np.load(tmp_path / run / f"{name}.npz")["probabilities"]
                      for run in ("plain", "adapted"))
        assert plain.shape == own.shape and np.abs(plain - own).max() > 1e-3, name
    np.testing.assert_array_equal(np.load(tmp_path / "plain" / "calibration.npz")["probabilities"],
                                  np.load(tmp_path / "adapted" / "calibration.npz")["probabilities"])
    monkeypatch.setattr(sys, "stdout", out := io.StringIO())
    assert external.main([*args, "--adapt-studies", "2", "--adapt-normals-only", "--adapt-layers", "2"]) == 0
    normals = json.loads(out.getvalue())["adaptation"]
    for name, _ in external.HELDOUT:     # the same studies, their normal ones' slices only
        assert normals[name]["normals_only"] and normals[name]["batchnorm_layers"] == 2
        assert normals[name]["data"] == adapted[name]["data"]
        assert normals[name]["files"] < adapted[name]["files"]
    for bad in (["--from-scores", str(tmp_path / "plain"), "--adapt-studies", "2"],
                [*args, "--adapt-layers", "2"], [*args, "--adapt-normals-only"],
                [*args, "--adapt-studies", "2", "--adapt-layers", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            external.main(bad)
        assert exit_info.value.code == 2


def test_local_calibration_judges_each_half_as_the_calibrate_tool_would_choose_on_the_other(run, capsys):
    """Each halving's verdicts are `study_metrics` on the judged half at the point chosen on
    the other: the card's as it is, `--normals` (its normal studies only), `--normals` with the
    band [0.88, 0.93] around the card's and `--floors` (through `choose_rule`), so the shares are
    those verdicts averaged, nothing else."""
    from training import studies

    from tests.training.test_studies import make_set

    root, model, _, _, _ = run
    rng = np.random.default_rng(8)      # two sites whose bleeds and normals overlap: halves differ

    def site(shift):
        specs = [(list(rng.uniform(0.01, 0.1, 6)) + [float(rng.beta(6 - shift, 2 + shift))], {6})
                 for _ in range(100)]
        return make_set(specs + [(list(rng.uniform(0.01, 0.1, 6)) + [float(rng.beta(2 + shift, 6 - shift))],
                                  set()) for _ in range(100)])

    saved = {"near": site(0), "far": site(1)}
    # A card that pages on both sites: the band raises it, to another point than the normals'.
    rule = StudyRule("max", 1, {**ModelCard.read(model).rule().thresholds, "any": 0.3})
    result = external.local_calibration(rule, saved, halvings=6, seed=3)
    assert any(0 < v < 1 for s in result["sites"].values() for v in s.values()), "halves differ"
    for name, site in saved.items():
        rng, met = np.random.default_rng(3), {"card": [], "normals": [], "band": [], "floors": []}
        auc = studies.study_metrics(site, rule)["auc"]
        for _ in range(6):
            order = rng.permutation(len(site))
            mine = StudySet(site[i] for i in order[:len(site) // 2])
            other = StudySet(site[i] for i in order[len(site) // 2:])
            normal = mine.scores(rule)[mine.truth()[:, -1] < 0.5, -1]
            low, high = (studies.specificity_threshold(normal, s) for s in (0.88, 0.93))
            points = {"card": rule,
                      "normals": rule.with_thresholds({**rule.thresholds, "any": studies.specificity_threshold(
                          normal, 0.9)}),
                      "band": rule.with_thresholds({**rule.thresholds, "any": min(max(rule.thresholds["any"], low), high)}),
                      "floors": studies.choose_rule(mine, 0.95, [(rule.name, rule.k)], floors=(0.95, 0.85))[0]}
            for point, chosen in points.items():
                m = studies.study_metrics(other, chosen)
                met[point].append(external.meets({**m, "auc": auc}))
        assert result["sites"][name] == pytest.approx({p: np.mean(v) for p, v in met.items()})
    assert result["mean"]["normals"] == pytest.approx(np.mean([s["normals"] for s in result["sites"].values()]))
    assert external.main(["--from-scores", str(root / "scores"), "--halvings", "4"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["local"]["halvings"] == 4 and "calibrated on half of each site's own" in err
    with pytest.raises(SystemExit) as refused:
        external.main(["--from-scores", str(root / "scores"), "--halvings", "-1"])
    assert refused.value.code == 2
