"""Visual explanations of MPSM: the text-guided attention of each word over the region boxes (the paper's Figure 4)."""

import math

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


PANEL_INCHES = 2.5
DPI = 100


def figure_size(num_words, columns=4):
    """Pixel size (width, height) of the PNG `plot_word_region_attention` draws for a caption of `num_words` tokens."""
    columns = min(columns, num_words)
    rows = math.ceil(num_words / columns)
    return round(columns * PANEL_INCHES * DPI), round(rows * PANEL_INCHES * DPI)


@torch.no_grad()
def word_region_attention(model, processor_or_inputs, caption, region_features, boxes=None, image_size=None):
    """
    Text-guided attention of each word of `caption` over the regions of one image (step 5 of the model).

    Args:
        model ([`MPSMModel`] or [`MPSMEnsembleModel`]; the ensemble explains with its `dis` member).
        processor_or_inputs: an [`MPSMProcessor`], or the caption's text inputs (dict with `input_ids` [1, L], ...).
        caption (`str`): the caption (its tokens label the panels when there is no processor).
        region_features ([n, f]), boxes ([n, 4] pixels with `image_size`, or [0, 1]), image_size ((w, h)).
    Returns:
        (words: `list[str]`, attention `torch.FloatTensor` [L, n]).
    """
    model = next(iter(model.members().values()))  # an ensemble explains with its first member (dis)
    region_features = torch.as_tensor(region_features, dtype=torch.float32)[None]
    boxes = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32)[None]
    sizes = None if image_size is None else torch.as_tensor(image_size, dtype=torch.float32)[None]
    if hasattr(processor_or_inputs, "tokenizer"):
        text_inputs = processor_or_inputs(text=[caption])
        words = processor_or_inputs.tokenizer.convert_ids_to_tokens(text_inputs["input_ids"][0].tolist())
    else:
        text_inputs = processor_or_inputs
        words = ["<start>", *caption.lower().split(), "<end>"]
    device = next(model.parameters()).device
    image = model.encode_image(region_features.to(device), None if boxes is None else boxes.to(device),
                               image_sizes=None if sizes is None else sizes.to(device))
    text = model.encode_text(**{k: v.to(device) for k, v in text_inputs.items() if isinstance(v, torch.Tensor)})
    length = int(text.attention_mask[0].sum())
    attention = model.text_region_attention(image, text)[0, 0, :length].float().cpu()
    words = (words + ["?"] * length)[:length]
    return words, attention


def plot_word_region_attention(model, processor_or_inputs, caption, region_features, boxes, image_size, path,
                               top_regions=3, image=None, columns=4):
    """
    Draws, per word, the `top_regions` boxes the word attends to most, with opacity proportional to the attention
    (a grid of panels, one per word, as Figure 4 of the paper), and saves it as a PNG of `figure_size(L, columns)`
    pixels.

    Args:
        model, processor_or_inputs, caption, region_features ([n, f]): see `word_region_attention`.
        boxes ([n, 4]): (x1, y1, x2, y2) in pixels of `image_size`, or in [0, 1] when `image_size` is None.
        image_size ((w, h), *optional*): the image size in pixels.
        path (`str`): where the PNG goes.
        image (`array` [h, w, 3], *optional*): the picture, drawn under the boxes.
    Returns:
        `torch.FloatTensor` [L, n]: the attention drawn.
    """
    words, attention = word_region_attention(model, processor_or_inputs, caption, region_features, boxes, image_size)
    return draw_word_region_attention(words, attention, boxes, image_size, path, top_regions, image, columns)


def draw_word_region_attention(words, attention, boxes, image_size, path, top_regions=3, image=None, columns=4):
    """
    The drawing of `plot_word_region_attention` from a computed attention, e.g. the `words` and `attention` of a result
    of the "mpsm-retrieval" pipeline called with `return_attention=True`.

    Args:
        words (`list[str]`): the L tokens of the caption. attention ([L, n]): each word's attention over the regions.
        boxes, image_size, path, top_regions, image, columns: see `plot_word_region_attention`.
    Returns:
        `torch.FloatTensor` [L, n]: the attention drawn.
    """
    attention = torch.as_tensor(attention, dtype=torch.float32)
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if attention.shape[0] != len(words) or attention.shape[1] > len(boxes):
        raise ValueError(f"`attention` must be [{len(words)} words, at most {len(boxes)} regions (boxes)], "
                         f"got {tuple(attention.shape)}")
    width, height = image_size if image_size is not None else (1.0, 1.0)
    columns = min(columns, len(words))
    rows = math.ceil(len(words) / columns)
    figure = Figure(figsize=(columns * PANEL_INCHES, rows * PANEL_INCHES), dpi=DPI)  # Agg canvas, no pyplot state
    axes = figure.subplots(rows, columns, squeeze=False)
    for panel, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if panel >= len(words):
            ax.axis("off")
            continue
        if image is not None:
            ax.imshow(image, extent=(0, width, height, 0))
        else:
            ax.set_facecolor("0.85")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        weights = attention[panel]
        for region in weights.topk(min(top_regions, len(weights))).indices.tolist():
            x1, y1, x2, y2 = boxes[region].tolist()
            alpha = float(weights[region] / weights.max().clamp_min(1e-8))
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor="red", alpha=0.5 * alpha,
                                   edgecolor="red", linewidth=2))
        ax.set_title(f"{words[panel]} ({float(weights.max()):.2f})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return attention
