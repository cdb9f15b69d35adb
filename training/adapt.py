"""`python -m training.adapt`: re-centre a model's stem on a site's unlabelled head CTs.

BatchNorm statistics are re-estimated on the site's slices (AdaBN), by default in InceptionV3's
stem only; run it before calibrating (docs/deployment.md).

    python -m training.adapt --model models/current --data /data/site-export --promote

A scanner's kernel, noise and calibration shift what the network's early layers respond to
before they change what a bleed looks like. AdaBN (Li et al. 2016) re-centres BatchNorm layers
on the new site's own slices: their moving mean and variance are replaced by the average over
the site's slices, as training's precise BatchNorm computes them (`training.train.
PreciseBatchNorm`); weights, Platt scaling, study rule and thresholds stay the model's. No
labels are read. `python -m training.external --adapt-studies N` judges the held-out sites this
way.

Why the stem (5 layers) and not every layer (docs/training.md, H8): adapting every layer on a
site's normal studies, as a site where bleeds are rare would, made normal studies alert in
droves (seed 2049: site-d 87 of 145 silent), since those statistics follow the share of
bleeding slices; the stem's see kernel, noise and calibration over the whole head, and on
seeds 2050 and 2051 (stated before they were scored) they kept every site's study AUC within
0.003 and its verdict the same whichever studies adapted it, with as many sites meeting issue
12's bar as unadapted or more (docs/deployment.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: `python -m training.adapt`'s default: InceptionV3's stem, the five convolutions before the
#: first Inception block (docs/training.md, H8).
STEM_LAYERS = 5
#: Fewer decodable slices than this (eight batches of 32) estimate no statistics worth keeping.
MIN_SLICES = 256
#: Slices used by default: a random sample beyond this (about 100 head CTs at 5 mm).
MAX_SLICES = 6000
#: Files listed at most: a folder larger than this is refused rather than walked for hours.
MAX_FILES = 2_000_000


def slice_files(data_dir: Path, limit: int, seed: int = 0) -> tuple[list[str], int]:
    """(paths, files listed): every regular file under `data_dir` but hidden ones and DICOMDIR,
    a random sample of `limit` (seeded) where there are more. Which files are CT slices is the
    decoder's to say: the others are skipped with their reason."""
    found = []
    for folder, dirs, files in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            found.append(os.path.join(folder, name))
            if len(found) > MAX_FILES:
                raise ValueError(f"{data_dir} holds more than {MAX_FILES} files; give a folder of "
                                 "this site's head CTs")
    listed = len(found)
    if listed > limit:
        found = [found[i] for i in np.sort(np.random.default_rng(seed).choice(listed, limit, replace=False))]
    return found, listed


def adapt(model_dir: Path, data_dir: Path, out: Path, version: str | None = None,
          max_slices: int = MAX_SLICES, batch_size: int = 32, workers: int = 2, seed: int = 0,
          layers: int | None = None) -> Path:
    """Write `<out>/<version>`: the model of `model_dir` with BatchNorm statistics of `data_dir`
    (any layout of DICOM files; `max_slices` sampled where there are more), in every BatchNorm
    layer or in the first `layers` of them (graph order: the stem first), the others kept."""
    from ich.labels import LABELS
    from ich.model import load_artifact, save_artifact
    from training.calibrate import free_version, stamped
    from training.data import Decoder, Slices, dataset
    from training.train import PreciseBatchNorm, batchnorm_layers

    if not Path(data_dir).is_dir():
        raise ValueError(f"{data_dir} is not a folder")
    if layers is not None and layers < 1:
        raise ValueError(f"adapt at least one BatchNorm layer, not {layers}")
    start = time.perf_counter()
    paths, listed = slice_files(Path(data_dir), max_slices, seed)
    if listed < MIN_SLICES:             # refused before the model loads or anything decodes
        raise ValueError(f"{data_dir}: {listed} files; at least {MIN_SLICES} are needed to "
                         "estimate BatchNorm statistics")
    model, card = load_artifact(model_dir)
    version = free_version(out, version or stamped(f"{card.version}-adapted"))   # before minutes of work
    if card.training.get("ensemble"):   # its members' stems are not "the first K layers"
        raise ValueError(f"{card.version} is an ensemble: adapt each member, then ensemble the "
                         "adapted members (python -m training.ensemble)")
    order = np.random.default_rng(seed).permutation(len(paths))   # batches mix studies
    paths = np.asarray(paths, dtype=object)[order]
    slices = Slices(np.array([f"slice{i}" for i in range(len(paths))]), paths,
                    np.zeros((len(paths), len(LABELS)), np.float32))
    decoder = Decoder(list(paths), card.input_size)
    batches = (dataset(slices, decoder, batch_size, training=False, workers=workers)
               .map(lambda images, rows: images).unbatch().batch(batch_size, drop_remainder=True))
    total = len(batchnorm_layers(model))
    if layers is not None and layers > total:
        raise ValueError(f"the model has {total} BatchNorm layers; adapt at most {total} (or all)")
    upstream = model if layers is None or layers == total else stem_model(model, layers)
    statistics = PreciseBatchNorm(upstream, batches)  # slices are decoded as it averages
    statistics()
    used = len(paths) - len(decoder.skipped)          # the last partial batch is left out
    if used < MIN_SLICES:
        raise ValueError(f"{data_dir}: {used} decodable CT slices of {len(paths)} files; at least "
                         f"{MIN_SLICES} are needed to estimate BatchNorm statistics "
                         f"(skipped: {decoder.report()['reasons']})")
    adapted, averaged = len(statistics.layers), used - used % batch_size
    site = {"method": "BatchNorm statistics re-estimated on unlabelled slices (AdaBN)",
            "data": str(data_dir), "from_version": card.version, "files": listed,
            "slices": averaged, "batch_size": batch_size, "seed": seed,
            "batchnorm_layers": adapted, "of_batchnorm_layers": total,
            "decode": decoder.report()}
    new = replace(card, version=version, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  metrics={**card.metrics, "site_adaptation": site},
                  notes=(card.notes + f" BatchNorm statistics re-estimated on {averaged} unlabelled "
                         f"slices of the site ({data_dir}) by training.adapt; weights "
                         "and operating point are the training run's, whose figures are above.").strip())
    folder = save_artifact(model, new, Path(out))
    log.info("adapted %d BatchNorm layers on %d slices (%d skipped) in %.0f s -> %s", adapted, averaged,
             len(decoder.skipped), time.perf_counter() - start, folder)
    return folder


