"""MPSM: fine-grained matching with Multi-Perspective Similarity Modeling (Li et al., UAI 2022).

The file follows the paper (§3): encoders, semantic knowledge graphs (eq 1-4), KGID (eq 5-9), global
self-attention, text-guided region attention, distance/direction similarity representations (eq 10-15),
SRGR (eq 16-20) and the bidirectional triplet loss (eq 21); then the dis+dir ensemble (MPSM*).

Per-item work (`encode_image`, `encode_text`) is done once per image and once per caption; only the per-pair
part (`similarity`) sees pairs, and it does so as batched tensor operations over blocks of images x captions.
Shapes: I images, T captions, n regions, L words, d = embed_size, m = sim_dim, P = I * T pairs.
"""

import math
import os
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.dynamic_module_utils import custom_object_save
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_mpsm import PERSPECTIVES, MPSMConfig, MPSMEnsembleConfig
from .processing_mpsm import normalize_boxes


# How the per-pair part is cut, in one place for every caller (training, scoring, retrieval, the pipeline), captions
# always in ascending length: a gallery of pairs into calls of `similarity` (`pair_calls`: whole images x captions,
# as many pairs as `pair_bytes` fits in DEFAULT_MAX_BLOCK_BYTES, so that peak memory does not grow with the gallery),
# and the captions of one call into blocks (`pair_logits`: CAPTION_BLOCKS of them for less padding, each cut to its
# longest caption, or more so that a block's [I, T_b, L_b, d] tensors hold at most BLOCK_FLOATS floats: cache
# locality, and every allocation of a large tensor page-faults on CPU); under tracing, one uncut block.
CAPTION_BLOCKS = 8
BLOCK_FLOATS = 2**22
DEFAULT_MAX_BLOCK_BYTES = 64 * 2**20  # a call's tensors stay in cache (the bound chosen: docs/benchmarks.md)


# Outputs ------------------------------------------------------------------------------------------------------------


class MPSMItemOutput(ModelOutput):
    """
    The operations that the users of per-item outputs (scoring, retrieval, the pipeline) need, shared by
    [`MPSMImageOutput`] and [`MPSMTextOutput`]: axis 0 of every tensor runs over the items, axis 1 of `padded_fields`
    and of each hidden state over regions or words.
    """

    padded_fields = ()

    def members(self):
        """This output by member, as `MPSMModel.members()` names the model: {"model": self}."""
        return {"model": self}

    @property
    def num_items(self):
        """The number of images or captions held."""
        return len(next(iter(self.values())))

    @property
    def device(self):
        return next(iter(self.values())).device

    def _map(self, function):
        """This output with `function` applied to each tensor (each state of `hidden_states`)."""
        return type(self)(**{name: tuple(map(function, value)) if isinstance(value, tuple) else function(value)
                             for name, value in self.items()})

    def select(self, index):
        """The items `index` (a slice, or positions [k]), as an output of the same kind."""
        return self._map(lambda value: value[index])

    def to(self, device=None, dtype=None):
        """The tensors on `device`, the floating-point ones in `dtype` (masks keep theirs)."""
        return self._map(lambda value: value.to(device, dtype if value.is_floating_point() else None))

    def cut(self, length):
        """The regions / words beyond `length` dropped (padding only, when at least the longest item's)."""
        return type(self)(**{name: value[:, :length] if name in self.padded_fields else value
                             for name, value in self.items()})

    def scores_against(self, items, model, **bounds):
        """The scores [N] of this one item against N `items` of the other modality (`query_scores`)."""
        return query_scores(model, self, items, **bounds)

    @classmethod
    def concatenate(cls, outputs):
        """The outputs of consecutive batches as one, zero-padded (False for masks) to the most regions / words."""
        def cat(values, padded):
            if padded:
                length = max(value.shape[1] for value in values)
                values = [F.pad(value, (0, 0) * (value.dim() - 2) + (0, length - value.shape[1])) for value in values]
            return torch.cat(values)

        return cls(**{
            name: tuple(cat(states, True) for states in zip(*[output[name] for output in outputs]))
            if isinstance(value, tuple) else cat([output[name] for output in outputs], name in cls.padded_fields)
            for name, value in outputs[0].items()
        })


@dataclass
class MPSMImageOutput(MPSMItemOutput):
    """
    Per-image part of MPSM, computed once per image.

    Args:
        region_embeds (`torch.FloatTensor` [I, n, d]): ṽ, the L2-normalised regions after visual KGID (zeros on padding).
        region_mask (`torch.BoolTensor` [I, n]): which regions are real.
        image_embeds (`torch.FloatTensor` [I, d]): v̄, the global image feature.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states=True`, the region node
            states [I, n, d]: the encoder's V, then the output of each visual KGID layer (before the final l2norm).
    """

    region_embeds: torch.FloatTensor = None
    region_mask: torch.BoolTensor = None
    image_embeds: torch.FloatTensor = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None

    padded_fields = ("region_embeds", "region_mask")


@dataclass
class MPSMTextOutput(MPSMItemOutput):
    """
    Per-caption part of MPSM, computed once per caption.

    Args:
        word_embeds (`torch.FloatTensor` [T, L, d]): t̃, the L2-normalised words after textual KGID (zeros on padding).
        attention_mask (`torch.BoolTensor` [T, L]): which words are real.
        text_embeds (`torch.FloatTensor` [T, d]): t̄, the global caption feature.
        word_weights (`torch.FloatTensor` [T, L]): importance of each word (the word self-attention option), or
            ones when that option is off.
        guidance (`torch.FloatTensor` [T, d]): channel gate the caption applies to region features (the
            text-guided region features option), or None when that option is off.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states=True`, the word node
            states [T, L, d]: the encoder's T (after word self-attention), then the output of each textual KGID layer
            (before the final l2norm).
    """

    word_embeds: torch.FloatTensor = None
    attention_mask: torch.BoolTensor = None
    text_embeds: torch.FloatTensor = None
    word_weights: torch.FloatTensor = None
    guidance: torch.FloatTensor = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None

    padded_fields = ("word_embeds", "attention_mask", "word_weights")


class MPSMEnsembleItemOutput(dict):
    """
    The per-item outputs of an ensemble's members by short name, as `MPSMEnsembleModel.members()` names them
    (`{"dis": MPSMImageOutput, "dir": MPSMImageOutput}`), with the operations of [`MPSMItemOutput`] member by member.
    """

    def members(self):
        return dict(self)

    @property
    def num_items(self):
        return next(iter(self.values())).num_items

    @property
    def device(self):
        return next(iter(self.values())).device

    def select(self, index):
        return type(self)({name: output.select(index) for name, output in self.items()})

    def to(self, device=None, dtype=None):
        return type(self)({name: output.to(device, dtype) for name, output in self.items()})

    def cut(self, length):
        return type(self)({name: output.cut(length) for name, output in self.items()})

    scores_against = MPSMItemOutput.scores_against

    @classmethod
    def concatenate(cls, outputs):
        return cls({name: type(output).concatenate([members[name] for members in outputs])
                    for name, output in outputs[0].items()})


@dataclass
class MPSMOutput(ModelOutput):
    """
    Output of [`MPSMModel`] and [`MPSMEnsembleModel`], in the CLIP convention.

    Args:
        loss (`torch.FloatTensor` [], *optional*): the training loss (eq 21, plus enabled auxiliary losses).
        logits_per_image (`torch.FloatTensor` [I, T]): matching scores in (0, 1), image i against caption j.
        logits_per_text (`torch.FloatTensor` [T, I]): the transpose.
        image_embeds (`torch.FloatTensor` [I, d]): v̄.
        text_embeds (`torch.FloatTensor` [T, d]): t̄.
        image_hidden_states, text_hidden_states (`tuple(torch.FloatTensor)`, *optional*): with
            `output_hidden_states=True`, the `hidden_states` of `encode_image` and `encode_text`.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor = None
    logits_per_text: torch.FloatTensor = None
    image_embeds: torch.FloatTensor = None
    text_embeds: torch.FloatTensor = None
    image_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None


# Small helpers ------------------------------------------------------------------------------------------------------


def is_tracing():
    """Whether torch.compile or torch.export is tracing: then nothing may read the values of a tensor (the input checks
    that do are skipped, and shapes do not follow the data)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def l2norm(x, dim=-1, eps=1e-8):
    """Divides `x` by its L2 norm along `dim`; zero vectors stay zero. A float16 `x` is normalised in float32: its
    squares underflow below 6e-8, and `eps` (and `eps`²) round to 0 in float16, which made padding 0 / 0."""
    if x.dtype == torch.float16:
        return l2norm(x.float(), dim, eps).to(x.dtype)
    if dim in (-1, x.dim() - 1):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    # on CPU, `norm` over an inner axis is much slower than a sum of squares (docs/benchmarks.md)
    return x * x.square().sum(dim, keepdim=True).clamp_min(eps**2).rsqrt()


def add_linear(target, inputs, weight):
    """
    target + inputs Wᵀ: [..., m] + [..., c] x [m, c]ᵀ. Without autograd (and outside autocast, with one dtype) the matmul
    accumulates into `target` in place (no extra pass over it, no new tensor), so `target` must not be needed afterwards.
    """
    tracked = torch.is_grad_enabled() and (target.requires_grad or inputs.requires_grad or weight.requires_grad)
    if tracked or torch.is_autocast_enabled(inputs.device.type) or weight.dtype != inputs.dtype:
        return target + F.linear(inputs, weight)  # autograd needs `target`; autocast casts the matmul's operands
    target.view(-1, target.shape[-1]).addmm_(inputs.reshape(-1, inputs.shape[-1]), weight.t())
    return target


class ZeroInitLinear(nn.Linear):
    """A linear layer whose weight and bias start at zero: a residual branch that begins as the identity."""


