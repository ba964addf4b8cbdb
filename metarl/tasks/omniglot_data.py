"""Omniglot data layer: load, preprocess, cache, split by class, sample few-shot tasks.

Omniglot (Lake, Salakhutdinov and Tenenbaum 2015) has 1623 handwritten characters
from 50 alphabets, each drawn once by 20 people, as 105x105 black-and-white PNGs.
The official release (``https://github.com/brendenlake/omniglot``, folder
``python/``) ships ``images_background.zip`` (30 alphabets, 964 characters) and
``images_evaluation.zip`` (20 alphabets, 659 characters), plus the subsets
``images_background_small1.zip`` / ``images_background_small2.zip``. Each zip holds a
top folder of its own name, then ``<Alphabet>/character<NN>/<imageid>_<drawer>.png``.

Conventions (fixed here, used by every consumer):

- ``images`` are ``uint8 [n_chars, 20, S, S]`` with **ink = 255, background = 0**
  (the MAML convention after its ``1 - x`` inversion); divide by 255 for [0, 1].
- Resizing 105 -> S (default 28) converts to grey first, then uses PIL's Lanczos
  filter, which antialiases when downsampling. (MAML's ``resize_images.py`` asked
  for Lanczos on the mode-"1" PNGs, for which PIL silently uses nearest neighbour,
  so its images were binary; ours are grey at the stroke edges.)
- Characters are ordered by (source, alphabet, character) and drawers by file name,
  so a zip and its unzipped tree give identical tensors and identical splits.
- A character with other than 20 drawings is an error naming it (the official data
  always has 20). A character present in several sources (e.g. ``images_background``
  and its subset ``images_background_small1``) is kept once.
- Rotations by k * 90 degrees are new classes (Santoro et al. 2016; MAML section 5.2),
  k counter-clockwise as ``torch.rot90`` / ``np.rot90`` / ``tf.image.rot90``.
  Class id ``c = 4 * char + k``. MAML's ``data_generator.py`` rotates classes of both
  meta-train and meta-test tasks (``# and FLAGS.train`` is commented out there), so
  ``omniglot_pools`` rotates both by default.

Nothing is ever downloaded. Decoded images are cached per source file as a torch
file in metarl's cache folder, never beside the data (see ``load_omniglot`` and
``cache_folder``).

References: Lake et al. 2015, Science 350(6266); Finn et al. 2017, section 5.2 and
appendix A.1 (1200 meta-train characters, rotations, 28x28).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import logging
import os
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from metarl.types import DataError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
Split = Literal["character", "alphabet", "all_test"]

DRAWERS = 20
"""Drawings per character in the official data."""
PAPER_N_TRAIN, PAPER_N_CHARS = 1200, 1623
"""Finn et al. 2017: 1200 of the 1623 characters are meta-train classes."""
CACHE_VERSION = 1
"""Bump when preprocessing changes: old cache files are then rebuilt."""
CACHE_ENV = "METARL_CACHE"
"""Environment variable naming metarl's cache folder (see ``cache_folder``)."""

_WHERE = ("get images_background.zip and images_evaluation.zip from the folder python/ of "
          "https://github.com/brendenlake/omniglot (Brenden Lake's official repository)")
_LAYOUT = ("expected images_*.zip files, or their unzipped folders, laid out as "
           "<top>/<Alphabet>/character<NN>/<imageid>_<drawer>.png")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class CharInfo:
    """Where one character comes from."""

    alphabet: str
    """Alphabet folder name, e.g. ``"Latin"``."""
    character: str
    """Character folder name, e.g. ``"character01"``."""
    source: str
    """Zip stem or top folder name, e.g. ``"images_background"``."""


