"""Publish a trained MPSM checkpoint (dis, dir or the MPSM* ensemble) on the Hugging Face Hub.

    python examples/publish_to_hub.py --checkpoint runs/mpsm-dis --repo_id my-org/mpsm-dis \\
        --metrics runs/mpsm-dis/eval_f30k_test.json --dry_run

The checkpoint directory is what `model.save_pretrained(dir)` and `processor.save_pretrained(dir)` write. It is
checked (config, weights, tokenizer vocabulary size == config vocab_size), re-saved with safetensors weights, the
remote code and the processor, given a model card (with a `model-index` of the R@K in `--metrics`), and uploaded.
`--dry_run` prints the files and the card and uploads nothing. Log in first (`hf auth login`) or set `HF_TOKEN`.
"""

import argparse

from modeling_mpsm.publishing import publish


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="directory of the saved model (and processor)")
    parser.add_argument("--repo_id", required=True, help="Hub repository, ORG/NAME")
    parser.add_argument("--metrics", help="evaluation JSON: i2t_r1 ... t2i_r10, rsum, dataset[, split, protocol]")
    parser.add_argument("--processor", help="directory of the saved processor, if not the checkpoint's")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", help="branch to upload to (created if needed); default: the main branch")
    parser.add_argument("--commit_message", help="defaults to 'Upload NAME'")
    parser.add_argument("--base_model", nargs="+", help="Hub ids of the ensemble's published members (card metadata)")
    parser.add_argument("--dry_run", action="store_true", help="print the files and the card, upload nothing")
    args = parser.parse_args(argv)

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
