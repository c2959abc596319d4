"""Convert a SCAN/GSMN precomputed-feature directory to an Arrow `DatasetDict`, with dependency parses.

    python examples/prepare_data.py --data_dir data/f30k_precomp --output_dir data/f30k_arrow \
        --splits train dev test --parser spacy:en_core_web_sm

Re-running with unchanged inputs reuses the finished conversion; an interrupted run leaves nothing behind at
`--output_dir`, so it can simply be started again.
"""

import argparse
import sys

from datasets.exceptions import DatasetGenerationError

from modeling_mpsm.data import convert_to_arrow
from modeling_mpsm.processing_mpsm import get_dependency_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert SCAN-format region features and captions to Arrow.")
    parser.add_argument("--data_dir", required=True, help="directory with {split}_ims.npy and {split}_caps.txt")
    parser.add_argument("--output_dir", required=True, help="where the DatasetDict is saved")
    parser.add_argument("--splits", nargs="+", default=["train", "dev", "test"])
    parser.add_argument(
        "--parser",
        default="spacy:en_core_web_sm",
        help="dependency parser: 'spacy:<pipeline>', 'fallback' (neighbouring words) or 'none' (no parses stored)",
    )
    parser.add_argument("--num_proc", type=int, default=1)
    args = parser.parse_args(argv)

    dependency_parser = None if args.parser == "none" else get_dependency_parser(args.parser)
    try:
        dataset_dict = convert_to_arrow(args.data_dir, args.output_dir, args.splits, dependency_parser, args.num_proc)
    except (OSError, ValueError) as error:  # missing or bad inputs, read-only or full output file system
        print(f"error: {error}", file=sys.stderr)
        return 1
    except DatasetGenerationError as error:  # raised while reading or parsing: show what went wrong
        print(f"error: {error.__cause__ or error}", file=sys.stderr)
        return 1
    for name, dataset in dataset_dict.items():
        print(f"{name}: {len(dataset)} images, {dataset.features['region_features'].shape} region features")
    print(f"saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
