# coding=utf-8
"""Processor for MPSM: word-level captions with their dependency graph, and precomputed region features.

This file is copied into every Hub repository of the model, so it only imports torch, numpy, transformers and the
standard library. spaCy is an optional dependency, imported lazily by `SpacyDependencyParser`.
"""

import functools
import importlib
import json
import re
import unicodedata
import warnings

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin


# SCAN convention: lowercase word tokens. Hyphenated words ("white-walled") stay whole, English clitics are split off
# as NLTK does ("man's" -> "man", "'s"; "don't" -> "do", "n't"), every other punctuation character is dropped. The
# same pattern drives the `tokenizers` pre-tokenizer built by `vocabulary.build_tokenizer`.
WORD_PATTERN = r"[a-z0-9]+(?=n't)|n't|'(?:s|m|d|ll|re|ve|n)(?![a-z0-9])|[a-z0-9]+(?:-[a-z0-9]+)*"
_WORD_RE = re.compile(WORD_PATTERN)


def normalize_caption(text: str) -> str:
    """NFKD-decompose, drop combining marks ("café" -> "cafe") and lowercase, as the tokenizer's normaliser does."""
    if text.isascii():  # nothing to decompose: skip the pass over the characters
        return text.lower()
    text = unicodedata.normalize("NFKD", text)
    return "".join(char for char in text if not unicodedata.category(char).startswith("M")).lower()


def tokenize_caption(text: str) -> list[str]:
    """Split a caption into SCAN-style word tokens.

    Example: `tokenize_caption("A man's white-walled tent, isn't it?")` ->
    `["a", "man", "'s", "white-walled", "tent", "is", "n't", "it"]`.
    """
    return _WORD_RE.findall(normalize_caption(text))


class DependencyParser:
    """Interface of a dependency parser over already tokenised words.

    `parse(words)` returns, for each word, the index of its syntactic head; a root points to itself.
    """

    def parse(self, words: list[str]) -> list[int]:
        raise NotImplementedError

    def parse_batch(self, batch: list[list[str]]) -> list[list[int]]:
        return [self.parse(words) for words in batch]


class FallbackDependencyParser(DependencyParser):
    """Parser-free graph: each word's head is its left neighbour and the first word is the root.

    The resulting adjacency is a chain linking neighbouring words (plus the self-loops the processor adds). It is what
    the processor uses when no real parser is installed.
    """

    def parse(self, words: list[str]) -> list[int]:
        return [max(index - 1, 0) for index in range(len(words))]


class SpacyDependencyParser(DependencyParser):
    """Dependency parser backed by a spaCy pipeline.

    The `Doc` is built from our word tokens (not re-tokenised by spaCy), so heads align exactly with
    `tokenize_caption`. Named-entity recognition and lemmatisation are not loaded.
    """

    def __init__(self, model_name: str = "en_core_web_sm"):
        spacy = importlib.import_module("spacy")
        self.model_name = model_name
        self.nlp = spacy.load(model_name, exclude=["ner", "lemmatizer"])
        self._doc_class = importlib.import_module("spacy.tokens").Doc

    def parse(self, words: list[str]) -> list[int]:
        return self.parse_batch([words])[0]

    def parse_batch(self, batch: list[list[str]]) -> list[list[int]]:
        docs = (self._doc_class(self.nlp.vocab, words=list(words)) for words in batch)
        return [[token.head.i for token in doc] for doc in self.nlp.pipe(docs, batch_size=256)]


@functools.lru_cache(maxsize=None)
def get_dependency_parser(name: str = "spacy:en_core_web_sm") -> DependencyParser:
    """Return the (cached) parser named `"spacy:<pipeline>"` or `"fallback"`.

    If spaCy or the pipeline is not installed, warns once and returns a `FallbackDependencyParser`.
    """
    if name == "fallback":
        return FallbackDependencyParser()
    if not name.startswith("spacy:"):
        raise ValueError(f"`dependency_parser` must be 'spacy:<pipeline>' or 'fallback', got {name!r}.")
    try:
        return SpacyDependencyParser(name.removeprefix("spacy:"))
    except (ImportError, OSError) as error:
        warnings.warn(
            f"Dependency parser {name!r} is unavailable ({error}); captions get the fallback graph linking "
            "neighbouring words instead of their dependency parse.",
            stacklevel=2,
        )
        return FallbackDependencyParser()


