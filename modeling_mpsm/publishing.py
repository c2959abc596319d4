"""Publish a trained MPSM checkpoint on the Hugging Face Hub.

A checkpoint directory (what `save_pretrained` of the model and of its processor write) is checked, re-saved into a
repository folder that loads with `AutoModel` / `AutoProcessor` and `trust_remote_code=True` (safetensors weights,
`config.json` with `auto_map`, the modeling and processing code, the tokenizer), given a model card whose
`model-index` holds the R@K results of an evaluation JSON, and uploaded with `HfApi`.

The ensemble (MPSM*) is published as one repository holding both members (`MPSMEnsembleModel` saved as one
checkpoint); the card template `hub_configs/mpsm-ensemble/README.md` explains why.
"""

import json
import logging
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .common import HUB_CONFIGS_DIR, METRIC_KEYS
from .configuration_mpsm import PERSPECTIVES, MPSMConfig, MPSMEnsembleConfig
from .modeling_mpsm import MPSMEnsembleModel, MPSMHubMixin, MPSMModel
from .processing_mpsm import MPSMProcessor


logger = logging.getLogger(__name__)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
RECALL_KEYS = METRIC_KEYS[:-1]
DIRECTIONS = {"i2t": "image-to-text", "t2i": "text-to-image"}
CONFIG_CLASSES = {"mpsm": MPSMConfig, "mpsm_ensemble": MPSMEnsembleConfig}
# The Hub has no image-text retrieval task over region features; the models embed images and captions and score
# them, which is what the Hub's feature-extraction task lists.
PIPELINE_TAG = "feature-extraction"
CARD_TAGS = ["mpsm", "image-text-retrieval", "cross-modal-retrieval", "region-features", "custom_code"]


def member_configs(config) -> dict:
    """The configurations of the models behind `config`: an ensemble's members by short name, or {"model": config}
    (also for the classes of a model loaded as remote code)."""
    if config.model_type == MPSMEnsembleConfig.model_type:
        return config.member_configs  # the members the checkpoint stores, not today's `PERSPECTIVES`
    return {"model": config}


def model_variant(config) -> str:
    """Name of the published variant of a configuration: "dis", "dir", "joint" or "ensemble"."""
    if config.model_type == MPSMEnsembleConfig.model_type:  # also for the classes of a model loaded as remote code
        return "ensemble"
    return PERSPECTIVES.get(config.similarity, config.similarity)  # "joint" names itself


def _tokenizer_vocab_size(tokenizer_file: Path) -> int:
    with open(tokenizer_file, encoding="utf-8") as file:
        model = json.load(file).get("model", {})
    if model.get("type") != "WordLevel":
        raise ValueError(f"{tokenizer_file} must hold a WordLevel tokenizer, got model type {model.get('type')!r}")
    return len(model["vocab"])


