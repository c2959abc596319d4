"""Publish a trained MPSM checkpoint (dis, dir or the MPSM* ensemble) on the Hugging Face Hub.

    python examples/publish_to_hub.py --checkpoint runs/mpsm-dis --repo_id my-org/mpsm-dis \\
        --metrics runs/mpsm-dis/eval_f30k_test.json --dry_run

The checkpoint directory is what `model.save_pretrained(dir)` and `processor.save_pretrained(dir)` write. It is
checked (config, weights, tokenizer vocabulary size == config vocab_size), re-saved with safetensors weights, the
remote code and the processor, given a model card (with a `model-index` of the R@K in `--metrics`), and uploaded.
`--dry_run` prints the files and the card and uploads nothing. Log in first (`hf auth login`) or set `HF_TOKEN`.
"""

import argparse
import dataclasses

from modeling_mpsm.common import ArgumentParser, argument
from modeling_mpsm.publishing import publish


@dataclasses.dataclass
class PublishArguments:
    checkpoint: str = argument(help="directory of the saved model (and processor)")
    repo_id: str = argument(help="Hub repository, ORG/NAME")
    metrics: str | None = argument(None, "evaluation JSON: i2t_r1 ... t2i_r10, rsum, dataset[, split, protocol]")
    processor: str | None = argument(None, "directory of the saved processor, if not the checkpoint's")
    private: bool = argument(False, "create the repository private")
    revision: str | None = argument(None, "branch to upload to (created if needed); default: the main branch")
    commit_message: str | None = argument(None, "defaults to 'Upload NAME'")
    base_model: list[str] | None = argument(None, "Hub ids of the ensemble's published members (card metadata)")
    dry_run: bool = argument(False, "print the files and the card, upload nothing")


def main(argv=None):
    parser = ArgumentParser(PublishArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parser.parse(argv)
    commit = publish(
        args.checkpoint,
        args.repo_id,
        metrics=args.metrics,
        private=args.private,
        dry_run=args.dry_run,
        revision=args.revision,
        processor_dir=args.processor,
        commit_message=args.commit_message,
        base_models=args.base_model,
    )
    if commit is not None:
        print(f"Uploaded: {commit.commit_url}")


if __name__ == "__main__":
    main()
