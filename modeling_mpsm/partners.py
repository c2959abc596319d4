"""Partners for `training.PartnerSampler` mined from what every data set has, for hard-negative batches without twin
records: each training image gets the most similar other image as its partner, by its captions (TF-IDF cosine,
`mine_caption_partners`) or by the first stage's global image embeddings v̄ (cosine, `mine_embedding_partners`).

Both share one pairing (`pair_mutually`): each item's `top_k` most similar other items are its candidates, and the
candidate pairs are taken greedily by decreasing similarity, each item at most once, so that every pair holds both
ways (`PartnerSampler` refuses one-way pairs). Items whose candidates were all taken are paired the same way among
themselves, round after round, until at most one is left: an odd item out gets -1. The similarity is computed a
block of `chunk_size` rows at a time, so memory grows with the number of items, not its square (30,000 images x 5
captions: see docs/training.md for the time).

Not imported by the files copied into Hub repositories; `examples/train_mpsm.py --partners captions|embeddings` uses
it.
"""

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .common import CAPTIONS_PER_IMAGE
from .data import image_batches
from .processing_mpsm import tokenize_caption
from .retrieval import global_embeddings
from .scoring import encode_images


TOP_K = 10  # candidates kept per item
CHUNK_SIZE = 512  # rows of the similarity computed at once ([512, N] float32)
# Words in more than this share of the images are held densely (a matrix product), the rarer ones as postings lists:
# a word in d images costs d^2 products as postings, N^2 as a dense column, so the few frequent words ("a", "in",
# "man") go dense and the long tail sparse; 1/32 was the fastest share with the least memory (docs/benchmarks.md).
DENSE_TERM_SHARE = 1 / 32


