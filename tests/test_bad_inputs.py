"""Bad inputs across the package: each raises (or, for a CLI, exits non-zero printing one line, no traceback) with a
message naming the argument or file and what was expected, and leaves no partial output behind.

Cases already covered elsewhere (tests/test_processor.py, test_modeling.py, test_data.py, test_training.py,
test_publishing.py) are not repeated here; docs/errors.md lists every case with the test that covers it.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch

from modeling_mpsm import MPSMConfig, MPSMModel, MPSMProcessor
from modeling_mpsm.data import ScanSplit, convert_to_arrow, load_split
from modeling_mpsm.data.vocabulary import build_tokenizer, build_vocabulary

import tiny


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples")
TINY = dict(embed_size=16, sim_dim=8, word_dim=8, kgid_layers=1, srgr_steps=1)
TINY_SET = ["--set", *(f"{key}={value}" for key, value in TINY.items())]


def env():
    return {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_script(name, *args, timeout=180):
    """The example script `name` as a subprocess (a real exit code and stderr)."""
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *map(str, args)], capture_output=True,
                          text=True, env=env(), timeout=timeout)


def run_main(capsys, name, *args):
    """`main(args)` of the example script `name` in this process (saves the ~4 s start-up of a subprocess; the
    subprocess cases above show that the same `error:` line and exit code reach the shell)."""
    capsys.readouterr()
    try:
        status = load_script(name).main([*map(str, args)])
    except SystemExit as exit:  # argparse errors
        status = exit.code
    return subprocess.CompletedProcess(name, status, *capsys.readouterr())


def load_script(name):
    return tiny.load_script(f"examples/{name}")


def assert_user_error(result, *fragments):
    """Non-zero exit, an `error:` line holding every fragment, and no traceback dump."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def files(directory):
    """Every file and folder under `directory`, relative (an unchanged set means no new or half-written output)."""
    found = set()
    for root, dirs, names in os.walk(directory):
        found.update(os.path.relpath(os.path.join(root, name), directory) for name in dirs + names)
    return found


def copy_scan(source, target, splits=("train", "dev", "test")):
    os.makedirs(target)
    for name in os.listdir(source):
        if name.split("_")[0] in splits and not os.path.isdir(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), target)
    return str(target)


def save_model(directory, data_dir, img_dim=16, min_count=1):
    """A tiny untrained model with its processor, as a training run saves them."""
    split = ScanSplit(data_dir, "train")
    tokenizer = build_tokenizer(build_vocabulary(split.captions, min_count=min_count))
    processor = MPSMProcessor(tokenizer, num_regions=split.num_regions, dependency_parser="fallback",
                              region_feature_dim=img_dim)
    torch.manual_seed(0)
    model = MPSMModel(MPSMConfig(img_dim=img_dim, vocab_size=len(tokenizer), **TINY))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def model_dir(data_dir, tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("model"), data_dir)


@pytest.fixture
def copied_model(model_dir, tmp_path):
    return shutil.copytree(model_dir, tmp_path / "model")


@pytest.fixture
def mount(tmp_path):
    """`mount(options)`: a fresh tmpfs (e.g. "size=64k" for a nearly full disk, "ro" for a read-only one), unmounted
    after the test; skips where mounting is not permitted."""
    mounted = []

    def make(options):
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(point)
        return str(point)

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def read_only_dir(mount, tmp_path):
    """A directory nothing can be written to: a read-only tmpfs (root ignores permission bits), else mode 0o555."""
    if os.geteuid() == 0:
        return mount("ro,size=64k")
    path = tmp_path / "read_only"
    path.mkdir(mode=0o555)
    return str(path)


# ------------------------------------------------------------------------------------------------------ processor
@pytest.fixture(scope="module")
def processor(model_dir):
    return MPSMProcessor.from_pretrained(model_dir)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"text": ["a dog", 3]}, r"`text\[1\]` must be a string .*got int"),
        ({"text": [""]}, r"`text\[0\]` has no word tokens: ''"),
        ({"region_features": np.array([[["x"] * 16]])}, "`region_features` must be an array, a tensor or a list of numbers"),
        ({"region_features": np.zeros((1, 2, 16)), "boxes": np.tile([-5, 0, 10, 10], (1, 2, 1)),
          "image_sizes": [[20, 20]]}, "`boxes` must lie inside the image"),
    ],
    ids=["text-not-a-string", "empty-caption", "string-features", "box-left-of-image"],
)
def test_processor_rejects(processor, inputs, message):
    with pytest.raises(ValueError, match=message):
        processor(**inputs)


