"""The "mpsm-retrieval" pipeline: saved checkpoints load it with `pipeline(model=dir, trust_remote_code=True)` in a
fresh process (offline, without the package), and its rankings, scores and attention are those of `model.similarity` and
`model.text_region_attention` computed directly; its argument errors name the argument.

The expected rankings are sorted here with Python's `sorted` over the directly computed scores (not `topk`), and the
tiny models' scores are checked to have no near-ties, so that the order is well defined.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import pipeline

from modeling_mpsm import MPSMRetrievalPipeline
from modeling_mpsm.visualization import draw_word_region_attention, figure_size
from tiny import TINY, tiny_models, tiny_processor


CAPTIONS = ["A man runs on the grass.", "a red dog", "The dog runs on the red ball"]
CAPTION_IDS = ["c-man", "c-dog", "c-ball"]
TEXT_QUERIES = ["a dog on the grass", "the man runs"]
IMAGE_IDS = ["img-0", "img-1", "img-2", "img-3"]
REGIONS = [3, 2, 4, 3]  # regions per gallery image (padded to the processor's 4)


def gallery_images():
    """4 images of 2-4 regions: ragged lists of region features [n_i, 16] and pixel boxes [n_i, 4], sizes [4, 2]."""
    generator = torch.Generator().manual_seed(0)
    features, boxes = [], []
    for count in REGIONS:
        features.append(torch.randn(count, TINY["img_dim"], generator=generator))
        corners = torch.rand(count, 2, 2, generator=generator).sort(dim=1).values * 100  # [(x1, y1), (x2, y2)]
        boxes.append(corners.reshape(count, 4))
    sizes = torch.tensor([[100.0, 100.0], [120.0, 100.0], [100.0, 110.0], [100.0, 100.0]])
    return {"region_features": features, "boxes": boxes, "image_sizes": sizes}


def image_queries():
    """2 image queries, one image each: a dict with `region_features` [n, 16], `boxes` [n, 4], `image_sizes` [2]."""
    generator = torch.Generator().manual_seed(1)
    queries = []
    for count in (3, 4):
        corners = torch.rand(count, 2, 2, generator=generator).sort(dim=1).values * 100
        queries.append({"region_features": torch.randn(count, TINY["img_dim"], generator=generator),
                        "boxes": corners.reshape(count, 4), "image_sizes": torch.tensor([100.0, 100.0])})
    return queries


@torch.no_grad()
def direct_results(model, processor):
    """What the pipeline must return, from `model.similarity` on the processor's inputs, one query at a time."""
    images = model.encode_image(**processor(**gallery_images()))
    captions = model.encode_text(**processor(text=CAPTIONS))
    text_scores = [model.similarity(images, model.encode_text(**processor(text=[query])))[:, 0].tolist()
                   for query in TEXT_QUERIES]
    image_scores = [model.similarity(model.encode_image(**processor(**query)), captions)[0].tolist()
                    for query in image_queries()]
    return text_scores, image_scores


def ranking(scores, ids, k):
    """The k best (score, id) by `sorted`, after checking that no two scores are within 1e-4 (no ambiguous order)."""
    ordered = sorted(range(len(scores)), key=lambda index: scores[index], reverse=True)
    gaps = [scores[a] - scores[b] for a, b in zip(ordered, ordered[1:])]
    assert min(gaps) > 1e-4, f"near-tied scores {scores}: the tiny model does not give a well-defined order"
    return [(scores[index], ids[index]) for index in ordered[:k]]


def assert_results(results, expected):
    assert [result["id"] for result in results] == [id_ for _, id_ in expected]
    torch.testing.assert_close([result["score"] for result in results], [score for score, _ in expected],
                               rtol=0, atol=1e-6)