@dataclass(frozen=True, repr=False)
class OmniglotData:
    """Preprocessed characters: ``images[c, d]`` is drawer d's drawing of ``chars[c]``."""

    images: Tensor
    """``uint8 [n_chars, 20, S, S]``, ink 255, background 0."""
    chars: tuple[CharInfo, ...]
    """Metadata, one per character, in the order of ``images``."""

    def __len__(self) -> int:
        return len(self.chars)

    def __repr__(self) -> str:
        n_alpha = len({c.alphabet for c in self.chars})
        shape = tuple(self.images.shape)
        return f"OmniglotData({len(self)} characters, {n_alpha} alphabets, images {shape})"

    def subset(self, index: Tensor | Sequence[int]) -> OmniglotData:
        """The characters at ``index`` (int64 ``[n]``), in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        return OmniglotData(self.images[index], tuple(self.chars[i] for i in index.tolist()))


# ---------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Source:
    path: Path  # a zip file or an unzipped top folder
    files: tuple[str, ...] | None = None  # top folder: its PNGs, relative posix paths

    @property
    def is_zip(self) -> bool:
        return self.files is None

    @property
    def name(self) -> str:
        return self.path.stem if self.is_zip else self.path.name


def load_omniglot(paths: PathLike | Sequence[PathLike], *, image_size: int = 28,
                  cache: bool = True, cache_dir: PathLike | None = None) -> OmniglotData:
    """Read Omniglot characters from zips or unzipped trees, decoded once, then cached.

    Args:
        paths: one path or several, merged. Each is an official zip
            (``images_background.zip``), a folder holding such zips (``images_*.zip``;
            other zips such as ``strokes_*.zip`` are ignored), or an unzipped tree: its
            top folder or any folder above it. A zip and its unzipped folder side by
            side count once (the zip is read).
        image_size: side S of the square output images (28 in the papers).
        cache: read and write the per-source cache files.
        cache_dir: the folder the cache files go in (created when missing). None or "":
            ``cache_folder()``, i.e. ``$METARL_CACHE/omniglot``, else
            ``$XDG_CACHE_HOME/metarl/omniglot``, else ``~/.cache/metarl/omniglot``.
            Nothing is ever written beside the data.

    Returns:
        ``OmniglotData`` with ``images`` ``uint8 [n_chars, 20, S, S]`` (ink 255),
        ordered by (source, alphabet, character).

    Raises:
        DataError: a path does not exist, holds no Omniglot characters, a zip or image
            is corrupt (named), or a character has other than 20 drawings (named).

    The cache file of a source ``X`` (a zip's or a top folder's name) is
    ``X-<path>-<state>.omniglot<S>.pt``: ``<path>`` a digest of its resolved path,
    ``<state>`` one of the zip's size and mtime, or of the names, sizes and mtimes of
    the tree's PNGs, so two data sets never share a file. It holds a dict of tensors
    and strings (``torch.load(weights_only=True)``) with a key over the bytes of a zip
    (blake2b; ~10 ms for the full 9 MB release) or the tree's state, plus S and
    ``CACHE_VERSION``, checked on every read. A stale or unreadable cache is rebuilt;
    writes are atomic (temporary file in the same folder, ``os.replace``) and remove
    the files of earlier states of the same source. A cache folder that cannot be
    written is not an error: a warning is logged and the data load uncached.

    References: Lake et al. 2015; Finn et al. 2017, appendix A.1.
    """
    if image_size < 1:
        raise ValueError(f"image_size={image_size}: expected a positive side length, e.g. 28")
    path_list = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not path_list:
        raise DataError(f"no Omniglot path given: {_WHERE}")
    found = (s for p in path_list for s in _find_sources(Path(p).expanduser().resolve()))
    sources = list(dict.fromkeys(found))  # each once, in order
    parts = [_load_source(s, image_size, cache, cache_dir) for s in sources]
    rows = [(info, i, c) for i, (_, infos) in enumerate(parts) for c, info in enumerate(infos)]
    rows.sort(key=lambda r: (r[0].source, r[0].alphabet, r[0].character))  # path order is moot
    seen: set[tuple[str, str]] = set()
    keep: list[tuple[CharInfo, int, int]] = []
    for info, i, c in rows:  # keep the first copy of a character found in several sources
        if (info.alphabet, info.character) not in seen:
            seen.add((info.alphabet, info.character))
            keep.append((info, i, c))
    if len(keep) < len(rows):
        log.info("skipped %d characters loaded twice (a subset such as images_background_small1 "
                 "beside images_background)", len(rows) - len(keep))
    images = torch.stack([parts[i][0][c] for _, i, c in keep])  # [n_chars, 20, S, S]
    return OmniglotData(images, tuple(info for info, _, _ in keep))


def _find_sources(path: Path) -> list[_Source]:
    """The zips and unzipped top folders under ``path`` (see ``load_omniglot``)."""
    if not path.exists():
        raise DataError(f"Omniglot path {path} does not exist: {_WHERE}; {_LAYOUT}")
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise DataError(f"{path} is neither a zip nor a folder: {_LAYOUT}")
        return [_Source(path)]
    zips = sorted(p for p in path.glob("images_*.zip") if p.is_file())
    tops: dict[Path, list[str]] = {}
    for png in sorted(path.rglob("*.png")):
        rel = png.relative_to(path).parts
        if len(rel) >= 3 and not _is_junk(rel):
            top = png.parents[2]
            tops.setdefault(top, []).append(png.relative_to(top).as_posix())
    zipped = {z.with_suffix("") for z in zips}
    sources = [_Source(z) for z in zips]
    sources += [_Source(top, tuple(files)) for top, files in tops.items() if top not in zipped]
    if not sources:
        raise DataError(f"{path} contains no Omniglot characters: {_LAYOUT}")
    return sources


def _is_junk(parts: Sequence[str]) -> bool:
    return "__MACOSX" in parts or parts[-1].startswith(".")


def _load_source(src: _Source, size: int, cache: bool,
                 cache_dir: PathLike | None) -> tuple[Tensor, list[CharInfo]]:
    """One source's ``(images uint8 [n, 20, S, S], infos)``, from cache when valid."""
    if not cache:
        return _read_source(src, size)
    state = _state(src)
    key = _content_key(src, size, state)
    path = _cache_path(src, size, state, cache_dir)
    hit = _read_cache(path, key, src.name)
    if hit is not None:
        log.debug("Omniglot cache hit: %s", path)
        return hit
    images, infos = _read_source(src, size)
    blob = {"key": key, "images": images, "alphabets": [i.alphabet for i in infos],
            "characters": [i.character for i in infos]}
    if not _writable(path.parent):
        log.warning("Omniglot cache folder %s is not writable: %s loaded without caching "
                    "(set %s or the family option cache_dir to a writable folder)",
                    path.parent, src.path, CACHE_ENV)
        return images, infos
    try:
        _save_atomic(blob, path)
    except OSError as e:
        log.warning("cannot write Omniglot cache %s (%s): %s loaded without caching (set %s "
                    "or the family option cache_dir to a writable folder)",
                    path, e, src.path, CACHE_ENV)
        return images, infos
    log.info("cached %d Omniglot characters of %s in %s", len(infos), src.path, path)
    prefix, suffix = _cache_name(src, size)
    for old in path.parent.glob(glob.escape(prefix) + "*" + glob.escape(suffix)):
        if old != path:  # the cache of an earlier state of this source
            with contextlib.suppress(OSError):
                old.unlink()
    return images, infos


