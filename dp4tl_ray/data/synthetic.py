"""Synthetic ImageNet-shaped data with planted domain structure, for runs without downloads.

Source classes are grouped into *domains*. A domain fixes a shape family, a texture, a colour
palette and a spatial frequency; each class is one point in its domain's parameter box (shape
parameters, texture frequency and angle, hue offset). With ``class_cues`` < 5, only that many of
the five attributes tell a domain's classes apart - a different subset in each domain, as breeds
differ by coat and vehicles by outline - and the others vary from image to image; features learned
on one domain then tell little about another's classes. Every image adds jitter (position, scale,
rotation, colour), background clutter and noise. Downstream tasks use a few domains with *new*
points of the same boxes, so a surrogate trained on the source maps them onto the relevant
domains' classes, and features learned there (and only there) transfer.

The harder regime (``task_class_counts``, ``class_size_spread``, ``distractor_domains``,
``shared_cue_weight``; off by default, and then every file is as before) makes the answer not built
in: the task draws unequal numbers of classes from its domains, source classes differ in size,
look-alike domains copy a task domain's shape, texture and palette but tell their classes apart by
other cues, and non-cue parameters keep part of the class value so every domain helps a little.
``cue_params`` limits which attributes may be cues. Self-supervised pretraining (MoCo v2) is trained to
ignore what its augmentations change: colour jitter moves hue by up to 0.1 (a class's hue offset spans
0.03), and the horizontal flip mirrors the texture angle. ``cue_params: [0, 1, 2]`` (shape a, shape b,
texture frequency, which is counted per object radius and so survives the random crop's scale) gives
classes whose cues those augmentations leave in place, as real classes differ in shape rather than in tint.
(Whether MoCo then learns them is a matter of budget: jobs/configs/reproduce_v2_ssl.yaml did not on 2 CPUs.)
ground_truth.json then grades relevance per source class and lists the distractors.

Layout written under ``root``::

    synth.json                                  config, counts, broken files
    source/train/<wnid>/<wnid>_<i>.JPEG         ImageNet train layout, wnids ``n%08d``
    source/domains.json                         domain -> wnids and class indices
    downstream/task_<t>/{train,test}/<class>/<class>_<i>.JPEG
    downstream/task_<t>/ground_truth.json       relevant domains, wnids, class indices (harder regime:
                                                relevance per wnid, distractor wnids)
"""

from __future__ import annotations

import colorsys
import functools
import io
import itertools
import json
import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from dp4tl_ray import atomic
from dp4tl_ray.errors import UserError

GENERATOR_VERSION = 1
JPEG_QUALITY = 90
NUM_PARAMS = 5  # per class: shape a, shape b, texture frequency, texture angle, hue offset
OBJECT_RADIUS = 0.55  # object radius as a fraction of the half image width
MAX_IMAGE_SIZE = 512

# Random streams, one tag per use, so that no two uses share numbers.
_TAG_SOURCE, _TAG_DOWNSTREAM, _TAG_PARAMS, _TAG_WNIDS, _TAG_TASK, _TAG_BROKEN, _TAG_SIZES, _TAG_DISTRACTOR = range(8)

Array = np.ndarray


# ----- shape families: f(x, y, a, b) > 0 inside, in object units (radius about 1) -----


def _polar(x: Array, y: Array) -> tuple[Array, Array]:
    return np.hypot(x, y), np.arctan2(y, x)


def _polygon(x: Array, y: Array, a: float, b: float) -> Array:
    n = 3 + int(a * 4.999)
    rho, th = _polar(x, y)
    half = np.pi / n
    edge = np.cos(half) / np.cos(np.mod(th, 2 * half) - half)
    return edge ** (1 - 0.75 * b) - rho


def _star(x: Array, y: Array, a: float, b: float) -> Array:
    k = 4 + int(a * 3.999)
    inner = 0.35 + 0.35 * b
    rho, th = _polar(x, y)
    tip = np.abs(np.mod(th * k / (2 * np.pi), 1.0) - 0.5) * 2
    return inner + (1 - inner) * tip - rho


