"""Evaluate MPSM on the standard image-text retrieval protocols (SCAN's i2t / t2i Recall@K and rsum).

    python examples/evaluate_mpsm.py --model runs/mpsm-dis --data_dir data/f30k_precomp --protocol f30k
    python examples/evaluate_mpsm.py --model runs/mpsm-dis runs/mpsm-dir --data_dir data/coco_precomp \
        --protocol coco1k --output_json results.json
    accelerate launch examples/evaluate_mpsm.py ...   # the rows of each score matrix are shared out over processes

Protocols: `f30k` (the 1,000 test images against their 5,000 captions), `coco1k` (mean over the five 1,000-image folds
of `testall`) and `coco5k` (all of `testall`). Several models (`--model A B ...`), or an ensemble checkpoint
(`MPSMEnsembleModel`), evaluate MPSM*: the mean of the models' score matrices (with several models, each model's own
metrics are reported too, under `members`). Recall is computed by the local `evaluate` module
`modeling_mpsm/metrics/recall_at_k`.
"""

import dataclasses
import json
import os
import sys

import evaluate
import torch
from accelerate import Accelerator
from datasets.exceptions import DatasetGenerationError
from transformers import AutoModel

import modeling_mpsm
from modeling_mpsm import MPSMProcessor
from modeling_mpsm.data import dataset_name, load_split
from modeling_mpsm.data.synthetic import twin_accuracy
from modeling_mpsm.evaluation import DEFAULT_SPLITS, METRIC_KEYS, PROTOCOL_FOLDS, fold_score_matrices, mean_metrics
from modeling_mpsm.processing_mpsm import get_dependency_parser
from modeling_mpsm.publishing import check_checkpoint
from modeling_mpsm.common import RECALL_KS, ArgumentParser, argument, atomic_write, report_error


METRIC_PATH = os.path.join(os.path.dirname(modeling_mpsm.__file__), "metrics", "recall_at_k")


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as file:
        json.dump(value, file, indent=2)


@dataclasses.dataclass
class EvaluationArguments:
    model: list[str] = argument(help="Model folder or Hub id (MPSMModel or MPSMEnsembleModel); several evaluate the "
                                     "mean of their score matrices (MPSM*).")
    data_dir: str = argument(help="SCAN/GSMN folder, Arrow DatasetDict, Hub dataset folder (Parquet) or Hub dataset "
                                  "id.")
    protocol: str = argument("f30k", choices=sorted(PROTOCOL_FOLDS))
    split: str | None = argument(None, "Default: test for f30k, testall for coco1k/coco5k.")
    output_json: str | None = argument(None, "Write the metrics here.")
    dataset_id: str | None = argument(None, "Dataset id written with the metrics (what a Hub card's model-index names, "
                                            "e.g. nlphuji/flickr30k); default: the --data_dir Hub id, or its folder's "
                                            "name.")
    dtype: str = argument("float32", "Score pairs in bfloat16 on a cast copy of the model, then re-score the top "
                                     "--refine_k of every query in float32; auto: bfloat16 where a timed probe finds "
                                     "it faster on this device.", choices=("float32", "bfloat16", "auto"))
    # checked by `score_matrix` (docs/errors.md)
    refine_k: int = argument(20, "With --dtype bfloat16/auto: candidates per query re-scored in float32 (0: none).")
    compile: bool = argument(False, "torch.compile the per-pair part (pays off on large matrices, which amortise its "
                                    "compilation time).")
    batch_size: int = argument(128, "Images or captions encoded at a time.", "positive integer")
    parser: str | None = argument(None, "Dependency parser for the captions; default: the processor's setting.")
    cpu: bool = argument(False, "Evaluate on CPU even if a GPU is available.")


def parse_args(argv=None) -> EvaluationArguments:
    parser = ArgumentParser(EvaluationArguments, description="Evaluate MPSM (or MPSM*) on image-text retrieval.")
    args = parser.parse(argv)
    args.split = args.split or DEFAULT_SPLITS[args.protocol]
    return args


