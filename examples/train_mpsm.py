"""Train MPSM on precomputed region features with 🤗 Accelerate (in the style of the transformers `*_no_trainer.py`
examples).

    accelerate launch examples/train_mpsm.py --data_dir data/f30k_precomp --output_dir runs/mpsm-dis \
        --config hub_configs/mpsm-dis/training_args.json
    python examples/train_mpsm.py --data_dir data/synthetic --output_dir runs/tiny --similarity distance \
        --set embed_size=256 sim_dim=64 --num_epochs 2 --batch_size 64

`--data_dir` is a SCAN/GSMN folder (`train_ims.npy`, `train_caps.txt`, ...; converted to Arrow with dependency parses
on first use, cached in `<data_dir>/arrow_cache`), an Arrow `DatasetDict` or a Hub dataset folder (Parquet shards and a
card) from `examples/prepare_data.py`, or the Hub id of such a dataset (read with `datasets.load_dataset`).
The best model (validation rsum on `dev`) is saved in `--output_dir` itself, loadable with
`AutoModel.from_pretrained(output_dir, trust_remote_code=True)` and `MPSMProcessor.from_pretrained(output_dir)`;
resumable training states are in `<output_dir>/checkpoints/step_N`. See docs/training.md.
"""

import dataclasses
import inspect
import json
import logging
import math
import os
import pickle
import sys

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed
from datasets.exceptions import DatasetGenerationError
from safetensors import SafetensorError

from modeling_mpsm import MPSMConfig, MPSMModel, MPSMProcessor
from modeling_mpsm.common import CAPTIONS_PER_IMAGE, ArgumentParser, argument, atomic_write_text, check_arguments, report_error
from modeling_mpsm.configuration_mpsm import PERSPECTIVES
from modeling_mpsm.data import CaptionPairDataset, MPSMCollator, dataset_name, load_split
from modeling_mpsm.evaluation import evaluate_retrieval
from modeling_mpsm.partners import global_image_embeddings, mine_caption_partners, mine_embedding_partners
from modeling_mpsm.processing_mpsm import get_dependency_parser
from modeling_mpsm.publishing import publish
from modeling_mpsm.training import (
    BEST_RESULTS_FILE,
    EpochSampler,
    LoopSettings,
    NonFiniteLossError,
    PartnerRefresh,
    PartnerSampler,
    TrainingLog,
    TrainingState,
    create_optimizer,
    list_checkpoints,
    remove_unfinished_checkpoints,
    resolve_checkpoint,
    save_pretrained_atomic,
    step_decay_schedule,
    train_loop,
)
from modeling_mpsm.data.vocabulary import build_tokenizer, build_vocabulary, load_scan_vocabulary


logger = get_logger(__name__)
MINED_PARTNERS = ("captions", "embeddings")  # --partners values that mine the partners instead of reading them
PARTNERS_FILE = "partners.json"  # the mined partners, in the output folder (SGRAF's peer script reads this format)
MODEL_FIELDS = set(inspect.signature(MPSMConfig.__init__).parameters) - {"self", "kwargs"}


