"""Tests for attenuation.data: locating, loading (safely) and batching CIFAR-10."""

import os
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attenuation import data
from attenuation.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataFormatError,
    DataNotFoundError,
    DeviceLoader,
    download_cifar10,
    find_cifar10,
    hold_out,
    load_cifar10,
    resolve_cifar10,
    subset,
    validation_indices,
)

SHARED_NPZ = Path("/work/shared/data/cifar10.npz")


# --------------------------------------------------------------------------- fixtures


def _arrays(n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }


def _write_npz(path: Path, **overrides) -> Path:
    arrays = _arrays()
    arrays.update(overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _write_folder(path: Path, per_batch=3, batches=None) -> Path:
    """A tiny ``cifar-10-batches-py`` folder; ``batches`` overrides individual files' dicts."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [(i + j) % 10 for j in range(per_batch)],
            b"batch_label": name.encode(),
        }
        batch = (batches or {}).get(name, batch)
        with open(path / name, "wb") as f:
            pickle.dump(batch, f, protocol=4)
    return path


def _read_folder(path: Path):
    """The folder's contents, read back with plain pickle (fine: this test wrote them)."""
    def read(name):
        with open(path / name, "rb") as f:
            return pickle.load(f)
    train = [read(f"data_batch_{k}") for k in range(1, 6)]
    test = read("test_batch")
    x_train = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    y_train = np.concatenate([b[b"labels"] for b in train])
    return x_train, y_train, test[b"data"].reshape(-1, 3, 32, 32), np.array(test[b"labels"])


def _py2_batch_pickle(images: np.ndarray, labels: list[int]) -> bytes:
    """A batch file byte-for-byte in the style Python 2's cPickle wrote the real ones.

    Strings are py2 ``str`` (BINSTRING) and the array names ``numpy.core.multiarray``: the
    forms the restricted unpickler must accept for the official download to load.
    """
    def s(b):
        return b"T" + struct.pack("<i", len(b)) + b

    def i(v):
        return b"J" + struct.pack("<i", v)

    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
             + b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85"
             + s(b"b") + b"\x87R(" + i(1) + i(images.shape[0]) + i(images.shape[1]) + b"\x86"
             + dtype + b"\x89" + s(images.tobytes()) + b"tb")
    label_list = b"](" + b"".join(i(v) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + label_list + b"u."


# --------------------------------------------------------------------------- resolve


def test_resolve_explicit_forms(tmp_path, no_defaults):
    npz = _write_npz(tmp_path / "a" / "cifar10.npz")
    folder = _write_folder(tmp_path / "b" / "cifar-10-batches-py")
    renamed = _write_folder(tmp_path / "renamed")
    assert resolve_cifar10(npz) == npz.resolve()
    assert resolve_cifar10(str(npz.parent)) == npz.resolve()
    assert resolve_cifar10(folder) == folder.resolve()
    assert resolve_cifar10(folder.parent) == folder.resolve()
    assert resolve_cifar10(renamed) == renamed.resolve()


def test_explicit_path_beats_env_var(tmp_path, no_defaults, monkeypatch):
    explicit = _write_npz(tmp_path / "explicit.npz")
    monkeypatch.setenv(data.ENV_VAR, str(_write_npz(tmp_path / "env.npz")))
    assert resolve_cifar10(explicit) == explicit.resolve()
    assert resolve_cifar10() == (tmp_path / "env.npz").resolve()


def test_env_var_beats_defaults(tmp_path, no_defaults, monkeypatch):
    _write_npz(tmp_path / "cwd" / "data" / "cifar10.npz")
    env_folder = _write_folder(tmp_path / "envdir" / "cifar-10-batches-py")
    monkeypatch.setenv(data.ENV_VAR, str(env_folder.parent))
    assert resolve_cifar10() == env_folder.resolve()


@pytest.mark.parametrize("origin", ["explicit", "env"])
def test_missing_user_path_is_an_error_not_a_fallback(tmp_path, no_defaults, monkeypatch, origin):
    _write_npz(tmp_path / "cwd" / "data" / "cifar10.npz")  # a default that must not be used
    missing = tmp_path / "nope.npz"
    if origin == "env":
        monkeypatch.setenv(data.ENV_VAR, str(missing))
    with pytest.raises(DataNotFoundError, match="does not exist") as info:
        resolve_cifar10(missing if origin == "explicit" else None)
    assert str(missing) in str(info.value)


def test_user_folder_without_data_is_an_error(tmp_path, no_defaults):
    with pytest.raises(DataNotFoundError, match="neither"):
        resolve_cifar10(tmp_path / "cwd")


def test_defaults_in_order(tmp_path, no_defaults):
    cache = tmp_path / "home" / ".cache" / "attenuation"
    cache_folder = _write_folder(cache / "cifar-10-batches-py")
    assert resolve_cifar10() == cache_folder.resolve()
    cache_npz = _write_npz(cache / "cifar10.npz")
    assert resolve_cifar10() == cache_npz.resolve()
    repo_npz = _write_npz(tmp_path / "shared" / "data" / "cifar10.npz")  # repo/../shared
    assert resolve_cifar10() == repo_npz.resolve()
    (tmp_path / "cwd" / "sub").mkdir()
    os.chdir(tmp_path / "cwd" / "sub")  # monkeypatch.chdir in the fixture restores the cwd
    sibling_npz = _write_npz(tmp_path / "cwd" / "shared" / "data" / "cifar10.npz")
    assert resolve_cifar10() == sibling_npz.resolve()
    local_npz = _write_npz(tmp_path / "cwd" / "sub" / "data" / "cifar10.npz")
    assert resolve_cifar10() == local_npz.resolve()


def test_not_found_lists_places_and_remedies(tmp_path, no_defaults):
    with pytest.raises(DataNotFoundError) as info:
        resolve_cifar10()
    message = str(info.value)
    for place in data._default_locations():
        assert str(place) in message
    for remedy in ("--data PATH", data.ENV_VAR, "attenuation run --download"):
        assert remedy in message


# --------------------------------------------------------------------------- download


def test_download_failure_is_wrapped(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataNotFoundError, match="download.*failed.*--data PATH"):
        download_cifar10(tmp_path)


def test_download_fetches_both_splits(tmp_path, monkeypatch):
    import torchvision

    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10",
                        lambda root, train, download: calls.append((root, train, download)))
    assert download_cifar10(tmp_path) == (tmp_path / "cifar-10-batches-py").resolve()
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]


