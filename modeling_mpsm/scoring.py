"""Exhaustive scoring of every image against every caption with MPSM.

The per-item part of the model (`encode_image`, `encode_text`) runs once per item and its outputs are cached
(`encode_images`, `encode_texts`). The per-pair part (`model.similarity`) then runs over blocks of images x captions:
captions are sorted by length so that each block holds captions of similar length (little padding), the block size
follows a memory bound in bytes, and the scores are scattered back to the original caption order. With an
`accelerate.Accelerator`, every process scores its own rows (images) and the matrix is gathered.

Caches are [`MPSMImageOutput`] / [`MPSMTextOutput`] (or, for [`MPSMEnsembleModel`], dicts of them keyed by member)
holding all items, padded to a common number of regions / words.
"""

import copy
import logging
import math
import time

import torch
import torch.nn.functional as F
from .common import progress_bar
from transformers.utils import ModelOutput

from .modeling_mpsm import MPSMImageOutput, MPSMTextOutput


def cache_members(cache):
    """A cache (or per-item output) by member: an ensemble's dict of outputs (`{"dis": ..., "dir": ...}`) as it is,
    one model's output as `{None: output}`. `_as_cache` is its inverse."""
    return {None: cache} if isinstance(cache, ModelOutput) else cache


def _as_cache(members):
    """The cache of a `cache_members` dict: the output itself for `{None: output}`, else the ensemble's dict."""
    return members[None] if None in members else members


def is_cache(value):
    """Whether `value` is already a cache (an output, or an ensemble's dict of outputs) rather than input batches."""
    return isinstance(value, dict) and all(
        isinstance(output, (MPSMImageOutput, MPSMTextOutput)) for output in cache_members(value).values()
    )


# Fields whose axis 1 runs over regions or words (padded when caches are concatenated).
PADDED_FIELDS = {"region_embeds", "region_mask", "word_embeds", "attention_mask", "word_weights"}
DEFAULT_MAX_BLOCK_BYTES = 64 * 2**20  # measured best of 4-256 MiB at paper size on a 2-core CPU (cache locality)
logger = logging.getLogger(__name__)
_DTYPE_PROBES = {}  # (device type, model class, config) -> (seconds per pair per dtype, one re-scoring call), measured
_DTYPE_CHOICES = {}  # the same key -> the dtype last chosen (logged when it changes)
PROBE_REFINE_K = 20  # candidates of the re-scoring call timed by the probe


def _map_outputs(function, cache):
    """Applies `function` to a cache, or to each member's cache of an ensemble (dict)."""
    return _as_cache({name: function(output) for name, output in cache_members(cache).items()})


def _first_member(cache):
    return next(iter(cache_members(cache).values()))


def concatenate_outputs(outputs):
    """
    Concatenates per-batch outputs along the item axis, zero-padding (False for masks) regions / words to the longest.

    Args:
        outputs: list of [`MPSMImageOutput`] or [`MPSMTextOutput`] (or of ensemble dicts of them).
    Returns:
        One output of the same kind holding every item.
    """
    by_member = [cache_members(output) for output in outputs]
    return _as_cache({name: _concatenate([members[name] for members in by_member]) for name in by_member[0]})


def _concatenate(outputs):
    """`concatenate_outputs` of one model's outputs."""
    fields = {}
    for name in outputs[0].keys():
        values = [output[name] for output in outputs]
        if name in PADDED_FIELDS:
            length = max(value.shape[1] for value in values)
            values = [F.pad(value, (0, 0) * (value.dim() - 2) + (0, length - value.shape[1])) for value in values]
        fields[name] = torch.cat(values)
    return type(outputs[0])(**fields)


def select_items(cache, index):
    """The items `index` (slice, or long tensor of positions) of a cache, as a cache of the same kind."""
    return _map_outputs(lambda output: type(output)(**{name: value[index] for name, value in output.items()}), cache)


