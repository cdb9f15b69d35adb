"""Synthetic head-CT phantoms with known bleeds, written in the RSNA 2019 layout.

Tests, the demo and CI training need realistic DICOM series whose labels are known exactly; the
real RSNA set (450 GB) is not available here. A study is a stack of axial slices through an
ellipsoidal head: scalp, skull, grey/white matter, sulci, ventricles and cisterns in plausible
HU, Gaussian noise, and in positive studies one or two of the five bleed subtypes drawn in 3-D.
Each study is acquired at a `Site` (SITES): the ranges its head size, scanner (noise, texture,
kernel, calibration, beam hardening), motion, atrophy, hard-negative findings and bleed density
and size are drawn from, so a model can be trained on one spread and validated on another.

    OUT/stage_2_train/ID_<9 hex>.dcm   one CT Image Storage file per slice
    OUT/stage_2_train.csv              ID,Label / ID_<hex>_<label>,0|1, six rows per slice

Every random choice comes from numpy SeedSequence(seed, spawn_key=(stream, study, slice)), so
the same arguments give byte-identical output whatever the number of worker processes, and a
study rendered with `bleeds=False` has the same anatomy, noise and UIDs as with bleeds.

A minority of studies use the pixel encodings a reader must cope with (see VARIANTS), including
the RSNA 12-bit defect (stored = HU mod 4096, intercept 0) that readers fix with
`x = stored + 1000; x[x >= 4096] -= 4096; intercept = -1000`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from ich.labels import ANY, LABELS, SUBTYPES

#: Pixel encodings; SeriesDescription is "PHANTOM <variant>".
VARIANTS = ("default", "uint16", "small256", "slope", "padded", "rsna12bit")
#: One block of 17 consecutive studies holds 12 default studies and each other variant once.
_VARIANT_BLOCK = ("default",) * 12 + VARIANTS[1:]

TRAIN_DIR = "stage_2_train"
TRAIN_CSV = "stage_2_train.csv"
#: Each study's site draws (`acquisition_row`), beside the labels: what an error analysis needs to
#: say which scanner or patient axis a model fails on (`training.studies.errors_by`).
ACQUISITIONS_CSV = "acquisitions.csv"
#: What a folder was generated from (`manifest`): reused under other arguments, it says so.
MANIFEST_JSON = "phantoms.json"
log = logging.getLogger(__name__)

SLICE_SPACING_MM = 5.0
FOV_MM = 230.4                      # 0.45 mm pixels at 512², 0.9 mm at 256²
MIN_BLEED_PIXELS_512 = 20           # a subtype is labelled on a slice from this many pixels
AIR_HU, PADDING_STORED = -1000.0, -2000
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ich-watch:synthetic:v1")

# SeedSequence streams: one per independent kind of random choice.
_S_ANATOMY, _S_BLEEDS, _S_NOISE, _S_VARIANT, _S_POSITIVE, _S_IDS, _S_META, _S_SITE = range(8)

# Subtype choice weights, the z-band (normalised -0.85 bottom .. 0.95 top) a bleed may occupy
# and its length as a fraction of the study's slices.
_SUBTYPE_WEIGHTS = {"epidural": 0.14, "intraparenchymal": 0.22, "intraventricular": 0.18,
                    "subarachnoid": 0.22, "subdural": 0.24}
_Z_BAND = {"epidural": (-0.6, 0.8), "intraparenchymal": (-0.5, 0.7),
           "intraventricular": (-0.27, 0.37), "subarachnoid": (-0.7, 0.8), "subdural": (-0.6, 0.85)}
_LENGTH = {"epidural": (0.12, 0.3), "intraparenchymal": (0.08, 0.25),
           "intraventricular": (0.1, 0.25), "subarachnoid": (0.12, 0.35), "subdural": (0.2, 0.45)}
_VENTRICLE_Z, _VENTRICLE_HALF = 0.05, 0.4   # lateral ventricles span zn in 0.05 ± 0.4


@dataclass
class SyntheticSlice:
    """One rendered slice: its RSNA id, the dataset to write, its labels and where blood is."""

    image_id: str
    dataset: FileDataset
    labels: dict[str, int]
    bleed_mask: np.ndarray          # bool (Rows, Columns): pixels drawn as blood, any subtype
    bleed_pixels: dict[str, int]    # subtype -> pixels drawn on this slice


# ----------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class Site:
    """Where a dataset comes from: the ranges each study's patient, scanner and protocol are
    drawn from, uniformly in [lo, hi] (a probability for the optional findings), except that a
    `faint_bleeds` share of studies draws its bleed densities from the faint FAINT_PART of
    `bleed_shift` (near-isodense blood is what models miss, so training shows more of it).

    A model trained on one narrow generator learns that generator (issue 12: a phantom-trained
    model alerted on 15 of 15 normal studies of another generator). `randomised` spreads every
    axis that differs between scanners, sites and patients; `site-d` lies outside it on noise
    texture, reconstruction kernel and head size, so it can stand for a hospital the model
    never saw; `site-e` lies outside on the other side (small heads, very soft kernel, low
    noise, HU calibration off by 6.5-10, strong beam hardening) and was defined before any model
    was measured on it, so no design choice was tuned on it. `site-f` pushes one axis out:
    skull-base streaks, which site-e's false alerts followed. `site-g` adds what training never
    shows: intracranial metal (an aneurysm clip or coil) and its streaks, bright and dark lines
    across the brain that no kernel or skull-base range resembles. `legacy` is the generator
    before sites existed, byte for byte.
    docs/training.md tabulates the ranges and why each.
    """

    name: str
    head_scale: tuple[float, float] = (1.0, 1.0)    # x head semi-axes (adult population)
    tilt: tuple[float, float] = (0.0, 0.0)          # rad of in-plane rotation beyond +-0.12
    fov_mm: tuple[float, float] = (FOV_MM, FOV_MM)  # reconstruction field of view
    slice_mm: tuple[float, ...] = (SLICE_SPACING_MM,)   # slice thickness = spacing (a choice)
    noise_scale: tuple[float, float] = (1.0, 1.0)   # x the anatomy's 3-6 HU noise SD (dose)
    noise_grain: tuple[float, float] = (0.0, 0.0)   # px at 512²: noise correlation (texture)
    kernel: tuple[float, float] = (0.0, 0.0)        # < 0: blur sigma px (soft); > 0: unsharp gain
    hu_offset: tuple[float, float] = (0.0, 0.0)     # HU calibration error (water is not 0)
    cupping: tuple[float, float] = (0.0, 0.0)       # HU beam hardening: the centre darker by this
    streaks: tuple[float, float] = (0.0, 0.0)       # HU of skull-base streaks (petrous bones)
    motion: float = 0.0                             # probability of a ghosted (moving) study
    atrophy: tuple[float, float] = (0.0, 0.0)       # 0 young .. 1 atrophic: CSF, sulci, ventricles
    calcification: float = 0.0                      # probability of each physiological calcification
    dense_vessel: float = 0.0                       # probability of a hyperdense MCA (not a bleed)
    bleed_shift: tuple[float, float] = (0.0, 0.0)   # HU added to a bleed's 60-80 (SAH 56-70)
    bleed_scale: tuple[float, float] = (1.0, 1.0)   # x bleed thickness and blob size
    blood_clip: tuple[float, float] = (50.0, 90.0)  # blood HU after noise stays in this range
    faint_bleeds: float = 0.0                       # share of studies with bleeds in FAINT_PART
    metal: float = 0.0                              # probability of an aneurysm clip or coil
    metal_streaks: tuple[float, float] = (0.0, 0.0)  # HU of its streaks 10 mm from the metal


#: The faint end of a site's `bleed_shift` that `faint_bleeds` studies draw from: the lowest
#: 40 % (randomised: -12 to -4 HU, bleeds 48-76 HU, SAH 44-66).
FAINT_PART = 0.4

#: Named sites. Training data default to `randomised`; `site-d` to `site-g` are for held-out
#: validation only. `site-f` is `randomised` with every study's skull-base streaks beyond
#: training's (36-55 HU) and no faint-bleed share: one axis pushed out, the rest inside;
#: `site-g` is `randomised` with an aneurysm clip or coil in every study (streaks 40-200 HU).
SITES: dict[str, Site] = {
    "legacy": Site("legacy"),
    "randomised": Site(
        "randomised", head_scale=(0.88, 1.10), tilt=(-0.25, 0.25), fov_mm=(200.0, 260.0),
        slice_mm=(2.5, 3.0, 5.0), noise_scale=(0.6, 1.6), noise_grain=(0.0, 1.2),
        kernel=(-0.8, 0.6), hu_offset=(-6.0, 6.0), cupping=(0.0, 10.0), streaks=(0.0, 25.0),
        motion=0.1, atrophy=(0.0, 1.0), calcification=0.35, dense_vessel=0.15,
        bleed_shift=(-12.0, 8.0), bleed_scale=(0.6, 1.3), blood_clip=(30.0, 100.0),
        faint_bleeds=0.4),
    "site-d": Site(
        "site-d", head_scale=(1.12, 1.22), tilt=(-0.25, 0.25), fov_mm=(240.0, 280.0),
        slice_mm=(1.25, 2.0), noise_scale=(1.4, 2.0), noise_grain=(1.4, 2.2),
        kernel=(0.7, 1.1), hu_offset=(-6.0, 6.0), cupping=(5.0, 12.0), streaks=(15.0, 35.0),
        motion=0.1, atrophy=(0.3, 1.0), calcification=0.5, dense_vessel=0.2,
        bleed_shift=(-12.0, 8.0), bleed_scale=(0.6, 1.3), blood_clip=(30.0, 100.0)),
    "site-e": Site(
        "site-e", head_scale=(0.78, 0.86), tilt=(-0.25, 0.25), fov_mm=(176.0, 196.0),
        slice_mm=(5.0, 7.0), noise_scale=(0.3, 0.6), noise_grain=(0.0, 0.5),
        kernel=(-1.4, -1.0), hu_offset=(6.5, 10.0), cupping=(10.0, 16.0), streaks=(25.0, 45.0),
        motion=0.1, atrophy=(0.0, 0.5), calcification=0.35, dense_vessel=0.15,
        bleed_shift=(-12.0, 8.0), bleed_scale=(0.6, 1.3), blood_clip=(30.0, 100.0)),
    "site-f": Site(
        "site-f", head_scale=(0.88, 1.10), tilt=(-0.25, 0.25), fov_mm=(200.0, 260.0),
        slice_mm=(2.5, 3.0, 5.0), noise_scale=(0.6, 1.6), noise_grain=(0.0, 1.2),
        kernel=(-0.8, 0.6), hu_offset=(-6.0, 6.0), cupping=(0.0, 10.0), streaks=(36.0, 55.0),
        motion=0.1, atrophy=(0.0, 1.0), calcification=0.35, dense_vessel=0.15,
        bleed_shift=(-12.0, 8.0), bleed_scale=(0.6, 1.3), blood_clip=(30.0, 100.0)),
    "site-g": Site(
        "site-g", head_scale=(0.88, 1.10), tilt=(-0.25, 0.25), fov_mm=(200.0, 260.0),
        slice_mm=(2.5, 3.0, 5.0), noise_scale=(0.6, 1.6), noise_grain=(0.0, 1.2),
        kernel=(-0.8, 0.6), hu_offset=(-6.0, 6.0), cupping=(0.0, 10.0), streaks=(0.0, 25.0),
        motion=0.1, atrophy=(0.0, 1.0), calcification=0.35, dense_vessel=0.15,
        bleed_shift=(-12.0, 8.0), bleed_scale=(0.6, 1.3), blood_clip=(30.0, 100.0),
        metal=1.0, metal_streaks=(40.0, 200.0)),
}
DEFAULT_SITE = "randomised"


def site_named(site: "str | Site") -> Site:
    if isinstance(site, Site):
        return site
    try:
        return SITES[site]
    except KeyError:
        raise ValueError(f"unknown site {site!r}; expected one of {', '.join(SITES)}") from None


def natural_mix(site: "str | Site") -> Site:
    """`site` without its faint-bleed emphasis: studies as the site would send them. Operating
    points are chosen on these: the emphasis helps a model learn near-isodense blood, but
    studies drawn with it would place a threshold for bleeds fainter than the site's."""
    return dataclasses.replace(site_named(site), faint_bleeds=0.0)


