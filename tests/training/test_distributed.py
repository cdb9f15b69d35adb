"""Every device, and surviving a kill: MirroredStrategy over two logical CPU devices (with the
augmentation in the training step, as on GPUs) exports the same single-device model it trained;
a run killed after its first epoch (trained small: progressive resizing) resumes with the
weights the checkpoint saved, at the full size."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ich.model import ModelCard
from tests.modelfactory import LOOP_ENGINE

#: Two logical CPU devices must be configured before TensorFlow starts: its own process.
MIRRORED = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from ich.model import ModelCard, load_artifact, save_artifact
    from training.cache import SliceCache
    from training.distribute import make_strategy
    from training.train import MyDeepModel, weights_digest

    cache = SliceCache.open(sys.argv[1], 75)
    strategy = make_strategy("mirrored")
    from training.data import HUAugment

    # Augmentation on the device, as `--augment-on auto` chooses with GPUs: HU augmentation,
    # windows and the geometric layers run inside each replica's training step.
    deep = MyDeepModel(engine=sys.argv[4], input_dims=(75, 75, 3), batch_size=4, num_epochs=2, verbose=2,
                       steps_per_epoch=2, validate_from=2, strategy=strategy, run_dir=sys.argv[2],
                       hu_augment=HUAugment(), augment_on="device")
    history = deep.fit_model(cache.slices.take(np.arange(16)), cache.slices.take(np.arange(16, 24)), cache)
    exported = deep.export_model()
    x = next(iter(cache.batches(cache.slices, 8, training=False)))[0]
    card = ModelCard(version="mirrored", engine=sys.argv[4], input_size=75, thresholds={})
    loaded, _ = load_artifact(save_artifact(exported, card, sys.argv[3]))
    print(json.dumps({
        "replicas": deep.replicas, "global_batch": deep.global_batch,
        "learning_rate": deep.learning_rate, "losses": history.history["loss"],
        "devices": sorted({v.device for v in deep.model.weights[0].value.values}),
        "exported_devices": sorted({v.value.device for v in exported.weights}),
        "same_weights": weights_digest(exported) == weights_digest(deep.model),
        "max_difference": float(np.abs(np.asarray(deep.model(x, training=False))
                                       - np.asarray(loaded(x, training=False))).max())}))
""")


