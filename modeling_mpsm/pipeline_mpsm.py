# coding=utf-8
"""The `"mpsm-retrieval"` pipeline: text -> the top-k images of a gallery, image -> the top-k captions of a gallery.

This file is copied into every Hub repository of the model (and into every folder `save_pretrained` writes), and the
repository's `config.json` names it under `custom_pipelines`, so that

```python
from transformers import pipeline

retriever = pipeline(model="org/mpsm-dis", trust_remote_code=True)  # or a local checkpoint directory
retriever.set_gallery(images={"region_features": feats, "boxes": boxes, "image_sizes": sizes}, image_ids=ids,
                      captions=captions, caption_ids=caption_ids)
retriever("a red car left of a small dog", top_k=5)  # -> [{"score": 0.91, "id": ...}, ...], best first
retriever({"region_features": feats[0], "boxes": boxes[0], "image_sizes": sizes[0]}, top_k=5)  # -> captions
```

It only imports transformers; it works on the outputs of the model's `encode_image` / `encode_text`
(`MPSMImageOutput` / `MPSMTextOutput`, or an ensemble's `MPSMEnsembleItemOutput` of them) through their own
operations (`select`, `concatenate`, `members`, `scores_against`).

The gallery is encoded once, by `set_gallery`, with the per-item part of the model (`encode_image` / `encode_text`);
each query is then encoded and scored against the whole gallery with `similarity`, in calls of `block_size` gallery
items (`scores_against`: one batched call per block, no loop over pairs), and the `top_k` best are returned. This is exhaustive search;
for large galleries `modeling_mpsm.retrieval.MPSMRetriever` has a two-stage (global features, then re-ranking) search.

Shapes: N gallery items, n regions per image (the processor's `num_regions`), f = config.img_dim, L words of a
caption (with `<start>` and `<end>`), k = `top_k`.
"""

from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY


TASK = "mpsm-retrieval"
IMAGE_KEYS = ("region_features", "boxes", "image_sizes", "region_mask")
DEFAULT_TOP_K = 5


def custom_pipelines():
    """The `custom_pipelines` entry of config.json that makes `pipeline(model=dir, trust_remote_code=True)` load
    `MPSMRetrievalPipeline` from this file of the repository, with the model loaded by `AutoModel`."""
    return {TASK: {"impl": "pipeline_mpsm.MPSMRetrievalPipeline", "pt": ["AutoModel"], "type": "multimodal"}}


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


def _image_kwargs(image, name):
    """Processor keyword arguments of an image input: a dict with `IMAGE_KEYS`, or bare region features."""
    if not isinstance(image, dict):
        image = {"region_features": image}
    unknown = sorted(set(image) - set(IMAGE_KEYS))
    if unknown:
        raise ValueError(f"`{name}` has unknown keys {unknown}; expected some of {list(IMAGE_KEYS)}")
    if image.get("region_features") is None:
        raise ValueError(f"`{name}` needs `region_features`")
    return image


