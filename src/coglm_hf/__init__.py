"""coglm_hf: CogView2 for the Hugging Face stack.

Importing the package registers the CogLM models with the Transformers Auto classes, so
``AutoModel.from_pretrained(dir)`` works without ``trust_remote_code`` once coglm_hf is installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

from .attention_masks import masked_regions_mask
from .configuration_coglm import CogLMConfig, CogLMDirectSRConfig, CogLMIterativeSRConfig
from .conversion_icetk import convert_icetk
from .image_processing_icevq import IceVQImageProcessor
from .local_attention import load_local_attention_kernel, local_attention_2d, set_local_attention_backend
from .modeling_coglm import CogLMForMaskedRegions, CogLMModel, CogLMPreTrainedModel
from .modeling_coglm_sr import CogLMForDirectSuperResolution, CogLMForIterativeSuperResolution
from .modeling_icevq import IceVQModel
from .pipeline_cogview2 import CogView2Pipeline, CogView2PipelineOutput
from .pipeline_cogview2_inpaint import CogView2InpaintPipeline
from .sampling import (
    LOPAR_ORDER_MATRIX,
    LOPAR_TOP_K,
    ClusterSamplingLogitsProcessor,
    cluster_sample,
    lopar_regeneration_mask,
    top_k_sample,
)
from .scheduling_cogview2 import CogView2Scheduler
from .tokenization_coglm import STYLE_TEMPLATES, CogLMTokenizer

__version__ = "0.1.0"

AutoConfig.register(CogLMConfig.model_type, CogLMConfig, exist_ok=True)
AutoConfig.register(CogLMDirectSRConfig.model_type, CogLMDirectSRConfig, exist_ok=True)
AutoConfig.register(CogLMIterativeSRConfig.model_type, CogLMIterativeSRConfig, exist_ok=True)
AutoModel.register(CogLMConfig, CogLMModel, exist_ok=True)
AutoModelForMaskedLM.register(CogLMConfig, CogLMForMaskedRegions, exist_ok=True)
AutoModel.register(CogLMDirectSRConfig, CogLMForDirectSuperResolution, exist_ok=True)
AutoModel.register(CogLMIterativeSRConfig, CogLMForIterativeSuperResolution, exist_ok=True)
AutoTokenizer.register(CogLMConfig, fast_tokenizer_class=CogLMTokenizer, exist_ok=True)

__all__ = [
    "CogView2InpaintPipeline",
    "CogView2Pipeline",
    "CogView2PipelineOutput",
    "load_local_attention_kernel",
    "local_attention_2d",
    "set_local_attention_backend",
    "STYLE_TEMPLATES",
    "CogLMTokenizer",
    "IceVQImageProcessor",
    "IceVQModel",
    "convert_icetk",
    "LOPAR_ORDER_MATRIX",
    "LOPAR_TOP_K",
    "ClusterSamplingLogitsProcessor",
    "CogView2Scheduler",
    "cluster_sample",
    "lopar_regeneration_mask",
    "top_k_sample",
    "CogLMConfig",
    "CogLMDirectSRConfig",
    "CogLMForDirectSuperResolution",
    "CogLMForIterativeSuperResolution",
    "CogLMForMaskedRegions",
    "CogLMIterativeSRConfig",
    "CogLMModel",
    "CogLMPreTrainedModel",
    "masked_regions_mask",
]
