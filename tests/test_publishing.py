"""Publishing to the Hub, offline: paper-size Hub configs, checkpoint checks, the model card and its model-index, the
upload calls (HfApi mocked) and the dry run of examples/publish_to_hub.py."""

import inspect
import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from huggingface_hub import ModelCard

from modeling_mpsm import MPSMConfig, MPSMEnsembleConfig, MPSMEnsembleModel, MPSMModel, MPSMProcessor
from modeling_mpsm.publishing import (
    HUB_CONFIGS_DIR,
    assemble_repo,
    check_checkpoint,
    load_metrics,
    publish,
)
from tiny import TINY, WORDS, load_script, tiny_processor


METRICS = {
    "i2t_r1": 52.5, "i2t_r5": 81.0, "i2t_r10": 90.25, "t2i_r1": 41.0, "t2i_r5": 72.5, "t2i_r10": 83.0,
    "rsum": 420.25, "dataset": "synthetic-scenes", "split": "test", "protocol": "1K", "seconds": 12.0,
}
PAPER = dict(img_dim=2048, vocab_size=8481, word_dim=300, embed_size=1024, sim_dim=256, kgid_layers=3,
             srgr_steps=3, lambda_softmax=9.0, margin=0.2, max_violation=True)


def save_checkpoint(path, ensemble=False):
    """A tiny trained-looking checkpoint: model and processor saved in `path`."""
    torch.manual_seed(0)
    model = MPSMModel(MPSMConfig(**TINY))
    if ensemble:
        model = MPSMEnsembleModel.from_members(model, MPSMModel(MPSMConfig(similarity="direction", **TINY)))
    model.save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint")
    save_checkpoint(path)
    return path


@pytest.fixture
def metrics_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(METRICS))
    return path


def random_batch(img_dim, vocab_size, num_images=2, num_texts=3, length=7):
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(num_images, 36, 2, 2, generator=generator).sort(dim=2).values  # [(x1, y1), (x2, y2)]
    return {
        "region_features": torch.randn(num_images, 36, img_dim, generator=generator),
        "boxes": corners.reshape(num_images, 36, 4),
        "input_ids": torch.randint(4, vocab_size, (num_texts, length), generator=generator),
        "attention_mask": torch.ones(num_texts, length, dtype=torch.long),
    }


# ---------------------------------------------------------------------------------------------------- hub_configs


@pytest.mark.parametrize("variant", ["dis", "dir", "ensemble"])
def test_hub_config_is_paper_size_loads_and_scores(variant, tmp_path):
    folder = HUB_CONFIGS_DIR / f"mpsm-{variant}"
    assert {"config.json", "training_args.json", "README.md"} <= set(os.listdir(folder))
    config_class, model_class = {
        "dis": (MPSMConfig, MPSMModel), "dir": (MPSMConfig, MPSMModel), "ensemble": (MPSMEnsembleConfig, MPSMEnsembleModel)
    }[variant]
    config = config_class.from_pretrained(folder)
    members = [config.dis_config, config.dir_config] if variant == "ensemble" else [config]
    for member in members:
        assert {key: getattr(member, key) for key in PAPER} == PAPER
        assert not hasattr(member, "num_regions")  # the paper's 36 regions are the processor's padding, not the model's
    assert inspect.signature(MPSMProcessor).parameters["num_regions"].default == 36
    assert [member.similarity for member in members] == {
        "dis": ["distance"], "dir": ["direction"], "ensemble": ["distance", "direction"]
    }[variant]
    assert config.auto_map["AutoModel"] == f"modeling_mpsm.{model_class.__name__}"

    torch.manual_seed(0)
    model = model_class(config).eval()
    assert model.num_parameters() == pytest.approx(39.9e6 * len(members), rel=0.01)
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    batch = random_batch(2048, 8481)
    with torch.no_grad():
        scores = model(**batch).logits_per_image
        loaded_scores = loaded(**batch).logits_per_image
    assert scores.shape == (2, 3) and ((scores > 0) & (scores < 1)).all()
    torch.testing.assert_close(loaded_scores, scores, rtol=0, atol=1e-6)


def model_fields(config):
    """The settings of a configuration, without the bookkeeping `save_pretrained` adds."""
    bookkeeping = {"architectures", "auto_map", "transformers_version", "_name_or_path", "dtype"}
    return {key: value for key, value in config.to_dict().items() if key not in bookkeeping}