class MPSMRetrievalPipeline(Pipeline):
    """
    Image-text retrieval with MPSM over a gallery of images (precomputed region features) and/or captions.

    Set the gallery once with [`~MPSMRetrievalPipeline.set_gallery`]; then call the pipeline with queries:

    - a caption (`str`): returns the `top_k` gallery images that match it best;
    - an image: a dict with `region_features` [n, f] and optionally `boxes` [n, 4] (x1, y1, x2, y2, in pixels with
      `image_sizes` [2] = (width, height), or in [0, 1]) and `region_mask` [n], or the region features alone (a tensor
      or array [n, f]); returns the `top_k` gallery captions that match it best;
    - a list of queries: returns one result list per query.

    Call arguments:
        top_k (`int`, *optional*, defaults to 5 or the gallery size if smaller): results per query, between 1 and the
            gallery size (a `ValueError` otherwise).
        return_attention (`bool`, *optional*, defaults to `False`): also return, for each result, the caption's
            `words` (`list[str]`, L tokens) and `attention` (`torch.FloatTensor` [L, n]: the text-guided attention of
            each word over the image's regions, step 5 of the model; an ensemble explains with its `dis` member).
            `modeling_mpsm.visualization.draw_word_region_attention(result["words"], result["attention"], boxes,
            image_size, "figure.png")` draws it (the paper's Figure 4).
        block_size (`int`, *optional*, defaults to 256): gallery items scored per batched `similarity` call.

    Returns:
        `list[dict]` of k results, best first: `{"score": float in (0, 1), "id": the gallery id}` (plus `words` and
        `attention` with `return_attention=True`). The scores are those of `model.similarity(images, captions)`.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        self.image_gallery = None
        self.caption_gallery = None
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(
                "MPSMRetrievalPipeline needs the model's MPSMProcessor: save it next to the model "
                "(`processor.save_pretrained(dir)`) or pass `processor=` to `pipeline()`"
            )

    # ------------------------------------------------------------------------------------------------ the gallery
    def set_gallery(self, images=None, captions=None, image_ids=None, caption_ids=None, batch_size=256):
        """
        Encodes the gallery once (replacing the images and/or captions given; the other part is kept).

        Args:
            images (*optional*): N images as the processor takes them: a dict with `region_features` [N, n, f] (or a
                list of [n_i, f]), optionally `boxes` [N, n, 4], `image_sizes` [N, 2], `region_mask` [N, n]; or the
                region features alone.
            captions (`list[str]`, *optional*): N captions.
            image_ids, caption_ids (`list`, *optional*): one id per item, returned as the results' `id`; default to
                the item positions.
            batch_size (`int`): items per encoding batch.
        """
        if images is None and captions is None:
            raise ValueError("`set_gallery` needs `images`, `captions` or both")
        _check_positive_int("batch_size", batch_size)
        with self.device_placement(), self.get_inference_context()():
            if images is not None:
                inputs = self.processor(**_image_kwargs(images, "images"))
                size = len(inputs["region_features"])
                ids = self._ids(image_ids, size, "image_ids")
                cache = self._encode(self.model.encode_image, inputs, size, batch_size)
                self.image_gallery = {"cache": cache, "ids": ids}
            if captions is not None:
                if isinstance(captions, str) or not captions:
                    raise ValueError("`captions` must be a non-empty list of strings")
                ids = self._ids(caption_ids, len(captions), "caption_ids")
                inputs = self.processor(text=list(captions))
                cache = self._encode(self.model.encode_text, inputs, len(captions), batch_size)
                self.caption_gallery = {"cache": cache, "ids": ids, "input_ids": inputs["input_ids"]}

    def _encode(self, encode, inputs, size, batch_size):
        inputs = self._ensure_tensor_on_device(dict(inputs), self.device)
        batches = [
            encode(**{name: value[start : start + batch_size] for name, value in inputs.items()})
            for start in range(0, size, batch_size)
        ]
        return type(batches[0]).concatenate(batches)

    @staticmethod
    def _ids(ids, size, name):
        if ids is None:
            return list(range(size))
        ids = list(ids)
        if len(ids) != size:
            raise ValueError(f"`{name}` has {len(ids)} entries for {size} gallery items")
        return ids

    def _gallery(self, kind):
        gallery = self.image_gallery if kind == "images" else self.caption_gallery
        if gallery is None:
            raise ValueError(
                f"the pipeline has no gallery of {kind} to search: call `set_gallery({kind}=...)` first"
            )
        return gallery

    def _top_k(self, top_k, kind):
        size = len(self._gallery(kind)["ids"])
        if top_k is None:
            return min(DEFAULT_TOP_K, size)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= size:
            raise ValueError(
                f"`top_k` must be an integer between 1 and {size} (the number of gallery {kind}), got {top_k!r}"
            )
        return top_k

    # ------------------------------------------------------------------------------------------------ the pipeline
    def _sanitize_parameters(self, top_k=None, return_attention=None, block_size=None):
        preprocess_params, forward_params = {}, {}
        if top_k is not None:
            preprocess_params["top_k"] = forward_params["top_k"] = top_k
        if return_attention is not None:
            forward_params["return_attention"] = bool(return_attention)
        if block_size is not None:
            forward_params["block_size"] = _check_positive_int("block_size", block_size)
        return preprocess_params, forward_params, {}

    def preprocess(self, inputs, top_k=None):
        """A caption -> its text inputs ([1, L] tensors); an image -> its image inputs ([1, n, ...] tensors)."""
        if isinstance(inputs, str):
            self._top_k(top_k, "images")
            return dict(self.processor(text=[inputs]))
        if isinstance(inputs, (list, tuple)) or not (isinstance(inputs, dict) or hasattr(inputs, "shape")):
            raise ValueError(
                "an MPSM retrieval query is a caption (`str`) or one image (a dict with `region_features` [n, f] and "
                f"optional {list(IMAGE_KEYS[1:])}, or a tensor [n, f]), got {type(inputs).__name__}"
            )
        self._top_k(top_k, "captions")
        model_inputs = dict(self.processor(**_image_kwargs(inputs, "image query")))
        if len(model_inputs["region_features"]) != 1:
            raise ValueError(
                f"an image query is one image, `region_features` [n, f]; got "
                f"{len(model_inputs['region_features'])} images (pass a list of queries instead)"
            )
        return model_inputs

    def _forward(self, model_inputs, top_k=None, return_attention=False, block_size=256):
        text_query = "input_ids" in model_inputs
        kind = "images" if text_query else "captions"
        gallery = self._gallery(kind)
        cache = gallery["cache"]
        query = self.model.encode_text(**model_inputs) if text_query else self.model.encode_image(**model_inputs)
        scores = query.scores_against(cache, self.model, max_pairs_per_block=block_size)
        best = scores.topk(self._top_k(top_k, kind))
        outputs = {"gallery": kind, "scores": best.values, "indices": best.indices}
        if return_attention:
            # an ensemble explains with its first member
            name, explainer = next(iter(self.model.members().items()))
            found, query = cache.select(best.indices).members()[name], query.members()[name]
            if text_query:
                images, texts = found, query
                input_ids = model_inputs["input_ids"].expand(len(best.indices), -1)
            else:
                images, texts = query, found
                input_ids = gallery["input_ids"][best.indices.cpu()]
            attention = explainer.text_region_attention(images, texts)  # [I, T, L, n]: [k, 1] or [1, k]
            outputs["attention"] = attention[:, 0] if text_query else attention[0]  # [k, L, n]
            outputs["input_ids"] = input_ids  # [k, L]
            outputs["word_mask"] = texts.attention_mask.expand(len(best.indices), -1)  # [k, L]
            outputs["region_mask"] = images.region_mask.expand(len(best.indices), -1)  # [k, n]
        return outputs

    def postprocess(self, model_outputs):
        ids = self._gallery(model_outputs["gallery"])["ids"]
        results = [
            {"score": score, "id": ids[index]}
            for score, index in zip(model_outputs["scores"].tolist(), model_outputs["indices"].tolist())
        ]
        if "attention" in model_outputs:
            tokenizer = self.processor.tokenizer
            for rank, result in enumerate(results):
                num_words = int(model_outputs["word_mask"][rank].sum())
                num_regions = int(model_outputs["region_mask"][rank].nonzero().max()) + 1  # up to the last real region
                ids_of_words = model_outputs["input_ids"][rank, :num_words].tolist()
                result["words"] = tokenizer.convert_ids_to_tokens(ids_of_words)
                result["attention"] = model_outputs["attention"][rank, :num_words, :num_regions].float()
        return results

    def save_pretrained(self, save_directory, **kwargs):
        """Saves the model (with this file and `custom_pipelines`) and its processor, so the folder loads again."""
        super().save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)


if TASK not in PIPELINE_REGISTRY.supported_tasks:
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=MPSMRetrievalPipeline, pt_model=AutoModel, type="multimodal"
    )
