"""Figure real-shift: does label mapping keep the relevant classes when the downstream images are shifted?

Real images that install with the test extra: the source holds 10 digit classes (scikit-learn's
scanned digits, rendered large and sharp, dark ink on white) and one class per real photograph
of scikit-image and scikit-learn (random crops). The downstream task is the 10 digits from the
*other* half of the scans, shifted as real scans are: low-resolution (8x8, upsampled bilinearly:
blurred), and one third each plain, inverted (light ink on dark) or tinted (coloured paper and ink),
with unequal class sizes. A resnet18 surrogate is trained on the source; the same surrogate's votes
are then ranked by each candidate rule and the units kept at ratio 0.6 are checked against the 10
relevant digit classes. Candidates:

- ``plain``: the paper's LM rule (top-1 votes), ``soft-top3`` (1/3 to each of the top 3),
  ``class-balanced`` (every downstream class casts the same total vote), ``tta`` (top-1 of the
  softmax averaged over flips and shifted crops), ``one-to-one`` (the ``--vote-rule one-to-one``
  of ``dp4tl select``: rounds of ILM-VP's greedy one-to-one label mapping);
- ``shift-aug`` and ``shift-aug+one-to-one``: the same rules with a second surrogate trained with
  the recommended recipe, same seed/epochs.

Both surrogates are trained with the library's augmentation, exactly what ``dp4tl pretrain`` applies:
every batch goes through ``data.transforms.augment_batch(**PretrainConfig(augment=..., image_size=32,
crop_scale_min=0.35).augment_kwargs())`` - ``augment: standard`` (RandomResizedCrop + flip) for
``plain``, the recommended ``augment: shift`` (then down-up sampling, blur, colour jitter, grayscale)
for ``shift-aug`` - with a generator seeded per seed. The loop around it is an in-process torch loop
(SGD, one-cycle LR per step, batch 128), not Ray Train's ``pretrain``: that would write the images to
a folder (JPEG would add a shift of its own at 32 px), decode them to 36 px for its crop, bring its own
schedule (cosine per epoch, no warm-up, weight decay 1e-4) and add Ray and Train start-up and per-epoch
checkpoints to each of the four surrogates (two seeds) - a run about recipe, not about the cluster,
at more than ~10 CPU-minutes a seed. What is recommended and what is measured is the augmentation.

The check's answer is not built in: which source class the shifted digits fall into is up to the
trained surrogate. Prints one JSON line; ``*_relevant_kept`` is the minimum over ``--seeds`` (each
seed redraws the data split, crops and surrogates). Measured with the library recipe (seed 0,
10 epochs, 13 of 32 units kept, random keeps 4.1 relevant on average; 10.7 CPU-minutes, 19 min wall
on 2 busy cores): the plain surrogate recognises none of the shifted digits (40% of the votes go to
"coins"), plain LM keeps 0 of 10 and the diagnostics flag it (8 of 10 classes share one majority
unit); no vote rule helps (soft-top3, class-balanced, tta, one-to-one: 0 each - the digits are not
even in the images' top 3); the ``augment: shift`` surrogate recognises 29% and keeps 10 (one-to-one
on top: 10), though its mapping is still flagged (the warning says the votes are concentrated, not
that the selection failed). Re-measured on seeds 0-3 with the current library (its RNG handling changed
since): plain keeps 4, 0, 2, 1; no vote rule on the plain surrogate does better than 4; ``shift-aug`` keeps
10, 8, 10, 9 and ``shift-aug+one-to-one`` 10, 10, 10, 10 (seeds 2 and 3 run after the choice, as its
out-of-sample check). The recommendation is therefore both: a surrogate trained with ``augment: shift``,
whose mapping is then still concentrated (flagged), and the one-to-one vote rule, which is the remedy for
concentrated votes once each class's own unit is among its images' top-k.

An earlier version trained ``shift-aug`` with its own copy of the augmentation and measured plain 4,
shift 9 (seed 0). That copy differed from the library recipe in: a 7-tap blur kernel (the library's
then 3 taps at 32 px, which capped any sigma at ~0.8 px; it now reaches 3 sigma of the largest, see
``transforms.shift_blur_kernel``), a fixed order of the jitter's operations (torchvision's is random),
"hue" as a channel permutation of the whole batch with p = 0.1 (torchvision: a hue rotation of up to
+-0.1 per image), contrast around the mean of all channels and grayscale as the channel mean
(torchvision: luminance), and no re-quantisation to uint8. The plain surrogate's augmentation draws
are the same as then (same generator, same crop and flip, same code otherwise), so its 4 -> 0 does not
come from this change (not traced further): it recognises ~0-1% of the digits in both runs, and which
digits survive is then up to the tie-break among units with (almost) no votes.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dp4tl_ray.data.transforms import augment_batch  # noqa: E402
from dp4tl_ray.models import ModelSpec, build_model, to_model_input  # noqa: E402
from dp4tl_ray.select.diagnostics import mapping_diagnostics  # noqa: E402
from dp4tl_ray.select.vote_rules import one_to_one_ranking  # noqa: E402
from dp4tl_ray.select.voting import rank_units_by_votes, units_to_drop, votes_from_topk  # noqa: E402
from dp4tl_ray.train.pretrain_config import PretrainConfig  # noqa: E402

SIZE = 32
RATIO = 0.6
DIGITS = 10
PER_CLASS = 50  # source images per class
BATCH = 128
CROP_SCALE_MIN = 0.35  # the surrogates' RandomResizedCrop lower scale (PretrainConfig.crop_scale_min)
PHOTOS = ["astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "text", "page", "horse", "brick",
          "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "retina", "clock", "cell",
          "stereo_motorcycle", "microaneurysms"]
SKLEARN_PHOTOS = ["china.jpg", "flower.jpg"]
TOPK = 3
BAR = 9  # relevant classes (of 10) a setting must keep
RECOMMENDED = "shift-aug+one-to-one"  # PretrainConfig.augment "shift" and --vote-rule one-to-one (see the docstring)


def _rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, np.float32)
    img = img / 255 if img.max() > 1.5 else img
    return np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img[..., :3]


def photos() -> list[tuple[str, np.ndarray]]:
    """Real photographs bundled with scikit-image and scikit-learn, float RGB in [0, 1]."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    out = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        out.append((name, _rgb(img[0] if isinstance(img, tuple) else img)))
    return out + [(n.split(".")[0], _rgb(load_sample_image(n))) for n in SKLEARN_PHOTOS]


