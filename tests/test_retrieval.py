import json
import os
import re
import shutil
import socket
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

from tiny import load_script


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
TINY = dict(img_dim=32, vocab_size=50, word_dim=16, embed_size=32, sim_dim=16)


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


def cli_model_and_data(tmp_path):
    """A synthetic split of 8 test images and a tiny saved model with its processor: (data_dir, model_dir, captions,
    processor, model)."""
    from modeling_mpsm.data.synthetic import generate
    from modeling_mpsm.data.vocabulary import build_tokenizer, build_vocabulary

    data_dir, model_dir = tmp_path / "data", tmp_path / "model"
    generate(str(data_dir), num_train=2, num_dev=1, num_test=8, feature_dim=32)
    captions = (data_dir / "test_caps.txt").read_text().splitlines()
    tokenizer = build_tokenizer(build_vocabulary(captions, min_count=1))
    processor = MPSMProcessor(tokenizer, num_regions=6, dependency_parser="fallback")
    torch.manual_seed(0)
    model = MPSMModel(MPSMConfig(**{**TINY, "vocab_size": len(tokenizer)})).eval()
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return data_dir, model_dir, captions, processor, model


def ranked_images(stdout):
    """The image numbers of `retrieve.py`'s result lines, one list per query."""
    blocks = []
    for line in stdout.splitlines():
        if line.startswith("query: "):
            blocks.append([])
        elif line.strip()[:2].rstrip(".").isdigit():
            blocks[-1].append(int(line.split()[2]))
    return blocks


def test_retrieve_cli(tmp_path):
    data_dir, model_dir, captions, processor, model = cli_model_and_data(tmp_path)
    index_dir = tmp_path / "index"
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


def gallery_and_queries(model, num_images=60, num_texts=13):
    features, boxes, input_ids = tiny_inputs(num_images=num_images, num_texts=num_texts, seed=1)
    images = encode_images(model, [{"region_features": features, "boxes": boxes}], progress=False)
    texts = encode_texts(model, [{"input_ids": input_ids}], progress=False)
    return images, texts


def test_ivf_with_every_list_probed_equals_flat(model):
    import modeling_mpsm.retrieval as retrieval

    pytest.importorskip("faiss")
    images, texts = gallery_and_queries(model)
    queries = retrieval.global_embeddings(texts)
    flat = MPSMIndex(images.select(slice(0, 40)))
    ivf = MPSMIndex(images.select(slice(0, 40)), first_stage="ivf", nlist=4, nprobe=4)
    assert not ivf.is_built and ivf.build().is_built and ivf.nlist == 4
    for k in (1, 10, 40):
        expected, got = flat.search(queries, k), ivf.search(queries, k)
        assert torch.equal(got[1], expected[1]), k
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
    # the torch fallback of the exact first stage gives the same ranking as faiss.knn
    assert torch.equal((queries @ flat.embeddings.T).topk(10).indices, flat.search(queries, 10)[1])

    # `add` keeps the trained centroids and fills the built index with the new items
    for index in (flat, ivf):
        index.add(images.select(slice(40, 60)), metadata=list(range(100, 120)))
    assert ivf._faiss.ntotal == len(ivf) == 60 and ivf.metadata[-1] == 119
    expected, got = flat.search(queries, 60), ivf.search(queries, 60)
    assert torch.equal(got[1], expected[1])

    # full-k two-stage retrieval over the ivf first stage equals the flat one
    for gallery in (flat, ivf):
        gallery.nprobe = 4 if gallery is ivf else None
    assert torch.equal(rerank(model, texts, ivf, k=5, rerank_k=60)[1], rerank(model, texts, flat, k=5, rerank_k=60)[1])

    # fewer lists probed: approximate, but k valid results per query (short rows fall back to exact search)
    ivf.nprobe = 1
    scores, indices = ivf.search(queries, 60)
    assert indices.shape == (13, 60) and bool((indices >= 0).all())