def cut_words(cache, length):
    """A caption cache cut to its first `length` words (at least its longest caption's), as a cache of the same kind."""
    return _map_outputs(lambda output: type(output)(**{
        name: value[:, :length] if name in PADDED_FIELDS else value for name, value in output.items()
    }), cache)


def _item_mask(cache):
    """The mask of a cache's items, [items, regions or words] (of the first member for an ensemble)."""
    output = _first_member(cache)
    return output.region_mask if isinstance(output, MPSMImageOutput) else output.attention_mask


def num_items(cache):
    """Number of images or captions held by a cache."""
    return len(_item_mask(cache))


IMAGE_INPUTS = ("region_features", "boxes", "region_mask", "image_sizes")  # the arguments of `encode_image`
TEXT_INPUTS = ("input_ids", "attention_mask", "dependency_adjacency")  # the arguments of `encode_text`


@torch.no_grad()
def _encode(encode, batches, inputs, progress, description):
    outputs = [
        encode(**{name: batch[name] for name in inputs if name in batch})
        for batch in progress_bar(batches, desc=description, disable=not progress)
    ]
    if not outputs:
        raise ValueError("no batches to encode")
    return concatenate_outputs(outputs)


def encode_images(model, batches, progress=True):
    """
    Per-image part of the model over batches of image inputs (dicts with `region_features` [b, n, f] and optionally
    `boxes`, `region_mask`, `image_sizes`; other keys are ignored), concatenated into one cache [I, n, ...].
    """
    return _encode(model.encode_image, batches, IMAGE_INPUTS, progress, "encoding images")


def encode_texts(model, batches, progress=True):
    """
    Per-caption part of the model over batches of text inputs (dicts with `input_ids` [b, L] and optionally
    `attention_mask`, `dependency_adjacency`; other keys are ignored), concatenated into one cache [T, L, ...].
    """
    return _encode(model.encode_text, batches, TEXT_INPUTS, progress, "encoding captions")


def pair_bytes(model, num_regions, num_words):
    """
    Rough peak bytes of the per-pair part for one pair in fp32: the d-wide per-word tensors (attended regions, their
    distance/direction features), the attention maps (cosines, softmax, and the quadratic form of the attended norms)
    and the m-wide similarity nodes of SRGR.
    """
    config = max((member.config for member in model.members().values()), key=lambda c: c.embed_size)
    nodes = num_words + 1
    floats = 4 * num_words * config.embed_size + 8 * num_words * num_regions + 12 * nodes * config.sim_dim
    return 4 * floats


