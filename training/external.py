"""`python -m training.external`: issue 12's external validation of a model, in one command.

A model is judged at study level on sites it never saw, with its operating point chosen on
separate calibration studies, never by its own test split alone (docs/training.md, "Sites").
This generates the project's standard held-out sets once (`HELDOUT`: site-d to site-g, 300
studies each) and the calibration studies (`CALIBRATION_SEED`, the training site's own
distribution without the faint-bleed emphasis, 160 studies), scores them, re-chooses the `any`
threshold on the calibration studies under the card's study rule (as `training.calibrate` does,
nothing written), and reports every site at the card's operating point and at the calibration
studies' one against issue 12's bar (`BAR`), with the band of `any` thresholds that
would have met it on each site (None: the ranking fails; a band that misses the chosen
threshold: the operating point does) and on every site at once (`joint_band`: its width in
logits is how much room the model leaves across sites, whatever calibration chose). Every figure in docs/training.md since the sixth
session was measured on these sets.

    python -m training.external --model models/current     # JSON on stdout, a table on stderr
    python -m training.external --model models/current --scores var/external/current
                                                            # and each set's slice scores (.npz)
    python -m training.external --from-scores var/external/current --gap-placement 0.3
                                                            # judged again from them, no model
    python -m training.external --from-scores var/external/current --halvings 200
                                                            # and each site calibrated on half of
                                                            # its own studies (training.calibrate)
    python -m training.external --model models/current --adapt-studies 120
                                                            # research: each site scored after AdaBN
                                                            # on 120 other studies of it (training.adapt)

Saved scores (`read_scores`, `judge_saved`) go back through `judge` without a model: to try
another operating-point choice, compare models on the same studies, look at the studies one
missed, or try a combination of models offline.

About 15-20 minutes on 2 CPU cores (generation 4, scoring 12-16); the sets are reused afterwards.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.studies import StudySet

log = logging.getLogger(__name__)

#: The held-out sites and their seeds: site-d and site-e lie outside training on several axes,
#: site-f on skull-base streaks only, site-g adds a clip or coil to every study
#: (`training.synthetic.SITES`). Score folders from before site-g are judged without it.
HELDOUT: tuple[tuple[str, int], ...] = (("site-d", 9960), ("site-e", 5360), ("site-f", 6160),
                                        ("site-g", 7160))
#: Calibration studies are drawn from the training site with this seed (no faint emphasis: the
#: operating point should sit on the site's natural mix of bleeds, not training's).
CALIBRATION_SEED = 7777
#: `--adapt-studies`: a site's unlabelled adaptation studies use its seed plus this (other
#: patients of the same site; docs/training.md, "Adapting BatchNorm").
ADAPT_SEED_OFFSET = 1
#: Issue 12's bar on a held-out site at the calibration studies' operating point.
BAR = {"auc": 0.97, "recall": 0.95, "specificity": 0.85}


def dataset(root: Path, site, seed: int, studies: int, slices: tuple[int, int], workers: int) -> Path:
    """The folder of `studies` phantoms of `site` under `root`, named as training names its own
    (`folder_name`), generated unless a complete one is there."""
    from training.synthetic import folder_name, generate_once

    return generate_once(Path(root) / folder_name(seed, studies, slices, site), studies, seed, slices,
                         site, workers)


def meets(figures: dict) -> bool:
    """Study AUC, recall and specificity all at or above `BAR`."""
    return all(figures.get(key) is not None and figures[key] >= BAR[key] for key in BAR)


def validate(model_dir: Path, sets: dict[str, Path], calibration: Path, target_recall: float = 0.95,
             confidence: float | None = None, batch_size: int = 32, workers: int = 2,
             scores: Path | None = None, placement: float | None = None,
             adapt: dict[str, Path] | None = None, adapt_layers: int | None = None,
             adapt_normals_only: bool = False, **judging) -> dict:
    """Each of `sets` at the card's operating point and at the one `calibration` gives the
    card's rule; `passed` when every set meets `BAR` at the latter. With `scores`, each set's
    per-slice scores are also written there (`write_scores`). With `adapt` ({site: folder of
    other studies of it}), each such site is scored by the model with BatchNorm statistics of
    that folder (`training.adapt`, labels unread), in its first `adapt_layers` BatchNorm layers
    (None: all), or from the folder's normal studies only (`adapt_normals_only`: labels pick
    them, as a site where bleeds are rare); calibration keeps the model's own, as a site
    adapting without labels would. `judging`: `judge`'s options."""
    import tempfile

    from ich.model import load_artifact
    from training import evaluate, studies
    from training.adapt import adapt as adapt_model

    model, card = load_artifact(model_dir)
    forward = evaluate.compiled_forward(model)
    if scores is not None:      # the card beside the scores: `judge_saved` needs nothing else
        Path(scores).mkdir(parents=True, exist_ok=True)
        card.write(Path(scores))
    adapted: dict[str, dict] = {}

    def study_set(name: str, folder: Path, scorer=forward) -> "studies.StudySet":
        start = time.perf_counter()
        _, _, y, p, headers, _ = evaluate.predict_folder(scorer, card.input_size, folder, batch_size, workers)
        scored = studies.StudySet.build(y, p, headers)
        log.info("scored %s: %d studies, %d slices in %.0f s", folder.name, len(scored), len(y),
                 time.perf_counter() - start)
        if scores is not None:
            write_scores(Path(scores) / f"{name}.npz", y, p, headers, folder)
        return scored

    def site_set(name: str, folder: Path) -> "studies.StudySet":
        if name not in (adapt or {}):
            return study_set(name, folder)
        with tempfile.TemporaryDirectory() as tmp:
            source = (_normal_studies(Path(adapt[name]), Path(tmp) / "normals") if adapt_normals_only
                      else Path(adapt[name]) / "stage_2_train")
            own, own_card = load_artifact(adapt_model(model_dir, source, Path(tmp) / "models",
                                                      f"{card.version}-{name}", batch_size=batch_size,
                                                      workers=workers, layers=adapt_layers))
            info = own_card.metrics["site_adaptation"]
            adapted[name] = {"data": str(adapt[name]), "normals_only": adapt_normals_only,
                             **{k: info[k] for k in ("slices", "files", "batchnorm_layers")}}
            return study_set(name, folder, evaluate.compiled_forward(own))

    calibrated = study_set("calibration", calibration)
    result = judge(card.version, card.rule(), calibrated,
                   {name: site_set(name, folder) for name, folder in sets.items()},
                   target_recall, confidence,
                   {"calibration": str(calibration), **{n: str(f) for n, f in sets.items()}}, placement,
                   **judging)
    if adapt:
        result["adaptation"] = adapted
    return result


