"""Omniglot data layer: layouts, errors, preprocessing, cache, splits, batched sampling."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metarl.tasks import omniglot_data as od
from metarl.tasks.omniglot_data import (
    CharInfo,
    DataError,
    OmniglotData,
    OmniglotPool,
    load_omniglot,
    omniglot_pools,
    split_characters,
)
from metarl.types import ConfigError

# the project's shared data sit beside the checkout (../shared), in CI too
SHARED_ZIP = (Path(__file__).resolve().parents[3] / "shared" / "data" / "omniglot"
              / "images_background_small1.zip")
SMALL1_CHARS = 136  # 24 Balinese + 22 Early_Aramaic + 24 Greek + 40 Korean + 26 Latin


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """The cache under tmp_path: tests never write to ~/.cache."""
    monkeypatch.setenv("METARL_CACHE", str(tmp_path / "metarl_cache"))


def cache_files(tmp_path, folder=None):
    """The Omniglot cache files in ``folder`` (default: the autouse $METARL_CACHE/omniglot)."""
    folder = tmp_path / "metarl_cache" / "omniglot" if folder is None else folder
    return sorted(folder.glob("*.pt"))


def listing(root: Path) -> list[tuple[str, int, int]]:
    """Every entry under ``root`` with its size and mtime: what loading must not change."""
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in [root, *root.rglob("*")])


def glyph(seed: int, size: int = 105) -> Image.Image:
    """A mode-"1" image like Omniglot's: white background, black (False) ink blocks."""
    rng = np.random.default_rng(seed)
    a = np.ones((size, size), dtype=bool)
    for _ in range(3):
        r, c = rng.integers(0, size - 30, size=2)
        h, w = rng.integers(5, 30, size=2)
        a[r : r + h, c : c + w] = False
    return Image.fromarray(a)


def make_tree(root: Path, top: str = "images_background", alphabets: dict[str, int] | None = None,
              drawers: int = 20, first_id: int = 1) -> Path:
    """Write ``root/top/<Alphabet>/characterNN/<id>_<drawer>.png``; return the top folder."""
    alphabets = {"Alpha": 3, "Beta": 2} if alphabets is None else alphabets
    char_id = first_id
    for alphabet, n_chars in alphabets.items():
        for c in range(1, n_chars + 1):
            folder = root / top / alphabet / f"character{c:02d}"
            folder.mkdir(parents=True)
            for d in range(1, drawers + 1):
                glyph(char_id * 100 + d).save(folder / f"{char_id:04d}_{d:02d}.png")
            char_id += 1
    return root / top