def _flower(x: Array, y: Array, a: float, b: float) -> Array:
    k = 3 + int(a * 4.999)
    depth = 0.12 + 0.2 * b
    rho, th = _polar(x, y)
    return (1 - depth) + depth * np.cos(k * th) - rho


def _egg(x: Array, y: Array, a: float, b: float) -> Array:
    aspect = 0.4 + 0.6 * a
    taper = 0.5 * (b - 0.5)
    return 1 - np.hypot(x, y / (aspect * (1 + taper * x)))


def _ring(x: Array, y: Array, a: float, b: float) -> Array:
    inner = 0.3 + 0.4 * a
    gap = np.pi * (0.15 + 0.75 * b)
    rho, th = _polar(x, y)
    return np.minimum(np.minimum(1 - rho, rho - inner), (np.abs(th) - gap / 2) * rho)


def _cross(x: Array, y: Array, a: float, b: float) -> Array:
    width = 0.18 + 0.22 * a
    length = 0.45 + 0.55 * b
    ax, ay = np.abs(x), np.abs(y)
    return np.maximum(np.minimum(width - ay, 1 - ax), np.minimum(width - ax, length - ay))


def _crescent(x: Array, y: Array, a: float, b: float) -> Array:
    shift = 0.25 + 0.45 * a
    bite = 0.6 + 0.3 * b
    return np.minimum(1 - np.hypot(x, y), np.hypot(x - shift, y) - bite)


def _superellipse(x: Array, y: Array, a: float, b: float) -> Array:
    p = 0.7 + 3.3 * a
    aspect = 0.5 + 0.5 * b
    return 1 - (np.abs(x) ** p + np.abs(y / aspect) ** p) ** (1 / p)


def _bowtie(x: Array, y: Array, a: float, b: float) -> Array:
    waist = 0.08 + 0.3 * a
    end = 0.55 + 0.45 * b
    ax = np.abs(x)
    return np.minimum(1 - ax, waist + (end - waist) * ax - np.abs(y))


def _blob(x: Array, y: Array, a: float, b: float) -> Array:
    rho, th = _polar(x, y)
    return 0.72 + 0.16 * np.cos(2 * th + 2 * np.pi * a) + 0.12 * np.cos(3 * th + 2 * np.pi * b) - rho


FAMILIES: dict[str, Callable[[Array, Array, float, float], Array]] = {
    "polygon": _polygon, "star": _star, "flower": _flower, "egg": _egg, "ring": _ring,
    "cross": _cross, "crescent": _crescent, "superellipse": _superellipse, "bowtie": _bowtie,
    "blob": _blob,
}

# ----- textures: s(u, v, f, phase) in [-1, 1]; (u, v) object coordinates turned by the class angle -----


def _tri(t: Array) -> Array:
    return np.abs(np.mod(t, 1.0) - 0.5)


TEXTURES: dict[str, Callable[[Array, Array, float, float], Array]] = {
    "stripes": lambda u, v, f, p: np.sin(2 * np.pi * f * u + p),
    "checker": lambda u, v, f, p: np.tanh(4 * np.sin(2 * np.pi * f * u + p) * np.sin(2 * np.pi * f * v)),
    "dots": lambda u, v, f, p: np.tanh(4 * (np.cos(2 * np.pi * f * u + p) + np.cos(2 * np.pi * f * v) - 0.6)),
    "rings": lambda u, v, f, p: np.sin(2 * np.pi * f * np.hypot(u - 0.3, v) + p),
    "spiral": lambda u, v, f, p: np.sin(3 * np.arctan2(v, u) + 2 * np.pi * f * np.hypot(u, v) + p),
    "waves": lambda u, v, f, p: np.sin(2 * np.pi * f * u + 1.2 * np.sin(2 * np.pi * f * v) + p),
    "plaid": lambda u, v, f, p: 0.5 * np.sin(2 * np.pi * f * u + p) + 0.5 * np.sin(3.4 * np.pi * f * v),
    "zigzag": lambda u, v, f, p: np.sin(2 * np.pi * f * (u + 0.35 * _tri(2 * f * v)) + p),
}

