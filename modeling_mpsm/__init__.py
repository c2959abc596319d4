"""modeling_mpsm: MPSM (UAI 2022) fine-grained image-text retrieval as a Hugging Face model package."""

from transformers import AutoConfig, AutoModel

from .configuration_mpsm import MPSMConfig, MPSMEnsembleConfig
from .modeling_mpsm import (
    MPSMEnsembleItemOutput,
    MPSMEnsembleModel,
    MPSMImageOutput,
    MPSMModel,
    MPSMOutput,
    MPSMTextOutput,
)

MPSMConfig.register_for_auto_class()
MPSMEnsembleConfig.register_for_auto_class()
MPSMModel.register_for_auto_class("AutoModel")
MPSMEnsembleModel.register_for_auto_class("AutoModel")
AutoConfig.register("mpsm", MPSMConfig, exist_ok=True)
AutoConfig.register("mpsm_ensemble", MPSMEnsembleConfig, exist_ok=True)
AutoModel.register(MPSMConfig, MPSMModel, exist_ok=True)
AutoModel.register(MPSMEnsembleConfig, MPSMEnsembleModel, exist_ok=True)

from .processing_mpsm import MPSMProcessor  # registers itself for AutoProcessor

# importing the pipeline registers the "mpsm-retrieval" task with transformers' `pipeline()` in this process too
from .pipeline_mpsm import MPSMRetrievalPipeline

# importing publishing gives the models' `push_to_hub` the complete repository (card, processor) of the package
from . import publishing  # noqa: F401

__all__ = [
    "MPSMConfig",
    "MPSMEnsembleConfig",
    "MPSMModel",
    "MPSMEnsembleModel",
    "MPSMOutput",
    "MPSMImageOutput",
    "MPSMTextOutput",
    "MPSMEnsembleItemOutput",
    "MPSMProcessor",
    "MPSMRetrievalPipeline",
]
