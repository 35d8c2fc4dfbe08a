from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kfac_tn.training.config import DataConfig, DataName
from kfac_tn.training.data import (
    DIGITS_TEST_SIZE,
    build_datasets,
    build_loaders,
    load_digits_tensors,
    read_cifar,
)

CIFAR10_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


# --- writers of tiny data sets in their real on-disk formats (also used by test_train.py) ----


def write_cifar(root: Path, name: str, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    """Write CIFAR-10/100 python-pickle batches (the layout torchvision downloads) under ``root``.

    Returns the raw arrays written: ``{"train": (data [N, 3072] uint8, labels), "test": ...}``.
    """
    rng = np.random.default_rng(seed)
    n_cls = 10 if name == "cifar10" else 100
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, n_cls, size=n).tolist()
        out[split] = (data, np.asarray(labels))
    if name == "cifar10":
        base = root / "cifar-10-batches-py"
        base.mkdir(parents=True, exist_ok=True)
        chunks = np.array_split(np.arange(n_train), 5)
        for i, idx in enumerate(chunks, start=1):
            batch = {
                "batch_label": f"training batch {i} of 5",
                "labels": [out["train"][1][j] for j in idx],
                "data": out["train"][0][idx],
                "filenames": [f"img{j}.png" for j in idx],
            }
            (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
        test = {
            "batch_label": "testing batch 1 of 1",
            "labels": out["test"][1].tolist(),
            "data": out["test"][0],
        }
        (base / "test_batch").write_bytes(pickle.dumps(test, protocol=2))
    else:
        base = root / "cifar-100-python"
        base.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            data, labels = out[split]
            batch = {
                "data": data,
                "fine_labels": labels.tolist(),
                "coarse_labels": (labels // 5).tolist(),
            }
            (base / split).write_bytes(pickle.dumps(batch, protocol=2))
    return out


def write_image_folder(
    root: Path, classes=("cat", "dog", "eel"), per_class: int = 4, size: int = 40
) -> None:
    """Write an ImageFolder tree ``root/{train,val}/<class>/*.png`` of random RGB images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")


# --- digits ------------------------------------------------------------------------------------


def test_digits_split_and_standardisation():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x_tr, y_tr, x_te, y_te = load_digits_tensors()
    assert x_tr.shape == (1797 - DIGITS_TEST_SIZE, 1, 8, 8) and x_te.shape == (
        DIGITS_TEST_SIZE,
        1,
        8,
        8,
    )
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    # reference: the documented split (stratified, random_state=0) standardised by train statistics
    digits = load_digits()
    idx_tr, idx_te = train_test_split(
        np.arange(1797), test_size=DIGITS_TEST_SIZE, random_state=0, stratify=digits.target
    )
    raw = digits.images.astype(np.float64) / 16
    m, s = raw[idx_tr].mean(), raw[idx_tr].std(ddof=1)
    torch.testing.assert_close(
        x_tr[:, 0].double(), torch.from_numpy((raw[idx_tr] - m) / s), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        x_te[:, 0].double(), torch.from_numpy((raw[idx_te] - m) / s), atol=1e-5, rtol=0
    )
    assert torch.equal(y_tr, torch.from_numpy(digits.target[idx_tr]).long())
    assert torch.equal(y_te, torch.from_numpy(digits.target[idx_te]).long())
    assert (torch.bincount(y_te, minlength=10) >= 34).all()


def test_digits_fixed_and_upsampled():
    a = load_digits_tensors()
    b = load_digits_tensors()
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    up = load_digits_tensors(16)
    assert up[0].shape == (1437, 1, 16, 16) and torch.equal(up[1], a[1])
    bundle = build_datasets(
        DataConfig(name=DataName.DIGITS, image_size=16, train_subset=100, test_subset=50)
    )
    assert (
        len(bundle.train),
        len(bundle.test),
        bundle.in_channels,
        bundle.image_size,
        bundle.num_classes,
    ) == (100, 50, 1, 16, 10)


# --- CIFAR -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_read_cifar_layout(tmp_path, name):
    written = write_cifar(tmp_path, name, n_train=12, n_test=7)
    for split in ("train", "test"):
        images, labels = read_cifar(tmp_path, DataName(name), split == "train")
        data, expected_labels = written[split]
        assert images.shape == (len(data), 32, 32, 3) and images.dtype == np.uint8
        np.testing.assert_array_equal(labels, expected_labels)
        # CIFAR rows are [R plane (1024), G plane, B plane], each row-major 32x32
        n, r, c = 3, 5, 17
        for ch in range(3):
            assert images[n, r, c, ch] == data[n, ch * 1024 + r * 32 + c]


def test_cifar_dataset_normalised_test_images(tmp_path):
    written = write_cifar(tmp_path, "cifar10", n_train=10, n_test=4)
    bundle = build_datasets(DataConfig(name=DataName.CIFAR10, root=str(tmp_path)))
    assert (len(bundle.train), len(bundle.test), bundle.in_channels, bundle.num_classes) == (
        10,
        4,
        3,
        10,
    )
    x, y = bundle.test[2]
    data, labels = written["test"]
    expected = torch.as_tensor(data[2].reshape(3, 32, 32), dtype=torch.float32) / 255
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in CIFAR10_MEAN_STD)
    torch.testing.assert_close(x, (expected - mean) / std)
    assert y == labels[2]
    # training images are augmented (crop + flip) but keep shape
    assert bundle.train[0][0].shape == (3, 32, 32)


def test_cifar_missing_batch_and_evil_pickle(tmp_path):
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="lacks cifar-10-batches-py/data_batch_3"):
        read_cifar(tmp_path, DataName.CIFAR10, True)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(ValueError, match="forbidden global"):
        read_cifar(tmp_path, DataName.CIFAR10, False)
    assert not marker.exists()


# --- ImageNet (ImageFolder) and FakeData --------------------------------------------------------


def test_imagenet_image_folder(tmp_path):
    write_image_folder(tmp_path)
    bundle = build_datasets(DataConfig(name=DataName.IMAGENET, root=str(tmp_path), image_size=24))
    assert (len(bundle.train), len(bundle.test), bundle.num_classes, bundle.image_size) == (
        12,
        12,
        3,
        24,
    )
    x, y = bundle.test[5]
    assert x.shape == (3, 24, 24) and y == 1
    assert bundle.train[0][0].shape == (3, 24, 24)


def test_imagenet_class_mismatch(tmp_path):
    write_image_folder(tmp_path)
    write_image_folder(tmp_path / "extra", classes=("fox",))
    (tmp_path / "extra" / "train" / "fox").rename(tmp_path / "train" / "fox")
    with pytest.raises(ValueError, match="different class folders"):
        build_datasets(DataConfig(name=DataName.IMAGENET, root=str(tmp_path)))


def test_fake_data():
    cfg = DataConfig(
        name=DataName.FAKE, fake_train_size=6, fake_test_size=3, fake_num_classes=4, image_size=16
    )
    bundle = build_datasets(cfg)
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (6, 3, 4)
    assert bundle.test[0][0].shape == (3, 16, 16)
    torch.testing.assert_close(bundle.test[1][0], build_datasets(cfg).test[1][0])


# --- loaders -----------------------------------------------------------------------------------


def _order(loaders, epoch):
    return torch.cat([y for _, y in loaders.train_loader(epoch)])


def test_shuffle_is_function_of_seed_and_epoch():
    x = torch.arange(40, dtype=torch.float32).view(40, 1)
    bundle = build_datasets(DataConfig(train_subset=40, test_subset=10))
    bundle.train = torch.utils.data.TensorDataset(x, torch.arange(40))
    kw = dict(batch_size=8, test_batch_size=16, num_workers=0)
    a = build_loaders(bundle, seed=3, **kw)
    b = build_loaders(bundle, seed=3, **kw)
    torch.manual_seed(123)  # the global RNG must not matter
    e1 = _order(a, 1)
    torch.manual_seed(999)
    assert torch.equal(e1, _order(b, 1))
    assert sorted(e1.tolist()) == list(range(40))
    assert not torch.equal(_order(a, 0), e1)
    assert not torch.equal(_order(build_loaders(bundle, seed=4, **kw), 1), e1)


def test_distributed_shards_are_disjoint_and_complete():
    bundle = build_datasets(DataConfig(train_subset=30, test_subset=25))
    kw = dict(batch_size=4, test_batch_size=7, num_workers=0, seed=0, world_size=2)
    shards = [build_loaders(bundle, rank=r, **kw) for r in (0, 1)]
    tests = [torch.cat([x for x, _ in s.test]) for s in shards]
    assert len(tests[0]) + len(tests[1]) == 25
    full = torch.cat(
        [
            x
            for x, _ in build_loaders(
                bundle, batch_size=4, test_batch_size=25, num_workers=0, seed=0
            ).test
        ]
    )
    got = torch.cat(tests)
    assert torch.equal(
        torch.sort(got.view(25, -1).sum(1)).values, torch.sort(full.view(25, -1).sum(1)).values
    )
    # training: DistributedSampler gives each rank half of every epoch (15), in full batches of 4
    n0 = [len(y) for _, y in shards[0].train_loader(0)]
    n1 = [len(y) for _, y in shards[1].train_loader(0)]
    assert n0 == n1 == [4, 4, 4]
    idx0 = list(shards[0].sampler)
    idx1 = list(shards[1].sampler)
    assert not set(idx0) & set(idx1) and len(idx0) == len(idx1) == 15


def test_ragged_last_batch_dropped_unless_it_is_the_only_one():
    bundle = build_datasets(DataConfig(train_subset=10, test_subset=10))
    kw = dict(test_batch_size=16, num_workers=0, seed=0)
    assert [len(y) for _, y in build_loaders(bundle, batch_size=4, **kw).train_loader(0)] == [4, 4]
    assert [len(y) for _, y in build_loaders(bundle, batch_size=16, **kw).train_loader(0)] == [10]
