"""Data sets and loaders for the training front end.

- ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, ship with scikit-learn, so no
  internet is needed); fixed stratified split of 1437 training / 360 test images; optional bilinear
  upsampling to ``image_size``; standardised with the training set's mean and std.
- ``cifar10`` / ``cifar100``: the python-pickle format (``cifar-10-batches-py/``,
  ``cifar-100-python/``) read with a restricted unpickler that only admits numpy arrays, so a file
  from elsewhere cannot run code; torchvision downloads it when ``download`` is set.
- ``imagenet``: ``torchvision.datasets.ImageFolder`` on ``root/train`` and ``root/val``.
- ``fake``: ``torchvision.datasets.FakeData`` (deterministic random images) for smoke runs.

Shuffling uses a generator reseeded from ``(seed, epoch)`` at every epoch, so the data order of an
epoch does not depend on what ran before it (this makes resumed runs match uninterrupted ones).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from kfac_tn.training.config import DataConfig, DataName

__all__ = [
    "DataBundle",
    "EpochLoaders",
    "build_datasets",
    "build_loaders",
    "load_digits_tensors",
    "read_cifar",
]

logger = logging.getLogger(__name__)

DIGITS_TEST_SIZE = 360
"""Size of the fixed, stratified digits test split (random_state=0)."""

_MEAN_STD: dict[DataName, tuple[tuple[float, ...], tuple[float, ...]]] = {
    DataName.CIFAR10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    DataName.CIFAR100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    DataName.IMAGENET: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    DataName.FAKE: ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


@dataclasses.dataclass
class DataBundle:
    """Train/test data sets plus the shape facts a model needs.

    Attributes:
        train: training set yielding ``(image [C, H, W] float, label int)``.
        test: test set, same format.
        in_channels: C.
        image_size: H (= W).
        num_classes: number of labels.
    """

    train: Dataset
    test: Dataset
    in_channels: int
    image_size: int
    num_classes: int


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------


def load_digits_tensors(image_size: int | None = None) -> tuple[torch.Tensor, ...]:
    """Scikit-learn digits as standardised tensors with the fixed train/test split.

    Args:
        image_size: upsample the 8x8 images bilinearly to this size (``None``: keep 8).

    Returns:
        ``(x_train [1437, 1, S, S], y_train [1437], x_test [360, 1, S, S], y_test [360])``,
        float32 images standardised with the training mean/std, int64 labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_SIZE, random_state=0, stratify=digits.target
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    if image_size is not None and image_size != 8:
        x = torch.nn.functional.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    mean, std = x[idx_train].mean(), x[idx_train].std()
    x = (x - mean) / std
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


# ----------------------------------------------------------------------------------------------
# CIFAR (python-pickle format)
# ----------------------------------------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays (and builtin containers)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name} in a CIFAR batch file")


def _read_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(
            f"data.root: {str(path)!r} is not a CIFAR python-pickle batch ({exc})"
        ) from exc
    if not isinstance(obj, dict) or "data" not in obj:
        raise ValueError(f"data.root: {str(path)!r} is not a CIFAR batch (no 'data' entry)")
    return obj


