"""coglm_hf: CogView2 for the Hugging Face stack.

The package imports its names on first use, so that ``import coglm_hf`` and ``coglm-hf --help`` load neither torch
nor Transformers. The first name taken from it (``from coglm_hf import CogView2Pipeline``, ``coglm_hf.CogLMConfig``)
or ``coglm_hf.register_auto_classes()`` registers the CogLM models with the Transformers Auto classes, so that
``AutoModel.from_pretrained(dir)`` works without ``trust_remote_code``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "masked_regions_mask": "attention_masks",
    "CogLMConfig": "configuration_coglm",
    "CogLMDirectSRConfig": "configuration_coglm",
    "CogLMIterativeSRConfig": "configuration_coglm",
    "convert_icetk": "conversion_icetk",
    "IceVQImageProcessor": "image_processing_icevq",
    "load_local_attention_kernel": "local_attention",
    "local_attention_2d": "local_attention",
    "set_local_attention_backend": "local_attention",
    "CogLMForMaskedRegions": "modeling_coglm",
    "CogLMModel": "modeling_coglm",
    "CogLMPreTrainedModel": "modeling_coglm",
    "CogLMForDirectSuperResolution": "modeling_coglm_sr",
    "CogLMForIterativeSuperResolution": "modeling_coglm_sr",
    "IceVQModel": "modeling_icevq",
    "CogView2Pipeline": "pipeline_cogview2",
    "CogView2PipelineOutput": "pipeline_cogview2",
    "CogView2InpaintPipeline": "pipeline_cogview2_inpaint",
    "CogView2CaptionPipeline": "pipeline_cogview2_caption",
    "CogView2CaptionPipelineOutput": "pipeline_cogview2_caption",
    "LOPAR_ORDER_MATRIX": "sampling",
    "LOPAR_TOP_K": "sampling",
    "ClusterSamplingLogitsProcessor": "sampling",
    "cluster_sample": "sampling",
    "lopar_regeneration_mask": "sampling",
    "top_k_sample": "sampling",
    "CogView2Scheduler": "scheduling_cogview2",
    "STYLE_TEMPLATES": "tokenization_coglm",
    "CogLMTokenizer": "tokenization_coglm",
}
_registered = False


def register_auto_classes() -> None:
    """Register the CogLM configs, models and tokenizer with the Transformers Auto classes (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

    from .configuration_coglm import CogLMConfig, CogLMDirectSRConfig, CogLMIterativeSRConfig
    from .modeling_coglm import CogLMForMaskedRegions, CogLMModel
    from .modeling_coglm_sr import CogLMForDirectSuperResolution, CogLMForIterativeSuperResolution
    from .tokenization_coglm import CogLMTokenizer

    for config in (CogLMConfig, CogLMDirectSRConfig, CogLMIterativeSRConfig):
        AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(CogLMConfig, CogLMModel, exist_ok=True)
    AutoModelForMaskedLM.register(CogLMConfig, CogLMForMaskedRegions, exist_ok=True)
    AutoModel.register(CogLMDirectSRConfig, CogLMForDirectSuperResolution, exist_ok=True)
    AutoModel.register(CogLMIterativeSRConfig, CogLMForIterativeSuperResolution, exist_ok=True)
    AutoTokenizer.register(CogLMConfig, fast_tokenizer_class=CogLMTokenizer, exist_ok=True)
    _registered = True


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["register_auto_classes", *_EXPORTS]