def _read_source(src: _Source, size: int) -> tuple[Tensor, list[CharInfo]]:
    """Decode and resize every image of one source: ``(uint8 [n, 20, S, S], infos)``."""
    if src.files is not None:  # unzipped tree
        return _decode_all(src, src.files, lambda name: (src.path / name).read_bytes(), size)
    try:
        zf = zipfile.ZipFile(src.path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{src.path} is not a readable zip file ({e}): it is corrupt or "
                        f"truncated, fetch it again ({_WHERE})") from e
    with zf:
        return _decode_all(src, zf.namelist(), zf.read, size)


def _decode_all(src: _Source, names: Sequence[str], read: Callable[[str], bytes],
                size: int) -> tuple[Tensor, list[CharInfo]]:
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        parts = name.split("/")
        if name.lower().endswith(".png") and len(parts) >= 3 and not _is_junk(parts):
            groups.setdefault((parts[-3], parts[-2]), []).append(name)
    if not groups:
        raise DataError(f"{src.path} contains no Omniglot characters: {_LAYOUT}")
    keys = sorted(groups)
    images = np.empty((len(keys), DRAWERS, size, size), dtype=np.uint8)
    for c, (alphabet, character) in enumerate(keys):
        files = sorted(groups[alphabet, character], key=lambda n: n.rsplit("/", 1)[-1])
        if len(files) != DRAWERS:
            raise DataError(f"{src.path}: character {alphabet}/{character} has {len(files)} "
                            f"drawings, expected {DRAWERS}: complete or remove its folder")
        for d, name in enumerate(files):
            try:
                images[c, d] = _decode_png(read(name), size)
            except _DECODE_ERRORS as e:
                where = f"{src.path}, member {name}" if src.is_zip else str(src.path / name)
                raise DataError(f"{where}: cannot read image ({type(e).__name__}: {e}); "
                                "the file is corrupt, fetch it again") from e
    infos = [CharInfo(a, ch, src.name) for a, ch in keys]
    return torch.from_numpy(255 - images), infos  # ink 0 -> 255