def _resize(img: np.ndarray, size: int, bicubic: bool = False) -> np.ndarray:
    """Float image in [0, 1] (HxW or HxWx3) resized by PIL (antialiased when shrinking)."""
    from PIL import Image

    mode = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
    if img.ndim == 2:
        return np.asarray(Image.fromarray(img.astype(np.float32), "F").resize((size, size), mode))
    u8 = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(u8.resize((size, size), mode), np.float32) / 255


def photo_crops(img: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random square crops (15-50% of the short side) resized to SIZE."""
    h, w = img.shape[:2]
    out = []
    for _ in range(n):
        s = int(rng.uniform(0.15, 0.5) * min(h, w))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        out.append(_resize(img[y:y + s, x:x + s], SIZE))
    return np.stack(out)


def sharp_digit(scan: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A scan (8x8, 0..16) rendered large and sharp: bicubic to SIZE - 4, steep contrast, dark ink on
    white, placed at a random offset of up to 4 px."""
    ink = 1 / (1 + np.exp(-12 * (_resize(scan / 16.0, SIZE - 4, bicubic=True) - 0.45)))
    canvas = np.zeros((SIZE, SIZE), np.float32)
    y, x = rng.integers(0, 5, 2)
    canvas[y:y + SIZE - 4, x:x + SIZE - 4] = ink
    return _rgb(1 - canvas)


def shifted_digit(scan: np.ndarray, kind: int, rng: np.random.Generator) -> np.ndarray:
    """A low-resolution scan as it arrives: bilinear upsampling of the 8x8 grid, grey paper, noise;
    ``kind`` 0 plain, 1 inverted (light ink on dark), 2 tinted (coloured paper and ink)."""
    ink = np.clip(_resize(scan / 16.0, SIZE), 0, 1)[..., None]
    paper, colour = np.full(3, rng.uniform(0.75, 0.95)), np.full(3, rng.uniform(0.05, 0.3))
    if kind == 1:
        paper, colour = colour, paper
    elif kind == 2:
        paper, colour = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.4, 3)
    img = paper * (1 - ink) + colour * ink + rng.normal(0, 0.03, (SIZE, SIZE, 3))
    return np.clip(img, 0, 1)


