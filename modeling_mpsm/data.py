"""Data for MPSM: SCAN/GSMN precomputed region features, their Arrow conversion, and training/evaluation batching.

A SCAN-format directory holds, per split (`train`, `dev`, `test`, `testall` for COCO 5K, ...):

- `{split}_ims.npy`: float `[N, R, D]` region features (BUTD: R = 36, D = 2048)
- `{split}_caps.txt`: UTF-8, one caption per line, five consecutive lines per image
- `{split}_ims_bbx.npy` (optional): `[N, R, 4]` boxes `(x1, y1, x2, y2)`, in pixels or already in [0, 1]
- `{split}_ims_size.npy` (optional): `[N, 2]` image `(w, h)`

As in SCAN's loader, the feature array may instead repeat each image five times (one row per caption).

`convert_to_arrow` turns such a directory into a `datasets.DatasetDict` with one row per image; `load_split` does it
on first use, and also reads those rows from an Arrow `DatasetDict`, a Hub dataset folder of Parquet shards
(`modeling_mpsm.hub_dataset`, `examples/prepare_data.py --format hub`) or a dataset on the Hub. `CaptionPairDataset`
and `MPSMCollator` feed training (one item per caption), `image_batches` and `caption_batches` feed evaluation
(each image and each caption once).
"""

import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import datasets
import numpy as np
import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from .progress import progress_bar


CAPTIONS_PER_IMAGE = 5
CONVERSION_VERSION = 1
FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}
MARKER_FILE = "mpsm_conversion.json"


def _open_npy(path: str) -> np.memmap:
    """Memory-map a `.npy` file, checking that it holds as many bytes as its header promises."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path} is not a valid .npy file: {error}") from error
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    actual = os.path.getsize(path)
    if actual < expected:
        raise ValueError(f"{path} is truncated: its header announces shape {shape} ({expected} bytes), the file has {actual}.")
    return np.load(path, mmap_mode="r")


def _read_captions(path: str) -> list[str]:
    """Captions of a `_caps.txt` file, one per line; a line that is not UTF-8 raises naming the file and line."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    captions = []
    for number, line in enumerate(lines, start=1):
        try:
            captions.append(line.decode("utf-8").strip())
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid UTF-8 ({error}).") from error
    return captions