def masked_softmax(scores, mask, dim=-1):
    """Softmax of `scores` along `dim` over the entries where `mask` (broadcastable) is True; masked entries get 0."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=dim) * mask


def real_node_index(mask):
    """The flat indices of the real nodes of `mask` [B, k] in [B * k], or None when every node is real (or under
    tracing, where the number of real nodes would be a shape read from the data; padding is masked anyway)."""
    if is_tracing() or bool(mask.all()):
        return None
    return mask.flatten().nonzero().squeeze(1)


def linear_on_real_nodes(layer, nodes, real):
    """
    `layer(nodes)` on the real nodes only, zero on padding: nodes [B, k, c], real from `real_node_index` -> [B, k, c'].
    Padded captions are about half padding (Flickr30K: 12 words on average, 30+ for the longest of a batch), so the
    per-node maps of the textual side would otherwise spend about half their matmuls on padding.
    """
    if real is None:
        return layer(nodes)
    flat = nodes.reshape(-1, nodes.shape[-1])
    values = layer(flat.index_select(0, real))
    return values.new_zeros(len(flat), values.shape[-1]).index_copy(0, real, values).view(*nodes.shape[:-1], -1)


def masked_mean(x, mask):
    """Mean of `x` [B, k, c] over the rows where `mask` [B, k] is True -> [B, c]."""
    mask = mask.to(x.dtype).unsqueeze(-1)
    return (x * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _as_bool_mask(mask, name, shape):
    if mask.shape != shape:
        raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask.bool()


def check_image_inputs(region_features, boxes, region_mask, image_sizes, img_dim, dtype):
    """
    The model's contract on images, checked once per call of `encode_image` (an ensemble checks once for all its
    members): returns (region_features in `dtype` [I, n, img_dim], boxes in [0, 1] [I, n, 4] or None, region_mask as
    bool [I, n]). Floating features are cast to `dtype` first (float64 numpy features are accepted). Under tracing
    (`is_tracing`) only the types and shapes are checked: the checks of the values are skipped.
    """
    check_values = not is_tracing()
    if not isinstance(region_features, torch.Tensor) or region_features.dim() != 3:
        shape = tuple(region_features.shape) if isinstance(region_features, torch.Tensor) else type(region_features)
        raise ValueError(f"`region_features` must be a tensor of shape [batch, regions, {img_dim}], got {shape}")
    if not region_features.is_floating_point():
        raise ValueError(f"`region_features` must be a floating-point tensor, got {region_features.dtype}")
    region_features = region_features.to(dtype)
    batch, num_regions, width = region_features.shape
    if width != img_dim:
        raise ValueError(f"`region_features` must have {img_dim} features per region (config.img_dim), got {width}")
    if batch == 0 or num_regions == 0:
        raise ValueError(f"`region_features` must hold at least one image with one region, got {tuple(region_features.shape)}")
    if check_values and not torch.isfinite(region_features).all():
        raise ValueError("`region_features` contains NaN or Inf values; expected finite features")
    if region_mask is None:
        region_mask = torch.ones(batch, num_regions, dtype=torch.bool, device=region_features.device)
    region_mask = _as_bool_mask(region_mask, "region_mask", (batch, num_regions))
    if check_values:
        empty = (~region_mask.any(1)).nonzero().flatten()
        if len(empty):
            raise ValueError(f"`region_mask` marks every region as padding for image(s) {empty.tolist()}; "
                             "expected >= 1 region")
    if boxes is None:
        return region_features, None, region_mask
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"`boxes` must have shape [batch, regions, 4] as (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if boxes.shape[:2] != (batch, num_regions):
        raise ValueError(
            f"`boxes` must match `region_features` in batch and regions: expected [{batch}, {num_regions}, 4], "
            f"got {tuple(boxes.shape)}"
        )
    if image_sizes is not None and image_sizes.shape != (batch, 2):
        raise ValueError(f"`image_sizes` must have shape [{batch}, 2] as (width, height), got {tuple(image_sizes.shape)}")
    boxes = normalize_boxes(boxes.float(), image_sizes, region_mask, check_values)
    return region_features, boxes.to(dtype), region_mask


def check_text_inputs(input_ids, attention_mask, dependency_adjacency, vocab_size):
    """
    The model's contract on captions, checked once per call of `encode_text` (an ensemble checks once for all its
    members): returns (input_ids [T, L], attention_mask as bool [T, L], dependency_adjacency [T, L, L] or None). Under
    tracing (`is_tracing`) only the types and shapes are checked: the checks of the values are skipped.
    """
    check_values = not is_tracing()
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"`input_ids` must be a tensor of shape [batch, words], got {shape}")
    if input_ids.dtype.is_floating_point:
        raise ValueError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"`input_ids` must hold at least one caption with one word, got {tuple(input_ids.shape)}")
    attention_mask = _as_bool_mask(input_ids != 0 if attention_mask is None else attention_mask, "attention_mask",
                                   (batch, length))
    if check_values:
        empty = (~attention_mask.any(1)).nonzero().flatten()
        if len(empty):
            raise ValueError(f"`attention_mask` marks caption(s) {empty.tolist()} as empty; expected >= 1 word each")
        positions = torch.arange(length, device=input_ids.device)
        if (attention_mask != (positions < attention_mask.sum(1, keepdim=True))).any():
            raise ValueError("`attention_mask` must be right-padded: ones for the words first, then zeros")
        real_ids = input_ids[attention_mask]
        if (real_ids < 0).any() or (real_ids >= vocab_size).any():
            raise ValueError(f"`input_ids` must be in [0, {vocab_size}) (config.vocab_size)")
    if dependency_adjacency is not None:
        if dependency_adjacency.shape != (batch, length, length):
            raise ValueError(
                f"`dependency_adjacency` must have shape [{batch}, {length}, {length}] to match `input_ids`, "
                f"got {tuple(dependency_adjacency.shape)}"
            )
        if check_values and not torch.isfinite(dependency_adjacency).all():
            raise ValueError("`dependency_adjacency` contains NaN or Inf values")
    return input_ids, attention_mask, dependency_adjacency


# 1. Encoders --------------------------------------------------------------------------------------------------------


class MPSMImageEncoder(nn.Module):
    """V = l2norm(FC(region_features)): [I, n, img_dim] -> [I, n, d]."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.img_dim, config.embed_size)

    def forward(self, region_features, region_mask):
        """region_features [I, n, img_dim], region_mask [I, n] (bool) -> V [I, n, d], padded regions zero."""
        return l2norm(self.fc(region_features)) * region_mask.unsqueeze(-1)


class MPSMTextEncoder(nn.Module):
    """Words -> Embedding(vocab, word_dim) -> 1-layer BiGRU -> mean of both directions -> l2norm: [T, L] -> [T, L, d]."""

    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.word_dim, padding_idx=0)
        self.gru = nn.GRU(config.word_dim, config.embed_size, num_layers=1, batch_first=True, bidirectional=True)

    def forward(self, input_ids, attention_mask):
        """input_ids [T, L], attention_mask [T, L] (bool, right-padded) -> [T, L, d], padded words zero."""
        embeds, lengths = self.embed(input_ids), attention_mask.sum(1)
        if is_tracing():
            forward_states, backward_states = self.unpacked_gru(embeds, lengths)
        else:
            packed = pack_padded_sequence(embeds, lengths.cpu(), batch_first=True, enforce_sorted=False)
            hidden, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=input_ids.shape[1])
            forward_states, backward_states = hidden.chunk(2, dim=-1)
        return l2norm((forward_states + backward_states) / 2) * attention_mask.unsqueeze(-1)

    def unpacked_gru(self, embeds, lengths):
        """
        The BiGRU's states of the real words without a packed sequence (whose sizes follow the lengths, which
        torch.export and torch.compile cannot trace): the forward direction reads the right-padded captions; the
        backward direction reads them left-padded (each row rotated by its padding), so that it starts at the last
        word, and its states are rotated back. embeds [T, L, c], lengths [T] -> two [T, L, d] (any values on padding).
        """
        num_texts, length = embeds.shape[:2]
        positions = torch.arange(length, device=embeds.device)
        padding = (length - lengths).unsqueeze(1)  # [T, 1]
        left_padded = embeds.gather(1, ((positions - padding) % length).unsqueeze(-1).expand_as(embeds))
        states = self.gru(torch.cat([embeds, left_padded]))[0]
        forward_states = states[:num_texts].chunk(2, dim=-1)[0]
        backward_states = states[num_texts:].chunk(2, dim=-1)[1]
        backward_states = backward_states.gather(
            1, ((positions + padding) % length).unsqueeze(-1).expand_as(backward_states)
        )
        return forward_states, backward_states


class MPSMWordSelfAttention(nn.Module):
    """
    Hierarchical correspondences (the word self-attention option): self-attention over the word embeddings, and a
    per-word importance in (0, 1) that down-weights uninformative words' similarity nodes before matching.
    [T, L, d] -> ([T, L, d], [T, L]).
    """

    def __init__(self, config):
        super().__init__()
        self.query = nn.Linear(config.embed_size, config.embed_size)
        self.key = nn.Linear(config.embed_size, config.embed_size)
        self.value = nn.Linear(config.embed_size, config.embed_size)
        self.importance = nn.Linear(config.embed_size, 1)

    def forward(self, words, mask):
        scores = self.query(words) @ self.key(words).transpose(1, 2) / math.sqrt(words.shape[-1])
        attention = masked_softmax(scores, mask.unsqueeze(1))
        words = l2norm(words + attention @ self.value(words)) * mask.unsqueeze(-1)
        importance = torch.sigmoid(self.importance(words).squeeze(-1)) * mask
        return words, importance


# 2. Semantic knowledge graphs (eq 1-4) ------------------------------------------------------------------------------


class MPSMSpatialKernels(nn.Module):
    """
    Visual spatial prior P_v: the polar coordinates (ρ, θ) of the offset between box centres go through K learned
    Gaussian kernels (Norcliffe-Brown et al. 2018, as in GSMN), mixed to one positive scalar per pair.
    boxes [I, n, 4] in [0, 1] -> P_v [I, n, n].
    """

    def __init__(self, config):
        super().__init__()
        kernels = config.num_spatial_kernels
        self.mean_rho = nn.Parameter(torch.empty(kernels))
        self.mean_theta = nn.Parameter(torch.empty(kernels))
        self.log_sigma_rho = nn.Parameter(torch.empty(kernels))
        self.log_sigma_theta = nn.Parameter(torch.empty(kernels))
        self.mixture_logits = nn.Parameter(torch.empty(kernels))

    def forward(self, boxes):
        centres = (boxes[..., :2] + boxes[..., 2:]) / 2
        offsets = centres.unsqueeze(1) - centres.unsqueeze(2)  # [I, n, n, 2], centre_j - centre_i
        rho = offsets.norm(dim=-1).unsqueeze(-1)
        theta = torch.atan2(offsets[..., 0], offsets[..., 1]).unsqueeze(-1)
        angle = theta - self.mean_theta
        angle = torch.atan2(torch.sin(angle), torch.cos(angle))  # wrapped to [-π, π]
        exponent = ((rho - self.mean_rho) / self.log_sigma_rho.exp()) ** 2 + (angle / self.log_sigma_theta.exp()) ** 2
        return (torch.exp(-0.5 * exponent) * torch.softmax(self.mixture_logits, 0)).sum(-1)