#: Site fields added after data were generated, with the default that draws nothing new: at
#: it a site's digest, and so its folders' names, stay what they were.
_LATER_FIELDS = {"metal": 0.0, "metal_streaks": (0.0, 0.0)}


def site_digest(site: "str | Site") -> str:
    """8 hex digits of a site's every range: phantom folders are named by it, so data drawn
    from an older definition of a site (another streak or bleed range) are never reused as if
    they were drawn from the current one."""
    site = site_named(site)
    values = tuple(getattr(site, f.name) for f in dataclasses.fields(site)
                   if f.name not in _LATER_FIELDS or getattr(site, f.name) != _LATER_FIELDS[f.name])
    return hashlib.sha256(repr(values).encode()).hexdigest()[:8]


def folder_name(seed: int, studies: int, slices: tuple[int, int], site: "str | Site") -> str:
    """The default folder of a generated dataset: its arguments and its site's digest."""
    site = site_named(site)
    return f"seed{seed}-studies{studies}-slices{slices[0]}-{slices[1]}-{site.name}-{site_digest(site)}"


@dataclass(frozen=True)
class _Acquisition:
    """One study's draw from its site: scanner, protocol, patient and incidental findings."""

    site: str
    head_scale: float
    tilt: float
    fov_mm: float
    slice_mm: float
    noise_scale: float
    noise_grain: float
    kernel: float
    hu_offset: float
    cupping: float
    streaks: tuple        # (amplitude, ((angle, offset mm, width mm, sign), ...))
    motion: tuple         # (weight, dx px, dy px); weight 0 = still
    atrophy: float
    calcifications: tuple  # (kind, x mm, y mm, z centre, z half, radius mm, HU)
    vessel: tuple         # () or (side, zn, HU, radius mm)
    bleed_shift: tuple[float, float]
    bleed_scale: float
    blood_clip: tuple[float, float]
    metal: tuple = ()     # () or (x mm, y mm from the ventricles, zn, half zn, radius mm, HU,
    #                       rays ((angle, sign, width mm), ...))


def _acquisition(seed: int, index: int, site: Site) -> _Acquisition:
    """The study's draw from `site`, from its own stream (anatomy and bleeds keep theirs).
    The number of draws does not depend on the site, only their ranges do."""
    rng = _rng(seed, _S_SITE, index)
    u = lambda lo_hi: _u(rng, *lo_hi)  # noqa: E731
    values = dict(
        head_scale=u(site.head_scale), tilt=u(site.tilt), fov_mm=u(site.fov_mm),
        slice_mm=float(site.slice_mm[int(rng.integers(0, len(site.slice_mm)))]),
        noise_scale=u(site.noise_scale), noise_grain=u(site.noise_grain), kernel=u(site.kernel),
        hu_offset=u(site.hu_offset), cupping=u(site.cupping))
    amplitude = u(site.streaks)
    lines = tuple((_u(rng, -0.5, 0.5), _u(rng, -25, 10), _u(rng, 1.0, 3.0),
                   -1.0 if rng.random() < 0.75 else 1.0) for _ in range(4))
    moving = rng.random() < site.motion
    motion = (_u(rng, 0.15, 0.35), _u(rng, -4, 4), _u(rng, -4, 4))
    atrophy = u(site.atrophy)
    calcifications = []
    for kind in ("pineal", "choroid", "falx", "basal"):
        present = rng.random() < site.calcification
        x, y, radius, hu = _u(rng, -1, 1), _u(rng, -1, 1), _u(rng, 0, 1), _u(rng, 0, 1)
        if present:
            calcifications.append((kind, x, y, radius, hu))
    vessel_present = rng.random() < site.dense_vessel
    vessel = (int(rng.integers(0, 2)) * 2 - 1, _u(rng, -0.5, -0.4), _u(rng, 55, 70), _u(rng, 1.0, 1.6))
    shifts = (u(site.bleed_shift), u(site.bleed_shift))
    bleed_scale = u(site.bleed_scale)
    if rng.random() < site.faint_bleeds:   # drawn after the rest, always: they stay put
        lo, hi = site.bleed_shift
        shifts = tuple(lo + (s - lo) * FAINT_PART for s in shifts)
    # metal came later still: near the circle of Willis, where clips and coils sit
    metal_present = rng.random() < site.metal
    metal = (_u(rng, -25, 25), _u(rng, -15, 10), _u(rng, -0.5, -0.2), _u(rng, 0.03, 0.07),
             _u(rng, 1.5, 4.0), u(site.metal_streaks),
             tuple((_u(rng, 0, math.pi), -1.0 if rng.random() < 0.6 else 1.0, _u(rng, 0.6, 2.0))
                   for _ in range(8)))
    return _Acquisition(
        site=site.name, **values, streaks=(amplitude, lines) if amplitude > 0 else (0.0, ()),
        motion=motion if moving else (0.0, 0.0, 0.0), atrophy=atrophy,
        calcifications=tuple(calcifications), vessel=vessel if vessel_present else (),
        bleed_shift=shifts, bleed_scale=bleed_scale, blood_clip=tuple(site.blood_clip),
        metal=metal if metal_present else ())