# Palette and frequency options cycled over domains: (saturation, value) of the first colour,
# (hue shift, saturation, value) of the texture's second colour, base cycles per object radius.
_PRIMARY_SV = ((0.85, 0.9), (0.55, 1.0), (0.95, 0.65))
_SECONDARY = ((0.5, 0.8, 0.95), (0.12, 0.9, 0.55), (-0.12, 0.5, 1.0), (0.0, 0.9, 0.35))
_BASE_FREQ = (0.9, 1.5, 1.2)


@dataclass(frozen=True)
class _Domain:
    """A superclass: the factors its classes share."""

    index: int
    name: str
    family: str
    texture: str
    primary: tuple[float, float, float]  # hsv
    secondary: tuple[float, float, float]  # hsv
    freq: float
    hue_spread: float  # half-range of class hue offsets; images jitter by half of it
    cues: tuple[int, ...] = tuple(range(NUM_PARAMS))  # the class parameters that tell its classes apart
    shared_cue_weight: float = 0.0  # how much of its class value a non-cue parameter keeps in every image
    lookalike_of: str | None = None  # a distractor: the task domain it copies the look of


@dataclass(frozen=True)
class _Class:
    """A drawable class: one point of its domain's parameter box."""

    name: str
    domain: _Domain
    params: tuple[float, ...]  # NUM_PARAMS values in [0, 1]


