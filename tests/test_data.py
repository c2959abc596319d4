"""SCAN-format loading, Arrow conversion (round trip, caching, atomicity), datasets and collation."""

import os

import datasets
import numpy as np
import pytest
import torch

from modeling_mpsm import data
from modeling_mpsm.data import arrow
from modeling_mpsm.data import synthetic


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan")
    synthetic.generate(str(path), seed=1, num_train=12, num_dev=4, num_test=20, feature_dim=32)
    return path


@pytest.fixture
def bad_dir(scan_dir, tmp_path):
    """A writable copy of the test split, to corrupt."""
    for name in ("test_ims.npy", "test_caps.txt", "test_ims_bbx.npy", "test_ims_size.npy"):
        (tmp_path / name).write_bytes((scan_dir / name).read_bytes())
    return tmp_path


class ChainParser:
    """Stands in for `processing_mpsm.get_dependency_parser`: every word's head is its left neighbour."""

    def parse_batch(self, batch):
        return [[max(i - 1, 0) for i in range(len(words))] for words in batch]


class FakeProcessor:
    """Records its inputs and returns tensors of the processor's output keys."""

    def __call__(self, text=None, region_features=None, boxes=None, dependency_heads=None):
        self.calls = dict(text=text, region_features=region_features, boxes=boxes, dependency_heads=dependency_heads)
        out = {}
        if text is not None:
            b = len(text)
            out |= {"input_ids": torch.ones(b, 4, dtype=torch.long), "attention_mask": torch.ones(b, 4, dtype=torch.long)}
            out["dependency_adjacency"] = torch.ones(b, 4, 4)
        if region_features is not None:
            out["region_features"] = torch.as_tensor(region_features)
            out["region_mask"] = torch.ones(region_features.shape[:2], dtype=torch.long)
            if boxes is not None:
                out["boxes"] = torch.as_tensor(boxes)
        return out


def test_scan_split_memory_maps(scan_dir):
    split = data.ScanSplit(scan_dir, "test")
    assert isinstance(split.images, np.memmap)
    assert len(split) == 20 and split.images.shape == (20, 36, 32)
    assert len(split.captions) == 100 and split.boxes.shape == (20, 36, 4) and split.image_sizes.shape == (20, 2)
    boxes = split.normalized_boxes(0, 20)
    assert boxes.min() >= 0 and boxes.max() <= 1


def test_scan_split_repeated_images(bad_dir):
    """SCAN's loader also accepts one feature row per caption (each image repeated five times)."""
    ims = np.load(bad_dir / "test_ims.npy")
    for name, array in (("ims", ims), ("ims_bbx", np.load(bad_dir / "test_ims_bbx.npy")), ("ims_size", np.load(bad_dir / "test_ims_size.npy"))):
        np.save(bad_dir / f"test_{name}.npy", np.repeat(array, 5, axis=0))
    split = data.ScanSplit(bad_dir, "test")
    assert isinstance(split.images, np.memmap) and len(split) == 20
    np.testing.assert_array_equal(split.images, ims)


def test_missing_split(scan_dir):
    with pytest.raises(FileNotFoundError, match="testall_ims.npy"):
        data.ScanSplit(scan_dir, "testall")


def test_ragged_captions(bad_dir):
    with open(bad_dir / "test_caps.txt", "a", encoding="utf-8") as f:
        f.write("One caption too many.\n")
    with pytest.raises(ValueError, match=r"test_caps\.txt has 101 captions"):
        data.ScanSplit(bad_dir, "test")


def test_non_utf8_line(bad_dir):
    lines = (bad_dir / "test_caps.txt").read_bytes().splitlines(keepends=True)
    lines[6] = b"A caf\xe9 with a red chair.\n"  # Latin-1
    (bad_dir / "test_caps.txt").write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=r"test_caps\.txt, line 7"):
        data.ScanSplit(bad_dir, "test")


def test_truncated_npy(bad_dir):
    path = bad_dir / "test_ims.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"test_ims\.npy is truncated"):
        data.ScanSplit(bad_dir, "test")


@pytest.mark.parametrize("name", ["ims_bbx", "ims_size"])
def test_mismatched_counts(bad_dir, name):
    path = bad_dir / f"test_{name}.npy"
    np.save(path, np.load(path)[:-1])
    with pytest.raises(ValueError, match=rf"test_{name}\.npy has shape .*test_ims\.npy"):
        data.ScanSplit(bad_dir, "test")


