"""Two-stage retrieval with MPSM: a global-embedding first stage, then the full model re-ranks the top candidates.

The first stage ranks the gallery by v̄·t̄ (the global features, trained with `config.global_loss_weight > 0` to be
good at this): exactly by default (`faiss.knn` when faiss is installed, a torch matmul otherwise), or approximately
for galleries past exact search, with a faiss IVF-Flat index (`MPSMIndex(..., first_stage="ivf")`); the full
per-pair model re-scores the `rerank_k` best and returns the top `k`. `MPSMIndex` holds a gallery's cached per-item
outputs and saves them with safetensors (plus a small json of metadata and, for an approximate first stage, the faiss
index); `MPSMRetriever` ties a model, its processor and the two galleries.
"""

import json
import math
import os

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .modeling_mpsm import MPSMEnsembleItemOutput, MPSMImageOutput, MPSMTextOutput
from .scoring import encode_images, encode_texts

try:
    import faiss
except ImportError:  # the exact first stage falls back to a torch matmul; ivf needs faiss
    faiss = None


TENSORS_NAME = "index.safetensors"
METADATA_NAME = "index.json"
FAISS_NAME = "first_stage.faiss"
FIRST_STAGES = ("flat", "ivf")
IVF_TRAIN_POINTS_PER_LIST = 64  # k-means sample: min(N, 64 * nlist) items (faiss warns below 39 per centroid)
# 8x the cheapest nprobe that kept recall@100 >= 95 % on synthetic embeddings (benchmarks/first_stage.py,
# docs/benchmarks.md): a margin for real embeddings, still far cheaper than re-ranking the candidates
DEFAULT_NPROBE = 16


def global_embeddings(cache):
    """
    First-stage embeddings [N, d] of a cache: v̄ (or t̄); for an ensemble the members' embeddings concatenated and
    scaled by 1/sqrt(members), so that inner products are the mean of the members' v̄·t̄.
    """
    outputs = cache.members().values()
    embeds = [o.image_embeds if isinstance(o, MPSMImageOutput) else o.text_embeds for o in outputs]
    return torch.cat(embeds, -1).float() / len(embeds) ** 0.5


def _metadata(metadata, start, count):
    """`count` items' metadata as a list: `metadata`, or their positions from `start` when None."""
    metadata = list(range(start, start + count)) if metadata is None else list(metadata)
    if len(metadata) != count:
        raise ValueError(f"got {len(metadata)} metadata entries for {count} items")
    return metadata