@pytest.fixture
def fake_torchvision(monkeypatch):
    """torchvision's CIFAR10 replaced: it writes a tiny batches folder into its root, or raises
    ``fail`` when set; ``calls`` records each (root, train, download)."""
    import torchvision

    fake = SimpleNamespace(calls=[], fail=None)

    def cifar10(root, train, download):
        fake.calls.append((root, train, download))
        if fake.fail is not None:
            raise fake.fail
        folder = Path(root) / "cifar-10-batches-py"
        if not folder.exists():
            _write_folder(folder)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", cifar10)
    return fake


def test_find_downloads_and_announces_when_nothing_is_found(no_defaults, fake_torchvision, capsys):
    cache = no_defaults / "home" / ".cache" / "attenuation"
    found = find_cifar10()
    assert found == (cache / "cifar-10-batches-py").resolve()
    assert [train for _, train, _ in fake_torchvision.calls] == [True, False]
    assert f"downloading CIFAR-10 with torchvision into {cache}" in capsys.readouterr().err
    assert load_cifar10(found).x_train.shape == (15, 3, 32, 32)
    fake_torchvision.calls.clear()
    assert find_cifar10() == found and fake_torchvision.calls == []  # found in the cache next time


def test_find_offline_lists_places_and_how_to_provide(no_defaults, fake_torchvision):
    fake_torchvision.fail = OSError("network unreachable")
    with pytest.raises(DataNotFoundError) as info:
        find_cifar10()
    message = str(info.value)
    assert "downloading it into" in message and "OSError: network unreachable" in message
    for place in data._default_locations():
        assert str(place) in message
    for remedy in ("--data PATH", data.ENV_VAR, "cifar10.npz", "cifar-10-batches-py"):
        assert remedy in message