# ----------------------------------------------------------------------------- seeds and ids


def _rng(seed: int, stream: int, index: int = 0, k: int = 0) -> np.random.Generator:
    """An independent generator per (seed, stream, study, slice): order of use never matters."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, index, k)))


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A Python float, so float32 grids stay float32 (NumPy 2 promotion rules)."""
    return float(rng.uniform(lo, hi))


def _uid(*parts) -> UID:
    """A 2.25.<uuid> UID (PS3.5 B.2) from a name-based UUID: reproducible, never colliding
    with real UIDs. (pydicom's generate_uid ignores its entropy when prefix is None.)"""
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(map(str, parts))).int}")


IMPLEMENTATION_UID = _uid("implementation")


_MASK36 = (1 << 36) - 1


@functools.lru_cache(maxsize=64)
def _id_key(seed: int) -> tuple[int, int]:
    a, b = _rng(seed, _S_IDS).integers(0, 1 << 36, size=2)
    return int(a), int(b)


def image_id(seed: int, index: int, k: int) -> str:
    """RSNA-style "ID_" + 9 hex: a keyed bijection of (study, slice), so ids never collide."""
    key = _id_key(seed)
    x = ((index << 8) | k) ^ key[0]
    x = (x * 0x9E3779B97) & _MASK36          # odd multipliers and xor-shifts are invertible
    x ^= x >> 17
    x = (x * 0x5DEECE66D) & _MASK36
    x ^= x >> 13
    return f"ID_{x ^ key[1]:09x}"


def study_variant(seed: int, index: int) -> str:
    """The study's pixel encoding: a seeded shuffle of 17-study blocks (about 70 % default)."""
    block, pos = divmod(index, len(_VARIANT_BLOCK))
    order = _rng(seed, _S_VARIANT, block).permutation(len(_VARIANT_BLOCK))
    return _VARIANT_BLOCK[order[pos]]


def study_is_positive(seed: int, index: int, prevalence: float, slices: tuple[int, int]) -> bool:
    """Balanced (low-discrepancy) choice: any run of N studies holds N*p ± 1 positive ones.

    p = prevalence / (expected positive-slice fraction of a positive study), so the slice-level
    prevalence of a dataset lands near `prevalence` even for a few dozen studies.
    """
    fraction = _positive_fraction(tuple(slices))       # 0 when studies are too short to bleed
    p = min(1.0, prevalence / fraction) if fraction else 0.0
    offset = float(_rng(seed, _S_POSITIVE).random())
    return math.floor((index + 1) * p + offset) != math.floor(index * p + offset)


@functools.lru_cache(maxsize=16)
def _positive_fraction(slices: tuple[int, int]) -> float:
    """Expected positive slices / expected slices of a positive study (Monte Carlo on plans)."""
    rng = np.random.default_rng(20190901)
    lo, hi = slices
    union = 0
    for _ in range(3000):
        n = int(rng.integers(lo, hi + 1))
        covered = set()
        for _, k0, length in _plan_ranges(rng, n, _choose_subtypes(rng, n)):
            covered.update(range(k0, k0 + length))
        union += len(covered)
    return union / 3000 / ((lo + hi) / 2)


# ----------------------------------------------------------------------------- study plan


def _zn(n: int) -> np.ndarray:
    """Normalised z of each slice: -0.85 (skull base) to 0.95 (vertex) of the head ellipsoid."""
    return np.linspace(-0.85, 0.95, n)


@functools.lru_cache(maxsize=4096)
def _band(n: int, subtype: str) -> np.ndarray:
    lo, hi = _Z_BAND[subtype]
    zn = _zn(n)
    return np.flatnonzero((zn >= lo) & (zn <= hi))


def _choose_subtypes(rng: np.random.Generator, n: int) -> tuple[str, ...]:
    """One subtype (70 %) or two, among those whose z-band holds at least two slices."""
    eligible = [s for s in SUBTYPES if len(_band(n, s)) >= 2]
    if not eligible:
        return ()
    weights = np.array([_SUBTYPE_WEIGHTS[s] for s in eligible])
    count = min(len(eligible), 1 if rng.random() < 0.7 else 2)
    picked = rng.choice(len(eligible), size=count, replace=False, p=weights / weights.sum())
    return tuple(eligible[i] for i in sorted(picked))


def _plan_ranges(rng, n: int, subtypes) -> list[tuple[str, int, int]]:
    """(subtype, first slice, length >= 2) for each bleed, inside its z-band."""
    plans = []
    for subtype in subtypes:
        band = _band(n, subtype)
        if len(band) < 2:
            continue
        length = int(np.clip(round(_u(rng, *_LENGTH[subtype]) * n), 2, len(band)))
        k0 = int(band[0] + rng.integers(0, len(band) - length + 1))
        plans.append((subtype, k0, length))
    return plans


@dataclass(frozen=True)
class _Head:
    """Per-study anatomy parameters (mm, HU, radians)."""

    n: int
    size: int
    cx: float
    cy: float
    theta: float
    a: float          # left-right semi-axis of the widest section
    b: float          # antero-posterior semi-axis
    shape: tuple[float, float, float, float]
    t_scalp: float
    t_skull: float
    skull_peak: float
    scalp_hu: float
    grey_hu: float
    white_hu: float
    csf_hu: float
    rim: float        # CSF between inner skull and cortex
    grey: float       # cortical thickness
    noise_sd: float
    sulci: int
    sulcus_w: float
    sulcus_depth: float
    wobble: tuple[float, float]
    curl: float
    vent: tuple[float, ...]   # lateral ventricles: x offset, y centre, half-width, half-length, bend
    z0: float
    fov: float = FOV_MM


def _head(seed: int, index: int, slices: tuple[int, int], size: int,
          acq: "_Acquisition | None" = None) -> _Head:
    """The study's anatomy; `acq` scales the head, rotates it, widens the CSF spaces
    (atrophy) and sets the noise, all from the site's stream so the anatomy draws stay put."""
    rng = _rng(seed, _S_ANATOMY, index)
    u = functools.partial(_u, rng)
    scale = acq.head_scale if acq else 1.0
    atrophy = acq.atrophy if acq else 0.0
    n = int(rng.integers(slices[0], slices[1] + 1))
    cx, cy, theta, a, b = u(-6, 6), u(-6, 6), u(-0.12, 0.12), u(68, 78), u(86, 97)
    shape = (u(-0.03, 0.03), u(0, 6.3), u(-0.02, 0.02), u(0, 6.3))
    t_scalp, t_skull, skull_peak, scalp_hu = u(3, 5.5), u(4, 6.5), u(1350, 1470), u(22, 38)
    grey_hu, white_hu, csf_hu, rim, grey = u(37, 44), u(25, 30), u(3, 12), u(1.0, 1.8), u(2.3, 3.2)
    noise_sd, sulci, sulcus_w = u(3, 6), int(rng.integers(34, 46)), u(1.2, 1.6)
    sulcus_depth, wobble, curl = u(9, 15), (u(0.2, 0.45), u(0, 6.3)), u(-0.25, 0.25)
    vx, vy, vw, vl, bend = u(5.5, 8), u(-6, 4), u(2.5, 4), u(18, 26), u(2, 5)
    if atrophy:                    # ex vacuo: wider rim, sulci and ventricles
        rim, sulcus_w = rim + 2.0 * atrophy, sulcus_w + 1.0 * atrophy
        vx, vw, vl = vx * (1 + 0.3 * atrophy), vw * (1 + 0.8 * atrophy), vl * (1 + 0.2 * atrophy)
    return _Head(
        n=n, size=size, cx=cx, cy=cy, theta=theta + (acq.tilt if acq else 0.0),
        a=a * scale, b=b * scale, shape=shape, t_scalp=t_scalp, t_skull=t_skull,
        skull_peak=skull_peak, scalp_hu=scalp_hu, grey_hu=grey_hu, white_hu=white_hu,
        csf_hu=csf_hu, rim=rim, grey=grey, noise_sd=noise_sd * (acq.noise_scale if acq else 1.0),
        sulci=sulci, sulcus_w=sulcus_w, sulcus_depth=sulcus_depth, wobble=wobble, curl=curl,
        vent=(vx, vy, vw, vl, bend), z0=round(u(-60, 20), 1), fov=acq.fov_mm if acq else FOV_MM,
    )


