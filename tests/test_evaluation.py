"""Recall@K (hand-computed cases, ties, SCAN's reference), the `recall_at_k` evaluate module, COCO 1K folds and
examples/evaluate_mpsm.py."""

import json
import os

import numpy as np
import pytest
import torch

from modeling_mpsm import MPSMConfig, MPSMModel
from modeling_mpsm.evaluation import (
    METRIC_KEYS,
    fold_score_matrices,
    mean_metrics,
    protocol_folds,
    retrieval_ranks,
    retrieval_recalls,
)
from tiny import load_script, tiny_scenes


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_PATH = os.path.join(REPO, "modeling_mpsm", "metrics", "recall_at_k")

# Two images, ten captions (0-4 describe image 0, 5-9 image 1). By hand, ties counting against the model:
# i2t: image 0's best caption (0.9) is beaten by caption 5 (0.95): rank 1; image 1's best (0.5, caption 5) is tied
#      by captions 0, 2, 3, 4 of image 0: rank 4.
# t2i: caption 0 ranks image 0 first (0.9 > 0.5); caption 1 ties (0.1 = 0.1): rank 1; every other caption: rank 1.
HAND = np.array(
    [
        [0.9, 0.1, 0.1, 0.1, 0.1, 0.95, 0.2, 0.2, 0.2, 0.2],
        [0.5, 0.1, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1],
    ]
)
HAND_METRICS = {"i2t_r1": 0.0, "i2t_r5": 100.0, "i2t_r10": 100.0, "t2i_r1": 10.0, "t2i_r5": 100.0,
                "t2i_r10": 100.0, "rsum": 410.0}


def test_hand_computed_ranks_and_recalls():
    i2t, t2i = retrieval_ranks(HAND)
    assert i2t.tolist() == [1, 4]
    assert t2i.tolist() == [0] + [1] * 9
    assert retrieval_recalls(HAND) == pytest.approx(HAND_METRICS)
    assert retrieval_recalls(torch.tensor(HAND)) == pytest.approx(HAND_METRICS)


def test_ties_count_against_the_model():
    constant = np.full((3, 15), 0.5)  # a degenerate model: every positive is tied with every negative
    i2t, t2i = retrieval_ranks(constant)
    assert i2t.tolist() == [10, 10, 10] and t2i.tolist() == [2] * 15
    assert retrieval_recalls(constant)["rsum"] == 0.0 + 0.0 + 0.0 + 0.0 + 100.0 + 100.0
    # Ties among an image's own captions do not matter.
    own_tie = np.eye(3).repeat(5, axis=1)
    assert retrieval_recalls(own_tie)["rsum"] == 600.0


def scan_i2t_t2i(sims):
    """SCAN's `i2t` / `t2i` (evaluation.py of kuanghuei/SCAN), for matrices without ties."""
    n = sims.shape[0]
    i2t = np.array([min(np.where(np.argsort(sims[i])[::-1] == j)[0][0] for j in range(5 * i, 5 * i + 5))
                    for i in range(n)])
    t2i = np.array([np.where(np.argsort(sims[:, j])[::-1] == j // 5)[0][0] for j in range(5 * n)])
    return i2t, t2i


def test_matches_scan_reference_without_ties():
    sims = np.random.default_rng(0).random((40, 200))
    sims[np.arange(40).repeat(5), np.arange(200)] += 0.3  # better than chance
    expected_i2t, expected_t2i = scan_i2t_t2i(sims)
    i2t, t2i = retrieval_ranks(sims)
    np.testing.assert_array_equal(i2t, expected_i2t)
    np.testing.assert_array_equal(t2i, expected_t2i)


def test_rejects_bad_matrices():
    with pytest.raises(ValueError, match="shape"):
        retrieval_ranks(np.zeros((2, 9)))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_ranks(np.full((1, 5), np.nan))


def test_evaluate_module_computes_the_same_numbers():
    import evaluate

    metric = evaluate.load(METRIC_PATH)
    assert metric.compute(similarities=HAND) == pytest.approx(HAND_METRICS)
    sims = np.random.default_rng(1).random((6, 30)).astype(np.float32)
    metric.add_batch(similarities=sims[:4])  # rows in several batches
    metric.add_batch(similarities=sims[4:])
    assert metric.compute() == pytest.approx(retrieval_recalls(sims))


def test_protocol_folds_and_mean():
    assert protocol_folds(5000, 5) == [slice(i * 1000, (i + 1) * 1000) for i in range(5)]
    assert protocol_folds(1000) == [slice(0, 1000)]
    with pytest.raises(ValueError):
        protocol_folds(12, 5)
    assert mean_metrics([{"rsum": 100.0, "i2t_r1": 10.0}, {"rsum": 200.0, "i2t_r1": 30.0}]) == {
        "rsum": 150.0, "i2t_r1": 20.0}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A SCAN dir with 10 test images and a saved, randomly initialised tiny model with its processor."""
    root = tmp_path_factory.mktemp("eval")
    data_dir, model_dir = root / "scan", root / "model"
    dataset, processor = tiny_scenes(data_dir, num_test=10, feature_dim=32)
    torch.manual_seed(0)
    config = MPSMConfig(img_dim=32, vocab_size=len(processor.tokenizer), word_dim=16, embed_size=32,
                        sim_dim=16, kgid_layers=1, srgr_steps=1)
    MPSMModel(config).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return str(data_dir), str(model_dir), dataset, processor


def test_coco1k_folds_are_the_diagonal_blocks(tiny_model_dir):
    _, model_dir, dataset, processor = tiny_model_dir
    model = MPSMModel.from_pretrained(model_dir)
    (full,) = fold_score_matrices(model, dataset, processor, num_folds=1, progress=False)
    folds = fold_score_matrices(model, dataset, processor, num_folds=5, progress=False)
    assert full.shape == (10, 50) and [tuple(fold.shape) for fold in folds] == [(2, 10)] * 5
    for index, fold in enumerate(folds):
        torch.testing.assert_close(fold, full[2 * index : 2 * index + 2, 10 * index : 10 * index + 10])


def run_evaluate_script(argv):
    return load_script("examples/evaluate_mpsm.py").main(argv)


def test_evaluate_script_coco1k_and_ensemble(tiny_model_dir, tmp_path):
    data_dir, model_dir, dataset, processor = tiny_model_dir
    single, pair = tmp_path / "single.json", tmp_path / "pair.json"
    common = ["--data_dir", data_dir, "--protocol", "coco1k", "--split", "test"]
    assert run_evaluate_script(["--model", model_dir, *common, "--output_json", str(single)]) == 0
    assert run_evaluate_script(["--model", model_dir, model_dir, *common, "--output_json", str(pair)]) == 0
    results = json.loads(single.read_text())
    assert set(METRIC_KEYS) | {"protocol", "split", "dataset", "model"} == set(results)
    assert (results["protocol"], results["split"], results["dataset"]) == ("coco1k", "test", "scan")
    model = MPSMModel.from_pretrained(model_dir)
    expected = mean_metrics([retrieval_recalls(m) for m in fold_score_matrices(model, dataset, processor, 5)])
    assert {key: results[key] for key in METRIC_KEYS} == pytest.approx(expected)
    ensemble = json.loads(pair.read_text())  # the mean of a model's matrix with itself is that matrix
    assert {key: ensemble[key] for key in METRIC_KEYS} == pytest.approx(expected)
    assert ensemble["model"] == [model_dir, model_dir]
