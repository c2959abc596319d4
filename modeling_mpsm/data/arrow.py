"""Region-feature data sets as `datasets` tables: the Arrow conversion of a SCAN directory, and `load_split`, which
reads a split from any source (SCAN directory, Arrow `DatasetDict`, Parquet folder of a Hub dataset, Hub id).

One row per image: `image_id`, `region_features` [R, D], `boxes` [R, 4] in [0, 1], `has_boxes`, `image_size` (w, h),
`captions` (5 strings) and, when a parser was given, `dependency_heads` (one head list per caption).
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
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..common import CAPTIONS_PER_IMAGE, progress_bar
from .scan import ScanSplit


CONVERSION_VERSION = 1
FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}
MARKER_FILE = "mpsm_conversion.json"


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
        from ..processing_mpsm import tokenize_caption
    progress = progress_bar(total=sum(stop - start for start, stop in chunks), desc=f"converting {split_name}", unit="image")
    for start, stop in chunks:
        features = split.region_features(start, stop, FEATURE_DTYPES[feature_dtype])
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
        "parser": None if parser is None else getattr(parser, "model_name", None) or type(parser).__name__,
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


def _load_from_disk(path: str):
    """`datasets.load_from_disk`, naming the dataset when one of its Arrow files is truncated or corrupt."""
    try:
        return datasets.load_from_disk(path)
    except (OSError, ValueError) as error:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(f"{path}: an Arrow file of this dataset is truncated or corrupt ({error}); convert the data "
                         "again (examples/prepare_data.py).") from error


def _is_parquet_folder(path: str) -> bool:
    """A folder holding Parquet files: a Hub dataset's files, as `modeling_mpsm.data.hub.write_hub_folder` writes."""
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
    - a folder of Parquet shards with a dataset card (`modeling_mpsm.data.hub.write_hub_folder`), or the id of
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
    elif any(os.path.isfile(os.path.join(path, f"{split}_{suffix}")) for suffix in ("ims.npy", "caps.txt")):
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
