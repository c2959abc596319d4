"""Recall@K of image-text retrieval from an image x caption similarity matrix (numpy only).

The single implementation behind both `modeling_mpsm.evaluation` and the `evaluate` metric module beside this file.
Ties count against the model: a positive's rank is the number of negatives scoring at least as high as it.
"""

import numpy as np


CAPTIONS_PER_IMAGE = 5
RECALL_KS = (1, 5, 10)


def retrieval_ranks(similarities, captions_per_image: int = CAPTIONS_PER_IMAGE) -> tuple[np.ndarray, np.ndarray]:
    """
    Ranks (0 = first) of the positives, ties counted against the model.

    Args:
        similarities (array-like `[N, captions_per_image * N]`): image `i` against caption `j`.
        captions_per_image (`int`): captions per image, consecutive in the columns.
    Returns:
        `(i2t_ranks [N], t2i_ranks [captions_per_image * N])`: for each image the number of other images' captions
        scoring at least as high as its best caption; for each caption the number of other images scoring at least
        as high as its own image.
    """
    if hasattr(similarities, "detach"):  # a torch tensor
        similarities = similarities.detach().float().cpu().numpy()
    sims = np.asarray(similarities, dtype=np.float64)
    if sims.ndim != 2 or sims.shape[1] != captions_per_image * sims.shape[0] or sims.shape[0] == 0:
        raise ValueError(
            f"`similarities` must have shape [N, {captions_per_image} * N] (N >= 1), got {list(sims.shape)}."
        )
    if not np.isfinite(sims).all():
        raise ValueError("`similarities` contains NaN or Inf.")
    num_images = sims.shape[0]
    images = np.arange(num_images)
    own = sims.reshape(num_images, num_images, captions_per_image)[images, images]  # [N, 5] own captions

    best = own.max(1, keepdims=True)
    i2t_ranks = (sims >= best).sum(1) - (own >= best).sum(1)

    positives = own.reshape(-1)  # score of each caption with its own image, in caption order
    t2i_ranks = (sims >= positives[None, :]).sum(0) - 1
    return i2t_ranks, t2i_ranks


def retrieval_recalls(
    similarities, captions_per_image: int = CAPTIONS_PER_IMAGE, ks: tuple[int, ...] = RECALL_KS
) -> dict[str, float]:
    """
    Recall@K in percent of both directions and their sum.

    Args:
        similarities (array-like `[N, captions_per_image * N]`): image `i` against caption `j`; captions
            `captions_per_image * i ...` describe image `i`.
        captions_per_image (`int`): 5 for Flickr30K and COCO.
        ks (`tuple[int]`): the K of R@K.
    Returns:
        `dict`: `i2t_r{k}` and `t2i_r{k}` for each k, and `rsum`, as floats.
    """
    i2t_ranks, t2i_ranks = retrieval_ranks(similarities, captions_per_image)
    metrics = {f"i2t_r{k}": 100.0 * float(np.mean(i2t_ranks < k)) for k in ks}
    metrics.update({f"t2i_r{k}": 100.0 * float(np.mean(t2i_ranks < k)) for k in ks})
    metrics["rsum"] = sum(metrics.values())
    return metrics