def check_checkpoint(checkpoint_dir, processor_dir=None):
    """
    Check that a checkpoint can be published and return its configuration.

    Args:
        checkpoint_dir (`str` or `Path`): directory written by `MPSMModel.save_pretrained` or
            `MPSMEnsembleModel.save_pretrained`.
        processor_dir (`str` or `Path`, *optional*): directory written by `MPSMProcessor.save_pretrained`;
            defaults to `checkpoint_dir`.

    Raises:
        `ValueError` naming the file at fault: no `config.json` or not an MPSM configuration, no weights, no
        `tokenizer.json`, or a tokenizer whose vocabulary size differs from the configuration's `vocab_size`.
    """
    checkpoint_dir = Path(checkpoint_dir)
    processor_dir = Path(processor_dir) if processor_dir is not None else checkpoint_dir
    config_file = checkpoint_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file} is missing: `checkpoint_dir` must be a directory written by save_pretrained")
    with open(config_file, encoding="utf-8") as file:
        model_type = json.load(file).get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ValueError(f"{config_file} has model_type {model_type!r}, not one of {list(CONFIG_CLASSES)}")
    config = CONFIG_CLASSES[model_type].from_pretrained(checkpoint_dir)
    if not any((checkpoint_dir / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"{checkpoint_dir / WEIGHT_FILES[0]} is missing: no weights in {checkpoint_dir}")
    tokenizer_file = processor_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ValueError(
            f"{tokenizer_file} is missing: save the processor next to the model (`processor.save_pretrained(dir)`)"
        )
    vocab_size = next(iter(member_configs(config).values())).vocab_size
    tokenizer_vocab_size = _tokenizer_vocab_size(tokenizer_file)
    if tokenizer_vocab_size != vocab_size:
        raise ValueError(
            f"{tokenizer_file} has {tokenizer_vocab_size} words but {config_file} has vocab_size={vocab_size}: "
            "the model was trained with another vocabulary"
        )
    return config


def check_metrics(metrics: dict, source) -> dict:
    """
    Check evaluation results: the numbers `i2t_r1 i2t_r5 i2t_r10 t2i_r1 t2i_r5 t2i_r10 rsum` and a `dataset` id
    (a Hub dataset id such as "nlphuji/flickr30k", or a name such as "synthetic-scenes"; not a local folder, which
    means nothing on the Hub), optionally a `split` and a `protocol` (e.g. "5-fold 1K"). Other keys are ignored.
    `source` names where they come from in the errors.
    """
    missing = [key for key in METRIC_KEYS + ("dataset",) if key not in metrics]
    if missing:
        raise ValueError(f"{source} lacks the keys {missing}")
    wrong = [key for key in METRIC_KEYS if isinstance(metrics[key], bool) or not isinstance(metrics[key], (int, float))]
    if wrong:
        raise ValueError(f"{source}: {wrong} must be numbers")
    dataset = metrics["dataset"]
    local = isinstance(dataset, str) and (Path(dataset).expanduser().exists() or dataset.startswith((".", "/", "~")))
    if not isinstance(dataset, str) or local or dataset.count("/") > 1 or "\\" in dataset:
        raise ValueError(f"{source}: 'dataset' must be a dataset id such as 'nlphuji/flickr30k' or "
                         f"'synthetic-scenes', not the local path {dataset!r}")
    return metrics


def load_metrics(path) -> dict:
    """Read and check an evaluation JSON (see `check_metrics`)."""
    with open(path, encoding="utf-8") as file:
        return check_metrics(json.load(file), path)


def eval_results(metrics: dict) -> list[EvalResult]:
    """One `model-index` entry per direction and K (plus RSUM), on the metrics' dataset, split and protocol."""
    common = {
        "task_type": "image-text-retrieval",
        "task_name": "Image-text retrieval",
        "dataset_type": metrics["dataset"],
        "dataset_name": metrics["dataset"],
        "dataset_split": metrics.get("split"),
        "dataset_config": metrics.get("protocol"),
    }
    results = []
    for key in RECALL_KEYS:
        direction, k = key.split("_r")
        results.append(
            EvalResult(
                metric_type=f"recall@{k}",
                metric_name=f"R@{k} {DIRECTIONS[direction]}",
                metric_config=DIRECTIONS[direction],
                metric_value=metrics[key],
                **common,
            )
        )
    results.append(EvalResult(metric_type="rsum", metric_name="RSUM", metric_value=metrics["rsum"], **common))
    return results


def results_table(metrics: dict) -> str:
    """The metrics as a markdown table (one row) for the body of the card."""
    header = "| Dataset | Split | Protocol | I→T R@1 | R@5 | R@10 | T→I R@1 | R@5 | R@10 | RSUM |"
    cells = [metrics["dataset"], metrics.get("split", "-"), metrics.get("protocol", "-")]
    cells += [f"{metrics[key]:.2f}" for key in METRIC_KEYS]
    return "\n".join([header, "|---" * 10 + "|", "| " + " | ".join(map(str, cells)) + " |"])


def build_model_card(config, repo_id: str, num_parameters: int, metrics: dict | None = None,
                     training_args: bool = False, base_models: list[str] | None = None, tags: list[str] | None = None):
    """
    The model card of a checkpoint: metadata (library, tags, `model-index` from `metrics`) and the body rendered
    from the variant's template, `hub_configs/mpsm-{dis,dir,ensemble}/README.md`.
    `training_args` tells the card that the repository holds the run's `training_args.json`; `base_models` are the
    Hub ids the model was built from (the ensemble's published members). A `dataset` of the metrics that is a Hub id
    ("org/name") is also listed in the card's `datasets`.
    """
    variant = model_variant(config)
    template_path = HUB_CONFIGS_DIR / f"mpsm-{variant}" / "README.md"
    if not template_path.is_file():
        raise ValueError(f"no card template for the {variant!r} variant at {template_path}")
    card_data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        license="apache-2.0",
        tags=CARD_TAGS + [tag for tag in tags or () if tag not in CARD_TAGS],
        datasets=[metrics["dataset"]] if metrics and "/" in metrics["dataset"] else None,
        base_model=list(base_models) if base_models else None,
        eval_results=eval_results(metrics) if metrics else None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=repo_id,
        num_parameters=f"{num_parameters:,}",
        vocab_size=next(iter(member_configs(config).values())).vocab_size,  # the same for every member
        results_table=results_table(metrics) if metrics else None,
        training_args=training_args,
    )


