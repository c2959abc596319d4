"""Mined partners (modeling_mpsm.partners) and the sampler and training script that use them: hand-computed TF-IDF
similarities and pairs, mutual pairs for any input, PartnerSampler.replace_partners, `train_mpsm.py --partners
captions|embeddings` (loss falls, partners.json, exact resumption, two processes)."""

import json
import math
import os
import shutil
import subprocess
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import modeling_mpsm.partners as partners_module
import modeling_mpsm.training as training
from modeling_mpsm.data import load_split, synthetic
from modeling_mpsm.partners import (
    TfidfSimilarity,
    global_image_embeddings,
    mine_caption_partners,
    mine_embedding_partners,
    pair_mutually,
)
from modeling_mpsm.processing_mpsm import get_dependency_parser
from modeling_mpsm.scoring import IMAGE_INPUTS
from modeling_mpsm.training import PartnerSampler

from test_distributed import ACCELERATE, free_port
from test_training import TRAIN_SCRIPT, load_train_script, read_log, scan_dir, subprocess_env, train_args  # noqa: F401
from tiny import tiny_models, tiny_processor


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as the training subprocesses of the tests run (OMP_NUM_THREADS=1): two threads on two shared
    cores made the in-process runs several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_mutual(partners, num_items):
    assert len(partners) == num_items
    assert all(partners[partner] == item for item, partner in enumerate(partners) if partner >= 0)
    assert partners.count(-1) == num_items % 2  # everything paired but the odd one out


# ------------------------------------------------------------------------------------------------ captions


@pytest.mark.parametrize("dense_share", [1 / 16, 0.5, 1.0], ids=["all-dense", "mixed", "all-postings"])
def test_tfidf_similarity_is_the_hand_computed_cosine(monkeypatch, dense_share):
    """Images {red, car}, {a, red, bus}, {blue, bus} (case and punctuation dropped as the processor does): red and
    bus are in 2 of 3 images (idf p = ln(4/3) + 1), car, a and blue in one (q = ln 2 + 1), so
    cos(0, 1) = cos(1, 2) = p^2 / (sqrt(p^2 + q^2) sqrt(2 p^2 + q^2)) and cos(0, 2) = 0; the same whether the words
    are held densely or in postings lists (share 0.5: red and bus dense, the others in postings)."""
    monkeypatch.setattr(partners_module, "DENSE_TERM_SHARE", dense_share)
    p, q = math.log(4 / 3) + 1, math.log(2) + 1
    shared = p * p / (math.sqrt(p * p + q * q) * math.sqrt(2 * p * p + q * q))
    similarity = TfidfSimilarity(["Red car.", "a RED bus", "blue bus"], captions_per_image=1)
    assert similarity.dense.shape[1] == {1 / 16: 5, 0.5: 2, 1.0: 0}[dense_share]
    expected = torch.tensor([[1.0, shared, 0.0], [shared, 1.0, shared], [0.0, shared, 1.0]])
    torch.testing.assert_close(similarity(torch.arange(3), torch.arange(3)), expected)
    torch.testing.assert_close(similarity(torch.tensor([2]), torch.tensor([1, 0])), expected[[2]][:, [1, 0]])


CAPTIONS = [
    # 0 and 1: a dalmatian and a frisbee; 2 and 3: bread at a market (rare words), all with common ones
    "a dalmatian catches a frisbee in the park", "a spotted dog leaps for a red frisbee",
    "a dalmatian jumps to catch a frisbee", "the dog with spots chases a frisbee on the grass",
    "two women sell bread at a market", "a woman in a red shirt buys bread at the market stall",
    "women selling loaves of bread at a street market", "a man and a woman at a bread stall in the market",
    "a man in a red shirt sits on the grass in the park", "a man reads a book in the park",
]


def test_caption_partners_pair_the_images_that_share_rare_words():
    assert mine_caption_partners(CAPTIONS[:8], captions_per_image=2) == [1, 0, 3, 2]