def _domains(n: int, class_cues: int = NUM_PARAMS, shared_cue_weight: float = 0.0,
             cue_params: tuple[int, ...] = ()) -> list[_Domain]:
    """Domains cycle through families, textures and palettes; hues are spread evenly; each takes its
    own ``class_cues``-subset of the class parameters (of ``cue_params``; () = all) as the cues
    (consecutive domains differ)."""
    families, textures = list(FAMILIES), list(TEXTURES)
    subsets = list(itertools.combinations(cue_params or range(NUM_PARAMS), class_cues))
    # Coprime with the number of subsets, so consecutive domains walk through all of them: 3 for the 1, 5 or
    # 10 subsets of all five parameters (the original regime's choice), 2 or 1 where 3 divides the count.
    step = next(s for s in (3, 2, 1) if math.gcd(s, len(subsets)) == 1)
    out = []
    for d in range(n):
        family = families[d % len(families)]
        texture = textures[(d + d // len(families)) % len(textures)]
        hue = d / n
        shift, s2, v2 = _SECONDARY[d % len(_SECONDARY)]
        out.append(_Domain(
            index=d, name=f"d{d:02d}-{family}-{texture}", family=family, texture=texture,
            primary=(hue, *_PRIMARY_SV[d % len(_PRIMARY_SV)]), secondary=((hue + shift) % 1, s2, v2),
            freq=_BASE_FREQ[(d // 2) % len(_BASE_FREQ)], hue_spread=min(0.03, 0.3 / n),
            cues=subsets[(d * step) % len(subsets)], shared_cue_weight=shared_cue_weight,
        ))
    return out


def _lookalike(model: _Domain, index: int, n: int, cue_params: tuple[int, ...] = ()) -> _Domain:
    """A distractor domain: ``model``'s shape family, texture, frequency and palette with the hue moved a
    quarter of the way to the next domain's (images of the two overlap in colour), but its classes told
    apart by the cue subset (of ``cue_params``; () = all) that shares the fewest parameters with ``model``'s
    - it looks like the task and teaches the wrong distinctions."""
    subsets = itertools.combinations(cue_params or range(NUM_PARAMS), len(model.cues))
    cues = min(subsets, key=lambda c: len(set(c) & set(model.cues)))
    shift = 0.25 / n
    return replace(model, index=index, name=f"d{index:02d}-{model.family}-{model.texture}-lookalike",
                   primary=((model.primary[0] + shift) % 1, *model.primary[1:]),
                   secondary=((model.secondary[0] + shift) % 1, *model.secondary[1:]),
                   cues=cues, lookalike_of=model.name)


# ----- drawing -----


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[Array, Array]:
    c = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(c, c)
    return x, y


def _rgb(h: float, s: float, v: float) -> Array:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> Array:
    """Bilinear upsampling of a (cells+1)^2 random grid: a low-frequency field in [0, 1]."""
    grid = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def _coverage(inside: Array, pixels_per_unit: float) -> Array:
    """Anti-aliased coverage from an inside-function in units of ``1 / pixels_per_unit``."""
    return np.clip(inside * pixels_per_unit + 0.5, 0.0, 1.0)[..., None]


def _paint_clutter(img: Array, rng: np.random.Generator, size: int) -> None:
    """Distractors in random colours behind the object: discs and bars."""
    x, y = _grid(size)
    half = size / 2
    for _ in range(rng.integers(2, 5)):
        colour = _rgb(rng.random(), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.9))
        alpha = rng.uniform(0.4, 0.8)
        cx, cy = rng.uniform(-1, 1, 2)
        if rng.random() < 0.5:
            inside = rng.uniform(0.08, 0.2) - np.hypot(x - cx, y - cy)
        else:
            angle, length, width = rng.uniform(0, np.pi), rng.uniform(0.3, 0.8), rng.uniform(0.03, 0.07)
            dx, dy = np.cos(angle), np.sin(angle)
            t = np.clip((x - cx) * dx + (y - cy) * dy, -length / 2, length / 2)
            inside = width - np.hypot(x - cx - t * dx, y - cy - t * dy)
        cover = alpha * _coverage(inside, half)
        img *= 1 - cover
        img += cover * colour


def _render(cls: _Class, rng: np.random.Generator, size: int) -> Array:
    """One image of ``cls`` as uint8 HxWx3; every random choice comes from ``rng``."""
    dom = cls.domain
    # Parameters that are not this domain's cues vary per image (no draws at all when every one is a cue).
    # With shared_cue_weight w > 0 they keep a share w of the class value (w = 0: exactly the free draw).
    w = dom.shared_cue_weight
    shape_a, shape_b, freq_p, angle_p, hue_p = (p if j in dom.cues else w * p + (1 - w) * rng.random()
                                                for j, p in enumerate(cls.params))
    x, y = _grid(size)

    # Background: a smooth blend of two dull random colours, then clutter.
    field = _smooth_field(rng, size, cells=3)[..., None]
    c0 = _rgb(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.75))
    c1 = _rgb(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.3, 0.75))
    img = c0 * (1 - field) + c1 * field
    _paint_clutter(img, rng, size)

    # Object: the class's shape and texture in object coordinates, jittered per image.
    cx, cy = rng.uniform(-0.15, 0.15, 2)
    radius = OBJECT_RADIUS * rng.uniform(0.85, 1.15)
    rot = rng.uniform(-0.35, 0.35)
    cos_r, sin_r = np.cos(rot), np.sin(rot)
    ox = ((x - cx) * cos_r + (y - cy) * sin_r) / radius
    oy = (-(x - cx) * sin_r + (y - cy) * cos_r) / radius
    cover = _coverage(FAMILIES[dom.family](ox, oy, shape_a, shape_b), radius * size / 2)

    angle = np.pi * angle_p
    u = ox * np.cos(angle) + oy * np.sin(angle)
    v = -ox * np.sin(angle) + oy * np.cos(angle)
    freq = dom.freq * (0.7 + 0.7 * freq_p)
    mix = 0.5 + 0.5 * TEXTURES[dom.texture](u, v, freq, rng.uniform(0, 2 * np.pi))[..., None]

    hue_offset = dom.hue_spread * (2 * hue_p - 1) + rng.uniform(-0.5, 0.5) * dom.hue_spread
    shade = rng.uniform(0.85, 1.1)
    first = _rgb(dom.primary[0] + hue_offset, dom.primary[1] * rng.uniform(0.85, 1.0), dom.primary[2] * shade)
    second = _rgb(dom.secondary[0] + hue_offset, dom.secondary[1], dom.secondary[2] * shade)
    obj = first * (1 - mix) + second * mix
    img = img * (1 - cover) + obj * cover

    # Camera: global brightness and sensor noise.
    img = img * rng.uniform(0.9, 1.1) + rng.normal(0.0, rng.uniform(0.02, 0.05), img.shape)
    return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _jpeg(pixels: Array) -> bytes:
    """Deterministic JPEG bytes: fixed quality, no chroma subsampling, no metadata."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


# ----- config and plan -----


@dataclass
class SynthConfig:
    """What to generate; see the module docstring for the layout."""

    root: str
    num_domains: int = 10
    classes_per_domain: int = 10
    images_per_class: int = 50
    image_size: int = 32
    tasks: int = 1  # number of downstream tasks: task_0, task_1, ...
    domains_per_task: int = 2
    classes_per_task_domain: int = 5  # new downstream classes per chosen domain
    train_per_class: int = 40
    test_per_class: int = 20
    seed: int = 0
    dirty: bool = False
    class_cues: int = NUM_PARAMS  # class parameters (of 5) that tell a domain's classes apart; the rest vary per image
    # The harder regime (P5 v2). At their defaults these reproduce the original data byte for byte.
    task_class_counts: tuple[int, ...] = ()  # new downstream classes per chosen domain, e.g. (4, 3, 2, 1): the
    #                                          task's relevance spread unevenly; () = classes_per_task_domain each
    class_size_spread: float = 0.0  # source class k holds images_per_class * 2**u_k images, u_k uniform in +-spread
    distractor_domains: int = 0  # extra source domains that look like the first task's domains (most relevant
    #                              first) but tell their classes apart by other cues
    cue_params: tuple[int, ...] = ()  # the attributes that may be cues (0 shape a, 1 shape b, 2 texture frequency,
    #                                   3 texture angle, 4 hue offset); () = all five
    shared_cue_weight: float = 0.0  # in [0, 1): share of its class value a non-cue parameter keeps per image, so
    #                                 every domain teaches every attribute a little and other domains help a little

    def __post_init__(self) -> None:
        self.task_class_counts = tuple(int(c) for c in self.task_class_counts)  # YAML and JSON give lists
        self.cue_params = tuple(int(c) for c in self.cue_params)

    def validate(self) -> None:
        """Raise UserError naming the first bad value."""
        if not str(self.root):
            raise UserError("synthetic data root must be a non-empty path")
        for name in ("num_domains", "classes_per_domain", "images_per_class", "domains_per_task",
                     "classes_per_task_domain", "train_per_class", "test_per_class"):
            if getattr(self, name) < 1:
                raise UserError(f"synthetic {name} must be >= 1 (got {getattr(self, name)})")
        if not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            raise UserError(f"synthetic image_size must be in [8, {MAX_IMAGE_SIZE}] (got {self.image_size})")
        if self.tasks < 0:
            raise UserError(f"synthetic tasks must be >= 0 (got {self.tasks})")
        if self.seed < 0:
            raise UserError(f"synthetic seed must be >= 0 (got {self.seed})")
        if not 1 <= self.class_cues <= NUM_PARAMS:
            raise UserError(f"synthetic class_cues must be in [1, {NUM_PARAMS}] (got {self.class_cues})")
        if self.task_class_counts and (len(self.task_class_counts) != self.domains_per_task or not all(
                1 <= c <= self.classes_per_domain for c in self.task_class_counts)):
            raise UserError(f"synthetic task_class_counts {list(self.task_class_counts)} must hold domains_per_task "
                            f"({self.domains_per_task}) counts, each in [1, classes_per_domain={self.classes_per_domain}]")
        if not 0 <= self.class_size_spread <= 3:
            raise UserError(f"synthetic class_size_spread must be in [0, 3] (got {self.class_size_spread})")
        if self.distractor_domains < 0:
            raise UserError(f"synthetic distractor_domains must be >= 0 (got {self.distractor_domains})")
        if self.cue_params and (len(set(self.cue_params)) != len(self.cue_params)
                                or not all(0 <= c < NUM_PARAMS for c in self.cue_params)
                                or len(self.cue_params) < self.class_cues):
            raise UserError(f"synthetic cue_params {list(self.cue_params)} must be distinct attributes in [0, {NUM_PARAMS - 1}], "
                            f"at least class_cues ({self.class_cues}) of them; [] = all")
        if not 0 <= self.shared_cue_weight < 1:
            raise UserError(f"synthetic shared_cue_weight must be in [0, 1) (got {self.shared_cue_weight})")
        if self.domains_per_task > self.num_domains:
            raise UserError(f"synthetic domains_per_task ({self.domains_per_task}) must be <= "
                            f"num_domains ({self.num_domains})")
        if self.classes_per_task_domain > self.classes_per_domain:
            raise UserError(f"synthetic classes_per_task_domain ({self.classes_per_task_domain}) must be "
                            f"<= classes_per_domain ({self.classes_per_domain})")

    def record(self) -> dict:
        """The config as stored in synth.json: everything but ``root``, so a tree can move; the harder
        regime's fields only when set, so trees of the original regime keep their synth.json."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "root"
               and (f.name not in _HARDER_FIELDS or self.harder())}
        for name in ("task_class_counts", "cue_params"):
            if name in out:
                out[name] = list(out[name])
        return out

    def harder(self) -> bool:
        """Whether any field of the harder regime is set."""
        return any(getattr(self, f.name) != f.default for f in fields(self) if f.name in _HARDER_FIELDS)

    def task_counts(self) -> tuple[int, ...]:
        """New downstream classes per chosen domain."""
        return self.task_class_counts or (self.classes_per_task_domain,) * self.domains_per_task