def write_repo(model, output_dir, repo_id: str, processor=None, metrics: dict | None = None, training_args_file=None,
               base_models: list[str] | None = None, tags: list[str] | None = None, max_shard_size="50GB"):
    """
    Write the repository folder of a loaded `model` (and its `processor`) into `output_dir`: safetensors weights and
    a `config.json` with `auto_map` next to the code `save_pretrained` copies (`modeling_mpsm.py`,
    `configuration_mpsm.py`); the processor's save adds `processing_mpsm.py` and the tokenizer files; the run's
    `training_args.json` (local paths removed) when given; the model card. Returns the files written.
    """
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    if processor is not None:
        processor.save_pretrained(output_dir)
    if training_args_file is not None:
        write_public_training_args(training_args_file, output_dir / "training_args.json")
    card = build_model_card(model.config, repo_id, model.num_parameters(), metrics,
                            training_args=training_args_file is not None, base_models=base_models, tags=tags)
    card.save(output_dir / "README.md")
    return sorted(path for path in output_dir.rglob("*") if path.is_file())


def assemble_repo(checkpoint_dir, output_dir, repo_id: str, metrics: dict | None = None, processor_dir=None,
                  base_models: list[str] | None = None) -> list[Path]:
    """
    Check a checkpoint directory, load it with the package's classes and write its repository folder into
    `output_dir` (`write_repo`); returns its files. Fails if the weights do not match the configuration.
    """
    config = check_checkpoint(checkpoint_dir, processor_dir)
    model_class = MPSMEnsembleModel if isinstance(config, MPSMEnsembleConfig) else MPSMModel
    model, loading_info = model_class.from_pretrained(checkpoint_dir, output_loading_info=True)
    mismatched = {name: keys for name, keys in loading_info.items() if keys and name != "error_msgs"}
    if mismatched:
        raise ValueError(f"the weights in {checkpoint_dir} do not match its config.json: {mismatched}")
    processor = MPSMProcessor.from_pretrained(processor_dir or checkpoint_dir)
    training_args = Path(checkpoint_dir) / "training_args.json"
    return write_repo(model, output_dir, repo_id, processor, metrics, training_args if training_args.is_file() else None,
                      base_models)


LOCAL_PATH_SETTINGS = ("data_dir", "output_dir", "config", "vocab", "resume_from_checkpoint")


def write_public_training_args(source, target):
    """Copies a run's `training_args.json` without the settings that are local paths of the machine it ran on."""
    with open(source, encoding="utf-8") as file:
        settings = json.load(file)
    for key in LOCAL_PATH_SETTINGS:
        settings.get("training", {}).pop(key, None)
    with open(target, "w", encoding="utf-8") as file:
        json.dump(settings, file, indent=2)


