"""Batches for training and evaluation from an image-level data set (`load_split`'s rows).

`CaptionPairDataset` and `MPSMCollator` feed training (one item per caption, batches the model's `forward` takes);
`image_batches` and `caption_batches` feed evaluation (each image and each caption once).
"""

from collections.abc import Iterator

import datasets
import numpy as np
import torch

from ..common import CAPTIONS_PER_IMAGE


class CaptionPairDataset(torch.utils.data.Dataset):
    """Caption-level view of an image-level dataset: item `i` pairs caption `i % 5` with image `i // 5`.

    Items are dicts with `image_index` int, `caption` str, `dependency_heads` (`list[int]` or `None`),
    `region_features` float32 `[R, D]` and `boxes` float32 `[R, 4]` in [0, 1] (or `None` without boxes).
    """

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset.with_format("numpy")
        self.has_heads = "dependency_heads" in dataset.column_names

    def __len__(self) -> int:
        return CAPTIONS_PER_IMAGE * len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        image_index, caption_index = divmod(int(index), CAPTIONS_PER_IMAGE)
        row = self.dataset[image_index]
        return {
            "image_index": image_index,
            "caption": str(row["captions"][caption_index]),
            "dependency_heads": [int(h) for h in row["dependency_heads"][caption_index]] if self.has_heads else None,
            "region_features": row["region_features"].astype(np.float32),
            "boxes": row["boxes"] if row["has_boxes"] else None,
        }


class MPSMCollator:
    """`collate_fn` turning `CaptionPairDataset` items into a model batch.

    Calls `processor(text=..., region_features=[B, R, D], boxes=[B, R, 4] or None, dependency_heads=...)` and adds
    `image_ids` (long `[B]`), so that the loss can tell when two captions of a batch share their image: the batch is
    the arguments of `MPSMModel.forward`.
    """

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items: list[dict]) -> dict:
        heads = [item["dependency_heads"] for item in items]
        boxes = [item["boxes"] for item in items]
        batch = self.processor(
            text=[item["caption"] for item in items],
            region_features=np.stack([item["region_features"] for item in items]),
            boxes=np.stack(boxes) if all(b is not None for b in boxes) else None,
            dependency_heads=heads if all(h is not None for h in heads) else None,
        )
        batch["image_ids"] = torch.tensor([item["image_index"] for item in items], dtype=torch.long)
        return batch


def image_batches(dataset: datasets.Dataset, batch_size: int, processor=None) -> Iterator[dict]:
    """Each image once, in order, `batch_size` at a time.

    Yields dicts with `image_index` long `[b]`, `region_features` float32 `[b, R, D]` and `boxes` float32 `[b, R, 4]`
    (or `None` without boxes); with a `processor`, its output for these images plus `image_index`.
    """
    view = dataset.with_format("numpy", columns=["region_features", "boxes", "has_boxes"])
    for start in range(0, len(view), batch_size):
        rows = view[start : start + batch_size]
        boxes = rows["boxes"] if rows["has_boxes"].all() else None
        batch = {"region_features": rows["region_features"].astype(np.float32), "boxes": boxes}
        if processor is not None:
            batch = processor(**batch)
        batch["image_index"] = torch.arange(start, start + len(rows["has_boxes"]))
        yield batch


def caption_batches(dataset: datasets.Dataset, batch_size: int, processor=None) -> Iterator[dict]:
    """Each caption once, in order (captions of image `i` are `5i .. 5i + 4`), `batch_size` at a time.

    Yields dicts with `caption_index` long `[b]`, `image_index` long `[b]` (the image each caption describes),
    `text` (`list[str]`) and `dependency_heads` (`list[list[int]]` or `None`); with a `processor`, its output for
    these captions plus both indices.
    """
    columns = ["captions"] + (["dependency_heads"] if "dependency_heads" in dataset.column_names else [])
    view = dataset.select_columns(columns)
    num_captions = CAPTIONS_PER_IMAGE * len(view)
    for start in range(0, num_captions, batch_size):
        stop = min(start + batch_size, num_captions)
        rows = view[start // CAPTIONS_PER_IMAGE : (stop - 1) // CAPTIONS_PER_IMAGE + 1]
        window = slice(start % CAPTIONS_PER_IMAGE, start % CAPTIONS_PER_IMAGE + stop - start)  # in the rows' captions
        texts = [c for captions in rows["captions"] for c in captions][window]
        heads = None
        if "dependency_heads" in rows:
            heads = [[int(h) for h in caption] for image in rows["dependency_heads"] for caption in image][window]
        batch = {"text": texts, "dependency_heads": heads}
        if processor is not None:
            batch = processor(**batch)
        batch["caption_index"] = torch.arange(start, stop)
        batch["image_index"] = batch["caption_index"] // CAPTIONS_PER_IMAGE
        yield batch
