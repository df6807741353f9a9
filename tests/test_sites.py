"""Site data for a real deployment: image folders, and `split-sites` writing a partition as one folder per site."""

import numpy as np
import pytest
from PIL import Image

from fedfactory.cli import main
from fedfactory.config import ConfigError, load_config
from fedfactory.data.datasets import load_data
from fedfactory.data.folders import load_image_folder, read_class_folders
from fedfactory.data.images import DatasetError
from fedfactory.data.partition import class_histogram, split_clients, split_test_by_holders

CLASSES = ("benign", "melanoma", "nevus")


def write_images(folder, mode="L", size=(6, 4), count=2, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_image_folder_labels_by_the_class_list_and_resizes(tmp_path):
    write_images(tmp_path / "train" / "nevus", count=3)
    write_images(tmp_path / "train" / "benign", count=2, seed=1)
    train, test = load_image_folder(tmp_path, CLASSES)
    assert train.labels.tolist() == [0, 0, 2, 2, 2] and train.images.shape == (5, 4, 6, 1)
    assert len(test) == 0 and test.images.shape[1:] == (4, 6, 1)  # no test/ folder: an empty test set
    # The pixels are the file's pixels.
    np.testing.assert_array_equal(train.images[0, ..., 0], np.asarray(Image.open(tmp_path / "train/benign/0.png")))
    write_images(tmp_path / "test" / "melanoma", mode="RGB", count=1)
    with pytest.raises(DatasetError, match="test images are"):
        load_image_folder(tmp_path, CLASSES)
    rgb = tmp_path / "rgb"
    write_images(rgb / "train" / "melanoma", mode="RGB", size=(10, 12), count=2)
    train, _ = load_image_folder(rgb, CLASSES, image_size=8)
    assert train.images.shape == (2, 8, 8, 3) and train.labels.tolist() == [1, 1]
    cfg = load_config("tiny", ["data.dataset=imagefolder", f"data.root={rgb}", "data.classes=benign,melanoma,nevus"])
    assert load_data(cfg.data)[0].images.shape == (2, 8, 8, 3)
    # data.test_root: a test set in a folder of its own, for an image folder or any other dataset.
    write_images(tmp_path / "public" / "nevus", mode="RGB", count=3)
    cfg = load_config("tiny", ["data.dataset=imagefolder", f"data.root={rgb}", "data.classes=benign,melanoma,nevus",
                               f"data.test_root={tmp_path / 'public'}"])
    assert load_data(cfg.data)[1].labels.tolist() == [2, 2, 2]
    write_images(tmp_path / "digits-test" / "7", count=2)
    test = load_data(load_config("tiny", [f"data.test_root={tmp_path / 'digits-test'}"]).data)[1]
    assert test.labels.tolist() == [7, 7] and test.images.shape == (2, 8, 8, 1)


def test_image_folder_refusals_name_the_file_and_the_fix(tmp_path):
    write_images(tmp_path / "train" / "benign")
    (tmp_path / "train" / "melanoma").mkdir()
    with pytest.raises(DatasetError, match=r"melanoma: class folder holds no .*add images or remove the folder"):
        load_image_folder(tmp_path, CLASSES)
    (tmp_path / "train" / "melanoma").rmdir()
    write_images(tmp_path / "train" / "mole")
    with pytest.raises(DatasetError, match=r"'mole' are not in data.classes=.*rename the folder"):
        load_image_folder(tmp_path, CLASSES)
    (tmp_path / "train" / "mole" / "0.png").unlink()
    (tmp_path / "train" / "mole" / "1.png").unlink()
    (tmp_path / "train" / "mole").rmdir()
    (tmp_path / "train" / "benign" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match=r"2.png: cannot decode image .*replace or remove the file"):
        load_image_folder(tmp_path, CLASSES)
    (tmp_path / "train" / "benign" / "2.png").unlink()
    write_images(tmp_path / "train" / "nevus", size=(5, 5))
    with pytest.raises(DatasetError, match="different sizes.*set data.image_size"):
        load_image_folder(tmp_path, CLASSES)
    assert len(load_image_folder(tmp_path, CLASSES, image_size=4)[0]) == 4
    with pytest.raises(DatasetError, match="no such folder"):
        read_class_folders(tmp_path / "absent", CLASSES)
    with pytest.raises(ConfigError, match="distinct class names"):
        load_config("tiny", ["data.dataset=imagefolder", "data.classes=a,,b"])
    with pytest.raises(ConfigError, match="distinct class names"):
        load_config("tiny", ["data.dataset=imagefolder"])


def test_test_rows_go_to_the_holders_and_cover_every_row():
    labels = np.repeat(np.arange(4), 10)
    hist = np.array([[5, 0, 1, 0], [5, 3, 0, 0]])  # class 3: no holder
    parts = split_test_by_holders(labels, hist, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(40))
    got = class_histogram(labels, parts, 4)
    assert got.tolist() == [[5, 0, 10, 5], [5, 10, 0, 5]]
    assert all((a == b).all() for a, b in zip(parts, split_test_by_holders(labels, hist, seed=0), strict=True))


def test_split_sites_writes_the_runs_partition_as_site_folders(tmp_path, capsys):
    out = tmp_path / "sites"
    overrides = ["data.num_clients=3", "data.classes_per_client=4"]
    assert main(["split-sites", "--config", "tiny", "--out", str(out), *overrides]) == 0
    assert "site-2:" in capsys.readouterr().out
    cfg = load_config("tiny", overrides)
    train, test = load_data(cfg.data)
    parts = split_clients(cfg.data, cfg.run.seed, train)
    site_tests = []
    for k, rows in enumerate(parts):
        s_train, s_test = load_image_folder(out / f"site-{k}", train.class_names, cfg.data.image_size)
        # The same pixels and labels as the in-process partition, up to row order (sorted by class there).
        order = np.argsort(train.labels[rows], kind="stable")
        np.testing.assert_array_equal(s_train.images, train.images[rows][order])
        np.testing.assert_array_equal(s_train.labels, train.labels[rows][order])
        assert set(s_test.labels.tolist()) <= set(s_train.labels.tolist())
        site_tests.append(s_test)
    # The sites' test folders hold the test set exactly once between them: the same (image, label) multiset.
    def rows(images, labels):
        return sorted(im.tobytes() + bytes([int(y)]) for im, y in zip(images, labels, strict=True))

    assert rows(np.concatenate([t.images for t in site_tests]), np.concatenate([t.labels for t in site_tests])) == \
        rows(test.images, test.labels)
    text = (out / "federation.toml").read_text()
    assert 'dataset = "imagefolder"' in text and 'root = ""' in text and "deployment = true" in text
    assert main(["split-sites", "--config", "tiny", "--out", str(out)]) == 2  # refuses a folder in use