def test_training_args_build_the_configs():
    blocks = {}
    for variant in ("dis", "dir"):
        args = json.loads((HUB_CONFIGS_DIR / f"mpsm-{variant}" / "training_args.json").read_text())
        assert set(args) == {"model", "training"}
        published = MPSMConfig.from_pretrained(HUB_CONFIGS_DIR / f"mpsm-{variant}")
        assert model_fields(MPSMConfig(**args["model"])) == model_fields(published)
        training = args["training"]
        assert training["learning_rate"] == 2e-4 and training["batch_size"] == 128 and training["grad_clip"] == 2.0
        assert training["num_epochs"] == 30 and training["lr_decay_factor"] == 0.1
        assert training["sum_violation_warmup_epochs"] >= 0 and 0 < training["lr_decay_epochs"] < 30
        blocks[variant] = args
    ensemble = json.loads((HUB_CONFIGS_DIR / "mpsm-ensemble" / "training_args.json").read_text())
    assert ensemble == {"members": blocks}


# ---------------------------------------------------------------------------------------------------- checks


def test_check_checkpoint_accepts_a_saved_model_and_processor(checkpoint):
    assert check_checkpoint(checkpoint).vocab_size == len(WORDS)


def test_check_checkpoint_names_the_missing_or_wrong_file(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        check_checkpoint(tmp_path)

    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        check_checkpoint(tmp_path)

    (tmp_path / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        check_checkpoint(tmp_path)

    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["extra"] = len(WORDS)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match=rf"tokenizer.json has {len(WORDS) + 1} words but .*config.json has "
                                         rf"vocab_size={len(WORDS)}"):
        check_checkpoint(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="config.json has model_type 'bert'"):
        check_checkpoint(tmp_path)


def test_assemble_repo_refuses_weights_of_another_configuration(checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    (tmp_path / "checkpoint" / "config.json").write_text(json.dumps({**config, "kgid_layers": 2}))
    with pytest.raises(ValueError, match="do not match its config.json: .*missing_keys.*textual_kgid.layers.1"):
        assemble_repo(tmp_path / "checkpoint", tmp_path / "repo", "mpsm-org/mpsm-dis-tiny")


def test_load_metrics_requires_the_recalls_and_the_dataset(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({key: value for key, value in METRICS.items() if key not in ("t2i_r5", "dataset")}))
    with pytest.raises(ValueError, match=r"lacks the keys \['t2i_r5', 'dataset'\]"):
        load_metrics(path)
    path.write_text(json.dumps({**METRICS, "rsum": "high"}))
    with pytest.raises(ValueError, match=r"\['rsum'\] must be numbers"):
        load_metrics(path)


# ---------------------------------------------------------------------------------------------------- the card


def check_model_index(card, metrics):
    """The card's model-index holds one result per direction and K, plus RSUM, equal to the metrics."""
    results = card.data.eval_results
    assert card.data.model_name == "mpsm-dis-tiny"
    found = {}
    for result in results:
        assert (result.task_type, result.dataset_name, result.dataset_split, result.dataset_config) == (
            "image-text-retrieval", metrics["dataset"], metrics["split"], metrics["protocol"]
        )
        direction = {"image-to-text": "i2t", "text-to-image": "t2i", None: None}[result.metric_config]
        key = "rsum" if result.metric_type == "rsum" else f"{direction}_r{result.metric_type.removeprefix('recall@')}"
        found[key] = result.metric_value
    assert found == {key: metrics[key] for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")}
    assert len(results) == 7


def test_assembled_repo_has_code_weights_processor_and_card(checkpoint, metrics_file, tmp_path):
    repo = tmp_path / "repo"
    files = assemble_repo(checkpoint, repo, "mpsm-org/mpsm-dis-tiny", load_metrics(metrics_file))
    assert [path.name for path in files] == [
        "README.md", "config.json", "configuration_mpsm.py", "model.safetensors", "modeling_mpsm.py",
        "pipeline_mpsm.py", "processing_mpsm.py", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    ]
    config = json.loads((repo / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_mpsm.MPSMConfig", "AutoModel": "modeling_mpsm.MPSMModel"}
    assert config["custom_pipelines"]["mpsm-retrieval"]["impl"] == "pipeline_mpsm.MPSMRetrievalPipeline"
    processor_config = json.loads((repo / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_mpsm.MPSMProcessor"}

    card = ModelCard.load(repo / "README.md")
    check_model_index(card, METRICS)
    assert card.data.library_name == "transformers" and "custom_code" in card.data.tags
    assert "MPSM (dis)" in card.text and "| 77.5 | 94.0 | 97.0 | 58.7 | 83.6 | 89.1 |" in card.text
    assert "| synthetic-scenes | test | 1K | 52.50 | 81.00 | 90.25 | 41.00 | 72.50 | 83.00 | 420.25 |" in card.text
    assert 'AutoModel.from_pretrained("mpsm-org/mpsm-dis-tiny", trust_remote_code=True)' in card.text


def test_ensemble_repo_is_one_checkpoint_and_its_card_says_why(tmp_path):
    save_checkpoint(tmp_path / "checkpoint", ensemble=True)
    (tmp_path / "checkpoint" / "training_args.json").write_text('{"members": {}}')
    files = assemble_repo(tmp_path / "checkpoint", tmp_path / "repo", "mpsm-org/mpsm-ensemble-tiny")
    assert {"model.safetensors", "training_args.json", "tokenizer.json"} <= {path.name for path in files}
    config = json.loads((tmp_path / "repo" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_mpsm.MPSMEnsembleModel"
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert "Why one repository holding both members" in card.text
    assert "| Flickr30K 1K | 80.2 | 94.9 | 98.0 | 61.5 | 84.5 | 90.1 |" in card.text
    assert "The settings of the runs are in `training_args.json`." in card.text
    assert card.data.eval_results is None and "No evaluation was attached" in card.text


# ---------------------------------------------------------------------------------------------------- upload


def test_publish_creates_the_repo_and_uploads_the_folder(checkpoint, metrics_file):
    uploaded = {}

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        uploaded["files"] = sorted(os.listdir(folder))
        uploaded["card"] = ModelCard.load(folder / "README.md")
        return mock.sentinel.commit

    with mock.patch("modeling_mpsm.publishing.HfApi") as hf_api:
        api = hf_api.return_value
        api.upload_folder.side_effect = upload_folder
        commit = publish(checkpoint, "mpsm-org/mpsm-dis-tiny", metrics_file, private=True)

    assert commit is mock.sentinel.commit
    hf_api.assert_called_once_with()
    api.create_repo.assert_called_once_with("mpsm-org/mpsm-dis-tiny", private=True, exist_ok=True, repo_type="model")
    api.create_branch.assert_not_called()
    api.upload_folder.assert_called_once_with(
        folder_path=mock.ANY,
        repo_id="mpsm-org/mpsm-dis-tiny",
        repo_type="model",
        commit_message="Upload mpsm-dis-tiny",
        revision=None,
    )
    assert not os.path.exists(api.upload_folder.call_args.kwargs["folder_path"])  # the staging folder is cleaned up
    assert {"model.safetensors", "config.json", "modeling_mpsm.py", "tokenizer.json", "README.md"} <= set(
        uploaded["files"]
    )
    check_model_index(uploaded["card"], METRICS)


def test_publish_to_a_branch_creates_it_first(checkpoint):
    with mock.patch("modeling_mpsm.publishing.HfApi") as hf_api:
        api = hf_api.return_value
        publish(checkpoint, "mpsm-org/mpsm-dis-tiny", revision="v0.1", commit_message="Epoch 30")
    api.create_repo.assert_called_once_with("mpsm-org/mpsm-dis-tiny", private=False, exist_ok=True, repo_type="model")
    api.create_branch.assert_called_once_with("mpsm-org/mpsm-dis-tiny", branch="v0.1", exist_ok=True,
                                              repo_type="model")
    api.upload_folder.assert_called_once_with(
        folder_path=mock.ANY, repo_id="mpsm-org/mpsm-dis-tiny", repo_type="model", commit_message="Epoch 30",
        revision="v0.1",
    )


def test_publish_script_dry_run_prints_files_and_card_and_uploads_nothing(checkpoint, metrics_file, capsys):
    script = load_script("examples/publish_to_hub.py")
    with mock.patch("modeling_mpsm.publishing.HfApi") as hf_api:
        script.main(["--checkpoint", str(checkpoint), "--repo_id", "mpsm-org/mpsm-dis-tiny", "--metrics",
                     str(metrics_file), "--dry_run"])
    hf_api.assert_not_called()
    output = capsys.readouterr().out
    assert "Dry run: would upload 10 files to mpsm-org/mpsm-dis-tiny (private=False):" in output
    weights_line = next(line for line in output.splitlines() if line.split()[:1] == ["model.safetensors"])
    assert weights_line.endswith(f"{(checkpoint / 'model.safetensors').stat().st_size:,} bytes")
    assert "model-index:" in output and "# MPSM (dis)" in output


def test_published_training_args_drop_local_paths(tmp_path):
    from modeling_mpsm.publishing import write_public_training_args

    source = tmp_path / "training_args.json"
    source.write_text(json.dumps({"model": {"embed_size": 8}, "training": {
        "data_dir": "/home/me/data", "output_dir": "/home/me/run", "learning_rate": 2e-4, "seed": 3}}))
    write_public_training_args(source, tmp_path / "public.json")
    public = json.loads((tmp_path / "public.json").read_text())
    assert public == {"model": {"embed_size": 8}, "training": {"learning_rate": 2e-4, "seed": 3}}


# ---------------------------------------------------------------------------------------------------- push_to_hub


def capture_upload(api):
    """Make the mocked `HfApi().upload_folder` record the uploaded files and card before the folder is deleted."""
    uploaded = {}

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        uploaded["files"] = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        uploaded["card"] = ModelCard.load(folder / "README.md")
        uploaded["config"] = json.loads((folder / "config.json").read_text())
        return mock.sentinel.commit

    api.upload_folder.side_effect = upload_folder
    return uploaded


def test_model_push_to_hub_uploads_the_same_repo_as_the_publishing_script(checkpoint, metrics_file):
    with mock.patch("modeling_mpsm.publishing.HfApi") as hf_api:
        published = capture_upload(hf_api.return_value)
        publish(checkpoint, "mpsm-org/mpsm-dis-tiny", metrics_file)
    model = MPSMModel.from_pretrained(checkpoint)
    processor = MPSMProcessor.from_pretrained(checkpoint)
    with mock.patch("modeling_mpsm.publishing.HfApi") as hf_api:
        pushed = capture_upload(hf_api.return_value)
        commit = model.push_to_hub("mpsm-org/mpsm-dis-tiny", processor=processor, metrics=METRICS, private=True,
                                   commit_message="From the model", tags=["my-tag"])
    assert commit is mock.sentinel.commit
    api = hf_api.return_value
    api.create_repo.assert_called_once_with("mpsm-org/mpsm-dis-tiny", private=True, exist_ok=True, repo_type="model")
    api.upload_folder.assert_called_once_with(folder_path=mock.ANY, repo_id="mpsm-org/mpsm-dis-tiny",
                                              repo_type="model", commit_message="From the model", revision=None)
    assert pushed["files"] == published["files"]  # weights, config, code, processor, tokenizer, card
    assert {"processing_mpsm.py", "tokenizer.json", "processor_config.json", "modeling_mpsm.py"} <= set(pushed["files"])
    check_model_index(pushed["card"], METRICS)
    assert pushed["card"].data.pipeline_tag == "feature-extraction" and "my-tag" in pushed["card"].data.tags
    assert pushed["card"].text == published["card"].text
    assert pushed["config"]["auto_map"]["AutoModel"] == "modeling_mpsm.MPSMModel"


def test_ensemble_push_to_hub_names_its_members_as_base_models(tmp_path):
    model = save_checkpoint(tmp_path / "checkpoint", ensemble=True)
    members = ["mpsm-org/mpsm-dis-tiny", "mpsm-org/mpsm-dir-tiny"]
    with mock.patch("modeling_mpsm.publishing.HfApi") as hf_api:
        pushed = capture_upload(hf_api.return_value)
        model.push_to_hub("mpsm-org/mpsm-ensemble-tiny", processor=tiny_processor(),
                          metrics={**METRICS, "dataset": "nlphuji/flickr30k"}, base_models=members)
    card = pushed["card"]
    assert card.data.base_model == members and card.data.datasets == ["nlphuji/flickr30k"]
    assert {result.dataset_type for result in card.data.eval_results} == {"nlphuji/flickr30k"}
    assert pushed["config"]["auto_map"]["AutoModel"] == "modeling_mpsm.MPSMEnsembleModel"


def test_push_to_hub_without_processor_warns_and_metrics_must_name_a_dataset_id(checkpoint, tmp_path, caplog):
    model = MPSMModel.from_pretrained(checkpoint)
    with mock.patch("modeling_mpsm.publishing.HfApi") as hf_api:
        pushed = capture_upload(hf_api.return_value)
        model.push_to_hub("mpsm-org/mpsm-dis-tiny")
    assert "gets no tokenizer" in caplog.text and "tokenizer.json" not in pushed["files"]
    assert pushed["card"].data.eval_results is None
    local = tmp_path / "f30k_precomp"
    local.mkdir()
    for dataset in (str(local), "./data", "runs/main/data"):
        with pytest.raises(ValueError, match="'dataset' must be a dataset id"):
            with mock.patch("modeling_mpsm.publishing.HfApi"):
                model.push_to_hub("mpsm-org/mpsm-dis-tiny", metrics={**METRICS, "dataset": dataset})