def test_unknown_words_only_become_unk(processor):
    ids = processor(text="zzyzx qwxq")["input_ids"][0].tolist()
    vocab = processor.tokenizer.get_vocab()
    assert ids == [vocab["<start>"], vocab["<unk>"], vocab["<unk>"], vocab["<end>"]]


def test_corrupt_tokenizer_file_is_named(copied_model):
    (copied_model / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"{copied_model}: .*tokenizer.json.* is not valid JSON"):
        MPSMProcessor.from_pretrained(copied_model)


# ------------------------------------------------------------------------------------------------------ model
@pytest.fixture(scope="module")
def model_and_batch(model_dir, processor):
    model = MPSMModel.from_pretrained(model_dir).eval()
    batch = processor(text=["a dog", "a red car"], region_features=torch.rand(2, 8, 16),
                      boxes=torch.tensor([0.1, 0.1, 0.5, 0.5]).repeat(2, 8, 1))
    return model, dict(batch)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.update(region_features=b["region_features"].long()), "`region_features` must be a floating-point tensor, got torch.int64"),
        (lambda b: b.update(input_ids=-b["input_ids"]), r"`input_ids` must be in \[0, \d+\) \(config.vocab_size\)"),
        (lambda b: b.update(dependency_adjacency=b["dependency_adjacency"] * float("nan")), "`dependency_adjacency` contains NaN or Inf"),
        (lambda b: b.update(input_ids=b["input_ids"][:, :0], attention_mask=b["attention_mask"][:, :0],
                            dependency_adjacency=b["dependency_adjacency"][:, :0, :0]), "`input_ids` must hold at least one caption with one word"),
        (lambda b: b.update(region_features=b["region_features"][:, :0], region_mask=b["region_mask"][:, :0],
                            boxes=b["boxes"][:, :0]), "`region_features` must hold at least one image with one region"),
    ],
    ids=["int-features", "negative-ids", "nan-adjacency", "empty-captions", "zero-regions"],
)
def test_model_rejects(model_and_batch, change, message):
    model, batch = model_and_batch
    batch = dict(batch)
    change(batch)
    with pytest.raises(ValueError, match=message):
        model(**batch)


def test_float64_features_are_cast_not_rejected(model_and_batch):
    model, batch = model_and_batch
    with torch.no_grad():
        expected = model(**batch).logits_per_image
        scores = model(**{**batch, "region_features": batch["region_features"].double()}).logits_per_image
    torch.testing.assert_close(scores, expected)


# ------------------------------------------------------------------------------------------------------ checkpoints
def test_truncated_weights_are_named(copied_model):
    weights = copied_model / "model.safetensors"
    with open(weights, "r+b") as file:
        file.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(OSError, match=rf"{copied_model}: model.safetensors is truncated or corrupt"):
        MPSMModel.from_pretrained(copied_model)


def test_garbage_weights_are_named(copied_model):
    (copied_model / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(OSError, match="model.safetensors is truncated or corrupt"):
        MPSMModel.from_pretrained(copied_model)


def test_config_that_does_not_fit_the_weights(copied_model):
    config = json.loads((copied_model / "config.json").read_text())
    (copied_model / "config.json").write_text(json.dumps({**config, "embed_size": 32}))
    with pytest.raises(ValueError, match=rf"{copied_model}: the weights in model.safetensors do not match config.json"):
        MPSMModel.from_pretrained(copied_model)


# ------------------------------------------------------------------------------------------------------ data reader
def write_npy_bytes(path, data: bytes):
    with open(path, "wb") as file:
        file.write(data)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: write_npy_bytes(f"{d}/test_ims.npy", b"\x00garbage" * 20), r"test_ims\.npy is not a valid \.npy file"),
        (lambda d: np.save(f"{d}/test_ims.npy", np.zeros((10, 16), np.float32)), r"test_ims\.npy must hold \[images, regions, features\], got shape \(10, 16\)"),
        (lambda d: open(f"{d}/test_caps.txt", "w").close(), r"test_caps\.txt has 0 captions for 10 feature rows"),
    ],
    ids=["garbage-npy", "rank-2-features", "empty-captions-file"],
)
def test_scan_reader_rejects(data_dir, tmp_path, damage, message):
    scan = copy_scan(data_dir, tmp_path / "scan", splits=("test",))
    damage(scan)
    with pytest.raises(ValueError, match=message):
        ScanSplit(scan, "test")


