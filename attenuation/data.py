"""CIFAR-10: finding it on disk, loading it safely, and batching it on the training device.

Two on-disk forms are accepted: an ``.npz`` archive (keys ``x_train``, ``y_train``, ``x_test``,
``y_test``; images ``(N, 32, 32, 3)`` uint8 HWC) and torchvision's ``cifar-10-batches-py`` folder.
Every loaded data set carries a ``source`` string so that reports can say which one was used.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import sys
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct

__all__ = [
    "CIFAR10",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DataFormatError",
    "DataNotFoundError",
    "DeviceLoader",
    "download_cifar10",
    "find_cifar10",
    "hold_out",
    "load_cifar10",
    "resolve_cifar10",
    "subset",
    "validation_indices",
]

ENV_VAR = "ATTENUATION_DATA"
NPZ_NAME = "cifar10.npz"
FOLDER_NAME = "cifar-10-batches-py"
NUM_CLASSES = 10
IMAGE_SHAPE_HWC = (32, 32, 3)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CROP_PADDING = 4

_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_REPO_ROOT = Path(__file__).resolve().parents[1]


class DataNotFoundError(FileNotFoundError):
    """The data set could not be located (or downloaded)."""


class DataFormatError(ValueError):
    """A data file exists but its content is not valid CIFAR-10."""


@dataclass(frozen=True)
class CIFAR10:
    """CIFAR-10 in memory: uint8 NCHW images, int64 labels, and where they came from; ``x_val``
    and ``y_val`` hold the training images held out for validation (:func:`hold_out`), if any."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str
    x_val: Optional[torch.Tensor] = None
    y_val: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------- locating


def _default_cache() -> Path:
    return Path.home() / ".cache" / "attenuation"


def _dataset_in(path: Path) -> Path | None:
    """The data set that ``path`` denotes (a file, a batches folder, or a folder holding either)."""
    if path.is_file():
        return path
    if path.is_dir():
        if path.name == FOLDER_NAME or (path / _TEST_BATCH).is_file():
            return path
        for child in (path / NPZ_NAME, path / FOLDER_NAME):
            if child.exists():
                return child
    return None


def _from_user(path: str | os.PathLike, origin: str) -> Path:
    """Resolve a location the user gave explicitly; failing is an error, never a fallback."""
    given = Path(path).expanduser()
    if not given.exists():
        raise DataNotFoundError(f"CIFAR-10 path from {origin} does not exist: {given}")
    found = _dataset_in(given)
    if found is None:
        raise DataNotFoundError(
            f"CIFAR-10 path from {origin} is a folder holding neither {NPZ_NAME} nor "
            f"{FOLDER_NAME}: {given}"
        )
    return found.resolve()


def _default_locations() -> list[Path]:
    cwd = Path.cwd()
    cache = _default_cache()
    return [
        cwd / "data" / NPZ_NAME,
        cwd / ".." / "shared" / "data" / NPZ_NAME,
        _REPO_ROOT / ".." / "shared" / "data" / NPZ_NAME,
        cache / NPZ_NAME,
        cache / FOLDER_NAME,
    ]


def _looked_in(looked: list[Path]) -> str:
    places = "\n".join(f"  - {p}" for p in looked)
    return f"Looked in:\n  - explicit path (none given)\n  - ${ENV_VAR} (not set)\n{places}\n"


_PROVIDE = (f"Provide it with --data PATH or {ENV_VAR}=PATH (a {NPZ_NAME} file or a {FOLDER_NAME} "
            "folder)")


def resolve_cifar10(path: str | os.PathLike | None = None) -> Path:
    """Find CIFAR-10: ``path`` if given, else ``$ATTENUATION_DATA``, else the default places.

    ``path`` and the environment variable may name an ``.npz`` file, a ``cifar-10-batches-py``
    folder, or a folder containing either. Returns an absolute path to the file or folder.
    """
    if path is not None:
        return _from_user(path, "the explicit path")
    env = os.environ.get(ENV_VAR)
    if env:
        return _from_user(env, f"${ENV_VAR}")
    looked = _default_locations()
    for candidate in looked:
        if candidate.exists():
            return candidate.resolve()
    raise DataNotFoundError(
        f"CIFAR-10 not found. {_looked_in(looked)}{_PROVIDE}, or run `attenuation run --download` "
        "to fetch it with torchvision where the network allows."
    )


