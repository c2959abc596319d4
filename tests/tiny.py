"""The tiny model and processor several test modules build (a 13-word vocabulary, embed 16, one KGID layer)."""

import torch

from modeling_mpsm import MPSMConfig, MPSMEnsembleModel, MPSMModel, MPSMProcessor
from modeling_mpsm.data.vocabulary import SPECIAL_TOKENS, build_tokenizer


WORDS = SPECIAL_TOKENS + "a man dog red ball runs on the grass".split()
TINY = dict(img_dim=16, vocab_size=len(WORDS), word_dim=8, embed_size=16, sim_dim=8, kgid_layers=1, srgr_steps=1)


def tiny_models():
    """A dis model and the ensemble of it with a dir model, in eval mode, seeded."""
    torch.manual_seed(0)
    dis = MPSMModel(MPSMConfig(**TINY)).eval()
    dir_ = MPSMModel(MPSMConfig(similarity="direction", **TINY)).eval()
    return dis, MPSMEnsembleModel.from_members(dis, dir_).eval()


def tiny_processor():
    return MPSMProcessor(build_tokenizer({word: i for i, word in enumerate(WORDS)}), num_regions=4,
                         dependency_parser="fallback")
