"""The data zoo: labelled image sets with known nuisances, made from data that ships with packages.

Every set is generated, not downloaded: scikit-learn's digits, the fonts installed on the machine
(Debian font packages), and Noto Color Emoji (Debian ``fonts-noto-color-emoji``). Each set is one
image folder that ``calibclust fit`` reads, split into train and held-out images by fit's own rule
(:func:`calibclust.train.profiles.heldout_by_path_hash` on each image's path under ``images/``,
fraction :data:`ZOO_HELDOUT_FRACTION`), so ``calibclust fit ROOT/images --heldout-fraction 0.2``
holds out exactly the zoo's held-out images. Each set comes with a near- and a
far-out-of-distribution folder:

================== ============================================================ ====================
set                what varies (independent of the class)                       near-OOD
================== ============================================================ ====================
digits             nothing: the 1,797 digits at full frame, as the quick start  letters
digits-geometric   scale (0.6–1.0 of the frame), rotation (±20°), position      letters, same warp
digits-colour      ink and paper colours, drawn per image (contrast kept)       letters, same colours
letters-fonts      the font: capitals A–J in every installed font (notMNIST)    K–T in the same fonts
emoji              scale, rotation, position, background colour                 other emoji
================== ============================================================ ====================

Far-OOD is noise plus photo patches (matplotlib's sample photographs) everywhere.

Why the emoji set is a fair colourful task: the class is *which object is drawn*, as a person
names it at a glance; every class shares its dominant colour with another class (apple /
strawberry are red, frog / broccoli green, banana / sunflower yellow, whale / gem blue, panda /
penguin black and white), so colour alone cannot solve it, and pose and background vary per
image, so neither can position.

The split is by path, not by font: a held-out letter of ``letters-fonts`` is usually drawn in a
font whose other letters were trained on (as any folder a user hands ``fit`` would be split).

Layout (ImageFolder, class folder names are ground truth for evaluation only)::

    ROOT/images/<class>/<index>.png     every image, once (the folder fit reads)
    ROOT/train/<class>/<index>.png      links into images/: the train split
    ROOT/heldout/<class>/<index>.png    links into images/: the held-out split
    ROOT/ood/near/<index>.png           ROOT/ood/far/<index>.png      ROOT/zoo.json

(``train/`` and ``heldout/`` hold copies where the file system refuses symbolic links.)

The sets are deterministic under ``seed`` and made without torch. The benches on them:
``bench zoo`` (:mod:`calibclust.app.zoo_bench`: ``calibclust fit`` per set) and, here,
``bench choose-k`` (:func:`run_choose_k_bench`), whose pretraining on the train split is fit's;
``bench calibration`` is :mod:`calibclust.train.calibration`. All take :class:`ZooSettings`.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from calibclust.datasets import dejavu_font_files, digits_images, letters_images, noise_images, photo_patches
from calibclust.errors import InputError
from calibclust.io.files import link_or_copy
from calibclust.shortcut import LUMA
from calibclust.train.profiles import FIGURES_HELDOUT_FRACTION, heldout_by_path_hash

SIZE = 32
ZOO_HELDOUT_FRACTION = FIGURES_HELDOUT_FRACTION  # a fifth, as the quick start
FONT_GLOBS = ("/usr/share/fonts/**/*.ttf", "/usr/share/fonts/**/*.otf", "/usr/share/fonts/**/*.pfb")
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
# Five colour pairs, so that colour alone never names the class.
EMOJI_CLASSES = ("🍎", "🍓", "🐸", "🥦", "🍌", "🌻", "🐳", "💎", "🐼", "🐧")
EMOJI_NAMES = ("apple", "strawberry", "frog", "broccoli", "banana", "sunflower", "whale", "gem", "panda", "penguin")
EMOJI_NEAR_OOD = ("🍒", "🚕", "🐢", "🍋", "🐬", "🚗", "🍅", "🌵", "🚌", "🐙")
EMOJI_PER_CLASS = 300
LETTERS_IN = "ABCDEFGHIJ"
LETTERS_OUT = "KLMNOPQRST"


@dataclass(frozen=True)
class ZooSet:
    name: str
    description: str
    # seed -> (images (N, SIZE, SIZE, 3) uint8, labels (N,), class names)
    make: Callable[[int], tuple[np.ndarray, np.ndarray, list[str]]]
    near_ood: Callable[[int, int], np.ndarray]  # (n, seed) -> images


# ----------------------------------------------------------------------------- nuisances


def _warp(gray: np.ndarray, rng: np.random.Generator, scale=(0.6, 1.0), degrees: float = 20.0) -> np.ndarray:
    """Shrink, rotate and move a white-on-black glyph inside its frame (the background stays black)."""
    size = gray.shape[0]
    s = rng.uniform(*scale)
    img = Image.fromarray(gray).rotate(rng.uniform(-degrees, degrees), resample=Image.BICUBIC, fillcolor=0)
    side = max(4, int(round(size * s)))
    img = img.resize((side, side), Image.BICUBIC)
    canvas = Image.new("L", (size, size), 0)
    room = size - side
    canvas.paste(img, (int(rng.integers(0, room + 1)), int(rng.integers(0, room + 1))))
    return np.asarray(canvas)


def _colourise(gray: np.ndarray, rng: np.random.Generator, min_contrast: float = 70.0) -> np.ndarray:
    """Ink and paper colours drawn per image, independent of the class; the glyph stays readable
    (luma difference of at least ``min_contrast`` of 255), either polarity."""
    while True:
        ink, paper = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if abs(float(ink @ LUMA) - float(paper @ LUMA)) >= min_contrast:
            break
    alpha = gray.astype(np.float64)[..., None] / 255.0
    return np.clip(paper * (1 - alpha) + ink * alpha, 0, 255).round().astype(np.uint8)


def _grey_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


# ----------------------------------------------------------------------------- digits


def _digits(seed: int, nuisance: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None):
    images, labels = digits_images(SIZE)
    if nuisance is not None:
        rng = np.random.default_rng(seed)
        images = np.stack([nuisance(img[..., 0], rng) for img in images])
    return images, labels, [str(c) for c in range(10)]


def _letters_like(n: int, seed: int, nuisance) -> np.ndarray:
    letters = letters_images(n, SIZE, seed)
    if nuisance is None:
        return letters
    rng = np.random.default_rng(seed + 1)
    return np.stack([nuisance(img[..., 0], rng) for img in letters])


def _geometric(gray, rng):
    return _grey_to_rgb(_warp(gray, rng))


# ----------------------------------------------------------------------------- letters in many fonts


def installed_fonts() -> list[str]:
    """Font files that draw all of A–T as distinct, non-empty glyphs (symbol and script fonts that
    lack Latin capitals are left out), one per distinct rendering, in a fixed order."""
    paths = sorted({p for pattern in FONT_GLOBS for p in glob.glob(pattern, recursive=True)}) + dejavu_font_files()
    fonts, seen = [], set()
    for path in paths:
        if "emoji" in path.lower():
            continue
        try:
            font = ImageFont.truetype(path, 24)
            glyphs = [bytes(font.getmask(ch)) for ch in LETTERS_IN + LETTERS_OUT]
            missing = bytes(font.getmask("\uffff"))
        except OSError:
            continue
        if len(set(glyphs)) < len(glyphs) or missing in glyphs or any(not any(g) for g in glyphs):
            continue
        signature = hash(tuple(glyphs[:4]))
        if signature not in seen:
            seen.add(signature)
            fonts.append(path)
    return fonts


def _glyph(path: str, ch: str) -> np.ndarray:
    """``ch`` scaled to fill about 80% of the frame, centred (notMNIST-style)."""
    font = ImageFont.truetype(path, 64)
    canvas = Image.new("L", (96, 96), 0)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
    draw.text(((96 - (right - left)) / 2 - left, (96 - (bottom - top)) / 2 - top), ch, fill=255, font=font)
    box = canvas.getbbox() or (0, 0, 96, 96)
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("L", (side, side), 0)
    square.paste(glyph, ((side - glyph.size[0]) // 2, (side - glyph.size[1]) // 2))
    inner = int(round(SIZE * 0.8))
    out = Image.new("L", (SIZE, SIZE), 0)
    out.paste(square.resize((inner, inner), Image.LANCZOS), ((SIZE - inner) // 2, (SIZE - inner) // 2))
    return np.asarray(out)


def _fonts_or_fail(minimum: int = 20) -> list[str]:
    fonts = installed_fonts()
    if len(fonts) < minimum:
        raise InputError(
            f"letters-fonts needs at least {minimum} fonts with Latin capitals; found {len(fonts)}. On Debian: "
            "apt-get install fonts-urw-base35 fonts-freefont-ttf fonts-lato fonts-open-sans fonts-adf-accanthis "
            "fonts-adf-berenis fonts-adf-gillius (CI's full list: APT_PACKAGES in .ci/run)"
        )
    return fonts


def _letters_fonts(seed: int):
    fonts = _fonts_or_fail()
    images, labels = [], []
    for path in fonts:
        for c, ch in enumerate(LETTERS_IN):
            images.append(_grey_to_rgb(_glyph(path, ch)))
            labels.append(c)
    return np.stack(images), np.asarray(labels, np.int64), list(LETTERS_IN)


def _letters_fonts_near(n: int, seed: int) -> np.ndarray:
    fonts = _fonts_or_fail()
    rng = np.random.default_rng(seed)
    return np.stack([_grey_to_rgb(_glyph(fonts[rng.integers(len(fonts))], LETTERS_OUT[rng.integers(10)]))
                     for _ in range(n)])


# ----------------------------------------------------------------------------- emoji


def _emoji_sprites(chars) -> list[Image.Image]:
    if not os.path.isfile(EMOJI_FONT):
        raise InputError(f"the emoji set needs {EMOJI_FONT} (Debian: apt-get install fonts-noto-color-emoji)")
    font = ImageFont.truetype(EMOJI_FONT, 109)  # the only size of Noto's bitmap strikes
    sprites = []
    for ch in chars:
        canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((10, 10), ch, font=font, embedded_color=True)
        sprites.append(canvas.crop(canvas.getbbox()))
    return sprites


def _emoji_image(sprite: Image.Image, rng: np.random.Generator) -> np.ndarray:
    canvas_side = 96
    background = tuple(int(v) for v in rng.uniform(0, 255, 3))
    canvas = Image.new("RGBA", (canvas_side, canvas_side), background + (255,))
    s = rng.uniform(0.55, 0.95)
    img = sprite.rotate(rng.uniform(-25, 25), resample=Image.BICUBIC, expand=True)
    side = max(8, int(round(canvas_side * s)))
    img.thumbnail((side, side), Image.LANCZOS)
    x = int(rng.integers(0, canvas_side - img.size[0] + 1))
    y = int(rng.integers(0, canvas_side - img.size[1] + 1))
    canvas.alpha_composite(img, (x, y))
    return np.asarray(canvas.convert("RGB").resize((SIZE, SIZE), Image.LANCZOS))


def _emoji(seed: int):
    rng = np.random.default_rng(seed)
    sprites = _emoji_sprites(EMOJI_CLASSES)
    images, labels = [], []
    for i in range(EMOJI_PER_CLASS):  # interleaved, as first drawn: another order would draw other images
        for c, sprite in enumerate(sprites):
            images.append(_emoji_image(sprite, rng))
            labels.append(c)
    order = np.argsort(np.asarray(labels), kind="stable")
    return np.stack(images)[order], np.asarray(labels, np.int64)[order], list(EMOJI_NAMES)


def _emoji_near(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sprites = _emoji_sprites(EMOJI_NEAR_OOD)
    return np.stack([_emoji_image(sprites[i % len(sprites)], rng) for i in range(n)])


# ----------------------------------------------------------------------------- registry

ZOO: dict[str, ZooSet] = {
    s.name: s
    for s in (
        ZooSet("digits", "scikit-learn's 1,797 digits at full frame (the quick start's data)",
               lambda seed: _digits(seed, None), lambda n, seed: _letters_like(n, seed, None)),
        ZooSet("digits-geometric", "the digits shrunk to 0.6-1.0 of the frame, rotated ±20°, moved",
               lambda seed: _digits(seed, _geometric), lambda n, seed: _letters_like(n, seed, _geometric)),
        ZooSet("digits-colour", "the digits in ink and paper colours drawn per image, independent of the digit",
               lambda seed: _digits(seed, _colourise), lambda n, seed: _letters_like(n, seed, _colourise)),
        ZooSet("letters-fonts", "capitals A-J in every installed font with Latin capitals (notMNIST-style)",
               _letters_fonts, _letters_fonts_near),
        ZooSet("emoji", "10 Noto emoji in five colour pairs, scaled, rotated, moved, on random backgrounds",
               _emoji, _emoji_near),
    )
}


def far_ood(n: int, seed: int) -> np.ndarray:
    """Half photo patches (matplotlib's sample photographs), half noise."""
    return np.concatenate([photo_patches(n - n // 2, SIZE, seed), noise_images(n // 2, SIZE, seed + 1)])


def image_paths(labels: np.ndarray, classes: list[str]) -> list[str]:
    """Each image's path under ``images/``: ``<class>/<index>.png`` (index in generation order), the
    relative path fit's split hashes."""
    return [f"{classes[label]}/{i:05d}.png" for i, label in enumerate(labels)]


def make_zoo_set(name: str, root: str | os.PathLike, seed: int = 0, n_ood: int = 200) -> dict[str, Path]:
    """Write set ``name`` under ``root`` (layout in the module docstring) unless ``root/zoo.json``
    says it is already there (same set, seed, OOD sizes, held-out fraction and, for letters, font
    count); returns the folders. Another set, or a folder left half-written without ``zoo.json``, is
    refused."""
    if name not in ZOO:
        raise InputError(f"unknown zoo set {name!r}; choose from {', '.join(ZOO)}")
    root = Path(root)
    paths = {"root": root, "images": root / "images", "train": root / "train", "heldout": root / "heldout",
             "near": root / "ood" / "near", "far": root / "ood" / "far"}
    manifest = root / "zoo.json"
    # The held-out fraction is part of the identity: a set written under the earlier rule (every
    # fifth image per class) has other train / held-out folders and is refused, not mixed in.
    identity = {"set": name, "seed": seed, "near_ood": n_ood, "far_ood": n_ood, "heldout_fraction": ZOO_HELDOUT_FRACTION,
                **({"fonts": len(installed_fonts())} if name == "letters-fonts" else {})}
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        if all(saved.get(k) == v for k, v in identity.items()):
            return paths
        raise InputError(f"{root} holds another zoo set ({ {k: saved.get(k) for k in identity} }); "
                         "delete it or choose another folder")
    if root.exists() and any(root.iterdir()):
        raise InputError(f"{root} is not empty and holds no zoo.json (an interrupted build?); delete it first")
    spec = ZOO[name]
    images, labels, classes = spec.make(seed)
    relative = image_paths(labels, classes)
    held = heldout_by_path_hash(relative, ZOO_HELDOUT_FRACTION)
    for image, rel, is_held in zip(images, relative, held):
        target = paths["images"] / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target)
        link_or_copy(target, paths["heldout" if is_held else "train"] / rel)
    for kind, ood in (("near", spec.near_ood(n_ood, seed + 101)), ("far", far_ood(n_ood, seed + 202))):
        paths[kind].mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(ood):
            Image.fromarray(image).save(paths[kind] / f"{i:05d}.png")
    # Written last: a folder with zoo.json is complete (the fonts count: the set depends on the machine).
    manifest.write_text(json.dumps({
        **identity, "description": spec.description, "classes": classes,
        "train": int((~held).sum()), "heldout": int(held.sum()),
        "split": (f"an image is held out when the hash of its path under images/ falls below {ZOO_HELDOUT_FRACTION} "
                  f"(calibclust fit's rule: calibclust fit images/ --heldout-fraction {ZOO_HELDOUT_FRACTION} "
                  "holds out the same images)"),
    }, indent=2))
    return paths


# ----------------------------------------------------------------------------- the zoo benches


@dataclass(frozen=True)
class ZooSettings:
    """What the zoo benches train with: ``calibclust fit --pretrain-epochs N`` (fit's CPU profile,
    :mod:`calibclust.train.profiles`, for everything else), and ``n_ood`` near- and as many far-OOD
    images per set."""

    pretrain_epochs: int
    n_ood: int
    input_filter: str = "none"  # fit --input-filter (bench zoo: auto, fit's default)

    @classmethod
    def full(cls, input_filter: str = "none") -> "ZooSettings":
        # The pretraining the zoo's figures so far were measured with.
        return cls(pretrain_epochs=100, n_ood=200, input_filter=input_filter)

    @classmethod
    def fast(cls, input_filter: str = "none") -> "ZooSettings":
        return cls(pretrain_epochs=15, n_ood=200, input_filter=input_filter)

    def record(self, seed: int) -> dict:
        """What a finished bench folder stores and is reused for: the settings and the seed (without
        the input filter when it is none, so folders measured before the option still count)."""
        record = {**asdict(self), "seed": seed}
        if self.input_filter == "none":
            del record["input_filter"]
        return record


def bench_sets(args) -> tuple[list[str], ZooSettings, Path]:
    """The zoo sets a bench command names (all by default), its settings (``--fast``) and folder."""
    names = args.sets or list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        raise InputError(f"unknown zoo set(s) {', '.join(unknown)}; choose from {', '.join(ZOO)}")
    settings = (ZooSettings.fast if args.fast else ZooSettings.full)(args.input_filter)
    return names, settings, Path(args.out)


def embed_heldout(paths: dict[str, Path], backbone_dir: Path, features: Path, progress: bool = False) -> None:
    """The backbone's L2-normalised features of the un-augmented held-out images into ``features``
    (``.npy`` with its ``.files.txt``; :func:`calibclust.embed.embed_folder`, what ``calibclust
    embed`` runs)."""
    from calibclust.embed import embed_folder

    result = embed_folder(paths["heldout"], backbone_dir, features, progress=progress)
    if result.errors:
        raise InputError(f"{len(result.errors)} unreadable held-out images, e.g. {result.errors[0].path}")


def read_heldout_features(features: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Features written by :func:`embed_heldout` and their class indices (from each row's folder)."""
    from calibclust.embed import sidecar_paths

    files = sidecar_paths(features)["files"].read_text().splitlines()
    labels = np.asarray([classes.index(Path(f).parent.name) for f in files])
    return np.load(features).astype(np.float32), labels


def heldout_features(name: str, out: Path, settings: ZooSettings, seed: int = 0,
                     verbose: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The zoo set's held-out features from a backbone pretrained on its train split as ``fit``
    pretrains (:func:`calibclust.train.profiles.moco_config` with ``settings.pretrain_epochs``), and
    their class indices. Reused when ``out`` holds them for the same settings and seed; an
    interrupted pretraining continues."""
    from calibclust.pretrain import pretrain
    from calibclust.train.data import TrainingData
    from calibclust.train.profiles import moco_config
    from calibclust.train.state import has_state

    out = Path(out)
    wanted = settings.record(seed)
    done = out / "features.done.json"
    if done.is_file() and json.loads(done.read_text()) != wanted:
        raise InputError(f"{out} holds features made with other settings ({done.read_text().strip()}); "
                         "delete it or choose another --out")
    paths = make_zoo_set(name, out / "data", seed=seed, n_ood=settings.n_ood)
    if not done.is_file():
        print(f"== {name}: {ZOO[name].description}", flush=True)
        train = TrainingData.from_folder(paths["train"], SIZE, progress=verbose)
        config = moco_config(settings.pretrain_epochs, train.num_images, seed=seed, input_filter=settings.input_filter)
        print(f"pretrain: MoCo-v2, {config.epochs} epochs, batch {config.batch_size}, {train.num_images} train images",
              flush=True)
        pretrain(train.images, config, out / "pretrain", resume=has_state(out / "pretrain"), progress=verbose,
                 data_info={"folder": str(paths["train"]), "split": "zoo train split", "n_images": train.num_images})
        print("embed: the held-out split", flush=True)
        embed_heldout(paths, out / "pretrain", out / "heldout-features.npy", progress=verbose)
        done.write_text(json.dumps(wanted))
    classes = json.loads((paths["root"] / "zoo.json").read_text())["classes"]
    return read_heldout_features(out / "heldout-features.npy", classes)


def choose_k_row(name: str, features: np.ndarray, labels: np.ndarray, classes: int, k_range, seed: int) -> dict:
    """``--clusters auto`` on the held-out features of the first ``classes`` classes, and K-means'
    ACC/NMI there at the chosen K and at the true K (labels used for scoring only)."""
    import torch

    from calibclust.cluster.choose_k import choose_k
    from calibclust.cluster.kmeans import kmeans
    from calibclust.metrics import hungarian_accuracy, normalized_mutual_info

    keep = labels < classes
    x, y = features[keep], labels[keep]
    choice = choose_k(x, k_range, seed=seed)

    def scores(k: int) -> tuple[float, float]:
        pred = kmeans(torch.from_numpy(x), k, n_init=3, seed=seed).labels.numpy()
        return hungarian_accuracy(y, pred).accuracy, normalized_mutual_info(y, pred)

    acc, nmi = scores(choice.k)
    acc_true, nmi_true = scores(classes)
    return {"set": name, "n": int(len(x)), "true_k": classes, "chosen_k": choice.k, "runner_up": choice.runner_up,
            **{f"pick_{c}": v for c, v in choice.picks.items()}, "acc": acc, "nmi": nmi, "acc_true_k": acc_true,
            "nmi_true_k": nmi_true, "seconds": choice.seconds, "message": choice.message, "choice": choice.to_dict()}


CHOOSE_K_COLUMNS = [
    ("set", "set"), ("n", "held-out"), ("true_k", "true K"), ("chosen_k", "chosen K"), ("runner_up", "runner-up"),
    ("pick_eigengap", "eigengap"), ("pick_gap", "gap"), ("pick_silhouette", "silhouette"), ("pick_stability", "stability"),
    ("acc", "ACC @chosen"), ("nmi", "NMI @chosen"), ("acc_true_k", "ACC @true K"), ("nmi_true_k", "NMI @true K"),
    ("seconds", "seconds"),
]


def run_choose_k_bench(args) -> int:
    """``calibclust bench choose-k`` (options in :mod:`calibclust.bench`)."""
    from calibclust.bench import print_table

    names, settings, out = bench_sets(args)
    rows = []
    for name in names:
        features, labels = heldout_features(name, out / name, settings, args.seed, args.verbose)
        n_classes = int(labels.max()) + 1
        for classes in sorted({n_classes, *(c for c in args.subsets if 2 <= c < n_classes)}, reverse=True):
            rows.append(choose_k_row(name, features, labels, classes, args.k_range, args.seed))
            r = rows[-1]
            print(f"  {name}, {classes} classes: chosen K = {r['chosen_k']} ({r['seconds']:.0f} s)", flush=True)
        (out / "choose-k.json").write_text(json.dumps(rows, indent=2))
    hits = sum(r["chosen_k"] == r["true_k"] for r in rows)
    near = sum(abs(r["chosen_k"] - r["true_k"]) <= 2 for r in rows)
    print(f"\ncalibclust bench choose-k ({settings.pretrain_epochs} pretraining epochs, seed {args.seed}, "
          f"K in {args.k_range[0]}..{args.k_range[1]}); features of the held-out split ({ZOO_HELDOUT_FRACTION:.0%} of "
          "each set by fit's path-hash rule, never pretrained on); rows with fewer classes keep the first ones; labels only score the result:")
    print_table([h for _, h in CHOOSE_K_COLUMNS], [[r[k] for k, _ in CHOOSE_K_COLUMNS] for r in rows])
    print(f"chosen = true K on {hits} of {len(rows)} rows; within ±2 on {near} of {len(rows)}")
    return 0