# Run in the child: everything comes from the checkpoint folders (the installed package is blocked).
CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_mpsm"] = None  # the installed package must not be used: `import modeling_mpsm` now fails
    import torch
    from transformers import pipeline

    spec = torch.load(sys.argv[1], weights_only=False)
    gallery = dict(images=spec["images"], image_ids=spec["image_ids"], captions=spec["captions"],
                   caption_ids=spec["caption_ids"])
    results = {}
    for source in spec["sources"]:
        pipe = pipeline(model=source, trust_remote_code=True)
        named = pipeline("mpsm-retrieval", model=source, trust_remote_code=True)
        assert type(pipe).__name__ == "MPSMRetrievalPipeline", type(pipe)
        assert type(pipe).__module__.startswith("transformers_modules."), type(pipe).__module__
        assert type(named) is type(pipe) and pipe.task == named.task == "mpsm-retrieval"
        pipe.set_gallery(**gallery)
        out = {
            "text": pipe(spec["text_queries"], top_k=3),
            "text_in_blocks_of_1": pipe(spec["text_queries"], top_k=3, block_size=1),
            "image": pipe(spec["image_queries"], top_k=2),
            "default_top_k": pipe(spec["text_queries"][0]),
            "text_attention": pipe(spec["text_queries"][0], top_k=2, return_attention=True),
            "image_attention": pipe(spec["image_queries"][0], top_k=2, return_attention=True),
        }
        pipe.save_pretrained(source + "-resaved")
        resaved = pipeline(model=source + "-resaved", trust_remote_code=True)
        resaved.set_gallery(**gallery)
        out["resaved"] = resaved(spec["text_queries"], top_k=3)
        try:
            pipeline("feature-extraction", model=source, trust_remote_code=True)(spec["text_queries"][0])
        except ValueError as error:
            out["feature_extraction_error"] = str(error)
        results[source] = out
        print("ran", source)
    torch.save(results, sys.argv[2])
    """
)


def run_child(tmp_path, spec):
    """Run CHILD on `spec` in a fresh interpreter, from `tmp_path`, offline, without PYTHONPATH; returns its results."""
    torch.save(spec, tmp_path / "spec.pt")
    (tmp_path / "child.py").write_text(CHILD)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH" and not key.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "child.py", "spec.pt", "results.pt"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(tmp_path / "results.pt", weights_only=False)


def test_saved_checkpoints_run_the_retrieval_pipeline_in_a_fresh_process(tmp_path):
    dis, ensemble = tiny_models()
    processor = tiny_processor()
    models = {str(tmp_path / "dis"): dis, str(tmp_path / "ensemble"): ensemble}
    for folder, model in models.items():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert config["custom_pipelines"] == {
            "mpsm-retrieval": {"impl": "pipeline_mpsm.MPSMRetrievalPipeline", "pt": ["AutoModel"], "type": "multimodal"}
        }
        assert (tmp_path / folder / "pipeline_mpsm.py").is_file()

    results = run_child(tmp_path, {
        "sources": list(models), "images": gallery_images(), "image_ids": IMAGE_IDS, "captions": CAPTIONS,
        "caption_ids": CAPTION_IDS, "text_queries": TEXT_QUERIES, "image_queries": image_queries(),
    })

    for folder, model in models.items():
        out = results[folder]
        text_scores, image_scores = direct_results(model, processor)
        for query, scores in enumerate(text_scores):  # text -> top-3 of the 4 images
            expected = ranking(scores, IMAGE_IDS, 3)
            assert_results(out["text"][query], expected)
            assert_results(out["text_in_blocks_of_1"][query], expected)
            assert_results(out["resaved"][query], expected)
        assert_results(out["default_top_k"], ranking(text_scores[0], IMAGE_IDS, 4))  # 5 by default, at most 4 images
        for query, scores in enumerate(image_scores):  # image -> top-2 of the 3 captions
            assert_results(out["image"][query], ranking(scores, CAPTION_IDS, 2))
        assert "'mpsm-retrieval' task" in out["feature_extraction_error"]
        assert "needs both `input_ids` and `region_features` (got `input_ids` only)" in out["feature_extraction_error"]
        check_attention(model, processor, out["text_attention"], out["image_attention"])


@torch.no_grad()
def check_attention(model, processor, text_results, image_results):
    """`words` and `attention` [L, n] of each result are those of `text_region_attention` on the pair (dis member)."""
    explainer = getattr(model, "dis", model)
    gallery = gallery_images()
    for result in text_results:  # the query caption over the regions of each returned image
        index = IMAGE_IDS.index(result["id"])
        image = {name: value[index] for name, value in gallery.items()}
        image_output = explainer.encode_image(**processor(**image))
        text_inputs = processor(text=[TEXT_QUERIES[0]])
        attention = explainer.text_region_attention(image_output, explainer.encode_text(**text_inputs))[0, 0]
        assert result["words"] == processor.tokenizer.convert_ids_to_tokens(text_inputs["input_ids"][0].tolist())
        torch.testing.assert_close(result["attention"], attention[:, : REGIONS[index]], rtol=0, atol=1e-6)
    query = image_queries()[0]
    image_output = explainer.encode_image(**processor(**query))
    for result in image_results:  # each returned caption over the regions of the query image
        text_inputs = processor(text=[CAPTIONS[CAPTION_IDS.index(result["id"])]])
        attention = explainer.text_region_attention(image_output, explainer.encode_text(**text_inputs))[0, 0]
        assert result["words"] == processor.tokenizer.convert_ids_to_tokens(text_inputs["input_ids"][0].tolist())
        torch.testing.assert_close(result["attention"], attention[:, : len(query["boxes"])], rtol=0, atol=1e-6)
        torch.testing.assert_close(result["attention"].sum(1), torch.ones(len(result["words"])))


# ------------------------------------------------------------------------------------------------- in this process


@pytest.fixture(scope="module")
def retriever():
    dis, _ = tiny_models()
    pipe = pipeline("mpsm-retrieval", model=dis, processor=tiny_processor())
    pipe.set_gallery(images=gallery_images(), image_ids=IMAGE_IDS, captions=CAPTIONS, caption_ids=CAPTION_IDS)
    return pipe


def test_the_task_is_registered_in_the_package(retriever):
    assert isinstance(retriever, MPSMRetrievalPipeline) and retriever.task == "mpsm-retrieval"


@pytest.mark.parametrize("top_k", [0, -1, 5, 2.0, True, "3"])
def test_top_k_out_of_bounds_is_named(retriever, top_k):
    with pytest.raises(ValueError, match=r"`top_k` must be an integer between 1 and 4 \(the number of gallery images"):
        retriever("a red dog", top_k=top_k)
    with pytest.raises(ValueError, match=r"`top_k` must be an integer between 1 and 3 \(the number of gallery capt"):
        retriever(image_queries()[0], top_k=top_k if top_k != 5 else 4)


def test_bad_queries_and_galleries_are_named(retriever):
    with pytest.raises(ValueError, match="`block_size` must be a positive integer"):
        retriever("a red dog", block_size=0)
    with pytest.raises(ValueError, match=r"a caption \(`str`\) or one image"):
        retriever(3)
    with pytest.raises(ValueError, match=r"`image query` has unknown keys \['sizes'\]"):
        retriever({"region_features": torch.randn(3, 16), "sizes": torch.tensor([1, 1])})
    with pytest.raises(ValueError, match="an image query is one image"):
        retriever(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="`image_ids` has 2 entries for 4 gallery items"):
        retriever.set_gallery(images=gallery_images(), image_ids=["a", "b"])
    with pytest.raises(ValueError, match="`set_gallery` needs `images`, `captions` or both"):
        retriever.set_gallery()
    dis, _ = tiny_models()
    empty = pipeline("mpsm-retrieval", model=dis, processor=tiny_processor())
    with pytest.raises(ValueError, match=r"no gallery of images to search: call `set_gallery\(images=...\)` first"):
        empty("a red dog")


def test_bare_region_features_query_the_captions(retriever):
    query = image_queries()[0]
    with_boxes = retriever(query, top_k=3)
    assert len(with_boxes) == 3 and {result["id"] for result in with_boxes} == set(CAPTION_IDS)
    scores = [result["score"] for result in with_boxes]
    assert scores == sorted(scores, reverse=True) and all(0 < score < 1 for score in scores)
    with pytest.warns(UserWarning, match="no `boxes`"):  # a new model: the warning is given once per model
        dis, _ = tiny_models()
        bare = pipeline("mpsm-retrieval", model=dis, processor=tiny_processor())
        bare.set_gallery(captions=CAPTIONS)
        assert len(bare(query["region_features"], top_k=2)) == 2


def test_attention_results_draw_the_figure(retriever, tmp_path):
    result = retriever(TEXT_QUERIES[0], top_k=1, return_attention=True)[0]
    index = IMAGE_IDS.index(result["id"])
    gallery = gallery_images()
    path = tmp_path / "attention.png"
    draw_word_region_attention(result["words"], result["attention"], gallery["boxes"][index],
                               gallery["image_sizes"][index].tolist(), path)
    from PIL import Image

    assert Image.open(path).size == figure_size(len(result["words"]))