def set_array(path, index, value):
    array = np.load(path)
    array[index] = value
    np.save(path, array)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: set_array(f"{d}/test_ims.npy", (3, 0, 0), np.nan), r"test_ims\.npy: images \[3\] have NaN, Inf"),
        (lambda d: set_array(f"{d}/test_ims.npy", (4, 1, 2), 1e6), r"test_ims\.npy: images \[4\] .*beyond the float16 range"),
        (lambda d: set_array(f"{d}/test_ims_bbx.npy", (2, 0, 2), -1.0), r"test_ims_bbx\.npy: images \[2\] .*x2 >= x1"),
        (lambda d: set_array(f"{d}/test_ims_bbx.npy", (5, 0, 3), 1e5), r"test_ims_bbx\.npy: images \[5\] have boxes outside the image"),
    ],
    ids=["nan-features", "float16-overflow", "box-x2-lt-x1", "box-outside-image"],
)
def test_conversion_rejects_bad_values_and_leaves_nothing(data_dir, tmp_path, damage, message):
    scan = copy_scan(data_dir, tmp_path / "scan", splits=("test",))
    damage(scan)
    before = files(tmp_path)
    with pytest.raises(datasets.exceptions.DatasetGenerationError) as error:
        convert_to_arrow(scan, str(tmp_path / "arrow"), splits=("test",))
    assert isinstance(error.value.__cause__, ValueError) and re.search(message, str(error.value.__cause__))
    assert files(tmp_path) == before  # no output directory, no temporary folder


@pytest.fixture(scope="module")
def arrow_dir(data_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("arrow") / "dataset")
    convert_to_arrow(data_dir, path, splits=("train", "dev"))
    return path


def test_arrow_dataset_without_the_split(arrow_dir):
    with pytest.raises(KeyError, match=r"has splits \['train', 'dev'\], not 'test'"):
        load_split(arrow_dir, "test")


def test_truncated_arrow_file_is_named(arrow_dir, tmp_path):
    damaged = shutil.copytree(arrow_dir, tmp_path / "dataset")
    (arrow_file,) = (damaged / "dev").glob("*.arrow")
    with open(arrow_file, "r+b") as file:
        file.truncate(os.path.getsize(arrow_file) // 2)
    with pytest.raises(ValueError, match=rf"{damaged}: an Arrow file of this dataset is truncated or corrupt"):
        load_split(str(damaged), "dev")


# ------------------------------------------------------------------------------------------------------ converter
def test_converter_cli_missing_split(data_dir, tmp_path):
    scan = copy_scan(data_dir, tmp_path / "scan", splits=("train",))
    result = run_script("prepare_data.py", "--data_dir", scan, "--output_dir", tmp_path / "out", "--parser", "fallback")
    assert_user_error(result, "error: Split 'dev' of", "dev_ims.npy does not exist")
    assert not (tmp_path / "out").exists()


def test_converter_cli_nan_features(data_dir, tmp_path, capsys):
    scan = copy_scan(data_dir, tmp_path / "scan", splits=("test",))
    set_array(f"{scan}/test_ims.npy", (1, 0, 0), np.inf)
    before = files(tmp_path)
    result = run_main(capsys, "prepare_data.py", "--data_dir", scan, "--output_dir", tmp_path / "out", "--splits",
                      "test", "--parser", "none")
    assert_user_error(result, "test_ims.npy: images [1] have NaN, Inf")
    assert files(tmp_path) == before


def test_converter_cli_read_only_output(data_dir, mount, tmp_path, capsys):
    target = read_only_dir(mount, tmp_path)
    before = files(target)
    result = run_main(capsys, "prepare_data.py", "--data_dir", data_dir, "--output_dir", f"{target}/out", "--splits", "test",
                        "--parser", "none")
    assert_user_error(result, "error:", "Read-only file system" if os.geteuid() == 0 else "Permission denied")
    assert files(target) == before


def test_converter_cli_full_disk(data_dir, mount):
    target = mount("size=48k")  # the test split's features alone are 10 x 36 x 16 x 2 bytes = 11.5 kB, Arrow needs more
    result = run_script("prepare_data.py", "--data_dir", data_dir, "--output_dir", f"{target}/out",
                        "--splits", "train", "dev", "test", "--parser", "none")
    assert_user_error(result, "error:", "No space left on device")
    assert files(target) == set()


def test_conversion_disk_full_midway_leaves_nothing(data_dir, tmp_path, monkeypatch):
    """The writer fails with ENOSPC after the first split is saved: no output, no temporary folder."""
    save = datasets.Dataset.save_to_disk
    saved = []

    def save_then_fail(self, path, *args, **kwargs):
        if saved:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "half-written.arrow"), "wb") as file:
                file.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        saved.append(path)
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_then_fail)
    before = files(tmp_path)
    with pytest.raises(OSError, match="No space left on device"):
        convert_to_arrow(data_dir, str(tmp_path / "arrow"), splits=("dev", "test"))
    assert len(saved) == 1 and files(tmp_path) == before