def block_shape(num_images, num_texts, pairs_per_block):
    """Images x captions of a block holding at most `pairs_per_block` pairs (at least one of each), as square as the
    matrix allows, favouring more captions per block (cheaper cross attention per image)."""
    block_images = max(1, min(num_images, math.isqrt(max(pairs_per_block, 1)) // 2))
    block_texts = max(1, min(num_texts, pairs_per_block // block_images))
    block_images = max(1, min(num_images, pairs_per_block // block_texts))
    return block_images, block_texts


def _copy_in_dtype(model, dtype):
    """A copy of `model` in `dtype`, but for the modules its classes keep in float32 (`_keep_in_fp32_modules_strict`:
    MPSM's score read-out, whose bf16 scores would tie near the top of a ranking)."""
    model = copy.deepcopy(model).to(dtype)
    for owner in model.modules():
        kept = getattr(owner, "_keep_in_fp32_modules_strict", None) or ()
        for name, module in owner.named_modules():
            if name.rsplit(".", 1)[-1] in kept:
                module.float()
    return model


def _cast_cache(cache, dtype):
    """The cache with its floating-point tensors in `dtype` (masks and ids unchanged)."""
    def cast(output):
        return type(output)(**{
            name: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
            for name, value in output.items()
        })
    return _map_outputs(cast, cache)


@torch.no_grad()
def score_rows(model, images, texts, *, max_block_bytes=DEFAULT_MAX_BLOCK_BYTES, max_pairs_per_block=None,
               dtype=None, compile=False, progress=True):
    """
    Scores every image of `images` against every caption of `texts` in one process; see `score_matrix`.

    Returns:
        `torch.FloatTensor` [I, T] (float32, on the device of the caches).
    """
    if dtype is not None and dtype != torch.float32:
        # A copy of the model and the caches in `dtype`: half the memory traffic of the element-wise passes, which
        # dominate; measured 1.6x the pairs/s of autocast in bf16 on CPU, scores within ~4e-3 of fp32.
        model = _copy_in_dtype(model, dtype)
        images, texts = _cast_cache(images, dtype), _cast_cache(texts, dtype)
    bytes_per_float = torch.finfo(dtype or torch.float32).bits // 8
    text_output = _first_member(texts)
    num_regions = _first_member(images).region_mask.shape[1]
    lengths = text_output.attention_mask.sum(1)
    order = lengths.argsort(descending=True, stable=True)
    sorted_lengths = lengths[order].tolist()
    num_images, num_texts = num_items(images), len(order)
    device = text_output.attention_mask.device
    scores = torch.empty(num_images, num_texts, dtype=torch.float32, device=device)
    similarity = torch.compile(model.similarity, dynamic=True) if compile else model.similarity
    bar = progress_bar(total=num_images * num_texts, desc="scoring", unit="pair", unit_scale=True, disable=not progress)
    start = 0
    with bar:
        while start < num_texts:  # caption groups, longest first; a group's block size follows its longest caption
            block_bytes = pair_bytes(model, num_regions, sorted_lengths[start]) * bytes_per_float // 4
            pairs = max_pairs_per_block or max(1, max_block_bytes // block_bytes)
            block_images, block_texts = block_shape(num_images, num_texts - start, pairs)
            columns = order[start : start + block_texts]
            # cut to the group's longest caption: compiled, `similarity` runs its captions as one uncut block
            text_block = cut_words(select_items(texts, columns), sorted_lengths[start])
            for image_start in range(0, num_images, block_images):
                rows = slice(image_start, image_start + block_images)
                scores[rows, columns] = similarity(select_items(images, rows), text_block).float()
                bar.update(len(scores[rows]) * len(columns))
            start += block_texts
    return scores


@torch.no_grad()
def choose_scoring_dtype(model, images, texts, refine_k=0, num_processes=1, probe_images=16, probe_texts=256,
                         repeats=3):
    """
    The faster of float32 and bfloat16 for scoring these caches on this machine. Whether bf16 pays depends on the
    CPU (seen: 0.6x on one, 5x on another), so it is measured, once per process (and per device type and model
    configuration): a block of up to `probe_images` x `probe_texts` pairs in each dtype, `repeats` times interleaved
    (a drift of the machine's speed hits both alike), the best of each; and one float32 re-scoring call of a query's
    `PROBE_REFINE_K` candidates. The choice compares the projected totals for this gallery: float32 scores every
    pair; bfloat16 scores every pair, then re-scores the top `refine_k` of every image and caption in float32
    (`refine_top_k`), so small galleries stay in float32 even where bf16 pairs are faster. With `num_processes`
    (`score_matrix`'s sharding), each process scores its share of the pairs but re-scores every query. The choice is
    logged.

    Returns:
        `torch.float32` or `torch.bfloat16`.
    """
    config = model.config.to_json_string(use_diff=False)
    key = (_first_member(texts).attention_mask.device.type, type(model).__name__, config)
    if key not in _DTYPE_PROBES:
        _DTYPE_PROBES[key] = _probe_scoring_speed(model, images, texts, probe_images, probe_texts, repeats)
    per_pair, refine_call = _DTYPE_PROBES[key]
    num_images, num_texts = num_items(images), num_items(texts)
    projected = {dtype: num_images * num_texts * seconds / num_processes for dtype, seconds in per_pair.items()}
    if refine_k:
        projected[torch.bfloat16] += (num_images + num_texts) * refine_call * refine_k / PROBE_REFINE_K
    choice = min(projected, key=projected.get)
    if _DTYPE_CHOICES.get(key) != choice:
        _DTYPE_CHOICES[key] = choice
        logger.warning(
            "scoring dtype auto: float32 %.2f us, bfloat16 %.2f us per pair (+%.1f ms per query re-scored in float32) "
            "-> %s for %d x %d pairs", 1e6 * per_pair[torch.float32], 1e6 * per_pair[torch.bfloat16],
            1e3 * refine_call * (refine_k or PROBE_REFINE_K) / PROBE_REFINE_K, str(choice).replace("torch.", ""),
            num_images, num_texts,
        )
    return choice


def _probe_scoring_speed(model, images, texts, probe_images, probe_texts, repeats):
    """Seconds per pair of each dtype on a probe block, and of one float32 re-scoring call (see
    `choose_scoring_dtype`)."""
    block_images = select_items(images, slice(0, min(probe_images, num_items(images))))
    block_texts = select_items(texts, slice(0, min(probe_texts, num_items(texts))))
    scorers = {torch.float32: (model, block_images, block_texts)}
    bf16_model = _copy_in_dtype(model, torch.bfloat16)
    scorers[torch.bfloat16] = (bf16_model, _cast_cache(block_images, torch.bfloat16),
                               _cast_cache(block_texts, torch.bfloat16))
    query = select_items(images, slice(0, 1))
    candidates = select_items(texts, slice(0, min(PROBE_REFINE_K, num_items(texts))))
    timings = {dtype: [] for dtype in scorers} | {"refine": []}
    for _ in range(repeats + 1):  # the first round is untimed: allocations, kernels
        for dtype, (scorer, image_block, text_block) in scorers.items():
            started = time.perf_counter()
            scorer.similarity(image_block, text_block)
            timings[dtype].append(time.perf_counter() - started)
        started = time.perf_counter()
        model.similarity(query, candidates)
        timings["refine"].append(time.perf_counter() - started)
    pairs = num_items(block_images) * num_items(block_texts)
    per_pair = {dtype: min(timings[dtype][1:]) / pairs for dtype in scorers}
    return per_pair, min(timings["refine"][1:])


def refine_top_k(model, images, texts, scores, k, progress=True):
    """
    Re-scores with `model` (float32) the `k` best captions of every image, then the `k` best images of every caption,
    of a score matrix computed in reduced precision; `scores` [I, T] is updated in place and returned.

    One model call per query, batched over its k candidates: (I + T) * k pairs. Rankings within the first K <= k then
    follow the float32 scores, unless a float32 top-K item ranked below k in reduced precision.
    """
    num_images, num_texts = scores.shape
    k_texts, k_images = min(k, num_texts), min(k, num_images)
    bar = progress_bar(total=num_images + num_texts, desc="refining top k", disable=not progress)
    with bar:
        for image, candidates in enumerate(scores.topk(k_texts, dim=1).indices):  # image-to-text
            scores[image, candidates] = model.similarity(
                select_items(images, slice(image, image + 1)), select_items(texts, candidates.to(_item_mask(texts).device))
            )[0].float().to(scores.device)
            bar.update()
        for text, candidates in enumerate(scores.topk(k_images, dim=0).indices.T):  # text-to-image
            scores[candidates, text] = model.similarity(
                select_items(images, candidates.to(_item_mask(images).device)), select_items(texts, slice(text, text + 1))
            )[:, 0].float().to(scores.device)
            bar.update()
    return scores


def score_matrix(model, images, texts, *, max_block_bytes=DEFAULT_MAX_BLOCK_BYTES, max_pairs_per_block=None,
                 dtype=None, refine_k=20, compile=False, progress=True, accelerator=None):
    """
    Matching scores of every image against every caption, [N_img, N_txt], float32.

    Args:
        model ([`MPSMModel`] or [`MPSMEnsembleModel`]): put in eval mode for the duration of the call.
        images: a cache from `encode_images` ([`MPSMImageOutput`], or a dict of them for an ensemble), or an iterable
            of image input batches, encoded here.
        texts: a cache from `encode_texts`, or an iterable of text input batches, encoded here.
        max_block_bytes (`int`): memory bound of one block of pairs; sets the block size, so that peak memory beyond
            the cached per-item tensors does not grow with the gallery. The scores do not depend on it.
        max_pairs_per_block (`int`, *optional*): explicit block size, overriding `max_block_bytes`.
        dtype (`torch.dtype` or `"auto"`, *optional*): `torch.bfloat16` (or `float16`) runs the per-pair part in that
            dtype, on a copy of the model and of the caches (faster than autocast: the element-wise passes dominate);
            `"auto"` takes the faster of float32 and bfloat16 measured here (`choose_scoring_dtype`); None: float32.
        refine_k (`int`): with a reduced `dtype`, the `refine_k` best captions of every image and best images of every
            caption are then re-scored in float32 (`refine_top_k`), so that R@K for K <= refine_k matches float32
            scoring (0: no refinement). Costs (N_img + N_txt) * refine_k pairs.
        compile (`bool`): runs the per-pair part through `torch.compile` (fused elementwise kernels; the first blocks
            pay the compilation, seconds to a minute, so it pays off on large matrices). Compiled, a block's captions
            (of similar length: they are sorted) run as one block cut to the longest, not in sub-blocks.
        progress (`bool`): tqdm progress bars, on the main process only.
        accelerator (`accelerate.Accelerator`, *optional*): shards the rows (images) over its processes and gathers
            the matrix; every process returns the full matrix. Destroy the process group when done
            (`torch.distributed.destroy_process_group()`): gloo may abort at interpreter exit otherwise.
    """
    if isinstance(refine_k, bool) or not isinstance(refine_k, int) or refine_k < 0:
        raise ValueError(f"`refine_k` must be an int >= 0 (0: no refinement), got {refine_k!r}")
    is_main = accelerator is None or accelerator.is_main_process
    was_training = model.training
    model.eval()
    try:
        if not is_cache(images):
            images = encode_images(model, images, progress=progress and is_main)
        if not is_cache(texts):
            texts = encode_texts(model, texts, progress=progress and is_main)
        if isinstance(dtype, str):
            if dtype != "auto":
                raise ValueError(f"`dtype` must be a torch dtype, None or 'auto', got {dtype!r}")
            dtype = choose_scoring_dtype(model, images, texts, refine_k,
                                         accelerator.num_processes if accelerator is not None else 1)
        options = dict(max_block_bytes=max_block_bytes, max_pairs_per_block=max_pairs_per_block, dtype=dtype,
                       compile=compile, progress=progress and is_main)
        if accelerator is None or accelerator.num_processes == 1:
            scores = score_rows(model, images, texts, **options)
        else:
            num_images = num_items(images)
            shard = math.ceil(num_images / accelerator.num_processes)
            start = min(accelerator.process_index * shard, num_images)
            rows = score_rows(model, select_items(images, slice(start, start + shard)), texts, **options)
            rows = F.pad(rows, (0, 0, 0, shard - len(rows)))  # equal shapes for the gather (uneven splits)
            scores = accelerator.gather(rows)[:num_images]
        if dtype is not None and dtype != torch.float32 and refine_k > 0:
            # every process refines the whole gathered matrix: the same pairs, hence the same result everywhere
            scores = refine_top_k(model, images, texts, scores, refine_k, progress=progress and is_main)
        return scores
    finally:
        model.train(was_training)
