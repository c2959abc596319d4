"""Region-feature data sets on the Hub: `examples/prepare_data.py --format hub` writes Parquet shards and a card,
`datasets.load_dataset` and every `--data_dir` read them back equal to the SCAN source, `--push_to_hub` uploads them
(HfApi mocked), and a Hub id reaches `datasets.load_dataset`.

No network: `datasets` runs offline (as with HF_HUB_OFFLINE=1) with its cache in a temporary folder; the Hub id is
served by wrapping `datasets.load_dataset` so that the id loads the local folder.
"""

import json
import os
from pathlib import Path
from unittest import mock

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import DatasetCard

from modeling_mpsm import MPSMConfig, MPSMModel, MPSMProcessor
from modeling_mpsm.data import ScanSplit, caption_batches, convert_to_arrow, image_batches, load_split
from modeling_mpsm.data.hub import write_hub_folder
from modeling_mpsm.processing_mpsm import get_dependency_parser, tokenize_caption
from modeling_mpsm.data.vocabulary import build_tokenizer, build_vocabulary

import tiny


SPLITS = ("train", "dev", "test")
REPO_ID = "mpsm-org/tiny-regions"
TINY_SET = ["--set", "embed_size=16", "sim_dim=8", "word_dim=8", "kgid_layers=1", "srgr_steps=1"]


def load_script(script):
    return tiny.load_script(f"examples/{script}")


def run_main(capsys, script, *args):
    """`main(args)` of `examples/<script>` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        status = load_script(script).main([str(arg) for arg in args])
    except SystemExit as exit:  # argparse errors
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module", autouse=True)
def offline_datasets(tmp_path_factory):
    """`datasets` offline, caching what `load_dataset` prepares in a temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets_cache")))
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def hub_folder(data_dir, tmp_path_factory):
    """The synthetic SCAN set of conftest (20 / 10 / 10 images, 36 x 16 features) as a Hub folder, train in 3 shards."""
    folder = tmp_path_factory.mktemp("hub") / "tiny-regions"
    status = load_script("prepare_data.py").main([
        "--data_dir", data_dir, "--output_dir", str(folder), "--format", "hub", "--parser", "fallback",
        "--detector", "synthetic scenes (modeling_mpsm.data.synthetic)", "--max_shard_size", "20KB",
    ])
    assert status == 0
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(data_dir, tmp_path_factory):
    """A tiny untrained model with its processor (the error cases below fail on the data, after loading them)."""
    directory = tmp_path_factory.mktemp("model")
    tokenizer = build_tokenizer(build_vocabulary(ScanSplit(data_dir, "train").captions, min_count=1))
    processor = MPSMProcessor(tokenizer, num_regions=36, dependency_parser="fallback", region_feature_dim=16)
    processor.save_pretrained(directory)
    config = MPSMConfig(img_dim=16, vocab_size=len(tokenizer), embed_size=16, sim_dim=8, word_dim=8,
                        kgid_layers=1, srgr_steps=1)
    MPSMModel(config).save_pretrained(directory)
    return directory