def upload_repo(folder, repo_id: str, private: bool | None = False, revision: str | None = None,
                commit_message: str | None = None, token=None, create_pr: bool = False,
                commit_description: str | None = None):
    """Create `repo_id` if needed (and the branch `revision`), then upload `folder` in one commit."""
    api = HfApi(token=token) if token is not None else HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    upload = dict(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                  commit_message=commit_message or f"Upload {repo_id.split('/')[-1]}", revision=revision)
    if create_pr:
        upload["create_pr"] = True
    if commit_description:
        upload["commit_description"] = commit_description
    return api.upload_folder(**upload)


def print_dry_run(folder, files, repo_id: str, private, revision):
    target = f"{repo_id}@{revision}" if revision else repo_id
    print(f"Dry run: would upload {len(files)} files to {target} (private={private}):")
    for path in files:
        print(f"  {path.relative_to(folder)!s:<28} {path.stat().st_size:>14,} bytes")
    print("\n" + (Path(folder) / "README.md").read_text(encoding="utf-8"))


def as_metrics(metrics) -> dict | None:
    """Evaluation results given as a dict or as the path of an evaluation JSON, checked (see `check_metrics`)."""
    if metrics is None or isinstance(metrics, dict):
        return None if metrics is None else check_metrics(metrics, "metrics")
    return load_metrics(metrics)


def publish(checkpoint_dir, repo_id: str, metrics=None, private: bool = False, dry_run: bool = False,
            revision: str | None = None, processor_dir=None, commit_message: str | None = None,
            base_models: list[str] | None = None):
    """
    Check, assemble and upload a checkpoint to the Hub repository `repo_id`.

    Args:
        checkpoint_dir: directory of the trained model (and of its processor unless `processor_dir` is given).
        repo_id (`str`): "org/name".
        metrics: evaluation JSON path or dict (see `check_metrics`) whose results go in the card's `model-index`.
        private (`bool`): create the repository private.
        dry_run (`bool`): print the files (with sizes) and the card, upload nothing.
        revision (`str`, *optional*): branch to upload to (created if needed); the default branch otherwise.
        commit_message (`str`, *optional*): defaults to "Upload <name>".
        base_models (`list[str]`, *optional*): Hub ids of the ensemble's published members, for the card's
            `base_model`.

    Returns:
        The `CommitInfo` of the upload, or `None` for a dry run.
    """
    metrics = as_metrics(metrics)
    with tempfile.TemporaryDirectory() as folder:
        files = assemble_repo(checkpoint_dir, folder, repo_id, metrics, processor_dir, base_models=base_models)
        if dry_run:
            print_dry_run(folder, files, repo_id, private, revision)
            return None
        return upload_repo(folder, repo_id, private, revision, commit_message)


def push_model_to_hub(model, repo_id: str, *, processor=None, metrics=None, base_models: list[str] | None = None,
                      commit_message: str | None = None, commit_description: str | None = None,
                      private: bool | None = None, token=None, revision: str | None = None, create_pr: bool = False,
                      max_shard_size="50GB", tags: list[str] | None = None):
    """
    What `MPSMModel.push_to_hub` / `MPSMEnsembleModel.push_to_hub` of this package do (set below): the same
    complete repository as `publish` (weights, code, a card with `model-index` from `metrics` — a dict or an
    evaluation JSON path — and the processor with its tokenizer when `processor` is given), uploaded in one commit.
    The other arguments are those of transformers' `push_to_hub`.
    """
    metrics = as_metrics(metrics)
    if processor is None:
        logger.warning(f"push_to_hub without `processor`: {repo_id} gets no tokenizer and AutoProcessor cannot load "
                       "it; pass `processor=` or push it too (`processor.push_to_hub(repo_id)`).")
    with tempfile.TemporaryDirectory() as folder:
        write_repo(model, folder, repo_id, processor, metrics, base_models=base_models, tags=tags,
                   max_shard_size=max_shard_size)
        return upload_repo(folder, repo_id, private, revision, commit_message, token=token, create_pr=create_pr,
                           commit_description=commit_description)


# The package's models push the complete repository; modeling_mpsm.py never imports this module (no import circle).
MPSMHubMixin.publish = staticmethod(push_model_to_hub)