@dataclasses.dataclass(kw_only=True)
class TrainingArguments(LoopSettings):
    """The command line: the loop's settings (`LoopSettings`: epochs, steps, warm-up, checkpoints, validation, logging)
    and the run's. Each field's metadata holds its flag's help, choices and the rule its value follows."""

    # data, output and model
    data_dir: str = argument(help="SCAN/GSMN folder, Arrow DatasetDict, Hub dataset folder (Parquet) or Hub dataset "
                                  "id, with train and dev splits.")
    config: str | None = argument(None, 'JSON {"model": {MPSMConfig fields}, "training": {flag: value}}.')
    member: str | None = argument(None, "Member to train from an ensemble's --config.",
                                  choices=list(PERSPECTIVES.values()))
    set: list[str] = argument([], "Override MPSMConfig fields, e.g. --set embed_size=256 kgid_layers=2 (JSON values); "
                                  "repeatable, a later value of the same KEY wins.",
                              action="extend", metavar="KEY=VALUE")
    similarity: str | None = argument(None, "Similarity perspective (MPSMConfig.similarity); `joint` trains every "
                                            "perspective's head.", choices=[*PERSPECTIVES, "joint"])
    vocab: str | None = argument(None, "SCAN/SGRAF *_precomp_vocab.json; default: built from train+dev captions.")
    vocab_min_count: int = argument(4, "Minimum count of a word built into the vocab.", "positive integer")
    parser: str = argument("spacy:en_core_web_sm",
                           "Dependency parser: 'spacy:<pipeline>' or 'fallback' (neighbouring words).")
    # optimization
    batch_size: int = argument(128, "Captions (with their images) per process.", "positive integer")
    learning_rate: float = argument(2e-4, must_be="positive number")
    weight_decay: float = argument(0.0, must_be="non-negative number")
    lr_decay_epochs: list[int] = argument([15], "Epochs at whose start the learning rate is multiplied by "
                                                "--lr_decay_factor.", "epochs", nargs="*")
    lr_decay_factor: float = argument(0.1, must_be="positive number")
    gradient_accumulation_steps: int = argument(1, must_be="positive integer")
    mixed_precision: str | None = argument(None, "Default: the accelerate config's.", choices=["no", "fp16", "bf16"])
    activation_checkpointing: bool = argument(
        False, "Recompute the per-pair part in the backward pass instead of keeping it "
               "(model.activation_checkpointing_enable(): less peak memory for more time, see docs/benchmarks.md; "
               "the same loss and gradients).")
    seed: int = argument(0, must_be="non-negative integer")
    partners: str | None = argument(
        None, "Batch every caption next to a caption of its image's partner (a near-duplicate image), so that the "
              "partner is an in-batch negative: a JSON list with the partner index of each training image (-1: none), "
              "or the synthetic scenes' train_scenes.json (their twins); 'captions': mined once from the training "
              "captions (TF-IDF); 'embeddings': mined from the model's global image embeddings every "
              "--partner_refresh_steps updates (the caption-mined ones until the first time). Mined partners are "
              "written to OUTPUT_DIR/partners.json.", metavar="JSON|captions|embeddings")
    partner_refresh_steps: int | None = argument(
        None, "With --partners embeddings: mine the partners again every N updates (default: once per epoch, at its "
              "end).", "positive integer")
    # checkpoints and validation (the others are the loop's)
    resume_from_checkpoint: str | None = argument(None, "A checkpoint folder, or 'latest'.")
    eval_batch_size: int = argument(128, must_be="positive integer")
    max_eval_images: int | None = argument(
        None, "Validate on the first N dev images (and their captions) only; default: all of dev.", "positive integer")
    # runtime
    num_workers: int = argument(0, "DataLoader worker processes.", "non-negative integer")
    with_tracking: bool = argument(False, "Log to experiment trackers.")
    report_to: str = argument("all", "Trackers: tensorboard, wandb, ... or all.")
    cpu: bool = argument(False, "Train on CPU even if a GPU is available.")
    # the Hub
    push_to_hub: bool = argument(
        False, "At the end, publish the best model with its processor and a card (needs --hub_model_id).")
    hub_model_id: str | None = argument(None, "Hub repository ORG/NAME for --push_to_hub.")
    hub_private_repo: bool = argument(False, "Create the --hub_model_id repository private.")
    dataset_id: str | None = argument(None, "Dataset id for the card's model-index (e.g. nlphuji/flickr30k); "
                                            "default: the --data_dir Hub id, or its folder's name.")
    # the MPSMConfig fields of the run (not a flag): --config's "model", then --similarity, then --set
    model_fields: dict = dataclasses.field(default_factory=dict, init=False)


def parse_args(argv=None) -> TrainingArguments:
    parser = ArgumentParser(TrainingArguments, description="Train MPSM for image-text retrieval.")
    args = parser.parse(argv, check=False)
    model_fields = {}
    if args.config:
        args, model_fields = _read_config(parser, args, argv)
    args.model_fields = _model_fields(parser, args, model_fields)
    _check_settings(parser, args)
    return args