def test_folder_holds_parquet_shards_and_a_card_with_metadata(hub_folder):
    files = sorted(str(path.relative_to(hub_folder)) for path in Path(hub_folder).rglob("*") if path.is_file())
    assert files == ["README.md", *(f"data/dev-0000{i}-of-00002.parquet" for i in range(2)),
                     *(f"data/test-0000{i}-of-00002.parquet" for i in range(2)),
                     *(f"data/train-0000{i}-of-00003.parquet" for i in range(3))]
    card = DatasetCard.load(Path(hub_folder) / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "unknown" and "placeholder" in card.text
    assert meta["task_categories"] == ["text-to-image", "image-to-text"] and meta["size_categories"] == ["n<1K"]
    assert meta["detector"] == "synthetic scenes (modeling_mpsm.data.synthetic)"
    assert meta["captions_per_image"] == 5 and meta["dependency_parser"] == "fallback"
    assert meta["configs"] == [{"config_name": "default", "data_files": [
        {"split": split, "path": f"data/{split}-*"} for split in SPLITS]}]
    features = {feature["name"]: feature for feature in meta["dataset_info"]["features"]}
    assert features["region_features"]["dtype"] == {"array2_d": {"shape": [36, 16], "dtype": "float16"}}
    assert features["captions"] == {"name": "captions", "list": "string", "length": 5}
    assert [(s["name"], s["num_examples"]) for s in meta["dataset_info"]["splits"]] == [("train", 20), ("dev", 10),
                                                                                        ("test", 10)]
    assert "caption `j` of row `i` is\ncaption `5i + j` of the split" in card.text
    assert "| `train` | 20 | 100 | 3 |" in card.text and "# tiny-regions" in card.text


def test_load_dataset_reads_back_the_scan_source(hub_folder, data_dir):
    loaded = datasets.load_dataset(hub_folder)
    assert list(loaded) == list(SPLITS)
    parser = get_dependency_parser("fallback")
    for name in SPLITS:
        source, split = ScanSplit(data_dir, name), loaded[name]
        assert split.features["region_features"] == datasets.Array2D((36, 16), "float16")
        assert split.features["boxes"] == datasets.Array2D((36, 4), "float32")
        rows = split.with_format("numpy")[:]
        np.testing.assert_array_equal(rows["image_id"], np.arange(len(source)))
        np.testing.assert_array_equal(rows["region_features"], np.asarray(source.images, dtype=np.float16))
        np.testing.assert_array_equal(rows["boxes"], source.normalized_boxes(0, len(source)))
        np.testing.assert_array_equal(rows["image_size"], source.image_sizes)
        assert rows["has_boxes"].all()
        captions = [caption for image in split["captions"] for caption in image]
        assert captions == source.captions  # caption j of row i is caption 5i + j
        heads = [caption for image in split["dependency_heads"] for caption in image]
        assert heads == parser.parse_batch([tokenize_caption(caption) for caption in source.captions])


def test_float32_features_are_stored_exactly(data_dir, tmp_path):
    arrow = convert_to_arrow(data_dir, tmp_path / "arrow", splits=("test",), feature_dtype="float32")
    write_hub_folder(arrow, tmp_path / "hub", detector="synthetic")
    split = load_split(tmp_path / "hub", "test")
    assert split.features["region_features"] == datasets.Array2D((36, 16), "float32")
    np.testing.assert_array_equal(split.with_format("numpy")["region_features"], ScanSplit(data_dir, "test").images)
    card = DatasetCard.load(tmp_path / "hub" / "README.md")
    assert "dependency_parser" not in card.data.to_dict() and "dependency_heads" not in card.text


def test_feature_dtype_must_be_float16_or_float32(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"`feature_dtype` must be one of \['float16', 'float32'\], got 'float64'\."):
        convert_to_arrow(data_dir, tmp_path / "arrow", splits=("test",), feature_dtype="float64")
    assert not (tmp_path / "arrow").exists()


def batches_equal(first, second):
    assert first.keys() == second.keys()
    for key in first:
        if isinstance(first[key], torch.Tensor):
            torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
        elif isinstance(first[key], np.ndarray):
            np.testing.assert_array_equal(first[key], second[key])
        else:
            assert first[key] == second[key], key


def test_package_reader_gives_the_batches_of_the_scan_conversion(hub_folder, data_dir, tmp_path):
    """`load_split` on the Hub folder feeds evaluation exactly as the conversion of the SCAN folder does."""
    scan = convert_to_arrow(data_dir, tmp_path / "arrow", splits=("test",), parser=get_dependency_parser("fallback"))
    hub = load_split(hub_folder, "test")
    for make in (image_batches, caption_batches):
        pairs = list(zip(make(hub, 7), make(scan["test"], 7), strict=True))
        assert len(pairs) == (2 if make is image_batches else 8)
        for from_hub, from_scan in pairs:
            batches_equal(from_hub, from_scan)


def test_hub_id_is_loaded_with_load_dataset(hub_folder, model_dir, tmp_path, monkeypatch, capsys):
    """A Hub id goes to `datasets.load_dataset` (here serving the id from the local folder), through the evaluation
    CLI too, whose results then name the dataset by its id."""
    load_dataset, calls = datasets.load_dataset, []

    def hub(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return load_dataset(hub_folder if path == REPO_ID else path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    split = load_split(REPO_ID, "dev")
    assert calls == [(REPO_ID, (), {})]
    assert split["captions"] == load_split(hub_folder, "dev")["captions"] and len(split) == 10

    status, out, err = run_main(capsys, "evaluate_mpsm.py", "--model", model_dir, "--data_dir", REPO_ID, "--cpu",
                                "--output_json", tmp_path / "results.json")
    assert status == 0, err
    assert calls[-1] == (REPO_ID, (), {}) and f"f30k: {REPO_ID}/test, 10 images" in out
    assert json.loads((tmp_path / "results.json").read_text())["dataset"] == REPO_ID


def test_unknown_hub_id_names_the_flag(model_dir, capsys):
    """The real `load_dataset`, offline: the id is not cached, so it cannot be loaded."""
    status, _, err = run_main(capsys, "evaluate_mpsm.py", "--model", model_dir, "--data_dir", "mpsm-org/not-cached",
                              "--cpu")
    assert status == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("error: --data_dir mpsm-org/not-cached is not a local folder, and loading "
                                           "it as a Hub dataset failed: Couldn't reach 'mpsm-org/not-cached'")


@pytest.mark.parametrize(
    "make, split, message",
    [
        (lambda tmp, hub: tmp / "nowhere", "test", "error: --data_dir {tmp}/nowhere: no such folder, and not a Hub "
                                                   "dataset id (ORG/NAME) either."),
        (lambda tmp, hub: hub, "testall", "--data_dir {hub} has splits ['train', 'dev', 'test'], not 'testall'."),
        (lambda tmp, hub: other_parquet(tmp), "test", "error: split 'test' of --data_dir {tmp}/other is not a "
                                                      "region-feature data set: it has no column ['region_features', "
                                                      "'boxes', 'has_boxes']. Expected one row per image"),
    ],
    ids=["missing-folder", "missing-split", "other-columns"],
)
def test_bad_data_dir_names_the_flag(make, split, message, hub_folder, model_dir, tmp_path, capsys):
    data = make(tmp_path, hub_folder)
    status, _, err = run_main(capsys, "retrieve.py", "--model", model_dir, "--data_dir", data, "--split", split,
                              "--query", "a dog")
    assert status == 2 and "Traceback" not in err, err
    assert message.format(tmp=tmp_path, hub=hub_folder) in err.splitlines()[-1]  # after the progress of load_dataset


def other_parquet(tmp_path):
    """A Parquet data set of other columns (a Hub folder, but not of region features)."""
    folder = tmp_path / "other"
    (folder / "data").mkdir(parents=True)
    other = datasets.Dataset.from_dict({"captions": [["a"] * 5]})
    other.to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    return folder


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--push_to_hub", REPO_ID], "error: --push_to_hub uploads a Hub dataset folder: add --format hub."),
        (["--format", "hub", "--private"], "error: --private applies to the repository of --push_to_hub"),
        (["--format", "hub", "--push_to_hub", "not/a/repo"], "error: --push_to_hub must be a Hub repository id "
                                                             "ORG/NAME, got 'not/a/repo'"),
        (["--format", "hub", "--max_shard_size", "big"], "error: --max_shard_size must be a positive size such as "
                                                          "500MB or a number of bytes, got 'big'."),
    ],
    ids=["push-without-hub-format", "private-without-push", "bad-repo-id", "bad-shard-size"],
)
def test_converter_flag_errors(arguments, message, data_dir, tmp_path, capsys):
    status, _, err = run_main(capsys, "prepare_data.py", "--data_dir", data_dir, "--output_dir", tmp_path / "out",
                              *arguments)
    assert status == 2 and message in err and not (tmp_path / "out").exists(), err


def test_converter_refuses_a_non_empty_output_before_converting(data_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    status, _, err = run_main(capsys, "prepare_data.py", "--data_dir", data_dir, "--output_dir", tmp_path / "out",
                              "--format", "hub", "--parser", "none")
    assert status == 1 and f"error: {tmp_path}/out exists and is not an empty folder: refusing to replace it." in err
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == ["notes.txt"]


def test_push_to_hub_creates_the_dataset_repo_and_uploads_the_folder(data_dir, tmp_path, capsys):
    uploaded = {}

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        uploaded["files"] = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        uploaded["card"] = DatasetCard.load(folder / "README.md")
        return mock.Mock(commit_url=f"https://huggingface.co/datasets/{REPO_ID}/commit/0")

    with mock.patch("modeling_mpsm.data.hub.HfApi") as hf_api:
        api = hf_api.return_value
        api.upload_folder.side_effect = upload_folder
        status, out, err = run_main(capsys, "prepare_data.py", "--data_dir", data_dir, "--output_dir", tmp_path / "hub",
                                    "--splits", "test", "--parser", "none", "--format", "hub", "--license", "cc-by-4.0",
                                    "--push_to_hub", REPO_ID, "--private")
    assert status == 0, err
    hf_api.assert_called_once_with()
    api.create_repo.assert_called_once_with(REPO_ID, repo_type="dataset", private=True, exist_ok=True)
    api.upload_folder.assert_called_once_with(folder_path=str(tmp_path / "hub"), repo_id=REPO_ID, repo_type="dataset",
                                              commit_message="Upload tiny-regions")
    assert uploaded["files"] == ["README.md", "data/test-00000-of-00001.parquet"]
    card = uploaded["card"]
    assert card.data.license == "cc-by-4.0" and card.data.pretty_name == "tiny-regions"
    assert f'load_dataset("{REPO_ID}", split="test")' in card.text and "placeholder" not in card.text
    assert f"uploaded to {REPO_ID}: https://huggingface.co/datasets/{REPO_ID}/commit/0" in out


def test_train_then_evaluate_from_the_hub_folder_as_from_the_scan_folder(hub_folder, data_dir, tmp_path, capsys):
    """Two updates from the Hub folder through the training CLI, then the evaluation CLI: the Hub folder and the SCAN
    folder give the same metrics."""
    run = tmp_path / "run"
    status, _, err = run_main(capsys, "train_mpsm.py", "--data_dir", hub_folder, "--output_dir", run, "--parser",
                              "fallback", *TINY_SET, "--batch_size", "10", "--max_train_steps", "2",
                              "--vocab_min_count", "1", "--cpu")
    assert status == 0, err
    results = {}
    for name, data in (("hub", hub_folder), ("scan", data_dir)):
        output = tmp_path / f"{name}.json"
        status, _, err = run_main(capsys, "evaluate_mpsm.py", "--model", run, "--data_dir", data, "--parser",
                                  "fallback", "--cpu", "--output_json", output)
        assert status == 0, err
        results[name] = {key: value for key, value in json.loads(output.read_text()).items() if key != "dataset"}
    # the synthetic scenes' side file (test_scenes.json) stays in the SCAN folder, so only there is the twin probe run
    assert "twin_accuracy" in results["scan"] and "twin_accuracy" not in results["hub"]
    del results["scan"]["twin_accuracy"]
    assert results["hub"] == results["scan"] and results["hub"]["rsum"] > 0