def stem_model(model, layers: int):
    """`model`'s input to the outputs of its engine's first `layers` BatchNorm layers, sharing
    their variables. Their training-mode statistics depend on nothing downstream, so averaging
    them costs the stem's forward pass instead of the whole network's (bench/bench_adapt.py)."""
    import keras

    engine = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    wanted = [layer for layer in engine.layers if isinstance(layer, keras.layers.BatchNormalization)]
    stem = keras.Model(engine.input, [layer.output for layer in wanted[:layers]])
    # the tensor the artifact feeds its engine (the engine's scaling of the windows); Keras has
    # no public accessor for a nested model's input within the outer graph. A flip-averaging
    # model's first call is the unmirrored slice.
    scaled = keras.Model(model.input, engine._inbound_nodes[0].input_tensors[0])
    windows = keras.Input(model.input.shape[1:])
    return keras.Model(windows, stem(scaled(windows)), name="adapt_stem")


def main(argv=None) -> int:
    from ich.model import ArtifactError, ModelCard, promote_ok
    from training.data import DataError

    p = argparse.ArgumentParser(prog="python -m training.adapt", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="artifact folder (e.g. models/current)")
    p.add_argument("--data", required=True, type=Path,
                   help="a folder of the site's head-CT DICOM files, any layout (a PACS or "
                        "storescp export); no labels are read")
    p.add_argument("--layers", default=str(STEM_LAYERS), metavar="K|all",
                   help=f"BatchNorm layers re-estimated, the first K in graph order (default "
                        f"{STEM_LAYERS}: InceptionV3's stem); all: every one (measured worse: "
                        "it follows the site's share of bleeding slices)")
    p.add_argument("--max-slices", type=int, default=MAX_SLICES,
                   help=f"slices sampled at most (default {MAX_SLICES})")
    p.add_argument("--out", type=Path, default=Path("models"), help="artifact root (default models)")
    p.add_argument("--version", help="new version (default <model version>-adapted-<UTC time>)")
    p.add_argument("--promote", action="store_true", help="point <out>/current at the new version")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="which slices are sampled (default 0)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.layers == "all":
        layers = None
    elif args.layers.isdigit() and int(args.layers) >= 1:
        layers = int(args.layers)
    else:
        p.exit(2, f"error: --layers must be a positive whole number or all, not {args.layers!r}\n")
    if args.max_slices < MIN_SLICES or args.batch_size < 1:
        p.exit(2, f"error: --max-slices must be at least {MIN_SLICES} and --batch-size at least 1\n")
    try:
        folder = adapt(args.model, args.data, args.out, args.version, args.max_slices,
                       args.batch_size, args.workers, args.seed, layers)
    except (ArtifactError, DataError, ValueError, FileExistsError, OSError) as exc:
        p.exit(2, f"error: {exc}\n")
    card = ModelCard.read(folder)
    if args.promote:
        try:
            promote_ok(folder, args.out / "current")
        except ArtifactError as exc:
            p.exit(3, f"error: {exc}\n")
    site = card.metrics["site_adaptation"]
    print(json.dumps({"artifact": str(folder), "promoted": args.promote,
                      **{k: site[k] for k in ("from_version", "files", "slices",
                                              "batchnorm_layers", "of_batchnorm_layers")},
                      "skipped": site["decode"]["skipped"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
