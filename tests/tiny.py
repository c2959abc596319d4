"""What several test modules share: the tiny model and processor (a 13-word vocabulary, embed 16, one KGID layer), a
tiny synthetic data set with a processor of its vocabulary, and the repository's scripts loaded as modules."""

import importlib.util
from pathlib import Path

import torch

from modeling_mpsm import MPSMConfig, MPSMEnsembleModel, MPSMModel, MPSMProcessor
from modeling_mpsm.data import load_split, synthetic
from modeling_mpsm.data.vocabulary import SPECIAL_TOKENS, build_tokenizer, build_vocabulary
from modeling_mpsm.processing_mpsm import get_dependency_parser


REPO = Path(__file__).resolve().parent.parent
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


def tiny_scenes(data_dir, num_test, feature_dim):
    """Synthetic scenes (seed 2, 4 / 2 / `num_test` images, 8 regions) in `data_dir`: their test split and a processor
    of the test captions' vocabulary, with the fallback parser."""
    synthetic.generate(str(data_dir), seed=2, num_train=4, num_dev=2, num_test=num_test, feature_dim=feature_dim,
                       num_regions=8)
    dataset = load_split(str(data_dir), "test", parser=get_dependency_parser("fallback"))
    vocabulary = build_vocabulary([c for captions in dataset["captions"] for c in captions], min_count=1)
    return dataset, MPSMProcessor(build_tokenizer(vocabulary), num_regions=8, dependency_parser="fallback")


def load_script(path):
    """The script at `path` (relative to the repository, e.g. "examples/train_mpsm.py") imported as a module."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