def _radius(h: _Head, phi):
    """Outer scalp radius of the widest section in direction phi (head frame)."""
    e2, p2, e3, p3 = h.shape
    ellipse = h.a * h.b / np.sqrt((h.b * np.cos(phi)) ** 2 + (h.a * np.sin(phi)) ** 2)
    return ellipse * (1 + e2 * np.cos(2 * phi + p2) + e3 * np.cos(3 * phi + p3))


class _Grid:
    """Float32 coordinate grids of one study, on the crop that can hold the head."""

    def __init__(self, h: _Head):
        pixel_mm = h.fov / h.size
        centres = ((np.arange(h.size) - (h.size - 1) / 2) * pixel_mm).astype(np.float32)
        grow = 1 + abs(h.shape[0]) + abs(h.shape[2])
        cos, sin = math.cos(h.theta), math.sin(h.theta)
        reach_x = math.hypot(h.a * cos, h.b * sin) * grow + 1
        reach_y = math.hypot(h.a * sin, h.b * cos) * grow + 1
        cols = np.flatnonzero(np.abs(centres - h.cx) <= reach_x)
        rows = np.flatnonzero(np.abs(centres - h.cy) <= reach_y)
        self.crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        x = centres[cols][None, :] - np.float32(h.cx)
        y = centres[rows][:, None] - np.float32(h.cy)
        cos, sin = np.float32(cos), np.float32(sin)
        self.xh = cos * x + sin * y            # head frame: x left-right, y anterior -> posterior
        self.yh = cos * y - sin * x
        self.ax = np.abs(self.xh)
        self.r = np.hypot(self.xh, self.yh)
        self.phi = np.arctan2(self.yh, self.xh)
        self.r0 = _radius(h, self.phi).astype(np.float32)
        self.skull = (h.t_skull * (1.1 - 0.1 * np.cos(2 * self.phi))).astype(np.float32)
        self.inner = h.t_scalp + self.skull
        self.phase = self.phi / np.float32(2 * np.pi)
        self.wobble = (h.wobble[0] * np.sin(3 * self.phi + h.wobble[1])).astype(np.float32)
        self.circumference = np.float32(2 * np.pi) * self.r
        self.curl = h.curl / np.maximum(self.circumference, np.float32(1e-3))
        self.cistern_r = np.hypot(self.xh, self.yh - np.float32(h.vent[1] + 12))
        # ventricles, thalami and cisterns lie within 42 mm of the centre: draw them there only
        core_rows = np.flatnonzero(np.abs(centres[rows] - h.cy) <= 42)
        core_cols = np.flatnonzero(np.abs(centres[cols] - h.cx) <= 42)
        self.core = (slice(core_rows[0], core_rows[-1] + 1), slice(core_cols[0], core_cols[-1] + 1))
        self.zn = _zn(h.n)
        self.scale = np.sqrt(1 - self.zn ** 2)


@dataclass
class _Anatomy:
    """One slice on the crop: noise-free HU and the regions bleeds are drawn into."""

    hu: np.ndarray
    di: np.ndarray            # mm inside the inner table (>= 0: intracranial)
    surface_csf: np.ndarray   # CSF rim and sulci
    cistern: np.ndarray
    ventricle: np.ndarray     # lateral ventricles
    parenchyma: np.ndarray
    vent_scale: float


def _taper(zn: float, centre: float, half: float) -> float:
    q = (zn - centre) / half
    return math.sqrt(1 - q * q) if abs(q) < 1 else 0.0


def _anatomy(h: _Head, g: _Grid, k: int) -> _Anatomy:
    zn, s = float(g.zn[k]), float(g.scale[k])
    d = s * g.r0 - g.r                                  # mm inside the scalp surface
    di = d - g.inner
    hu = np.full(d.shape, AIR_HU, np.float32)
    np.copyto(hu, h.scalp_hu, where=d >= 0)
    u = (d - h.t_scalp) / g.skull                       # 0..1 across the bone
    np.copyto(hu, 700 + (h.skull_peak - 700) * 4 * u * (1 - u), where=(u >= 0) & (di < 0))

    brain = di >= 0
    db = di - h.rim                                     # mm below the cortical surface
    grey, surface, csf = _cortex(h, g, zn, s, db)
    ventricle, cistern = np.zeros(d.shape, bool), np.zeros(d.shape, bool)
    v = _deep(h, g, zn, grey[g.core], csf[g.core], ventricle[g.core], cistern[g.core])
    np.copyto(hu, h.white_hu, where=brain)
    np.copyto(hu, h.grey_hu, where=brain & grey)
    np.copyto(hu, h.csf_hu, where=brain & csf)
    return _Anatomy(hu, di, brain & surface, brain & cistern, brain & ventricle, brain & ~csf, v)


def _cortex(h: _Head, g: _Grid, zn: float, s: float, db: np.ndarray):
    """Cortical grey matter, and CSF in the surface rim, sulci and the midline fissure."""
    sulci = max(8, round(h.sulci * math.sqrt(s)))       # fewer, not thinner, gyri near the vertex
    line = sulci * g.phase + g.wobble + np.float32(0.6 * zn) + sulci * g.curl * db
    nearest = np.rint(line)
    off = np.abs(line - nearest) * g.circumference / sulci   # mm to the nearest sulcus
    # each sulcus its own depth: a golden-ratio sequence over the sulcus number
    depth = min(h.sulcus_depth, 0.3 * s * min(h.a, h.b)) * (0.45 + 0.55 * (nearest * 0.618034 % 1))
    half = h.sulcus_w / 2
    surface = (db < 0) | ((off < half) & (db < depth))
    gap = 32 * (1 - min(max((zn - 0.1) / 0.35, 0.0), 1.0))   # corpus callosum below the fissure
    fissure_zone = np.abs(g.yh - h.vent[1]) >= gap
    grey = (db < h.grey) | ((off < half + 0.8 * h.grey) & (db < depth + h.grey))
    grey |= (g.ax < 0.8 + h.grey) & fissure_zone
    return grey, surface, surface | ((g.ax < 0.8) & fissure_zone)


def _deep(h: _Head, g: _Grid, zn: float, grey, csf, ventricle, cistern) -> float:
    """Draw thalami, ventricles and cisterns into the central window (views); return the
    lateral ventricles' size factor on this slice (0 where absent)."""
    ax, yh = g.ax[g.core], g.yh[g.core]
    vx, vy, vw, vl, bend = h.vent
    th = _taper(zn, -0.1, 0.2)
    if th > 0:                                          # thalami: deep grey matter
        grey |= ((ax - (vx + vw + 5)) / (6 * th)) ** 2 + ((yh - vy - 10) / (9 * th)) ** 2 < 1
    v = _taper(zn, _VENTRICLE_Z, _VENTRICLE_HALF)
    if v > 0.15:                                        # lateral ventricles: paired, curved
        dy = (yh - vy) / (vl * v)
        ventricle |= ((ax - vx - bend * dy * dy) / (vw * v)) ** 2 + dy * dy < 1
        csf |= ventricle
    t3 = _taper(zn, -0.15, 0.2)
    if t3 > 0:                                          # third ventricle: a midline slit
        csf |= (ax < 1.2) & (np.abs(yh - vy - 6) < 10 * t3)
    tc = _taper(zn, -0.55, 0.18)
    if tc > 0:                                          # perimesencephalic cistern ring
        ring = g.cistern_r[g.core]
        cistern |= (ring >= 12 * tc) & (ring < 12 * tc + 2.5)
        csf |= cistern
    return v if v > 0.15 else 0.0