# ------------------------------------------------------------------------------------------------------ training CLI
def train(data, output_dir, *extra, capsys=None):
    """The training CLI as a subprocess, or in this process with `capsys`."""
    run = (lambda *args: run_main(capsys, "train_mpsm.py", *args)) if capsys else (lambda *args: run_script("train_mpsm.py", *args))
    return run("--data_dir", data, "--output_dir", output_dir, "--parser", "fallback", *TINY_SET, "--batch_size", "10", "--max_train_steps", "2", "--vocab_min_count", "1", *extra)


def test_training_cli_missing_dev_split(data_dir, tmp_path):
    scan = copy_scan(data_dir, tmp_path / "scan", splits=("train",))
    assert_user_error(train(scan, tmp_path / "run"), "error:", "dev_ims.npy")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "arguments, messages",
    [
        (("--resume_from_checkpoint", "latest"),
         ("error: No checkpoint to resume from:", "checkpoints/latest does not exist")),
        (("--batch_size", "1000"), ("error: The training split has fewer captions per process than --batch_size 1000",)),
        (("--set", "kgid_layers=-1"), ("error:", "kgid_layers")),
        (("--config", "{tmp}/nowhere.json"), ("--config", "nowhere.json: cannot read a JSON configuration")),
    ],
    ids=["resume-without-checkpoint", "batch-larger-than-the-data", "bad-model-setting", "missing-config-file"],
)
def test_training_cli_rejects_before_creating_the_run(data_dir, tmp_path, capsys, arguments, messages):
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    assert_user_error(train(data_dir, tmp_path / "run", *arguments, capsys=capsys), *messages)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("--learning_rate", "-1"), "--learning_rate must be a positive number, got -1.0."),
        (("--learning_rate", "nan"), "--learning_rate must be a positive number, got nan."),
        (("--weight_decay", "-0.1"), "--weight_decay must be a number >= 0, got -0.1."),
        (("--grad_clip", "0"), "--grad_clip must be a positive number, got 0.0."),
        (("--lr_decay_factor", "-0.5"), "--lr_decay_factor must be a positive number, got -0.5."),
        (("--lr_decay_epochs", "-1"), "--lr_decay_epochs must be integers >= 0 (epochs, 0-based), got [-1]."),
        (("--batch_size", "0"), "--batch_size must be a positive integer, got 0."),
        (("--max_train_steps", "0"), "--max_train_steps must be a positive integer, got 0."),
        (("--num_epochs", "0"), "--num_epochs must be a positive integer, got 0."),
        (("--gradient_accumulation_steps", "0"), "--gradient_accumulation_steps must be a positive integer, got 0."),
        (("--logging_steps", "0"), "--logging_steps must be a positive integer, got 0."),
        (("--eval_steps", "0"), "--eval_steps must be a positive integer, got 0."),
        (("--eval_batch_size", "0"), "--eval_batch_size must be a positive integer, got 0."),
        (("--max_nonfinite_steps", "0"), "--max_nonfinite_steps must be a positive integer, got 0."),
        (("--num_workers", "-1"), "--num_workers must be an integer >= 0, got -1."),
        (("--seed", "-1"), "--seed must be an integer >= 0, got -1."),
        (("--config", "{tmp}/lr.json"), "--learning_rate must be a positive number, got -1."),  # from the config file
    ],
    ids=["learning-rate-negative", "learning-rate-nan", "weight-decay-negative", "grad-clip-0", "lr-decay-factor-negative",
         "lr-decay-epochs-negative", "batch-size-0", "max-train-steps-0", "num-epochs-0", "accumulation-0",
         "logging-steps-0", "eval-steps-0", "eval-batch-size-0", "max-nonfinite-steps-0", "num-workers-negative",
         "seed-negative", "learning-rate-negative-in-config"],
)
def test_training_cli_rejects_bad_numbers(data_dir, tmp_path, capsys, arguments, message):
    """Refused up front, naming the flag and what is expected (before: torch's "Invalid learning rate: -1.0",
    DataLoader's or a ZeroDivisionError, or the value silently ignored)."""
    (tmp_path / "lr.json").write_text(json.dumps({"training": {"learning_rate": -1}}))
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    result = train(data_dir, tmp_path / "run", *arguments, capsys=capsys)
    assert result.returncode == 2
    assert_user_error(result, f"error: {message}")
    assert not (tmp_path / "run").exists()