def _read_config(parser, args, argv):
    """--config (and --member for an ensemble's): its training settings become the parser's defaults (the command
    line still wins) and the arguments are parsed again. Returns the arguments and the configuration's model fields."""
    try:
        with open(args.config, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"--config {args.config}: cannot read a JSON configuration ({error}).")
    if "members" in config:
        if args.member is None:
            parser.error(f"{args.config} describes an ensemble: choose the member to train with --member "
                         f"{'|'.join(PERSPECTIVES.values())}.")
        config = config["members"][args.member]
    training = config.get("training", {})
    unknown = sorted(set(training) - {field.name for field in dataclasses.fields(args) if field.init})
    if unknown:
        parser.error(f"{args.config}: unknown training settings {unknown}.")
    if isinstance(training.get("lr_decay_epochs"), int):
        training["lr_decay_epochs"] = [training["lr_decay_epochs"]]
    parser.set_defaults(**training)  # the command line still wins
    return parser.parse(argv, check=False), dict(config.get("model", {}))


def _model_fields(parser, args, model_fields):
    """The MPSMConfig fields of the run: the configuration's, then --similarity, then --set."""
    if args.similarity:
        model_fields["similarity"] = args.similarity
    for item in args.set:
        key, separator, value = item.partition("=")
        if not separator or key not in MODEL_FIELDS:
            parser.error(f"--set {item!r}: expected KEY=VALUE with KEY an MPSMConfig field ({sorted(MODEL_FIELDS)}).")
        try:
            model_fields[key] = json.loads(value)
        except json.JSONDecodeError:
            model_fields[key] = value
    return model_fields


def _check_settings(parser, args):
    """`parser.error` for a value out of its field's range (`check_arguments`), or --partners,
    --partner_refresh_steps or --hub_model_id that do not fit the other flags; --checkpointing_steps N becomes an int."""
    check_arguments(parser, args)
    if args.checkpointing_steps not in (None, "epoch"):
        args.checkpointing_steps = int(args.checkpointing_steps)
    if args.partners and args.batch_size % 2:
        parser.error(f"--partners needs an even --batch_size (captions come in partner pairs), got {args.batch_size}.")
    if args.partner_refresh_steps is not None and args.partners != "embeddings":
        parser.error(f"--partner_refresh_steps applies to --partners embeddings, got --partners {args.partners}.")
    hub_id_parts = (args.hub_model_id or "").split("/")
    if args.push_to_hub and not (len(hub_id_parts) == 2 and all(hub_id_parts)):
        parser.error(f"--push_to_hub needs --hub_model_id ORG/NAME, got {args.hub_model_id!r}.")


def build_processor(args, train, dev, img_dim, num_regions):
    """Tokenizer over the imported SCAN vocabulary or one built from the train and dev captions, in a processor."""
    if args.vocab:
        word2idx = load_scan_vocabulary(args.vocab)
    else:
        captions = [caption for split in (train, dev) for captions in split["captions"] for caption in captions]
        word2idx = build_vocabulary(captions, min_count=args.vocab_min_count)
    return MPSMProcessor(
        build_tokenizer(word2idx), num_regions=num_regions, dependency_parser=args.parser, region_feature_dim=img_dim
    )


def build_model(args, img_dim, vocab_size):
    """The model of `args.model_fields`, with the data's feature width and the processor's vocabulary size."""
    overridden = {"img_dim": img_dim, "vocab_size": vocab_size}
    for key, value in overridden.items():
        if key in args.model_fields and args.model_fields[key] != value:
            logger.warning(f"{key}={args.model_fields[key]} from the configuration replaced by {value} (the data's).")
    config = MPSMConfig(**{**args.model_fields, **overridden})
    set_seed(args.seed)
    model = MPSMModel(config)
    if args.activation_checkpointing:
        model.activation_checkpointing_enable()
    logger.info(f"MPSM ({config.similarity}): {model.num_parameters():,} parameters", main_process_only=True)
    return model


def read_partners(path, num_images):
    """--partners: a list of partner indices, or the synthetic scenes' records (their `twin`), one per image."""
    with open(path, encoding="utf-8") as file:
        partners = json.load(file)
    partners = [record["twin"] if isinstance(record, dict) else record for record in partners]
    if len(partners) != num_images or not all(isinstance(partner, int) for partner in partners):
        raise ValueError(f"--partners {path} must list one partner index per training image ({num_images}), "
                         f"got {len(partners)} entries")
    return partners


def first_partners(args, train, accelerator=None):
    """The partners a run starts with: --partners JSON read, or (captions, embeddings) mined from the training
    captions on the main process and broadcast, so that every process batches the same pairs."""
    if args.partners not in MINED_PARTNERS:
        return read_partners(args.partners, len(train))
    return main_process_partners(accelerator, lambda: mine_caption_partners(
        [caption for captions in train["captions"] for caption in captions], CAPTIONS_PER_IMAGE))