def read_cifar(root: str | Path, name: DataName, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read CIFAR-10/100 python-pickle batches.

    Args:
        root: directory containing ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        name: ``DataName.CIFAR10`` or ``DataName.CIFAR100``.
        train: training batches (``data_batch_1..5`` / ``train``) or the test batch.

    Returns:
        ``(images uint8 [N, 32, 32, 3], labels int64 [N])``.

    Raises:
        ValueError: if a batch file is missing or malformed.
    """
    if name == DataName.CIFAR10:
        base = Path(root) / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        label_key = "labels"
    else:
        base = Path(root) / "cifar-100-python"
        files = ["train"] if train else ["test"]
        label_key = "fine_labels"
    images, labels = [], []
    for fname in files:
        path = base / fname
        if not path.is_file():
            raise ValueError(f"data.root: {str(root)!r} lacks {path.relative_to(root)}")
        batch = _read_batch(path)
        data = np.asarray(batch["data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


class ArrayImageDataset(Dataset):
    """Images held as a uint8 array ``[N, H, W, C]``, converted to PIL and transformed per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def _vision_transforms(cfg: DataConfig, size: int, train: bool, large: bool) -> Callable:
    from torchvision import transforms as T

    mean, std = _MEAN_STD[cfg.name]
    ops: list[Callable] = []
    if large:  # ImageNet-style
        if train and cfg.augment:
            ops += [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        else:
            ops += [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    else:  # CIFAR-style, native 32x32
        if size != 32:
            ops.append(T.Resize(size))
        if train and cfg.augment:
            ops += [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def build_datasets(cfg: DataConfig) -> DataBundle:
    """Build the train and test sets described by ``cfg``.

    Args:
        cfg: validated data config.

    Returns:
        The data sets (the first ``train_subset``/``test_subset`` examples when set) and their
        channel count, image size and number of classes.
    """
    bundle = _BUILDERS[cfg.name](cfg)
    if cfg.train_subset is not None:
        bundle.train = Subset(bundle.train, range(min(cfg.train_subset, len(bundle.train))))
    if cfg.test_subset is not None:
        bundle.test = Subset(bundle.test, range(min(cfg.test_subset, len(bundle.test))))
    logger.info(
        "data %s: %d train / %d test images, %dx%dx%d, %d classes",
        cfg.name.value,
        len(bundle.train),
        len(bundle.test),
        bundle.in_channels,
        bundle.image_size,
        bundle.image_size,
        bundle.num_classes,
    )
    return bundle


def _digits(cfg: DataConfig) -> DataBundle:
    x_tr, y_tr, x_te, y_te = load_digits_tensors(cfg.image_size)
    return DataBundle(TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te), 1, x_tr.shape[-1], 10)


def _cifar(cfg: DataConfig) -> DataBundle:
    root = Path(cfg.root).expanduser()
    if cfg.download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if cfg.name == DataName.CIFAR10 else datasets.CIFAR100
        cls(str(root), train=True, download=True)  # downloads and verifies if missing
    size = cfg.image_size or 32
    sets = []
    for train in (True, False):
        images, labels = read_cifar(root, cfg.name, train)
        sets.append(ArrayImageDataset(images, labels, _vision_transforms(cfg, size, train, False)))
    n_cls = 10 if cfg.name == DataName.CIFAR10 else 100
    return DataBundle(sets[0], sets[1], 3, size, n_cls)


def _imagenet(cfg: DataConfig) -> DataBundle:
    from torchvision import datasets

    root = Path(cfg.root).expanduser()
    size = cfg.image_size or 224
    try:
        train = datasets.ImageFolder(str(root / "train"), _vision_transforms(cfg, size, True, True))
        test = datasets.ImageFolder(str(root / "val"), _vision_transforms(cfg, size, False, True))
    except FileNotFoundError as exc:  # no class folder / no image in one
        raise ValueError(
            f"data.root: {cfg.root!r} is not an ImageFolder root with train/<class>/* and "
            f"val/<class>/* images ({exc})"
        ) from exc
    if train.classes != test.classes:
        raise ValueError(
            f"data.root: {cfg.root!r} has different class folders in train/ "
            f"({len(train.classes)}) and val/ ({len(test.classes)})"
        )
    return DataBundle(train, test, 3, size, len(train.classes))


def _fake(cfg: DataConfig) -> DataBundle:
    from torchvision import datasets

    size = cfg.image_size or 32
    shape = (3, size, size)

    def fake(n: int, train: bool, offset: int) -> Dataset:
        transform = _vision_transforms(cfg, size, train, False)
        return datasets.FakeData(n, shape, cfg.fake_num_classes, transform, random_offset=offset)

    train = fake(cfg.fake_train_size, True, 0)
    test = fake(cfg.fake_test_size, False, 10**6)
    return DataBundle(train, test, 3, size, cfg.fake_num_classes)


_BUILDERS: dict[DataName, Callable[[DataConfig], DataBundle]] = {
    DataName.DIGITS: _digits,
    DataName.CIFAR10: _cifar,
    DataName.CIFAR100: _cifar,
    DataName.IMAGENET: _imagenet,
    DataName.FAKE: _fake,
}


class EpochLoaders:
    """Train/test loaders whose shuffling is a pure function of ``(seed, epoch)``.

    Call :meth:`train_loader` with the epoch number each epoch. The last incomplete training
    batch of an epoch is dropped (unless that would leave none). In distributed runs the training
    set is split by a ``DistributedSampler`` and the test set into disjoint strided shards (no
    padding duplicates, so summed metrics are exact). The constructor takes the arguments of
    :func:`build_loaders`.
    """

    def __init__(
        self,
        bundle: DataBundle,
        *,
        batch_size: int,
        test_batch_size: int,
        num_workers: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
    ) -> None:
        self.bundle, self.seed = bundle, seed
        self.generator = torch.Generator()
        self.sampler = (
            DistributedSampler(bundle.train, world_size, rank, shuffle=True, seed=seed)
            if world_size > 1
            else None
        )
        common = {"num_workers": num_workers, "pin_memory": pin_memory, "persistent_workers": False}
        n_local = len(self.sampler) if self.sampler is not None else len(bundle.train)
        self._train = DataLoader(
            bundle.train,
            batch_size=batch_size,
            shuffle=self.sampler is None,
            sampler=self.sampler,
            generator=self.generator,
            drop_last=n_local >= batch_size,  # no ragged last batch (BatchNorm needs > 1 sample)
            **common,
        )
        test = bundle.test
        if world_size > 1:
            test = Subset(test, range(rank, len(test), world_size))
        self.test = DataLoader(test, batch_size=test_batch_size, shuffle=False, **common)

    def train_loader(self, epoch: int) -> DataLoader:
        """Return the training loader, reseeded for ``epoch``.

        Args:
            epoch: The epoch (0-based) whose data order the loader then yields.

        Returns:
            The (one, reused) training loader.
        """
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        return self._train


def build_loaders(
    bundle: DataBundle,
    *,
    batch_size: int,
    test_batch_size: int,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> EpochLoaders:
    """Loaders for ``bundle``; see :class:`EpochLoaders`.

    Args:
        bundle: The data sets.
        batch_size: Training batch size per process.
        test_batch_size: Evaluation batch size per process.
        num_workers: DataLoader worker processes.
        seed: Seed of the data order (with the epoch).
        rank: This process' rank in a distributed run.
        world_size: Number of processes.
        pin_memory: Pin host memory (for CUDA).

    Returns:
        The loaders.
    """
    return EpochLoaders(
        bundle,
        batch_size=batch_size,
        test_batch_size=test_batch_size,
        num_workers=num_workers,
        seed=seed,
        rank=rank,
        world_size=world_size,
        pin_memory=pin_memory,
    )