def _decode_png(data: bytes, size: int) -> np.ndarray:
    """One image file -> ``uint8 [size, size]``, PIL grey: ink 0, background 255."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L").resize((size, size), Image.Resampling.LANCZOS))


# ------------------------------------------------------------------------------ cache


def cache_folder() -> Path:
    """Where Omniglot cache files go by default: ``$METARL_CACHE/omniglot``, else
    ``$XDG_CACHE_HOME/metarl/omniglot`` (an absolute ``XDG_CACHE_HOME`` only, as the XDG
    base directory specification says), else ``~/.cache/metarl/omniglot``."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "metarl") if xdg and os.path.isabs(xdg) else "~/.cache/metarl"
    return Path(root).expanduser() / "omniglot"


def _state(src: _Source) -> str:
    """What says a source changed without reading it: the size and mtime of a zip, or the
    names, sizes and mtimes of a tree's PNGs (a digest)."""
    h = hashlib.blake2b(digest_size=8)
    if src.files is None:
        st = src.path.stat()
        h.update(f"zip\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        for name in src.files:
            st = (src.path / name).stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _content_key(src: _Source, size: int, state: str) -> str:
    """The key stored in a cache file and checked on reading: preprocessing and content."""
    h = hashlib.blake2b(f"omniglot v{CACHE_VERSION} size={size} lanczos ink=255\n".encode(),
                        digest_size=16)
    if src.files is None:  # zip: its bytes
        with open(src.path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    else:  # tree: names, sizes and mtimes of its PNGs
        h.update(state.encode())
    return h.hexdigest()


def _cache_name(src: _Source, size: int) -> tuple[str, str]:
    """``(prefix, suffix)`` of ``src``'s cache file names; its state goes in between."""
    where = hashlib.blake2b(str(src.path.resolve()).encode(), digest_size=6).hexdigest()
    return f"{src.path.name}-{where}-", f".omniglot{size}.pt"


def _cache_path(src: _Source, size: int, state: str, cache_dir: PathLike | None) -> Path:
    """The cache file of ``src``: in ``cache_dir`` when given, else in ``cache_folder()``."""
    folder = Path(cache_dir).expanduser() if cache_dir not in (None, "") else cache_folder()
    prefix, suffix = _cache_name(src, size)
    return folder / f"{prefix}{state}{suffix}"


def _writable(folder: Path) -> bool:
    """Whether cache files may go into ``folder`` (created when missing).

    A folder without any write permission bit counts as read-only even for root, who
    could write there: a cache folder marked read-only is left untouched.
    """
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return os.access(existing, os.W_OK) and bool(existing.stat().st_mode & 0o222)


def _read_cache(path: Path, key: str, source: str) -> tuple[Tensor, list[CharInfo]] | None:
    """The cached ``(images, infos)`` if ``path`` holds a valid cache for ``key``, else None."""
    try:
        if not path.is_file():
            return None
        blob: Any = torch.load(path, map_location="cpu", weights_only=True)
        if blob["key"] != key:
            return None
        images, alphabets, characters = blob["images"], blob["alphabets"], blob["characters"]
        if (images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != DRAWERS
                or not len(alphabets) == len(characters) == images.shape[0]):
            raise ValueError(f"unexpected content, images {tuple(images.shape)}")
    except Exception as e:  # any unreadable cache is rebuilt, never fatal
        log.warning("Omniglot cache %s is unreadable (%s: %s); rebuilding it",
                    path, type(e).__name__, e)
        return None
    return images, [CharInfo(a, c, source) for a, c in zip(alphabets, characters)]


def _save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file in ``path``'s folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------ split


def split_characters(chars: Sequence[CharInfo], *, split: Split = "character",
                     n_train: int | None = None, train_fraction: float | None = None,
                     seed: int = 0) -> tuple[Tensor, Tensor]:
    """Split characters into meta-train and meta-test classes, deterministically in ``seed``.

    Args:
        chars: the characters, e.g. ``OmniglotData.chars``.
        split: ``"character"``: a random subset of characters is meta-train.
            ``"alphabet"``: whole alphabets go to one side; the shuffled prefix of
            alphabets whose character count is closest to the target is meta-train.
            ``"all_test"``: every character is a meta-test class (meta-testing on a
            data set that was not trained on; ``n_train``/``train_fraction`` unused).
        n_train: target number of meta-train characters. None: from ``train_fraction``.
        train_fraction: meta-train share of the characters. None (with ``n_train``
            None): 1200/1623 = 0.739, the paper's share, so the full set gives exactly
            1200 / 423 and ``images_background_small1`` (136 characters) 101 / 35.
        seed: seed of the shuffle (a private ``torch.Generator``; global RNG untouched).

    Returns:
        ``(train, test)``: sorted int64 index tensors into ``chars``, disjoint, together
        all of them.

    References: Finn et al. 2017, section 5.2 (1200 meta-train characters).
    """
    n = len(chars)
    if split not in ("character", "alphabet", "all_test"):
        raise ValueError(f"split={split!r}: expected 'character', 'alphabet' or 'all_test'")
    if n_train is not None and train_fraction is not None:
        raise ValueError("give n_train or train_fraction, not both")
    if train_fraction is not None and not 0.0 <= train_fraction <= 1.0:
        raise ValueError(f"train_fraction={train_fraction}: expected a share in [0, 1]")
    if n_train is not None and not 0 <= n_train <= n:
        raise ValueError(f"n_train={n_train}: expected 0..{n}, the number of characters")
    if split == "all_test":
        return torch.zeros(0, dtype=torch.long), torch.arange(n)
    if n_train is None:
        fraction = PAPER_N_TRAIN / PAPER_N_CHARS if train_fraction is None else train_fraction
        n_train = round(n * fraction)
    g = torch.Generator().manual_seed(seed)
    if split == "character":
        perm = torch.randperm(n, generator=g)
        train = perm[:n_train]
    else:
        alphabets = sorted({c.alphabet for c in chars})
        order = [alphabets[i] for i in torch.randperm(len(alphabets), generator=g).tolist()]
        counts = Counter(c.alphabet for c in chars)
        cum = np.cumsum([0, *(counts[a] for a in order)])  # characters in the first m alphabets
        m = int(np.argmin(np.abs(cum - n_train)))  # first of the closest
        chosen = set(order[:m])
        train = torch.tensor([i for i, c in enumerate(chars) if c.alphabet in chosen],
                             dtype=torch.long)
    is_train = torch.zeros(n, dtype=torch.bool)
    is_train[train] = True
    return is_train.nonzero().flatten(), (~is_train).nonzero().flatten()


# --------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class FewShotBatch:
    """T N-way tasks with K support and Q query images per class; labels 0..N-1.

    Rows are class-major: row ``n * K + k`` of the support set is shot k of label n.
    """

    x_support: Tensor
    """``[T, N*K, 1, S, S]`` float in [0, 1], ink 1."""
    y_support: Tensor
    """``[T, N*K]`` int64 labels."""
    x_query: Tensor
    """``[T, N*Q, 1, S, S]``."""
    y_query: Tensor
    """``[T, N*Q]``."""
    classes: Tensor
    """``[T, N]`` pool class id of each label (``4 * char + rotation`` with rotations)."""
    drawers: Tensor
    """``[T, N, K+Q]`` drawer of each image: the first K are the support set."""

    @property
    def n_tasks(self) -> int:
        return self.x_support.shape[0]


class OmniglotPool:
    """The classes of one side of a split, sampled into batched few-shot tasks.

    With ``rotations``, each character gives 4 classes, its drawings rotated by
    k * 90 degrees counter-clockwise (``torch.rot90``), class id ``c = 4 * char + k``.
    The rotated copies ``[n_classes, 20, S, S]`` are built once per device on first
    use (4x the images: 200 MB for all 1623 characters at 28x28), so that a batch is
    a single gather. Gathering unrotated images and rotating each batch by index was
    2.3-2.8x slower (one CPU thread, 1200 characters: 32 tasks 5-way 1+15 shots 6 vs
    17 ms; 16 tasks 20-way 5+15 shots 15 vs 35 ms).

    References: Santoro et al. 2016 and Finn et al. 2017, section 5.2 (rotations).
    """

    def __init__(self, images: Tensor, *, rotations: bool = True) -> None:
        """``images``: ``uint8 [n_chars, 20, S, S]``, ink 255, e.g. ``OmniglotData.images``."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images: got {images.dtype} {tuple(images.shape)}, expected "
                             "uint8 [n_chars, drawers, S, S] as in OmniglotData.images")
        self.images = images
        self.rotations = rotations
        self._class_images: dict[torch.device, Tensor] = {}

    def __repr__(self) -> str:
        return (f"OmniglotPool({self.n_chars} characters, {self.n_classes} classes, "
                f"rotations={self.rotations})")

    @property
    def n_chars(self) -> int:
        return self.images.shape[0]

    @property
    def n_classes(self) -> int:
        return self.n_chars * (4 if self.rotations else 1)

    def class_images(self, device: str | torch.device | None = None) -> Tensor:
        """``uint8 [n_classes, 20, S, S]`` on ``device`` (default: that of ``images``)."""
        device = torch.device(device) if device is not None else self.images.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._class_images:
            x = self.images.to(device)  # [C, D, S, S]
            if self.rotations:
                x = torch.stack([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)], dim=1)
                x = x.flatten(0, 1)  # [C*4, D, S, S], class 4 * char + k
            self._class_images[device] = x
        return self._class_images[device]

    def sample(self, n_tasks: int, ways: int, shots: int, query: int, generator: torch.Generator,
               device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32) -> FewShotBatch:
        """Sample T = ``n_tasks`` tasks of N = ``ways`` classes, K + Q images per class.

        Per task, N distinct classes (label n is the n-th drawn, so labels are a random
        assignment); per class, K + Q distinct drawers. All tasks are drawn at once
        from random keys on ``generator``'s device: no loop over tasks or images.

        Args:
            n_tasks, ways: T tasks of N classes each.
            shots, query: K support and Q query images per class (K >= 1, K + Q <= 20).
            generator: the only source of randomness; equal state, equal batch.
            device: device of the returned tensors; None: that of ``images``.
            dtype: floating dtype of the images.

        Returns:
            ``FewShotBatch`` with ``x_support [T, N*K, 1, S, S]``, ``x_query [T, N*Q, 1, S, S]``.
        """
        T, N, K, Q = n_tasks, ways, shots, query
        D, S = self.images.shape[1], self.images.shape[-1]
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: got {type(generator).__name__}, expected torch.Generator")
        if T < 1 or N < 1 or K < 1 or Q < 0:
            raise ValueError(f"n_tasks={T}, ways={N}, shots={K}, query={Q}: expected "
                             "n_tasks, ways, shots >= 1 and query >= 0")
        if N > self.n_classes:
            raise ValueError(f"ways={N} but the pool has {self.n_classes} classes: use fewer "
                             "ways, more characters, or rotations=True")
        if K + Q > D:
            raise ValueError(f"shots + query = {K + Q} but each character has {D} drawings: "
                             f"use shots + query <= {D}")
        pool = self.class_images(device)  # [n_classes, D, S, S] uint8
        gd = generator.device
        keys = torch.rand(T, self.n_classes, generator=generator, device=gd, dtype=torch.float64)
        classes = keys.topk(N, dim=1).indices  # [T, N], distinct, in random order
        keys = torch.rand(T, N, D, generator=generator, device=gd, dtype=torch.float64)
        drawers = keys.topk(K + Q, dim=2).indices  # [T, N, K+Q], distinct per class
        x = pool[classes.to(pool.device)[:, :, None], drawers.to(pool.device)]  # [T, N, K+Q, S, S]
        x = x.to(dtype).div_(255)
        labels = torch.arange(N, device=pool.device)
        return FewShotBatch(
            x_support=x[:, :, :K].reshape(T, N * K, 1, S, S),
            y_support=labels.repeat_interleave(K).repeat(T, 1),
            x_query=x[:, :, K:].reshape(T, N * Q, 1, S, S),
            y_query=labels.repeat_interleave(Q).repeat(T, 1),
            classes=classes.to(pool.device),
            drawers=drawers.to(pool.device),
        )


def omniglot_pools(data: OmniglotData, *, split: Split = "character", n_train: int | None = None,
                   train_fraction: float | None = None, seed: int = 0, rotate_train: bool = True,
                   rotate_test: bool = True) -> tuple[OmniglotPool, OmniglotPool]:
    """Meta-train and meta-test pools of ``data``; arguments as in ``split_characters``.

    Rotations are on for both sides by default, as in MAML's code.

    Example::

        data = load_omniglot(["images_background.zip", "images_evaluation.zip"])
        train, test = omniglot_pools(data)  # 1200 * 4 and 423 * 4 classes
        g = torch.Generator().manual_seed(0)
        batch = train.sample(32, ways=5, shots=1, query=15, generator=g)
    """
    train, test = split_characters(data.chars, split=split, n_train=n_train,
                                   train_fraction=train_fraction, seed=seed)
    return (OmniglotPool(data.images[train], rotations=rotate_train),
            OmniglotPool(data.images[test], rotations=rotate_test))