def _normal_studies(folder: Path, out: Path) -> Path:
    """`out`, holding links to the slices of `folder`'s (RSNA layout) normal studies only."""
    import os

    from training.data import read_trainset, slice_headers

    trainset = read_trainset(folder)
    uids = slice_headers(trainset.paths).studies
    bleeding = {uid for uid, y in zip(uids, trainset.labels[:, -1]) if y > 0.5}
    out.mkdir(parents=True)
    for path, uid in zip(trainset.paths, uids):
        if uid not in bleeding:
            os.symlink(Path(path).resolve(), out / Path(path).name)
    return out


def judge(version: str, rule, calibration: "StudySet", sites: dict[str, "StudySet"],
          target_recall: float = 0.95, confidence: float | None = None,
          sources: dict[str, str] | None = None, placement: float | None = None,
          calibrated_rule=None, draws: int = 0, draw_size: int | None = None,
          halvings: int = 0) -> dict:
    """The figures of `validate` from scored studies: `rule` (the card's) as it stands, and
    with its `any` threshold re-chosen on `calibration` (under `calibrated_rule` instead, when
    given: another rule's operating point, judged beside the card's). With `draws`, also
    `bootstrap`'s share of calibration sets that would meet the bar. Takes any scores, so models
    can be compared, or combined, from saved scores (`read_scores`) without scoring again.
    With `halvings`, also `local_calibration`: each site calibrated on half of its own studies."""
    from training import studies
    from training.evaluate import logit

    sources = sources or {}
    base = calibrated_rule or rule
    chosen, rows = studies.choose_rule(calibration, target_recall, ((base.name, base.k),), confidence,
                                       placement)
    points = {"card": rule, "calibration": chosen}
    result = {"model": version, "bar": BAR, "target_recall": target_recall,
              "calibration": {"data": sources.get("calibration"), **(rows[0] if rows else {})},
              "sites": {}}
    for name, site in sites.items():   # the band and best specificity of the rule calibrated
        figures = {"data": sources.get(name), "studies": len(site),
                   "best_specificity": studies.best_specificity(site, base, BAR["recall"]),
                   "passing_band": studies.passing_band(site, base, BAR["recall"], BAR["specificity"])}
        for point, r in points.items():
            m = studies.study_metrics(site, r)
            figures[point] = {**{k: m[k] for k in ("rule", "auc", "recall", "specificity", "tp", "fn",
                                                   "tn", "fp")},
                              "threshold": r.thresholds["any"], "passed": meets(m)}
        result["sites"][name] = figures
    result["passed"] = all(s["calibration"]["passed"] for s in result["sites"].values())
    joint = studies.joint_band(sites.values(), base, BAR["recall"], BAR["specificity"])
    result["joint_band"] = (None if joint is None else
                            {"band": list(joint), "logits": float(logit(joint[1]) - logit(joint[0]))})
    if draws:
        result["bootstrap"] = bootstrap(base, calibration, sites, draws, draw_size, target_recall,
                                        confidence, placement)
    if halvings:
        result["local"] = local_calibration(rule, sites, halvings)
    return result


