import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modeling_mpsm import MPSMConfig, MPSMEnsembleConfig, MPSMEnsembleModel, MPSMModel
from modeling_mpsm.modeling_mpsm import block_shape, pair_bytes
from modeling_mpsm.scoring import encode_images, encode_texts, refine_top_k, score_matrix


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_dim=32, vocab_size=50, word_dim=16, embed_size=32, sim_dim=16)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = MPSMModel(MPSMConfig(**{**TINY, **overrides})).eval()
    for module in model.modules():  # non-trivial running statistics for the SRGR batch norms
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.fill_(0.2)
            module.running_var.fill_(1.5)
    return model


def tiny_batches(num_images=7, num_texts=11, seed=0):
    """Image and caption input batches of uneven sizes, region counts and caption lengths."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_images, 6, 32, generator=generator)
    corners = torch.rand(num_images, 6, 2, generator=generator) * 0.5
    boxes = torch.cat([corners, corners + 0.4], -1)
    region_mask = torch.ones(num_images, 6, dtype=torch.bool)
    region_mask[0, 4:] = False
    lengths = torch.randint(2, 10, (num_texts,), generator=generator)
    input_ids = torch.randint(1, 50, (num_texts, 10), generator=generator) * (torch.arange(10) < lengths[:, None])
    split = num_images // 2
    images = [
        {"region_features": features[:split], "boxes": boxes[:split], "region_mask": region_mask[:split]},
        {"region_features": features[split:, :5], "boxes": boxes[split:, :5], "region_mask": region_mask[split:, :5]},
    ]
    texts = [{"input_ids": input_ids[:5]}, {"input_ids": input_ids[5:, : int(lengths[5:].max())]}]
    return images, texts


def pairwise_scores(model, images, texts):
    """Reference: every pair scored on its own."""
    with torch.no_grad():
        return torch.tensor([
            [model.similarity(images.select([i]), texts.select([j])).item() for j in range(texts.num_items)]
            for i in range(images.num_items)
        ])


@pytest.mark.parametrize(
    "make_model",
    [
        lambda: tiny_model(),
        lambda: tiny_model(1, similarity="joint", streams="both"),
        lambda: tiny_model(2, word_self_attention=True, text_guided_image_features=True),
        lambda: MPSMEnsembleModel(MPSMEnsembleConfig(dis_config=TINY, dir_config=TINY)).eval(),
    ],
    ids=["dis", "joint-both-streams", "seed002", "ensemble"],
)
def test_blocked_scores_equal_pairwise(make_model):
    model = make_model()
    image_batches, text_batches = tiny_batches()
    images = encode_images(model, image_batches, progress=False)
    texts = encode_texts(model, text_batches, progress=False)
    expected = pairwise_scores(model, images, texts)
    for pairs in (1, 6, 20, 10_000):
        scores = score_matrix(model, images, texts, max_pairs_per_block=pairs, progress=False)
        assert scores.shape == (7, 11) and scores.dtype == torch.float32
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    # raw batches are encoded on the fly, to the same result
    torch.testing.assert_close(score_matrix(model, image_batches, text_batches, progress=False), expected, atol=1e-5, rtol=0)


def test_caches_pad_to_the_longest_batch():
    model = tiny_model()
    image_batches, text_batches = tiny_batches()
    images = encode_images(model, image_batches, progress=False)
    texts = encode_texts(model, text_batches, progress=False)
    assert images.region_embeds.shape == (7, 6, 32) and not images.region_mask[3:, 5].any()
    assert texts.word_embeds.shape == (11, 10, 32) and texts.attention_mask.shape == (11, 10)


def test_memory_bound_sets_block_size_not_scores():
    model = tiny_model()
    image_batches, text_batches = tiny_batches()
    images = encode_images(model, image_batches, progress=False)
    texts = encode_texts(model, text_batches, progress=False)
    per_pair = pair_bytes(model, 6, 6)
    small, large = block_shape(7, 11, (8 * per_pair) // per_pair), block_shape(7, 11, (100 * per_pair) // per_pair)
    assert small[0] * small[1] <= 8 and small != large
    first = score_matrix(model, images, texts, max_block_bytes=8 * per_pair, progress=False)
    second = score_matrix(model, images, texts, max_block_bytes=100 * per_pair, progress=False)
    torch.testing.assert_close(first, second, atol=1e-6, rtol=0)


def scored_in_fp32_and_bf16():
    """A tiny model, caches of 12 images and 20 captions, and their fp32 and raw bf16 (no re-scoring) matrices."""
    model = tiny_model(3)
    image_batches, text_batches = tiny_batches(12, 20, seed=1)
    images = encode_images(model, image_batches, progress=False)
    texts = encode_texts(model, text_batches, progress=False)
    fp32 = score_matrix(model, images, texts, progress=False)
    bf16 = score_matrix(model, images, texts, dtype=torch.bfloat16, refine_k=0, progress=False)
    return model, images, texts, fp32, bf16


def test_bf16_scoring_agrees_with_fp32_ranking_and_leaves_the_model_alone():
    model, images, texts, fp32, bf16 = scored_in_fp32_and_bf16()
    assert bf16.dtype == torch.float32 and 0 < (bf16 - fp32).abs().max() < 0.05
    ranks = lambda x: x.argsort(1).argsort(1).float()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([ranks(fp32.T).flatten(), ranks(bf16.T).flatten()]))[0, 1]
    assert spearman > 0.9
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert images.region_embeds.dtype == torch.float32 and texts.word_embeds.dtype == torch.float32


def test_refinement_rescores_the_reduced_precision_top_k_in_float32():
    model, images, texts, fp32, raw = scored_in_fp32_and_bf16()
    refined = score_matrix(model, images, texts, dtype=torch.bfloat16, refine_k=3, progress=False)
    exact = (refined - fp32).abs() <= 1e-6
    # the 3 best captions of every image (by the bf16 scores) were re-scored in float32 ...
    assert exact.gather(1, raw.topk(3, dim=1).indices).all()
    # ... so were 3 images of every caption; every other entry kept its bf16 score
    assert (exact.sum(0) >= 3).all() and exact.sum() >= 20 * 3
    assert torch.equal(refined[~exact], raw[~exact]) and not exact.all()
    # the function itself, on a copy: k as large as the matrix re-scores everything
    torch.testing.assert_close(refine_top_k(model, images, texts, raw.clone(), k=20, progress=False), fp32,
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="refine_k"):
        score_matrix(model, images, texts, dtype=torch.bfloat16, refine_k=-1, progress=False)


def test_scoring_benchmark_runs_and_draws_its_plot(tmp_path):
    """Smoke run of benchmarks/scoring.py (small model): every method reported, the ratio line and the PNG."""
    plot = tmp_path / "scoring.png"
    environment = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, os.path.join(REPO, "benchmarks", "scoring.py"), "--quick", "--no_compile", "--rounds",
               "1", "--plot", str(plot)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("(a) SGRAF scheme, fp32 eager", "(b) package path, fp32 eager", "(b) package path, bf16 eager",
                 "(b) package path, auto eager", "of the faster of fp32 and bf16 eager", "projected 1000 x 5000",
                 "bf16 eager + fp32 top-20 vs fp32 eager"):
        assert line in result.stdout, result.stdout
    assert "R@1 100.0%, R@5 100.0%, R@10 100.0%" in result.stdout.split("bf16 eager + fp32 top-20")[1]
    with open(plot, "rb") as file:
        header = file.read(24)
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and (width, height) == (900, 360)  # a bar per method


SHARDED_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from accelerate import Accelerator
    sys.path.insert(0, {tests!r})
    from test_scoring import tiny_batches, tiny_model
    from modeling_mpsm.scoring import encode_images, encode_texts, score_matrix

    accelerator = Accelerator(cpu=True)
    model = tiny_model()
    image_batches, text_batches = tiny_batches()
    images = encode_images(model, image_batches, progress=False)
    texts = encode_texts(model, text_batches, progress=False)
    sharded = score_matrix(model, images, texts, max_pairs_per_block=5, accelerator=accelerator)
    single = score_matrix(model, images, texts, max_pairs_per_block=5, progress=False)
    assert sharded.shape == (7, 11), sharded.shape
    assert (sharded - single).abs().max() <= 1e-6
    if accelerator.is_main_process:
        torch.save({{"sharded": sharded, "single": single}}, sys.argv[1])
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
    """
)