class MPSMIndex:
    """
    A gallery of images or captions: cached per-item outputs of the model, their first-stage embeddings and one
    metadata entry (any json value, e.g. an id or the caption) per item.

    The first stage ranks the gallery by inner product of the global embeddings:

    - `first_stage="flat"` (default): exact, `faiss.knn` (BLAS, no copy of the gallery) or a torch matmul without faiss.
    - `first_stage="ivf"`: faiss `IndexIVFFlat` with inner product. k-means trains `nlist` centroids on
      min(N, 64 * nlist) gallery items sampled with `seed`; a query scans the items of its `nprobe` nearest lists
      (about nprobe / nlist of the gallery), so recall drops below exact search as `nprobe` shrinks, and
      `nprobe == nlist` gives the flat results. A query whose lists hold fewer than k items is searched again with
      twice the lists until they do. `nlist` defaults to 4 * sqrt(N) (at most N / 39, at least 1).

    The approximate index is built (trained and filled) by `build()`, or at the first `search`; `add` then adds the
    new items to it without re-training (the centroids stay those of the first items: call `rebuild()` after the
    gallery has grown or changed a lot). `nprobe` is read at every search and may be changed on a built index. `save` writes the built faiss index (`first_stage.faiss`, `faiss.write_index`) next to the cache, so
    that `load` does not re-train; its options go into `index.json`.

    Args:
        cache: [`MPSMImageOutput`] or [`MPSMTextOutput`] over N items (or an ensemble's `MPSMEnsembleItemOutput`).
        metadata (`list`, *optional*): N json-serialisable entries; defaults to the item positions.
        first_stage (`str`): "flat" or "ivf" (needs faiss).
        nlist (`int`, *optional*): IVF lists (k-means centroids); needs at least `nlist` items when built.
        nprobe (`int`, *optional*): IVF lists scanned per query (capped at `nlist`); default `DEFAULT_NPROBE`.
        seed (`int`): the IVF training sample and k-means initialisation.
    """

    def __init__(self, cache, metadata=None, first_stage="flat", nlist=None, nprobe=None, seed=0):
        if first_stage not in FIRST_STAGES:
            raise ValueError(f"`first_stage` must be one of {', '.join(map(repr, FIRST_STAGES))}, got {first_stage!r}")
        if first_stage != "flat" and faiss is None:
            raise ImportError(f"first_stage={first_stage!r} needs faiss (pip install faiss-cpu); without it only the "
                              f"exact first_stage='flat' is available")
        for name, value in (("nlist", nlist), ("nprobe", nprobe)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
            if first_stage != "ivf":
                raise ValueError(f"`{name}` applies to first_stage='ivf', not first_stage={first_stage!r}")
        self.cache = cache
        self.metadata = _metadata(metadata, 0, cache.num_items)
        self.embeddings = global_embeddings(cache)
        self.first_stage = first_stage
        self.nlist = nlist
        self.nprobe = DEFAULT_NPROBE if nprobe is None and first_stage == "ivf" else nprobe
        self.seed = seed
        self._faiss = None

    def __len__(self):
        return len(self.metadata)

    @property
    def kind(self):
        """The kind of items held: "image" or "text"."""
        return "image" if isinstance(next(iter(self.cache.members().values())), MPSMImageOutput) else "text"

    @property
    def options(self):
        """The first stage's settings (what `index.json` stores): {"first_stage", ...}."""
        if self.first_stage == "ivf":
            return {"first_stage": "ivf", "nlist": self.nlist, "nprobe": self.nprobe, "seed": self.seed}
        return {"first_stage": "flat"}

    def describe(self):
        """One line: e.g. "ivf (nlist 4000, nprobe 16)" or "flat (exact)"."""
        if self.first_stage == "flat":
            return "flat (exact)"
        return f"ivf (nlist {self.nlist or 'auto'}, nprobe {self.nprobe})"

    @property
    def is_built(self):
        """Whether the approximate first stage has been trained and filled (always True for "flat")."""
        return self.first_stage == "flat" or self._faiss is not None

    def _numpy(self, embeddings):
        return embeddings.detach().float().cpu().contiguous().numpy()

    def build(self):
        """Trains and fills the approximate first stage if not done yet (no-op for "flat"); returns the index."""
        if self.is_built:
            return self
        count, dim = self.embeddings.shape
        embeddings = self._numpy(self.embeddings)
        nlist = self.nlist or max(1, min(int(4 * math.sqrt(count)), count // 39))
        if count < nlist:
            raise ValueError(f"first_stage='ivf' trains nlist={nlist} centroids (k-means) on the gallery, which "
                             f"needs at least nlist={nlist} items; the gallery holds {count}: lower `nlist` "
                             f"(or leave it unset: 4 * sqrt(N)) or add items before the first search")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self.seed
        index.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST  # the sample below, not faiss's own
        sample = embeddings
        if count > IVF_TRAIN_POINTS_PER_LIST * nlist:
            rows = np.random.default_rng(self.seed).choice(count, IVF_TRAIN_POINTS_PER_LIST * nlist, replace=False)
            sample = embeddings[np.sort(rows)]
        index.train(sample)
        self.nlist = nlist
        index.add(embeddings)
        self._faiss = index
        return self

    def rebuild(self):
        """
        Re-trains and refills the approximate first stage on the whole current gallery (same `nlist`; set
        `index.nlist = None` first for 4 * sqrt(N) of the current size); returns the index.
        """
        self._faiss = None
        return self.build()

    def add(self, cache, metadata=None):
        """
        Appends the items of `cache` (same kind and members) with their metadata (default: their positions). A built
        approximate first stage gets the new embeddings without re-training.
        """
        start = len(self)
        self.metadata += _metadata(metadata, start, cache.num_items)
        self.cache = type(self.cache).concatenate([self.cache, cache])
        self.embeddings = global_embeddings(self.cache)
        if self._faiss is not None:
            self._faiss.add(self._numpy(self.embeddings[start:]))

    def _exact(self, queries, k):
        if faiss is None:
            return (queries @ self.embeddings.cpu().float().T).topk(k, dim=1)
        scores, indices = faiss.knn(queries.numpy(), self._numpy(self.embeddings), k, faiss.METRIC_INNER_PRODUCT)
        return torch.from_numpy(scores), torch.from_numpy(indices).long()

    def search(self, query_embeddings, k):
        """
        First stage: the `k` best items by inner product with each query (exact for "flat", approximate otherwise).

        Args:
            query_embeddings (`torch.FloatTensor` [Q, d]): from `global_embeddings` of the other modality.
        Returns:
            (scores [Q, k] float32, indices [Q, k] long), best first.
        """
        k = min(k, len(self))
        queries = query_embeddings.detach().float().cpu().contiguous()
        if self.first_stage == "flat":
            scores, indices = self._exact(queries, k)
            return scores, indices
        self.build()
        nprobe = self._faiss.nprobe = max(1, min(self.nprobe, self.nlist))
        scores, indices = self._faiss.search(queries.numpy(), k)
        scores, indices = torch.from_numpy(scores), torch.from_numpy(indices).long()
        short = (indices < 0).any(1)  # the probed lists held fewer than k items
        while short.any() and nprobe < self.nlist:  # every list probed: every query finds its k items
            nprobe = self._faiss.nprobe = min(2 * nprobe, self.nlist)  # those queries again, with twice the lists
            scores[short], indices[short] = map(torch.from_numpy, self._faiss.search(queries[short].numpy(), k))
            short = (indices < 0).any(1)
        return scores, indices

    def save(self, directory):
        """
        Writes `index.safetensors` (every tensor of the cache), `index.json` (kind, members, metadata, first-stage
        options) and, when the approximate first stage is built, `first_stage.faiss` (`faiss.write_index`; it holds a
        copy of the global embeddings, a few % of the cache's size at paper size).
        """
        os.makedirs(directory, exist_ok=True)
        members = None if isinstance(self.cache, (MPSMImageOutput, MPSMTextOutput)) else list(self.cache)
        tensors = {}
        for member, output in self.cache.members().items():
            for name, value in output.items():
                tensors[name if members is None else f"{member}.{name}"] = value.detach().cpu().contiguous()
        save_file(tensors, os.path.join(directory, TENSORS_NAME))
        faiss_path = os.path.join(directory, FAISS_NAME)
        if self.first_stage != "flat" and self._faiss is not None:
            faiss.write_index(self._faiss, faiss_path)
        elif os.path.exists(faiss_path):
            os.remove(faiss_path)  # a stale index of an earlier save
        info = {"kind": self.kind, "members": members, "metadata": self.metadata,
                **self.options, "faiss_index": FAISS_NAME if self.first_stage != "flat" and self._faiss is not None
                else None}
        with open(os.path.join(directory, METADATA_NAME), "w") as f:
            json.dump(info, f)

    @classmethod
    def load(cls, directory, device="cpu", nprobe=None):
        """Reads an index written by `save`; `nprobe` overrides the saved search setting of an "ivf" index."""
        with open(os.path.join(directory, METADATA_NAME)) as f:
            info = json.load(f)
        tensors = load_file(os.path.join(directory, TENSORS_NAME), device=str(device))
        output_class = MPSMImageOutput if info["kind"] == "image" else MPSMTextOutput
        if info["members"] is None:
            cache = output_class(**tensors)
        else:
            cache = MPSMEnsembleItemOutput({
                member: output_class(**{k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(member + ".")})
                for member in info["members"]
            })
        first_stage = info["first_stage"]
        if nprobe is not None and first_stage != "ivf":
            raise ValueError(f"`nprobe` applies to first_stage='ivf'; the index in {directory} has "
                             f"first_stage={first_stage!r}")
        options = {}
        if first_stage == "ivf":
            options = dict(nlist=info["nlist"], nprobe=nprobe or info["nprobe"], seed=info["seed"])
        index = cls(cache, info["metadata"], first_stage, **options)
        if info["faiss_index"]:
            index._faiss = faiss.read_index(os.path.join(directory, info["faiss_index"]))
            if index._faiss.ntotal != len(index):
                raise ValueError(f"{os.path.join(directory, info['faiss_index'])} holds {index._faiss.ntotal} items "
                                 f"but the gallery {len(index)}: the files come from different saves")
        return index


@torch.no_grad()
def rerank(model, queries, gallery, k, rerank_k):
    """
    Two-stage search of every query in `gallery`.

    Args:
        model: the [`MPSMModel`] or [`MPSMEnsembleModel`] that made both caches (in eval mode).
        queries: cache of the query items (captions for an image gallery, images for a caption gallery).
        gallery ([`MPSMIndex`]): the items searched.
        k (`int`): results per query. rerank_k (`int`): first-stage candidates re-scored by the full model (>= k;
            `rerank_k = len(gallery)` is exhaustive search).
    Returns:
        (scores [Q, k] float32, indices [Q, k] long) by the full model, best first. Q * rerank_k pairs are scored.
    """
    rerank_k = min(max(rerank_k, k), len(gallery))
    query_embeddings = global_embeddings(queries)
    _, candidates = gallery.search(query_embeddings, rerank_k)
    all_scores, all_indices = [], []
    for q in range(queries.num_items):
        items = gallery.cache.select(candidates[q].to(gallery.cache.device))
        best = queries.select(slice(q, q + 1)).scores_against(items, model).topk(min(k, rerank_k))
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
        index_options (`dict`, *optional*): keyword arguments of the [`MPSMIndex`] galleries made by `add_images` /
            `add_texts`, e.g. `{"first_stage": "ivf", "nprobe": 16}`.
    """

    def __init__(self, model, processor=None, rerank_k=100, batch_size=128, index_options=None):
        self.model = model.eval()
        self.processor = processor
        self.rerank_k = rerank_k
        self.batch_size = batch_size
        self.index_options = dict(index_options or {})
        self.images = None
        self.texts = None

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _batches(self, inputs):
        """Batches of `batch_size` items of model inputs, on the model's device (None and non-tensors dropped)."""
        inputs = {name: value.to(self.device) for name, value in inputs.items() if isinstance(value, torch.Tensor)}
        size = len(next(iter(inputs.values())))
        for start in range(0, size, self.batch_size):
            yield {name: value[start : start + self.batch_size] for name, value in inputs.items()}

    def encode_images(self, region_features, boxes=None, image_sizes=None, region_mask=None, progress=False):
        """Per-image cache of images given as raw arrays (with a processor) or model-input tensors."""
        inputs = dict(region_features=region_features, boxes=boxes, image_sizes=image_sizes, region_mask=region_mask)
        inputs = self.processor(**inputs) if self.processor is not None else inputs
        return encode_images(self.model, self._batches(inputs), progress=progress)

    def encode_texts(self, text, progress=False):
        """Per-caption cache of captions given as strings (with a processor) or model-input tensors."""
        text = [text] if isinstance(text, str) else text
        inputs = self.processor(text=text) if self.processor is not None else text
        return encode_texts(self.model, self._batches(inputs), progress=progress)

    def _add(self, name, cache, metadata):
        if getattr(self, name) is None:
            setattr(self, name, MPSMIndex(cache, metadata, **self.index_options))
        else:
            getattr(self, name).add(cache, metadata)

    def add_images(self, region_features, boxes=None, image_sizes=None, region_mask=None, metadata=None):
        """Adds images ([B, n, f] region features, [B, n, 4] boxes, ...) to the image gallery."""
        self._add("images", self.encode_images(region_features, boxes, image_sizes, region_mask), metadata)

    def add_texts(self, text, metadata=None):
        """Adds captions (strings, or model-input tensors without a processor) to the caption gallery."""
        self._add("texts", self.encode_texts(text), metadata)

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
