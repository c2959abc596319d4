"""Image-text retrieval evaluation: Recall@K from a similarity matrix, and the standard SCAN protocols.

The similarity matrix holds image `i` (rows) against caption `j` (columns), with captions `5i .. 5i + 4` describing
image `i` (the SCAN layout). As in SCAN's `i2t` / `t2i`:

- image-to-text: for each image, the rank of the best-ranked of its five captions among all captions;
- text-to-image: for each caption, the rank of its image among all images;

R@K is the percentage of queries whose rank is below K, and `rsum` the sum of the six R@{1,5,10}.

Ties count against the model: the rank of a positive is the number of *negatives* scoring at least as high as it.
SCAN's `argsort` leaves the order of ties to the sort algorithm; counting them against the model makes the numbers
well defined and keeps a degenerate model (all scores equal) at the bottom instead of at R@1 = 100.

Protocols (`PROTOCOL_FOLDS`, `DEFAULT_SPLITS`): `f30k` scores the 1,000 Flickr30K test images against their 5,000
captions; `coco5k` scores all 5,000 images of COCO `testall`; `coco1k` averages the metrics (rsum included) over the
five folds of 1,000 consecutive images of `testall`, each against its own 5,000 captions.
"""

import numpy as np
import torch

from .common import CAPTIONS_PER_IMAGE, METRIC_KEYS, RECALL_KS
from .data import caption_batches, image_batches
from .metrics.recall_at_k.ranking import retrieval_ranks, retrieval_recalls
from .scoring import encode_images, encode_texts, score_matrix


__all__ = ["METRIC_KEYS", "PROTOCOL_FOLDS", "DEFAULT_SPLITS", "RECALL_KS", "retrieval_ranks", "retrieval_recalls",
           "mean_metrics", "protocol_folds", "fold_score_matrices", "evaluate_retrieval"]

PROTOCOL_FOLDS = {"f30k": 1, "coco1k": 5, "coco5k": 1}
DEFAULT_SPLITS = {"f30k": "test", "coco1k": "testall", "coco5k": "testall"}


def mean_metrics(fold_metrics: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of per-fold metric dicts (SCAN's COCO 1K averaging, rsum included)."""
    return {key: float(np.mean([metrics[key] for metrics in fold_metrics])) for key in fold_metrics[0]}


def protocol_folds(num_images: int, num_folds: int = 1) -> list[slice]:
    """Image slices of the folds: `num_folds` consecutive blocks of equal size (their captions follow)."""
    if num_images < num_folds or num_images % num_folds:
        raise ValueError(f"{num_images} images cannot be split into {num_folds} folds of equal size.")
    size = num_images // num_folds
    return [slice(fold * size, (fold + 1) * size) for fold in range(num_folds)]


def fold_score_matrices(
    model,
    dataset,
    processor,
    num_folds: int = 1,
    batch_size: int = 128,
    dtype: torch.dtype | None = None,
    accelerator=None,
    progress: bool = True,
    **score_options,
) -> list[torch.Tensor]:
    """
    Similarity matrices of the folds of an evaluation split, each `[fold images, 5 * fold images]` (float32, CPU).

    Every image and caption is encoded once (`scoring.encode_images` / `encode_texts`); each fold then scores its
    images against its own captions with `scoring.score_matrix` (rows sharded over the processes of `accelerator`).

    Args:
        model ([`MPSMModel`] or [`MPSMEnsembleModel`]): evaluated in eval mode (its mode is restored).
        dataset (`datasets.Dataset`): image-level split (see `data.convert_to_arrow`).
        processor ([`MPSMProcessor`]): the model's processor.
        num_folds (`int`): 1 for the whole split, 5 for COCO 1K.
        dtype (`torch.dtype`, *optional*): `torch.bfloat16` runs the per-pair part in bf16 (see `scoring.score_matrix`).
        score_options: further keyword arguments of `scoring.score_matrix` (`refine_k`, `compile`, `max_block_bytes`).
    """
    device = next(model.parameters()).device
    show = progress and (accelerator is None or accelerator.is_main_process)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            images = encode_images(model, _on_device(image_batches(dataset, batch_size, processor), device), show)
            texts = encode_texts(model, _on_device(caption_batches(dataset, batch_size, processor), device), show)
    finally:
        model.train(was_training)
    matrices = []
    for fold in protocol_folds(len(dataset), num_folds):
        captions = slice(fold.start * CAPTIONS_PER_IMAGE, fold.stop * CAPTIONS_PER_IMAGE)
        matrix = score_matrix(
            model, images.select(fold), texts.select(captions),
            dtype=dtype, progress=show, accelerator=accelerator, **score_options,
        )
        matrices.append(matrix.cpu())
    return matrices


def evaluate_retrieval(model, dataset, processor, num_folds: int = 1, **kwargs) -> dict[str, float]:
    """Mean over the folds of `retrieval_recalls` (keys `METRIC_KEYS`); keyword arguments go to
    `fold_score_matrices`."""
    matrices = fold_score_matrices(model, dataset, processor, num_folds, **kwargs)
    return mean_metrics([retrieval_recalls(matrix) for matrix in matrices])


def _on_device(batches, device):
    """Moves the tensors of each batch to `device`."""
    for batch in batches:
        yield {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