_HARDER_FIELDS = ("task_class_counts", "class_size_spread", "distractor_domains", "shared_cue_weight", "cue_params")


@dataclass
class SynthSummary:
    """What ``generate`` produced (or found already there); ``seconds`` is this call's time."""

    root: Path
    source_dir: Path  # root / "source" / "train"
    num_classes: int
    num_images: int  # decodable source images
    task_dirs: list[Path] = field(default_factory=list)
    broken_files: list[str] = field(default_factory=list)  # relative to root
    seconds: float = 0.0


@dataclass(frozen=True)
class _Task:
    """A downstream task: its domains and its new classes."""

    name: str
    domains: list[_Domain]
    classes: list[_Class]


def _class_params(seed: int, dom: _Domain, count: int) -> tuple[list[tuple], list[tuple]]:
    """Latin-hypercube points of the domain's box: source classes at (k + 1/4) / count per
    parameter, downstream slots at (k + 3/4) / count, so no downstream class copies a source one."""
    rng = np.random.default_rng((seed, _TAG_PARAMS, dom.index))
    src = [rng.permutation(count) for _ in range(NUM_PARAMS)]
    new = [rng.permutation(count) for _ in range(NUM_PARAMS)]
    return ([tuple(round((p[i] + 0.25) / count, 6) for p in src) for i in range(count)],
            [tuple(round((p[i] + 0.75) / count, 6) for p in new) for i in range(count)])