def datasets(seed: int) -> dict:
    """Source (digits + photo classes) and the shifted downstream digits, uint8 NHWC."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    d = load_digits()
    perm = rng.permutation(len(d.target))
    src_idx, down_idx = perm[: len(perm) // 2], perm[len(perm) // 2:]
    images, labels, names = [], [], [f"digit {c}" for c in range(DIGITS)]
    for c in range(DIGITS):
        scans = d.images[src_idx[d.target[src_idx] == c]]
        images += [sharp_digit(scans[i % len(scans)], rng) for i in range(PER_CLASS)]
        labels += [c] * PER_CLASS
    for name, img in photos():
        images.append(photo_crops(img, PER_CLASS, rng))
        labels += [len(names)] * PER_CLASS
        names.append(name)
    src = np.concatenate([np.stack(images[: DIGITS * PER_CLASS])] + images[DIGITS * PER_CLASS:])
    sizes = rng.integers(15, 61, DIGITS)  # unequal downstream class sizes
    down, down_labels = [], []
    for c in range(DIGITS):
        scans = d.images[down_idx[d.target[down_idx] == c]][: sizes[c]]
        down += [shifted_digit(s, i % 3, rng) for i, s in enumerate(scans)]
        down_labels += [c] * len(scans)
    u8 = lambda a: (np.clip(a, 0, 1) * 255).round().astype(np.uint8)  # noqa: E731
    return {"source": u8(src), "labels": np.asarray(labels), "names": names,
            "down": u8(np.stack(down)), "down_labels": np.asarray(down_labels)}


def surrogate_config(recipe: str, seed: int, epochs: int) -> PretrainConfig:
    """The surrogate's settings as ``dp4tl pretrain`` takes them: ``recipe`` is ``PretrainConfig.augment``
    (``standard`` or the recommended ``shift``), the crop RandomResizedCrop(SIZE, 0.35-1) + flip."""
    return PretrainConfig(source="-", out="-", arch="resnet18", image_size=SIZE, crop_scale_min=CROP_SCALE_MIN,
                          augment=recipe, epochs=epochs, batch_size=BATCH, seed=seed)


def train_surrogate(data: dict, recipe: str, seed: int, epochs: int, cache: Path | None) -> torch.nn.Module:
    """resnet18 (ImageNet stem) trained on the source, each batch augmented by the library's
    ``augment_batch(**surrogate_config(recipe, ...).augment_kwargs())`` - what ``dp4tl pretrain
    --augment <recipe>`` applies - with a generator seeded by ``seed``; with ``cache`` the weights are
    kept there and reused (to re-rank without retraining)."""
    cfg = surrogate_config(recipe, seed, epochs)
    cfg.validate()
    model = build_model(ModelSpec(cfg.arch, len(data["names"]), cfg.small_input), seed=seed)
    file = cache / f"surrogate-s{seed}-e{epochs}-augment-{cfg.augment}.pt" if cache else None
    if file and file.is_file():
        model.net.load_state_dict(torch.load(file, weights_only=True))
        return model.eval()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    augment = functools.partial(augment_batch, **cfg.augment_kwargs(), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    x, y = data["source"], torch.as_tensor(data["labels"])
    steps = epochs * ((len(x) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps, pct_start=0.2)
    model.train()
    for _ in range(epochs):
        for b in torch.randperm(len(x), generator=gen).split(BATCH):
            imgs = to_model_input(torch.as_tensor(augment({"image": x[b.numpy()]})["image"]))
            loss = F.cross_entropy(model(imgs), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    if file:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.net.state_dict(), file)
    return model.eval()


@torch.no_grad()
def probabilities(model: torch.nn.Module, images: np.ndarray, tta: bool = False) -> np.ndarray:
    """Softmax over the source classes; with ``tta`` averaged over flips and 2-px shifted crops."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    views = [x]
    if tta:
        pad = F.pad(x, (2, 2, 2, 2), mode="replicate")
        views += [x.flip(3)] + [pad[:, :, dy:dy + SIZE, dx:dx + SIZE] for dy, dx in ((0, 0), (0, 4), (4, 0), (4, 4))]
    return torch.stack([F.softmax(model(v), 1) for v in views]).mean(0).numpy()