@pytest.mark.parametrize("origin", ["explicit", "env"])
def test_find_never_downloads_instead_of_a_named_place(tmp_path, no_defaults, fake_torchvision,
                                                       monkeypatch, origin):
    missing = tmp_path / "nope.npz"
    if origin == "env":
        monkeypatch.setenv(data.ENV_VAR, str(missing))
    with pytest.raises(DataNotFoundError, match="does not exist"):
        find_cifar10(missing if origin == "explicit" else None)
    assert fake_torchvision.calls == []


def test_find_uses_local_data_and_download_forces_a_download(no_defaults, fake_torchvision, capsys):
    local = _write_npz(no_defaults / "cwd" / "data" / "cifar10.npz")
    assert find_cifar10() == local.resolve() and fake_torchvision.calls == []
    cache = no_defaults / "home" / ".cache" / "attenuation"
    assert find_cifar10(download=True) == (cache / "cifar-10-batches-py").resolve()
    assert len(fake_torchvision.calls) == 2 and "downloading" in capsys.readouterr().err


# --------------------------------------------------------------------------- load


def test_load_npz(tmp_path):
    arrays = _arrays()
    path = _write_npz(tmp_path / "c.npz", **arrays)
    ds = load_cifar10(path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_train.is_contiguous() and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.x_train, torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))
    assert torch.equal(ds.x_test, torch.from_numpy(arrays["x_test"]).permute(0, 3, 1, 2))
    assert ds.y_test.tolist() == arrays["y_test"].tolist()
    assert ds.source == f"npz file {path.resolve()}"


@pytest.mark.parametrize("overrides, message", [
    ({"y_test": None}, r"missing key\(s\) \['y_test'\]"),
    ({"x_train": np.zeros((20, 3, 32, 32), np.uint8)}, r"x_train has shape \(20, 3, 32, 32\)"),
    ({"x_test": np.zeros((10, 32, 32, 3), np.float32)}, "x_test has dtype float32"),
    ({"y_train": np.full(20, 10, np.uint8)}, r"y_train: labels must lie in \[0, 9\]"),
    ({"y_test": np.full(10, -1, np.int16)}, r"y_test: labels must lie in \[0, 9\]"),
    ({"y_train": np.zeros(19, np.uint8)}, "y_train: 19 labels for 20 images"),
    ({"y_train": np.zeros((20, 1), np.uint8)}, "y_train: expected a 1-D integer array"),
])
def test_bad_npz_content(tmp_path, overrides, message):
    path = _write_npz(tmp_path / "c.npz", **overrides)
    with pytest.raises(DataFormatError, match=message):
        load_cifar10(path)


def test_corrupt_npz(tmp_path):
    path = _write_npz(tmp_path / "c.npz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataFormatError, match="not a readable .npz") as info:
        load_cifar10(path)
    assert str(path) in str(info.value)
    path.write_bytes(b"definitely not a zip archive")
    with pytest.raises(DataFormatError, match="not a readable .npz"):
        load_cifar10(path)


def test_load_folder(tmp_path):
    folder = _write_folder(tmp_path / "cifar-10-batches-py")
    ds = load_cifar10(folder)
    x_train, y_train, x_test, y_test = _read_folder(folder)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert torch.equal(ds.x_train, torch.from_numpy(x_train))
    assert torch.equal(ds.x_test, torch.from_numpy(x_test))
    assert ds.y_train.tolist() == y_train.tolist() and ds.y_test.tolist() == y_test.tolist()
    assert ds.y_train.dtype == torch.int64 and ds.x_test.is_contiguous()
    assert ds.source == f"torchvision cifar-10-batches-py {folder.resolve()}"


def test_load_python2_style_batches(tmp_path):
    folder = _write_folder(tmp_path / "cifar-10-batches-py")
    images = np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)
    (folder / "test_batch").write_bytes(_py2_batch_pickle(images, [3, 7]))
    ds = load_cifar10(folder)
    assert torch.equal(ds.x_test, torch.from_numpy(images.reshape(2, 3, 32, 32)))
    assert ds.y_test.tolist() == [3, 7]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    folder = _write_folder(tmp_path / "cifar-10-batches-py")
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Exploit(marker)}, protocol=4))
    with pytest.raises(DataFormatError, match=r"refusing to unpickle (posix|nt)\.system"):
        load_cifar10(folder)
    assert not marker.exists()