def test_training_cli_negative_learning_rate_subprocess(data_dir, tmp_path):
    result = train(data_dir, tmp_path / "run", "--learning_rate", "-1")
    assert result.returncode == 2
    assert_user_error(result, "error: --learning_rate must be a positive number, got -1.0.")
    assert "Invalid learning rate" not in result.stderr


def test_training_cli_accepts_grad_clip_inf():
    args = load_script("train_mpsm.py").parse_args(["--data_dir", "d", "--output_dir", "o", "--grad_clip", "inf"])
    assert args.grad_clip == float("inf")  # no clipping


def test_training_cli_read_only_output(data_dir, mount, tmp_path):
    target = read_only_dir(mount, tmp_path)
    result = train(data_dir, f"{target}/run")
    assert_user_error(result, "error:", "Read-only file system" if os.geteuid() == 0 else "Permission denied")
    assert files(target) == set()


def test_training_cli_corrupt_checkpoint(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(data_dir, run, "--checkpointing_steps", "1", capsys=capsys).returncode == 0
    weights = run / "checkpoints" / "step_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    before = files(run)
    result = train(data_dir, run, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", capsys=capsys)
    assert_user_error(result, f"error: Checkpoint {run}/checkpoints/step_2 cannot be loaded")
    assert files(run) == before


def test_checkpoint_write_fails_with_disk_full(data_dir, tmp_path, monkeypatch):
    """ENOSPC in the middle of the step-4 checkpoint: exit 2, step 2 stays the latest and loads, no .tmp folder."""
    import accelerate

    save_state = accelerate.Accelerator.save_state

    def fail_at_step_4(self, output_dir, *args, **kwargs):
        if output_dir.endswith("step_4"):
            with open(os.path.join(output_dir, "model.safetensors"), "wb") as file:
                file.write(b"\0" * 64)  # half-written
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return save_state(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", fail_at_step_4)
    run = tmp_path / "run"
    argv = ["--data_dir", data_dir, "--output_dir", str(run), "--parser", "fallback", *TINY_SET, "--batch_size", "10",
            "--max_train_steps", "4", "--checkpointing_steps", "2", "--vocab_min_count", "1"]
    assert load_script("train_mpsm.py").main(argv) == 2
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_2"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_2"
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(run / "checkpoints" / "step_2" / "model.safetensors").values())


# ------------------------------------------------------------------------------------------------------ evaluation CLI
def evaluate(model, data, *extra, capsys=None):
    """The evaluation CLI as a subprocess, or in this process with `capsys`."""
    args = ["--model", model, "--data_dir", data, "--parser", "fallback", "--cpu", *extra]
    return run_main(capsys, "evaluate_mpsm.py", *args) if capsys else run_script("evaluate_mpsm.py", *args)


def test_evaluation_cli_missing_model(data_dir, tmp_path):
    assert_user_error(evaluate(tmp_path / "no_model", data_dir), f"error: model {tmp_path}/no_model: not a model folder")


def test_evaluation_cli_missing_split(model_dir, data_dir, tmp_path, capsys):
    scan = copy_scan(data_dir, tmp_path / "scan", splits=("train", "dev"))
    assert_user_error(evaluate(model_dir, scan, capsys=capsys), "error:", "test_ims.npy")
    assert not os.path.exists(os.path.join(scan, "arrow_cache"))


def test_evaluation_cli_vocabulary_of_another_model(copied_model, data_dir, tmp_path, capsys):
    other = save_model(tmp_path / "other", data_dir, min_count=3)  # a smaller vocabulary
    shutil.copy(os.path.join(other, "tokenizer.json"), copied_model / "tokenizer.json")
    result = evaluate(copied_model, data_dir, capsys=capsys)
    assert_user_error(result, f"{copied_model}/tokenizer.json has", "but", "config.json has vocab_size=")


def test_evaluation_cli_features_of_another_width(data_dir, tmp_path, capsys):
    model = save_model(tmp_path / "model8", data_dir, img_dim=8)
    result = evaluate(model, data_dir, capsys=capsys)
    assert_user_error(result, "region features of width 16, but the model", "expects img_dim=8")


def test_evaluation_cli_truncated_weights(copied_model, data_dir):
    weights = copied_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert_user_error(evaluate(copied_model, data_dir),
                      f"error: {copied_model}: model.safetensors is truncated or corrupt")


def test_evaluation_cli_read_only_output(model_dir, data_dir, mount, tmp_path, capsys):
    target = read_only_dir(mount, tmp_path)
    result = evaluate(model_dir, data_dir, "--output_json", f"{target}/results.json", capsys=capsys)
    assert_user_error(result, "error:", "Read-only file system" if os.geteuid() == 0 else "Permission denied")
    assert files(target) == set()


def test_evaluation_results_disk_full_midway(model_dir, data_dir, tmp_path, monkeypatch, capsys):
    """json.dump fails with ENOSPC after writing part of the file: no results.json, no temporary file."""
    script = load_script("evaluate_mpsm.py")

    def dump_then_fail(value, file, **kwargs):
        file.write('{"i2t_r1": ')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(script.json, "dump", dump_then_fail)
    output = tmp_path / "out"
    output.mkdir()
    status = script.main(["--model", model_dir, "--data_dir", data_dir, "--parser", "fallback", "--cpu",
                          "--output_json", str(output / "results.json")])
    assert status == 2 and "No space left on device" in capsys.readouterr().err
    assert os.listdir(output) == []


# ------------------------------------------------------------------------------------------------------ retrieval CLI
def retrieve(model, data, *extra, capsys=None):
    """The retrieval CLI as a subprocess, or in this process with `capsys`."""
    args = ["--model", model, "--data_dir", data, "--parser", "fallback", *extra]
    return run_main(capsys, "retrieve.py", *args) if capsys else run_script("retrieve.py", *args)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("--query", "   "), "error: --query must hold at least one word, got '   '."),
        (("--query", ""), "error: --query must hold at least one word, got ''."),
        (("--query", "... !!"), "error: --query must hold at least one word, got '... !!'."),
        (("--query", "a dog", "--k", "0"), "error: --k must be a positive integer, got 0."),
        (("--query", "a dog", "--k", "-3"), "error: --k must be a positive integer, got -3."),
        (("--query", "a dog", "--rerank_k", "0"), "error: --rerank_k must be a positive integer, got 0."),
        (("--query", "a dog", "--batch_size", "0"), "error: --batch_size must be a positive integer, got 0."),
    ],
    ids=["blank-query", "empty-query", "punctuation-query", "k-0", "k-negative", "rerank-k-0", "batch-size-0"],
)
def test_retrieval_cli_rejects(model_dir, data_dir, tmp_path, capsys, arguments, message):
    result = retrieve(model_dir, data_dir, "--index", tmp_path / "index", *arguments, capsys=capsys)
    assert result.returncode == 2
    assert_user_error(result, message)
    assert not (tmp_path / "index").exists()  # refused before the gallery is encoded


def test_retrieval_cli_blank_query_subprocess(model_dir, data_dir):
    result = retrieve(model_dir, data_dir, "--query", "   ")
    assert result.returncode == 2
    assert_user_error(result, "error: --query must hold at least one word, got '   '.")


def test_retrieval_cli_missing_split(model_dir, data_dir, capsys):
    result = retrieve(model_dir, data_dir, "--query", "a dog", "--split", "nowhere", capsys=capsys)
    assert result.returncode == 2
    assert_user_error(result, "error:", "nowhere")
    assert len(result.stderr.strip().splitlines()) == 1


def test_retrieval_cli_returns_k_results(model_dir, data_dir, capsys):
    result = retrieve(model_dir, data_dir, "--query", "a dog", "--k", "3", capsys=capsys)
    assert result.returncode == 0, result.stderr
    ranks = [line.split(".")[0].strip() for line in result.stdout.splitlines() if "image" in line and "score" in line]
    assert ranks == ["1", "2", "3"]
