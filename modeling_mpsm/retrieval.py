"""Two-stage retrieval with MPSM: a global-embedding first stage, then the full model re-ranks the top candidates.

The first stage ranks the gallery by v̄·t̄ (the global features, trained with `config.global_loss_weight > 0` to be
good at this), with faiss `IndexFlatIP` when installed and a torch matmul otherwise; the full per-pair model re-scores
the `rerank_k` best and returns the top `k`. `MPSMIndex` holds a gallery's cached per-item outputs and saves them with
safetensors (plus a small json of metadata); `MPSMRetriever` ties a model, its processor and the two galleries.
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers.utils import ModelOutput

from .modeling_mpsm import MPSMImageOutput, MPSMTextOutput
from .scoring import _first_member, concatenate_outputs, encode_images, encode_texts, num_items, select_items

try:
    import faiss
except ImportError:  # the first stage falls back to a torch matmul
    faiss = None


TENSORS_NAME = "index.safetensors"
METADATA_NAME = "index.json"


def global_embeddings(cache):
    """
    First-stage embeddings [N, d] of a cache: v̄ (or t̄); for an ensemble the members' embeddings concatenated and
    scaled by 1/sqrt(members), so that inner products are the mean of the members' v̄·t̄.
    """
    if isinstance(cache, ModelOutput):
        outputs = [cache]
    else:
        outputs = list(cache.values())
    embeds = [o.image_embeds if isinstance(o, MPSMImageOutput) else o.text_embeds for o in outputs]
    return torch.cat(embeds, -1).float() / len(embeds) ** 0.5


class MPSMIndex:
    """
    A gallery of images or captions: cached per-item outputs of the model, their first-stage embeddings and one
    metadata entry (any json value, e.g. an id or the caption) per item.

    Args:
        cache: [`MPSMImageOutput`] or [`MPSMTextOutput`] over N items (or an ensemble's dict of them).
        metadata (`list`, *optional*): N json-serialisable entries; defaults to the item positions.
    """

    def __init__(self, cache, metadata=None):
        self.cache = cache
        self.metadata = list(range(num_items(cache))) if metadata is None else list(metadata)
        if len(self.metadata) != num_items(cache):
            raise ValueError(f"got {len(self.metadata)} metadata entries for {num_items(cache)} items")
        self.embeddings = global_embeddings(cache)
        self._faiss = None

    def __len__(self):
        return len(self.metadata)

    @property
    def kind(self):
        """The kind of items held: "image" or "text"."""
        return "image" if isinstance(_first_member(self.cache), MPSMImageOutput) else "text"

    def add(self, cache, metadata=None):
        """Appends the items of `cache` (same kind and members) with their metadata (default: their positions)."""
        start = len(self)
        metadata = list(range(start, start + num_items(cache))) if metadata is None else list(metadata)
        self.cache = concatenate_outputs([self.cache, cache])
        self.metadata += metadata
        self.embeddings = global_embeddings(self.cache)
        self._faiss = None

    def search(self, query_embeddings, k):
        """
        First stage: the `k` best items by inner product with each query.

        Args:
            query_embeddings (`torch.FloatTensor` [Q, d]): from `global_embeddings` of the other modality.
        Returns:
            (scores [Q, k] float32, indices [Q, k] long), best first.
        """
        k = min(k, len(self))
        queries = query_embeddings.float().cpu()
        if faiss is None:
            scores, indices = (queries @ self.embeddings.cpu().T).topk(k, dim=1)
            return scores, indices
        if self._faiss is None:
            self._faiss = faiss.IndexFlatIP(self.embeddings.shape[1])
            self._faiss.add(self.embeddings.cpu().contiguous().numpy())
        scores, indices = self._faiss.search(queries.contiguous().numpy(), k)
        return torch.from_numpy(scores), torch.from_numpy(indices).long()

    def save(self, directory):
        """Writes `index.safetensors` (every tensor of the cache) and `index.json` (kind, members, metadata)."""
        os.makedirs(directory, exist_ok=True)
        members = {None: self.cache} if isinstance(self.cache, ModelOutput) else self.cache
        tensors = {}
        for member, output in members.items():
            for name, value in output.items():
                tensors[name if member is None else f"{member}.{name}"] = value.detach().cpu().contiguous()
        save_file(tensors, os.path.join(directory, TENSORS_NAME))
        info = {"kind": self.kind, "members": None if None in members else list(members), "metadata": self.metadata}
        with open(os.path.join(directory, METADATA_NAME), "w") as f:
            json.dump(info, f)

    @classmethod
    def load(cls, directory, device="cpu"):
        """Reads an index written by `save`."""
        with open(os.path.join(directory, METADATA_NAME)) as f:
            info = json.load(f)
        tensors = load_file(os.path.join(directory, TENSORS_NAME), device=str(device))
        output_class = MPSMImageOutput if info["kind"] == "image" else MPSMTextOutput
        if info["members"] is None:
            cache = output_class(**tensors)
        else:
            cache = {
                member: output_class(**{k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(member + ".")})
                for member in info["members"]
            }
        return cls(cache, info["metadata"])


@torch.no_grad()
def rerank(model, queries, gallery, k, rerank_k, dtype=None):
    """
    Two-stage search of every query in `gallery`.

    Args:
        model: the [`MPSMModel`] or [`MPSMEnsembleModel`] that made both caches (in eval mode).
        queries: cache of the query items (captions for an image gallery, images for a caption gallery).
        gallery ([`MPSMIndex`]): the items searched.
        k (`int`): results per query. rerank_k (`int`): first-stage candidates re-scored by the full model (>= k;
            `rerank_k = len(gallery)` is exhaustive search).
        dtype (`torch.dtype`, *optional*): autocast dtype of the re-scoring.
    Returns:
        (scores [Q, k] float32, indices [Q, k] long) by the full model, best first. Q * rerank_k pairs are scored.
    """
    rerank_k = min(max(rerank_k, k), len(gallery))
    query_embeddings = global_embeddings(queries)
    _, candidates = gallery.search(query_embeddings, rerank_k)
    device = query_embeddings.device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    all_scores, all_indices = [], []
    with autocast:
        for q in range(num_items(queries)):
            query = select_items(queries, slice(q, q + 1))
            items = select_items(gallery.cache, candidates[q].to(device))
            if gallery.kind == "image":
                scores = model.similarity(items, query)[:, 0]
            else:
                scores = model.similarity(query, items)[0]
            best = scores.float().topk(min(k, rerank_k))
            all_scores.append(best.values)
            all_indices.append(candidates[q][best.indices.cpu()])
    return torch.stack(all_scores).cpu(), torch.stack(all_indices)


class MPSMRetriever:
    """
    Image and caption galleries searchable with a trained MPSM model.

    ```python
    retriever = MPSMRetriever(model, processor)
    retriever.add_images(region_features, boxes=boxes, image_sizes=sizes, metadata=image_ids)
    retriever.search_text("a red car left of a dog", k=10)   # [{"index", "score", "metadata"}, ...]
    retriever.save("gallery/"); retriever = MPSMRetriever.load("gallery/", model, processor)
    ```

    Args:
        model ([`MPSMModel`] or [`MPSMEnsembleModel`]): set to eval mode.
        processor ([`MPSMProcessor`], *optional*): turns captions and raw region features into model inputs; without it
            inputs must already be model inputs (`input_ids`, ... tensors).
        rerank_k (`int`): first-stage candidates re-scored by the full model.
        batch_size (`int`): items per encoding batch.
    """

    def __init__(self, model, processor=None, rerank_k=100, batch_size=128):
        self.model = model.eval()
        self.processor = processor
        self.rerank_k = rerank_k
        self.batch_size = batch_size
        self.images = None
        self.texts = None

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _image_inputs(self, region_features, boxes=None, image_sizes=None, region_mask=None):
        if self.processor is not None:
            inputs = self.processor(region_features=region_features, boxes=boxes, image_sizes=image_sizes,
                                    region_mask=region_mask)
        else:
            inputs = {"region_features": region_features, "boxes": boxes, "image_sizes": image_sizes,
                      "region_mask": region_mask}
        return {name: value.to(self.device) for name, value in inputs.items() if value is not None}

    def _text_inputs(self, text):
        inputs = self.processor(text=text) if self.processor is not None else text
        return {name: value.to(self.device) for name, value in inputs.items() if isinstance(value, torch.Tensor)}

    def _batches(self, inputs, size):
        for start in range(0, size, self.batch_size):
            yield {name: value[start : start + self.batch_size] for name, value in inputs.items()}

    def encode_images(self, region_features, boxes=None, image_sizes=None, region_mask=None, progress=False):
        """Per-image cache of images given as raw arrays (with a processor) or model-input tensors."""
        inputs = self._image_inputs(region_features, boxes, image_sizes, region_mask)
        return encode_images(self.model, self._batches(inputs, len(inputs["region_features"])), progress=progress)

    def encode_texts(self, text, progress=False):
        """Per-caption cache of captions given as strings (with a processor) or model-input tensors."""
        inputs = self._text_inputs([text] if isinstance(text, str) else text)
        return encode_texts(self.model, self._batches(inputs, len(inputs["input_ids"])), progress=progress)

    def add_images(self, region_features, boxes=None, image_sizes=None, region_mask=None, metadata=None):
        """Adds images ([B, n, f] region features, [B, n, 4] boxes, ...) to the image gallery."""
        cache = self.encode_images(region_features, boxes, image_sizes, region_mask)
        if self.images is None:
            self.images = MPSMIndex(cache, metadata)
        else:
            self.images.add(cache, metadata)

    def add_texts(self, text, metadata=None):
        """Adds captions (strings, or model-input tensors without a processor) to the caption gallery."""
        cache = self.encode_texts(text)
        if self.texts is None:
            self.texts = MPSMIndex(cache, metadata)
        else:
            self.texts.add(cache, metadata)

    @staticmethod
    def _results(gallery, scores, indices):
        return [
            {"index": int(i), "score": float(s), "metadata": gallery.metadata[int(i)]}
            for s, i in zip(scores.tolist(), indices.tolist())
        ]

    def search_text(self, caption, k=10, rerank_k=None):
        """The `k` gallery images that best match `caption` (a string): list of {"index", "score", "metadata"}."""
        if self.images is None:
            raise ValueError("the image gallery is empty: call `add_images` first")
        scores, indices = rerank(self.model, self.encode_texts(caption), self.images, k, rerank_k or self.rerank_k)
        return self._results(self.images, scores[0], indices[0])

    def search_image(self, region_features, boxes=None, image_sizes=None, region_mask=None, k=10, rerank_k=None):
        """The `k` gallery captions that best match one image ([n, f] or [1, n, f] region features)."""
        if self.texts is None:
            raise ValueError("the caption gallery is empty: call `add_texts` first")
        if region_features.ndim == 2:
            region_features = region_features[None]
            boxes = None if boxes is None else boxes[None]
            image_sizes = None if image_sizes is None else image_sizes[None]
        query = self.encode_images(region_features, boxes, image_sizes, region_mask)
        scores, indices = rerank(self.model, query, self.texts, k, rerank_k or self.rerank_k)
        return self._results(self.texts, scores[0], indices[0])

    def save(self, directory):
        """Saves the galleries under `directory/images` and `directory/texts`."""
        for name, gallery in (("images", self.images), ("texts", self.texts)):
            if gallery is not None:
                gallery.save(os.path.join(directory, name))

    @classmethod
    def load(cls, directory, model, processor=None, **kwargs):
        """A retriever over the galleries saved in `directory` by `save`."""
        retriever = cls(model, processor, **kwargs)
        for name in ("images", "texts"):
            if os.path.isfile(os.path.join(directory, name, METADATA_NAME)):
                setattr(retriever, name, MPSMIndex.load(os.path.join(directory, name), retriever.device))
        return retriever