@pytest.mark.parametrize("batch, message", [
    ({b"data": np.zeros((3, 3072), np.int32), b"labels": [0, 1, 2]}, "b'data' is .* int32"),
    ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, "2 labels for 3 images"),
    ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 12]}, r"lie in \[0, 9\]"),
    ({b"labels": [0, 1, 2]}, "expected a dict with keys"),
])
def test_bad_batch_content(tmp_path, batch, message):
    folder = _write_folder(tmp_path / "cifar-10-batches-py", batches={"data_batch_3": batch})
    with pytest.raises(DataFormatError, match=message) as info:
        load_cifar10(folder)
    assert "data_batch_3" in str(info.value)


def test_missing_or_truncated_batch(tmp_path):
    folder = _write_folder(tmp_path / "cifar-10-batches-py")
    blob = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataFormatError, match="data_batch_2: not a readable"):
        load_cifar10(folder)
    (folder / "data_batch_2").unlink()
    with pytest.raises(DataFormatError, match="missing batch file data_batch_2"):
        load_cifar10(folder)


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_split_is_refused(tmp_path, split):
    empty = {f"x_{split}": np.zeros((0, 32, 32, 3), np.uint8), f"y_{split}": np.zeros(0, np.uint8)}
    path = _write_npz(tmp_path / "c.npz", **empty)
    word = "training" if split == "train" else "test"
    with pytest.raises(DataFormatError, match=f"holds no {word} images") as info:
        load_cifar10(path)
    assert str(path.resolve()) in str(info.value)


def test_load_missing_path(tmp_path):
    with pytest.raises(DataNotFoundError, match="nope"):
        load_cifar10(tmp_path / "nope")


# --------------------------------------------------------------------------- subset