# ----------------------------------------------------------------------------- bleeds


@dataclass(frozen=True)
class _Bleed:
    subtype: str
    k0: int
    length: int
    hu: float
    params: dict


#: What a site's bleed_scale multiplies: thickness of extra-axial bleeds, extent of SAH
#: (intraparenchymal blobs scale their sigmas; intraventricular blood fills its ventricle).
_SCALED = {"epidural": ("thick",), "subdural": ("thick",), "subarachnoid": ("alpha",)}


def _plan_bleeds(seed: int, index: int, h: _Head, subtypes,
                 acq: "_Acquisition | None" = None) -> list[_Bleed]:
    """Subtypes (seeded unless forced), z-ranges, shapes and HU of the study's bleeds.

    They come from their own stream, so forcing subtypes or rendering without bleeds leaves
    anatomy, noise and identifiers unchanged."""
    rng = _rng(seed, _S_BLEEDS, index)
    if subtypes is None:
        subtypes = _choose_subtypes(rng, h.n)
    bleeds = []
    for subtype, k0, length in _plan_ranges(rng, h.n, subtypes):
        p = {"phi0": _u(rng, -math.pi, math.pi)}
        if subtype == "epidural":
            p.update(alpha=_u(rng, 0.3, 0.55), thick=_u(rng, 9, 18))
        elif subtype == "subdural":
            p.update(alpha=_u(rng, 0.8, 1.4), thick=_u(rng, 3.5, 7))
        elif subtype == "subarachnoid":
            p.update(alpha=_u(rng, 0.4, 0.9), basal=bool(rng.random() < 0.4))
        elif subtype == "intraventricular":
            p.update(side=int(rng.integers(0, 3)), level=_u(rng, -0.4, 0.3))
        else:
            blobs = int(rng.integers(3, 6))
            p.update(rho=_u(rng, 0.15, 0.5), offsets=rng.normal(0, 4, (blobs, 2)).tolist(),
                     sigmas=rng.uniform(3, 7, blobs).tolist(),
                     weights=rng.uniform(0.6, 1.0, blobs).tolist(),
                     drift=rng.normal(0, 1.5, 2).tolist())
        hu = _u(rng, 56, 70) if subtype == "subarachnoid" else _u(rng, 60, 80)
        if acq is not None:        # the site's density (down to near-isodense) and size
            hu += acq.bleed_shift[len(bleeds) % 2]
            for key in _SCALED.get(subtype, ()):
                p[key] *= acq.bleed_scale
            if "sigmas" in p:
                p["sigmas"] = [sigma * acq.bleed_scale for sigma in p["sigmas"]]
        bleeds.append(_Bleed(subtype, k0, length, hu, p))
    return bleeds


def _angle_to(g: _Grid, phi0: float) -> np.ndarray:
    """Signed angle from direction phi0, in (-pi, pi]."""
    return (g.phi - phi0 + np.pi) % np.float32(2 * np.pi) - np.pi


def _bleed_mask(b: _Bleed, h: _Head, g: _Grid, a: _Anatomy, k: int) -> np.ndarray:
    """Pixels of bleed `b` on slice k; `t` tapers its size towards the ends of its z-range."""
    j = k - b.k0
    q = (j - (b.length - 1) / 2) / ((b.length + 1) / 2)
    t = math.sqrt(1 - q * q)
    p = b.params
    if b.subtype in ("epidural", "subdural"):
        alpha = p["alpha"] * ((0.6 + 0.4 * t) if b.subtype == "epidural" else (0.7 + 0.3 * t))
        rel = _angle_to(g, p["phi0"]) / alpha
        if b.subtype == "epidural":          # biconvex lens: thick middle, short arc
            thickness = p["thick"] * t * (1 - rel * rel)
        else:                                # crescent: long arc, thin, nearly uniform
            thickness = p["thick"] * (0.6 + 0.4 * t) * (1 - rel ** 4)
        return (a.di >= 0) & (a.di < thickness)
    if b.subtype == "subarachnoid":
        alpha = p["alpha"] * (0.6 + 0.4 * t)
        mask = a.surface_csf & (np.abs(_angle_to(g, p["phi0"])) < alpha)
        return mask | a.cistern if p["basal"] else mask
    if b.subtype == "intraventricular":      # blood layering in the posterior (dependent) part
        vy, vl = h.vent[1], h.vent[3]
        mask = a.ventricle & (g.yh > vy + p["level"] * vl * a.vent_scale)
        if p["side"] < 2:
            mask &= (g.xh > 0) if p["side"] else (g.xh < 0)
        return mask
    return _blob_mask(b, h, g, a, k, t)


def _blob_mask(b: _Bleed, h: _Head, g: _Grid, a: _Anatomy, k: int, t: float) -> np.ndarray:
    """Intraparenchymal: thresholded sum of Gaussian blobs drifting slowly along z."""
    p = b.params
    kc = b.k0 + (b.length - 1) // 2
    inner = float(g.scale[kc] * _radius(h, p["phi0"])) - h.t_scalp - h.t_skull
    j = k - kc
    cx = p["rho"] * inner * math.cos(p["phi0"]) + p["drift"][0] * j
    cy = p["rho"] * inner * math.sin(p["phi0"]) + p["drift"][1] * j
    field = np.zeros(g.r.shape, np.float32)
    for (ox, oy), sigma, w in zip(p["offsets"], p["sigmas"], p["weights"]):
        sig = sigma * (0.4 + 0.6 * t)
        dist2 = (g.xh - (cx + ox)) ** 2 + (g.yh - (cy + oy)) ** 2
        field += w * np.exp(dist2 / (-2 * sig * sig))
    return a.parenchyma & (field > 0.5)


def _bleed_masks(bleeds, h: _Head, g: _Grid) -> dict[int, dict[str, np.ndarray]]:
    """slice -> subtype -> mask, keeping only slices where the subtype reaches the label size.

    Sub-threshold fragments are not drawn, and only the longest contiguous run of labelled
    slices is kept (>= 2), so labels and pixels agree exactly and every bleed spans z.
    """
    minimum = math.ceil(MIN_BLEED_PIXELS_512 * (h.size / 512) ** 2)
    cache: dict[int, _Anatomy] = {}
    drawn: dict[int, dict[str, np.ndarray]] = {}
    for b in bleeds:
        masks = {}
        for k in range(b.k0, b.k0 + b.length):
            a = cache.setdefault(k, _anatomy(h, g, k))
            mask = _bleed_mask(b, h, g, a, k)
            if int(mask.sum()) >= minimum:
                masks[k] = mask
        run = _longest_run(sorted(masks))
        if len(run) >= 2:
            for k in run:
                drawn.setdefault(k, {})[b.subtype] = masks[k]
    return drawn


def _longest_run(ks: list[int]) -> list[int]:
    best: list[int] = []
    current: list[int] = []
    for k in ks:
        current = current + [k] if current and k == current[-1] + 1 else [k]
        if len(current) > len(best):
            best = current
    return best


# ----------------------------------------------------------------------------- encoding


@functools.lru_cache(maxsize=4)
def _outside_fov(size: int) -> np.ndarray:
    c = np.arange(size) - (size - 1) / 2
    return np.hypot(c[None, :], c[:, None]) > size / 2


def _encode(hu: np.ndarray, variant: str) -> tuple[np.ndarray, dict]:
    """Integer HU -> stored pixels and the pixel/rescale attributes of the variant."""
    tags = {"BitsStored": 16, "PixelRepresentation": 1, "RescaleIntercept": -1024,
            "RescaleSlope": 1}
    if variant == "rsna12bit":
        stored = np.mod(np.clip(hu, -1000, 3095), 4096).astype("<u2")
        tags.update(BitsStored=12, PixelRepresentation=0, RescaleIntercept=0)
    elif variant == "uint16":
        stored = (hu + 1024).astype("<u2")
        tags.update(PixelRepresentation=0)
    elif variant == "slope":
        stored = ((hu + 1024) * 2).astype("<i2")
        tags.update(RescaleSlope=0.5)
    else:
        stored = (hu + 1024).astype("<i2")
        if variant == "padded":
            stored[_outside_fov(hu.shape[0])] = PADDING_STORED
    return stored, tags


