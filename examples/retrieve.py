"""Search the images of a split with a free-text query: global-embedding first stage, MPSM re-ranking.

    python examples/retrieve.py --model runs/mpsm-dis --data_dir data/f30k_precomp --split test \
        --query "a red car left of a dog" --k 10 --rerank_k 100 --index runs/f30k-test-index --explain top1.png

The gallery's per-image outputs are computed once and, with `--index`, saved there (safetensors) and reused by later
searches. `--explain` draws, for the best image, each word's attention over its region boxes. Bad inputs (a query
with no words, `--k 0`, a missing model or split) end with one `error: ...` line and a non-zero exit status
(`MPSM_TRACEBACK=1` shows the traceback).
"""

import argparse
import os
import sys

from datasets.exceptions import DatasetGenerationError
from transformers import AutoModel

import modeling_mpsm  # noqa: F401  (registers the MPSM classes with the Auto API)
from modeling_mpsm import MPSMProcessor
from modeling_mpsm.data import image_batches, load_split
from modeling_mpsm.processing_mpsm import get_dependency_parser
from modeling_mpsm.retrieval import METADATA_NAME, MPSMIndex, MPSMRetriever
from modeling_mpsm.scoring import encode_images
from modeling_mpsm.vocabulary import tokenize_caption
from modeling_mpsm.visualization import plot_word_region_attention


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Text-to-image search with MPSM.")
    parser.add_argument("--model", required=True, help="Model folder (MPSMModel or MPSMEnsembleModel, with its processor).")
    parser.add_argument("--data_dir", required=True, help="SCAN/GSMN folder or Arrow DatasetDict.")
    parser.add_argument("--split", default="test")
    parser.add_argument("--query", required=True, help="The caption to search for.")
    parser.add_argument("--k", type=int, default=10, help="Results to show.")
    parser.add_argument("--rerank_k", type=int, default=100, help="First-stage candidates re-scored by the full model.")
    parser.add_argument("--index", help="Folder of the cached gallery: loaded when present, written otherwise.")
    parser.add_argument("--explain", help="PNG path: per-word region attention on the best image.")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--parser", help="Dependency parser; default: the processor's setting.")
    args = parser.parse_args(argv)
    if not tokenize_caption(args.query):
        parser.error(f"--query must hold at least one word, got {args.query!r}.")
    for name in ("k", "rerank_k", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return search(args)
    except (OSError, ValueError, KeyError, DatasetGenerationError) as error:
        # Bad inputs (missing or corrupt model or data) and I/O failures: one line naming the problem instead of a
        # traceback, as in examples/evaluate_mpsm.py; MPSM_TRACEBACK=1 shows the traceback.
        if os.environ.get("MPSM_TRACEBACK"):
            raise
        cause = error.__cause__ if isinstance(error, DatasetGenerationError) and error.__cause__ else error
        print(f"error: {cause}", file=sys.stderr)
        return 2


def search(args) -> int:
    processor = MPSMProcessor.from_pretrained(args.model)
    parser_name = args.parser or processor.dependency_parser
    processor.parser = get_dependency_parser(parser_name)
    dataset = load_split(args.data_dir, args.split, parser=processor.parser)  # before the weights: a bad split fails fast
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()

    retriever = MPSMRetriever(model, processor, rerank_k=args.rerank_k, batch_size=args.batch_size)
    if args.index and os.path.isfile(os.path.join(args.index, METADATA_NAME)):
        retriever.images = MPSMIndex.load(args.index)
    else:
        cache = encode_images(model, image_batches(dataset, args.batch_size, processor))
        retriever.images = MPSMIndex(cache)
        if args.index:
            retriever.images.save(args.index)

    results = retriever.search_text(args.query, k=args.k)
    print(f"query: {args.query!r} ({len(retriever.images)} images, {args.rerank_k} re-ranked)")
    for rank, result in enumerate(results, 1):
        image = result["metadata"]
        caption = dataset[image]["captions"][0]
        print(f"{rank:3d}. image {image:6d}  score {result['score']:.4f}  ({caption})")

    if args.explain:
        row = dataset.with_format("numpy")[results[0]["metadata"]]
        if not row["has_boxes"]:
            raise SystemExit(f"--explain needs region boxes; split {args.split!r} of {args.data_dir} has none")
        plot_word_region_attention(model, processor, args.query, row["region_features"], row["boxes"], None,
                                   args.explain)
        print(f"word-region attention of the best image written to {args.explain}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