def pair_mutually(similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], num_items: int,
                  top_k: int = TOP_K, chunk_size: int = CHUNK_SIZE) -> list[int]:
    """
    Greedy mutual pairing of `num_items` items by decreasing similarity.

    Args:
        similarity: `similarity(rows, columns)` -> float tensor [len(rows), len(columns)], the similarity of items
            `rows` to items `columns` (long tensors of item indices, on the CPU).
        num_items (`int`): N.
        top_k (`int`): candidates kept per item and round.
        chunk_size (`int`): rows of the similarity computed at once.
    Returns:
        `list[int]` of N partner indices, `partners[partners[i]] == i`; -1 for at most one item (N odd).
    """
    for name, value in (("top_k", top_k), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    partners = torch.full((num_items,), -1)
    remaining = torch.arange(num_items)
    while len(remaining) > 1:  # every round pairs at least the most similar candidate pair
        heads, tails, scores = _candidates(similarity, remaining, top_k, chunk_size)
        _pair_greedily(heads, tails, scores, partners)
        remaining = remaining[partners[remaining] < 0]
    return partners.tolist()


def _candidates(similarity, items: torch.Tensor, top_k: int, chunk_size: int):
    """The `top_k` most similar other items of each of `items` among `items`, as flat (head, tail, score) tensors."""
    k = min(top_k, len(items) - 1)
    heads, tails, scores = [], [], []
    for start in range(0, len(items), chunk_size):
        rows = items[start:start + chunk_size]
        block = similarity(rows, items).float().cpu()
        block[torch.arange(len(rows)), start + torch.arange(len(rows))] = -math.inf  # not itself
        best = block.topk(k, dim=1)
        heads.append(rows.repeat_interleave(k))
        tails.append(items[best.indices].flatten())
        scores.append(best.values.flatten())
    return torch.cat(heads), torch.cat(tails), torch.cat(scores)


def _pair_greedily(heads: torch.Tensor, tails: torch.Tensor, scores: torch.Tensor, partners: torch.Tensor):
    """Takes the candidate pairs by decreasing score (ties: by the lower, then the higher index), each pair whose two
    items are still free; writes both directions into `partners` (-1: free)."""
    low, high = torch.minimum(heads, tails).numpy(), torch.maximum(heads, tails).numpy()
    order = np.lexsort((high, low, -scores.numpy()))
    taken = (partners >= 0).tolist()
    for first, second in zip(low[order].tolist(), high[order].tolist()):
        if not taken[first] and not taken[second]:
            taken[first] = taken[second] = True
            partners[first], partners[second] = second, first


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------


def mine_caption_partners(captions: Sequence[str], captions_per_image: int = CAPTIONS_PER_IMAGE,
                          top_k: int = TOP_K, chunk_size: int = CHUNK_SIZE) -> list[int]:
    """
    Partners by caption similarity: the cosine of TF-IDF vectors, one per image over its captions concatenated (words
    as the processor tokenises them: lowercased, `tokenize_caption`), paired by `pair_mutually`.

    TF is a word's count in the image's captions, IDF the smoothed log(1 + N) - log(1 + df) + 1 of N images of
    which df hold the word; vectors are L2-normalised. Words shared by two images weigh more the rarer they are, so an
    image's partner is the one whose captions name the same unusual things ("a dalmatian catching a frisbee").

    Args:
        captions (`list[str]`): N x `captions_per_image` captions, image i's at `k * i ... k * i + k - 1`.
        captions_per_image (`int`): k.
    Returns:
        `list[int]`: per image, its partner's index (both ways), or -1 for the odd one out.
    """
    if isinstance(captions, str) or not all(isinstance(caption, str) for caption in captions):
        raise ValueError("`captions` must be a list of strings (the captions of every image, image by image)")
    if captions_per_image < 1 or len(captions) % captions_per_image:
        raise ValueError(f"`captions` must hold `captions_per_image` ({captions_per_image}) captions per image, got "
                         f"{len(captions)} captions")
    return pair_mutually(TfidfSimilarity(captions, captions_per_image), len(captions) // captions_per_image, top_k,
                         chunk_size)


class TfidfSimilarity:
    """
    Cosine similarity of the images' TF-IDF vectors (see `mine_caption_partners`), as `pair_mutually` calls it.

    The vectors are split by word: the words in more than `DENSE_TERM_SHARE` of the images form a dense matrix
    [N, frequent words] (a matrix product per block), the others postings lists (for each word, the images holding
    it and their weights), whose products are summed per pair of images sharing the word.
    """

    def __init__(self, captions: Sequence[str], captions_per_image: int):
        images, terms, num_terms = _words_by_image(captions, captions_per_image)
        num_images = len(captions) // captions_per_image
        keys, counts = np.unique(images * num_terms + terms, return_counts=True)
        images, terms = np.divmod(keys, num_terms)  # one entry per (image, word), sorted by image
        df = np.bincount(terms, minlength=num_terms)
        weights = counts * (np.log((1 + num_images) / (1 + df[terms])) + 1)
        norms = np.sqrt(np.bincount(images, weights=weights**2, minlength=num_images))
        weights = weights / np.maximum(norms, 1e-12)[images]

        frequent = df > DENSE_TERM_SHARE * num_images
        column = np.cumsum(frequent) - 1  # of a frequent word in the dense matrix
        dense = frequent[terms]
        self.dense = torch.zeros(num_images, int(frequent.sum()))
        self.dense[images[dense], column[terms[dense]]] = torch.from_numpy(weights[dense]).float()
        # The other words: by image (to read a block's rows) and by word (postings lists).
        self.images, self.terms, self.weights = images[~dense], terms[~dense], weights[~dense].astype(np.float32)
        self.row_starts = np.searchsorted(self.images, np.arange(num_images + 1))
        by_term = np.argsort(self.terms, kind="stable")
        self.posting_images, self.posting_weights = self.images[by_term], self.weights[by_term]
        self.posting_starts = np.searchsorted(self.terms[by_term], np.arange(num_terms + 1))

    def __call__(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """[len(rows), len(columns)]: the dense words' product plus, for every word of a row in the postings lists,
        the products with the columns holding it."""
        similarity = self.dense[rows] @ self.dense[columns].T
        rows, columns = rows.numpy(), columns.numpy()
        entries, row_lengths = _ranges(self.row_starts, rows)  # the rows' words in the postings lists
        postings, lengths = _ranges(self.posting_starts, self.terms[entries])  # the images holding each of them
        position = np.full(len(self.row_starts) - 1, -1)
        position[columns] = np.arange(len(columns))
        column = position[self.posting_images[postings]]
        row = np.repeat(np.repeat(np.arange(len(rows)), row_lengths), lengths)
        products = np.repeat(self.weights[entries], lengths) * self.posting_weights[postings]
        keep = column >= 0
        similarity.view(-1).index_add_(0, torch.from_numpy(row[keep] * len(columns) + column[keep]),
                                       torch.from_numpy(products[keep]))
        return similarity


def _ranges(starts: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions `starts[g] ... starts[g + 1] - 1` of each of `groups`, concatenated, and each group's length."""
    lengths = starts[groups + 1] - starts[groups]
    return np.repeat(starts[groups] - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum()), lengths


def _words_by_image(captions: Sequence[str], captions_per_image: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Every word of every caption as (image index, word id) arrays, the ids numbering the distinct words, and the
    number of distinct words."""
    vocabulary = {}
    images, terms = [], []
    for index, caption in enumerate(captions):
        words = tokenize_caption(caption)
        terms += [vocabulary.setdefault(word, len(vocabulary)) for word in words]
        images += [index // captions_per_image] * len(words)
    return np.array(images, dtype=np.int64), np.array(terms, dtype=np.int64), len(vocabulary)


# ----------------------------------------------------------------------------------------------------------------
# Global image embeddings
# ----------------------------------------------------------------------------------------------------------------


def mine_embedding_partners(image_embeds: torch.Tensor, top_k: int = TOP_K, chunk_size: int = CHUNK_SIZE) -> list[int]:
    """
    Partners by the cosine similarity of the first stage's global image embeddings (v̄, `global_image_embeddings`),
    paired by `pair_mutually`. The products run on the embeddings' device.

    Args:
        image_embeds (`torch.Tensor` [N, d]): one embedding per image.
    Returns:
        `list[int]`: per image, its partner's index (both ways), or -1 for the odd one out.
    """
    if not torch.is_tensor(image_embeds) or image_embeds.dim() != 2:
        got = tuple(image_embeds.shape) if torch.is_tensor(image_embeds) else type(image_embeds).__name__
        raise ValueError(f"`image_embeds` must be a tensor [images, dim], got {got}")
    if not torch.isfinite(image_embeds).all():
        raise ValueError("`image_embeds` must be finite (a diverged model has no neighbours to mine)")
    embeds = F.normalize(image_embeds.detach().float(), dim=-1)

    def similarity(rows, columns):
        return embeds[rows.to(embeds.device)] @ embeds[columns.to(embeds.device)].T

    return pair_mutually(similarity, len(embeds), top_k, chunk_size)


@torch.no_grad()
def global_image_embeddings(model, dataset, processor, batch_size: int = 128) -> torch.Tensor:
    """
    The first stage's global image embeddings of every image of `dataset` (`retrieval.global_embeddings` of
    `scoring.encode_images`: v̄, an ensemble's members' side by side), in eval mode (the mode is restored), [N, d].
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        batches = ({key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
                   for batch in image_batches(dataset, batch_size, processor))
        return global_embeddings(encode_images(model, batches, progress=False))
    finally:
        model.train(was_training)