class MPSMSpatialMessages(nn.Module):
    """
    Beyond the paper (`config.spatial_messages`): region i receives the content of the regions that lie inside its box,
        m_i = Σ_{j≠i} C_ij x_j / (1 + Σ_{j≠i} C_ij),  C_ij = |b_i ∩ b_j| / |b_j|,   x_i ← x_i + W_m m_i,
    with W_m zero-initialised, so the layer is the identity at initialisation.

    Why: binding ("a man in a red shirt") is decided by where the boxes lie: the shirt's region lies inside the man's.
    The paper's KGID cannot carry that: eq 5 re-weights a node's own channels by ρ(A X W) ⊙ X, so a neighbour's
    content never reaches the node, and P_v only scales the edges of E by one scalar per pair. Here the message is a
    neighbour's content, weighted by containment, which does not depend on where in the picture the pair lies.
    regions [I, n, d], boxes [I, n, 4] in [0, 1], mask [I, n] -> [I, n, d].
    """

    def __init__(self, config):
        super().__init__()
        self.message = ZeroInitLinear(config.embed_size, config.embed_size)  # W_m

    def forward(self, regions, boxes, mask):
        top_left = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
        bottom_right = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
        intersection = (bottom_right - top_left).clamp_min(0).prod(-1)  # [I, n, n]
        area = (boxes[..., 2:] - boxes[..., :2]).clamp_min(0).prod(-1)  # [I, n]
        containment = intersection / area.unsqueeze(1).clamp_min(1e-6)  # C_ij: share of box j inside box i
        others = mask.unsqueeze(1) & mask.unsqueeze(2) & ~torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
        containment = containment * others
        messages = containment @ regions / (1 + containment.sum(-1, keepdim=True))
        return regions + self.message(messages) * mask.unsqueeze(-1)


def semantic_knowledge_graph(nodes, prior, mask, lambda_softmax):
    """
    Edges of a semantic knowledge graph (eq 1-4).

    r_ij = softmax_j(λ x_iᵀx_j) over valid nodes (eq 1-2); E = column-L2-normalise(r ⊙ P) (eq 3-4).

    Args:
        nodes (`torch.FloatTensor` [B, k, d]): L2-normalised node features.
        prior (`torch.FloatTensor` [B, k, k]): P_v (spatial kernels) or P_t (dependency adjacency).
        mask (`torch.BoolTensor` [B, k]): real nodes.
    Returns:
        `torch.FloatTensor` [B, k, k]: E, every column of unit L2 norm over its valid rows, zero on padding.
    """
    pair_mask = mask.unsqueeze(2) & mask.unsqueeze(1)
    relevance = masked_softmax(lambda_softmax * nodes @ nodes.transpose(1, 2), pair_mask)
    return l2norm(relevance * prior * pair_mask, dim=1)


# 3. Knowledge Graph Iterative Dissemination (eq 5-9) ----------------------------------------------------------------


class MPSMKGIDLayer(nn.Module):
    """
    One KGID layer. Layer l > 0 first rebuilds its adjacency from its input (eq 9, with its own W_O, W_I); layer 0
    uses the semantic knowledge graph E.

    The layer is the identity at initialisation and carries messages along the graph (three readings of eq 5-8,
    chosen by measurement on the synthetic scenes; the paper's literal form made rsum fall with depth):
    - ρ in eq 5 is d·softmax over the d features, so uniform weights give V_k = X and the graph's message
      re-weights each node's features around 1 (a plain softmax gives ‖V_k‖/‖X‖ = 1/d and a Jacobian 1/d, so
      neither E, P_v, P_t nor eq 9 reached the output or received gradient);
    - the gate of eq 6 reads unit-RMS coordinates (x·√d/‖x‖): on l2-normalised nodes the paper's inputs are
      O(1/√d) and σ is the constant 0.5;
    - eq 8 keeps its shortcut linear, X + W_kg V_kg + b with W_kg and b zero-initialised (as GSMN/VSRN-style
      graph blocks do): a ReLU over the sum zeroed about half of each node's signed coordinates and moved every
      node into the positive orthant, so word-region cosines lost their sign.
    """

    def __init__(self, config, rebuild_adjacency):
        super().__init__()
        size = config.embed_size
        self.lambda_softmax = config.lambda_softmax
        self.use_gate = config.kgid_gate
        self.propagation = nn.Linear(size, size, bias=False)  # W (eq 5)
        self.transform = ZeroInitLinear(size, size)  # W_kg, b (eq 8)
        self.edge_out = nn.Linear(size, size, bias=False) if rebuild_adjacency else None  # W_O (eq 9)
        self.edge_in = nn.Linear(size, size, bias=False) if rebuild_adjacency else None  # W_I (eq 9)

    def adaptive_adjacency(self, nodes, mask, real=None):
        """Eq 9: A_ij = softmax_j(λ (W_O x_i)ᵀ(W_I x_j)) over valid j. [B, k, d] -> [B, k, k]."""
        out_nodes = linear_on_real_nodes(self.edge_out, nodes, real)
        in_nodes = linear_on_real_nodes(self.edge_in, nodes, real)
        scores = self.lambda_softmax * out_nodes @ in_nodes.transpose(1, 2)
        return masked_softmax(scores, mask.unsqueeze(1)) * mask.unsqueeze(2)

    def forward(self, nodes, adjacency, mask, real=None):
        """
        nodes [B, k, d], adjacency [B, k, k] (ignored when this layer rebuilds it), mask [B, k], real (*optional*):
        `real_node_index(mask)`, to run the per-node maps on the real nodes only -> (nodes, gate), gate [B, k, d] (ones
        when `config.kgid_gate` is off).
        """
        if self.edge_out is not None:
            adjacency = self.adaptive_adjacency(nodes, mask, real)
        size = nodes.shape[-1]
        propagated = adjacency @ linear_on_real_nodes(self.propagation, nodes, real)
        knowledge = size * torch.softmax(propagated, dim=-1) * nodes  # eq 5, ρ = d·softmax
        if self.use_gate:
            # unit-RMS coordinates x·√d/‖x‖, in float32: a padded node's ‖x‖ is 0 and √d / 1e-8 overflows float16
            unit = size**0.5 / nodes.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
            gate = torch.sigmoid(knowledge * unit * nodes * unit + nodes * unit).to(nodes.dtype)  # eq 6
            gated = gate * knowledge + (1 - gate) * nodes  # eq 7
        else:  # ablation: the disseminated knowledge replaces the node
            gate, gated = torch.ones_like(nodes), knowledge
        nodes = (nodes + linear_on_real_nodes(self.transform, gated, real)) * mask.unsqueeze(-1)  # eq 8, linear shortcut
        return nodes, gate


class MPSMKGID(nn.Module):
    """N KGID layers over one modality: (X⁰ = V or T, A⁰ = E) -> (l2norm(X^N), (X¹, …, X^N)), each [B, k, d]."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(MPSMKGIDLayer(config, rebuild_adjacency=i > 0) for i in range(config.kgid_layers))

    def forward(self, nodes, adjacency, mask, real=None):
        states = ()  # each layer's output, the hidden states of `output_hidden_states`
        for layer in self.layers:
            nodes, _ = layer(nodes, adjacency, mask, real)
            states += (nodes,)
        return l2norm(nodes) * mask.unsqueeze(-1), states


# 4. Global features (self-attention pooling, as SGRAF's VisualSA/TextSA) --------------------------------------------


class MPSMGlobalAttention(nn.Module):
    """
    a = softmax_i(W₁(tanh(W₂ x_i) ⊙ tanh(W₃ x_mean))), global = l2norm(Σ_i a_i x_i). [B, k, d] -> ([B, d], [B, k]).
    The tanh follows SGRAF's VisualSA/TextSA (the self-attention pooling MPSM's global features build on).
    """

    def __init__(self, config):
        super().__init__()
        self.local_proj = nn.Linear(config.embed_size, config.embed_size)  # W₂
        self.global_proj = nn.Linear(config.embed_size, config.embed_size)  # W₃
        self.score = nn.Linear(config.embed_size, 1)  # W₁
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, nodes, mask, real=None):
        """nodes [B, k, d], mask [B, k], real (*optional*): `real_node_index(mask)`."""
        mean = masked_mean(nodes, mask)
        local = linear_on_real_nodes(self.local_proj, nodes, real)
        common = torch.tanh(local) * torch.tanh(self.global_proj(mean)).unsqueeze(1)
        weights = masked_softmax(self.score(self.dropout(common)).squeeze(-1), mask)
        return l2norm((weights.unsqueeze(-1) * nodes).sum(1)), weights


# 5. Cross attention (per pair) --------------------------------------------------------------------------------------


def cross_attention(queries, query_mask, keys, key_mask, lambda_softmax, queries_first):
    """
    SCAN attention of queries over keys for every image-caption pair of a block.

    a_qk = softmax_k(λ · norm_q(LeakyReLU(cos(q, k)))), attended_q = l2norm(Σ_k a_qk k). For the paper's text-to-image
    stream the queries are words and the keys regions; for the image-to-text stream (two-stream reasoning) the reverse.

    Args:
        queries: [Q, a, d] per item, or [I, T, a, d] per pair.
        keys: [K, b, d] per item, or [I, T, b, d] per pair.
        query_mask, key_mask: real entries of the queries and keys, per item.
        queries_first: the pair axes are always (I images, T captions); True when the queries are the images
            (image-to-text stream), False when they are the captions (text-to-image stream).
    Returns:
        attended [I, T, a, d], attention [I, T, a, b].
    """
    q_pair = "itad" if queries.dim() == 4 else ("iad" if queries_first else "tad")
    k_pair = "itbd" if keys.dim() == 4 else ("tbd" if queries_first else "ibd")
    cosine = torch.einsum(f"{q_pair},{k_pair}->itab", queries, keys)
    q_mask = query_mask[:, None, :, None] if queries_first else query_mask[None, :, :, None]
    k_mask = key_mask[None, :, None, :] if queries_first else key_mask[:, None, None, :]
    cosine = F.leaky_relu(cosine, 0.1) * q_mask
    cosine = l2norm(cosine, dim=2)  # norm over the queries (SCAN's clipped_l2norm)
    attention = masked_softmax(lambda_softmax * cosine, k_mask)
    # l2norm(Σ_b a_b k_b) without a pass over the d-wide sums: ‖Σ_b a_b k_b‖² = aᵀ G a with the keys' Gram matrix G
    # (per item, b x b), in float32; the attention is scaled before the sum, which then comes out normalised
    gram_spec = k_pair[:-1] + "c"
    gram = torch.einsum(f"{k_pair},{k_pair.replace('b', 'c')}->{gram_spec}", keys.float(), keys.float())
    squared_norm = (torch.einsum(f"itab,{gram_spec}->itac", attention.float(), gram) * attention).sum(-1, keepdim=True)
    scale = squared_norm.clamp_min(1e-16).rsqrt().clamp_max(torch.finfo(attention.dtype).max).to(attention.dtype)
    attended = torch.einsum(f"itab,{k_pair}->itad", attention * scale, keys)
    return attended, attention


# 6. Multi-perspective similarity representations (eq 10-15) ---------------------------------------------------------


class MPSMDistanceRepresentation(nn.Module):
    """Distance perspective (eq 10-12): l2norm(W_d (x - y)²). [..., d] x [..., d] -> [..., m]."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.embed_size, config.sim_dim)

    def forward(self, x, y):
        """x, y: broadcastable [..., d] (e.g. attended regions [I, T, L, d] and words [T, L, d], never expanded)."""
        return l2norm(self.proj(F.mse_loss(*torch.broadcast_tensors(x, y), reduction="none")))  # (x - y)², one pass


