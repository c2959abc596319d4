"""modeling_mpsm: MPSM (UAI 2022) fine-grained image-text retrieval as a Hugging Face model package."""

from transformers import AutoConfig, AutoModel

from .configuration_mpsm import MPSMConfig, MPSMEnsembleConfig
from .modeling_mpsm import (
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

# importing the pipeline registers the "mpsm-retrieval" task with transformers' `pipeline()` in this process too
from .pipeline_mpsm import MPSMRetrievalPipeline
from .processing_mpsm import MPSMProcessor

MPSMProcessor.register_for_auto_class()

__all__ = [
    "MPSMConfig",
    "MPSMEnsembleConfig",
    "MPSMModel",
    "MPSMEnsembleModel",
    "MPSMOutput",
    "MPSMImageOutput",
    "MPSMTextOutput",
    "MPSMProcessor",
    "MPSMRetrievalPipeline",
]