def zip_tree(top: Path, zip_path: Path) -> Path:
    """Zip a top folder as the official release does (members start with ``top.name/``)."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(top.rglob("*.png")):
            zf.write(f, f.relative_to(top.parent).as_posix())
    return zip_path


@pytest.fixture
def tree_and_zip(tmp_path) -> tuple[Path, Path]:
    top = make_tree(tmp_path / "tree")
    (tmp_path / "zips").mkdir()
    return top, zip_tree(top, tmp_path / "zips" / "images_background.zip")


def same(a: OmniglotData, b: OmniglotData) -> bool:
    return a.chars == b.chars and torch.equal(a.images, b.images)


# ------------------------------------------------------------------------------ layouts


def test_zip_and_unzipped_tree_give_the_same_data(tree_and_zip):
    top, zip_path = tree_and_zip
    data = load_omniglot(zip_path)
    assert data.images.shape == (5, 20, 28, 28) and data.images.dtype == torch.uint8
    assert data.chars[0] == CharInfo("Alpha", "character01", "images_background")
    assert [c.alphabet for c in data.chars] == ["Alpha"] * 3 + ["Beta"] * 2
    sub = data.subset([4, 0])
    assert sub.chars == (data.chars[4], data.chars[0])
    assert torch.equal(sub.images[1], data.images[0])
    for other in (top, top.parent, zip_path.parent, str(zip_path), [zip_path, zip_path]):
        assert same(load_omniglot(other), data), other


def test_preprocessing_is_lanczos_resize_with_ink_high(tmp_path):
    top = make_tree(tmp_path, alphabets={"Alpha": 1})
    png = next(top.rglob("*_01.png"))
    a = np.ones((105, 105), dtype=bool)
    a[:, :50] = False  # left half ink
    Image.fromarray(a).save(png)
    x = load_omniglot(top).images[0, 0]  # [28, 28]
    ref = 255 - np.asarray(Image.open(png).convert("L").resize((28, 28), Image.Resampling.LANCZOS))
    assert torch.equal(x, torch.from_numpy(ref))
    assert (x[:, :10] == 255).all() and (x[:, 17:] == 0).all()  # ink 255, background 0
    assert load_omniglot(top, image_size=14).images.shape == (1, 20, 14, 14)


def test_several_paths_merge_in_a_fixed_order_without_duplicates(tmp_path):
    bg = make_tree(tmp_path / "a")
    ev = zip_tree(make_tree(tmp_path / "b", "images_evaluation", {"Gamma": 2}, first_id=50),
                  tmp_path / "images_evaluation.zip")
    small = make_tree(tmp_path / "c", "images_background_small1", {"Beta": 2}, first_id=4)
    data = load_omniglot([ev, bg])
    assert len(data) == 7
    assert [c.source for c in data.chars] == ["images_background"] * 5 + ["images_evaluation"] * 2
    assert same(load_omniglot([bg, ev]), data)
    assert same(load_omniglot([small, bg, ev]), data)  # Beta kept once, from images_background


def test_folder_of_zips_ignores_other_zips_and_prefers_zip_over_its_tree(tmp_path):
    top = make_tree(tmp_path)
    zip_tree(top, tmp_path / "images_background.zip")
    with zipfile.ZipFile(tmp_path / "strokes_background.zip", "w") as zf:
        zf.writestr("strokes_background/Alpha/character01/0001_01.txt", "strokes")
    (tmp_path / "notes.zip").write_bytes(b"not a zip")
    (tmp_path / "metarl_cache").mkdir()
    data = load_omniglot(tmp_path / "images_background.zip")  # a cache for the zip
    assert same(load_omniglot(tmp_path), data)
    [cache] = cache_files(tmp_path)  # the tree beside its zip was not read
    assert cache.name.startswith("images_background.zip-")


# ------------------------------------------------------------------------------- errors


def test_missing_path_says_where_to_get_the_files(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist: .*github\.com/brendenlake/omniglot"):
        load_omniglot(tmp_path / "nope.zip")
    with pytest.raises(DataError) as e:
        load_omniglot(tmp_path / "nope")
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("python/", "images_background.zip", "images_evaluation.zip", "<Alphabet>/char"):
        assert part in msg
    with pytest.raises(DataError, match="no Omniglot path given"):
        load_omniglot([])


def test_path_without_characters_names_the_expected_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty contains no Omniglot characters: expected"):
        load_omniglot(tmp_path / "empty")
    with zipfile.ZipFile(tmp_path / "images_x.zip", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(DataError, match=r"images_x\.zip contains no Omniglot characters"):
        load_omniglot(tmp_path / "images_x.zip")
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match="neither a zip nor a folder"):
        load_omniglot(tmp_path / "a.png")


def test_truncated_zip_is_named(tree_and_zip, tmp_path):
    _, zip_path = tree_and_zip
    bad = tmp_path / "images_cut.zip"
    bad.write_bytes(zip_path.read_bytes()[:2000])
    with pytest.raises(DataError, match=re.escape(str(bad)) + " is not a readable zip file"):
        load_omniglot(bad)


def test_undecodable_image_is_named_with_its_member(tree_and_zip, tmp_path):
    top, _ = tree_and_zip
    png = top / "Beta" / "character02" / "0005_07.png"
    png.write_bytes(png.read_bytes()[:40])  # truncated PNG
    with pytest.raises(DataError, match=re.escape(str(png)) + ": cannot read image"):
        load_omniglot(top, cache=False)
    png.write_bytes(b"\x89PNG garbage garbage")
    bad = zip_tree(top, tmp_path / "images_bad.zip")
    member = "images_background/Beta/character02/0005_07.png"
    with pytest.raises(DataError, match=re.escape(f"images_bad.zip, member {member}: cannot read")):
        load_omniglot(bad)


def test_character_with_missing_drawings_is_named(tmp_path):
    top = make_tree(tmp_path, alphabets={"Alpha": 2})
    (top / "Alpha" / "character02" / "0002_20.png").unlink()
    with pytest.raises(DataError, match="Alpha/character02 has 19 drawings, expected 20"):
        load_omniglot(top)


# -------------------------------------------------------------------------------- cache


def counting_decoder(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = od._decode_png

    def decode(data: bytes, size: int) -> np.ndarray:
        calls.append(size)
        return original(data, size)

    monkeypatch.setattr(od, "_decode_png", decode)
    return calls


def test_second_load_reads_the_cache(tree_and_zip, tmp_path, monkeypatch):
    _, zip_path = tree_and_zip
    first = load_omniglot(zip_path)
    [cache] = cache_files(tmp_path)
    assert cache.name.endswith(".omniglot28.pt")
    blob = torch.load(cache, weights_only=True)
    assert torch.equal(blob["images"], first.images)

    def boom(data: bytes, size: int) -> np.ndarray:
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(od, "_decode_png", boom)
    assert same(load_omniglot(zip_path), first)


def test_loading_leaves_the_data_folders_untouched(tmp_path):
    data_root = tmp_path / "data"
    top = make_tree(data_root / "tree")
    (data_root / "zips").mkdir()
    zip_tree(top, data_root / "zips" / "images_background.zip")
    before = listing(data_root)
    for path in (top, data_root / "zips", data_root / "zips" / "images_background.zip"):
        for _ in range(2):  # building the cache, then reading it
            load_omniglot(path)
            load_omniglot(path, image_size=14)
    assert listing(data_root) == before
    # one cache file per source and image size, all in the cache folder
    names = [p.name for p in cache_files(tmp_path)]
    assert len(names) == 4 and sum(n.startswith("images_background.zip-") for n in names) == 2


def test_cache_folder_from_metarl_cache_then_xdg_then_home(tree_and_zip, tmp_path, monkeypatch):
    _, zip_path = tree_and_zip
    first = load_omniglot(zip_path)
    assert od.cache_folder() == tmp_path / "metarl_cache" / "omniglot"
    assert len(cache_files(tmp_path)) == 1
    monkeypatch.setenv("METARL_CACHE", str(tmp_path / "env"))
    assert same(load_omniglot(zip_path), first)
    assert len(cache_files(tmp_path, tmp_path / "env" / "omniglot")) == 1
    monkeypatch.delenv("METARL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert od.cache_folder() == tmp_path / "xdg" / "metarl" / "omniglot"
    load_omniglot(zip_path)
    assert len(cache_files(tmp_path, tmp_path / "xdg" / "metarl" / "omniglot")) == 1
    for xdg in ("", "relative/cache"):  # unset or relative (invalid per XDG): the home default
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
        assert od.cache_folder() == tmp_path / "home" / ".cache" / "metarl" / "omniglot"
    load_omniglot(zip_path)
    assert len(cache_files(tmp_path, tmp_path / "home" / ".cache" / "metarl" / "omniglot")) == 1
    # the cache_dir option wins over all of them, and holds the files itself
    mine = tmp_path / "mine"
    monkeypatch.setenv("METARL_CACHE", str(tmp_path / "env2"))
    assert same(load_omniglot(zip_path, cache_dir=mine), first)
    assert len(cache_files(tmp_path, mine)) == 1 and not (tmp_path / "env2").exists()


def test_two_data_sets_of_the_same_name_do_not_share_a_cache(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = zip_tree(make_tree(tmp_path / "ta"), tmp_path / "a" / "images_background.zip")
    b = zip_tree(make_tree(tmp_path / "tb", alphabets={"Gamma": 2}, first_id=40),
                 tmp_path / "b" / "images_background.zip")
    da, db = load_omniglot(a), load_omniglot(b)
    assert len(cache_files(tmp_path)) == 2 and len(da) == 5 and len(db) == 2
    calls = counting_decoder(monkeypatch)
    assert same(load_omniglot(a), da) and same(load_omniglot(b), db) and calls == []
    # a changed source gets a new file; its earlier state's file is removed
    zip_tree(make_tree(tmp_path / "tc", alphabets={"Delta": 1}, first_id=70), a)
    assert len(load_omniglot(a)) == 1 and len(calls) == 20
    assert len(cache_files(tmp_path)) == 2
    assert same(load_omniglot(b), db) and len(calls) == 20


def test_cache_is_rebuilt_when_options_or_content_change(tree_and_zip, monkeypatch):
    top, zip_path = tree_and_zip
    calls = counting_decoder(monkeypatch)
    for path in (zip_path, top):
        first = load_omniglot(path)
        assert len(calls) == 100
        load_omniglot(path)
        assert len(calls) == 100  # cached
        assert load_omniglot(path, image_size=14).images.shape[-1] == 14
        assert len(calls) == 200  # new size: decoded again
        calls.clear()
    png = top / "Alpha" / "character01" / "0001_01.png"
    glyph(12345).save(png)
    os.utime(png, ns=(10**18, 10**18))  # new content (size and mtime) for the tree's key
    zip_tree(top, zip_path)
    for path in (zip_path, top):
        data = load_omniglot(path)
        assert len(calls) == 100
        assert not torch.equal(data.images[0, 0], first.images[0, 0])
        assert torch.equal(data.images[1:], first.images[1:])
        calls.clear()


def test_corrupt_cache_is_rebuilt(tree_and_zip, monkeypatch):
    _, zip_path = tree_and_zip
    first = load_omniglot(zip_path)
    [cache] = cache_files(zip_path.parent.parent)
    calls = counting_decoder(monkeypatch)
    for junk in (b"garbage", cache.read_bytes()[:1000]):
        cache.write_bytes(junk)
        assert same(load_omniglot(zip_path), first)
    torch.save({"key": "x"}, cache)  # readable, stale
    assert same(load_omniglot(zip_path), first)
    assert len(calls) == 300
    assert torch.equal(torch.load(cache, weights_only=True)["images"], first.images)


def test_unwritable_cache_folder_loads_without_caching(tree_and_zip, tmp_path, monkeypatch,
                                                       caplog):
    _, zip_path = tree_and_zip
    ref = load_omniglot(zip_path, cache=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)  # no write bit: respected even by root
    calls = counting_decoder(monkeypatch)
    try:
        for folder in (blocker / "cache", read_only):
            monkeypatch.setenv("METARL_CACHE", str(folder))
            caplog.clear()
            with caplog.at_level("WARNING", logger=od.__name__):
                assert same(load_omniglot(zip_path), ref)
            assert "loaded without caching" in caplog.text and "METARL_CACHE" in caplog.text
        assert list(read_only.iterdir()) == [] and len(calls) == 200  # decoded each time
    finally:
        read_only.chmod(0o755)


def test_failed_cache_write_leaves_no_partial_file(tree_and_zip, tmp_path, monkeypatch):
    _, zip_path = tree_and_zip
    real_save = torch.save

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    data = load_omniglot(zip_path)  # cache failure is not fatal
    assert len(data) == 5
    leftovers = [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".tmp")]
    assert leftovers == []
    # an interrupted rewrite keeps the previous file whole
    target = tmp_path / "c.pt"
    real_save({"ok": torch.ones(2)}, target)
    monkeypatch.setattr(torch, "save", lambda obj, f: (f.write(b"x"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        od._save_atomic({"new": 1}, target)
    assert torch.load(target, weights_only=True)["ok"].sum() == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["c.pt"]


# ------------------------------------------------------------------------------- splits


def chars_of(alphabet_sizes: list[int]) -> tuple[CharInfo, ...]:
    return tuple(CharInfo(f"A{a:02d}", f"character{c:02d}", "images_background")
                 for a, n in enumerate(alphabet_sizes) for c in range(1, n + 1))


def check_partition(train: torch.Tensor, test: torch.Tensor, n: int) -> None:
    assert train.dtype == test.dtype == torch.long
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(n))


def test_character_split_default_is_the_papers_1200_and_deterministic():
    rng = np.random.default_rng(0)
    sizes = list(rng.multinomial(1623 - 50 * 14, [1 / 50] * 50) + 14)
    chars = chars_of(sizes)
    assert len(chars) == 1623
    train, test = split_characters(chars)
    assert (len(train), len(test)) == (1200, 423)
    check_partition(train, test, 1623)
    again, _ = split_characters(chars, seed=0)
    other, _ = split_characters(chars, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)
    assert len(split_characters(chars_of([136]))[0]) == 101  # small1: 136 -> 101 / 35
    assert len(split_characters(chars, n_train=1000)[0]) == 1000
    assert len(split_characters(chars, train_fraction=0.5)[0]) == 812


def test_alphabet_split_keeps_alphabets_whole():
    chars = chars_of([10, 20, 30, 40, 5, 15])
    train, test = split_characters(chars, split="alphabet", seed=3)
    check_partition(train, test, len(chars))
    a_train = {chars[i].alphabet for i in train.tolist()}
    a_test = {chars[i].alphabet for i in test.tolist()}
    assert a_train and a_test and not a_train & a_test
    assert abs(len(train) - round(120 * 1200 / 1623)) <= 20
    assert torch.equal(train, split_characters(chars, split="alphabet", seed=3)[0])


def test_all_test_split_and_bad_arguments():
    chars = chars_of([4, 4])
    train, test = split_characters(chars, split="all_test")
    assert len(train) == 0 and torch.equal(test, torch.arange(8))
    with pytest.raises(ValueError, match="split='font'"):
        split_characters(chars, split="font")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        split_characters(chars, n_train=2, train_fraction=0.5)
    with pytest.raises(ValueError, match=r"n_train=9: expected 0\.\.8"):
        split_characters(chars, n_train=9)
    with pytest.raises(ValueError, match=r"train_fraction=1.5"):
        split_characters(chars, train_fraction=1.5)


# ---------------------------------------------------------------------------- sampling


def random_pool(n_chars: int = 7, size: int = 6, rotations: bool = True) -> OmniglotPool:
    g = torch.Generator().manual_seed(0)
    return OmniglotPool(torch.randint(0, 256, (n_chars, 20, size, size), generator=g,
                                      dtype=torch.uint8), rotations=rotations)


def test_rotated_classes_match_pil_rotations():
    arrow = np.zeros((28, 28), dtype=np.uint8)  # asymmetric: an L with a dot
    arrow[2:20, 4] = 255
    arrow[19, 4:15] = 255
    arrow[5, 20] = 128
    images = torch.from_numpy(arrow).expand(2, 20, 28, 28).contiguous()
    classes = OmniglotPool(images).class_images()  # [8, 20, 28, 28]
    assert classes.shape == (8, 20, 28, 28)
    pil = Image.fromarray(arrow)
    for k, op in enumerate([None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                            Image.Transpose.ROTATE_270]):
        ref = torch.from_numpy(np.asarray(pil if op is None else pil.transpose(op)).copy())
        assert torch.equal(classes[4 + k, 3], ref), k  # counter-clockwise, class 4*char+k
    assert classes[1, 0, 28 - 1 - 20, 5] == 128  # 90 degrees: (r, c) -> (S-1-c, r)
    assert OmniglotPool(images, rotations=False).n_classes == 2


def test_sampled_tasks_have_right_shapes_and_consistent_labels():
    pool = random_pool()
    T, N, K, Q = 6, 5, 2, 3
    batch = pool.sample(T, N, K, Q, torch.Generator().manual_seed(1))
    assert batch.x_support.shape == (T, N * K, 1, 6, 6)
    assert batch.x_query.shape == (T, N * Q, 1, 6, 6)
    assert batch.x_support.dtype == torch.float32 and batch.y_support.dtype == torch.long
    assert 0 <= batch.x_support.min() and batch.x_query.max() <= 1
    assert torch.equal(batch.y_support[2], torch.arange(N).repeat_interleave(K))
    assert torch.equal(batch.y_query[5], torch.arange(N).repeat_interleave(Q))
    # match every image back to its (class, drawer) in the pool
    where = {img.numpy().tobytes(): (c, d) for c, imgs in enumerate(pool.class_images())
             for d, img in enumerate(imgs)}

    def lookup(x: torch.Tensor) -> tuple[int, int]:
        return where[(x[0] * 255).round().to(torch.uint8).numpy().tobytes()]

    for t in range(T):
        found = {n: [] for n in range(N)}
        images = torch.cat([batch.x_support[t], batch.x_query[t]])  # [N*K + N*Q, 1, S, S]
        labels = torch.cat([batch.y_support[t], batch.y_query[t]])
        for x, y in zip(images, labels):
            found[int(y)].append(lookup(x))
        classes = []
        for n, hits in found.items():
            assert len({c for c, _ in hits}) == 1  # support and query: one class per label
            assert len({d for _, d in hits}) == K + Q  # distinct drawers
            assert [d for _, d in hits] == batch.drawers[t, n].tolist()
            classes.append(hits[0][0])
        assert len(set(classes)) == N and classes == batch.classes[t].tolist()


def test_sampling_is_random_but_reproducible():
    pool = random_pool(n_chars=30)
    a = pool.sample(8, 5, 1, 1, torch.Generator().manual_seed(0))
    b = pool.sample(8, 5, 1, 1, torch.Generator().manual_seed(0))
    c = pool.sample(8, 5, 1, 1, torch.Generator().manual_seed(1))
    assert torch.equal(a.x_query, b.x_query) and not torch.equal(a.classes, c.classes)
    assert len({tuple(r) for r in a.classes.tolist()}) == 8  # tasks differ
    assert (a.classes % 4 != 0).any()  # rotated classes are drawn
    x64 = pool.sample(2, 3, 1, 0, torch.Generator(), dtype=torch.float64)
    assert x64.x_support.dtype == torch.float64 and x64.x_query.shape == (2, 0, 1, 6, 6)


def test_sampling_errors_name_the_fix():
    pool = random_pool(n_chars=2, rotations=False)
    g = torch.Generator()
    with pytest.raises(ValueError, match="ways=3 but the pool has 2 classes"):
        pool.sample(1, 3, 1, 1, g)
    with pytest.raises(ValueError, match="shots \\+ query = 21 but each character has 20"):
        pool.sample(1, 2, 1, 20, g)
    with pytest.raises(ValueError, match="shots=0"):
        pool.sample(1, 2, 0, 1, g)
    with pytest.raises(TypeError, match="expected torch.Generator"):
        pool.sample(1, 2, 1, 1, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected uint8"):
        OmniglotPool(torch.zeros(2, 20, 6, 6))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_on_cuda_matches_cpu():
    pool = random_pool(n_chars=30)
    cpu = pool.sample(4, 5, 1, 2, torch.Generator().manual_seed(0))
    gpu = pool.sample(4, 5, 1, 2, torch.Generator().manual_seed(0), device="cuda")
    assert gpu.x_support.is_cuda and torch.equal(gpu.x_query.cpu(), cpu.x_query)
    on_gpu = pool.sample(4, 5, 1, 2, torch.Generator("cuda").manual_seed(0), device="cuda")
    assert on_gpu.x_support.shape == (4, 5, 1, 6, 6)


# ---------------------------------------------------------------------------- real data


@pytest.mark.skipif(not SHARED_ZIP.is_file(), reason=f"{SHARED_ZIP} absent (shared Omniglot split)")
def test_shared_background_small1_split(tmp_path):
    data = load_omniglot(SHARED_ZIP)
    assert data.images.shape == (SMALL1_CHARS, 20, 28, 28)
    alphabets = {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}
    assert {c.alphabet for c in data.chars} == alphabets
    assert {c.source for c in data.chars} == {"images_background_small1"}
    ink = data.images.float().mean() / 255
    assert 0.02 < ink < 0.25  # strokes are a minority of pixels: ink is high
    assert not list(SHARED_ZIP.parent.glob("*.pt"))  # read-only data folder untouched
    assert same(load_omniglot(SHARED_ZIP), data)  # from the cache
    train, test = omniglot_pools(data)
    assert (train.n_chars, test.n_chars, train.n_classes) == (101, 35, 404)
    batch = train.sample(4, 20, 5, 5, torch.Generator().manual_seed(0))
    assert batch.x_support.shape == (4, 100, 1, 28, 28)
    a_train, a_test = omniglot_pools(data, split="alphabet", rotate_test=False)
    assert a_test.n_classes == a_test.n_chars and a_train.n_chars + a_test.n_chars == SMALL1_CHARS


@pytest.mark.skipif(not SHARED_ZIP.is_file(), reason=f"{SHARED_ZIP} absent (shared Omniglot split)")
@pytest.mark.parametrize("split", ["character", "alphabet"])
def test_validation_classes_come_from_the_meta_train_side(split):
    from metarl.tasks.omniglot import OmniglotFamily

    def rows(pool):  # each character's 20 drawings (rotation 0) as one row of bytes
        return {bytes(x.numpy()) for x in pool.images}

    train, test = (rows(p) for p in OmniglotFamily(str(SHARED_ZIP), split=split).pools)
    keep, val = (rows(p) for p in OmniglotFamily(str(SHARED_ZIP), split=split,
                                                 val_fraction=0.25).pools)
    assert keep | val == train and not keep & val and not (keep | val) & test
    assert 0.15 < len(val) / len(train) < 0.45
    with pytest.raises(ConfigError, match="val_fraction=0.999 leaves"):
        _ = OmniglotFamily(str(SHARED_ZIP), split=split, val_fraction=0.999).pools


@pytest.mark.skipif(not SHARED_ZIP.is_file(), reason=f"{SHARED_ZIP} absent (shared Omniglot split)")
def test_train_shots_give_meta_training_tasks_more_support_images():
    from metarl.tasks.omniglot import OmniglotFamily

    fam = OmniglotFamily(str(SHARED_ZIP), shots=1, query=15, train_shots=10)
    g = torch.Generator().manual_seed(0)
    train = fam.sample_batch(3, g, split="train")
    test = fam.sample_batch(3, g, split="test")
    assert train.support.x.shape[:2] == (3, 50) and train.query.x.shape[:2] == (3, 50)
    assert test.support.x.shape[:2] == (3, 5) and test.query.x.shape[:2] == (3, 75)
    assert fam.options()["train_shots"] == 10
    # each training class: 10 support and 10 query drawings, none of them shared
    for t in range(3):
        for c in range(5):
            sup = {bytes(x.numpy()) for x in train.support.x[t][train.support.y[t] == c]}
            qry = {bytes(x.numpy()) for x in train.query.x[t][train.query.y[t] == c]}
            assert len(sup) == 10 and len(qry) == 10 and not sup & qry
    plain = OmniglotFamily(str(SHARED_ZIP), shots=1, query=15).sample_batch(1, g, split="train")
    assert plain.support.x.shape[1] == 5


@pytest.mark.skipif(not SHARED_ZIP.is_file(), reason=f"{SHARED_ZIP} absent (shared Omniglot split)")
def test_inner_batch_gives_training_steps_minibatches_of_the_support_set():
    """Reptile's protocol: 10 of the 5 x 10 training support images per inner step, every
    image once in 5 steps; test tasks adapt on their whole support set."""
    from metarl.tasks.omniglot import OmniglotFamily

    fam = OmniglotFamily(str(SHARED_ZIP), shots=1, query=15, train_shots=10, inner_batch=10)
    assert fam.options()["inner_batch"] == 10
    g = torch.Generator().manual_seed(0)
    train = fam.sample_batch(2, g, split="train")
    steps = [train.inner_data_at(None, j) for j in range(5)]
    assert all(d.x.shape[:2] == (2, 10) for d in steps)
    for t in range(2):
        seen = sorted(bytes(x.numpy()) for d in steps for x in d.x[t])
        assert seen == sorted(bytes(x.numpy()) for x in train.support.x[t])
    test = fam.sample_batch(2, g, split="test")
    assert test.plan is None and test.inner_data_at(None, 0) is test.support
    # drawing the plan's seed only with inner_batch leaves the other streams as they were
    a = OmniglotFamily(str(SHARED_ZIP), shots=1, query=15, train_shots=10).sample_batch(
        2, torch.Generator().manual_seed(0), split="train")
    assert torch.equal(a.support.x, train.support.x)


@pytest.mark.parametrize("kw, match", [
    (dict(inner_batch=0), "inner_batch must be >= 1"),
    (dict(train_shots=0), "train_shots must be >= 1"),
    (dict(train_shots=20), "train_shots must be <= 19"),
    (dict(shots=6, query=15), "shots must be <= 5"),
])
def test_bad_shot_counts_are_refused_before_any_data_is_read(kw, match):
    from metarl.tasks.omniglot import OmniglotFamily

    with pytest.raises(ConfigError, match=match):
        OmniglotFamily("/nonexistent", **kw)
