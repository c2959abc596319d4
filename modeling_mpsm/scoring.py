"""Exhaustive scoring of every image against every caption with MPSM.

The per-item part of the model (`encode_image`, `encode_text`) runs once per item and its outputs are cached
(`encode_images`, `encode_texts`). The per-pair part (`model.similarity`) then runs over the calls of images x
captions that the model file cuts (`pair_calls`, the rule at `modeling_mpsm.CAPTION_BLOCKS`), the scores scattered
back to the original caption order. With an `accelerate.Accelerator`, every process scores its own rows (images) and
the matrix is gathered.

Caches are [`MPSMImageOutput`] / [`MPSMTextOutput`] (or, for [`MPSMEnsembleModel`], an [`MPSMEnsembleItemOutput`] of
them by member) holding all items, padded to a common number of regions / words; their operations (`select`,
`concatenate`, `to`, `cut`, `num_items`, `members`, `scores_against`) are their own.
"""

import copy
import logging
import math
import time

import torch
import torch.nn.functional as F

from .common import progress_bar
from .modeling_mpsm import DEFAULT_MAX_BLOCK_BYTES, MPSMEnsembleItemOutput, MPSMItemOutput, pair_calls


PROBE_REFINE_K = 20  # candidates of the re-scoring call timed by the speed probe
IMAGE_INPUTS = ("region_features", "boxes", "region_mask", "image_sizes")  # the arguments of `encode_image`
TEXT_INPUTS = ("input_ids", "attention_mask", "dependency_adjacency")  # the arguments of `encode_text`
logger = logging.getLogger(__name__)


@torch.no_grad()
def _encode(encode, batches, inputs, progress, description):
    outputs = [
        encode(**{name: batch[name] for name in inputs if name in batch})
        for batch in progress_bar(batches, desc=description, disable=not progress)
    ]
    if not outputs:
        raise ValueError("no batches to encode")
    return type(outputs[0]).concatenate(outputs)


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


def in_dtype(model, dtype):
    """
    The one precision switch of the per-pair part: a copy of `model` in `dtype` (half the memory traffic of the
    element-wise passes, which dominate, where autocast would cast at every operation), but for the modules its
    classes keep in float32 (`_keep_in_fp32_modules_strict`: MPSM's score read-out, whose bf16 scores would tie near
    the top of a ranking). The caches go with it as `cache.to(dtype=dtype)`.
    """
    model = copy.deepcopy(model).to(dtype)
    for owner in model.modules():
        kept = getattr(owner, "_keep_in_fp32_modules_strict", None) or ()
        for name, module in owner.named_modules():
            if name.rsplit(".", 1)[-1] in kept:
                module.float()
    return model


@torch.no_grad()
def score_rows(model, images, texts, *, max_block_bytes=DEFAULT_MAX_BLOCK_BYTES, max_pairs_per_block=None,
               dtype=None, compile=False, progress=True):
    """
    Scores every image of `images` against every caption of `texts` in one process; see `score_matrix`.

    Returns:
        `torch.FloatTensor` [I, T] (float32, on the device of the caches).
    """
    if dtype is not None and dtype != torch.float32:
        model, images, texts = in_dtype(model, dtype), images.to(dtype=dtype), texts.to(dtype=dtype)
    scores = torch.empty(images.num_items, texts.num_items, dtype=torch.float32, device=texts.device)
    similarity = torch.compile(model.similarity, dynamic=True) if compile else model.similarity
    with progress_bar(total=scores.numel(), desc="scoring", unit="pair", unit_scale=True, disable=not progress) as bar:
        for rows, columns, image, text in pair_calls(model, images, texts, max_block_bytes, max_pairs_per_block):
            scores[rows, columns] = similarity(image, text).float()
            bar.update(image.num_items * len(columns))
    return scores