def kept_units(ranking: np.ndarray) -> np.ndarray:
    return ranking[: len(ranking) - units_to_drop(len(ranking), RATIO)]


def rankings(probs: np.ndarray, labels: np.ndarray, num_units: int, seed: int) -> dict[str, np.ndarray]:
    """Each vote rule's ranking of the units from the downstream images' probabilities."""
    topk = np.argsort(-probs, 1, kind="stable")[:, :TOPK]
    votes, runner_up = votes_from_topk(topk, num_units, 1), votes_from_topk(topk, num_units, TOPK)
    per_image_weight = 1.0 / np.bincount(labels)[labels]
    balanced = np.bincount(topk[:, 0], weights=per_image_weight, minlength=num_units)
    plain = rank_units_by_votes(votes, seed, runner_up)
    return {
        "plain": plain,
        "soft-top3": rank_units_by_votes(runner_up, seed),
        "class-balanced": rank_units_by_votes(balanced, seed, runner_up),
        "one-to-one": one_to_one_ranking([(labels, topk)], num_units, plain),
    }


def run_seed(seed: int, epochs: int, cache: Path | None) -> dict:
    data = datasets(seed)
    relevant = set(range(DIGITS))
    num_units, labels = len(data["names"]), data["down_labels"]
    out: dict = {"units": num_units, "kept_units": len(kept_units(np.arange(num_units)))}
    t = time.perf_counter()
    for recipe in ("plain", "shift-aug"):
        model = train_surrogate(data, "shift" if recipe == "shift-aug" else "standard", seed, epochs, cache)
        probs = probabilities(model, data["down"])
        ranks = rankings(probs, labels, num_units, seed)
        if recipe == "plain":
            ranks["tta"] = rankings(probabilities(model, data["down"], tta=True), labels, num_units, seed)["plain"]
            diag = mapping_diagnostics(probs.argmax(1), labels, num_units, unit_names=data["names"])
            out["plain_flagged"] = diag.flagged
            out["plain_diagnostics"] = {"top_unit": data["names"][diag.top_unit],
                                        "top_unit_share": round(diag.top_unit_share, 3),
                                        "shared_majority": len(diag.shared_majority_classes),
                                        "mean_class_agreement": round(diag.mean_class_agreement, 3),
                                        "warnings": [w.split(":")[0] for w in diag.warnings]}
            out["plain_top1_acc"] = round(float((probs.argmax(1) == labels).mean()), 3)
        else:
            ranks = {"shift-aug": ranks["plain"], "shift-aug+one-to-one": ranks["one-to-one"]}
            out["shift_aug_top1_acc"] = round(float((probs.argmax(1) == labels).mean()), 3)
            out["shift_aug_flagged"] = mapping_diagnostics(probs.argmax(1), labels, num_units).flagged
        for name, ranking in ranks.items():
            out.setdefault("relevant_kept", {})[name] = len(relevant & set(kept_units(ranking).tolist()))
    out["seconds"] = round(time.perf_counter() - t, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, help="keep the trained surrogates here and reuse them")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    runs = [run_seed(s, args.epochs, args.cache) for s in args.seeds]
    per_candidate = {c: [r["relevant_kept"][c] for r in runs] for c in runs[0]["relevant_kept"]}
    failed = [r for r in runs if r["relevant_kept"]["plain"] < BAR]
    print(json.dumps({
        "figure": "real-shift", "ratio": RATIO, "seeds": args.seeds, "epochs": args.epochs, "units": runs[0]["units"],
        "kept_units": runs[0]["kept_units"], "relevant_total": DIGITS, "bar": BAR, "recommended": RECOMMENDED,
        "recommended_relevant_kept": min(per_candidate[RECOMMENDED]),
        "plain_relevant_kept": min(per_candidate["plain"]),
        "plain_failed_seeds": len(failed),
        "plain_flagged": bool(failed) and all(r["plain_flagged"] for r in failed),
        "relevant_kept_per_seed": per_candidate,
        "relevant_kept_random_expected": round(DIGITS * runs[0]["kept_units"] / runs[0]["units"], 2),
        "per_seed": [{k: v for k, v in r.items() if k != "relevant_kept"} for r in runs],
        "seconds": round(time.perf_counter() - t, 1),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