def test_first_stage_options_survive_save_and_load(tmp_path):
    pytest.importorskip("faiss")
    torch.manual_seed(0)
    model = MPSMModel(MPSMConfig(**TINY)).eval()
    images, texts = gallery_and_queries(model)
    queries = texts.text_embeds
    for name, options in (("ivf", dict(first_stage="ivf", nlist=5, nprobe=2)),):
        index = MPSMIndex(images, **options).build()
        index.save(tmp_path / name)
        info = json.loads((tmp_path / name / "index.json").read_text())
        assert info["first_stage"] == name and info["faiss_index"] == "first_stage.faiss"
        assert os.path.isfile(tmp_path / name / "first_stage.faiss")
        loaded = MPSMIndex.load(tmp_path / name)
        assert loaded.options == index.options and loaded.is_built
        for got, expected in zip(loaded.search(queries, 10), index.search(queries, 10)):
            assert torch.equal(got, expected)
    assert MPSMIndex.load(tmp_path / "ivf", nprobe=5).nprobe == 5  # search settings may change on load

    # not built yet: options only, built at the first search after loading; a stale faiss file is removed
    MPSMIndex(images, first_stage="ivf", nlist=3).save(tmp_path / "ivf")
    assert not os.path.exists(tmp_path / "ivf" / "first_stage.faiss")
    loaded = MPSMIndex.load(tmp_path / "ivf")
    assert not loaded.is_built and loaded.nlist == 3 and loaded.nprobe == 16
    loaded.search(queries, 3)
    assert loaded.is_built

    MPSMIndex(images).save(tmp_path / "flat")
    info = json.loads((tmp_path / "flat" / "index.json").read_text())
    assert info["first_stage"] == "flat" and info["faiss_index"] is None
    assert MPSMIndex.load(tmp_path / "flat").first_stage == "flat"


def test_first_stage_errors(tmp_path, monkeypatch):
    import modeling_mpsm.retrieval as retrieval

    torch.manual_seed(0)
    model = MPSMModel(MPSMConfig(**TINY)).eval()
    images, texts = gallery_and_queries(model, num_images=30)
    with pytest.raises(ValueError, match=r"first_stage.*'flat', 'ivf'.*'pq'"):
        MPSMIndex(images, first_stage="pq")
    with pytest.raises(ValueError, match="`nprobe` applies to first_stage='ivf', not first_stage='flat'"):
        MPSMIndex(images, nprobe=4)
    with pytest.raises(ValueError, match="`nlist` must be a positive integer, got 0"):
        MPSMIndex(images, first_stage="ivf", nlist=0)
    if retrieval.faiss is not None:
        small = MPSMIndex(images, first_stage="ivf", nlist=64)
        with pytest.raises(ValueError, match=r"nlist=64 centroids .* at least nlist=64 items; the gallery holds 30"):
            small.search(texts.text_embeds, 5)
        index = MPSMIndex(images, first_stage="ivf", nlist=2).build()
        index.save(tmp_path / "ivf")
        MPSMIndex(images.select(slice(0, 20)), first_stage="ivf", nlist=2).build().save(tmp_path / "other")
        os.replace(tmp_path / "other" / "first_stage.faiss", tmp_path / "ivf" / "first_stage.faiss")
        with pytest.raises(ValueError, match="holds 20 items but the gallery 30"):
            MPSMIndex.load(tmp_path / "ivf")

    # without faiss: the exact first stage falls back to torch, an approximate one is refused
    expected = MPSMIndex(images).search(texts.text_embeds, 7)
    monkeypatch.setattr(retrieval, "faiss", None)
    got = MPSMIndex(images).search(texts.text_embeds, 7)
    assert torch.equal(got[1], expected[1])
    with pytest.raises(ImportError, match="first_stage='ivf' needs faiss \\(pip install faiss-cpu\\)"):
        MPSMIndex(images, first_stage="ivf")


