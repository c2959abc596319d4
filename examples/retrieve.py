"""Search the images of a split with free-text queries: global-embedding first stage, MPSM re-ranking.

    python examples/retrieve.py --model runs/mpsm-dis --data_dir data/f30k_precomp --split test \
        --query "a red car left of a dog" --k 10 --rerank_k 100 --index runs/f30k-test-index --explain top1.png
    python examples/retrieve.py ... --first_stage ivf --nprobe 16      # approximate first stage (faiss IVF-Flat)
    accelerate launch --num_processes 4 examples/retrieve.py ... --queries_file captions.txt --index /shared/index

The gallery's per-image outputs are computed once and, with `--index`, saved there (safetensors) and reused by later
searches. `--first_stage ivf` makes the first stage approximate (`MPSMIndex`; the choice and its settings are saved
with the index, `--nprobe` may change on a saved one). `--queries_file` searches every line;
under `accelerate launch` (one or several machines) every process holds the whole gallery and re-ranks its own share
of the queries, and the main process prints all results in file order. With `--index` the main process builds and
saves the gallery first and the others load it (put it on a file system shared by the machines). `--explain` draws,
for the best image, each word's attention over its region boxes. Bad inputs (a query with no words, `--k 0`, a
missing model or split) end with one `error: ...` line and a non-zero exit status (`MPSM_TRACEBACK=1` shows the
traceback).
"""

import contextlib
import dataclasses
import os
import sys

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets.exceptions import DatasetGenerationError
from transformers import AutoModel

import modeling_mpsm  # noqa: F401  (registers the MPSM classes with the Auto API)
from modeling_mpsm import MPSMProcessor
from modeling_mpsm.data import image_batches, load_split
from modeling_mpsm.processing_mpsm import get_dependency_parser
from modeling_mpsm import retrieval
from modeling_mpsm.common import ArgumentParser, argument, check_arguments, report_error
from modeling_mpsm.retrieval import METADATA_NAME, MPSMIndex, MPSMRetriever
from modeling_mpsm.scoring import encode_images
from modeling_mpsm.data.vocabulary import tokenize_caption
from modeling_mpsm.visualization import plot_word_region_attention


@dataclasses.dataclass
class RetrievalArguments:
    model: str = argument(help="Model folder (MPSMModel or MPSMEnsembleModel, with its processor).")
    data_dir: str = argument(help="SCAN/GSMN folder, Arrow DatasetDict, Hub dataset folder (Parquet) or Hub dataset "
                                  "id.")
    split: str = argument("test")
    query: str | None = argument(None, "The caption to search for (or --queries_file).")
    queries_file: str | None = argument(None, "Text file of captions, one per line (blank lines skipped): each is "
                                              "searched; under `accelerate launch` the processes share them out.")
    k: int = argument(10, "Results to show.", "positive integer")
    rerank_k: int = argument(100, "First-stage candidates re-scored by the full model.", "positive integer")
    index: str | None = argument(None, "Folder of the cached gallery: loaded when present, written otherwise.")
    first_stage: str | None = argument(None, "First-stage search: flat (exact, the default for a new index) or ivf "
                                             "(faiss IVF-Flat, needs faiss). Default for a saved --index: its own.",
                                       choices=["flat", "ivf"])
    nlist: int | None = argument(None, "ivf: lists (k-means centroids); default 4 * sqrt(gallery size).",
                                 "positive integer")
    nprobe: int | None = argument(None, "ivf: lists scanned per query (default 16; may change on a saved index).",
                                  "positive integer")
    explain: str | None = argument(None, "PNG path: per-word region attention on the best image.")
    batch_size: int = argument(128, must_be="positive integer")
    parser: str | None = argument(None, "Dependency parser; default: the processor's setting.")