def _plan(cfg: SynthConfig) -> tuple[list[_Domain], list[_Class], list[_Task]]:
    """Domains (distractors last), source classes (domain-major) and downstream tasks, all from the seed."""
    domains = _domains(cfg.num_domains, cfg.class_cues, cfg.shared_cue_weight, cfg.cue_params)
    n = cfg.num_domains * cfg.classes_per_domain
    wnid_rng = np.random.default_rng((cfg.seed, _TAG_WNIDS))
    numbers = 1_000_000 + wnid_rng.choice(15_000_000, size=n, replace=False)
    params = [_class_params(cfg.seed, dom, cfg.classes_per_domain) for dom in domains]
    source = [_Class(f"n{numbers[d * cfg.classes_per_domain + i]:08d}", dom, params[d][0][i])
              for d, dom in enumerate(domains) for i in range(cfg.classes_per_domain)]
    tasks = []
    for t in range(cfg.tasks):
        rng = np.random.default_rng((cfg.seed, _TAG_TASK, t))
        chosen = sorted(rng.choice(cfg.num_domains, size=cfg.domains_per_task, replace=False))
        classes = [_Class(f"{domains[d].name}-v{slot}", domains[d], params[d][1][slot])
                   for d, count in zip(chosen, cfg.task_counts())
                   for slot in sorted(rng.permutation(cfg.classes_per_domain)[:count])]
        tasks.append(_Task(f"task_{t}", [domains[d] for d in chosen], classes))
    if cfg.distractor_domains:
        domains, source = _add_distractors(cfg, domains, source, tasks)
    return domains, source, tasks