class MPSMDirectionRepresentation(nn.Module):
    """
    Direction perspective (eq 13-15): l2norm(W_c (x/‖x‖ ⊙ y/‖y‖)). The reading keeps the element-wise terms of the
    cosine (they sum to it): the paper's scalar cosine would make W_c·cos rank one and its L2 norm the constant
    ±w/‖w‖. [..., d] x [..., d] -> [..., m].
    """

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Linear(config.embed_size, config.sim_dim)

    def forward(self, x, y):
        """x, y: broadcastable [..., d]."""
        # W_c (x/‖x‖ ⊙ y/‖y‖) + b = (W_c (x ⊙ y)) / (‖x‖‖y‖) + b: one pass over the d-wide inputs instead of three;
        # the norms in float32 (a padded y is zero, and 1 / 1e-8 overflows float16), the scale bounded to x's dtype
        norms = [torch.linalg.vector_norm(z, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(1e-8) for z in (x, y)]
        scale = (norms[0] * norms[1]).reciprocal().clamp_max(torch.finfo(x.dtype).max).to(x.dtype)
        return l2norm(torch.addcmul(self.proj.bias, F.linear(x * y, self.proj.weight), scale))


# The similarity perspectives by name. A new perspective is a class above and an entry here and in the configuration's
# `PERSPECTIVES` (its short name, which names its published model and its ensemble member).
SIMILARITY_REPRESENTATIONS = {"distance": MPSMDistanceRepresentation, "direction": MPSMDirectionRepresentation}
if SIMILARITY_REPRESENTATIONS.keys() != PERSPECTIVES.keys():
    raise ImportError(f"the perspectives of modeling_mpsm.py ({list(SIMILARITY_REPRESENTATIONS)}) and of "
                      f"configuration_mpsm.py ({list(PERSPECTIVES)}) must be the same")


# 7. Similarity-Relation Graph Reconstruction (eq 16-20) -------------------------------------------------------------


class MaskedBatchNorm(nn.BatchNorm1d):
    """
    BatchNorm of one scalar per node whose batch statistics cover the real nodes only, of every block of the batch
    (the per-pair part runs the captions in blocks of similar length, see `MPSMModel.pair_logits`; the statistics
    are those of the whole batch, as without blocks). list of [P_b, K_b] -> list of [P_b, K_b].
    """

    def __init__(self):
        super().__init__(1)

    def forward(self, blocks, masks):
        if not self.training and self.track_running_stats:  # eval: an affine map, no gather of the real nodes
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            shift = self.bias - self.running_mean * scale
            return [torch.addcmul(shift, values, scale) * mask for values, mask in zip(blocks, masks)]
        real = torch.cat([values[mask] for values, mask in zip(blocks, masks)])
        normalised = super().forward(real.unsqueeze(1)).squeeze(1).split([int(mask.sum()) for mask in masks])
        return [
            values.new_zeros(values.shape).masked_scatter(mask, part.to(values.dtype))
            for values, mask, part in zip(blocks, masks, normalised)
        ]


class MPSMSRGRStep(GradientCheckpointingLayer):
    """
    One reconstruction round over the similarity nodes of each pair (eq 16-20): `edges` (eq 16) over every block of
    the batch, then `forward` (eq 17-20) block by block.

    Eq 16's "W_out ∈ R^{m×1} … ⊕" is read as GAT-style additive attention: o_a = BN(w_outᵀ s_a), i_b = BN(w_inᵀ s_b),
    E→_ab = σ(o_a + i_b) / Σ_b' σ(o_a + i_b'), E←_ab = σ(i_a + o_b) / Σ_b' σ(i_a + o_b').
    The reconstructed nodes are L2-normalised (as every similarity node of eq 10-15 is): unbounded, eq 20 grows the
    global node's norm round by round and hardest negatives collapse to "all scores equal" (docs/benchmarks.md).

    The blocks share only the batch statistics of eq 16's batch norms, so with gradient checkpointing each block's
    reconstruction (`forward`, eq 17-20) is recomputed on its own in the backward pass, and the edges are kept (the
    batch norms see each batch once).
    """

    def __init__(self, config):
        super().__init__()
        m = config.sim_dim
        self.out_score = nn.Linear(m, 1, bias=False)  # w_out
        self.in_score = nn.Linear(m, 1, bias=False)  # w_in
        self.out_norm = MaskedBatchNorm()
        self.in_norm = MaskedBatchNorm()
        self.out_message = nn.Linear(m, m, bias=False)  # U_out
        self.in_message = nn.Linear(m, m, bias=False)  # U_in
        self.gate = nn.Linear(2 * m, m)  # W̃, b̃ (eq 18)
        self.out_refine = nn.Linear(m, m, bias=False)  # W₁* (eq 19)
        self.in_refine = nn.Linear(m, m, bias=False)  # W₂* (eq 19)
        self.merge = nn.Linear(m, m)  # W*, b* (eq 20)

    def edges(self, blocks, masks):
        """Eq 16, per block: row-normalised (E→, E←), each [P_b, K_b, K_b], rows over valid nodes summing to 1."""
        weight = torch.cat([self.out_score.weight, self.in_score.weight])
        scores = [F.linear(nodes, weight) for nodes in blocks]  # one pass: [P_b, K_b, 2]
        out_scores = self.out_norm([score[..., 0] for score in scores], masks)
        in_scores = self.in_norm([score[..., 1] for score in scores], masks)
        edges = []
        for out_score, in_score, mask in zip(out_scores, in_scores, masks):
            valid = mask.unsqueeze(1).to(out_score.dtype)
            forward_edges = torch.sigmoid(out_score.unsqueeze(2) + in_score.unsqueeze(1)) * valid
            backward_edges = torch.sigmoid(in_score.unsqueeze(2) + out_score.unsqueeze(1)) * valid
            edges.append((forward_edges / forward_edges.sum(-1, keepdim=True),
                          backward_edges / backward_edges.sum(-1, keepdim=True)))
        return edges

    def forward(self, nodes, forward_edges, backward_edges, first_only=False):
        """
        Eq 17-20 for one block: nodes [P, K, m] and its edges (`edges`) [P, K, K] -> [P, K, m]; with `first_only`,
        only the first (global) node is reconstructed, [P, 1, m] (the last round, whose other nodes the score does
        not read).
        """
        if first_only:
            forward_edges, backward_edges = forward_edges[:, :1], backward_edges[:, :1]
        forward_nodes = self.out_message(forward_edges @ nodes)  # eq 17, E (S Uᵀ) = (E S) Uᵀ
        backward_nodes = self.in_message(backward_edges @ nodes)
        size = forward_nodes.shape[-1]  # eq 18, W̃ [s→ ; s←] without concatenating
        gate = F.linear(forward_nodes, self.gate.weight[:, :size], self.gate.bias)
        gate = add_linear(gate, backward_nodes, self.gate.weight[:, size:]).sigmoid_()
        refined_forward = add_linear(forward_nodes, gate * forward_nodes, self.out_refine.weight)  # eq 19
        refined_backward = add_linear(backward_nodes, gate * backward_nodes, self.in_refine.weight)
        return l2norm(self.merge(refined_forward + refined_backward))  # eq 20, normalised


def caption_blocks(order, lengths, floats_per_word):
    """
    Blocks of caption positions, in `order` (ascending length): `CAPTION_BLOCKS`, or more when a block's per-pair
    tensors ([I, T_b, L_b, d]: `floats_per_word` = I * d floats per word) would exceed `BLOCK_FLOATS`; a block whose
    longest caption is as long as the previous block's joins it (cutting there saves no padding, e.g. when a scoring
    block's captions are already of one length). Returns a list of index tensors.
    """
    num_blocks = max(CAPTION_BLOCKS, math.ceil(floats_per_word * int(lengths.sum()) / BLOCK_FLOATS))
    blocks = []
    for index in order.tensor_split(min(num_blocks, len(order))):
        if blocks and lengths[index[-1]] == lengths[blocks[-1][-1]]:
            blocks[-1] = torch.cat([blocks[-1], index])
        elif len(index):
            blocks.append(index)
    return blocks


def pair_bytes(model, num_regions, num_words):
    """
    Rough peak bytes of the per-pair part for one pair in fp32: the d-wide per-word tensors (attended regions, their
    distance/direction features), the attention maps (cosines, softmax, and the quadratic form of the attended norms)
    and the m-wide similarity nodes of SRGR. Sizes the calls a gallery is cut into (see `CAPTION_BLOCKS`).
    """
    config = max((member.config for member in model.members().values()), key=lambda c: c.embed_size)
    nodes = num_words + 1
    return 4 * (4 * num_words * config.embed_size + 8 * num_words * num_regions + 12 * nodes * config.sim_dim)


def block_shape(num_images, num_texts, pairs_per_block):
    """Images x captions of a call holding at most `pairs_per_block` pairs (at least one of each), as square as the
    matrix allows, favouring more captions per call (cheaper cross attention per image)."""
    block_images = max(1, min(num_images, math.isqrt(max(pairs_per_block, 1)) // 2))
    block_texts = max(1, min(num_texts, pairs_per_block // block_images))
    block_images = max(1, min(num_images, pairs_per_block // block_texts))
    return block_images, block_texts


def pair_calls(model, images, texts, max_block_bytes=DEFAULT_MAX_BLOCK_BYTES, max_pairs_per_block=None):
    """
    The calls of `model.similarity` that score every image of `images` against every caption of `texts` (per-item
    outputs) within `max_block_bytes` (see `CAPTION_BLOCKS`), or of `max_pairs_per_block` pairs: captions in ascending
    length, taken from the long end so that a call's size follows its longest caption, to which it is cut (compiled,
    `similarity` runs a call's captions as one uncut block).

    Yields:
        (rows, columns, image, text): the slice of images and the caption positions [T_c] of a call, and its inputs.
    """
    text, num_regions = next(iter(texts.members().values())), next(iter(images.members().values())).region_mask.shape[1]
    lengths = text.attention_mask.sum(1)
    order = lengths.argsort(stable=True)
    sorted_lengths = lengths[order].tolist()
    bytes_per_float = torch.finfo(text.word_embeds.dtype).bits // 8
    end = texts.num_items
    while end > 0:
        pair_size = pair_bytes(model, num_regions, sorted_lengths[end - 1]) * bytes_per_float // 4
        pairs = max_pairs_per_block or max(1, max_block_bytes // pair_size)
        block_images, block_texts = block_shape(images.num_items, end, pairs)
        columns = order[end - block_texts : end]
        text_block = texts.select(columns).cut(sorted_lengths[end - 1])
        for start in range(0, images.num_items, block_images):
            rows = slice(start, start + block_images)
            yield rows, columns, images.select(rows), text_block
        end -= block_texts


def query_scores(model, query, items, **bounds):
    """
    The scores [N] (float32) of one query (an image or a caption: per-item outputs of one item) against N `items` of
    the other modality, in the calls of `pair_calls` (`bounds`: its `max_block_bytes`, `max_pairs_per_block`).
    """
    text_query = isinstance(next(iter(query.members().values())), MPSMTextOutput)
    images, texts = (items, query) if text_query else (query, items)
    scores = torch.empty(items.num_items, device=items.device)
    for rows, columns, image, text in pair_calls(model, images, texts, **bounds):
        if text_query:
            scores[rows] = model.similarity(image, text)[:, 0].float()
        else:
            scores[columns] = model.similarity(image, text)[0].float()
    return scores


class CaptionBlock(NamedTuple):
    """The per-pair inputs of one block of T_b captions against every image (see `MPSMModel.pair_logits`)."""

    regions: torch.Tensor  # [I, n, d], or [I, T_b, n, d] with text-guided region features
    words: torch.Tensor  # [T_b, L_b, d]
    word_mask: torch.Tensor  # [T_b, L_b]
    word_weights: torch.Tensor  # [T_b, L_b]
    text_embeds: torch.Tensor  # [T_b, d]


class MPSMSimilarityHead(nn.Module):
    """
    One perspective (distance or direction) of one stream: similarity nodes -> SRGR -> logit (the score before σ).

    Nodes are [s_g, s_1 … s_k] for `alignment="multi"`, [s_g] for "global" and [s_1 … s_k] for "local". The score reads
    the reasoned global node (w_evalᵀ s*_g + b, the score σ of it), or the mean of the reasoned local nodes when there is no global
    node. Without SRGR (ablation) the score reads the mean of all nodes, so that local nodes still count.
    """

    def __init__(self, config, perspective):
        super().__init__()
        self.alignment = config.alignment
        self.use_srgr = config.use_srgr
        self.local_similarity = (
            SIMILARITY_REPRESENTATIONS[perspective](config) if config.alignment != "global" else None
        )
        self.global_similarity = (
            SIMILARITY_REPRESENTATIONS[perspective](config) if config.alignment != "local" else None
        )
        self.srgr = nn.ModuleList(MPSMSRGRStep(config) for _ in range(config.srgr_steps if config.use_srgr else 0))
        self.evaluate = nn.Linear(config.sim_dim, 1)  # w_eval, b

    def forward(self, nodes, masks):
        """
        SRGR (eq 16-20) and the read-out over the similarity nodes of the pairs of a batch, in blocks of captions of
        similar length (see `MPSMModel.pair_logits`).

        Args:
            nodes: list of [P_b, K_b, m] similarity nodes per block (`similarity_nodes`); masks: list of [P_b, K_b].
        Returns:
            list of `torch.FloatTensor` [P_b]: the logits of each block; the scores are their σ.
        """
        read_global = self.use_srgr and self.global_similarity is not None
        for index, step in enumerate(self.srgr):
            first_only = read_global and index == len(self.srgr) - 1
            nodes = [step(block, *edges, first_only) for block, edges in zip(nodes, step.edges(nodes, masks))]
        # read out in the eval layer's dtype: reduced-precision scoring keeps this layer in float32, since bf16 scores
        # in (0, 1) have a spacing of ~0.004 and would tie near the top of a ranking
        readouts = [block[:, 0] if read_global else masked_mean(block, mask) for block, mask in zip(nodes, masks)]
        return [self.evaluate(readout.to(self.evaluate.weight.dtype)).squeeze(-1) for readout in readouts]

    def similarity_nodes(self, local_pairs, local_mask, local_weights, global_pair):
        """
        The similarity nodes of one block of pairs (eq 10-15), [P, K, m], and their mask [P, K]: [s_g, s_1 … s_k].

        Args (`MPSMPairNodes.pair_inputs`): local_pairs, the (attended, target) local node inputs broadcastable to
        [..., k, d] with P pairs in the leading axes (e.g. [I, T_b, k, d] and [T_b, k, d]), or None for "global"
        alignment; local_mask [P, k]; local_weights [P, k] (word self-attention) or None; global_pair (v̄, t̄)
        broadcastable to [..., d].
        """
        nodes, masks = [], []
        if self.global_similarity is not None:
            global_nodes = self.global_similarity(*global_pair)
            nodes.append(global_nodes.reshape(-1, 1, global_nodes.shape[-1]))
            masks.append(torch.ones_like(nodes[0][:, :, 0], dtype=torch.bool))
        if self.local_similarity is not None:
            local_nodes = self.local_similarity(*local_pairs)
            local_nodes = local_nodes.reshape(-1, *local_nodes.shape[-2:])
            if local_weights is not None:
                local_nodes = local_nodes * local_weights.unsqueeze(-1)
            nodes.append(local_nodes)
            masks.append(local_mask)
        return (torch.cat(nodes, 1) if len(nodes) > 1 else nodes[0]), torch.cat(masks, 1)


class MPSMPairNodes(GradientCheckpointingLayer):
    """
    The per-pair work of one stream on one block of captions: cross attention (step 5), then each perspective's
    similarity nodes (eq 10-15). It has no weights of its own (those of eq 10-15 are the heads'): it is the segment
    that gradient checkpointing recomputes in the backward pass, so that of a block only its inputs and nodes
    [P, K, m] are kept, not its [I, T_b, L_b, d] intermediates.
    """

    def __init__(self, config):
        super().__init__()
        self.alignment = config.alignment
        self.lambda_softmax = config.lambda_softmax
        self.word_self_attention = config.word_self_attention

    def forward(self, regions, region_mask, words, word_mask, word_weights, image_embeds, text_embeds, stream="t2i",
                heads=()):
        """
        Args:
            regions [I, n, d] (or [I, T, n, d] with text-guided region features), region_mask [I, n], words [T, L, d],
            word_mask [T, L], word_weights [T, L], image_embeds [I, d], text_embeds [T, d]: the tensors, positional
            (a reentrant checkpoint passes the gradient to positional arguments only).
            stream (`str`): "t2i" (words attend to regions, the paper) or "i2t".
            heads: the stream's `MPSMSimilarityHead` of each perspective.
        Returns:
            `tuple[torch.Tensor]`: per head, its nodes [P, K, m] and their mask [P, K], one after the other.
        """
        inputs = self.pair_inputs(stream, regions, region_mask, words, word_mask, word_weights, image_embeds, text_embeds)
        return tuple(tensor for head in heads for tensor in head.similarity_nodes(*inputs))

    def pair_inputs(self, stream, regions, region_mask, words, word_mask, word_weights, image_embeds, text_embeds):
        """The inputs of the similarity nodes of every image against a block of T captions (step 5): local_pairs,
        local_mask, local_weights, global_pair (see `MPSMSimilarityHead.similarity_nodes`)."""
        num_images, num_texts = region_mask.shape[0], word_mask.shape[0]  # shapes, not len(): symbolic under tracing
        pairs, num_regions, num_words = num_images * num_texts, region_mask.shape[1], word_mask.shape[1]
        global_pair = (image_embeds.unsqueeze(1), text_embeds)  # [I, 1, d], [T, d]: broadcast, not copied
        if self.alignment == "global":
            return None, None, None, global_pair
        if stream == "t2i":  # words attend to regions (the paper)
            attended, _ = cross_attention(words, word_mask, regions, region_mask, self.lambda_softmax, False)
            local_mask = word_mask.unsqueeze(0).expand(num_images, -1, -1).reshape(pairs, num_words)
            local_weights = (  # word self-attention weighs the word nodes; otherwise `local_mask` alone drops padding
                word_weights.unsqueeze(0).expand(num_images, -1, -1).reshape(pairs, num_words)
                if self.word_self_attention else None
            )
            return (attended, words), local_mask, local_weights, global_pair  # [I, T, L, d], [T, L, d]
        # two-stream reasoning: regions attend to words
        attended, _ = cross_attention(regions, region_mask, words, word_mask, self.lambda_softmax, True)
        target = regions if regions.dim() == 4 else regions.unsqueeze(1)  # [I, T or 1, n, d]
        local_mask = region_mask.unsqueeze(1).expand(-1, num_texts, -1).reshape(pairs, num_regions)
        return (attended, target), local_mask, None, global_pair


# 8. Losses (eq 21 and the options) ----------------------------------------------------------------------------------


def triplet_loss(scores, margin, max_violation=True, positive_mask=None):
    """
    Bidirectional triplet hinge loss (eq 21), summed over the batch.

    Args:
        scores (`torch.FloatTensor` [B, B]): image i (rows) against caption j (columns); positives on the diagonal.
        margin: γ.
        max_violation: hardest negative per query (VSE++) if True, else the sum over all negatives.
        positive_mask (`torch.BoolTensor` [B, B], *optional*): pairs that are not negatives (e.g. two captions of the
            same image in one batch); defaults to the diagonal.
    """
    if positive_mask is None:
        positive_mask = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    positives = scores.diagonal()
    cost_caption = (margin + scores - positives.unsqueeze(1)).clamp(min=0).masked_fill(positive_mask, 0)
    cost_image = (margin + scores - positives.unsqueeze(0)).clamp(min=0).masked_fill(positive_mask, 0)
    if max_violation:
        return cost_caption.max(1)[0].sum() + cost_image.max(0)[0].sum()
    return cost_caption.sum() + cost_image.sum()


def fine_grained_label_loss(scores, text_embeds, positive_mask):
    """
    Fine-grained labels: pairwise loss with soft labels from a siamese text network. The label of (image i, caption j) is the
    similarity of caption j to image i's own caption (t̄_i · t̄_j from the shared text encoder, clipped to [0, 1],
    detached; 1 for positives); hard pairs, far from their label, weigh more (focal weight |s - y|²).
    scores [B, B], text_embeds [B, d] -> [].
    """
    labels = (text_embeds @ text_embeds.T).float().clamp(0, 1).detach().masked_fill(positive_mask, 1.0)
    scores = scores.float().clamp(1e-6, 1 - 1e-6)  # float32 (also for a float16 model): 1 - 1e-6 is 1 in float16
    weights = (scores - labels).abs().detach() ** 2
    return (weights * F.binary_cross_entropy(scores, labels, reduction="none")).sum() / scores.shape[0]


def global_contrastive_loss(image_embeds, text_embeds, temperature, positive_mask):
    """Auxiliary InfoNCE on (v̄, t̄) for the first stage of two-stage retrieval. [B, d] x [B, d] -> []."""
    logits = image_embeds @ text_embeds.T / temperature
    duplicates = positive_mask & ~torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(duplicates, torch.finfo(logits.dtype).min)
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class MPSMRetrievalLoss(nn.Module):
    """
    The training loss of one model on a square batch (pair i = image i, caption i), from the per-perspective `logits`
    [B, B] of `pair_logits`: per perspective the triplet loss (eq 21, on the logits with `config.hinge_on_logits`, else
    on the σ scores) and/or the fine-grained-label loss, summed over perspectives (L_dis + L_dir for "joint"), plus the
    optional global contrastive loss.

    The loss owns its mode, as VSE∞'s loss does: `max_violation` (hardest negatives, from `config.max_violation`) or
    the sum of all violations; the training loop sets it (the sum during the warm-up, then the configured mode).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.max_violation = config.max_violation

    def forward(self, logits, image, text, image_ids=None):
        """`image_ids` [B] marks captions of the same image, which are not negatives."""
        size = image.image_embeds.shape[0]
        if text.text_embeds.shape[0] != size:
            raise ValueError(f"the loss needs as many captions as images (pairs on the diagonal), got {size} images "
                             f"and {text.text_embeds.shape[0]} captions")
        if image_ids is None:
            image_ids = torch.arange(size, device=image.image_embeds.device)
        positive_mask = image_ids.view(-1, 1) == image_ids.view(1, -1)
        loss = 0.0
        for perspective_logits in logits.values():
            scores = torch.sigmoid(perspective_logits)
            if self.config.loss_type in ("triplet", "both"):
                hinged = perspective_logits if self.config.hinge_on_logits else scores
                loss = loss + triplet_loss(hinged, self.config.margin, self.max_violation, positive_mask)
            if self.config.loss_type in ("fine_grained_labels", "both"):
                loss = loss + fine_grained_label_loss(scores, text.text_embeds, positive_mask)
        if self.config.global_loss_weight > 0:
            loss = loss + self.config.global_loss_weight * global_contrastive_loss(
                image.image_embeds, text.text_embeds, self.config.global_loss_temperature, positive_mask
            )
        return loss


# The model ----------------------------------------------------------------------------------------------------------


def _or_config(value, config, name):
    """`value`, or the configuration's setting `name` (`return_dict`, `output_hidden_states`) when it is None."""
    return getattr(config, name) if value is None else value


def _forward_needs_both(input_ids, region_features):
    """The error of `forward` called without one of the modalities, e.g. by the 'feature-extraction' pipeline."""
    if region_features is None:
        given = "neither" if input_ids is None else "`input_ids` only"
    else:
        given = "`region_features` only"
    return ValueError(
        f"MPSM's forward scores images against captions and needs both `input_ids` and `region_features` (got "
        f"{given}). For the features of one modality use `get_text_features` / `get_image_features` (or "
        "`encode_text` / `encode_image`); with `pipeline()`, MPSM runs as the 'mpsm-retrieval' task: "
        "`pipeline('mpsm-retrieval', model=..., trust_remote_code=True)` (the 'feature-extraction' task is not "
        "supported)."
    )


class MPSMHubMixin:
    """What both model classes add to `PreTrainedModel`: loading errors naming the checkpoint's files, the retrieval
    pipeline saved with the model, and `push_to_hub`."""

    # The package's `publishing` sets this to its `push_model_to_hub` (the complete repository: card with model-index,
    # processor, one commit); this file never imports the package, so its copy loaded as remote code keeps None.
    publish = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with truncated or corrupt weights and weights that do not fit
        `config.json` reported as errors naming the checkpoint's files instead of bare safetensors / size errors."""
        from safetensors import SafetensorError

        path = pretrained_model_name_or_path
        try:
            return super().from_pretrained(path, *args, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"{path}: model.safetensors is truncated or corrupt ({error}); save or download the checkpoint again."
            ) from error
        except RuntimeError as error:
            if "mismatched_sizes" not in str(error) and "size mismatch" not in str(error):
                raise
            raise ValueError(
                f"{path}: the weights in model.safetensors do not match config.json (tensor shapes differ, see the "
                f"load report above); was config.json edited or copied from another checkpoint? ({error})"
            ) from error

    def save_pretrained(self, save_directory, is_main_process=True, **kwargs):
        """
        `PreTrainedModel.save_pretrained`; with the model's code (`auto_map`), also the retrieval pipeline:
        `pipeline_mpsm.py` in the folder and its `custom_pipelines` entry in config.json, so that
        `pipeline(model=folder, trust_remote_code=True)` builds an `MPSMRetrievalPipeline`.
        """
        if self.is_remote_code():
            # imported here, not at the top: the pipeline module imports transformers' Pipeline machinery
            from .pipeline_mpsm import MPSMRetrievalPipeline, custom_pipelines

            self.config.custom_pipelines = custom_pipelines()
            if is_main_process:
                os.makedirs(save_directory, exist_ok=True)
                custom_object_save(MPSMRetrievalPipeline, save_directory)
        return super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)

    def push_to_hub(self, repo_id, *, processor=None, metrics=None, base_models=None, **kwargs):
        """
        Upload the model to the Hub repository `repo_id`.

        With the `modeling_mpsm` package, the repository is the complete one its publishing script writes: weights,
        code, a model card with a `model-index` of `metrics` (a dict or an evaluation JSON with `i2t_r1 … t2i_r10,
        rsum, dataset`), `base_models` as the card's `base_model` (the ensemble's members), and the `processor` with
        its tokenizer. Loaded as remote code, transformers' `push_to_hub`. Other arguments (`private`, `token`,
        `revision`, `commit_message`, `create_pr`, `tags`, …) are transformers'.
        """
        if self.publish is not None:
            return self.publish(self, repo_id, processor=processor, metrics=metrics, base_models=base_models, **kwargs)
        if processor is not None or metrics is not None or base_models is not None:
            raise ImportError(
                "push_to_hub(processor=, metrics=, base_models=) needs the modeling_mpsm package "
                "(pip install modeling_mpsm, then its MPSMModel or modeling_mpsm.publishing.push_model_to_hub); "
                "push the processor with processor.push_to_hub(repo_id)"
            )
        return super().push_to_hub(repo_id, **kwargs)


class MPSMPreTrainedModel(MPSMHubMixin, PreTrainedModel):
    config_class = MPSMConfig
    base_model_prefix = "mpsm"
    main_input_name = "input_ids"
    # `activation_checkpointing_enable()` recomputes the per-pair part in the backward pass instead of keeping its
    # intermediates, in segments of one block of captions, its `GradientCheckpointingLayer`s: cross attention +
    # similarity nodes ([I, T_b, L_b, d], `MPSMPairNodes`), then each SRGR round's eq 17-20 (`MPSMSRGRStep`; its eq 16
    # edges, coupled across blocks by the batch norms, are kept)
    supports_gradient_checkpointing = True
    # the score read-out stays float32 when loaded in fp16/bf16: reduced-precision scores in (0, 1) tie near the top
    _keep_in_fp32_modules_strict = ["evaluate"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Xavier-uniform linear layers (as SCAN/SGRAF) except eq 8's W_kg, b (zero), uniform(-0.1, 0.1) word embeddings,
        GRU Xavier weights."""
        if isinstance(module, ZeroInitLinear):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.uniform_(module.weight, -self.config.initializer_range, self.config.initializer_range)
        elif isinstance(module, nn.GRU):
            for name, parameter in module.named_parameters():
                if "weight" in name:
                    init.xavier_uniform_(parameter)
                else:
                    init.zeros_(parameter)
        elif isinstance(module, MPSMSpatialKernels):
            kernels = module.mean_rho.shape[0]
            init.copy_(module.mean_rho, torch.linspace(0.0, 1.0, kernels))
            init.copy_(module.mean_theta, torch.linspace(-math.pi, math.pi, kernels + 1)[:-1])
            init.constant_(module.log_sigma_rho, math.log(0.25))
            init.constant_(module.log_sigma_theta, math.log(math.pi / 4))
            init.zeros_(module.mixture_logits)
        elif isinstance(module, nn.BatchNorm1d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class MPSMModel(MPSMPreTrainedModel):
    """
    MPSM over precomputed region features and word-level captions.

    `encode_image` / `encode_text` do the per-item work (encoders, knowledge graphs, KGID, global features) once per
    item; `similarity` scores every image against every caption with batched per-pair operations.
    """

    def __init__(self, config: MPSMConfig):
        super().__init__(config)
        self.image_encoder = MPSMImageEncoder(config)
        self.text_encoder = MPSMTextEncoder(config)
        self.word_self_attention = MPSMWordSelfAttention(config) if config.word_self_attention else None
        self.spatial_kernels = (
            MPSMSpatialKernels(config) if config.visual_kgid and config.kgid_layers and config.spatial_prior else None
        )
        self.spatial_messages = MPSMSpatialMessages(config) if config.spatial_messages else None
        self.visual_kgid = MPSMKGID(config) if config.visual_kgid and config.kgid_layers else None
        self.textual_kgid = MPSMKGID(config) if config.textual_kgid and config.kgid_layers else None
        self.image_attention = MPSMGlobalAttention(config)
        self.text_attention = MPSMGlobalAttention(config)
        self.text_guidance = (
            nn.Linear(config.embed_size, config.embed_size) if config.text_guided_image_features else None
        )
        self.pair_nodes = MPSMPairNodes(config)
        self.heads = nn.ModuleDict(
            {
                f"{stream}_{perspective}": MPSMSimilarityHead(config, perspective)
                for stream in config.stream_names
                for perspective in config.perspectives
            }
        )
        self.criterion = MPSMRetrievalLoss(config)
        self._warned_no_boxes = False
        self.post_init()

    def members(self):
        """The models whose scores this model's scores are: itself, {"model": self} (an ensemble has several)."""
        return {"model": self}

    def get_input_embeddings(self):
        """The word embedding table (`resize_token_embeddings` extends it for a larger vocabulary)."""
        return self.text_encoder.embed

    def set_input_embeddings(self, value):
        self.text_encoder.embed = value

    def get_image_features(self, region_features, boxes=None, region_mask=None, image_sizes=None,
                           output_hidden_states=None, return_dict=None) -> BaseModelOutputWithPooling | tuple:
        """
        The image features of `encode_image` in the CLIP convention: `pooler_output` is the global image feature v̄
        [I, d], `last_hidden_state` the region nodes ṽ [I, n, d] and, with `output_hidden_states`, `hidden_states`
        the node states of the visual KGID layers (see `MPSMImageOutput`). `return_dict=False` gives the tuple of the
        non-None fields; both default to the configuration's setting.
        """
        output_hidden_states = _or_config(output_hidden_states, self.config, "output_hidden_states")
        output = _features(self.encode_image(region_features, boxes, region_mask, image_sizes, output_hidden_states))
        return output if _or_config(return_dict, self.config, "return_dict") else output.to_tuple()

    def get_text_features(self, input_ids, attention_mask=None, dependency_adjacency=None, output_hidden_states=None,
                          return_dict=None) -> BaseModelOutputWithPooling | tuple:
        """
        The caption features of `encode_text` in the CLIP convention: `pooler_output` is the global caption feature t̄
        [T, d], `last_hidden_state` the word nodes t̃ [T, L, d] and, with `output_hidden_states`, `hidden_states` the
        node states of the textual KGID layers (see `MPSMTextOutput`). `return_dict=False` gives the tuple of the
        non-None fields; both default to the configuration's setting.
        """
        output_hidden_states = _or_config(output_hidden_states, self.config, "output_hidden_states")
        output = _features(self.encode_text(input_ids, attention_mask, dependency_adjacency, output_hidden_states))
        return output if _or_config(return_dict, self.config, "return_dict") else output.to_tuple()

    # ---------------------------------------------------------------- per item: images
    def encode_image(self, region_features, boxes=None, region_mask=None, image_sizes=None, output_hidden_states=False,
                     inputs_checked=False):
        """
        Encoder, visual knowledge graph, visual KGID and global feature of each image (computed once per image).

        Args:
            region_features (`torch.FloatTensor` [I, n, img_dim]): BUTD region features.
            boxes (`torch.FloatTensor` [I, n, 4], *optional*): (x1, y1, x2, y2) in [0, 1], or pixels with `image_sizes`.
                Without boxes the spatial prior is all ones (with a warning).
            region_mask (`torch.LongTensor` [I, n], *optional*): 1 for real regions, 0 for padding.
            image_sizes (`torch.LongTensor` [I, 2], *optional*): (width, height) in pixels.
            output_hidden_states (`bool`): also return the region node states (V, then each KGID layer's output).
            inputs_checked (`bool`): the inputs are already what `check_image_inputs` returns (an ensemble's members).
        Returns:
            [`MPSMImageOutput`].
        """
        if not inputs_checked:
            region_features, boxes, region_mask = check_image_inputs(
                region_features, boxes, region_mask, image_sizes, self.config.img_dim, self.image_encoder.fc.weight.dtype
            )
        regions = self.image_encoder(region_features, region_mask)
        if self.spatial_messages is not None and boxes is not None:
            regions = self.spatial_messages(regions, boxes, region_mask)
        real = real_node_index(region_mask)  # the per-region maps skip the padding (None: every region is real)
        hidden_states = (regions,)
        if self.visual_kgid is not None:
            if self.spatial_kernels is not None and boxes is not None:
                prior = self.spatial_kernels(boxes)
            else:  # P_v = 1: the ablation without a spatial prior, or no boxes (with a warning)
                if self.spatial_kernels is not None and not self._warned_no_boxes:
                    warnings.warn("MPSM got no `boxes`: the visual spatial prior P_v falls back to all ones.")
                    self._warned_no_boxes = True
                prior = torch.ones(regions.shape[:2] + regions.shape[1:2], dtype=regions.dtype, device=regions.device)
            graph = semantic_knowledge_graph(regions, prior, region_mask, self.config.lambda_softmax)
            regions, states = self.visual_kgid(regions, graph, region_mask, real)
            hidden_states += states
        image_embeds, _ = self.image_attention(regions, region_mask, real)
        return MPSMImageOutput(
            region_embeds=regions,
            region_mask=region_mask,
            image_embeds=image_embeds,
            hidden_states=hidden_states if output_hidden_states else None,
        )

    # ---------------------------------------------------------------- per item: captions
    def encode_text(self, input_ids, attention_mask=None, dependency_adjacency=None, output_hidden_states=False,
                    inputs_checked=False):
        """
        Encoder, textual knowledge graph, textual KGID and global feature of each caption (computed once per caption).

        Args:
            input_ids (`torch.LongTensor` [T, L]): word ids, right-padded with 0.
            attention_mask (`torch.LongTensor` [T, L], *optional*): 1 for words, 0 for padding.
            dependency_adjacency (`torch.FloatTensor` [T, L, L], *optional*): P_t; identity + neighbours if missing.
            output_hidden_states (`bool`): also return the word node states (T, then each KGID layer's output).
            inputs_checked (`bool`): the inputs are already what `check_text_inputs` returns (an ensemble's members).
        Returns:
            [`MPSMTextOutput`].
        """
        if not inputs_checked:
            input_ids, attention_mask, dependency_adjacency = check_text_inputs(
                input_ids, attention_mask, dependency_adjacency, self.config.vocab_size
            )
        words = self.text_encoder(input_ids, attention_mask)
        real = real_node_index(attention_mask)  # the per-word maps skip the padding (about half of a batch's words)
        word_weights = attention_mask.to(words.dtype)
        if self.word_self_attention is not None:
            words, word_weights = self.word_self_attention(words, attention_mask)
        hidden_states = (words,)
        if self.textual_kgid is not None:
            if dependency_adjacency is None:
                dependency_adjacency = chain_adjacency(attention_mask)
            graph = semantic_knowledge_graph(
                words, dependency_adjacency.to(words.dtype), attention_mask, self.config.lambda_softmax
            )
            words, states = self.textual_kgid(words, graph, attention_mask, real)
            hidden_states += states
        text_embeds, _ = self.text_attention(words, attention_mask, real)
        guidance = torch.sigmoid(self.text_guidance(text_embeds)) if self.text_guidance is not None else None
        return MPSMTextOutput(
            word_embeds=words,
            attention_mask=attention_mask,
            text_embeds=text_embeds,
            word_weights=word_weights,
            guidance=guidance,
            hidden_states=hidden_states if output_hidden_states else None,
        )

    # ---------------------------------------------------------------- per pair
    def pair_logits(self, image: MPSMImageOutput, text: MPSMTextOutput):
        """
        Logits of every image against every caption, per perspective (the per-pair part: steps 5-7); the scores are
        their σ, so both rank alike.

        The per-pair work grows with the caption length, so the captions run in blocks of similar length, each cut to
        its own longest caption (in one block every pair would pay for the batch's longest caption); the blocks follow
        the rule written at `CAPTION_BLOCKS`. They share SRGR's batch statistics, so the logits are those of one block.
        Region padding beyond the largest count is dropped. Under tracing (torch.export, torch.compile), where these
        cuts would be shapes read from the data, the captions run as one uncut block (the padding is masked).
        Returns:
            `dict[str, torch.FloatTensor]`: perspective -> [I, T] logits (mean over streams).
        """
        lengths = text.attention_mask.sum(1)
        if is_tracing():
            num_regions, order = image.region_mask.shape[1], None
        else:
            num_regions, order = int(image.region_mask.sum(1).max()), lengths.argsort(stable=True)
        # one dtype for both sides: e.g. a float32 gallery against a query encoded under bf16 autocast
        dtype = torch.promote_types(image.region_embeds.dtype, text.word_embeds.dtype)
        regions, region_mask = image.region_embeds[:, :num_regions].to(dtype), image.region_mask[:, :num_regions]
        image_embeds, text_embeds = image.image_embeds.to(dtype), text.text_embeds.to(dtype)
        words = text.word_embeds.to(dtype)
        if order is None:
            caption_index = [(slice(None), words.shape[1])]
        else:  # (captions, their longest length) per block
            caption_index = [(index, int(lengths[index].max()))
                             for index in caption_blocks(order, lengths, floats_per_word=len(regions) * words.shape[-1])]
        blocks = []
        for index, num_words in caption_index:
            block_regions = regions
            if text.guidance is not None:  # text-guided region features: the caption gates the region channels, [I, T_b, n, d]
                guidance = text.guidance[index].to(dtype)[None, :, None, :]
                block_regions = l2norm(regions.unsqueeze(1) * guidance) * region_mask[:, None, :, None]
            blocks.append(CaptionBlock(block_regions, words[index, :num_words], text.attention_mask[index, :num_words],
                                       text.word_weights[index, :num_words], text_embeds[index]))
        logits = {}
        for stream in self.config.stream_names:
            for perspective, value in zip(self.config.perspectives,
                                          self.stream_logits(stream, region_mask, image_embeds, blocks)):
                logits[perspective] = logits.get(perspective, 0) + value / len(self.config.stream_names)
        if order is None:
            return logits
        inverse = order.argsort()  # back to the captions' order
        return {perspective: value[:, inverse] for perspective, value in logits.items()}

    def stream_logits(self, stream, region_mask, image_embeds, blocks):
        """
        One stream's logits per perspective: cross attention (step 5), similarity nodes (eq 10-15), SRGR (eq 16-20).

        Args: region_mask [I, n], image_embeds [I, d], blocks: list of `CaptionBlock` (T_b captions each).
        Returns:
            `tuple[torch.FloatTensor]`: one [I, T] logit matrix per perspective of `config.perspectives`, the blocks'
            captions side by side.
        """
        heads = [self.heads[f"{stream}_{perspective}"] for perspective in self.config.perspectives]
        # block by block (a checkpointed layer: with gradient checkpointing, the [I, T_b, L_b, d] intermediates of one
        # block at a time are kept); per block, each head's nodes [P_b, K_b, m] and mask [P_b, K_b]
        outputs = [self.pair_nodes(block.regions, region_mask, block.words, block.word_mask, block.word_weights,
                                   image_embeds, block.text_embeds, stream=stream, heads=heads) for block in blocks]
        logits = []
        for h, head in enumerate(heads):
            block_logits = head([output[2 * h] for output in outputs], [output[2 * h + 1] for output in outputs])
            logits.append(torch.cat([value.view(region_mask.shape[0], block.text_embeds.shape[0])
                                     for value, block in zip(block_logits, blocks)], dim=1))
        return tuple(logits)

    @staticmethod
    def scores_from_logits(logits):
        """Matching scores [I, T] in (0, 1): the mean over perspectives of σ(logit)."""
        return sum(torch.sigmoid(value) for value in logits.values()) / len(logits)

    def similarity(self, image: MPSMImageOutput, text: MPSMTextOutput):
        """Matching scores [I, T] in (0, 1): the mean over perspectives of σ(`pair_logits`)."""
        return self.scores_from_logits(self.pair_logits(image, text))

    def text_region_attention(self, image: MPSMImageOutput, text: MPSMTextOutput):
        """Text-guided attention of each word over the regions (step 5), [I, T, L, n], for visual explanations."""
        _, attention = cross_attention(
            text.word_embeds, text.attention_mask, image.region_embeds, image.region_mask,
            self.config.lambda_softmax, False,
        )
        return attention

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        dependency_adjacency=None,
        region_features=None,
        boxes=None,
        region_mask=None,
        image_sizes=None,
        image_ids=None,
        return_loss=None,
        output_hidden_states=None,
        return_dict=None,
    ) -> MPSMOutput | tuple:
        """
        Scores every image of the batch against every caption, and the loss when `return_loss=True` (then image i and
        caption i are the positive pairs; `self.criterion` is the loss and holds its mode, hardest negatives or the sum
        of violations). Argument shapes as in `encode_image` and `encode_text`; `image_ids` [B] marks captions of the
        same image (not negatives of each other). Unknown arguments are refused by name (a `TypeError`, as in every
        transformers model). `output_hidden_states=True` adds the node states of `encode_image` and `encode_text`;
        `return_dict=False` returns the tuple of the output's non-None fields (both default to the configuration's
        setting).
        """
        if input_ids is None or region_features is None:
            raise _forward_needs_both(input_ids, region_features)
        output_hidden_states = _or_config(output_hidden_states, self.config, "output_hidden_states")
        image = self.encode_image(region_features, boxes, region_mask, image_sizes, output_hidden_states)
        text = self.encode_text(input_ids, attention_mask, dependency_adjacency, output_hidden_states)
        output = self.matching_output(image, text, image_ids, return_loss)
        return output if _or_config(return_dict, self.config, "return_dict") else output.to_tuple()

    def matching_output(self, image: MPSMImageOutput, text: MPSMTextOutput, image_ids=None, return_loss=False):
        """`forward`'s [`MPSMOutput`] from the per-item outputs: scores of every pair, and the loss when asked."""
        logits = self.pair_logits(image, text)
        logits_per_image = self.scores_from_logits(logits)
        return MPSMOutput(
            loss=self.criterion(logits, image, text, image_ids) if return_loss else None,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.T,
            image_embeds=image.image_embeds,
            text_embeds=text.text_embeds,
            image_hidden_states=image.hidden_states,
            text_hidden_states=text.hidden_states,
        )


def _features(item_output):
    """An `MPSMImageOutput` / `MPSMTextOutput` in the CLIP convention of `get_*_features`: `pooler_output` v̄ or t̄,
    `last_hidden_state` the nodes, `hidden_states` the KGID node states."""
    nodes = item_output.region_embeds if isinstance(item_output, MPSMImageOutput) else item_output.word_embeds
    global_feature = item_output.image_embeds if isinstance(item_output, MPSMImageOutput) else item_output.text_embeds
    return BaseModelOutputWithPooling(
        last_hidden_state=nodes, pooler_output=global_feature, hidden_states=item_output.hidden_states
    )


def chain_adjacency(attention_mask):
    """Fallback P_t: each word linked to its neighbours, plus self-loops, zero on padding. [T, L] -> [T, L, L]."""
    length = attention_mask.shape[1]
    band = torch.ones(length, length, device=attention_mask.device).triu(-1).tril(1)
    mask = attention_mask.float()
    return band * mask.unsqueeze(2) * mask.unsqueeze(1)


# MPSM*: the dis + dir ensemble --------------------------------------------------------------------------------------


class MPSMEnsembleModel(MPSMHubMixin, PreTrainedModel):
    """MPSM* (the paper's best): a `dis` and a `dir` MPSM whose scores are averaged. Saved as one checkpoint."""

    config_class = MPSMEnsembleConfig
    base_model_prefix = "mpsm_ensemble"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True  # the members' per-pair parts

    def __init__(self, config: MPSMEnsembleConfig):
        super().__init__(config)
        for name, member_config in config.member_configs.items():  # checkpoint keys "dis.…", "dir.…"
            self.add_module(name, MPSMModel(member_config))
        self.post_init()

    def members(self):
        """The member models by short name: {"dis": MPSMModel, "dir": MPSMModel}."""
        return {name: getattr(self, name) for name in self.config.member_configs}

    def _init_weights(self, module):
        MPSMPreTrainedModel._init_weights(next(iter(self.members().values())), module)

    @classmethod
    def from_members(cls, *models: MPSMModel, **named_models: MPSMModel):
        """
        Builds the ensemble from trained models, one per perspective of `PERSPECTIVES`: by short name
        (`from_members(dis=dis_model, dir=dir_model)`) or positionally in the table's order
        (`from_members(dis_model, dir_model)`). Each model's `config.similarity` must be its member's perspective.
        Their weights are copied.
        """
        arguments = cls._member_arguments(models, named_models)
        perspectives = {name: perspective for perspective, name in PERSPECTIVES.items()}  # "dis" -> "distance"
        for name, (argument, model) in arguments.items():
            if not isinstance(model, MPSMModel):
                raise ValueError(f"`{argument}` must be an MPSMModel, got {type(model).__name__}")
            if model.config.similarity != perspectives[name]:
                raise ValueError(f"`{argument}` is the {name} member and must have similarity="
                                 f"{perspectives[name]!r}, got similarity={model.config.similarity!r}")
        models = {name: model for name, (_, model) in arguments.items()}
        ensemble = cls(MPSMEnsembleConfig(members=list(models),
                                          **{f"{name}_config": m.config.to_dict() for name, m in models.items()}))
        for name, member in ensemble.members().items():
            member.load_state_dict(models[name].state_dict())
        return ensemble.to(next(iter(models.values())).device)

    @staticmethod
    def _member_arguments(models, named_models):
        """`from_members`' models by short name, each with the name of its argument for errors: {"dis": ("dis",
        model)} for `dis=model`, {"dis": ("dis_model", model)} for the first positional model."""
        names = list(PERSPECTIVES.values())
        if models and named_models:
            raise ValueError("`from_members` takes the models either positionally or by name, not both")
        if not named_models:
            if len(models) != len(names):
                raise ValueError(f"`from_members` takes {len(names)} models ({', '.join(n + '_model' for n in names)}"
                                 f", or by name: {', '.join(n + '=' for n in names)}), got {len(models)}")
            return {name: (f"{name}_model", model) for name, model in zip(names, models)}
        unknown = sorted(set(named_models) - set(names))
        missing = [name for name in names if name not in named_models]
        if unknown or missing:
            raise ValueError(f"`from_members` takes one model per member by name ({', '.join(n + '=' for n in names)})"
                             f"; unknown: {unknown}, missing: {missing}")
        return {name: (name, named_models[name]) for name in names}

    def check_image_inputs(self, region_features, boxes=None, region_mask=None, image_sizes=None):
        """`check_image_inputs` once for every member (they share the inputs, the config checks their sizes)."""
        first = next(iter(self.members().values()))
        return check_image_inputs(region_features, boxes, region_mask, image_sizes, first.config.img_dim,
                                  first.image_encoder.fc.weight.dtype)

    def check_text_inputs(self, input_ids, attention_mask=None, dependency_adjacency=None):
        """`check_text_inputs` once for every member (they share one vocabulary)."""
        first = next(iter(self.members().values()))
        return check_text_inputs(input_ids, attention_mask, dependency_adjacency, first.config.vocab_size)

    def encode_image(self, region_features, boxes=None, region_mask=None, image_sizes=None):
        """Per-image outputs of every member: an [`MPSMEnsembleItemOutput`] `{"dis": MPSMImageOutput, "dir": ...}`."""
        image = self.check_image_inputs(region_features, boxes, region_mask, image_sizes)
        return MPSMEnsembleItemOutput({name: member.encode_image(*image, inputs_checked=True)
                                       for name, member in self.members().items()})

    def encode_text(self, input_ids, attention_mask=None, dependency_adjacency=None):
        """Per-caption outputs of every member: an [`MPSMEnsembleItemOutput`] `{"dis": MPSMTextOutput, "dir": ...}`."""
        text = self.check_text_inputs(input_ids, attention_mask, dependency_adjacency)
        return MPSMEnsembleItemOutput({name: member.encode_text(*text, inputs_checked=True)
                                       for name, member in self.members().items()})

    def similarity(self, image, text):
        """Mean of the members' scores, [I, T]."""
        scores = [member.similarity(image[name], text[name]) for name, member in self.members().items()]
        return sum(scores) / len(scores)

    def get_image_features(self, region_features, boxes=None, region_mask=None, image_sizes=None,
                           output_hidden_states=None, return_dict=None) -> BaseModelOutputWithPooling | tuple:
        """The members' `get_image_features` side by side: `pooler_output` [I, 2d] (as `forward`'s `image_embeds`),
        `last_hidden_state` [I, n, 2d] and the `hidden_states` layer by layer."""
        output_hidden_states = _or_config(output_hidden_states, self.config, "output_hidden_states")
        image = self.check_image_inputs(region_features, boxes, region_mask, image_sizes)
        outputs = [_features(member.encode_image(*image, output_hidden_states=output_hidden_states,
                                                 inputs_checked=True)) for member in self.members().values()]
        return self._side_by_side(outputs, return_dict)

    def get_text_features(self, input_ids, attention_mask=None, dependency_adjacency=None, output_hidden_states=None,
                          return_dict=None) -> BaseModelOutputWithPooling | tuple:
        """The members' `get_text_features` side by side: `pooler_output` [T, 2d] (as `forward`'s `text_embeds`),
        `last_hidden_state` [T, L, 2d] and the `hidden_states` layer by layer."""
        output_hidden_states = _or_config(output_hidden_states, self.config, "output_hidden_states")
        text = self.check_text_inputs(input_ids, attention_mask, dependency_adjacency)
        outputs = [_features(member.encode_text(*text, output_hidden_states=output_hidden_states,
                                                inputs_checked=True)) for member in self.members().values()]
        return self._side_by_side(outputs, return_dict)

    def _side_by_side(self, outputs, return_dict):
        """The members' `BaseModelOutputWithPooling`s as one, each field concatenated along the features."""
        output = BaseModelOutputWithPooling(
            last_hidden_state=torch.cat([output.last_hidden_state for output in outputs], -1),
            pooler_output=torch.cat([output.pooler_output for output in outputs], -1),
            hidden_states=_states_side_by_side([output.hidden_states for output in outputs]),
        )
        return output if _or_config(return_dict, self.config, "return_dict") else output.to_tuple()

    def forward(self, input_ids=None, attention_mask=None, dependency_adjacency=None, region_features=None, boxes=None,
                region_mask=None, image_sizes=None, image_ids=None, return_loss=None, output_hidden_states=None,
                return_dict=None) -> MPSMOutput | tuple:
        """Scores with the mean of the members; the loss (when asked) is the sum of the members' losses; the embeddings
        and hidden states are the members' side by side. Arguments as in `MPSMModel.forward`."""
        if input_ids is None or region_features is None:
            raise _forward_needs_both(input_ids, region_features)
        output_hidden_states = _or_config(output_hidden_states, self.config, "output_hidden_states")
        image = self.check_image_inputs(region_features, boxes, region_mask, image_sizes)
        text = self.check_text_inputs(input_ids, attention_mask, dependency_adjacency)
        encode = dict(output_hidden_states=output_hidden_states, inputs_checked=True)
        outputs = [member.matching_output(member.encode_image(*image, **encode), member.encode_text(*text, **encode),
                                          image_ids, return_loss)
                   for member in self.members().values()]
        logits_per_image = sum(output.logits_per_image for output in outputs) / len(outputs)
        output = MPSMOutput(
            loss=sum(output.loss for output in outputs) if return_loss else None,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.T,
            image_embeds=torch.cat([output.image_embeds for output in outputs], -1),
            text_embeds=torch.cat([output.text_embeds for output in outputs], -1),
            image_hidden_states=_states_side_by_side([output.image_hidden_states for output in outputs]),
            text_hidden_states=_states_side_by_side([output.text_hidden_states for output in outputs]),
        )
        return output if _or_config(return_dict, self.config, "return_dict") else output.to_tuple()


def _states_side_by_side(members_states):
    """The members' hidden states (a tuple of [B, k, d] each, or None) concatenated along the features, state by
    state -> a tuple of [B, k, d * members], or None."""
    if members_states[0] is None:
        return None
    if len({len(states) for states in members_states}) > 1:
        raise ValueError(f"the ensemble's hidden states are its members' side by side, state by state, but its members "
                         f"have {[len(states) for states in members_states]} states (different KGID layers)")
    return tuple(torch.cat(states, -1) for states in zip(*members_states))