def test_mirrored_strategy_on_two_devices_exports_the_model_it_trained(phantoms, tmp_path):
    from training.prepare import prepare

    cache = prepare(phantoms, tmp_path / "cache", 75, processes=1)
    proc = subprocess.run([sys.executable, "-c", MIRRORED, str(cache.root), str(tmp_path / "run"),
                           str(tmp_path / "models"), LOOP_ENGINE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2 and len(result["devices"]) == 2          # one copy per device
    assert result["global_batch"] == 8 and result["learning_rate"] == pytest.approx(6e-4)
    assert len(result["losses"]) == 2 and all(np.isfinite(result["losses"]))
    assert len(result["exported_devices"]) == 1 and result["same_weights"]
    assert result["max_difference"] < 1e-5           # the artifact predicts what training had
    # non-TTY progress: one line per epoch with images/s, no progress bar
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(" done")[0] for line in lines if re.match(r"epoch \d/2 done in", line)] == [
        "epoch 1/2", "epoch 2/2"]
    assert sum(" step 1/2: " in line for line in lines) == 2          # and every N steps
    assert all(re.search(r"\d+\.\d img/s", line) for line in lines) and "\x1b[" not in proc.stdout
    with open(tmp_path / "run" / "history.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]


def test_a_run_killed_after_its_first_epoch_resumes_where_it_stopped(phantoms, tmp_path):
    """With progressive resizing, as the recipe trains: epoch 1 at 80², killed, epoch 2 at
    96² in the resumed process (the small phase is not redone)."""
    out = tmp_path / "models"
    argv = [sys.executable, "-m", "training", "--engine", LOOP_ENGINE,
            "--synthetic-studies", "4", "--synthetic-slices", "6", "8",
            "--synthetic-dir", str(phantoms), "--site-studies", "0", "--input-size", "96",
            "--early-size", "80", "--full-epochs", "1",
            "--batch-size", "4", "--epochs", "2", "--steps-per-epoch", "2", "--seed", "5",
            "--out", str(out), "--version", "killed-1", "--verbose", "2", "--allow-failed",
            "--augment-on", "device"]   # one device, augmentation (and shrinking) in its training step
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    saved, seen = None, []
    try:
        for line in first.stderr:
            seen.append(line)
            found = re.search(r"checkpoint: epoch 1 saved to .* \(weights (\w+)\)", line)
            if found:
                saved = found.group(1)
                first.send_signal(signal.SIGKILL)     # as an OOM kill or a pre-empted node would
                break
    finally:
        first.kill()
        first.wait(timeout=60)
    assert saved, "the first run never saved a checkpoint"
    assert any("epoch 1: training at 80² images" in line for line in seen)
    run_dir = out / "runs" / "killed-1"
    assert not (out / "killed-1").exists() and (run_dir / "checkpoint").is_dir()

    resumed = subprocess.run([sys.executable, "-m", "training", "--resume", str(run_dir)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode in (0, 3), resumed.stderr[-4000:]
    assert f"resuming at epoch 2 from {run_dir / 'checkpoint'} (weights {saved})" in resumed.stderr
    assert "checkpoint: epoch 1 saved" not in resumed.stderr          # epoch 1 was not redone
    assert "checkpoint: epoch 2 saved" in resumed.stderr
    assert "epoch 2: training at 96² images" in resumed.stderr and "at 80²" not in resumed.stderr
    card = ModelCard.read(out / "killed-1")
    assert card.version == "killed-1" and card.metrics["best_epoch"] == 2 and card.input_size == 96
    with open(out / "killed-1" / "history.csv", newline="") as f:         # one row per epoch, across both
        assert [(r["epoch"], r["image_size"]) for r in csv.DictReader(f)] == [("0", "80"), ("1", "96")]
    assert json.loads((out / "killed-1" / "config.json").read_text())["epochs"] == 2


def test_two_workers_train_one_model_with_multi_worker_mirrored_strategy(phantoms, tmp_path):
    """The two-node launch of deploy/training/README.md, on one machine: two processes, one
    TF_CONFIG cluster over localhost, one prepared cache. Only the chief writes the artifact;
    both saw the same 2 replicas and end with the same weights."""
    from tests.services import free_port
    from training.prepare import prepare

    cache = prepare(phantoms, tmp_path / "cache", 75, processes=1)
    cluster = [f"localhost:{free_port()}", f"localhost:{free_port()}"]
    out = tmp_path / "models"
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": {"worker": cluster},
                                                      "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "training", "--engine", LOOP_ENGINE, "--data", str(cache.root),
             "--input-size", "75",
             "--batch-size", "4", "--epochs", "2", "--steps-per-epoch", "2", "--seed", "5",
             "--out", str(out), "--version", "two-workers", "--verbose", "2", "--allow-failed"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    try:
        outputs = [p.communicate(timeout=500) for p in procs]
    finally:       # a worker whose peer failed waits for it forever, and ignores SIGTERM
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode in (0, 3), err[-4000:]
    for _, err in outputs:
        assert "strategy MultiWorkerMirroredStrategy: 2 replica(s) in sync" in err
    card = ModelCard.read(out / "two-workers")
    assert card.training["replicas"] == 2 and card.training["global_batch"] == 8
    assert card.training["strategy"] == "MultiWorkerMirroredStrategy"
    digests = [re.findall(r"checkpoint: epoch 2 saved .* \(weights (\w+)\)", err) for _, err in outputs]
    assert digests[0] and digests[0] == digests[1]          # the two replicas hold one model


def test_mixed_precision_computes_in_bf16_and_exports_a_float32_model():
    """--mixed-precision bf16: layers compute in bfloat16 with float32 variables, the output
    layer in float32; the exported artifact computes in float32 throughout and predicts what
    the bf16 model does, to bf16's precision."""
    import keras

    from training.distribute import precision
    from training.train import MyDeepModel, _all_layers, weights_digest

    with precision("bf16"):
        deep = MyDeepModel(engine=LOOP_ENGINE, input_dims=(75, 75, 3), batch_size=4, verbose=0)
    assert keras.config.dtype_policy().name == "float32"          # restored after the block
    convs = [layer for layer in _all_layers(deep.model) if isinstance(layer, keras.layers.Conv2D)]
    assert convs[0].compute_dtype == "bfloat16" and convs[0].variable_dtype == "float32"
    assert deep.model.get_layer("ich").compute_dtype == "float32"
    rng = np.random.default_rng(0)
    x = rng.random((4, 75, 75, 3), np.float32)
    y = (rng.random((4, 6)) < 0.3).astype(np.float32)
    assert np.isfinite(deep.model.train_on_batch(x, y))
    exported = deep.export_model()
    assert {layer.compute_dtype for layer in _all_layers(exported)} == {"float32"}
    assert weights_digest(exported) == weights_digest(deep.model)
    mixed, full = np.asarray(deep.model(x, training=False)), np.asarray(exported(x, training=False))
    assert mixed.dtype == full.dtype == np.float32 and np.abs(mixed - full).max() < 0.05


def test_auto_precision_is_bf16_only_where_the_hardware_computes_it(tmp_path):
    """--mixed-precision auto (the scratch recipe's): bf16 on GPUs from Ampere (8.0) and, with no
    GPU, on CPUs with AMX or AVX512-BF16, where it is faster; float32 where bf16 would be
    emulated (older GPUs, AVX2 CPUs). Explicit names pass through."""
    from training.distribute import cpu_flags, resolve_precision

    assert resolve_precision("auto", gpus=[(8, 0), (9, 0)]) == "bf16"
    assert resolve_precision("auto", gpus=[(8, 0), (7, 5)]) == "none"     # a V100/T4 in the node
    assert resolve_precision("auto", gpus=[], flags=frozenset({"avx2", "amx_bf16"})) == "bf16"
    assert resolve_precision("auto", gpus=[], flags=frozenset({"avx512f", "avx512_bf16"})) == "bf16"
    assert resolve_precision("auto", gpus=[], flags=frozenset({"avx2", "avx512f"})) == "none"
    assert resolve_precision("fp16", gpus=[]) == "fp16" and resolve_precision("none", gpus=[(9, 0)]) == "none"
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "absent")) == frozenset()
    # this machine (no GPU here): what its own /proc/cpuinfo flags decide
    assert resolve_precision("auto") == resolve_precision("auto", gpus=[], flags=cpu_flags())


def test_auto_jit_compile_is_xla_for_long_float32_runs_on_a_cpu():
    """--jit-compile auto: XLA where measured faster (float32 on a CPU without AVX-512) and
    where its longer compile is repaid (XLA_MIN_STEPS); Keras' own choice on a GPU; bf16 on a
    CPU, and float32 with AVX-512, keep oneDNN's kernels (XLA measured 1.9x and 1.36x slower)."""
    from training.distribute import XLA_MIN_STEPS, resolve_jit
    from training.train import MyDeepModel

    avx2, avx512 = frozenset({"avx2", "fma"}), frozenset({"avx2", "fma", "avx512f", "avx512bw"})
    assert resolve_jit("auto", "none", XLA_MIN_STEPS, gpus=[], flags=avx2) == "on"
    assert resolve_jit("auto", "none", XLA_MIN_STEPS, gpus=[], flags=avx512) == "off"
    assert resolve_jit("auto", "none", XLA_MIN_STEPS - 1, gpus=[], flags=avx2) == "off"    # tests, smoke runs
    assert resolve_jit("auto", "bf16", 10 * XLA_MIN_STEPS, gpus=[], flags=avx2) == "off"
    assert resolve_jit("auto", "none", 10, gpus=["GPU:0"], flags=avx2) == "auto"
    assert resolve_jit("on", "bf16", 1, gpus=[]) == "on" and resolve_jit("off", "none", 10**6) == "off"
    compiled = {name: MyDeepModel(input_dims=(75, 75, 3), batch_size=2, verbose=0, jit_compile=name
                                  ).model.jit_compile for name in ("on", "off")}
    assert compiled == {"on": True, "off": False}


def test_augmentation_in_the_training_step_is_not_compiled_with_xla_where_it_cannot_be(tmp_path, capsys):
    """--augment-on device (the default with a GPU) puts the geometric layers
    (ImageProjectiveTransformV3) and mixup (a gamma draw) in the training step; XLA has no
    kernels for them in this TensorFlow (tensorflow#100865), and Keras' jit_compile="auto"
    turns XLA on with any GPU: the step failed at its first trace. Such a step now trains
    without XLA, and an explicit --jit-compile on is refused before any data is made."""
    from training import config
    from training.__main__ import main
    from training.data import DevicePreprocess, HUAugment
    from training.train import device_step_jit

    assert DevicePreprocess(1, HUAugment(), 0.0, 75).xla_compiles()          # HU ops, windows
    assert not DevicePreprocess(1, None, 1.0, 75).xla_compiles()             # geometric layers
    assert not DevicePreprocess(1, None, 0.0, 75, mixup=0.4).xla_compiles()
    device = ["--synthetic-studies", "2", "--augment-on", "device"]
    assert device_step_jit(config.load(device), "device") == "off"            # auto: without XLA
    assert device_step_jit(config.load([*device, "--no-augment"]), "device") == "auto"
    assert device_step_jit(config.load([*device, "--jit-compile", "on"]), "host") == "on"
    argv = [*device, "--jit-compile", "on", "--synthetic-dir", str(tmp_path / "phantoms"),
            "--out", str(tmp_path / "models")]
    assert main(argv) == 2
    assert "XLA cannot compile this run's augmentation" in capsys.readouterr().err
    assert not (tmp_path / "phantoms").exists()                             # refused first
