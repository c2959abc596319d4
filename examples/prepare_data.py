"""Convert a SCAN/GSMN precomputed-feature directory to an Arrow `DatasetDict`, or to a Hub dataset folder.

    python examples/prepare_data.py --data_dir data/f30k_precomp --output_dir data/f30k_arrow \
        --splits train dev test --parser spacy:en_core_web_sm
    python examples/prepare_data.py --data_dir data/f30k_precomp --output_dir data/f30k_hub --format hub \
        --splits train dev test --detector "BUTD Faster R-CNN (ResNet-101, Visual Genome)" \
        --push_to_hub my-org/f30k-butd-regions

`--format arrow` (the default) writes what `datasets.load_from_disk` reads; re-running with unchanged inputs reuses
the finished conversion, and an interrupted run leaves nothing behind at `--output_dir`. `--format hub` writes a
dataset repository: Parquet shards per split (`data/{split}-*.parquet`, one row per image with its five captions,
typed `datasets.Features`) and a dataset card `README.md` with YAML metadata (see `modeling_mpsm.data.hub`);
`--push_to_hub ORG/NAME` then uploads it (log in first: `hf auth login`, or set `HF_TOKEN`). Either output is a valid
`--data_dir` for training, evaluation and retrieval, and so is the Hub id once pushed.
"""

import dataclasses
import os
import sys
import tempfile

from datasets.exceptions import DatasetGenerationError
from datasets.utils.py_utils import convert_file_size_to_int
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from modeling_mpsm.common import ArgumentParser, argument
from modeling_mpsm.data.arrow import FEATURE_DTYPES, convert_to_arrow
from modeling_mpsm.data.hub import DEFAULT_MAX_SHARD_SIZE, check_output_folder, push_dataset_folder, write_hub_folder
from modeling_mpsm.processing_mpsm import get_dependency_parser


DEFAULT_DETECTOR = "BUTD Faster R-CNN (ResNet-101, Visual Genome; Anderson et al. 2018), as in SCAN's features"


@dataclasses.dataclass
class PrepareDataArguments:
    data_dir: str = argument(help="directory with {split}_ims.npy and {split}_caps.txt")
    output_dir: str = argument(help="where the DatasetDict (or the Hub folder) is written")
    splits: list[str] = argument(["train", "dev", "test"])
    parser: str = argument("spacy:en_core_web_sm", "dependency parser: 'spacy:<pipeline>', 'fallback' (neighbouring "
                                                   "words) or 'none' (no parses stored)")
    num_proc: int = argument(1, "processes that parse the captions", "positive integer")
    feature_dtype: str = argument("float16", "storage dtype of the region features (float16 halves the size)",
                                  choices=sorted(FEATURE_DTYPES))
    format: str = argument("arrow", "'arrow': a DatasetDict (save_to_disk); 'hub': Parquet shards and a dataset card",
                           choices=["arrow", "hub"])
    # --format hub
    detector: str = argument(DEFAULT_DETECTOR, "the detector of the region features (card metadata)")
    license: str = argument("unknown", "Hub license id of the card; 'unknown' is a placeholder")
    pretty_name: str | None = argument(None, "title of the card; default: the repository name")
    max_shard_size: str = argument(DEFAULT_MAX_SHARD_SIZE, "largest Parquet file, e.g. 500MB")
    push_to_hub: str | None = argument(None, "upload the folder to this dataset repository", metavar="ORG/NAME")
    private: bool = argument(False, "create the --push_to_hub repository private")


def parse_args(argv=None) -> PrepareDataArguments:
    parser = ArgumentParser(PrepareDataArguments, description="Convert SCAN-format region features and captions to "
                                                              "Arrow, or to Parquet shards with a dataset card for the "
                                                              "Hub.")
    args = parser.parse(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private applies to the repository of --push_to_hub: add --push_to_hub ORG/NAME.")
    if args.push_to_hub and args.format != "hub":
        parser.error("--push_to_hub uploads a Hub dataset folder: add --format hub.")
    try:
        size = args.max_shard_size
        args.max_shard_size = int(size) if size.isdigit() else convert_file_size_to_int(size)
    except ValueError:
        args.max_shard_size = 0
    if args.max_shard_size < 1:
        parser.error(f"--max_shard_size must be a positive size such as 500MB or a number of bytes, got {size!r}.")
    if args.push_to_hub:
        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as error:
            parser.error(f"--push_to_hub must be a Hub repository id ORG/NAME, got {args.push_to_hub!r} ({error}).")
    return args


def convert(args, dependency_parser) -> list[str]:
    """The conversion `--format` asks for (`--format hub`: to Arrow in a scratch folder, then to Parquet); returns a
    line per split."""
    arguments = dict(splits=args.splits, parser=dependency_parser, num_proc=args.num_proc,
                     feature_dtype=args.feature_dtype)
    if args.format == "arrow":
        return summary(convert_to_arrow(args.data_dir, args.output_dir, **arguments))
    check_output_folder(args.output_dir)  # before the conversion, which takes long
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=parent, prefix=".prepare_data-") as scratch:
        dataset_dict = convert_to_arrow(args.data_dir, os.path.join(scratch, "arrow"), **arguments)
        write_hub_folder(dataset_dict, args.output_dir, detector=args.detector, license=args.license,
                         pretty_name=args.pretty_name, repo_id=args.push_to_hub,
                         dependency_parser=None if dependency_parser is None else args.parser,
                         max_shard_size=args.max_shard_size)
        return summary(dataset_dict)


def summary(dataset_dict) -> list[str]:
    return [f"{name}: {len(dataset)} images, {dataset.features['region_features'].shape} region features"
            for name, dataset in dataset_dict.items()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dependency_parser = None if args.parser == "none" else get_dependency_parser(args.parser)
    try:
        lines = convert(args, dependency_parser)
        if args.push_to_hub:
            commit = push_dataset_folder(args.output_dir, args.push_to_hub, private=args.private)
    except (OSError, ValueError) as error:  # missing or bad inputs, read-only or full output file system
        print(f"error: {error}", file=sys.stderr)
        return 1
    except DatasetGenerationError as error:  # raised while reading or parsing: show what went wrong
        print(f"error: {error.__cause__ or error}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    print(f"saved to {args.output_dir}")
    if args.push_to_hub:
        print(f"uploaded to {args.push_to_hub}: {commit.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
