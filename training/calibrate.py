"""`python -m training.calibrate`: choose a model's operating point on a new site's own studies.

A model moved to another hospital usually keeps its ranking (study AUC) but not its operating
point: its scores shift with the scanner, so a threshold chosen on the training site's
calibration studies pages on normal studies there (measured on held-out phantom site-e: study
AUC 0.99, and 21 of 29 normal studies alerted at the shipped threshold). Calibrating on a few
dozen labelled local studies fixes that without retraining: the same network, thresholds chosen
on local studies with the same rule and method as training (`training.studies.choose_rule`,
split-conformal for the `any` study recall), written as a new artifact version beside the old
one.

    python -m training.calibrate --model models/current --data /data/local-labelled --promote

A site with normal studies but too few labelled bleeds can set the `any` threshold from those
alone: `--normals DIR` (any layout of DICOM files, every study reported normal). It keeps the
card's threshold where those studies say it keeps, on average, between 0.88 and 0.93 of the
site's new normal studies silent, and otherwise moves it to the nearer end of that band
(`training.studies.band_threshold`, `--specificity LO HI`), down as well as up: a threshold that
suits the site is not traded for one sampled from its normals (docs/training.md, H14).
`--specificity S` places it at S whatever the card said (`specificity_threshold`). Recall at
the site is not measured, and the card says so.

    python -m training.calibrate --model models/current --normals /data/local-normals --promote

The new card keeps the training figures and adds `site_calibration` (the folder, its studies
and the figures on it). The figures on the calibration studies themselves are optimistic;
report the site's figures on other local studies (`python -m training.evaluate`).
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)

#: Fewer labelled local studies than this of either kind cannot place a threshold.
MIN_STUDIES = 5
#: `--normals`: fewer normal studies than this place a specificity threshold on one or two of
#: them. With about 70, the threshold aimed at 0.90 keeps 0.85 on others 9 times in 10
#: (docs/training.md, "Calibrating on a site's normal studies alone").
MIN_NORMAL_STUDIES = 20
#: `--normals`: the shares of the site's new normal studies kept silent between which the
#: card's threshold is kept (docs/training.md, H14); one share S is the band (S, S).
SPECIFICITY: tuple[float, float] = (0.88, 0.93)
#: `--normals`: files scored at most (every slice of every study is needed; about 5000 studies).
MAX_NORMAL_FILES = 200_000


def calibrate(model_dir: Path, data_dir: Path, out: Path, version: str | None = None,
              target_recall: float = 0.95, study_rule: str = "keep", batch_size: int = 32,
              workers: int = 2, confidence: float | None = None, placement: float | None = None,
              floors: tuple[float, float] | None = None) -> Path:
    """Write `<out>/<version>`: the model of `model_dir` with thresholds chosen on `data_dir`."""
    from ich.model import load_artifact
    from training import evaluate, studies

    model, card = load_artifact(model_dir)
    version = free_version(out, version or stamped(f"{card.version}-site"))
    local, y, p, _, decoder = labelled_studies(evaluate.compiled_forward(model), card.input_size,
                                            data_dir, batch_size, workers)
    truth = local.truth()[:, -1]
    positive, normal = int(truth.sum()), int(len(truth) - truth.sum())
    if study_rule == "keep":
        rule = card.rule()
        candidates = ((rule.name, rule.k),)
    else:
        candidates = studies.candidates(study_rule)
    rule, table = studies.choose_rule(local, target_recall, candidates, confidence, placement, floors)
    slice_thresholds = evaluate.choose_thresholds(y, p, target_recall)
    site = {"data": str(data_dir), "from_version": card.version, "target_recall": target_recall,
            "recall_confidence": table[0]["recall_confidence"] if table else None,
            "floors": list(floors) if floors else None,
            "studies": len(local), "positive_studies": positive, "normal_studies": normal,
            "decode": decoder.report(), "rules": table,
            "study_before": studies.study_metrics(local, card.rule()),
            "study_after": studies.study_metrics(local, rule)}
    new = replace(card, version=version, thresholds=dict(rule.thresholds),
                  study_rule=rule.describe(), slice_thresholds=slice_thresholds,
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  metrics={**card.metrics, "site_calibration": site},
                  notes=(card.notes + f" Operating point re-chosen on {positive + normal} labelled "
                         f"studies of the site ({data_dir}) by python -m training.calibrate; the "
                         "network is unchanged and its training figures are above.").strip())
    folder = _write_version(model_dir, new, Path(out))
    before, after = site["study_before"], site["study_after"]
    if confidence and site["recall_confidence"] is not None and site["recall_confidence"] < confidence:
        log.warning("%d local bleeding studies cannot hold recall >= %s with confidence %s: the "
                    "weakest is kept (confidence %s); more bleeding studies raise it (%d reach it)",
                    positive, target_recall, confidence, site["recall_confidence"],
                    _enough(target_recall, confidence))
    room = next((row["floor_room"] for row in table if row["rule"] == str(rule)), 0.0) if floors else 0.0
    if room < 0:
        log.warning("no threshold meets recall >= %s and specificity >= %s on these %d studies: "
                    "the one nearest both is kept (%.3f short); the model's ranking here leaves "
                    "no room for those floors", *floors, len(local), -room)
    log.info("site calibration on %d studies: %s -> %s; alerts on normal studies %d -> %d, "
             "bleeds alerted %d -> %d", len(local), card.rule(), rule, before["fp"], after["fp"],
             before["tp"], after["tp"])
    return folder


def calibrate_normals(model_dir: Path, normals_dir: Path, out: Path, version: str | None = None,
                      band: tuple[float, float] = SPECIFICITY, batch_size: int = 32,
                      workers: int = 2) -> Path:
    """Write `<out>/<version>`: the model of `model_dir` with its `any` threshold placed on the
    normal studies of `normals_dir`, under the card's rule; subtypes and slice thresholds kept.
    `band` (LO, HI): the card's threshold is kept within it; (S, S) places the point S."""
    from ich.labels import ANY
    from ich.model import load_artifact
    from training import evaluate, studies

    model, card = load_artifact(model_dir)
    version = free_version(out, version or stamped(f"{card.version}-site"))
    local, decoder = normal_studies(evaluate.compiled_forward(model), card.input_size, normals_dir,
                                    batch_size, workers)
    rule = card.rule()
    scores = local.scores(rule)[:, -1]
    before = float(rule.thresholds[ANY])    # what a worker compares, defaults included
    low, high = band
    threshold = studies.band_threshold(scores, before, low, high)
    target = low if low == high else [low, high]
    site = {"method": "normal studies only", "data": str(normals_dir), "from_version": card.version,
            "specificity_target": target, "studies": len(local), "normal_studies": len(local),
            "positive_studies": 0, "slices": int(sum(len(s.labels) for s in local)),
            "rule": str(rule), "threshold_before": before, "threshold_after": threshold,
            "moved": "kept" if threshold == before else "raised" if threshold > before else "lowered",
            "shift_logits": round(float(evaluate.logit(threshold) - evaluate.logit(before)), 4),
            "alerting_before": int((scores >= before).sum()),
            "alerting_after": int((scores >= threshold).sum()),
            "recall": None, "decode": decoder.report()}
    new = replace(card, version=version, thresholds={**card.thresholds, ANY: threshold},
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  metrics={**card.metrics, "site_calibration": site},
                  notes=(card.notes + f" The any threshold was placed on {len(local)} normal "
                         f"studies of the site ({normals_dir}) by python -m training.calibrate "
                         f"--normals, for specificity {target} on new ones; recall at the "
                         "site was not measured. The network is unchanged and its training "
                         "figures are above.").strip())
    folder = _write_version(model_dir, new, Path(out))
    log.info("any threshold from %d normal studies of the site: %.4g -> %.4g (%s, %+.2f logits); "
             "normal studies alerting there %d -> %d; recall at the site is not measured",
             len(local), before, threshold, site["moved"], site["shift_logits"],
             site["alerting_before"], site["alerting_after"])
    return folder