def score_folds(path, args, accelerator):
    """Score matrices of the protocol's folds for the model at `path`, with its own processor."""
    if os.path.isdir(path):
        check_checkpoint(path)  # names the missing file, or a tokenizer that does not fit the model
    try:
        model = AutoModel.from_pretrained(path, trust_remote_code=True).to(accelerator.device)
    except OSError as error:
        if os.path.isdir(path):
            raise
        raise OSError(f"model {path}: not a model folder, nor loadable from the Hub ({error})") from error
    processor = MPSMProcessor.from_pretrained(path)
    parser_name = args.parser or processor.dependency_parser
    with accelerator.main_process_first():
        dataset = load_split(args.data_dir, args.split, parser=get_dependency_parser(parser_name),
                             name=f"--data_dir {args.data_dir}")
    width = dataset.features["region_features"].shape[1]
    img_dim = next(iter(model.members().values())).config.img_dim
    if width != img_dim:
        raise ValueError(
            f"split {args.split!r} of {args.data_dir} has region features of width {width}, but the model {path} "
            f"expects img_dim={img_dim} (config.json): the data and the model do not match."
        )
    matrices = fold_score_matrices(
        model, dataset, processor, PROTOCOL_FOLDS[args.protocol], batch_size=args.batch_size,
        dtype={"float32": None, "bfloat16": torch.bfloat16, "auto": "auto"}[args.dtype], accelerator=accelerator, refine_k=args.refine_k,
        compile=args.compile,
    )
    return matrices, len(dataset)


def format_table(metrics: dict) -> str:
    lines = [f"{'':6}" + "".join(f"{f'R@{k}':>8}" for k in RECALL_KS)]
    for direction in ("i2t", "t2i"):
        lines.append(f"{direction:6}" + "".join(f"{metrics[f'{direction}_r{k}']:8.1f}" for k in RECALL_KS))
    lines.append(f"{'rsum':6}{metrics['rsum']:8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu)
    try:
        return evaluate_and_report(args, accelerator)
    except (OSError, ValueError, KeyError, DatasetGenerationError) as error:
        return report_error(error)


def evaluate_and_report(args, accelerator) -> int:
    scored = [score_folds(path, args, accelerator) for path in args.model]
    num_images = scored[0][1]
    per_model = [matrices for matrices, _ in scored]
    members = {}
    if accelerator.is_main_process:
        recall_at_k = evaluate.load(METRIC_PATH)
    if len(args.model) > 1 and accelerator.is_main_process:  # MPSM*: each member's own metrics are reported too
        for path, member_matrices in zip(args.model, per_model):
            members[path] = mean_metrics([recall_at_k.compute(similarities=m.numpy()) for m in member_matrices])
    # MPSM*: the mean of the members' score matrices, the scores of their MPSMEnsembleModel, from the matrices each
    # member's own metrics are computed on (the ensemble model would score every pair a second time)
    matrices = [sum(fold) / len(fold) for fold in zip(*per_model)]

    if accelerator.is_main_process:
        metrics = mean_metrics([recall_at_k.compute(similarities=matrix.numpy()) for matrix in matrices])
        results = {
            **{key: metrics[key] for key in METRIC_KEYS},
            "protocol": args.protocol,
            "split": args.split,
            "dataset": args.dataset_id or dataset_name(args.data_dir),
            "model": args.model[0] if len(args.model) == 1 else args.model,
        }
        if members:
            results["members"] = members
        scenes_path = os.path.join(args.data_dir, f"{args.split}_scenes.json")
        if len(matrices) == 1 and os.path.isfile(scenes_path):  # the package's synthetic scenes: which changes it reads
            with open(scenes_path, encoding="utf-8") as file:
                results["twin_accuracy"] = twin_accuracy(matrices[0].numpy(), json.load(file))
        folds = PROTOCOL_FOLDS[args.protocol]
        print(f"{args.protocol}: {results['dataset']}/{args.split}, {num_images} images in {folds} fold(s), "
              f"model {results['model']}")
        for path, member_metrics in members.items():
            print(f"member {path}:\n{format_table(member_metrics)}")
        print((f"MPSM* (mean of the {len(args.model)} models):\n" if members else "") + format_table(metrics))
        if "twin_accuracy" in results:
            print("captions that mention the change scoring their image above its twin, % (blind to it ~50, reading it ~100): "
                  + ", ".join(f"{kind} {value:.1f}" for kind, value in results["twin_accuracy"].items()))
        if args.output_json:  # written whole or not at all
            atomic_write(args.output_json, lambda temporary: write_json(temporary, results))
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