def parse_args(argv=None) -> RetrievalArguments:
    parser = ArgumentParser(RetrievalArguments, description="Text-to-image search with MPSM.")
    args = parser.parse(argv, check=False)
    if (args.query is None) == (args.queries_file is None):
        parser.error("argument --queries_file: not allowed with argument --query" if args.query is not None
                     else "one of the arguments --query --queries_file is required")
    if args.query is not None and not tokenize_caption(args.query):
        parser.error(f"--query must hold at least one word, got {args.query!r}.")
    if args.queries_file is not None:
        if not os.path.isfile(args.queries_file):
            parser.error(f"--queries_file {args.queries_file} is not a file.")
        with open(args.queries_file) as file:
            lines = [(number, line.strip()) for number, line in enumerate(file, 1) if line.strip()]
        for number, line in lines:
            if not tokenize_caption(line):
                parser.error(f"line {number} of --queries_file {args.queries_file} holds no word: {line!r}.")
        if not lines:
            parser.error(f"--queries_file {args.queries_file} holds no caption.")
        args.queries = [line for _, line in lines]
    else:
        args.queries = [args.query]
    if args.explain and args.query is None:
        parser.error("--explain needs --query (one caption), not --queries_file.")
    check_arguments(parser, args)
    for name in ("nlist", "nprobe"):
        if getattr(args, name) is not None and args.first_stage not in (None, "ivf"):
            parser.error(f"--{name} applies to --first_stage ivf, not {args.first_stage}.")
    if args.first_stage == "ivf" and retrieval.faiss is None:  # before the gallery is encoded
        parser.error("--first_stage ivf needs faiss (pip install faiss-cpu); without it only flat.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return search(args)
    except (OSError, ValueError, KeyError, ImportError, DatasetGenerationError) as error:  # faiss missing: ImportError
        return report_error(error)


def load_gallery(args, model, processor, dataset, is_main):
    """The image gallery: loaded from `--index` when saved there, else encoded (and saved by the main process)."""
    if args.index and os.path.isfile(os.path.join(args.index, METADATA_NAME)):
        gallery = MPSMIndex.load(args.index, nprobe=args.nprobe)
        if args.first_stage not in (None, gallery.first_stage):
            raise ValueError(f"the index in {args.index} has first_stage {gallery.first_stage!r}, not "
                             f"{args.first_stage!r}: pass --first_stage {gallery.first_stage} or another --index")
        if args.nlist is not None and args.nlist != gallery.nlist:
            raise ValueError(f"the index in {args.index} was built with nlist {gallery.nlist}, not {args.nlist}")
        return gallery
    options = {name: getattr(args, name) for name in ("nlist", "nprobe") if getattr(args, name)}
    cache = encode_images(model, image_batches(dataset, args.batch_size, processor), progress=is_main)
    gallery = MPSMIndex(cache, first_stage=args.first_stage or "flat", **options).build()
    if args.index and is_main:
        gallery.save(args.index)
    return gallery


def search(args) -> int:
    state = PartialState(cpu=True)  # one process, or the processes of `accelerate launch` (gloo)
    processor = MPSMProcessor.from_pretrained(args.model)
    parser_name = args.parser or processor.dependency_parser
    processor.parser = get_dependency_parser(parser_name)
    # before the weights: a bad split fails fast
    dataset = load_split(args.data_dir, args.split, parser=processor.parser, name=f"--data_dir {args.data_dir}")
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()

    retriever = MPSMRetriever(model, processor, rerank_k=args.rerank_k, batch_size=args.batch_size)
    # With --index the main process encodes and saves the gallery first, and the other processes then load it.
    with state.main_process_first() if args.index else contextlib.nullcontext():
        retriever.images = load_gallery(args, model, processor, dataset, state.is_main_process)

    # Second stage, sharded: each process re-ranks its slice of the queries; the main process prints them all.
    with state.split_between_processes(list(enumerate(args.queries))) as mine:
        found = [(position, retriever.search_text(query, k=args.k)) for position, query in mine]
    if state.num_processes > 1:
        found = gather_object(found)
    if state.is_main_process:
        for position, results in sorted(found, key=lambda item: item[0]):
            print(f"query: {args.queries[position]!r} ({len(retriever.images)} images, first stage "
                  f"{retriever.images.describe()}, {args.rerank_k} re-ranked)")
            for rank, result in enumerate(results, 1):
                image = result["metadata"]
                caption = dataset[image]["captions"][0]
                print(f"{rank:3d}. image {image:6d}  score {result['score']:.4f}  ({caption})")
        if state.num_processes > 1:
            print(f"{len(args.queries)} queries re-ranked by {state.num_processes} processes")

    if args.explain and state.is_main_process:
        row = dataset.with_format("numpy")[dict(found)[0][0]["metadata"]]
        if not row["has_boxes"]:
            raise SystemExit(f"--explain needs region boxes; split {args.split!r} of {args.data_dir} has none")
        plot_word_region_attention(model, processor, args.query, row["region_features"], row["boxes"], None,
                                   args.explain)
        print(f"word-region attention of the best image written to {args.explain}")
    state.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