def test_an_odd_image_out_gets_minus_one():
    partners = mine_caption_partners(CAPTIONS[:6], captions_per_image=2)
    assert partners == [1, 0, -1]
    partners = mine_caption_partners(CAPTIONS, captions_per_image=2)
    assert partners[:4] == [1, 0, 3, 2] and partners[4] == -1


WORDS = "a the man woman dog red blue ball car runs sits on in near park street bread frisbee".split()


@settings(max_examples=40, deadline=None)
@given(
    captions=st.lists(st.lists(st.sampled_from(WORDS), max_size=6).map(" ".join), min_size=1, max_size=60),
    captions_per_image=st.integers(1, 3),
    top_k=st.integers(1, 4),
    chunk_size=st.integers(1, 7),
    dense_share=st.sampled_from([0.05, 0.5, 1.0]),
)
def test_caption_partners_are_always_mutual_and_complete(captions, captions_per_image, top_k, chunk_size,
                                                         dense_share):
    """Any captions (empty ones, repeated ones, fewer candidates than images): pairs hold both ways, every image is
    paired but one when their number is odd, whatever the block size and the number of candidates."""
    captions = captions[:len(captions) - len(captions) % captions_per_image] or ["a man"] * captions_per_image
    num_images = len(captions) // captions_per_image
    original = partners_module.DENSE_TERM_SHARE
    partners_module.DENSE_TERM_SHARE = dense_share
    try:
        partners = mine_caption_partners(captions, captions_per_image, top_k=top_k, chunk_size=chunk_size)
    finally:
        partners_module.DENSE_TERM_SHARE = original
    assert_mutual(partners, num_images)


def test_caption_partner_errors():
    with pytest.raises(ValueError, match="`captions` must hold `captions_per_image` \\(5\\) captions per image"):
        mine_caption_partners(["a man"] * 7)
    with pytest.raises(ValueError, match="`captions` must be a list of strings"):
        mine_caption_partners([["a man"] * 5])
    with pytest.raises(ValueError, match="`top_k` must be a positive integer"):
        mine_caption_partners(["a man"] * 10, top_k=0)


# ------------------------------------------------------------------------------------------------ embeddings


def unit(degrees):
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_embedding_partners_pair_greedily_by_cosine():
    """At 0, 10, 25 and 60 degrees (scaled, the cosine ignores norms): 0-10 is the closest pair; 25's nearest (10) is
    taken, so it pairs with 60. At 100, 175, 180 (odd): 175-180, and 100 is left out."""
    embeds = torch.tensor([unit(0), unit(25), unit(10), unit(60)]) * torch.tensor([[1.0], [3.0], [0.5], [2.0]])
    assert mine_embedding_partners(embeds) == [2, 3, 0, 1]
    assert mine_embedding_partners(torch.tensor([unit(100), unit(175), unit(180)])) == [-1, 2, 1]
    assert mine_embedding_partners(torch.ones(1, 4)) == [-1]


def greedy_reference(embeds):
    """Every pair i < j by decreasing cosine, taken when both are free (no candidates, no blocks)."""
    embeds = torch.nn.functional.normalize(embeds, dim=-1)
    similarity = (embeds @ embeds.T).tolist()
    pairs = sorted(((similarity[i][j], i, j) for i in range(len(embeds)) for j in range(i + 1, len(embeds))),
                   key=lambda pair: -pair[0])
    partners = [-1] * len(embeds)
    for _, i, j in pairs:
        if partners[i] < 0 and partners[j] < 0:
            partners[i], partners[j] = j, i
    return partners