def local_calibration(rule, sites: dict[str, "StudySet"], halvings: int, seed: int = 0,
                      specificity: float = 0.90, floors: tuple[float, float] = (0.95, 0.85),
                      band: tuple[float, float] | None = None) -> dict:
    """How often calibrating a site on its own studies meets BAR on its other studies.

    Each site's studies are halved `halvings` times (a fresh `default_rng(seed)` per site,
    halving h its h-th `permutation`: the first half calibrates, the rest are judged). Under
    `rule` (the card's), four points are judged on the same halves: the card's `any` threshold
    as it is; "normals", `training.calibrate --normals --specificity S` (`specificity_threshold`
    on the calibrating half's normal studies: no labelled bleeds); "band", `--normals` as it
    ships (`band_threshold`, default `calibrate.SPECIFICITY`: the card's kept where those normals
    allow it, H14); and "floors", `--data --floors` (`floors_threshold` on the whole labelled
    half). The share of halvings meeting the bar, per site and averaged over sites:
    how often the deployment step works, not one lucky split (docs/training.md, H12)."""
    import numpy as np

    from training import calibrate, studies

    if halvings < 1:
        raise ValueError(f"local calibration needs at least one halving, not {halvings}")
    band = band or calibrate.SPECIFICITY
    card = rule.thresholds["any"]
    points = ("card", "normals", "band", "floors")
    shares: dict[str, dict[str, float]] = {}
    for name, site in sites.items():
        y, s = site.truth()[:, -1] > 0.5, site.scores(rule)[:, -1]
        auc = studies.auc(y, s)
        rng, met = np.random.default_rng(seed), dict.fromkeys(points, 0)
        for _ in range(halvings):
            order = rng.permutation(len(y))
            mine, other = order[:len(y) // 2], order[len(y) // 2:]
            normals = s[mine][~y[mine]]
            chosen = {"card": card, "normals": studies.specificity_threshold(normals, specificity),
                      "band": studies.band_threshold(normals, card, *band),
                      "floors": studies.floors_threshold(y[mine], s[mine], *floors)[0]}
            for point, t in chosen.items():
                met[point] += t is not None and meets(_at(y[other], s[other], t, auc))
        shares[name] = {point: n / halvings for point, n in met.items()}
    mean = {point: sum(site[point] for site in shares.values()) / len(shares) for point in points}
    return {"rule": str(rule), "halvings": halvings, "seed": seed, "specificity": specificity,
            "band": list(band), "floors": list(floors), "sites": shares, "mean": mean}


def bootstrap(rule, calibration: "StudySet", sites: dict[str, "StudySet"], draws: int,
              size: int | None = None, target_recall: float = 0.95, confidence: float | None = None,
              placement: float | None = None, seed: int = 0) -> dict:
    """How much of the calibration point's verdict is the luck of which studies calibrated.

    The calibration studies are drawn with replacement `draws` times (`size` each, default as
    many as there are; draw d is `default_rng(seed)`'s d-th `integers(0, n, size)`), the `any`
    threshold is chosen on each draw exactly as `judge` chooses it under `rule`, and the share of
    draws meeting BAR is reported per site and on every site at once. A draw without bleeding
    studies chooses nothing and fails. Drawing more studies than there are treats the set as
    its population: the direction a larger set moves the verdict, not its exact figure."""
    import numpy as np

    from training import studies

    if draws < 1:
        raise ValueError(f"bootstrap needs at least one draw, not {draws}")
    size = size or len(calibration)
    y, s = calibration.truth()[:, -1] > 0.5, calibration.scores(rule)[:, -1]
    truth = {name: site.truth()[:, -1] > 0.5 for name, site in sites.items()}
    scores = {name: site.scores(rule)[:, -1] for name, site in sites.items()}
    auc = {name: studies.auc(truth[name], scores[name]) for name in sites}
    place = studies.GAP_PLACEMENT if placement is None else placement
    rng, passed, every = np.random.default_rng(seed), dict.fromkeys(sites, 0), 0
    for _ in range(draws):
        draw = rng.integers(0, len(y), size)
        t, _ = studies.study_threshold(y[draw], s[draw], target_recall, confidence, place)
        ok = {name: t is not None and meets(_at(truth[name], scores[name], min(max(t, 1e-7), 1 - 1e-7),
                                                auc[name])) for name in sites}
        for name in sites:
            passed[name] += ok[name]
        every += all(ok.values())
    return {"rule": str(rule), "draws": draws, "size": size, "seed": seed,
            "passed": every / draws, "sites": {name: n / draws for name, n in passed.items()}}


def _at(truth, scores, threshold: float, auc: float | None) -> dict:
    """`meets`' figures of one site's `any` study scores at `threshold` (as `choose_rule` clamps it)."""
    recall = float((scores[truth] >= threshold).mean()) if truth.any() else None
    specificity = float((scores[~truth] < threshold).mean()) if (~truth).any() else None
    return {"auc": auc, "recall": recall, "specificity": specificity}


def write_scores(path: Path, labels, probabilities, headers, folder: Path) -> Path:
    """One set's per-slice labels and probabilities (model label order) with the header fields
    the study rule needs, as .npz: what error analysis and model comparisons start from."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, labels=np.asarray(labels, np.float32),
                        probabilities=np.asarray(probabilities, np.float32),
                        studies=headers.studies, series=headers.series,
                        positions=headers.positions, instances=headers.instances,
                        folder=np.array(str(folder)))
    return path


def read_scores(path: Path) -> "StudySet":
    """The studies `write_scores` saved."""
    import numpy as np

    from training.data import Headers
    from training.studies import StudySet

    with np.load(path, allow_pickle=False) as f:
        headers = Headers(f["studies"], f["series"], f["positions"], f["instances"])
        return StudySet.build(f["labels"], f["probabilities"], headers)


def judge_saved(folder: Path, target_recall: float = 0.95, confidence: float | None = None,
                placement: float | None = None, **judging) -> dict:
    """`judge` on a `--scores` folder (its card, `calibration.npz` and the HELDOUT sites' .npz
    it holds: folders saved before a site existed are judged on the others, and say so): the
    report again, or at another operating-point choice, in seconds and without the model
    (docs/external-scores keeps such folders)."""
    from ich.model import ModelCard

    folder = Path(folder)
    missing = [n for n in ["calibration", *(name for name, _ in HELDOUT)]
               if not (folder / f"{n}.npz").is_file()]
    held = [name for name, _ in HELDOUT if name not in missing]
    if "calibration" in missing or not held:
        raise ValueError(f"{folder} lacks {', '.join(f'{n}.npz' for n in missing)}: not a --scores folder")
    if missing:
        log.warning("%s holds no scores of %s: judged on %s only", folder, ", ".join(missing),
                    ", ".join(held))
    names = ["calibration", *held]
    card = ModelCard.read(folder)
    sets = {name: read_scores(folder / f"{name}.npz") for name in names}
    calibration = sets.pop("calibration")
    return judge(card.version, card.rule(), calibration, sets, target_recall, confidence,
                 {name: str(folder / f"{name}.npz") for name in names}, placement, **judging)


def table(result: dict) -> str:
    """The result as a markdown table: bleeds alerted and normals silent at each point."""
    def cell(p: dict) -> str:
        return (f"{p['tp']}/{p['tp'] + p['fn']}, {p['tn']}/{p['tn'] + p['fp']} "
                + ("✓" if p["passed"] else "✗"))

    chosen = result["calibration"]
    lines = [f"{result['model']}: calibration threshold {_p(chosen.get('threshold', 0))}"
             + (f" (gap placement {chosen['gap_placement']})" if "gap_placement" in chosen else ""),
             "| site | study AUC | best specificity at recall 0.95 | `any` thresholds meeting the bar "
             "| card's point | calibration point |",
             "|---|---|---|---|---|---|"]
    for name, s in result["sites"].items():
        auc, best, band = s["card"]["auc"], s["best_specificity"], s.get("passing_band")
        band = f"({_p(*band)}]" if band else "none"
        lines.append(f"| {name} ({s['studies']}) | {_fmt(auc)} | {_fmt(best)} | {band} | {cell(s['card'])} | "
                     f"{cell(s['calibration'])} |")
    joint = result.get("joint_band")
    lines.append(f"`any` thresholds meeting the bar on every site at once: ("
                 f"{_p(*joint['band'])}], {joint['logits']:.2f} logits wide" if joint
                 else "no `any` threshold meets the bar on every site at once")
    lines.append("bar met at the calibration point on every site" if result["passed"]
                 else "bar NOT met at the calibration point on every site")
    if "bootstrap" in result:
        b = result["bootstrap"]
        lines.append(f"{b['rule']}: {b['draws']} calibration sets of {b['size']} studies drawn "
                     f"with replacement meet the bar on every site in {b['passed']:.0%} of draws ("
                     + ", ".join(f"{n} {share:.0%}" for n, share in b["sites"].items()) + ")")
    if "local" in result:
        local = result["local"]
        lines.append(f"calibrated on half of each site's own studies ({local['halvings']} halvings, "
                     f"{local['rule']}), share meeting the bar on the other half: "
                     + "; ".join(f"{point} {local['mean'][point]:.2f} ("
                                 + ", ".join(f"{n} {v[point]:.2f}" for n, v in local["sites"].items()) + ")"
                                 for point in local["mean"]))
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _p(*thresholds: float) -> str:
    """Probabilities with three decimals, or as many as keep two significant digits of the
    nearest one's distance from 0 or 1, all alike: bands squeezed against 1 are several logits
    wide and must not print as (1.000, 1.000]."""
    room = min([min(t, 1 - t) for t in thresholds if 0 < t < 1] or [1.0])
    digits = 3 if room >= 0.001 else min(12, 1 - math.floor(math.log10(room)))
    return ", ".join(f"{t:.{digits}f}" for t in thresholds)


def main(argv=None) -> int:
    from ich.model import ArtifactError
    from training.data import DataError
    from ich.decision import StudyRule
    from training.studies import candidates, check_placement

    p = argparse.ArgumentParser(prog="python -m training.external", description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="artifact folder (e.g. models/current)")
    source.add_argument("--from-scores", type=Path, metavar="DIR",
                        help="judge a --scores folder again (its card and saved scores), no model")
    p.add_argument("--root", type=Path, default=Path("data/synthetic"),
                   help="where the sets are generated and reused (default data/synthetic)")
    p.add_argument("--studies", type=int, default=300, help="studies per held-out site (default 300)")
    p.add_argument("--calibration-studies", type=int, default=160, help="default 160")
    p.add_argument("--slices", type=int, nargs=2, default=(24, 36), metavar=("MIN", "MAX"))
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--recall-confidence", type=float, default=0.0, metavar="C",
                   help="as in training.calibrate (default 0: recall on average)")
    p.add_argument("--gap-placement", type=float, metavar="F",
                   help="as in training.calibrate (default: training.studies.GAP_PLACEMENT)")
    p.add_argument("--study-rule", metavar="RULE",
                   help="choose the calibration point under this rule (max, consecutive-K, "
                        "topk-K) instead of the card's; the card's point is reported as it is")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="also draw the calibration studies N times with replacement and report "
                        "the share of draws whose point meets the bar (how much is luck)")
    p.add_argument("--bootstrap-size", type=int, metavar="M",
                   help="studies per draw (default: as many as calibration has)")
    p.add_argument("--halvings", type=int, default=0, metavar="N",
                   help="also halve each site's studies N times and report how often calibrating "
                        "on one half (the card's point; --normals; --floors 0.95 0.85 of "
                        "training.calibrate) meets the bar on the other")
    p.add_argument("--scores", type=Path, metavar="DIR",
                   help="also write each set's per-slice scores to DIR/<set>.npz (read_scores)")
    p.add_argument("--adapt-studies", type=int, default=0, metavar="N",
                   help="adapt the model's BatchNorm statistics to each site on N other, unlabelled "
                        "studies of it (seed + ADAPT_SEED_OFFSET; training.adapt) before scoring it")
    p.add_argument("--adapt-layers", type=int, metavar="K",
                   help="with --adapt-studies: only the first K BatchNorm layers (default all)")
    p.add_argument("--adapt-normals-only", action="store_true",
                   help="with --adapt-studies: from their normal studies only (a site where bleeds "
                        "are rare; labels pick them)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 unless every site meets the bar at the calibration point")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    try:
        check_placement(args.gap_placement)
    except ValueError as exc:
        p.exit(2, f"error: --gap-placement: {exc}\n")
    if args.adapt_studies and (args.from_scores is not None or args.adapt_studies < 1):
        p.exit(2, "error: --adapt-studies needs --model and N >= 1\n")
    if (args.adapt_layers is not None or args.adapt_normals_only) and not args.adapt_studies:
        p.exit(2, "error: --adapt-layers and --adapt-normals-only need --adapt-studies\n")
    if args.adapt_layers is not None and args.adapt_layers < 1:
        p.exit(2, "error: --adapt-layers must be >= 1\n")
    if args.bootstrap < 0 or (args.bootstrap_size is not None and args.bootstrap_size < 1):
        p.exit(2, "error: --bootstrap must be >= 0 and --bootstrap-size >= 1\n")
    if args.halvings < 0:
        p.exit(2, "error: --halvings must be >= 0\n")
    judging = {"draws": args.bootstrap, "draw_size": args.bootstrap_size, "halvings": args.halvings}
    if args.study_rule:
        try:
            rules = candidates(args.study_rule)
            if len(rules) != 1:
                raise ValueError("name one rule (max, consecutive-K or topk-K), not auto")
            (name, k), = rules
        except ValueError as exc:
            p.exit(2, f"error: --study-rule: {exc}\n")
        judging["calibrated_rule"] = StudyRule(name, k)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    slices = tuple(args.slices)
    try:
        if args.from_scores is not None:
            result = judge_saved(args.from_scores, args.target_recall, args.recall_confidence or None,
                                 args.gap_placement, **judging)
        else:
            result = _validate_model(args, slices, judging)
    except (ArtifactError, DataError, ValueError, OSError) as exc:
        p.exit(2, f"error: {exc}\n")
    print(json.dumps(result, indent=2))
    print(table(result), file=sys.stderr)
    return 1 if args.check and not result["passed"] else 0


def _validate_model(args, slices: tuple[int, int], judging: dict) -> dict:
    """`validate` as the command line asks: the sets generated (once) under `--root`."""
    from ich.model import ModelCard
    from training.synthetic import natural_mix

    training_site = ModelCard.read(args.model).data.get("site") or "randomised"
    calibration = dataset(args.root, natural_mix(training_site), CALIBRATION_SEED,
                          args.calibration_studies, slices, args.workers)
    sets = {name: dataset(args.root, name, seed, args.studies, slices, args.workers)
            for name, seed in HELDOUT}
    adapt = {name: dataset(args.root, name, seed + ADAPT_SEED_OFFSET, args.adapt_studies, slices,
                           args.workers) for name, seed in HELDOUT} if args.adapt_studies else None
    return validate(args.model, sets, calibration, args.target_recall, args.recall_confidence or None,
                    args.batch_size, args.workers, args.scores, args.gap_placement, adapt,
                    args.adapt_layers, args.adapt_normals_only, **judging)


if __name__ == "__main__":
    sys.exit(main())
