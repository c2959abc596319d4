"""Data for MPSM: the SCAN reader (`scan`), the Arrow tables and `load_split` (`arrow`), Hub dataset folders (`hub`),
training and evaluation batches (`collate`), the word vocabulary (`vocabulary`) and the synthetic scenes
(`synthetic`, `python -m modeling_mpsm.data.synthetic`). Data flows one way: files -> `ScanSplit` -> Arrow rows ->
batches of the processor's outputs; nothing here imports the model, the scoring or the training code."""

from .arrow import convert_to_arrow, dataset_name, load_split
from .collate import CaptionPairDataset, MPSMCollator, caption_batches, image_batches
from .scan import ScanSplit


__all__ = ["ScanSplit", "convert_to_arrow", "dataset_name", "load_split", "CaptionPairDataset", "MPSMCollator",
           "caption_batches", "image_batches"]
