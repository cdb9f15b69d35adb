"""Label table, split, input pipeline, learning-rate schedule and configuration precedence."""
from __future__ import annotations

import inspect
import logging
import math

import numpy as np
import pytest

from ich.labels import LABELS
from tests.modelfactory import LOOP_ENGINE
from training import config, data, synthetic
from training.train import MyDeepModel, lr_schedule


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """Four small phantom studies (6 slices each) with two broken files: one truncated, one
    not DICOM at all."""
    root = tmp_path_factory.mktemp("phantoms")
    synthetic.generate(root, studies=4, seed=11, slices=(6, 6))
    files = sorted((root / "stage_2_train").glob("*.dcm"))
    truncated, garbage = files[3], files[10]
    truncated.write_bytes(truncated.read_bytes()[:5000])
    garbage.write_bytes(b"this is not a DICOM file" * 50)
    return root, {truncated.stem, garbage.stem}


@pytest.fixture(scope="module")
def cache(phantoms, tmp_path_factory):
    """The phantoms prepared at 75², in shards of 8 slices, by two processes."""
    from training.prepare import prepare

    root, _ = phantoms
    return prepare(root, tmp_path_factory.mktemp("cache") / "c75", 75, processes=2, shard_size=8)


def _write_csv(path, rows):
    path.write_text("ID,Label\n" + "".join(f"{i}_{label},{v}\n" for i, label, v in rows))


def test_read_trainset_drops_duplicates_orders_labels_and_reports_missing(tmp_path, caplog):
    images = tmp_path / "stage_2_train"
    images.mkdir()
    for name in ("ID_a", "ID_c", "ID_d"):
        (images / f"{name}.dcm").write_bytes(b"")
    scrambled = ["any", "subdural", "epidural", "subarachnoid", "intraventricular", "intraparenchymal"]
    rows = [("ID_a", label, int(label in ("subdural", "any"))) for label in scrambled]
    rows += [("ID_a", "subdural", 1), ("ID_a", "any", 1)]            # duplicate rows, same value
    rows += [("ID_b", label, 0) for label in LABELS]                 # listed, file missing
    rows += [("ID_c", label, 0) for label in LABELS[:5]]             # only five labels
    rows += [("ID_d", label, 0) for label in LABELS] + [("ID_d", "any", 1)]   # duplicate disagrees
    _write_csv(tmp_path / "stage_2_train.csv", rows)

    with caplog.at_level(logging.WARNING):
        ts = data.read_trainset(tmp_path / "stage_2_train.csv")
    assert list(ts.ids) == ["ID_a", "ID_d"]
    assert ts.labels.tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]]   # model order, first value kept
    assert ts.paths[0].endswith("stage_2_train/ID_a.dcm")
    assert ts.duplicates == 3 and ts.conflicts == ["ID_d"]
    assert ts.missing == ["ID_b"] and ts.incomplete == ["ID_c"]
    assert ts.report()["missing_on_disk"] == 1
    assert "not in" in caplog.text                                  # the missing image is reported
    assert len(data.read_trainset(tmp_path)) == 2                   # a folder works too


def test_read_trainset_rejects_a_malformed_row(tmp_path):
    (tmp_path / "stage_2_train").mkdir()
    (tmp_path / "stage_2_train.csv").write_text("ID,Label\nID_a_any,1\nID_a_bleeding,1\n")
    with pytest.raises(data.DataError, match=":3:"):
        data.read_trainset(tmp_path)