class ScanSplit:
    """One split of a SCAN-format directory, with the features memory-mapped (never read whole).

    Attributes:
        images (`np.memmap` `[N, R, D]`): region features of the N distinct images.
        captions (`list[str]`): `5 * N` captions; captions `5i .. 5i + 4` describe image `i`.
        boxes (`np.ndarray` `[N, R, 4]` or `None`): region boxes as stored (pixels or [0, 1]).
        image_sizes (`np.ndarray` `[N, 2]` or `None`): image `(w, h)`.
    """

    def __init__(self, data_dir: str, split: str):
        self.data_dir, self.split = str(data_dir), split
        self.images_path = self.path("ims.npy")
        self.captions_path = self.path("caps.txt")
        for path in (self.images_path, self.captions_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Split {split!r} of {self.data_dir}: expected file {path} does not exist.")
        rows = _open_npy(self.images_path)
        if rows.ndim != 3:
            raise ValueError(f"{self.images_path} must hold [images, regions, features], got shape {rows.shape}.")
        self.captions = _read_captions(self.captions_path)
        num_rows, num_captions = len(rows), len(self.captions)
        if num_rows and num_captions == CAPTIONS_PER_IMAGE * num_rows:
            stride = 1
        elif num_rows and num_captions == num_rows and num_rows % CAPTIONS_PER_IMAGE == 0:
            stride = CAPTIONS_PER_IMAGE  # SCAN's "im_div": each image repeated once per caption
        else:
            raise ValueError(
                f"{self.captions_path} has {num_captions} captions for {num_rows} feature rows in {self.images_path}: "
                f"expected {CAPTIONS_PER_IMAGE} captions per image (or one per row, with each image repeated "
                f"{CAPTIONS_PER_IMAGE} times)."
            )
        self.images = rows[::stride]
        self.boxes = self._optional("ims_bbx.npy", (num_rows, rows.shape[1], 4), stride)
        self.image_sizes = self._optional("ims_size.npy", (num_rows, 2), stride)

    def path(self, suffix: str) -> str:
        return os.path.join(self.data_dir, f"{self.split}_{suffix}")

    def _optional(self, suffix: str, shape: tuple[int, ...], stride: int) -> np.ndarray | None:
        path = self.path(suffix)
        if not os.path.isfile(path):
            return None
        array = _open_npy(path)
        if array.shape != shape:
            raise ValueError(f"{path} has shape {array.shape}, but {self.images_path} implies {shape}.")
        return np.asarray(array[::stride], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_regions(self) -> int:
        return self.images.shape[1]

    @property
    def feature_dim(self) -> int:
        return self.images.shape[2]

    def normalized_boxes(self, start: int, stop: int) -> np.ndarray | None:
        """Boxes of images `start:stop` in [0, 1], float32 `[stop - start, R, 4]`, or `None` without a box file."""
        if self.boxes is None:
            return None
        boxes = self.boxes[start:stop]
        bad = ~np.isfinite(boxes).all(axis=(1, 2)) | (boxes[..., 2] < boxes[..., 0]).any(1) | (boxes[..., 3] < boxes[..., 1]).any(1)
        if bad.any():
            raise ValueError(
                f"{self.path('ims_bbx.npy')}: images {(start + np.flatnonzero(bad)).tolist()} have boxes that are not "
                "finite (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1."
            )
        if self.image_sizes is not None:
            width_height = np.maximum(self.image_sizes[start:stop], 1.0)
            boxes = boxes / np.tile(width_height, 2)[:, None, :]
        elif boxes.size and boxes.max() > 1.0 + 1e-3:
            raise ValueError(f"{self.path('ims_bbx.npy')} holds pixel boxes but {self.path('ims_size.npy')} is missing.")
        outside = ((boxes < -0.01) | (boxes > 1.01)).any(axis=(1, 2))  # detector rounding is clipped, more is an error
        if outside.any():
            raise ValueError(
                f"{self.path('ims_bbx.npy')}: images {(start + np.flatnonzero(outside)).tolist()} have boxes outside "
                f"the image (of {self.path('ims_size.npy')} when present, else [0, 1])."
            )
        return np.clip(boxes, 0.0, 1.0).astype(np.float32)

    def fingerprint(self) -> list:
        """Names, sizes and modification times of the input files (what a cached conversion depends on)."""
        names = ("ims.npy", "caps.txt", "ims_bbx.npy", "ims_size.npy")
        stats = [(self.path(n), os.stat(self.path(n))) for n in names if os.path.isfile(self.path(n))]
        return [[os.path.basename(path), stat.st_size, stat.st_mtime_ns] for path, stat in stats]


def _features(split: ScanSplit, with_heads: bool, feature_dtype: str = "float16") -> datasets.Features:
    features = {
        "image_id": datasets.Value("int64"),
        "region_features": datasets.Array2D((split.num_regions, split.feature_dim), feature_dtype),
        "boxes": datasets.Array2D((split.num_regions, 4), "float32"),
        "has_boxes": datasets.Value("bool"),
        "image_size": datasets.Sequence(datasets.Value("float32"), length=2),
        "captions": datasets.Sequence(datasets.Value("string"), length=CAPTIONS_PER_IMAGE),
    }
    if with_heads:
        features["dependency_heads"] = datasets.Sequence(datasets.Sequence(datasets.Value("int32")))
    return datasets.Features(features)


def _rows(data_dir: str, split_name: str, chunks: list[tuple[int, int]], parser=None,
          feature_dtype: str = "float16") -> Iterator[dict]:
    """Rows of images `start:stop` for each `(start, stop)` of `chunks`, one chunk in memory at a time.

    This is the generator behind `convert_to_arrow`; `datasets` divides `chunks` among processes when `num_proc > 1`.
    """
    split = ScanSplit(data_dir, split_name)
    if parser is not None:
        from .processing_mpsm import tokenize_caption
    progress = progress_bar(total=sum(stop - start for start, stop in chunks), desc=f"converting {split_name}", unit="image")
    dtype = FEATURE_DTYPES[feature_dtype]
    for start, stop in chunks:
        features = np.asarray(split.images[start:stop], dtype=dtype)
        bad = ~np.isfinite(features).all(axis=(1, 2))  # NaN/Inf in the file, or values beyond the dtype's range
        if bad.any():
            raise ValueError(
                f"{split.images_path}: images {(start + np.flatnonzero(bad)).tolist()} have NaN, Inf or values "
                f"beyond the {feature_dtype} range (|x| > {np.finfo(dtype).max:.6g}); expected finite region features."
            )
        boxes = split.normalized_boxes(start, stop)
        captions = split.captions[start * CAPTIONS_PER_IMAGE : stop * CAPTIONS_PER_IMAGE]
        if parser is not None:
            heads = parser.parse_batch([tokenize_caption(caption) for caption in captions])
        for i in range(stop - start):
            row = {
                "image_id": start + i,
                "region_features": features[i],
                "boxes": boxes[i] if boxes is not None else np.zeros((split.num_regions, 4), np.float32),
                "has_boxes": boxes is not None,
                "image_size": split.image_sizes[start + i] if split.image_sizes is not None else [0.0, 0.0],
                "captions": captions[i * CAPTIONS_PER_IMAGE : (i + 1) * CAPTIONS_PER_IMAGE],
            }
            if parser is not None:
                row["dependency_heads"] = heads[i * CAPTIONS_PER_IMAGE : (i + 1) * CAPTIONS_PER_IMAGE]
            yield row
        progress.update(stop - start)
    progress.close()


def _parser_name(parser) -> str | None:
    if parser is None:
        return None
    return getattr(parser, "model_name", None) or type(parser).__name__


def convert_to_arrow(
    data_dir: str,
    output_dir: str,
    splits: Sequence[str] = ("train", "dev", "test"),
    parser=None,
    num_proc: int = 1,
    chunk_size: int = 256,
    feature_dtype: str = "float16",
) -> datasets.DatasetDict:
    """Convert SCAN-format splits to a `datasets.DatasetDict` saved at `output_dir`, one row per image.

    Row columns: `image_id` int64, `region_features` `feature_dtype` (float16 or float32) `[R, D]`, `boxes` float32
    `[R, 4]` in [0, 1] (zeros and `has_boxes=False` without a box file), `image_size` `[2]` (w, h; zeros if unknown),
    `captions` (5 strings) and, with a `parser` (an object with `parse_batch(list[list[str]]) -> list[list[int]]`,
    see `modeling_mpsm.processing_mpsm.get_dependency_parser`), `dependency_heads`: for each caption, the head index
    of each `tokenize_caption` word.

    Images are streamed `chunk_size` at a time, so the feature array is never loaded whole; `num_proc` processes
    convert (and parse) chunks in parallel. The result is built in a temporary
    directory and renamed into place: a failure leaves nothing at `output_dir`. If `output_dir` already holds a
    finished conversion of the same inputs (file sizes and modification times, splits and parser), it is reused; a
    conversion of other inputs is replaced; any other non-empty directory raises `FileExistsError`.
    """
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"`feature_dtype` must be one of {sorted(FEATURE_DTYPES)}, got {feature_dtype!r}.")
    data_dir, output_dir = os.path.abspath(data_dir), os.path.abspath(output_dir)
    fingerprint = {
        "version": CONVERSION_VERSION,
        "data_dir": data_dir,
        "parser": _parser_name(parser),
        "feature_dtype": feature_dtype,
        "splits": {name: ScanSplit(data_dir, name).fingerprint() for name in splits},
    }
    marker = os.path.join(output_dir, MARKER_FILE)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == fingerprint:
                return datasets.load_from_disk(output_dir)
    elif os.path.isdir(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f"{output_dir} is not empty and holds no {MARKER_FILE}: refusing to replace it.")

    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    work_dir = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(output_dir)}.tmp-")
    try:
        result_dir = os.path.join(work_dir, "result")
        dataset_dict = datasets.DatasetDict()
        for name in splits:
            split = ScanSplit(data_dir, name)
            chunks = [(start, min(start + chunk_size, len(split))) for start in range(0, len(split), chunk_size)]
            dataset_dict[name] = datasets.Dataset.from_generator(
                _rows,
                features=_features(split, with_heads=parser is not None, feature_dtype=feature_dtype),
                cache_dir=os.path.join(work_dir, "cache"),
                gen_kwargs={"data_dir": data_dir, "split_name": name, "chunks": chunks, "parser": parser,
                            "feature_dtype": feature_dtype},
                num_proc=min(num_proc, len(chunks)) if num_proc > 1 else None,
                writer_batch_size=chunk_size,  # rows held in memory before a write
                fingerprint=f"mpsm-{name}-{digest}",  # skips hashing the generator's arguments
                split=name,
            )
        dataset_dict.save_to_disk(result_dir)
        with open(os.path.join(result_dir, MARKER_FILE), "w", encoding="utf-8") as f:
            json.dump(fingerprint, f)
        if os.path.exists(output_dir):  # a conversion of other inputs: moved aside, deleted with work_dir
            os.replace(output_dir, os.path.join(work_dir, "previous"))
        os.replace(result_dir, output_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return datasets.load_from_disk(output_dir)


def _is_scan_dir(path: str, split: str) -> bool:
    return os.path.isfile(os.path.join(path, f"{split}_ims.npy")) or os.path.isfile(os.path.join(path, f"{split}_caps.txt"))


def _load_from_disk(path: str):
    """`datasets.load_from_disk`, naming the dataset when one of its Arrow files is truncated or corrupt."""
    try:
        return datasets.load_from_disk(path)
    except (OSError, ValueError) as error:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(f"{path}: an Arrow file of this dataset is truncated or corrupt ({error}); convert the data "
                         "again (examples/prepare_data.py).") from error


def _is_parquet_folder(path: str) -> bool:
    """A folder holding Parquet files: a Hub dataset's files, as `modeling_mpsm.hub_dataset.write_hub_folder` writes."""
    return os.path.isdir(path) and any(glob.iglob(os.path.join(glob.escape(path), "**", "*.parquet"), recursive=True))


def _is_hub_id(value: str) -> bool:
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _load_dataset(source: str, name: str) -> datasets.DatasetDict:
    """`datasets.load_dataset(source)` of a Parquet folder or a Hub id: all splits, prepared in the `datasets` cache."""
    try:
        return datasets.load_dataset(source)
    except (ConnectionError, FileNotFoundError) as error:  # offline and not cached, or no such dataset
        if os.path.isdir(source):
            raise
        raise FileNotFoundError(
            f"{name} is not a local folder, and loading it as a Hub dataset failed: {error}"
        ) from error


def _split_of(dataset_dict: datasets.DatasetDict, split: str, name: str) -> datasets.Dataset:
    if split not in dataset_dict:
        raise KeyError(f"{name} has splits {list(dataset_dict)}, not {split!r}.")
    return dataset_dict[split]


def _check_columns(dataset: datasets.Dataset, split: str, name: str) -> None:
    """Raise unless `dataset` has the columns the readers below use, of the types `convert_to_arrow` writes."""
    features = dataset.features
    missing = [column for column in ("region_features", "boxes", "has_boxes", "captions") if column not in features]
    captions = features.get("captions")
    if missing:
        problem = f"it has no column {missing}"
    elif not isinstance(features["region_features"], datasets.Array2D):
        problem = f"`region_features` is {features['region_features']}, not an Array2D [regions, dim]"
    elif getattr(captions, "length", None) != CAPTIONS_PER_IMAGE or captions.feature != datasets.Value("string"):
        problem = f"`captions` is {captions}, not {CAPTIONS_PER_IMAGE} strings per image"
    else:
        return
    raise ValueError(
        f"split {split!r} of {name} is not a region-feature data set: {problem}. Expected one row per image with "
        f"`region_features` [R, D], `boxes` [R, 4], `has_boxes` and `captions` ({CAPTIONS_PER_IMAGE} strings), as "
        "examples/prepare_data.py writes them."
    )


def dataset_name(data_dir: str) -> str:
    """How results name the data of `data_dir`: the id itself for a Hub dataset, else the folder's name."""
    path = str(data_dir)
    if not os.path.exists(path) and _is_hub_id(path):
        return path
    return os.path.basename(os.path.normpath(path))


def load_split(data_dir: str, split: str, parser=None, name: str | None = None) -> datasets.Dataset:
    """The `split` of `data_dir`, one row per image with the columns of `convert_to_arrow`. `data_dir` is

    - an Arrow `DatasetDict` directory (`convert_to_arrow`, `examples/prepare_data.py`), or one split's directory;
    - a SCAN directory, converted on first use into `<data_dir>/arrow_cache/<split>` and reused afterwards;
    - a folder of Parquet shards with a dataset card (`modeling_mpsm.hub_dataset.write_hub_folder`), or the id of
      such a dataset on the Hub: both are read with `datasets.load_dataset`, which prepares every split in its cache
      on first use (with `HF_HUB_OFFLINE=1`, a Hub id resolves to the copy an earlier load cached).

    `parser` parses the captions of a SCAN conversion; the other sources are used as they are (rows without
    `dependency_heads` are parsed by the processor, batch by batch). `name` is how errors refer to `data_dir`
    (the command-line scripts pass "--data_dir VALUE"); default: `data_dir` itself.
    """
    path = str(data_dir)
    name = name or path
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        dataset = _split_of(_load_from_disk(path), split, name)
    elif os.path.isfile(os.path.join(path, "state.json")):
        dataset = _load_from_disk(path)
    elif _is_scan_dir(path, split):
        return convert_to_arrow(path, os.path.join(path, "arrow_cache", split), splits=(split,), parser=parser)[split]
    elif _is_parquet_folder(path) or (not os.path.exists(path) and _is_hub_id(path)):
        dataset = _split_of(_load_dataset(path, name), split, name)
    elif os.path.exists(path):
        raise FileNotFoundError(
            f"{name} is neither an Arrow dataset directory, a SCAN directory with "
            f"{os.path.join(path, split + '_ims.npy')}, nor a folder of Parquet shards (a Hub dataset's files)."
        )
    else:
        raise FileNotFoundError(f"{name}: no such folder, and not a Hub dataset id (ORG/NAME) either.")
    _check_columns(dataset, split, name)
    return dataset


def _heads_list(heads) -> list[list[int]] | None:
    return None if heads is None else [[int(h) for h in caption] for caption in heads]


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
    `image_index` (long `[B]`), so that a loss can tell when two captions of a batch share their image.
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
        batch["image_index"] = torch.tensor([item["image_index"] for item in items], dtype=torch.long)
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
        offset = start - (start // CAPTIONS_PER_IMAGE) * CAPTIONS_PER_IMAGE
        texts = [c for captions in rows["captions"] for c in captions][offset : offset + stop - start]
        heads = None
        if "dependency_heads" in rows:
            heads = _heads_list([h for image in rows["dependency_heads"] for h in image][offset : offset + stop - start])
        batch = {"text": texts, "dependency_heads": heads}
        if processor is not None:
            batch = processor(**batch)
        batch["caption_index"] = torch.arange(start, stop)
        batch["image_index"] = batch["caption_index"] // CAPTIONS_PER_IMAGE
        yield batch