def download_cifar10(root: str | os.PathLike | None = None) -> Path:
    """Download CIFAR-10 with torchvision into ``root``; returns its batches folder's path."""
    root = Path(root).expanduser() if root is not None else _default_cache()
    try:
        import torchvision

        for train in (True, False):
            torchvision.datasets.CIFAR10(str(root), train=train, download=True)
    except Exception as exc:  # network, integrity and disk errors all mean "no data"
        raise DataNotFoundError(
            f"downloading CIFAR-10 into {root} failed ({type(exc).__name__}: {exc}). "
            f"Supply the data instead with --data PATH or {ENV_VAR}=PATH (a {NPZ_NAME} file or a "
            f"{FOLDER_NAME} folder)."
        ) from exc
    return (root / FOLDER_NAME).resolve()


def find_cifar10(path: str | os.PathLike | None = None, *, download: bool = False) -> Path:
    """The data set a run reads. With ``download``, a fresh download into the default cache.
    Otherwise :func:`resolve_cifar10`; when the user named no place (no ``path``, no
    ``$ATTENUATION_DATA``) and none of the default places holds the data, it is downloaded into
    the default cache (announced on stderr), so a first run on a fresh machine needs no flag.
    Offline, the error lists the places searched, why the download failed and how to provide it."""
    if download:
        return _announced_download()
    try:
        return resolve_cifar10(path)
    except DataNotFoundError:
        if path is not None or os.environ.get(ENV_VAR):
            raise
    try:
        return _announced_download()
    except DataNotFoundError as failed:
        reason = failed.__cause__
        raise DataNotFoundError(
            f"CIFAR-10 not found, and downloading it into {_default_cache()} failed "
            f"({type(reason).__name__}: {reason}). {_looked_in(_default_locations())}{_PROVIDE}."
        ) from reason


def _announced_download() -> Path:
    print(f"attenuation: downloading CIFAR-10 with torchvision into {_default_cache()}",
          file=sys.stderr, flush=True)
    return download_cifar10()


# --------------------------------------------------------------------------- loading


def _check_labels(labels: np.ndarray, count: int, what: str) -> np.ndarray:
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataFormatError(
            f"{what}: expected a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
        )
    if len(labels) != count:
        raise DataFormatError(f"{what}: {len(labels)} labels for {count} images")
    if count and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataFormatError(
            f"{what}: labels must lie in [0, {NUM_CLASSES - 1}], "
            f"found range [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int64)


def _load_npz(path: Path) -> CIFAR10:
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataFormatError(f"{path}: expected an .npz archive, found a single array")
        with archive:
            missing = [k for k in _NPZ_KEYS if k not in archive.files]
            if missing:
                raise DataFormatError(
                    f"{path}: missing key(s) {missing}; an .npz must hold {list(_NPZ_KEYS)}"
                )
            arrays = {key: archive[key] for key in _NPZ_KEYS}
    except DataFormatError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataFormatError(f"{path}: not a readable .npz file ({exc})") from exc

    tensors = []
    for split in ("train", "test"):
        xkey, ykey = f"x_{split}", f"y_{split}"
        x, y = arrays[xkey], arrays[ykey]
        if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE_HWC:
            raise DataFormatError(f"{path}: {xkey} has shape {x.shape}, expected (N, 32, 32, 3)")
        if x.dtype != np.uint8:
            raise DataFormatError(f"{path}: {xkey} has dtype {x.dtype}, expected uint8")
        y = _check_labels(y, len(x), f"{path}: {ykey}")
        tensors += [torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y)]
    return CIFAR10(*tensors, source=f"npz file {path}")