def _add_distractors(cfg: SynthConfig, domains: list[_Domain], source: list[_Class],
                     tasks: list[_Task]) -> tuple[list[_Domain], list[_Class]]:
    """Append ``cfg.distractor_domains`` look-alikes of the first task's domains (the one with the most
    task classes first, cycling; without tasks, of the first domains) and their classes, whose wnids are
    drawn from their own stream among the numbers the others left free."""
    if tasks:
        share = {d.name: sum(c.domain is d for c in tasks[0].classes) for d in tasks[0].domains}
        models = sorted(tasks[0].domains, key=lambda d: (-share[d.name], d.index))
    else:
        models = domains
    extra = [_lookalike(models[j % len(models)], cfg.num_domains + j, cfg.num_domains, cfg.cue_params)
             for j in range(cfg.distractor_domains)]
    taken = {int(c.name[1:]) - 1_000_000 for c in source}
    rng = np.random.default_rng((cfg.seed, _TAG_DISTRACTOR))
    free = iter(x for x in rng.choice(15_000_000, size=len(taken) + len(extra) * cfg.classes_per_domain,
                                      replace=False) if x not in taken)
    more = [_Class(f"n{1_000_000 + next(free):08d}", dom, params)
            for dom in extra for params in _class_params(cfg.seed, dom, cfg.classes_per_domain)[0]]
    return domains + extra, source + more


def _class_sizes(cfg: SynthConfig, n: int) -> list[int]:
    """Images per source class: all ``images_per_class``, or spread log-uniformly by ``class_size_spread``
    (at least 2 each) from their own stream."""
    if not cfg.class_size_spread:
        return [cfg.images_per_class] * n
    u = np.random.default_rng((cfg.seed, _TAG_SIZES)).uniform(-cfg.class_size_spread, cfg.class_size_spread, n)
    return [max(2, int(round(cfg.images_per_class * 2.0 ** x))) for x in u]


# ----- writing -----


def _write_images(folder: Path, cls: _Class, count: int, size: int, stream: tuple[int, ...]) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = _render(cls, np.random.default_rng((*stream, i)), size)
        (folder / f"{folder.name}_{i}.JPEG").write_bytes(_jpeg(pixels))