# ----------------------------------------------------------------------------- DICOM


@dataclass(frozen=True)
class _Meta:
    """Per-study identifiers: deterministic, distinctive, so leak tests can look for them."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    accession: str
    study_date: str
    study_time: str
    study_uid: str
    series_uid: str
    frame_uid: str


def _meta(seed: int, index: int) -> _Meta:
    rng = _rng(seed, _S_META, index)
    birth = np.datetime64("1930-01-01") + int(rng.integers(0, 70 * 365))
    study = np.datetime64("2019-01-01") + int(rng.integers(0, 365))
    return _Meta(
        patient_name=f"PHANTOM^{int(rng.integers(0, 1 << 24)):06X}",
        patient_id=f"PID{int(rng.integers(0, 10**8)):08d}", birth_date=_da(birth),
        sex="MF"[int(rng.integers(0, 2))], accession=f"ACC{int(rng.integers(0, 10**7)):07d}",
        study_date=_da(study),
        study_time=f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}00",
        study_uid=_uid(seed, index, "study"), series_uid=_uid(seed, index, "series"),
        frame_uid=_uid(seed, index, "frame"),
    )


def _da(day: np.datetime64) -> str:
    return str(day).replace("-", "")


def _dataset(seed, index, k, h: _Head, m: _Meta, variant, stored, tags,
             acq: _Acquisition) -> FileDataset:
    """The slice as a CT Image Storage dataset with file meta, ready for dcmwrite."""
    sop_uid = _uid(seed, index, "sop", k)
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = CTImageStorage
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = IMPLEMENTATION_UID
    fm.ImplementationVersionName = "ICHWATCH_SYN1"
    ds = FileDataset("", {}, file_meta=fm, preamble=b"\0" * 128)
    pixel_mm = h.fov / h.size
    corner = -(h.size - 1) / 2 * pixel_mm
    z = h.z0 + k * acq.slice_mm
    ds.update({
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "SOPClassUID": CTImageStorage, "SOPInstanceUID": sop_uid,
        "StudyDate": m.study_date, "SeriesDate": m.study_date, "ContentDate": m.study_date,
        "StudyTime": m.study_time, "SeriesTime": m.study_time, "ContentTime": m.study_time,
        "AccessionNumber": m.accession, "Modality": "CT", "Manufacturer": "ICH Watch",
        "ManufacturerModelName": "synthetic phantom", "ReferringPhysicianName": "",
        "SeriesDescription": f"PHANTOM {variant}",
        "PatientName": m.patient_name, "PatientID": m.patient_id,
        "PatientBirthDate": m.birth_date, "PatientSex": m.sex,
        "SliceThickness": f"{acq.slice_mm:g}" if acq.site != "legacy" else f"{acq.slice_mm:.1f}", "KVP": "120", "PatientPosition": "HFS",
        "StudyInstanceUID": m.study_uid, "SeriesInstanceUID": m.series_uid,
        "StudyID": str(index + 1), "SeriesNumber": 2, "AcquisitionNumber": 1,
        "InstanceNumber": k + 1,
        "ImagePositionPatient": [f"{corner:.3f}", f"{corner:.3f}", f"{z:.1f}"],
        "ImageOrientationPatient": ["1", "0", "0", "0", "1", "0"],
        "FrameOfReferenceUID": m.frame_uid, "PositionReferenceIndicator": "",
        "SliceLocation": f"{z:.1f}",
        "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
        "Rows": h.size, "Columns": h.size, "PixelSpacing": [f"{pixel_mm:g}"] * 2,
        "BitsAllocated": 16, "BitsStored": tags["BitsStored"], "HighBit": tags["BitsStored"] - 1,
        "PixelRepresentation": tags["PixelRepresentation"],
        "WindowCenter": ["40", "40"], "WindowWidth": ["80", "80"],
        "RescaleIntercept": f"{tags['RescaleIntercept']:g}",
        "RescaleSlope": f"{tags['RescaleSlope']:g}", "RescaleType": "HU",
    })
    if acq.site != "legacy":          # where and how it was acquired, as a real scanner says
        ds.InstitutionName = f"ICH Watch phantom site {acq.site}"
        ds.ConvolutionKernel = "SOFT" if acq.kernel < -0.3 else "SHARP" if acq.kernel > 0.3 else "STANDARD"
    if variant == "padded":
        ds[0x00280120] = DataElement(0x00280120, "SS", PADDING_STORED)
    ds[0x7FE00010] = DataElement(0x7FE00010, "OW", stored.tobytes())
    return ds


def to_bytes(dataset) -> bytes:
    """DICOM Part 10 file bytes (preamble, file meta, dataset) as written to disk."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- rendering


def _noise(seed: int, index: int, h: _Head) -> tuple[np.ndarray, np.ndarray]:
    """A per-study bank of clipped Gaussian noise and each slice's offset into it.

    Drawing one bank per study and taking per-slice windows costs a fraction of fresh noise
    per slice, and shifted windows look independent.
    """
    rng = _rng(seed, _S_NOISE, index)
    pixels = h.size * h.size
    bank = rng.standard_normal(2 * pixels, np.float32) * np.float32(h.noise_sd)
    np.clip(bank, -4 * h.noise_sd, 4 * h.noise_sd, out=bank)
    return bank, rng.integers(0, pixels, h.n)


def _render(seed, index, k, h, g, m, variant, noise, masks, bleed_hu,
            acq: _Acquisition) -> SyntheticSlice:
    """Slice k: anatomy, incidental findings, blood where `masks` say, the scanner's artefacts
    and reconstruction kernel, noise of the site's texture, its HU calibration; encoded as
    `variant`. Blood stays within the site's `blood_clip` after noise."""
    bank, offsets = noise
    pixels = h.size * h.size
    noise = bank[offsets[k]:offsets[k] + pixels].reshape(h.size, h.size)
    if acq.noise_grain:
        noise = _textured(noise, acq.noise_grain * h.size / 512, h.noise_sd)
    a = _anatomy(h, g, k)
    clean = a.hu
    _findings(clean, h, g, a, k, acq)
    union = np.zeros(clean.shape, bool)
    for subtype, mask in masks.items():
        clean[mask] = bleed_hu[subtype]
        union |= mask
    clean = _scanner(clean, h, g, a, k, acq)
    hu = noise + np.float32(AIR_HU)
    crop = hu[g.crop]
    crop[...] = clean + noise[g.crop]
    if masks:
        crop[union] = np.clip(crop[union], *acq.blood_clip)
    if acq.hu_offset:
        hu += np.float32(acq.hu_offset)
    hu_int = np.clip(np.rint(hu), -1024, 3071).astype(np.int32)
    stored, tags = _encode(hu_int, variant)
    bleed_mask = np.zeros(hu.shape, bool)
    bleed_mask[g.crop] = union
    labels = {s: int(s in masks) for s in SUBTYPES}
    labels[ANY] = int(bool(masks))
    return SyntheticSlice(image_id(seed, index, k),
                          _dataset(seed, index, k, h, m, variant, stored, tags, acq),
                          labels, bleed_mask, {s: int(v.sum()) for s, v in masks.items()})


def _textured(noise: np.ndarray, grain_px: float, sd: float) -> np.ndarray:
    """White noise correlated over `grain_px` (a smoother kernel's texture), same SD."""
    from scipy.ndimage import gaussian_filter

    out = gaussian_filter(noise, grain_px, mode="wrap")
    out *= np.float32(sd / max(float(out.std()), 1e-6))
    return out


def _disk(g: _Grid, x: float, y: float, radius: float) -> np.ndarray:
    return (g.xh - np.float32(x)) ** 2 + (g.yh - np.float32(y)) ** 2 < radius * radius