def test_retrieve_cli_first_stage_and_queries_file(tmp_path, capsys, monkeypatch):

    import modeling_mpsm.retrieval as retrieval

    pytest.importorskip("faiss")
    data_dir, model_dir, captions, _, _ = cli_model_and_data(tmp_path)
    queries_file = tmp_path / "queries.txt"
    queries_file.write_text(f"{captions[10]}\n\n{captions[0]}\n{captions[20]}\n")
    script = load_script("examples/retrieve.py")
    base = ["--model", str(model_dir), "--data_dir", str(data_dir), "--k", "3", "--rerank_k", "8"]

    def run(*extra):  # main() in this process (a subprocess costs seconds of start-up): (status, stdout, stderr)
        capsys.readouterr()
        try:
            status = script.main([*base, *map(str, extra)])
        except SystemExit as exit:  # argparse errors
            status = exit.code
        return (status, *capsys.readouterr())

    flat = run("--queries_file", queries_file)
    ivf = run("--queries_file", queries_file, "--first_stage", "ivf", "--nlist", 2, "--nprobe", 2,
              "--index", tmp_path / "ivf")
    for status, _, stderr in (flat, ivf):
        assert status == 0, stderr[-3000:]
    assert len(ranked_images(flat[1])) == 3 and all(len(block) == 3 for block in ranked_images(flat[1]))
    assert ranked_images(ivf[1]) == ranked_images(flat[1])  # every list probed, every candidate re-ranked
    assert "first stage ivf (nlist 2, nprobe 2)" in ivf[1] and "first stage flat (exact)" in flat[1]
    info = json.loads((tmp_path / "ivf" / "index.json").read_text())
    assert (info["first_stage"], info["nlist"], info["nprobe"]) == ("ivf", 2, 2)

    status, stdout, stderr = run("--query", captions[0], "--index", tmp_path / "ivf", "--nprobe", 1)  # saved index
    assert status == 0 and "first stage ivf (nlist 2, nprobe 1)" in stdout, stderr[-3000:]

    empty = tmp_path / "empty.txt"
    empty.write_text("a dog\n.\n")
    for extra, message in (
        (["--index", tmp_path / "ivf", "--first_stage", "flat"], "error: the index in .* has first_stage 'ivf', not "
                                                                 "'flat': pass --first_stage ivf or another --index"),
        (["--first_stage", "ivf", "--nlist", 50], "error: first_stage='ivf' trains nlist=50 centroids .* the gallery "
                                                  "holds 8"),
        (["--first_stage", "flat", "--nprobe", 4], "error: --nprobe applies to --first_stage ivf, not flat"),
        (["--first_stage", "ivf", "--nprobe", 0], "error: --nprobe must be a positive integer, got 0"),
        (["--queries_file", empty], "error: line 2 of --queries_file .* holds no word: '.'"),
        (["--queries_file", queries_file, "--explain", tmp_path / "x.png"], "error: --explain needs --query"),
    ):
        arguments = extra if "--queries_file" in extra else ["--query", captions[0], *extra]
        status, _, stderr = run(*arguments)
        assert status == 2 and re.search(message, stderr) and "Traceback" not in stderr, (extra, stderr[-2000:])
    monkeypatch.setattr(retrieval, "faiss", None)
    status, _, stderr = run("--query", captions[0], "--first_stage", "ivf", "--index", tmp_path / "new")
    assert status == 2 and "error: --first_stage ivf needs faiss (pip install faiss-cpu)" in stderr
    assert not (tmp_path / "new").exists()  # refused before the gallery is encoded


@pytest.mark.skipif(not os.path.exists(ACCELERATE) and not shutil.which("accelerate"), reason="needs accelerate's CLI")
def test_retrieve_cli_shards_queries_over_processes(tmp_path):
    with socket.socket() as sock:  # a free port for the process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data_dir, model_dir, captions, _, _ = cli_model_and_data(tmp_path)
    queries_file = tmp_path / "queries.txt"
    queries_file.write_text("\n".join(captions[::8]) + "\n")  # 5 queries: an uneven split over 2 processes
    script = os.path.join(REPO, "examples", "retrieve.py")
    arguments = [script, "--model", str(model_dir), "--data_dir", str(data_dir), "--k", "3", "--rerank_k", "4",
                 "--queries_file", str(queries_file), "--index", str(tmp_path / "index")]
    environment = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = ACCELERATE if os.path.exists(ACCELERATE) else shutil.which("accelerate")
    sharded = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(port), *arguments],
        env=environment, capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    assert "Traceback" not in sharded.stderr and "5 queries re-ranked by 2 processes" in sharded.stdout
    single = subprocess.run([sys.executable, *arguments], env=environment, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert ranked_images(sharded.stdout) == ranked_images(single.stdout) and len(ranked_images(single.stdout)) == 5
    query_lines = [line for line in sharded.stdout.splitlines() if line.startswith("query: ")]
    assert query_lines == [line for line in single.stdout.splitlines() if line.startswith("query: ")]


def test_retriever_and_score_matrix_run_under_bf16_autocast(model):
    """Autocast, as Accelerate's mixed precision runs evaluation: the retriever's encoding, first stage and re-ranking
    and `score_matrix` all run under `torch.autocast("cpu", bfloat16)` and agree with float32 to bf16's precision."""
    features, boxes, input_ids = tiny_inputs()
    retriever = MPSMRetriever(model)
    retriever.add_images(features, boxes)
    reference = retriever.search_text({"input_ids": input_ids[:1]}, k=9, rerank_k=9)
    exhaustive = score_matrix(model, retriever.images.cache, retriever.encode_texts({"input_ids": input_ids}),
                              progress=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_retriever = MPSMRetriever(model)
        autocast_retriever.add_images(features, boxes)
        results = autocast_retriever.search_text({"input_ids": input_ids[:1]}, k=9, rerank_k=9)
        texts = autocast_retriever.encode_texts({"input_ids": input_ids})
        scores = score_matrix(model, autocast_retriever.images.cache, texts, progress=False)
    assert torch.isfinite(scores).all() and scores.dtype == torch.float32
    torch.testing.assert_close(scores, exhaustive, atol=0.02, rtol=0)
    by_index = {result["index"]: result["score"] for result in reference}
    assert sorted(by_index) == sorted(result["index"] for result in results)
    for result in results:
        assert result["score"] == pytest.approx(by_index[result["index"]], abs=0.02)