def main_process_partners(accelerator, mine):
    """`mine()` on the main process (or without an accelerator), its partners broadcast to the others."""
    if accelerator is None:
        return mine()
    partners = [mine() if accelerator.is_main_process else None]
    return broadcast_object_list(partners)[0]


def write_partners(accelerator, output_dir, partners):
    """The mined partners to OUTPUT_DIR/partners.json (main process; atomic), for SGRAF's peer script --partners."""
    if accelerator.is_main_process:
        atomic_write_text(os.path.join(output_dir, PARTNERS_FILE), json.dumps(partners))


def partner_refresh(args, accelerator, sampler, model, train, processor, updates_per_epoch):
    """--partners embeddings: partners mined from the model's global image embeddings of the training images (on the
    main process, from the weights every process shares) every --partner_refresh_steps updates, written to
    partners.json each time."""

    def mine():
        partners = main_process_partners(accelerator, lambda: mine_embedding_partners(
            global_image_embeddings(model, train, processor, args.eval_batch_size)))
        write_partners(accelerator, args.output_dir, partners)
        return partners

    return PartnerRefresh(sampler, mine, args.partner_refresh_steps or updates_per_epoch)


def build_dataloader(args, train, processor, accelerator=None):
    dataset = CaptionPairDataset(train)
    if args.partners:
        sampler = PartnerSampler(first_partners(args, train, accelerator), CAPTIONS_PER_IMAGE, args.seed)
    else:
        sampler = EpochSampler(len(dataset), args.seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        collate_fn=MPSMCollator(processor),
        num_workers=args.num_workers,
        drop_last=True,  # hardest negatives need full batches
        generator=torch.Generator().manual_seed(args.seed),  # worker seeds, drawn without touching the global RNG
    )


def load_checkpoint(accelerator, checkpoint, state):
    """Restores model, optimizer, schedule, RNGs and `state` from `checkpoint`, with a clear error if it is damaged."""
    try:
        accelerator.load_state(checkpoint)
    except (SafetensorError, EOFError, pickle.UnpicklingError, RuntimeError) as error:
        raise OSError(f"Checkpoint {checkpoint} cannot be loaded (truncated, corrupt or of another model "
                      f"configuration): {error}") from error
    logger.info(f"Resumed from {checkpoint} at step {state.global_step}", main_process_only=True)


def write_settings(args, accelerator, config):
    """The run's settings to the trackers (with --with_tracking) and to OUTPUT_DIR/training_args.json, which --config
    reads back."""
    training = {k: v for k, v in dataclasses.asdict(args).items() if k != "model_fields"}
    if args.with_tracking:
        hyperparameters = {k: v for k, v in training.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("mpsm", {**hyperparameters, **config.to_diff_dict()})
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "training_args.json"), "w", encoding="utf-8") as file:
            json.dump({"model": config.to_diff_dict(), "training": training}, file, indent=2)