def _findings(hu: np.ndarray, h: _Head, g: _Grid, a: _Anatomy, k: int, acq: _Acquisition) -> None:
    """Hard negatives, drawn in place: physiological calcifications (pineal, choroid plexus,
    falx, basal ganglia; 90-400 HU) and a hyperdense middle cerebral artery (55-70 HU, as
    dense as blood). None of them is a haemorrhage; a model must not alert on them."""
    if not acq.calcifications and not acq.vessel and not acq.metal:
        return
    zn = float(g.zn[k])
    vx, vy, vw, vl, _ = h.vent
    inside = a.di >= 0
    for kind, x, y, r, level in acq.calcifications:
        if kind == "falx":
            t = _taper(zn, 0.55, 0.2)
            y0 = -40 + 10 * y
            mask = (g.ax < (0.6 + 0.6 * r) * t) & (g.yh > y0) & (g.yh < y0 + 20) if t else None
            value = 120 + 200 * level
        else:
            centre, half, place, value = {
                "pineal": (-0.1, 0.12, ((x, vy + 16 + 2 * y),), 150 + 250 * level),
                "choroid": (0.1, 0.12, ((vx + 3 + x, vy + 0.55 * vl + 2 * y),
                                        (-vx - 3 - x, vy + 0.55 * vl + 2 * y)), 100 + 150 * level),
                "basal": (-0.05, 0.1, ((vx + vw + 12 + 2 * x, vy + 2 + 3 * y),
                                       (-vx - vw - 12 - 2 * x, vy + 2 + 3 * y)), 90 + 120 * level),
            }[kind]
            t = _taper(zn, centre, half)
            radius = (1.2 + 2.0 * r) * t
            mask = None
            if radius > 0.5:
                mask = np.zeros(hu.shape, bool)
                for cx, cy in place:
                    mask |= _disk(g, cx, cy, radius)
        if mask is not None:
            np.copyto(hu, np.float32(value), where=mask & inside)
    if acq.vessel:
        side, z_vessel, value, radius = acq.vessel
        if abs(zn - z_vessel) < 0.05:
            along = g.xh * side
            mask = (along > 10) & (along < 40) & (np.abs(g.yh - (vy - 8)) < radius)
            np.copyto(hu, np.float32(value), where=mask & (a.di >= 0))
    if acq.metal:                          # a clip or coil: metal, beyond what CT numbers hold
        x, y, z_metal, half, radius = acq.metal[:5]
        t = _taper(zn, z_metal, half)
        if radius * t > 0.5:
            np.copyto(hu, np.float32(3071), where=_disk(g, x, vy + y, radius * t) & inside)


def _metal_streaks(h: _Head, g: _Grid, zn: float, metal: tuple) -> np.ndarray | None:
    """Metal's streaks (photon starvation, beam hardening): dark and bright lines through the
    metal, fading with distance from it, on its slices and the next ones out (a thick slice
    and the cone beam reach past the object)."""
    x, y, z_metal, half, _, amplitude, rays = metal
    weight = _taper(zn, z_metal, 1.6 * half)
    if not amplitude or not weight:
        return None
    dx, dy = g.xh - np.float32(x), g.yh - np.float32(h.vent[1] + y)
    fade = np.float32(amplitude * weight * 1.5) / (1 + np.hypot(dx, dy) / np.float32(20))
    field = np.zeros(dx.shape, np.float32)
    for angle, sign, width in rays:
        d = -dx * np.float32(math.sin(angle)) + dy * np.float32(math.cos(angle))
        field += np.float32(sign) * np.exp(-(d / np.float32(width)) ** 2)
    return fade * field


def _scanner(hu: np.ndarray, h: _Head, g: _Grid, a: _Anatomy, k: int, acq: _Acquisition) -> np.ndarray:
    """What the scanner does to the object: beam-hardening cupping, skull-base and metal
    streaks inside the skull, patient motion (a ghost), then the reconstruction kernel."""
    zn, s = float(g.zn[k]), float(g.scale[k])
    inside = a.di >= 0
    if acq.cupping:
        depth = np.clip(a.di / np.float32(0.6 * max(s, 0.2) * min(h.a, h.b)), 0, 1)
        hu -= np.where(inside, np.float32(acq.cupping) * depth, np.float32(0))
    amplitude, lines = acq.streaks
    weight = min(max((-0.3 - zn) / 0.35, 0.0), 1.0)
    if amplitude and weight:
        yc = h.vent[1] + 20                       # the posterior fossa, between the petrous bones
        field = np.zeros(hu.shape, np.float32)
        for angle, offset, width, sign in lines:
            d = -g.xh * np.float32(math.sin(angle)) + (g.yh - np.float32(yc + offset)) * np.float32(math.cos(angle))
            field += np.float32(sign) * np.exp(-(d / np.float32(width)) ** 2)
        hu += np.where(inside, np.float32(amplitude * weight) * field, np.float32(0))
    metal = _metal_streaks(h, g, zn, acq.metal) if acq.metal else None
    if metal is not None:
        hu += np.where(inside, metal, np.float32(0))
    px = h.size / 512
    ghost, dx, dy = acq.motion
    if ghost:
        shifted = np.roll(hu, (round(dy * px), round(dx * px)), axis=(0, 1))
        hu = np.float32(1 - ghost) * hu + np.float32(ghost) * shifted
    if acq.kernel:
        from scipy.ndimage import gaussian_filter

        if acq.kernel < 0:
            hu = gaussian_filter(hu, -acq.kernel * px, mode="nearest")
        else:
            hu = hu + np.float32(acq.kernel) * (hu - gaussian_filter(hu, 1.0 * px, mode="nearest"))
    return hu


# ----------------------------------------------------------------------------- public API


def make_study(seed: int, index: int, prevalence: float = 0.14,
               slices: tuple[int, int] = (24, 36), bleeds: bool = True, *,
               variant: str | None = None,
               subtypes: tuple[str, ...] | None = None,
               site: "str | Site" = DEFAULT_SITE) -> list[SyntheticSlice]:
    """Render study `index` of the dataset `seed`, acquired at `site` (SITES), in memory.

    `bleeds=False` gives the same study (anatomy, findings, noise, UIDs) without blood.
    `variant` and `subtypes` override the seeded choices (e.g. a test that needs a subdural in
    a 12-bit file); `subtypes=()` forces a negative study.
    """
    _check(seed, index, slices)
    acq = _acquisition(seed, index, site_named(site))
    variant = variant or study_variant(seed, index)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if subtypes is None and not study_is_positive(seed, index, prevalence, slices):
        subtypes = ()
    unknown = set(subtypes or ()) - set(SUBTYPES)
    if unknown:
        raise ValueError(f"unknown subtypes {sorted(unknown)}; expected from {SUBTYPES}")
    h = _head(seed, index, slices, 256 if variant == "small256" else 512, acq)
    g = _Grid(h)
    m = _meta(seed, index)
    plan = _plan_bleeds(seed, index, h, subtypes, acq)
    drawn = _bleed_masks(plan, h, g) if bleeds else {}
    bleed_hu = {b.subtype: b.hu for b in plan}
    noise = _noise(seed, index, h)
    return [_render(seed, index, k, h, g, m, variant, noise, drawn.get(k, {}), bleed_hu, acq)
            for k in range(h.n)]


def acquisition_row(seed: int, index: int, site: "str | Site" = DEFAULT_SITE) -> dict:
    """Study `index`'s site draws as numbers (`_acquisition`), keyed by its StudyInstanceUID:
    one row of ACQUISITIONS_CSV. Streaks and motion are their amplitudes (0: none); the
    calcifications a count; `bleed_shift` the fainter of the two bleed density shifts (HU).
    No patient data: the phantom's UID is all that names the study."""
    a = _acquisition(seed, index, site_named(site))
    return {"study_instance_uid": str(_meta(seed, index).study_uid), "index": index, "site": a.site,
            **{f: round(float(getattr(a, f)), 4) for f in _DRAWN},
            "streaks": round(float(a.streaks[0]), 4), "motion": round(float(a.motion[0]), 4),
            "calcifications": len(a.calcifications), "dense_vessel": int(bool(a.vessel)),
            "metal": round(float(a.metal[5]), 4) if a.metal else 0.0,
            "bleed_shift": round(float(min(a.bleed_shift)), 4)}