def stamped(name: str) -> str:
    """The default name of a new version: `name`-<UTC time> (a site's version, an ensemble)."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def free_version(out: Path, version: str) -> str:
    """`version`, refused if `<out>/<version>` exists: checked before minutes of scoring (the
    site tools and `training.ensemble`), not after."""
    if (Path(out) / version).exists():
        raise FileExistsError(f"{Path(out) / version} exists; name another --version")
    return version


def _write_version(model_dir: Path, card, out: Path) -> Path:
    """`<out>/<card.version>`: the network of `model_dir`, byte for byte, with `card`."""
    from ich.model import MODEL_FILE

    folder = out / card.version
    folder.mkdir(parents=True, exist_ok=False)
    shutil.copy2(Path(model_dir).resolve() / MODEL_FILE, folder / MODEL_FILE)
    card.write(folder)
    return folder


def normal_studies(forward, input_size: int, normals_dir: Path, batch_size: int = 32,
                   workers: int = 2):
    """(StudySet, decoder) of a folder of studies reported normal, scored by `forward`: any
    layout of DICOM files, or an RSNA-layout folder whose labels must then all be normal.
    Refused with fewer than MIN_NORMAL_STUDIES studies or more than MAX_NORMAL_FILES files,
    before anything is scored."""
    import numpy as np

    from ich.labels import LABELS
    from training import evaluate, studies
    from training.adapt import slice_files
    from training.data import TRAIN_CSV, Decoder, Slices, read_trainset, slice_headers

    normals_dir = Path(normals_dir)
    if not normals_dir.is_dir():
        raise ValueError(f"{normals_dir} is not a folder")
    labelled = None
    if (normals_dir / TRAIN_CSV).is_file():
        trainset = read_trainset(normals_dir)
        paths, labelled = list(trainset.paths), trainset.labels[:, -1]
    else:
        paths, listed = slice_files(normals_dir, MAX_NORMAL_FILES + 1)
        if listed > MAX_NORMAL_FILES:
            raise ValueError(f"{normals_dir} holds {listed} files; at most {MAX_NORMAL_FILES} are "
                             "scored (every slice of each study): give fewer studies")
    headers = slice_headers(paths)
    if labelled is not None:
        bleeding = {str(uid) for uid, y in zip(headers.studies, labelled) if y > 0.5}
        if bleeding:
            raise ValueError(f"{normals_dir} labels {len(bleeding)} studies as bleeding: --normals "
                             "takes only studies reported normal (use --data for labelled ones)")
    found = len({uid for uid in headers.studies if not str(uid).startswith("unreadable:")})
    if found < MIN_NORMAL_STUDIES:
        raise ValueError(f"{normals_dir} holds {found} studies; at least {MIN_NORMAL_STUDIES} "
                         "normal studies are needed to place a specificity threshold")
    paths = np.asarray(paths, dtype=object)
    none = np.zeros((len(paths), len(LABELS)), np.float32)
    slices = Slices(np.array([f"slice{i}" for i in range(len(paths))]), paths, none)
    decoder = Decoder(list(paths), input_size)
    rows, p = evaluate.predict_rows(forward, slices, decoder, batch_size, workers)
    local = studies.StudySet.build(none[rows], p[:, :len(LABELS)], headers.take(rows))
    if len(local) < MIN_NORMAL_STUDIES:
        raise ValueError(f"{normals_dir}: {len(local)} studies with a decodable CT slice; at least "
                         f"{MIN_NORMAL_STUDIES} are needed (skipped: {decoder.report()['reasons']})")
    return local, decoder


def labelled_studies(forward, input_size: int, data_dir: Path, batch_size: int = 32,
                     workers: int = 2):
    """(StudySet, labels, probabilities, headers, decoder) of an RSNA-layout folder scored by `forward`,
    refused with fewer than MIN_STUDIES bleeding or normal studies: too few to place a threshold.
    The studies are built from the first len(LABELS) columns; further columns (an ensemble's
    members, `training.ensemble`) are returned with them."""
    from ich.labels import LABELS
    from training import evaluate, studies

    _, _, y, p, headers, decoder = evaluate.predict_folder(forward, input_size, data_dir,
                                                           batch_size, workers)
    local = studies.StudySet.build(y, p[:, :len(LABELS)], headers)
    truth = local.truth()[:, -1]
    positive, normal = int(truth.sum()), int(len(truth) - truth.sum())
    if positive < MIN_STUDIES or normal < MIN_STUDIES:
        raise ValueError(f"{data_dir} has {positive} bleeding and {normal} normal studies; "
                         f"at least {MIN_STUDIES} of each are needed to choose an operating point")
    return local, y, p, headers, decoder


def operating_point_problem(args) -> str | None:
    """What is wrong with the operating-point options calibrate and ensemble share
    (--target-recall, --recall-confidence, --gap-placement, --floors), or None."""
    from training.studies import check_placement

    if not 0 < args.target_recall <= 1:
        return "--target-recall must be in (0, 1]"
    if not 0 <= args.recall_confidence < 1:
        return "--recall-confidence must be in [0, 1)"
    try:
        check_placement(args.gap_placement)
    except ValueError as exc:
        return f"--gap-placement: {exc}"
    if args.floors is None:
        return None
    if not all(0 < f <= 1 for f in args.floors):    # NaN fails the comparison: refused too
        return "--floors: recall and specificity must be in (0, 1]"
    if args.recall_confidence or args.gap_placement is not None:
        return "--floors chooses the threshold itself; drop --recall-confidence and --gap-placement"
    return None


def _normals_problem(args) -> str | None:
    """What is wrong with --normals and --specificity as given, or None."""
    if args.specificity is not None and not args.normals:
        return "--specificity goes with --normals (labelled studies: --floors)"
    if not args.normals:
        return None
    if args.specificity is not None:
        if len(args.specificity) > 2 or not all(0 < s < 1 for s in args.specificity):
            return "--specificity is one share S or a band LO HI, each in (0, 1)"
        if args.specificity != sorted(args.specificity):
            return "--specificity LO HI: LO must not be above HI"
    others = [flag for flag, given in (("--floors", args.floors), ("--recall-confidence", args.recall_confidence),
                                       ("--gap-placement", args.gap_placement is not None),
                                       ("--study-rule", args.study_rule != "keep")) if given]
    if others:
        return (f"--normals places the any threshold from normal studies under the card's rule; "
                f"drop {', '.join(others)}")
    return None


def _enough(target_recall: float, confidence: float) -> int:
    """The fewest bleeding studies with which recall >= R can be held with `confidence`."""
    from training.studies import conformal_rank

    p = 1
    while conformal_rank(p, target_recall, confidence)[1] < confidence:
        p += 1
    return p


def main(argv=None) -> int:
    from ich.model import ArtifactError, promote_ok
    from training.data import DataError

    p = argparse.ArgumentParser(prog="python -m training.calibrate",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="artifact folder (e.g. models/current)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path,
                        help="the site's labelled RSNA-layout folder (stage_2_train.csv + stage_2_train/)")
    source.add_argument("--normals", type=Path, metavar="DIR",
                        help="instead: studies of the site reported normal, any layout of DICOM "
                             f"files (at least {MIN_NORMAL_STUDIES}); only the any threshold moves, "
                             "to --specificity on them, under the card's rule; recall is not measured")
    p.add_argument("--specificity", type=float, nargs="+", metavar="S",
                   help=f"with --normals: the share of the site's new normal studies kept silent, "
                        "on average; or LO HI: keep the card's threshold where they put its "
                        "specificity within the band, else the nearer end (default "
                        f"{SPECIFICITY[0]} {SPECIFICITY[1]})")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="study recall to keep on new studies of the site (default 0.95)")
    p.add_argument("--recall-confidence", type=float, default=0.0, metavar="C",
                   help="how sure that recall must be, e.g. 0.9 (default 0: on average); with "
                        "few local bleeding studies the weakest is kept and the card says how "
                        "sure that is")
    p.add_argument("--gap-placement", type=float, metavar="F",
                   help="where the any threshold sits in the gap, in logits, in (0, 1]: 0 is the "
                        "highest normal study below the ranked bleed, 1 that bleed (default: "
                        "training.studies.GAP_PLACEMENT)")
    p.add_argument("--floors", type=float, nargs=2, metavar=("RECALL", "SPECIFICITY"),
                   help="choose the any threshold with the most room above both floors on these "
                        "studies (e.g. 0.95 0.85, issue 12's bar) instead of aiming recall at "
                        "--target-recall exactly; met the bar more often on a site's own studies "
                        "(docs/training.md); not with --recall-confidence or --gap-placement")
    p.add_argument("--study-rule", default="keep",
                   help="keep (the card's rule, default) | auto | max | consecutive-K | topk-K")
    p.add_argument("--out", type=Path, default=Path("models"), help="artifact root (default models)")
    p.add_argument("--version", help="new version (default <model version>-site-<UTC time>)")
    p.add_argument("--promote", action="store_true", help="point <out>/current at the new version")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = operating_point_problem(args) or _normals_problem(args)
    if problem:
        p.exit(2, f"error: {problem}\n")
    try:
        if args.normals:
            folder = calibrate_normals(args.model, args.normals, args.out, args.version,
                                       (args.specificity[0], args.specificity[-1]) if args.specificity else SPECIFICITY,
                                       args.batch_size, args.workers)
        else:
            folder = calibrate(args.model, args.data, args.out, args.version, args.target_recall,
                               args.study_rule, args.batch_size, args.workers,
                               args.recall_confidence or None, args.gap_placement,
                               tuple(args.floors) if args.floors else None)
    except (ArtifactError, DataError, ValueError, FileExistsError, OSError) as exc:
        p.exit(2, f"error: {exc}\n")
    from ich.model import ModelCard

    card = ModelCard.read(folder)
    if args.promote:
        try:
            promote_ok(folder, args.out / "current")
        except ArtifactError as exc:
            p.exit(3, f"error: {exc}\n")
    site = card.metrics["site_calibration"]
    if args.normals:
        print(json.dumps({"artifact": str(folder), **{k: site[k] for k in (
            "rule", "specificity_target", "normal_studies", "threshold_before", "threshold_after",
            "moved", "shift_logits", "alerting_before", "alerting_after", "recall")}}, indent=2))
        return 0
    print(json.dumps({"artifact": str(folder), "study_rule": card.study_rule,
                      "thresholds": card.thresholds,
                      "recall_confidence": site["recall_confidence"], "floors": site["floors"],
                      "on_calibration_studies": {
                          k: {m: site[k][m] for m in ("recall", "specificity", "tp", "fn", "tn", "fp")}
                          for k in ("study_before", "study_after")}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