def _write_broken(train: Path, cfg: SynthConfig, source: list[_Class], sizes: list[int]) -> list[str]:
    """A truncated JPEG, a zero-byte file and a text file, named like their class's images."""
    rng = np.random.default_rng((cfg.seed, _TAG_BROKEN))
    picks = rng.choice(len(source), size=min(3, len(source)), replace=False)
    good = _jpeg(_render(source[picks[0]], rng, cfg.image_size))
    scan = good.index(b"\xff\xda")  # start of scan: keep headers, cut the entropy-coded data
    payloads = [good[: scan + (len(good) - scan) // 2], b"",
                b"<html><body>404 Not Found</body></html>\n"]
    broken = []
    for k, payload in enumerate(payloads):
        pick = picks[k % len(picks)]
        wnid = source[pick].name
        path = train / wnid / f"{wnid}_{sizes[pick] + k}.JPEG"
        path.write_bytes(payload)
        broken.append(path.relative_to(train.parent.parent).as_posix())
    return broken


def _graded_relevance(task: _Task, source: list[_Class], domains: list[_Domain]) -> dict:
    """Ground truth beyond a set: per source wnid the share of the task's classes drawn from its domain
    (unequal across the task's domains, 0 elsewhere), and the distractors - classes of domains that copy a
    task domain's look but have no task class."""
    n = len(task.classes)
    share = {dom.name: sum(c.domain is dom for c in task.classes) / n for dom in domains}
    return {
        "relevance": {c.name: round(share[c.domain.name], 6) for c in sorted(source, key=lambda c: c.name)},
        "domain_relevance": {dom.name: round(share[dom.name], 6) for dom in task.domains},
        "distractor_wnids": sorted(c.name for c in source if c.domain.lookalike_of in {d.name for d in task.domains}),
    }


def _write_tree(tmp: Path, cfg: SynthConfig) -> dict:
    """Write every file under ``tmp``; return the synth.json record."""
    domains, source, tasks = _plan(cfg)
    sizes = _class_sizes(cfg, len(source))
    train = tmp / "source" / "train"
    for k, cls in enumerate(source):
        _write_images(train / cls.name, cls, sizes[k], cfg.image_size, (cfg.seed, _TAG_SOURCE, k))
    broken = _write_broken(train, cfg, source, sizes) if cfg.dirty else []

    index = {name: i for i, name in enumerate(sorted(c.name for c in source))}
    size_of = {c.name: size for c, size in zip(source, sizes)}
    wnids_of = {dom.name: [c.name for c in source if c.domain is dom] for dom in domains}
    harder = cfg.harder()  # its extra keys only: the original regime's files stay byte for byte
    atomic.write_json(tmp / "source" / "domains.json", {
        "domains": [{"name": dom.name, "family": dom.family, "texture": dom.texture, "class_cues": list(dom.cues),
                     "wnids": wnids_of[dom.name], "class_indices": [index[w] for w in wnids_of[dom.name]],
                     **({"lookalike_of": dom.lookalike_of} if harder else {})}
                    for dom in domains],
        "classes": [{"wnid": c.name, "index": index[c.name], "domain": c.domain.name,
                     "params": list(c.params), **({"images": size_of[c.name]} if harder else {})}
                    for c in sorted(source, key=lambda c: c.name)],
    })

    splits = (("train", cfg.train_per_class), ("test", cfg.test_per_class))
    for t, task in enumerate(tasks):
        task_dir = tmp / "downstream" / task.name
        for k, cls in enumerate(task.classes):
            for s, (split, count) in enumerate(splits):
                _write_images(task_dir / split / cls.name, cls, count, cfg.image_size,
                              (cfg.seed, _TAG_DOWNSTREAM, t, k, s))
        relevant = sorted(w for dom in task.domains for w in wnids_of[dom.name])
        extra = _graded_relevance(task, source, domains) if harder else {}
        atomic.write_json(task_dir / "ground_truth.json", {
            "task": task.name,
            "domains": [dom.name for dom in task.domains],
            "relevant_wnids": relevant,
            "relevant_class_indices": [index[w] for w in relevant],
            "num_source_classes": len(source),
            "classes": [{"name": c.name, "domain": c.domain.name, "params": list(c.params)}
                        for c in task.classes],
            **extra,
        })

    record = {
        "generator_version": GENERATOR_VERSION, "config": cfg.record(), "num_classes": len(source),
        "num_images": sum(sizes), "broken_files": broken,
        "tasks": [task.name for task in tasks],
    }
    atomic.write_json(tmp / "synth.json", record)
    return record


def _summary(root: Path, record: dict, seconds: float) -> SynthSummary:
    return SynthSummary(
        root=root, source_dir=root / "source" / "train", num_classes=record["num_classes"],
        num_images=record["num_images"], task_dirs=[root / "downstream" / t for t in record["tasks"]],
        broken_files=list(record["broken_files"]), seconds=seconds)


def _existing(root: Path, cfg: SynthConfig) -> dict | None:
    """synth.json of an identical earlier run at ``root``; None if ``root`` is free; else refuse."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return None
    try:
        record = json.loads((root / "synth.json").read_text())
    except (OSError, ValueError):
        record = None
    if (isinstance(record, dict) and record.get("generator_version") == GENERATOR_VERSION
            and record.get("config") == cfg.record()):
        return record
    raise UserError(f"{root} exists and is not synthetic data with this config; "
                    "remove it or choose another root")


def generate(cfg: SynthConfig) -> SynthSummary:
    """Write the synthetic tree at ``cfg.root`` (built in a temp sibling, then renamed into place).

    Idempotent: a root holding a synth.json with the same config is returned as is.
    """
    cfg.validate()
    start = time.perf_counter()
    root = Path(cfg.root)
    record = _existing(root, cfg)
    if record is None:
        with atomic.directory(root) as tmp:
            record = _write_tree(tmp, cfg)
    return _summary(root, record, time.perf_counter() - start)