def _to_tensor(value, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Convert an array, tensor or (possibly ragged along the first axis of its items) list to a tensor.

    Ragged lists of items of shape [n_i, ...] are zero-padded to the longest n_i.
    """
    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], (int, float)):
        items = [_to_tensor(item, name, dtype) for item in value]
        if len({item.shape for item in items}) > 1:
            if len({item.shape[1:] for item in items}) > 1 or any(item.dim() == 0 for item in items):
                shapes = [tuple(item.shape) for item in items]
                raise ValueError(f"`{name}` items must share their trailing dimensions, got {shapes}.")
            length = max(item.shape[0] for item in items)
            items = [torch.cat([item, item.new_zeros(length - item.shape[0], *item.shape[1:])]) for item in items]
        return torch.stack(items)
    try:
        return torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value).to(dtype)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{name}` must be an array, a tensor or a list of numbers: {error}") from None


def _pad_or_truncate(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """`tensor` `[B, k, ...]` cut or zero-padded to `[B, length, ...]` along the region axis."""
    padding = tensor.new_zeros(tensor.shape[0], max(length - tensor.shape[1], 0), *tensor.shape[2:])
    return torch.cat([tensor[:, :length], padding], dim=1)


def _lengths(value) -> list[int] | None:
    """Number of rows of each item of a ragged list input, or None for any other input."""
    if isinstance(value, (list, tuple)) and value and not isinstance(value[0], (int, float)):
        return [len(item) for item in value]
    return None


def normalize_boxes(boxes: torch.Tensor, image_sizes=None, real=None, check_values: bool = True) -> torch.Tensor:
    """
    The one rule for boxes, the processor's and the model's: (x1, y1, x2, y2) `[B, n, 4]`, in pixels of `image_sizes`
    `[B, 2]` (width, height) or already in [0, 1], checked on the real regions (`real` `[B, n]` bool, default all)
    and returned in [0, 1] (a rounding slack of 1e-4 is clamped), zero on padding. `check_values=False` (under
    tracing) only scales.
    """
    real = torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device) if real is None else real
    if check_values:
        real_boxes = boxes[real]
        if not torch.isfinite(real_boxes).all():
            raise ValueError("`boxes` contains NaN or Inf.")
        if (real_boxes[:, 2] < real_boxes[:, 0]).any() or (real_boxes[:, 3] < real_boxes[:, 1]).any():
            raise ValueError("`boxes` must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1.")
        if image_sizes is not None and (not torch.isfinite(image_sizes).all() or (image_sizes <= 0).any()):
            raise ValueError(f"`image_sizes` must be positive (width, height) pairs, got {image_sizes.tolist()}.")
    if image_sizes is not None:
        boxes = boxes / image_sizes.to(boxes).repeat(1, 2)[:, None, :]
    if check_values and ((boxes[real] < -1e-4) | (boxes[real] > 1 + 1e-4)).any():
        if image_sizes is None:
            raise ValueError("`boxes` must lie in [0, 1] when no `image_sizes` are given (pixel boxes need sizes).")
        raise ValueError("`boxes` must lie inside the image: 0 <= x <= width and 0 <= y <= height of `image_sizes`.")
    return torch.where(real[..., None], boxes.clamp(0.0, 1.0), 0.0)


class MPSMProcessor(ProcessorMixin):
    r"""
    Builds the inputs of `MPSMModel`: word ids and dependency graphs of captions, padded regions, normalised boxes.

    Args:
        tokenizer (`PreTrainedTokenizerFast`):
            Word-level tokenizer (see `modeling_mpsm.data.vocabulary.build_tokenizer`).
        num_regions (`int`, defaults to 36):
            Regions per image after padding or truncation.
        max_length (`int`, defaults to 64):
            Maximum caption length in tokens, `<start>` and `<end>` included.
        dependency_parser (`str`, defaults to `"spacy:en_core_web_sm"`):
            `"spacy:<pipeline>"` or `"fallback"`, see `get_dependency_parser`. Loaded on first use; assign a
            `DependencyParser` to `processor.parser` to plug in another one.
        region_feature_dim (`int`, *optional*):
            Expected width of region features; checked when set.
    """

    attributes = ["tokenizer"]
    tokenizer_class = "PreTrainedTokenizerFast"

    def __init__(
        self,
        tokenizer=None,
        num_regions: int = 36,
        max_length: int = 64,
        dependency_parser: str = "spacy:en_core_web_sm",
        region_feature_dim: int | None = None,
    ):
        if tokenizer is None:
            raise ValueError("`tokenizer` is required: build one with `modeling_mpsm.data.vocabulary.build_tokenizer`.")
        if num_regions < 1:
            raise ValueError(f"`num_regions` must be positive, got {num_regions}.")
        if max_length < 3:
            raise ValueError(f"`max_length` must leave room for <start>, a word and <end> (>= 3), got {max_length}.")
        super().__init__(tokenizer)
        self.num_regions = num_regions
        self.max_length = max_length
        self.dependency_parser = dependency_parser
        self.region_feature_dim = region_feature_dim
        self._parser = None

    @property
    def parser(self) -> DependencyParser:
        if self._parser is None:
            self._parser = get_dependency_parser(self.dependency_parser)
        return self._parser

    @parser.setter
    def parser(self, parser: DependencyParser):
        self._parser = parser

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{pretrained_model_name_or_path}: a processor file (tokenizer.json, tokenizer_config.json or "
                f"processor_config.json) is not valid JSON ({error}); save the processor again."
            ) from error

    def to_dict(self) -> dict:
        # Settings only: the parser is a runtime object, and the tokenizer saves itself.
        settings = ("num_regions", "max_length", "dependency_parser", "region_feature_dim")
        output = {name: getattr(self, name) for name in settings}
        if "auto_map" in self.__dict__:
            output["auto_map"] = self.auto_map
        output["processor_class"] = self.__class__.__name__
        return output

    def __call__(
        self,
        text: str | list[str] | None = None,
        region_features=None,
        boxes=None,
        image_sizes=None,
        region_mask=None,
        dependency_heads: list[list[int]] | None = None,
        return_tensors: str = "pt",
    ) -> BatchFeature:
        r"""
        Args:
            text (`str` or `list[str]`, *optional*): captions.
            region_features (`[B, n, f]` or `[n, f]`, *optional*): region features (array, tensor or list; a list of
                `[n_i, f]` items of different n_i is padded and masked).
            boxes (`[B, n, 4]` or `[n, 4]`, *optional*): (x1, y1, x2, y2) boxes, in pixels with `image_sizes`,
                otherwise already in [0, 1].
            image_sizes (`[B, 2]` or `[2]`, *optional*): (width, height) of each image.
            region_mask (`[B, n]` or `[n]`, *optional*): 1 for real regions, 0 for padding.
            dependency_heads (`list[list[int]]`, *optional*): precomputed head of each `tokenize_caption` word of each
                caption (root points to itself); skips parsing.
            return_tensors (`str`): only `"pt"` is supported.

        Returns:
            `BatchFeature` with, for text, `input_ids` `[B, L]` long, `attention_mask` `[B, L]` long and
            `dependency_adjacency` `[B, L, L]` float32 (L = longest caption, at most `max_length`); for images,
            `region_features` `[B, num_regions, f]` float32, `region_mask` `[B, num_regions]` long and, when boxes are
            given, `boxes` `[B, num_regions, 4]` float32 in [0, 1]. Padding positions are zero everywhere.
        """
        if text is None and region_features is None:
            raise ValueError("Provide `text`, `region_features` or both.")
        if return_tensors != "pt":
            raise ValueError(f"`return_tensors` must be 'pt', got {return_tensors!r}.")
        data = {}
        if text is not None:
            data.update(self._process_text(text, dependency_heads))
        elif dependency_heads is not None:
            raise ValueError("`dependency_heads` was given without `text`.")
        if region_features is not None:
            data.update(self._process_regions(region_features, boxes, image_sizes, region_mask))
        elif boxes is not None or image_sizes is not None or region_mask is not None:
            raise ValueError("`boxes`, `image_sizes` and `region_mask` need `region_features`.")
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _heads(self, captions: list[list[str]], dependency_heads) -> list[list[int]]:
        """Dependency heads of each caption: given, or parsed in one batch."""
        if dependency_heads is not None:
            if len(dependency_heads) != len(captions):
                raise ValueError(
                    f"`dependency_heads` has {len(dependency_heads)} entries for {len(captions)} captions."
                )
            for index, (heads, words) in enumerate(zip(dependency_heads, captions)):
                if len(heads) != len(words) or any(not 0 <= head < len(words) for head in heads):
                    raise ValueError(
                        f"`dependency_heads[{index}]` must hold one head index in [0, {len(words)}) per word of "
                        f"{words}, got {list(heads)}."
                    )
            return [list(heads) for heads in dependency_heads]
        distinct = list(dict.fromkeys(map(tuple, captions)))  # a caption repeated in the batch is parsed once
        parsed = dict(zip(distinct, self.parser.parse_batch([list(words) for words in distinct])))
        return [list(parsed[tuple(words)]) for words in captions]

    def _process_text(self, text, dependency_heads) -> dict[str, torch.Tensor]:
        texts = [text] if isinstance(text, str) else list(text)
        for index, caption in enumerate(texts):
            if not isinstance(caption, str):
                raise ValueError(f"`text[{index}]` must be a string (a caption), got {type(caption).__name__}: {caption!r}.")
        captions = [tokenize_caption(caption) for caption in texts]
        for index, words in enumerate(captions):
            if not words:
                raise ValueError(f"`text[{index}]` has no word tokens: {texts[index]!r}.")
        heads = self._heads(captions, dependency_heads)

        kept = [min(len(words), self.max_length - 2) for words in captions]
        length = max(kept) + 2
        input_ids = torch.zeros(len(captions), length, dtype=torch.long)
        attention_mask = torch.zeros(len(captions), length, dtype=torch.long)
        adjacency = torch.zeros(len(captions), length, length)
        for row, (words, word_heads, n) in enumerate(zip(captions, heads, kept)):
            # Token positions: <start> = 0, word i = i + 1, <end> = n + 1; truncation drops words, never <end>.
            tokens = [self.tokenizer.bos_token] + words[:n] + [self.tokenizer.eos_token]
            input_ids[row, : n + 2] = torch.tensor(self.tokenizer.convert_tokens_to_ids(tokens))
            attention_mask[row, : n + 2] = 1
            edges = [(i + 1, head + 1) for i, head in enumerate(word_heads[:n]) if head < n]
            edges += [(0, 1), (n + 1, n)]
            source, target = torch.tensor(edges).T
            adjacency[row, source, target] = 1.0
            adjacency[row, target, source] = 1.0
            adjacency[row, range(n + 2), range(n + 2)] = 1.0
        return {"input_ids": input_ids, "attention_mask": attention_mask, "dependency_adjacency": adjacency}

    def _process_regions(self, region_features, boxes, image_sizes, region_mask) -> dict[str, torch.Tensor]:
        features = _to_tensor(region_features, "region_features", torch.float32)
        single = features.dim() == 2
        if single:
            features = features[None]
        if features.dim() != 3:
            raise ValueError(
                "`region_features` must have shape [batch, regions, dim] or [regions, dim], "
                f"got {tuple(features.shape)}."
            )
        batch_size, num_input_regions, width = features.shape
        if num_input_regions == 0:
            raise ValueError("`region_features` has zero regions per image.")
        if self.region_feature_dim is not None and width != self.region_feature_dim:
            raise ValueError(
                f"`region_features` must have width region_feature_dim={self.region_feature_dim}, got {width}."
            )

        def batched(value, name, dtype, item_shape):
            """`value` as a tensor [B, *item_shape] matching `features`; string entries of `item_shape` are free."""
            tensor = _to_tensor(value, name, dtype)
            if single:
                tensor = tensor[None]
            shape = ", ".join(map(str, item_shape if single else ("batch", *item_shape)))
            if tensor.dim() != 1 + len(item_shape):
                raise ValueError(
                    f"`{name}` must have shape [{shape}] like `region_features`, got {tuple(tensor.shape)[single:]}."
                )
            if tensor.shape[0] != batch_size:
                raise ValueError(f"`{name}` has batch size {tensor.shape[0]}, `region_features` has {batch_size}.")
            if any(isinstance(size, int) and size != actual for size, actual in zip(item_shape, tensor.shape[1:])):
                raise ValueError(f"`{name}` must have shape [{shape}], got {tuple(tensor.shape)[single:]}.")
            return tensor

        if region_mask is not None:
            mask = _pad_or_truncate(batched(region_mask, "region_mask", torch.long, ("regions",)).ne(0).long(),
                                    num_input_regions)
        else:
            mask = torch.ones(batch_size, num_input_regions, dtype=torch.long)
        lengths = _lengths(region_features)
        if lengths is not None and not single:
            mask = mask * (torch.arange(num_input_regions) < torch.tensor(lengths)[:, None]).long()
        real = mask.bool()
        if not torch.isfinite(features[real]).all():
            raise ValueError("`region_features` contains NaN or Inf.")
        features = torch.where(real[..., None], features, 0.0)

        output = {}
        if boxes is not None:
            boxes = batched(boxes, "boxes", torch.float32, ("regions", 4))[:, :num_input_regions]
            if boxes.shape[1] != num_input_regions:
                raise ValueError(
                    f"`boxes` has {boxes.shape[1]} regions per image, `region_features` has {num_input_regions}."
                )
            sizes = batched(image_sizes, "image_sizes", torch.float32, (2,)) if image_sizes is not None else None
            output["boxes"] = normalize_boxes(boxes, sizes, real)
        elif image_sizes is not None:
            raise ValueError("`image_sizes` was given without `boxes`.")

        output.update(region_features=features, region_mask=mask)
        return {name: _pad_or_truncate(tensor, self.num_regions) for name, tensor in output.items()}


MPSMProcessor.register_for_auto_class()