@torch.no_grad()
def choose_scoring_dtype(model, images, texts, refine_k=0, num_processes=1, probe_images=16, probe_texts=256,
                         repeats=3):
    """
    The faster of float32 and bfloat16 for scoring these caches on this machine. Whether bf16 pays depends on the
    CPU, so it is measured, once per model and device type (kept on the model, `model.scoring_speed`): a block of up
    to `probe_images` x `probe_texts` pairs in each dtype, `repeats` times interleaved (a drift of the machine's speed
    hits both alike), the best of each; and one float32 re-scoring call of a query's `PROBE_REFINE_K` candidates. The
    choice compares the projected totals for this gallery: float32 scores every pair; bfloat16 scores every pair,
    then re-scores the top `refine_k` of every image and caption in float32 (`refine_top_k`), so small galleries stay
    in float32 even where bf16 pairs are faster. With `num_processes` (`score_matrix`'s sharding), each process
    scores its share of the pairs but re-scores every query. The choice is logged.

    Returns:
        `torch.float32` or `torch.bfloat16`.
    """
    device_type = texts.device.type
    if not hasattr(model, "scoring_speed"):
        model.scoring_speed = {}  # device type -> the probe's timings (`_probe_scoring_speed`)
    if device_type not in model.scoring_speed:
        model.scoring_speed[device_type] = _probe_scoring_speed(model, images, texts, probe_images, probe_texts, repeats)
    per_pair, refine_call = model.scoring_speed[device_type]
    num_images, num_texts = images.num_items, texts.num_items
    projected = {dtype: num_images * num_texts * seconds / num_processes for dtype, seconds in per_pair.items()}
    if refine_k:
        projected[torch.bfloat16] += (num_images + num_texts) * refine_call * refine_k / PROBE_REFINE_K
    choice = min(projected, key=projected.get)
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
    image_block = images.select(slice(0, probe_images))
    text_block = texts.select(slice(0, probe_texts))
    scorers = {torch.float32: (model, image_block, text_block),
               torch.bfloat16: (in_dtype(model, torch.bfloat16), image_block.to(dtype=torch.bfloat16),
                                text_block.to(dtype=torch.bfloat16))}
    query, candidates = images.select(slice(0, 1)), texts.select(slice(0, PROBE_REFINE_K))
    timings = {dtype: [] for dtype in scorers} | {"refine": []}
    for _ in range(repeats + 1):  # the first round is untimed: allocations, kernels
        for dtype, (scorer, image_inputs, text_inputs) in scorers.items():
            started = time.perf_counter()
            scorer.similarity(image_inputs, text_inputs)
            timings[dtype].append(time.perf_counter() - started)
        started = time.perf_counter()
        model.similarity(query, candidates)
        timings["refine"].append(time.perf_counter() - started)
    pairs = image_block.num_items * text_block.num_items
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
    with progress_bar(total=num_images + num_texts, desc="refining top k", disable=not progress) as bar:
        for image, candidates in enumerate(scores.topk(min(k, num_texts), dim=1).indices):  # image-to-text
            query = images.select(slice(image, image + 1))
            scores[image, candidates] = query.scores_against(texts.select(candidates.to(texts.device)), model).to(
                scores.device)
            bar.update()
        for text, candidates in enumerate(scores.topk(min(k, num_images), dim=0).indices.T):  # text-to-image
            query = texts.select(slice(text, text + 1))
            scores[candidates, text] = query.scores_against(images.select(candidates.to(images.device)), model).to(
                scores.device)
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
            dtype (`in_dtype`: a copy of the model, and of the caches); `"auto"` takes the faster of float32 and
            bfloat16 measured here (`choose_scoring_dtype`); None: float32.
        refine_k (`int`): with a reduced `dtype`, the `refine_k` best captions of every image and best images of every
            caption are then re-scored in float32 (`refine_top_k`), so that R@K for K <= refine_k matches float32
            scoring (0: no refinement). Costs (N_img + N_txt) * refine_k pairs.
        compile (`bool`): runs the per-pair part through `torch.compile` (fused elementwise kernels; the first blocks
            pay the compilation, seconds to a minute, so it pays off on large matrices). Compiled, a call's captions
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
        if not isinstance(images, (MPSMItemOutput, MPSMEnsembleItemOutput)):  # input batches, not a cache
            images = encode_images(model, images, progress=progress and is_main)
        if not isinstance(texts, (MPSMItemOutput, MPSMEnsembleItemOutput)):
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
            num_images = images.num_items
            shard = math.ceil(num_images / accelerator.num_processes)
            start = min(accelerator.process_index * shard, num_images)
            rows = score_rows(model, images.select(slice(start, start + shard)), texts, **options)
            rows = F.pad(rows, (0, 0, 0, shard - len(rows)))  # equal shapes for the gather (uneven splits)
            scores = accelerator.gather(rows)[:num_images]
        if dtype is not None and dtype != torch.float32 and refine_k > 0:
            # every process refines the whole gathered matrix: the same pairs, hence the same result everywhere
            scores = refine_top_k(model, images, texts, scores, refine_k, progress=progress and is_main)
        return scores
    finally:
        model.train(was_training)