def test_subset_is_class_balanced_and_ordered(tmp_path):
    arrays = _arrays(n_train=100, n_test=30)
    arrays["y_train"] = np.random.default_rng(0).integers(0, 10, 100).astype(np.uint8)
    arrays["y_train"][:40] = 0  # the plain first 25 would be all class 0
    ds = load_cifar10(_write_npz(tmp_path / "c.npz", **arrays))
    small = subset(ds, 25, 30)
    counts = torch.bincount(small.y_train, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 25
    picked = [i for i in range(100) if any(torch.equal(ds.x_train[i], x) for x in small.x_train)]
    assert len(picked) == 25  # images stay paired with their labels, in original order
    assert torch.equal(small.x_train, ds.x_train[picked])
    assert torch.equal(small.y_train, ds.y_train[picked])
    assert torch.equal(small.x_test, ds.x_test)  # all of the test split
    assert small.source.startswith(ds.source) and "subset 25 train / 30 test" in small.source
    with pytest.raises(ValueError, match="n_test=31"):
        subset(ds, 10, 31)


# --------------------------------------------------------------------------- validation split


def _shuffled_labels(n, seed):
    """``n`` labels, every class 20 to 30 times (n >= 300), in a random order."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(rng.integers(20, 31), c) for c in range(10)])
    labels = np.concatenate([labels, rng.integers(0, 10, n - len(labels))])
    return torch.from_numpy(rng.permutation(labels).astype(np.int64))


@pytest.mark.parametrize("n", [10, 70, 123, 199])
def test_validation_split_is_class_balanced_and_fixed_by_the_seed(n):
    labels = _shuffled_labels(300, seed=n)
    held = validation_indices(labels, n, seed=4)
    assert held.tolist() == sorted(set(held.tolist())) and len(held) == n  # ascending, no repeats
    counts = torch.bincount(labels[held], minlength=10)
    base, extra = divmod(n, 10)
    assert int((counts == base + 1).sum()) == extra and int((counts == base).sum()) == 10 - extra
    assert torch.equal(validation_indices(labels, n, seed=4), held)
    others = [validation_indices(labels, n, seed=s) for s in range(5, 9)]
    assert all(not torch.equal(other, held) for other in others)
    # within a class the images are drawn, not the first ones taken
    first = torch.cat([torch.nonzero(labels == c).flatten()[:int(counts[c])] for c in range(10)]).sort().values
    assert not torch.equal(held, first)


def test_validation_split_does_not_touch_the_global_rng():
    labels = _shuffled_labels(300, seed=0)
    before = torch.get_rng_state()
    validation_indices(labels, 50, seed=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_hold_out_moves_the_images_out_of_training(tmp_path):
    arrays = _arrays(n_train=300, n_test=30)
    arrays["y_train"] = _shuffled_labels(300, seed=1).numpy().astype(np.uint8)
    ds = load_cifar10(_write_npz(tmp_path / "c.npz", **arrays))
    split = hold_out(ds, 40, seed=3)
    held = validation_indices(ds.y_train, 40, seed=3)
    kept = sorted(set(range(300)) - set(held.tolist()))
    assert torch.equal(split.x_val, ds.x_train[held]) and torch.equal(split.y_val, ds.y_train[held])
    assert torch.equal(split.x_train, ds.x_train[kept]) and torch.equal(split.y_train, ds.y_train[kept])
    assert torch.equal(split.x_test, ds.x_test) and torch.equal(split.y_test, ds.y_test)
    assert "40 training images held out for validation (seed 3)" in split.source
    assert ds.x_val is None and split.source.startswith(ds.source)


def test_bad_validation_splits_are_refused():
    labels = torch.arange(100) % 10
    for n in (-1, 100, 101):
        with pytest.raises(ValueError, match=f"validation split of {n} images needs 0 <= n < the 100"):
            validation_indices(labels, n, seed=0)
    labels[labels == 3] = 4  # class 3 has no image at all
    with pytest.raises(ValueError, match="class 3 has 0 training images, fewer than the 1"):
        validation_indices(labels, 10, seed=0)
    lopsided = torch.cat([torch.zeros(50, dtype=torch.int64), torch.arange(1, 10).repeat(2)])
    with pytest.raises(ValueError, match="only 1 classes have more than 2"):
        validation_indices(lopsided, 25, seed=0)


# --------------------------------------------------------------------------- loader


def _normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images_uint8.float() / 255 - mean) / std


def _reference_crop_flip(image: torch.Tensor, offset, flip) -> torch.Tensor:
    """Per-image crop and flip, written the obvious way."""
    padded = np.pad(image.numpy(), ((0, 0), (4, 4), (4, 4)))
    r, c = int(offset[0]), int(offset[1])
    out = padded[:, r:r + 32, c:c + 32]
    return torch.from_numpy(np.ascontiguousarray(out[:, :, ::-1] if flip else out))


def _images(n, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_crop_flip_matches_per_image_reference():
    images = _images(64)
    offsets, flips = data._draw_augmentation(64, torch.Generator().manual_seed(3))
    assert offsets.min() == 0 and offsets.max() == 8 and flips.any() and not flips.all()
    out = data._crop_flip(images, offsets, flips)
    expected = torch.stack([_reference_crop_flip(im, o, f)
                            for im, o, f in zip(images, offsets, flips)])
    assert torch.equal(out, expected)


def test_train_batches_match_reference():
    images, labels = _images(50), torch.arange(50) % 10
    loader = DeviceLoader(images, labels, 16, "cpu", train=True, seed=5)
    plan = list(DeviceLoader(images, labels, 16, "cpu", train=True, seed=5)._plan())
    batches = list(loader)
    assert len(batches) == len(plan) == len(loader) == 3
    for (x, y), (idx, (offsets, flips)) in zip(batches, plan):
        assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        crops = torch.stack([_reference_crop_flip(images[i], o, f)
                             for i, o, f in zip(idx, offsets, flips)])
        torch.testing.assert_close(x, _normalise(crops), rtol=0, atol=1e-5)
        assert torch.equal(y, labels[idx])


def test_eval_order_fixed_no_augmentation_keeps_partial_batch():
    images, labels = _images(10), torch.arange(10)
    loader = DeviceLoader(images, labels, 4, "cpu", train=False)
    assert len(loader) == 3
    for _ in range(2):
        batches = list(loader)
        assert [len(y) for _, y in batches] == [4, 4, 2]
        assert torch.equal(torch.cat([y for _, y in batches]), labels)
        torch.testing.assert_close(torch.cat([x for x, _ in batches]), _normalise(images),
                                   rtol=0, atol=1e-5)


def test_epoch_permutation_covers_every_index_once():
    n = 103
    loader = DeviceLoader(_images(n), torch.arange(n), 10, "cpu", train=True, drop_last=False)
    epochs = [torch.cat([y for _, y in loader]) for _ in range(2)]
    for order in epochs:
        assert torch.equal(order.sort().values, torch.arange(n))
    assert not torch.equal(epochs[0], epochs[1])


def test_drop_last():
    images, labels = _images(10), torch.arange(10)
    train = DeviceLoader(images, labels, 4, "cpu", train=True)
    assert len(train) == 2 and [len(y) for _, y in train] == [4, 4]
    kept = DeviceLoader(images, labels, 4, "cpu", train=True, drop_last=False)
    assert len(kept) == 3 and [len(y) for _, y in kept] == [4, 4, 2]


@pytest.mark.parametrize("stop_after", [0, 2, 5])  # epoch boundary, mid-epoch, epoch's last batch
def test_state_dict_resume_is_bitwise_identical(stop_after):
    images, labels = _images(40), torch.arange(40)

    def make(seed):
        return DeviceLoader(images, labels, 8, "cpu", train=True, seed=seed)

    reference = make(0)
    expected = [b for _ in range(3) for b in reference]
    interrupted = make(0)
    seen = list(interrupted)  # one full epoch
    epoch = iter(interrupted)
    seen += [next(epoch) for _ in range(stop_after)]
    state = interrupted.state_dict()
    resumed = make(123)  # a different seed: everything must come from the state
    resumed.load_state_dict(state)
    seen += [b for _ in range(2) for b in resumed]
    assert len(seen) == len(expected) == 15
    for (x, y), (ex, ey) in zip(seen, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_load_state_dict_rejects_other_loader():
    state = DeviceLoader(_images(40), torch.arange(40), 8, "cpu", train=True).state_dict()
    other = DeviceLoader(_images(30), torch.arange(30), 8, "cpu", train=True)
    with pytest.raises(ValueError, match="num_samples=40"):
        other.load_state_dict(state)


def test_dtype_and_channels_last():
    loader = DeviceLoader(_images(8), torch.arange(8), 4, "cpu", train=True,
                          channels_last=True, dtype=torch.bfloat16)
    x, _ = next(iter(loader))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)


def test_loader_rejects_bad_input():
    with pytest.raises(ValueError, match="images must be uint8"):
        DeviceLoader(_images(4).float(), torch.arange(4), 2, "cpu", train=True)
    with pytest.raises(ValueError, match="labels must be 1-D with 4 entries"):
        DeviceLoader(_images(4), torch.arange(3), 2, "cpu", train=True)
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(_images(4), torch.arange(4), 0, "cpu", train=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_loader_matches_layout():
    loader = DeviceLoader(_images(40), torch.arange(40), 8, "cuda", train=True)
    state = loader.state_dict()
    first = list(loader)
    x, y = first[0]
    assert x.is_cuda and y.is_cuda and x.shape == (8, 3, 32, 32)
    loader.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, loader, strict=True))


# --------------------------------------------------------------------------- real file


@pytest.mark.skipif(not SHARED_NPZ.exists(), reason=f"shared CIFAR-10 copy absent: {SHARED_NPZ}")
def test_shared_cifar10_npz():
    ds = load_cifar10(SHARED_NPZ)
    assert ds.x_train.shape == (50000, 3, 32, 32) and ds.x_test.shape == (10000, 3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [1000] * 10
    assert ds.source == f"npz file {SHARED_NPZ.resolve()}"