def run(args, accelerator):
    """Everything after the Accelerator exists: data, model, training. Returns the final `TrainingState`."""
    output_dir = args.output_dir
    if not args.resume_from_checkpoint and list_checkpoints(output_dir):
        raise FileExistsError(
            f"{output_dir} holds checkpoints of an earlier run: resume it with --resume_from_checkpoint latest, "
            "or choose another --output_dir."
        )
    # Everything that can fail on bad inputs (data, vocabulary, configuration, checkpoint) is checked before
    # `output_dir` is created, so that such a failure leaves nothing behind.
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    with accelerator.main_process_first():  # the main process converts and caches the data first
        parser = get_dependency_parser(args.parser)
        train = load_split(args.data_dir, "train", parser=parser, name=f"--data_dir {args.data_dir}")
        dev = load_split(args.data_dir, "dev", parser=parser, name=f"--data_dir {args.data_dir}")
    num_regions, img_dim = train.features["region_features"].shape
    processor = build_processor(args, train, dev, img_dim, num_regions)

    model = build_model(args, img_dim, len(processor.tokenizer))
    config = model.config

    dataloader = build_dataloader(args, train, processor, accelerator)
    sampler = dataloader.sampler
    optimizer = create_optimizer(model.to(accelerator.device), args.learning_rate, args.weight_decay,
                                 fused=accelerator.scaler is None)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    if updates_per_epoch == 0:
        raise ValueError(f"The training split has fewer captions per process than --batch_size {args.batch_size}.")
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        remove_unfinished_checkpoints(output_dir)
    accelerator.wait_for_everyone()
    scheduler = step_decay_schedule(optimizer, updates_per_epoch, args.lr_decay_epochs, args.lr_decay_factor)
    state = TrainingState()
    accelerator.register_for_checkpointing(scheduler, state)
    unwrapped = accelerator.unwrap_model(model)
    refresh = None
    if args.partners == "embeddings":  # the partners change as training goes: the sampler's state is the run's
        refresh = partner_refresh(args, accelerator, sampler, unwrapped, train, processor, updates_per_epoch)
        accelerator.register_for_checkpointing(sampler)

    log = TrainingLog(output_dir, enabled=accelerator.is_main_process)
    if checkpoint:
        load_checkpoint(accelerator, checkpoint, state)
    log.restart_at(state.global_step)
    if args.partners in MINED_PARTNERS:
        write_partners(accelerator, output_dir, sampler.partners)
    write_settings(args, accelerator, config)
    if args.max_eval_images:
        dev = dev.select(range(min(args.max_eval_images, len(dev))))

    def validate():
        return evaluate_retrieval(
            unwrapped, dev, processor, batch_size=args.eval_batch_size, accelerator=accelerator, progress=False
        )

    def save_best(results):
        if accelerator.is_main_process:
            save_pretrained_atomic(unwrapped, processor, output_dir, results)
            logger.info(f"New best rsum {results['rsum']:.2f} at step {results['step']}: saved to {output_dir}")
        accelerator.wait_for_everyone()

    state = train_loop(accelerator, model, optimizer, scheduler, dataloader, state, args, validate, save_best, log,
                       refresh)
    logger.info(
        f"Done: {state.global_step} updates, best rsum {state.best_rsum:.2f} at step {state.best_step}, "
        f"{state.nonfinite_steps} non-finite batches skipped, {state.overflow_steps} fp16 overflow updates skipped by "
        "the gradient scaler.",
        main_process_only=True,
    )
    if args.push_to_hub and accelerator.is_main_process:
        push_best_model(args)
    return state


def push_best_model(args):
    """--push_to_hub: the best model of the run, published as examples/publish_to_hub.py does, its card's model-index
    holding the validation results it was chosen by (split "dev")."""
    with open(os.path.join(args.output_dir, BEST_RESULTS_FILE), encoding="utf-8") as file:
        results = json.load(file)
    dataset = args.dataset_id or dataset_name(args.data_dir)
    metrics = {**results, "dataset": dataset, "split": "dev"}
    commit = publish(args.output_dir, args.hub_model_id, metrics, private=args.hub_private_repo,
                     commit_message=f"Upload {args.hub_model_id.split('/')[-1]} (step {results.get('step')})")
    logger.info(f"Pushed the best model to {commit.commit_url}", main_process_only=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # not a line per file of every checkpoint
    # A launcher that starts several processes (WORLD_SIZE > 1) on a machine without a GPU: without `cpu=True` each
    # process would believe it is alone (two rank-0 runs in one folder); on CPU, Accelerate joins them over gloo.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = args.cpu or (world_size > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        cpu=cpu,
    )
    if accelerator.num_processes != world_size:
        print(f"error: the launcher started {world_size} processes (WORLD_SIZE) but they did not join one process group "
              f"({accelerator.num_processes} seen); stopping rather than training {world_size} runs into one "
              f"--output_dir. Check the launcher's --multi_gpu / --cpu settings.", file=sys.stderr)
        return 2
    if cpu and not args.cpu:
        logger.warning(f"{world_size} processes and no GPU: training on CPU (gloo), as with --cpu.")
    try:
        run(args, accelerator)
        status = 0
    except NonFiniteLossError as error:
        logger.error(str(error), main_process_only=True)
        status = 1
    except (OSError, ValueError, KeyError, DatasetGenerationError) as error:
        status = report_error(error)
    if args.with_tracking:
        accelerator.end_training()
    # A clean exit in distributed runs: every process reaches this barrier, then tears the process group down
    # itself instead of leaving it to interpreter shutdown (see docs/training.md).
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