_ARRAY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; any other global is refused.

    The batch files come from elsewhere, and ``pickle.load`` would run whatever callable they name.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str):
        try:
            return _ARRAY_GLOBALS[(module, name)]
        except KeyError:
            raise DataFormatError(
                f"{self._path}: refusing to unpickle {module}.{name}; a CIFAR-10 batch file may "
                "only contain numpy arrays, lists and dicts"
            ) from None


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: images (N, 3, 32, 32) uint8 and labels int64."""
    if not path.is_file():
        raise DataFormatError(f"{path.parent}: missing batch file {path.name}")
    try:
        with path.open("rb") as f:
            batch = _ArrayOnlyUnpickler(f, path).load()
    except DataFormatError:
        raise
    except Exception as exc:  # truncated or malformed pickles raise many different types
        raise DataFormatError(f"{path}: not a readable CIFAR-10 batch file ({exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataFormatError(f"{path}: expected a dict with keys b'data' and b'labels'")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        desc = f"{data.shape} {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFormatError(f"{path}: b'data' is {desc}, expected a (N, 3072) uint8 array")
    labels = _check_labels(np.asarray(batch[b"labels"]), len(data), f"{path}: b'labels'")
    return data.reshape(-1, 3, 32, 32), labels


def _load_folder(path: Path) -> CIFAR10:
    train = [_load_batch(path / name) for name in _TRAIN_BATCHES]
    x_test, y_test = _load_batch(path / _TEST_BATCH)
    return CIFAR10(
        x_train=torch.from_numpy(np.concatenate([x for x, _ in train])),
        y_train=torch.from_numpy(np.concatenate([y for _, y in train])),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test)),
        y_test=torch.from_numpy(y_test),
        source=f"torchvision {FOLDER_NAME} {path}",
    )


def load_cifar10(path: str | os.PathLike) -> CIFAR10:
    """Load CIFAR-10 from any location form that :func:`resolve_cifar10` accepts."""
    given = Path(path).expanduser().resolve()
    found = _dataset_in(given)
    if found is None:
        raise DataNotFoundError(
            f"CIFAR-10 path does not exist or holds neither {NPZ_NAME} nor {FOLDER_NAME}: {given}"
        )
    data = _load_folder(found) if found.is_dir() else _load_npz(found)
    for split, labels in (("training", data.y_train), ("test", data.y_test)):
        if len(labels) == 0:
            raise DataFormatError(f"{data.source} holds no {split} images: a run needs both splits")
    return data


def _class_balanced_first(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first ``n`` samples taken round-robin over classes, in original order."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    class_start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - class_start[labels[order]]
    chosen = torch.argsort(rank * NUM_CLASSES + labels, stable=True)[:n]
    return chosen.sort().values


def subset(data: CIFAR10, n_train: int, n_test: int) -> CIFAR10:
    """A smaller CIFAR-10 for smoke runs: ``n_train`` / ``n_test`` images of each split.

    Samples are taken round-robin over the classes (each class in its original order), so class
    counts differ by at most one while every class has enough samples; the result keeps the
    original relative order. Deterministic, no randomness.
    """
    parts = []
    for name, n, x, y in (("n_train", n_train, data.x_train, data.y_train),
                          ("n_test", n_test, data.x_test, data.y_test)):
        if not 0 <= n <= len(y):
            raise ValueError(f"{name}={n} is outside [0, {len(y)}]")
        idx = _class_balanced_first(y, n)
        parts += [x[idx], y[idx]]
    return CIFAR10(*parts, source=f"{data.source}, subset {n_train} train / {n_test} test",
                   x_val=data.x_val, y_val=data.y_val)


def _split_generator(seed: int) -> torch.Generator:
    """The validation split's own generator: derived from the run's seed, but neither the global
    RNG nor the loader's stream (a run without a split is unchanged, and the held-out images are
    not correlated with the first epoch's order)."""
    digest = hashlib.sha256(f"attenuation validation split, seed {seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def validation_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Ascending indices of the ``n`` samples to hold out for validation, fixed by ``seed``.

    Class-balanced: every class gives ``n // 10`` samples, and ``n % 10`` distinct classes, drawn
    at random among those with a sample to spare, give one more; within a class the samples are
    drawn at random. A data set too unbalanced for this is refused, naming the class.
    """
    if not 0 <= n < len(labels):
        raise ValueError(f"a validation split of {n} images needs 0 <= n < the {len(labels)} "
                         "training images")
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    base, extra = divmod(n, NUM_CLASSES)
    for c in range(NUM_CLASSES):
        if counts[c] < base:
            raise ValueError(f"class {c} has {int(counts[c])} training images, fewer than the {base} "
                             f"that a validation split of {n} holds out of each class")
    spare = torch.nonzero(counts > base).flatten()
    if len(spare) < extra:
        raise ValueError(f"a validation split of {n} holds out {base + 1} images of {extra} classes, "
                         f"but only {len(spare)} classes have more than {base}")
    generator = _split_generator(seed)
    quota = torch.full((NUM_CLASSES,), base)
    quota[spare[torch.randperm(len(spare), generator=generator)[:extra]]] += 1
    chosen = []
    for c in range(NUM_CLASSES):
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:int(quota[c])]])
    return torch.cat(chosen).sort().values


def hold_out(data: CIFAR10, n: int, seed: int) -> CIFAR10:
    """``data`` with ``n`` training images (:func:`validation_indices`) moved to ``x_val`` /
    ``y_val``; the rest train, in their original order."""
    held = validation_indices(data.y_train, n, seed)
    keep = torch.ones(len(data.y_train), dtype=torch.bool)
    keep[held] = False
    return replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep],
                   x_val=data.x_train[held], y_val=data.y_train[held],
                   source=f"{data.source}, {n} training images held out for validation (seed {seed})")


# --------------------------------------------------------------------------- batching


def _make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` where that device supports one, else on the CPU."""
    try:
        generator = torch.Generator(device=device)
    except RuntimeError:
        generator = torch.Generator()
    return generator.manual_seed(seed)


def _draw_augmentation(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets ``(n, 2)`` (row, column) in ``[0, 2 * CROP_PADDING]`` and flips ``(n,)``."""
    offsets = torch.randint(0, 2 * CROP_PADDING + 1, (n, 2), generator=generator,
                            device=generator.device)
    flips = torch.randint(0, 2, (n,), generator=generator, device=generator.device).bool()
    return offsets, flips


def _crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Zero-pad, crop at ``offsets`` and mirror where ``flips``: one gather for the whole batch."""
    n, c, h, w = images.shape
    pad = CROP_PADDING
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = offsets[:, :1] + torch.arange(h, device=images.device)  # (n, h)
    cols = offsets[:, 1:] + torch.arange(w, device=images.device)  # (n, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    flat = rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]  # (n, h, w) into padded plane
    index = flat.reshape(n, 1, h * w).expand(n, c, h * w)
    return padded.flatten(2).gather(2, index).view(n, c, h, w)


class DeviceLoader:
    """Batches held entirely on the training device, with batched on-device augmentation.

    Yields ``(x, y)``: ``x`` normalised with the CIFAR-10 mean and std in ``dtype``, ``y`` int64.
    In train mode each epoch draws a fresh permutation from the loader's own generator; with
    ``augment`` every image gets a random zero-padded crop (padding 4) and a random horizontal
    flip. ``state_dict()`` may be taken between or during epochs: after ``load_state_dict()``
    iteration resumes with exactly the batches the uninterrupted loader would have produced.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 device: str | torch.device, train: bool, augment: bool | None = None,
                 drop_last: bool | None = None, seed: int = 0, channels_last: bool = False,
                 dtype: torch.dtype = torch.float32):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be 1-D with {len(images)} entries, "
                             f"got shape {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.train = train
        self.augment = train if augment is None else augment
        self.drop_last = train if drop_last is None else drop_last
        self.channels_last = channels_last
        self.dtype = dtype
        std = torch.tensor(CIFAR10_STD, device=self.device).view(1, 3, 1, 1)
        mean = torch.tensor(CIFAR10_MEAN, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std
        self._generator = _make_generator(self.device, seed)
        self._epoch_start_state: torch.Tensor | None = None  # set while an epoch is under way
        self._position = 0  # batches yielded in the epoch under way
        self._skip = 0  # batches to fast-forward at the next epoch (after load_state_dict)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _plan(self) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
        """The epoch's random draws, in order: (sample indices, augmentation draws or None)."""
        n = len(self.labels)
        gen = self._generator
        if self.train:
            order = torch.randperm(n, generator=gen, device=gen.device).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            draws = None
            if self.augment:
                offsets, flips = _draw_augmentation(len(idx), gen)
                draws = offsets.to(self.device), flips.to(self.device)
            yield idx, draws

    def _make_batch(self, idx: torch.Tensor, draws) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[idx]
        if draws is not None:
            x = _crop_flip(x, *draws)
        x = x.to(torch.float32).mul_(self._scale).add_(self._shift).to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, self.labels[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._epoch_start_state = self._generator.get_state()
        skip, self._skip = self._skip, 0
        self._position = 0
        for b, (idx, draws) in enumerate(self._plan()):
            if b < skip:  # resuming: the draws were made above, so the stream stays aligned
                continue
            self._position = b + 1
            yield self._make_batch(idx, draws)
        self._epoch_start_state = None
        self._position = 0

    def state_dict(self) -> dict:
        """Generator state at the start of the current epoch plus how far into it we are."""
        if self._epoch_start_state is not None:
            state, position = self._epoch_start_state, self._position
        else:
            state, position = self._generator.get_state(), 0
        return {"generator": state.clone(), "position": position,
                "num_samples": len(self.labels), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_samples", "batch_size"):
            mine = len(self.labels) if key == "num_samples" else self.batch_size
            if state[key] != mine:
                raise ValueError(f"loader state has {key}={state[key]}, this loader has {mine}")
        self._generator.set_state(state["generator"])
        self._skip = state["position"]
        self._epoch_start_state = None
        self._position = 0