def test_two_process_sharding_matches_single_process(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED_SCRIPT.format(tests=os.path.join(REPO, "tests")))
    output = tmp_path / "scores.pt"
    environment = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(output)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = torch.load(output)
    torch.testing.assert_close(scores["sharded"], scores["single"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("faster", [torch.float32, torch.bfloat16])
def test_auto_dtype_takes_the_faster_measured_dtype_once_per_process(monkeypatch, caplog, faster):
    """`dtype="auto"` times both dtypes on a probe block (here with a clock that makes `faster` 10x faster), takes the
    faster when nothing is re-scored, logs the choice, and measures only once."""
    from modeling_mpsm import scoring

    model = tiny_model(seed=3)
    images, texts = tiny_batches()
    image_cache, text_cache = encode_images(model, images, progress=False), encode_texts(model, texts, progress=False)
    current = {"dtype": torch.float32, "now": 0.0}
    real_similarity = MPSMModel.similarity

    def timed_similarity(self, image, text):  # advances the fake clock by the cost of the dtype being probed
        current["now"] += 1.0 if image.region_embeds.dtype == faster else 10.0
        return real_similarity(self, image, text)

    monkeypatch.setattr(scoring.time, "perf_counter", lambda: current["now"])
    monkeypatch.setattr(MPSMModel, "similarity", timed_similarity)
    with caplog.at_level("WARNING", logger="modeling_mpsm.scoring"):
        choice = scoring.choose_scoring_dtype(model, image_cache, text_cache)
    assert choice == faster and "scoring dtype auto" in caplog.text
    assert str(faster).replace("torch.", "") in caplog.text.splitlines()[-1]
    monkeypatch.setattr(MPSMModel, "similarity", real_similarity)
    reference = score_matrix(model, image_cache, text_cache, progress=False)
    automatic = score_matrix(model, image_cache, text_cache, dtype="auto", refine_k=20, progress=False)
    torch.testing.assert_close(automatic, reference, atol=0 if faster == torch.float32 else 1e-6, rtol=0)
    assert len(model.scoring_speed) == 1  # measured once, reused by score_matrix
    with pytest.raises(ValueError, match="dtype"):
        score_matrix(model, image_cache, text_cache, dtype="fastest", progress=False)


def test_auto_dtype_counts_the_float32_rescoring_of_the_top_k(monkeypatch):
    """bf16 pays for every pair once but then re-scores (images + captions) x k pairs in float32: with bf16 pairs 4x
    faster (1 vs 4 us) and a re-scoring call of 20 candidates taking 2 ms, 100 x 500 pairs cost 200 ms in float32
    against 50 + 600 * 2 = 1,250 ms in bf16 (float32 wins); 2,000 x 10,000 pairs cost 80 s against 20 + 24 = 44 s;
    shared by 8 processes, each scores an eighth of the pairs but re-scores every query: 10 s against 2.5 + 24 s."""
    from modeling_mpsm import scoring

    model = tiny_model(seed=3)
    images, texts = tiny_batches()
    image_cache, text_cache = encode_images(model, images, progress=False), encode_texts(model, texts, progress=False)
    model.scoring_speed = {"cpu": ({torch.float32: 4e-6, torch.bfloat16: 1e-6}, 2e-3)}
    for (num_images, num_texts), refine_k, processes, expected in [
        ((100, 500), 20, 1, torch.float32), ((100, 500), 0, 1, torch.bfloat16), ((2000, 10000), 20, 1, torch.bfloat16),
        ((2000, 10000), 20, 8, torch.float32),
    ]:
        monkeypatch.setattr(type(image_cache), "num_items", num_images)
        monkeypatch.setattr(type(text_cache), "num_items", num_texts)
        assert scoring.choose_scoring_dtype(model, image_cache, text_cache, refine_k, processes) == expected


def test_train_step_benchmark_runs_each_configuration_in_its_own_process():
    """benchmarks/train_step.py at a toy size: one process per configuration, a row per configuration and the
    memory ratio of gradient checkpointing (figures themselves are the benchmark's business, not a test's)."""
    import subprocess
    import sys

    command = [sys.executable, os.path.join(REPO, "benchmarks", "train_step.py"), "--batch_sizes", "6", "--embed", "16",
               "--sim", "8", "--word", "8", "--img", "12", "--vocab", "30", "--rounds", "1", "--steps", "1",
               "--warmup", "1", "--bf16_rows"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "GFLOP/s float32" in result.stdout and "bfloat16" in result.stdout  # the peaks of this run, printed
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 6 |")]
    assert [row.split("|")[2].strip() for row in rows] == [
        "MPSM", "MPSM, gradient checkpointing", "MPSM, bf16 autocast", "checkpointing: memory / without"]
    seconds = [float(row.split("|")[3]) for row in rows[:3]]
    assert all(value > 0 for value in seconds)
