"""Region-feature data sets on the Hugging Face Hub: a folder of Parquet shards with typed features and a card.

`write_hub_folder` turns the `DatasetDict` of `modeling_mpsm.data.convert_to_arrow` into a dataset repository's
files:

- `data/{split}-{i:05d}-of-{n:05d}.parquet`: the split's rows in order, one row per image (`region_features` Array2D
  float16 or float32 `[R, D]`, `boxes` float32 `[R, 4]` in [0, 1] with `has_boxes`, `image_size` (w, h), the
  image's five `captions` and, when parsed, their `dependency_heads`), each file's schema carrying the
  `datasets.Features`;
- `README.md`: the dataset card, whose YAML metadata lists each split's files (`configs`), the features and sizes
  (`dataset_info`), task categories, license, detector and caption protocol, rendered from
  `hub_configs/region-features-dataset/README.md`.

`datasets.load_dataset(folder_or_repo_id)` reads it back with the same features, and so does every `--data_dir`
(`modeling_mpsm.data.load_split`). `push_dataset_folder` uploads the folder with `HfApi`.
"""

import math
import os
import shutil
import tempfile
from pathlib import Path

import datasets
from datasets.utils.py_utils import convert_file_size_to_int
from huggingface_hub import DatasetCard, DatasetCardData, HfApi

from ..common import CAPTIONS_PER_IMAGE, HUB_CONFIGS_DIR


CARD_TEMPLATE = HUB_CONFIGS_DIR / "region-features-dataset" / "README.md"
DATA_FOLDER = "data"
DEFAULT_MAX_SHARD_SIZE = "500MB"
TASK_CATEGORIES = ["text-to-image", "image-to-text"]
CARD_TAGS = ["image-text-retrieval", "cross-modal-retrieval", "region-features", "mpsm"]
SIZE_CATEGORIES = ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"))


def shard_name(split: str, index: int, total: int) -> str:
    """The path of shard `index` of the `total` of a split in the folder, as `Dataset.push_to_hub` names them."""
    return f"{DATA_FOLDER}/{split}-{index:05d}-of-{total:05d}.parquet"


def num_shards(dataset: datasets.Dataset, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> int:
    """How many Parquet files keep each below `max_shard_size` (bytes, or a size such as "500MB") of Arrow data."""
    return max(1, math.ceil(dataset.data.nbytes / convert_file_size_to_int(max_shard_size)))


def splits_table(dataset_dict: datasets.DatasetDict, shards: dict[str, int]) -> str:
    """The splits as a markdown table (images, captions, Parquet files) for the body of the card."""
    rows = ["| Split | Images | Captions | Parquet files |", "|---|---:|---:|---:|"]
    for split, dataset in dataset_dict.items():
        rows.append(f"| `{split}` | {len(dataset):,} | {CAPTIONS_PER_IMAGE * len(dataset):,} | {shards[split]} |")
    return "\n".join(rows)


def build_dataset_card(dataset_dict: datasets.DatasetDict, shards: dict[str, int], detector: str,
                       license: str = "unknown", pretty_name: str | None = None, repo_id: str | None = None,
                       dependency_parser: str | None = None) -> DatasetCard:
    """
    The dataset card of a folder written by `write_hub_folder`.

    Args:
        dataset_dict: the splits, with the columns of `convert_to_arrow`.
        shards (`dict[str, int]`): Parquet files per split.
        detector (`str`): the detector the region features come from (card metadata `detector`).
        license (`str`): Hub license identifier; "unknown" is a placeholder to set before publishing.
        pretty_name (`str`, *optional*): title; default: the repository name (`write_hub_folder`: or the folder's).
        repo_id (`str`, *optional*): "org/name" for the usage examples; default: a placeholder.
        dependency_parser (`str`, *optional*): the parser of the `dependency_heads` column (ignored without one).

    The metadata (YAML) also holds `detector`, `captions_per_image` and `dependency_parser`; the body is rendered from
    `hub_configs/region-features-dataset/README.md`.
    """
    repo_id = repo_id or "ORG/NAME"
    first = next(iter(dataset_dict.values()))
    num_rows = sum(len(dataset) for dataset in dataset_dict.values())
    num_regions, feature_dim = first.features["region_features"].shape
    if "dependency_heads" not in first.column_names:
        dependency_parser = None
    card_data = DatasetCardData(
        pretty_name=pretty_name or repo_id.split("/")[-1],
        license=license,
        language=["en"],
        task_categories=TASK_CATEGORIES,
        tags=CARD_TAGS,
        size_categories=[next((label for bound, label in SIZE_CATEGORIES if num_rows < bound), "1M<n<10M")],
        configs=[{
            "config_name": "default",
            "data_files": [{"split": split, "path": f"{DATA_FOLDER}/{split}-*"} for split in dataset_dict],
        }],
        detector=detector,
        captions_per_image=CAPTIONS_PER_IMAGE,
        dependency_parser=dependency_parser,
    )
    splits = datasets.SplitDict()
    for split, dataset in dataset_dict.items():
        splits.add(datasets.SplitInfo(split, num_bytes=dataset.data.nbytes, num_examples=len(dataset)))
    info = datasets.DatasetInfo(features=first.features, splits=splits,
                                dataset_size=sum(split_info.num_bytes for split_info in splits.values()))
    datasets.info.DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    return DatasetCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE),
        repo_id=repo_id,
        num_regions=num_regions,
        feature_dim=feature_dim,
        feature_dtype=first.features["region_features"].dtype,
        splits_table=splits_table(dataset_dict, shards),
    )


def check_output_folder(output_dir) -> None:
    """Raise `FileExistsError` unless `output_dir` is absent or an empty folder (what `write_hub_folder` fills)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} exists and is not an empty folder: refusing to replace it.")


def write_hub_folder(dataset_dict: datasets.DatasetDict, output_dir, detector: str, license: str = "unknown",
                     pretty_name: str | None = None, repo_id: str | None = None,
                     dependency_parser: str | None = None,
                     max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """
    Write `dataset_dict` (the splits of `convert_to_arrow`) as a Hub dataset folder at `output_dir` and return its
    files: contiguous Parquet shards of at most `max_shard_size` of Arrow data per split, in row order, and the card
    of `build_dataset_card` (the other arguments are its own).

    The folder is built beside `output_dir` and renamed into place: a failure leaves nothing there. `output_dir` must
    not exist or be empty (`FileExistsError` otherwise).
    """
    output_dir = Path(output_dir).resolve()
    check_output_folder(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    folder = work_dir / "folder"  # with the default permissions (mkdtemp's are the owner's only)
    try:
        shards = {split: num_shards(dataset, max_shard_size) for split, dataset in dataset_dict.items()}
        for split, dataset in dataset_dict.items():
            for index in range(shards[split]):
                path = folder / shard_name(split, index, shards[split])
                path.parent.mkdir(parents=True, exist_ok=True)
                dataset.shard(shards[split], index, contiguous=True).to_parquet(str(path))
        pretty_name = pretty_name or (None if repo_id else output_dir.name)
        card = build_dataset_card(dataset_dict, shards, detector, license, pretty_name, repo_id, dependency_parser)
        card.save(folder / "README.md")
        os.replace(folder, output_dir)  # onto an empty folder or none
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return sorted(path for path in output_dir.rglob("*") if path.is_file())


def push_dataset_folder(folder, repo_id: str, private: bool = False, commit_message: str | None = None):
    """Upload a folder written by `write_hub_folder` to the dataset repository `repo_id` (created if needed) and
    return the `CommitInfo`."""
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="dataset",
        commit_message=commit_message or f"Upload {repo_id.split('/')[-1]}",
    )