@settings(max_examples=40, deadline=None)
@given(num_items=st.integers(2, 30), dim=st.integers(2, 8), top_k=st.integers(1, 5), chunk_size=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_embedding_partners_are_mutual_and_with_every_candidate_the_plain_greedy(num_items, dim, top_k, chunk_size,
                                                                               seed):
    embeds = torch.randn(num_items, dim, generator=torch.Generator().manual_seed(seed))
    assert_mutual(mine_embedding_partners(embeds, top_k=top_k, chunk_size=chunk_size), num_items)
    assert mine_embedding_partners(embeds, top_k=num_items, chunk_size=chunk_size) == greedy_reference(embeds)


def test_embedding_partner_errors():
    with pytest.raises(ValueError, match=r"`image_embeds` must be a tensor \[images, dim\], got \(4,\)"):
        mine_embedding_partners(torch.ones(4))
    with pytest.raises(ValueError, match="`image_embeds` must be finite"):
        mine_embedding_partners(torch.tensor([[1.0, 0.0], [math.nan, 1.0]]))
    with pytest.raises(ValueError, match="`chunk_size` must be a positive integer"):
        pair_mutually(lambda rows, columns: torch.zeros(len(rows), len(columns)), 4, chunk_size=0)


def test_global_image_embeddings_are_the_first_stage_v_bar(data_dir):
    """The embeddings mined from are `encode_image`'s v̄ of every training image, in order, in eval mode."""
    model, _ = tiny_models()
    model.train()
    dataset = load_split(data_dir, "train", parser=get_dependency_parser("fallback"))
    processor = tiny_processor()
    processor.num_regions = dataset.features["region_features"].shape[0]
    embeds = global_image_embeddings(model, dataset, processor, batch_size=7)
    assert model.training  # the mode is restored
    model.eval()
    rows = dataset.with_format("numpy")[:]
    inputs = processor(region_features=rows["region_features"], boxes=rows["boxes"])
    expected = model.encode_image(**{name: inputs[name] for name in IMAGE_INPUTS if name in inputs}).image_embeds
    assert embeds.shape == (len(dataset), model.config.embed_size)
    torch.testing.assert_close(embeds, expected)


# ------------------------------------------------------------------------------------------------ sampler


def test_replaced_partners_arrange_the_rest_of_the_epoch():
    """Images 0-1 and 2-3 are partners, then (after 6 of 16 items) 0-2 and 1-3. Items drawn keep their places, every
    caption is still drawn once per epoch, and the rest comes in pairs of the new partners where both images have
    captions left; the state (epoch, partners and where they took over) gives the same order to a new sampler."""
    k = 4
    sampler = PartnerSampler([1, 0, 3, 2], captions_per_image=k, seed=5)
    sampler.set_epoch(2)
    before = list(sampler)
    sampler.replace_partners([2, 3, 0, 1], position=6)
    after = list(sampler)
    assert after[:6] == before[:6] and sorted(after) == list(range(16))
    left = Counter(item // k for item in after[6:])
    paired = sum(min(left[a], left[b]) for a, b in ((0, 2), (1, 3)))
    units = list(zip(after[6:6 + 2 * paired:2], after[7:6 + 2 * paired:2]))
    assert all({first // k, second // k} in ({0, 2}, {1, 3}) for first, second in units)

    restored = PartnerSampler([1, 0, 3, 2], captions_per_image=k, seed=5)
    restored.load_state_dict(json.loads(json.dumps(sampler.state_dict())))  # plain JSON values
    assert list(restored) == after and restored.partners == [2, 3, 0, 1]
    restored.set_epoch(2)  # the same epoch: its history stays
    assert list(restored) == after
    restored.set_epoch(3)  # a new one: the new partners from its start, as a sampler built with them
    fresh = PartnerSampler([2, 3, 0, 1], captions_per_image=k, seed=5)
    fresh.set_epoch(3)
    assert list(restored) == list(fresh)


def test_replacing_partners_at_the_start_is_a_sampler_with_the_new_partners():
    sampler = PartnerSampler([1, 0, -1], captions_per_image=2, seed=1)
    sampler.replace_partners([-1, 2, 1], position=0)
    assert list(sampler) == list(PartnerSampler([-1, 2, 1], captions_per_image=2, seed=1))
    assert list(sampler)[-2:] == [0, 1]  # the unpaired image's captions last


def test_replace_partners_errors():
    sampler = PartnerSampler([1, 0, 3, 2], captions_per_image=2)
    with pytest.raises(ValueError, match="`partners` must pair images both ways: image 0 -> 1 -> 2"):
        sampler.replace_partners([1, 2, 0, -1], position=0)
    with pytest.raises(ValueError, match="`partners` must pair each image with another one, got image 2 -> 2"):
        sampler.replace_partners([1, 0, 2, -1], position=0)
    with pytest.raises(ValueError, match=r"`partners` must list one partner index \(int\) per image \(4\), got 3"):
        sampler.replace_partners([1, 0, -1], position=0)
    sampler.replace_partners([2, 3, 0, 1], position=4)
    with pytest.raises(ValueError, match="`position` must lie between 4 .* and 8 .*, got 2"):
        sampler.replace_partners([1, 0, 3, 2], position=2)


# ------------------------------------------------------------------------------------------------ the script


def losses_fall(output_dir, warmup_steps):
    losses = [record["loss"] for record in read_log(output_dir) if "loss" in record]
    hardest = losses[warmup_steps:]
    return sum(hardest[-4:]) / 4 < sum(hardest[:4]) / 4


def train_captions(data_dir):
    train = load_split(data_dir, "train", parser=get_dependency_parser("fallback"))
    return [caption for captions in train["captions"] for caption in captions]


def test_train_with_caption_partners(scan_dir, tmp_path):
    """--partners captions: the partners mined from the training captions, written to partners.json; loss falls."""
    argv = train_args(scan_dir, tmp_path, "--max_train_steps", "12", "--warmup_steps", "3", "--partners", "captions")
    assert load_train_script().main(argv) == 0
    with open(tmp_path / "partners.json", encoding="utf-8") as file:
        partners = json.load(file)
    assert partners == mine_caption_partners(train_captions(scan_dir))
    assert_mutual(partners, 24)
    assert losses_fall(str(tmp_path), warmup_steps=3)


def test_partner_flags_are_checked(scan_dir):
    script = load_train_script()
    with pytest.raises(SystemExit):  # refreshing needs partners to refresh
        script.parse_args(["--data_dir", scan_dir, "--output_dir", "o", "--batch_size", "10", "--partners", "captions",
                           "--partner_refresh_steps", "4"])
    with pytest.raises(SystemExit):
        script.parse_args(["--data_dir", scan_dir, "--output_dir", "o", "--batch_size", "10", "--partners",
                           "embeddings", "--partner_refresh_steps", "0"])


def reset_accelerate():
    """Accelerate's process-wide state, as a new process would have it (after a run stopped by an exception)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class Crash(Exception):
    pass


def test_embedding_partners_refresh_and_resume_exactly(scan_dir, tmp_path, monkeypatch):
    """--partners embeddings --partner_refresh_steps 3 (12 updates an epoch): new partners after updates 3, 6, 9 (mid
    epoch), 12 (its last) and 15, each caption still drawn once per epoch; loss falls; partners.json holds the last
    ones. A run stopped right after its step-6 checkpoint (taken after that step's new partners) and resumed ends
    with the uninterrupted run's weights, log and partners."""
    extra = ["--max_train_steps", "16", "--warmup_steps", "3", "--checkpointing_steps", "3", "--partners",
             "embeddings", "--partner_refresh_steps", "3"]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    drawn = Counter()
    train_batch = training._Loop.train_batch

    def recording_train_batch(loop, batch):
        if loop.state.epoch == 0:
            drawn.update(batch["image_ids"].tolist())
        return train_batch(loop, batch)

    with monkeypatch.context() as patch:
        patch.setattr(training._Loop, "train_batch", recording_train_batch)
        assert load_train_script().main(train_args(scan_dir, reference, *extra)) == 0
    assert drawn == Counter({image: 5 for image in range(24)})  # 12 batches of 10: every caption once
    log = read_log(str(reference))
    kept = {record["step"]: record["partners_kept"] for record in log if "partners_kept" in record}
    assert sorted(kept) == [3, 6, 9, 12, 15] and kept[3] < 1  # the model's partners are not the captions'
    assert losses_fall(str(reference), warmup_steps=3)
    with open(reference / "partners.json", encoding="utf-8") as file:
        partners = json.load(file)
    assert_mutual(partners, 24)
    assert partners != mine_caption_partners(train_captions(scan_dir))

    save_checkpoint = training.save_checkpoint

    def crash_after_step_6(accelerator, output_dir, step, *args):
        path = save_checkpoint(accelerator, output_dir, step, *args)
        if step == 6:
            raise Crash
        return path

    with monkeypatch.context() as patch:
        patch.setattr(training, "save_checkpoint", crash_after_step_6)
        with pytest.raises(Crash):
            load_train_script().main(train_args(scan_dir, interrupted, *extra))
    reset_accelerate()
    assert sorted(os.listdir(interrupted / "checkpoints")) == ["latest", "step_3", "step_6"]
    assert load_train_script().main(train_args(scan_dir, interrupted, *extra, "--resume_from_checkpoint",
                                               "latest")) == 0

    expected = load_file(str(reference / "checkpoints" / "step_16" / "model.safetensors"))
    resumed = load_file(str(interrupted / "checkpoints" / "step_16" / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    assert read_log(str(interrupted)) == log
    assert (interrupted / "partners.json").read_text() == (reference / "partners.json").read_text()


DDP_LAUNCHER = """
import importlib.util, json, os, sys
import modeling_mpsm.training as training

pattern, script_path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
spec = importlib.util.spec_from_file_location("train_mpsm", script_path)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
records = []
train_batch, replace = training._Loop.train_batch, training.PartnerSampler.replace_partners

def recording_train_batch(loop, batch):
    records.append({"epoch": loop.state.epoch, "images": batch["image_ids"].tolist()})
    return train_batch(loop, batch)

def recording_replace(sampler, partners, position):
    records.append({"partners": partners, "position": position})
    return replace(sampler, partners, position)

training._Loop.train_batch, training.PartnerSampler.replace_partners = recording_train_batch, recording_replace
status = script.main(argv)
with open(pattern.format(rank=os.environ["RANK"]), "w") as file:
    json.dump(records, file)
sys.exit(status)
"""


@pytest.mark.skipif(not os.path.exists(ACCELERATE) and not shutil.which("accelerate"), reason="needs accelerate's CLI")
def test_two_processes_mine_the_same_partners_and_draw_each_caption_once(tmp_path):
    """Two CPU processes (DDP over gloo), 16 images, batch 8 per process (5 updates an epoch), new partners every 2
    updates: both processes get the same partners at the same position (4 batches of 8 drawn by 2 processes = 32 after
    update 2), and together they draw every caption of epoch 0 once."""
    data_dir, output_dir = tmp_path / "scan", tmp_path / "run"
    synthetic.generate(str(data_dir), seed=5, num_train=16, num_dev=4, num_test=4, feature_dim=32, num_regions=8)
    launcher = tmp_path / "launcher.py"
    launcher.write_text(DDP_LAUNCHER)
    command = [
        ACCELERATE if os.path.exists(ACCELERATE) else shutil.which("accelerate"), "launch", "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(launcher), str(tmp_path / "records_{rank}.json"), TRAIN_SCRIPT,
        "--cpu", "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--parser", "fallback",
        "--set", "embed_size=32", "sim_dim=16", "word_dim=16", "kgid_layers=1", "srgr_steps=1",
        "--batch_size", "8", "--max_train_steps", "7", "--warmup_steps", "2", "--logging_steps", "1",
        "--partners", "embeddings", "--partner_refresh_steps", "2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads((tmp_path / f"records_{rank}.json").read_text()) for rank in range(2)]
    replaced = [[record for record in ranks if "partners" in record] for ranks in records]
    assert replaced[0] == replaced[1] and [record["position"] for record in replaced[0]] == [32, 64, 16]
    epoch_0 = Counter(image for ranks in records for record in ranks if record.get("epoch") == 0
                      for image in record["images"])
    assert epoch_0 == Counter({image: 5 for image in range(16)})
    with open(output_dir / "partners.json", encoding="utf-8") as file:
        assert json.load(file) == replaced[0][-1]["partners"]