def test_unreadable_files_are_skipped_and_reported_never_black(phantoms, cache):
    root, broken = phantoms
    ts = data.read_trainset(root)
    assert len(ts) == 24 and broken <= set(ts.ids)        # listed and on disk: found at decode time
    decoder = data.Decoder(ts.paths, 75)
    rows = np.concatenate([index.numpy() for _, index in
                           data.dataset(ts, decoder, 8, training=False, workers=2)])
    assert sorted(ts.ids[rows]) == sorted(set(ts.ids) - broken)
    report = decoder.report()
    assert report["skipped"] == 2
    assert set(report["reasons"]) <= {"truncated", "undecodable"} and sum(report["reasons"].values()) == 2

    # the prepared cache records the same two failures, and trains on the 22 others only
    assert cache.report()["skipped"] == 2 and cache.report()["reasons"] == report["reasons"]
    assert sorted(cache.slices.ids) == sorted(set(ts.ids) - broken)
    train = cache.batches(cache.slices, 4, training=True, seed=1)
    seen = 0
    for images, labels in train.take(3 * 22 // 4):            # three epochs' worth
        assert images.shape == (4, 75, 75, 3) and labels.shape == (4, 6)
        assert float(np.min(np.max(images.numpy(), axis=(1, 2, 3)))) > 0.0   # no black image
        seen += 4
    assert seen > 22


def test_augmentation_keeps_shape_range_and_changes_images(cache):
    ts = cache.slices.take(np.arange(12, 20))
    plain = next(iter(cache.batches(ts, 8, training=True, seed=3, augment=False)))[0].numpy()
    augmented = next(iter(cache.batches(ts, 8, training=True, seed=3, augment=True)))[0].numpy()
    assert augmented.shape == plain.shape
    assert augmented.min() >= 0.0 and augmented.max() <= 1.0 + 1e-5
    assert not np.allclose(np.sort(plain.ravel()), np.sort(augmented.ravel()))


def test_training_inputs_are_what_the_worker_sees(phantoms, cache):
    """Train/serve parity: the DICOM decoder returns `load_slice`'s image exactly, and the
    cache's windowed images (float16 HU, windowed in TensorFlow) are within 1e-3 of it."""
    from ich.imaging import load_slice

    root, broken = phantoms
    ts = data.read_trainset(root)
    path = next(p for i, p in zip(ts.ids, ts.paths) if i not in broken)
    image, ok = data.Decoder(ts.paths, 75)(list(ts.paths).index(path))
    assert ok and np.array_equal(image, load_slice(path, 75))
    worst, seen = 0.0, []
    for images, positions in cache.batches(cache.slices, 5, training=False):
        for image, position in zip(images.numpy(), positions.numpy()):
            worst = max(worst, float(np.abs(image - load_slice(cache.slices.paths[position], 75)).max()))
            seen.append(int(position))
    assert seen == list(range(len(cache.slices))) and worst < 1e-3


def test_hu_augmentation_acts_in_hu_before_windowing_and_never_touches_the_cache(cache):
    import tensorflow as tf

    hu = cache.read(cache.slices.rows[:1]).astype(np.float32)[0]
    batch = tf.constant(np.repeat(hu[None], 30, axis=0))

    def augment(ops, seed=(1, 2)):
        return data.HUAugment(ops).tf(batch, tf.constant(seed, tf.int64)).numpy()

    # calibration alone is an affine map of HU: a least-squares fit recovers it exactly
    out = augment(("calibration",))
    fits = [np.polyfit(hu.ravel(), o.ravel(), 1) for o in out]
    for o, (slope, intercept) in zip(out, fits):
        assert np.allclose(o, slope * hu + intercept, atol=1e-2)
    slopes, intercepts = np.array(fits).T
    assert 0.98 <= slopes.min() and slopes.max() <= 1.02 and np.abs(intercepts).max() <= 4.01
    assert 5 <= (np.abs(slopes - 1) > 1e-6).sum() <= 25      # applied to about half the slices
    # noise alone: a residual of SD 0.5-3 HU when applied, none otherwise
    sds = (augment(("noise",)) - hu).std(axis=(1, 2))
    applied = sds[sds > 1e-3]
    assert 5 <= len(applied) <= 25 and applied.min() >= 0.4 and applied.max() <= 3.3
    # kernel alone: blurring lowers the slice's gradient energy, sharpening raises it
    def energy(x):
        return float(np.square(np.diff(x, axis=-1)).mean())
    energies = [energy(o) / energy(hu) for o in augment(("kernel",))]
    assert min(energies) < 0.95 and max(energies) > 1.05
    # stateless: the same seed gives the same batch, another seed another
    assert np.array_equal(augment(data.HU_AUGMENTS), augment(data.HU_AUGMENTS))
    assert not np.allclose(augment(data.HU_AUGMENTS), augment(data.HU_AUGMENTS, (1, 3)))
    # training batches from the cache differ at each step; the cache itself never changes
    before = cache.read(cache.slices.rows)
    ts = cache.slices.take(np.zeros(8, int))      # one slice, eight times: only augmentation differs
    batches = cache.batches(ts, 8, training=True, seed=1, hu_augment=data.HUAugment())
    reads = [x.numpy() for x, _ in batches.take(2)]
    assert all(r.shape == (8, 75, 75, 3) and 0 <= r.min() and r.max() <= 1 for r in reads)
    assert len({r.tobytes() for batch in reads for r in batch}) >= 12
    assert np.array_equal(cache.read(cache.slices.rows), before)


def test_augmentation_on_the_device_computes_what_the_host_pipeline_computes(cache):
    """`--augment-on device`: the host yields float16 HU only; the training step's
    DevicePreprocess then gives the same images the host pipeline gives for the same seed and
    step (HU augmentation, windows), and the geometric layers still change them."""
    import tensorflow as tf

    ts = cache.slices.take(np.arange(8))
    host = cache.batches(ts, 8, training=True, seed=4, hu_augment=data.HUAugment(), augment=False)
    raw = cache.batches(ts, 8, training=True, seed=4, hu_augment=data.HUAugment(), raw=True)
    (h0, y0), (h1, _) = [(x.numpy(), y.numpy()) for x, y in host.take(2)]
    (r0, z0), (r1, _) = list(raw.take(2))
    assert r0.dtype == tf.float16 and r0.shape == (8, 75, 75)   # the host only read the shards
    assert np.array_equal(y0, z0.numpy())
    plain = data.DevicePreprocess(4, data.HUAugment(), augment=False, size=75)
    np.testing.assert_allclose(plain(r0, 0).numpy(), h0, atol=1e-6)
    np.testing.assert_allclose(plain(r1, 1).numpy(), h1, atol=1e-6)   # step 1: batch 1's draws
    geometric = data.DevicePreprocess(4, data.HUAugment(), augment=True, size=75)
    moved = geometric(r0, 0).numpy()
    assert moved.shape == h0.shape and not np.allclose(moved, h0)


def test_mixup_blends_each_image_and_its_labels_by_one_weight_on_host_and_device(cache):
    """`--mixup`: every training image becomes λ·itself + (1−λ)·its batch neighbour, λ ≥ 0.5,
    and its labels the same blend (soft targets); the device step computes what the host
    pipeline computes for the same seed and step."""
    ts = cache.slices
    kwargs = {"training": True, "seed": 4, "hu_augment": data.HUAugment(), "augment": False}
    plain = cache.batches(ts, 8, **kwargs)
    mixed = cache.batches(ts, 8, mixup=0.4, **kwargs)
    weights, mixed_batches = [], []
    for (x, y), (m, z) in zip(plain.take(3), mixed.take(3)):
        x, y, m, z = x.numpy(), y.numpy(), m.numpy(), z.numpy()
        mixed_batches.append((m, z))
        xp, yp = np.roll(x, 1, axis=0), np.roll(y, 1, axis=0)
        d = (x - xp).reshape(8, -1)
        lam = ((m - xp).reshape(8, -1) * d).sum(1) / (d * d).sum(1)   # least squares per image
        assert 0.5 - 1e-4 <= lam.min() and lam.max() <= 1 + 1e-4
        np.testing.assert_allclose(m, lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * xp,
                                   atol=1e-4)
        np.testing.assert_allclose(z, lam[:, None] * y + (1 - lam[:, None]) * yp, atol=1e-3)
        weights.extend(lam)
    assert min(weights) < 0.9          # it mixes, not only a rounding away from the originals
    raw = cache.batches(ts, 8, training=True, seed=4, raw=True)
    device = data.DevicePreprocess(4, data.HUAugment(), augment=False, size=75, mixup=0.4)
    for step, (hu, labels) in enumerate(raw.take(2)):
        images, soft = device(hu, step, labels)
        np.testing.assert_allclose(images.numpy(), mixed_batches[step][0], atol=1e-5)
        np.testing.assert_allclose(soft.numpy(), mixed_batches[step][1], atol=1e-6)


def test_weight_decay_shrinks_the_weights_apart_from_the_gradient():
    """`--weight-decay`: AdamW's decoupled decay. With zero gradients Adam moves nothing, and
    AdamW multiplies every weight by 1 − lr·wd; the weight average (--ema) is kept."""
    import tensorflow as tf

    deep = MyDeepModel(engine=LOOP_ENGINE, input_dims=(75, 75, 3), learning_rate=0.1, weight_decay=0.5,
                       ema=0.9, verbose=0)
    opt, variables = deep.model.optimizer, deep.model.trainable_variables
    assert opt.use_ema and opt.ema_momentum == 0.9
    before = [v.numpy().copy() for v in variables]
    opt.apply_gradients([(tf.zeros_like(v), v) for v in variables])
    kernel = next(i for i, v in enumerate(variables) if np.abs(before[i]).max() > 0)
    np.testing.assert_allclose(variables[kernel].numpy(), 0.95 * before[kernel], rtol=1e-5)
    kept = {v.path: b for v, b in zip(variables, before) if v.path.split("/")[-1] in ("bias", "gamma", "beta")}
    assert any(p.startswith("ich/") for p in kept)     # the output bias holds the label priors
    assert all(np.array_equal(v.numpy(), kept[v.path]) for v in variables if v.path in kept)
    plain = MyDeepModel(engine=LOOP_ENGINE, input_dims=(75, 75, 3), learning_rate=0.1, verbose=0)
    kept = [v.numpy().copy() for v in plain.model.trainable_variables]
    plain.model.optimizer.apply_gradients([(tf.zeros_like(v), v) for v in plain.model.trainable_variables])
    assert all(np.array_equal(v.numpy(), k) for v, k in zip(plain.model.trainable_variables, kept))
    for bad in ({"weight_decay": -1}, {"weight_decay": float("nan")}, {"mixup": float("inf")}):
        with pytest.raises(config.ConfigError, match="--weight-decay and --mixup"):
            config.TrainConfig(synthetic_studies=4, **bad).validate()


def test_augment_scale_widens_the_geometric_ranges():
    """`--augment-scale 3` moves an off-centre dot about three times as far as the default
    ranges (±6°, ±6 % shift, ±8 % zoom); the dot sits on the midline so flips keep it."""
    image = np.zeros((64, 75, 75, 3), np.float32)
    image[:, 24:28, 36:39] = 1.0

    def displacement(scale):
        out = np.asarray(data.augmenter(3, scale)(image, training=True))[..., 0]
        rows, cols = np.indices(out.shape[1:])
        mass = out.sum(axis=(1, 2))
        centre = np.stack([(out * rows).sum(axis=(1, 2)) / mass, (out * cols).sum(axis=(1, 2)) / mass], 1)
        return float(np.linalg.norm(centre - [25.5, 37.0], axis=1).mean())

    default, wide = displacement(1.0), displacement(3.0)
    assert default > 0.5 and 2.0 < wide / default < 4.5
    with pytest.raises(config.ConfigError, match="--augment-scale"):
        config.TrainConfig(synthetic_studies=4, augment_scale=0).validate()


def test_hu_augment_names():
    assert data.hu_augment("none") is None and data.hu_augment("") is None
    assert data.hu_augment("all").ops == data.HU_AUGMENTS
    assert data.hu_augment("noise, kernel").ops == ("noise", "kernel")
    with pytest.raises(ValueError, match="unknown HU augmentations"):
        data.hu_augment("noise,gamma")
    with pytest.raises(config.ConfigError, match="--hu-augment"):
        config.load(["--data", "d", "--hu-augment", "gamma"])
    assert config.load(["--data", "d"]).hu_augment == "all"
    assert config.load(["--data", "d", "--recipe", "reference"]).hu_augment == "none"


def test_test_fold_matches_reference_and_study_split_keeps_studies_apart(phantoms):
    from sklearn.model_selection import ShuffleSplit

    root, _ = phantoms
    ts = data.read_trainset(root)
    train, calibration, test = data.split(ts, "slice")
    reference = next(ShuffleSplit(n_splits=3, test_size=0.2, random_state=42).split(ts.ids))
    assert test.tolist() == reference[1].tolist()     # the reference's validation fold
    assert sorted(train.tolist() + calibration.tolist()) == sorted(reference[0].tolist())
    assert len(calibration) == pytest.approx(len(reference[0]) / 4, abs=1)

    headers = data.slice_headers(ts.paths)
    uids = headers.studies
    assert len(set(uids) - {u for u in uids if u.startswith("unreadable:")}) == 4
    assert np.isfinite(headers.positions).sum() >= len(ts) - 2 and np.isfinite(headers.instances).any()
    parts = data.split(ts, "study", uids)
    assert [p.tolist() for p in parts] == [p.tolist() for p in data.split(ts, "study")]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert set(uids[parts[a]]).isdisjoint(uids[parts[b]])
    assert sum(map(len, parts)) == len(ts) and all(len(p) > 0 for p in parts)
    # what the study split prevents: the slice split puts some study on both sides here
    train, calibration, test = data.split(ts, "slice")
    assert set(uids[np.concatenate([train, calibration])]) & set(uids[test])


def test_lr_schedule_is_step_decay_per_decay_steps_epochs():
    schedule = lr_schedule(3e-4, 0.8, 3)
    assert [schedule(e) for e in range(7)] == pytest.approx(
        [3e-4, 3e-4, 3e-4, 2.4e-4, 2.4e-4, 2.4e-4, 1.92e-4])
    assert lr_schedule(1e-3, 0.5, 1)(2) == pytest.approx(2.5e-4)


def test_reference_api_keeps_its_defaults():
    defaults = {k: v.default for k, v in inspect.signature(MyDeepModel).parameters.items()}
    assert defaults["input_dims"] == (224, 224, 3) and defaults["batch_size"] == 32
    assert defaults["learning_rate"] == 3e-4 and defaults["num_epochs"] == 3
    assert defaults["decay_rate"] == 0.8 and defaults["decay_steps"] == 3
    assert defaults["weights"] is None and defaults["verbose"] == 1   # offline: from scratch


def test_config_precedence_reference_recipe_file_flags(tmp_path):
    # One recipe for every source: from scratch, the measured recipe, --data or phantoms.
    for source in (["--data", "d"], ["--synthetic-studies", "90"]):
        c = config.load(source)
        assert c.recipe == "scratch" and (c.input_size, c.learning_rate, c.bn_momentum, c.ema,
                                          c.positive_fraction, c.steps_per_epoch) == (160, 1e-3, 0.9, 0.99, 0.3, 0)
        assert (c.split, c.target_recall, c.study_rule) == ("study", 0.95, "auto")   # study recall
        assert c.recall_confidence == 0.0            # on average (0.9 was measured: an option)
        assert (c.flip_average, c.mixup, c.weight_decay, c.augment_scale) == (False, 0.0, 0.0, 1.0)   # measured: no gain
    real = config.load(["--data", "d", "--recipe", "reference"])
    assert (real.engine, real.input_size, real.batch_size, real.learning_rate, real.epochs,
            real.decay_rate, real.decay_steps, real.weights, real.split, real.steps_per_epoch, real.ema) == (
        "InceptionV3", 224, 32, 3e-4, 3, 0.8, 3, "none", "study", None, 0.0)
    assert config.load(["--data", "d", "--weights", "imagenet"]).recipe == "reference"
    # auto steps: >= 60 per epoch, about two passes in all; auto cache within the budget
    auto = config.load(["--data", "d"])
    assert config.steps_per_epoch(auto, 1_440) == 60
    assert config.steps_per_epoch(auto, 451_000) == math.ceil(3 * 451_000 / (32 * 7))
    assert config.steps_per_epoch(real, 1_440) is None
    assert config.steps_per_epoch(auto, 451_000, replicas=8) == math.ceil(3 * 451_000 / (32 * 8 * 7))
    assert (auto.strategy, auto.mixed_precision, auto.workers, auto.resume, auto.jit_compile) == (
        "auto", "auto", None, None, "auto")
    assert real.mixed_precision == "none"

    toml = tmp_path / "run.toml"
    toml.write_text('data = "x"\nbatch-size = 8\nepochs = 5\nsplit = "study"\n')
    resolved = config.load(["--config", str(toml), "--epochs", "2"])
    assert (resolved.data, resolved.batch_size, resolved.epochs, resolved.split) == ("x", 8, 2, "study")
    assert config.load(["--config", str(toml), "--synthetic-studies", "3"]).data is None

    with pytest.raises(config.ConfigError, match="exactly one"):
        config.load([])
    toml.write_text("batch_sise = 8\n")
    with pytest.raises(config.ConfigError, match="batch_sise"):
        config.load(["--config", str(toml), "--data", "d"])
    with pytest.raises(SystemExit):
        config.load(["--data", "d", "--split", "patient"])
    with pytest.raises(SystemExit):
        config.load(["--data", "d", "--recipe", "fast"])
    with pytest.raises(config.ConfigError, match="study rule"):
        config.load(["--data", "d", "--study-rule", "median"])
    with pytest.raises(config.ConfigError, match="--synthetic-site"):
        config.load(["--synthetic-studies", "9", "--synthetic-site", "mars"])
    with pytest.raises(config.ConfigError, match="--recall-confidence"):
        config.load(["--data", "d", "--recall-confidence", "1"])
    assert config.load(["--data", "d", "--recall-confidence", "0"]).recall_confidence == 0
    with pytest.raises(config.ConfigError, match="--gap-placement"):
        config.load(["--data", "d", "--gap-placement", "0"])
    assert config.load(["--data", "d", "--gap-placement", "0.3"]).gap_placement == 0.3
    assert config.load(["--data", "d"]).gap_placement is None      # studies.GAP_PLACEMENT
    for bad, why in ((["--data", "d", "--operating-studies", "9"], "--operating DIR"),
                     (["--synthetic-studies", "9", "--operating-studies", "-1"], ">= 0"),
                     (["--synthetic-studies", "9", "--operating", "o", "--operating-studies", "9"], "one of")):
        with pytest.raises(config.ConfigError, match=why):
            config.load(bad)
    assert config.load(["--data", "d", "--operating", "o"]).operating == "o"
    sites = config.load(["--synthetic-studies", "9", "--heldout", "a", "--heldout", "b"])
    assert (sites.synthetic_site, sites.site_studies, sites.heldout) == ("randomised", 60, ["a", "b"])


def test_positive_fraction_oversamples_bleeding_slices(cache):
    ts = cache.slices
    labels = np.zeros_like(ts.labels)
    labels[:3] = 1.0                                  # 3 of 22 slices bleed: natural share 0.14
    constructed = data.Slices(ts.ids, ts.paths, labels, ts.rows)

    def share(fraction):
        batches = cache.batches(constructed, 8, training=True, seed=5,
                                positive_fraction=fraction).take(40)
        return float(np.mean([y.numpy()[:, -1].mean() for _, y in batches]))

    assert share(None) == pytest.approx(3 / 22, abs=0.05)
    assert share(0.5) == pytest.approx(0.5, abs=0.08)
    # per-slice odds of drawing a positive: (0.5 / 3) / (0.5 / 19)
    assert data.positive_odds_ratio(constructed, 0.5) == pytest.approx(19 / 3)
    assert data.positive_odds_ratio(constructed, None) == 1.0
    assert data.positive_odds_ratio(data.Slices(ts.ids, ts.paths, np.ones_like(labels)), 0.5) == 1.0


def test_study_sampling_draws_each_bleeding_study_alike(cache):
    """`--positive-sampling study`: a 1-slice bleed is drawn as often as a 9-slice one, and
    bleeding slices keep their share of the batch (so the prior correction still holds)."""
    ts = cache.slices
    labels = np.zeros_like(ts.labels)
    labels[:10, -1] = 1.0                   # study A: slice 0; study B: slices 1-9
    labels[0, 0] = 1.0                      # marks study A's slice in the batches' labels
    constructed = data.Slices(ts.ids, ts.paths, labels, ts.rows)
    studies = np.array(["A"] + ["B"] * 9 + ["N"] * (len(ts) - 10))

    def shares(groups):
        y = np.concatenate([y.numpy() for _, y in cache.batches(
            constructed, 8, training=True, seed=5, positive_fraction=0.5, groups=groups).take(60)])
        return y[:, -1].mean(), y[:, 0].sum() / y[:, -1].sum()

    bleeding, study_a = shares(studies)
    assert bleeding == pytest.approx(0.5, abs=0.06) and study_a == pytest.approx(0.5, abs=0.08)
    assert shares(None)[1] == pytest.approx(0.1, abs=0.05)          # per slice: 1 of 10
    picks = data.study_balanced(np.arange(10), studies[:10], seed=1, draws=20_000)
    assert np.mean(picks == 0) == pytest.approx(0.5, abs=0.02)
    assert set(np.unique(picks)) == set(range(10))
    np.testing.assert_array_equal(picks, data.study_balanced(np.arange(10), studies[:10], seed=1,
                                                             draws=20_000))   # seeded
    for bad in ({"groups": studies[:-1]}, {"groups": studies, "shard": (2, 0)}):
        with pytest.raises(ValueError, match="study of each"):   # shards would balance apart
            cache.batches(constructed, 8, training=True, positive_fraction=0.5, **bad)
    with pytest.raises(config.ConfigError, match="positive-fraction"):
        config.load(["--data", "d", "--recipe", "reference", "--positive-sampling", "study"])
    assert config.load(["--data", "d", "--positive-sampling", "study"]).positive_sampling == "study"


def test_prior_correction_shifts_every_logit_back_and_can_be_made_permanent():
    deep = MyDeepModel(engine=LOOP_ENGINE, input_dims=(75, 75, 3), weights=None, verbose=0)
    deep.logit_shift = float(np.log(4.0))
    x = np.random.default_rng(0).random((2, 75, 75, 3), np.float32)

    def logits():
        p = np.clip(deep.model(x, training=False).numpy().astype(np.float64), 1e-12, 1 - 1e-12)
        return np.log(p / (1 - p))

    before = logits()
    with deep.prior_corrected():
        corrected = logits()
    np.testing.assert_allclose(corrected, before - np.log(4.0), atol=1e-3)
    np.testing.assert_allclose(logits(), before, atol=1e-5)        # restored for training
    deep.correct_priors()
    np.testing.assert_allclose(logits(), before - np.log(4.0), atol=1e-3)
    with deep.prior_corrected():                                   # nothing left to correct
        np.testing.assert_allclose(logits(), before - np.log(4.0), atol=1e-3)


def test_platt_scaling_fixes_overconfidence_and_bakes_into_the_model():
    from training import evaluate
    from training.train import apply_platt, fit_platt

    rng = np.random.default_rng(3)
    y = (rng.random((600, 6)) < 0.25).astype(np.float32)
    # Ranks well, far too confident: logits ±6 around the truth with heavy noise.
    logits = np.where(y > 0.5, 3.0, -3.0) * 2 + rng.normal(0, 4, y.shape)
    p = 1 / (1 + np.exp(-logits))
    platt = fit_platt(y, p)
    assert set(platt) == set(LABELS) and all(0 < a < 1 for a, _ in platt.values())   # softened
    assert evaluate.weighted_log_loss(y, apply_platt(p, platt)) < 0.9 * evaluate.weighted_log_loss(y, p)
    assert evaluate.auc(y[:, -1], apply_platt(p, platt)[:, -1]) == pytest.approx(evaluate.auc(y[:, -1], p[:, -1]))
    # Too few positives: left alone.
    few = y.copy()
    few[:, 0] = 0
    few[:3, 0] = 1
    assert LABELS[0] not in fit_platt(few, p)

    deep = MyDeepModel(engine=LOOP_ENGINE, input_dims=(75, 75, 3), batch_size=4, verbose=0)
    x = rng.random((3, 75, 75, 3), dtype=np.float32)
    before = np.asarray(deep.model(x, training=False))
    deep.apply_platt(platt)
    after = np.asarray(deep.model(x, training=False))
    np.testing.assert_allclose(after, apply_platt(before, platt), atol=2e-4)


def test_weight_averaging_validates_and_keeps_the_average_and_trains_on_its_own_weights(cache, tmp_path):
    """`--ema`: what is validated and kept as the best epoch is Keras' moving average of the
    weights (with BatchNorm statistics recomputed for it); outside validation the network
    trains on its own weights, which the average never overwrites."""
    ts = cache.slices
    deep = MyDeepModel(engine=LOOP_ENGINE, input_dims=(75, 75, 3), batch_size=4, num_epochs=2,
                       steps_per_epoch=3, validate_from=2, bn_recalibrate=1, bn_momentum=0.9, ema=0.5, verbose=0)
    own_at_epoch_end = []

    class Spy(__import__("keras").callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):          # after validation has run
            own_at_epoch_end.append([v.numpy().copy() for v in deep.model.trainable_variables])

    fit = deep.model.fit
    deep.model.fit = lambda *a, callbacks, **k: fit(*a, callbacks=[*callbacks, Spy()], **k)
    deep.fit_model(ts.take(np.arange(12)), ts.take(np.arange(12, 20)), cache)
    averages = [a.numpy() for a in deep.model.optimizer._model_variables_moving_average]
    own = own_at_epoch_end[-1]
    trained = [v.numpy() for v in deep.model.trainable_variables]
    bias = len(trained) - 1                  # the output bias: prior-corrected at export
    assert deep.validation.best_epoch == 2   # kept: the average, not the network's own weights
    assert all(np.array_equal(t, a) for t, a in zip(trained[:bias], averages[:bias]))
    assert not all(np.array_equal(t, o) for t, o in zip(trained[:bias], own[:bias]))
    # the swap is undone: after validating epoch 2, the network's own weights are back
    assert not all(np.array_equal(o, a) for o, a in zip(own[:bias], averages[:bias]))
    with deep.averaged_weights():
        assert all(np.array_equal(v.numpy(), a)
                   for v, a in zip(deep.model.trainable_variables, averages))
    assert all(np.array_equal(v.numpy(), t) for v, t in zip(deep.model.trainable_variables, trained))
    # a resumed run (BackupAndRestore's weights file) continues the same average
    saved = tmp_path / "ema.weights.h5"
    deep.model.save_weights(saved)
    resumed = MyDeepModel(engine=LOOP_ENGINE, input_dims=(75, 75, 3), batch_size=4, bn_momentum=0.9,
                          ema=0.5, verbose=0)
    resumed.model.optimizer.build(resumed.model.trainable_variables)
    resumed.model.load_weights(saved)
    assert all(np.array_equal(r.numpy(), a) for r, a in
               zip(resumed.model.optimizer._model_variables_moving_average, averages))
    with pytest.raises(config.ConfigError, match="--ema needs --bn-recalibrate"):
        config.TrainConfig(synthetic_studies=4, ema=0.99).validate()