_DRAWN = ("head_scale", "tilt", "fov_mm", "slice_mm", "noise_scale", "noise_grain", "kernel",
          "hu_offset", "cupping", "atrophy", "bleed_scale")


def manifest(studies: int, seed: int, slices, site: "str | Site", prevalence: float = 0.14) -> dict:
    """The arguments a dataset was generated from, as MANIFEST_JSON holds them."""
    site = site_named(site)
    return {"studies": studies, "seed": seed, "slices": [int(s) for s in slices], "site": site.name,
            "site_digest": site_digest(site), "prevalence": prevalence}


def read_manifest(folder) -> dict | None:
    """The arguments `folder`'s phantoms were generated from (MANIFEST_JSON); None where there
    is none (data from elsewhere, or generated before manifests existed)."""
    try:
        held = json.loads((Path(folder) / MANIFEST_JSON).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s in %s is unreadable (%s): its arguments are unknown", MANIFEST_JSON, folder, exc)
        return None
    return held if isinstance(held, dict) else None


def generate_once(folder, studies: int, seed: int, slices: tuple[int, int], site: "str | Site",
                  workers: int | None = None) -> Path:
    """`folder`, generated unless it already holds a complete dataset (its label CSV, written
    last, is there): training, its held-out site and `training.external` reuse phantoms this way,
    and regenerate a folder an interrupted run left half-written. A complete dataset generated
    from other arguments (another seed in the same `--synthetic-dir`) is reused as it is, with a
    warning naming what differs; `read_manifest` says what it holds (the model card records that)."""
    folder = Path(folder)
    if (folder / TRAIN_CSV).is_file():
        held = read_manifest(folder)
        if held is None:   # generated before manifests existed: cannot be checked
            log.warning("reusing the phantom dataset in %s without %s: its arguments are not checked",
                        folder, MANIFEST_JSON)
            return folder
        differ = {k: (held.get(k), v) for k, v in manifest(studies, seed, slices, site).items()
                  if held.get(k) != v}
        if differ:
            log.warning("reusing the phantom dataset in %s, generated with other arguments (%s): "
                        "these phantoms, not the ones asked for; another folder gets new ones",
                        folder, ", ".join(f"{k} {h} here, {w} asked" for k, (h, w) in differ.items()))
        else:
            log.info("reusing the phantom dataset in %s", folder)
        return folder
    log.info("generating %d phantom studies of site %s in %s", studies, site_named(site).name, folder)
    summary = generate(folder, studies, seed, slices=slices, workers=workers or 2, overwrite=True, site=site)
    log.info("phantoms: %d slices, positive fraction %.3f in %.0f s", summary["slices"],
             summary["positive_fraction"], summary["seconds"])
    return folder


def read_acquisitions(folder) -> dict[str, dict[str, float]] | None:
    """{StudyInstanceUID: {axis: value}} from a generated folder's ACQUISITIONS_CSV; None
    where there is none (data from elsewhere, or generated before it existed). A value that is
    not a number is left out rather than failing the figures it only annotates."""
    import csv

    path = Path(folder) / ACQUISITIONS_CSV
    if not path.is_file():
        return None
    table = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            uid = row.pop("study_instance_uid", None)
            if uid:
                table[uid] = {k: v for k, v in ((k, _float(v)) for k, v in row.items()
                                                if k not in ("index", "site", None)) if v is not None}
    return table


def _float(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _check(seed: int, index: int, slices) -> None:
    if seed < 0 or not 0 <= index < 1 << 28:
        raise ValueError("seed must be >= 0 and the study index in [0, 2**28)")
    lo, hi = slices
    if not 2 <= lo <= hi <= 256:
        raise ValueError(f"slices must satisfy 2 <= MIN <= MAX <= 256, got {slices}")


def _write_study(job) -> list[tuple[str, tuple[int, ...], str]]:
    """Worker: render and write one study; returns (image id, labels, variant) per slice."""
    out, seed, index, prevalence, slices, site = job
    rows = []
    for sl in make_study(seed, index, prevalence, slices, site=site):
        (out / f"{sl.image_id}.dcm").write_bytes(to_bytes(sl.dataset))
        rows.append((sl.image_id, tuple(sl.labels[label] for label in LABELS),
                     sl.dataset.SeriesDescription.split()[-1]))
    return rows


def _write_acquisitions(path: Path, rows: list[dict]) -> None:
    import csv

    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["study_instance_uid"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def generate(out, studies: int, seed: int, prevalence: float = 0.14,
             slices: tuple[int, int] = (24, 36), workers: int = 1,
             overwrite: bool = False, site: "str | Site" = DEFAULT_SITE) -> dict:
    """Write `studies` phantom studies of `site` to `out` in RSNA layout; return a summary.

    The label CSV is written last (atomically), so its presence marks a complete dataset;
    ACQUISITIONS_CSV, each study's site draws, and MANIFEST_JSON, the arguments, just before it.
    Refuses a folder that already holds a dataset unless `overwrite`.
    """
    if studies < 0:
        raise ValueError(f"studies must be >= 0, got {studies}")
    _check(seed, max(studies - 1, 0), slices)
    site = site_named(site)
    out = Path(out)
    images = out / TRAIN_DIR
    csv_path = out / TRAIN_CSV
    existing = sorted(images.glob("ID_*.dcm")) if images.is_dir() else []
    if (existing or csv_path.exists()) and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset; pass overwrite=True (--overwrite)")
    for path in existing:
        path.unlink()
    csv_path.unlink(missing_ok=True)
    (out / ACQUISITIONS_CSV).unlink(missing_ok=True)
    (out / MANIFEST_JSON).unlink(missing_ok=True)
    images.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    jobs = [(images, seed, i, prevalence, tuple(slices), site) for i in range(studies)]
    if workers > 1 and studies > 1:
        with multiprocessing.get_context("spawn").Pool(min(workers, studies)) as pool:
            per_study = pool.map(_write_study, jobs, chunksize=1)
    else:
        per_study = [_write_study(job) for job in jobs]
    rows = [row for study in per_study for row in study]
    _write_acquisitions(out / ACQUISITIONS_CSV, [acquisition_row(seed, i, site) for i in range(studies)])
    (out / MANIFEST_JSON).write_text(json.dumps(manifest(studies, seed, slices, site, prevalence)) + "\n")

    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        f.write("ID,Label\n")
        for image, labels, _ in rows:
            f.writelines(f"{image}_{label},{value}\n" for label, value in zip(LABELS, labels))
    os.replace(tmp, csv_path)
    seconds = time.perf_counter() - start
    counts = {label: sum(r[1][i] for r in rows) for i, label in enumerate(LABELS)}
    return {
        "studies": studies, "slices": len(rows), "positive_slices": counts[ANY],
        "positive_fraction": counts[ANY] / max(1, len(rows)),
        "positive_studies": sum(any(r[1][-1] for r in study) for study in per_study),
        "labels": counts,
        "variants": dict(sorted(Counter(study[0][2] for study in per_study if study).items())),
        "seconds": seconds, "slices_per_second": len(rows) / seconds if seconds else 0.0,
        "out": str(out), "site": site.name,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.synthetic",
                                     description="Write synthetic head-CT studies in RSNA layout.")
    parser.add_argument("--out", required=True, type=Path, help="dataset folder")
    parser.add_argument("--studies", required=True, type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prevalence", type=float, default=0.14,
                        help="target fraction of slices with any bleed (default 0.14)")
    parser.add_argument("--slices", type=int, nargs=2, default=(24, 36), metavar=("MIN", "MAX"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes (output does not depend on it)")
    parser.add_argument("--site", choices=tuple(SITES), default=DEFAULT_SITE,
                        help="the scanner/patient ranges studies are drawn from (default "
                             f"{DEFAULT_SITE}; site-d is held out for validation, legacy is the "
                             "generator before sites)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    args = parser.parse_args(argv)
    try:
        s = generate(args.out, args.studies, args.seed, args.prevalence, tuple(args.slices),
                     args.workers, args.overwrite, args.site)
    except (ValueError, FileExistsError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"synthetic: {s['studies']} studies of site {s['site']}, {s['slices']} slices, positive slice fraction "
          f"{s['positive_fraction']:.3f}, {s['slices_per_second']:.1f} slices/s -> {s['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
