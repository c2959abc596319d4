import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch

from modeling_mpsm import MPSMConfig, MPSMEnsembleConfig, MPSMEnsembleModel, MPSMModel, MPSMProcessor
from modeling_mpsm.retrieval import MPSMIndex, MPSMRetriever, rerank
from modeling_mpsm.scoring import encode_images, encode_texts, score_matrix
from modeling_mpsm.visualization import figure_size, plot_word_region_attention


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_dim=32, vocab_size=50, word_dim=16, embed_size=32, sim_dim=16, num_regions=6)


def tiny_inputs(num_images=9, num_texts=13, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_images, 6, 32, generator=generator)
    corners = torch.rand(num_images, 6, 2, generator=generator) * 0.5
    boxes = torch.cat([corners, corners + 0.4], -1)
    lengths = torch.randint(2, 9, (num_texts,), generator=generator)
    input_ids = torch.randint(1, 50, (num_texts, 9), generator=generator) * (torch.arange(9) < lengths[:, None])
    return features, boxes, input_ids


@pytest.fixture(params=["single", "ensemble"])
def model(request):
    torch.manual_seed(0)
    if request.param == "ensemble":
        return MPSMEnsembleModel(MPSMEnsembleConfig(dis_config=TINY, dir_config=TINY)).eval()
    return MPSMModel(MPSMConfig(**TINY)).eval()


def test_index_save_load_round_trip(model, tmp_path):
    features, boxes, input_ids = tiny_inputs()
    for cache, metadata in (
        (encode_images(model, [{"region_features": features, "boxes": boxes}], progress=False), list("abcdefghi")),
        (encode_texts(model, [{"input_ids": input_ids}], progress=False), None),
    ):
        index = MPSMIndex(cache, metadata)
        index.save(tmp_path / index.kind)
        assert os.path.isfile(tmp_path / index.kind / "index.safetensors")
        loaded = MPSMIndex.load(tmp_path / index.kind)
        assert loaded.kind == index.kind and loaded.metadata == index.metadata
        members = cache if isinstance(model, MPSMEnsembleModel) else {"model": cache}
        loaded_members = loaded.cache if isinstance(model, MPSMEnsembleModel) else {"model": loaded.cache}
        for name, output in members.items():
            for field, value in output.items():
                assert torch.equal(loaded_members[name][field], value), (name, field)
        torch.testing.assert_close(loaded.embeddings, index.embeddings)


def test_two_stage_with_full_k_equals_exhaustive(model):
    features, boxes, input_ids = tiny_inputs()
    retriever = MPSMRetriever(model)
    retriever.add_images(features[:4], boxes[:4])
    retriever.add_images(features[4:], boxes[4:])
    retriever.add_texts({"input_ids": input_ids})
    exhaustive = score_matrix(model, retriever.images.cache, retriever.texts.cache, progress=False)

    scores, indices = rerank(model, retriever.texts.cache, retriever.images, k=9, rerank_k=9)  # text -> image
    expected = exhaustive.T.sort(1, descending=True)
    torch.testing.assert_close(scores, expected.values, atol=1e-5, rtol=0)
    assert torch.equal(indices, expected.indices)
    scores, indices = rerank(model, retriever.images.cache, retriever.texts, k=13, rerank_k=13)  # image -> text
    expected = exhaustive.sort(1, descending=True)
    torch.testing.assert_close(scores, expected.values, atol=1e-5, rtol=0)
    assert torch.equal(indices, expected.indices)

    # smaller k: the first-stage candidates are re-ranked by the full model
    _, first_stage = retriever.images.search(retriever.texts.embeddings[:1], 4)
    results = retriever.search_text({"input_ids": input_ids[:1]}, k=2, rerank_k=4)
    assert len(results) == 2 and {r["index"] for r in results} <= set(first_stage[0].tolist())
    assert results[0]["score"] == pytest.approx(exhaustive[first_stage[0], 0].max().item(), abs=1e-5)
    assert len(retriever.search_image(features[0], boxes[0], k=3)) == 3


def test_visualization_png_size(tmp_path):
    torch.manual_seed(0)
    model = MPSMModel(MPSMConfig(**TINY)).eval()
    features, _, _ = tiny_inputs()
    boxes = torch.tensor([[0, 0, 50, 50], [10, 10, 80, 60], [30, 5, 90, 40], [0, 40, 100, 80], [5, 5, 20, 20],
                          [60, 60, 99, 79]], dtype=torch.float32)
    path = tmp_path / "explain.png"
    attention = plot_word_region_attention(model, {"input_ids": torch.tensor([[1, 5, 7, 9, 11, 2]])},
                                           "a red car dog", features[0], boxes, (100, 80), path)
    assert attention.shape == (6, 6) and torch.allclose(attention.sum(1), torch.ones(6), atol=1e-5)
    width, height = figure_size(6)
    assert matplotlib.image.imread(path).shape[:2] == (height, width) == (500, 1000)


def test_retrieve_cli(tmp_path):
    from modeling_mpsm.synthetic import generate
    from modeling_mpsm.vocabulary import build_tokenizer, build_vocabulary

    data_dir, model_dir, index_dir = tmp_path / "data", tmp_path / "model", tmp_path / "index"
    generate(str(data_dir), num_train=2, num_dev=1, num_test=8, feature_dim=32, num_regions=6)
    captions = (data_dir / "test_caps.txt").read_text().splitlines()
    tokenizer = build_tokenizer(build_vocabulary(captions, min_count=1))
    processor = MPSMProcessor(tokenizer, num_regions=6, dependency_parser="fallback")
    torch.manual_seed(0)
    model = MPSMModel(MPSMConfig(**{**TINY, "vocab_size": len(tokenizer)})).eval()
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)

    query = captions[10]  # a caption of image 2
    command = [sys.executable, os.path.join(REPO, "examples", "retrieve.py"), "--model", str(model_dir),
               "--data_dir", str(data_dir), "--query", query, "--k", "3", "--rerank_k", "8", "--index", str(index_dir)]
    environment = {**os.environ, "PYTHONPATH": REPO}
    runs = [subprocess.run(command + extra, env=environment, capture_output=True, text=True, timeout=120)
            for extra in ([], ["--explain", str(tmp_path / "explain.png")])]  # second run reuses the saved index
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert os.path.isfile(index_dir / "index.safetensors") and os.path.isfile(tmp_path / "explain.png")
    ranked = [line.split()[2] for line in runs[0].stdout.splitlines() if line.strip()[:2].rstrip(".").isdigit()]
    assert len(ranked) == 3 and runs[1].stdout.splitlines()[:4] == runs[0].stdout.splitlines()[:4]

    # the printed ranking is the exhaustive one of the same model (rerank_k = gallery size)
    images = processor(region_features=np.load(data_dir / "test_ims.npy"), boxes=np.load(data_dir / "test_ims_bbx.npy"),
                       image_sizes=np.load(data_dir / "test_ims_size.npy"))
    scores = score_matrix(model, [dict(images)], [dict(processor(text=[query]))], progress=False)[:, 0]
    assert [int(i) for i in ranked] == scores.topk(3).indices.tolist()