def test_conversion_round_trip(scan_dir, tmp_path):
    out = tmp_path / "arrow"
    dataset_dict = data.convert_to_arrow(scan_dir, out, parser=ChainParser())
    assert set(dataset_dict) == {"train", "dev", "test"}
    source = data.ScanSplit(scan_dir, "test")
    test = dataset_dict["test"].with_format("numpy")
    assert len(test) == 20 and test.features["region_features"].dtype == "float16"
    np.testing.assert_allclose(test["region_features"], source.images, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(test["boxes"], source.normalized_boxes(0, 20), atol=1e-6)
    np.testing.assert_array_equal(test["image_size"], source.image_sizes)
    assert [c for row in test["captions"] for c in row] == source.captions
    heads = dataset_dict["test"][3]["dependency_heads"]
    assert len(heads) == 5 and heads[0][:2] == [0, 0]


def test_parallel_conversion_keeps_image_order(scan_dir, tmp_path):
    train = data.convert_to_arrow(scan_dir, tmp_path / "arrow", splits=("train",), num_proc=2, chunk_size=4)["train"]
    assert train["image_id"] == list(range(12))
    assert [c for row in train["captions"] for c in row] == data.ScanSplit(scan_dir, "train").captions


def test_conversion_is_idempotent_and_tracks_inputs(scan_dir, tmp_path):
    out = tmp_path / "arrow"
    data.convert_to_arrow(scan_dir, out, splits=("dev",))
    marker = out / arrow.MARKER_FILE
    stamp = marker.stat().st_mtime_ns
    again = data.convert_to_arrow(scan_dir, out, splits=("dev",))
    assert marker.stat().st_mtime_ns == stamp and len(again["dev"]) == 4  # reused, not rewritten
    data.convert_to_arrow(scan_dir, out, splits=("dev",), parser=ChainParser())
    assert "dependency_heads" in datasets.load_from_disk(out)["dev"].column_names  # other settings: redone


def test_conversion_never_replaces_foreign_directories(scan_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        data.convert_to_arrow(scan_dir, tmp_path, splits=("dev",))
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_failed_conversion_leaves_nothing(scan_dir, tmp_path, monkeypatch):
    def broken_rows(*args, **kwargs):
        yield from []
        raise RuntimeError("disk full")

    monkeypatch.setattr(arrow, "_rows", broken_rows)
    with pytest.raises(datasets.exceptions.DatasetGenerationError) as error:
        data.convert_to_arrow(scan_dir, tmp_path / "arrow", splits=("dev",))
    assert "disk full" in str(error.value.__cause__)
    assert os.listdir(tmp_path) == []


def test_load_split_converts_once(scan_dir, tmp_path):
    local = tmp_path / "scan"
    local.mkdir()
    for name in ("dev_ims.npy", "dev_caps.txt"):  # no boxes: zeros and a flag
        (local / name).write_bytes((scan_dir / name).read_bytes())
    dev = data.load_split(local, "dev")
    assert (local / "arrow_cache" / "dev" / arrow.MARKER_FILE).is_file()
    assert not any(dev["has_boxes"]) and len(dev) == 4
    assert len(data.load_split(local / "arrow_cache" / "dev", "dev")) == 4
    item = data.CaptionPairDataset(dev)[0]
    assert item["boxes"] is None and item["dependency_heads"] is None


def test_caption_pair_dataset_and_collator(scan_dir, tmp_path):
    test = data.convert_to_arrow(scan_dir, tmp_path / "arrow", splits=("test",), parser=ChainParser())["test"]
    pairs = data.CaptionPairDataset(test)
    assert len(pairs) == 100
    item = pairs[13]
    assert item["image_index"] == 2 and item["caption"] == test[2]["captions"][3]
    assert item["region_features"].dtype == np.float32 and item["region_features"].shape == (36, 32)
    assert item["boxes"].shape == (36, 4) and item["dependency_heads"] == test[2]["dependency_heads"][3]

    processor = FakeProcessor()
    loader = torch.utils.data.DataLoader(pairs, batch_size=6, collate_fn=data.MPSMCollator(processor))
    batch = next(iter(loader))
    assert batch["image_ids"].tolist() == [0, 0, 0, 0, 0, 1] and batch["image_ids"].dtype == torch.long
    assert processor.calls["region_features"].shape == (6, 36, 32) and processor.calls["boxes"].shape == (6, 36, 4)
    assert processor.calls["text"][5] == test[1]["captions"][0] and len(processor.calls["dependency_heads"]) == 6
    assert {"input_ids", "attention_mask", "dependency_adjacency", "region_features", "boxes", "region_mask"} <= set(batch)


def test_evaluation_batches_cover_each_item_once_in_order(scan_dir, tmp_path):
    test = data.convert_to_arrow(scan_dir, tmp_path / "arrow", splits=("test",), parser=ChainParser())["test"]
    images = list(data.image_batches(test, batch_size=7))
    assert torch.cat([b["image_index"] for b in images]).tolist() == list(range(20))
    features = np.concatenate([b["region_features"] for b in images])
    np.testing.assert_allclose(features, data.ScanSplit(scan_dir, "test").images, atol=1e-3, rtol=1e-3)

    captions = list(data.caption_batches(test, batch_size=8))
    assert torch.cat([b["caption_index"] for b in captions]).tolist() == list(range(100))
    assert [t for b in captions for t in b["text"]] == data.ScanSplit(scan_dir, "test").captions
    assert torch.cat([b["image_index"] for b in captions]).tolist() == [i // 5 for i in range(100)]
    assert all(len(b["dependency_heads"]) == len(b["text"]) for b in captions)

    processed = next(data.caption_batches(test, batch_size=8, processor=FakeProcessor()))
    assert processed["input_ids"].shape[0] == 8 and processed["image_index"].tolist() == [0] * 5 + [1] * 3


def test_collator_with_the_real_processor(scan_dir, tmp_path):
    processing = pytest.importorskip("modeling_mpsm.processing_mpsm")
    vocabulary = pytest.importorskip("modeling_mpsm.data.vocabulary")
    train = data.convert_to_arrow(scan_dir, tmp_path / "arrow", splits=("train",), parser=ChainParser())["train"]
    word2idx = vocabulary.build_vocabulary([c for row in train["captions"] for c in row], min_count=1)
    processor = processing.MPSMProcessor(vocabulary.build_tokenizer(word2idx), dependency_parser="fallback")
    pairs = data.CaptionPairDataset(train)
    batch = data.MPSMCollator(processor)([pairs[i] for i in (0, 1, 7)])
    assert batch["region_features"].shape == (3, 36, 32) and batch["boxes"].shape == (3, 36, 4)
    assert batch["dependency_adjacency"].shape[0] == 3 and batch["image_ids"].tolist() == [0, 0, 1]
