"""Entry module of `itersr_model` for diffusers' remote-code loader (written by save_pretrained): it imports every file the component needs."""

from .attention_masks import *  # noqa: F401,F403
from .configuration_coglm import *  # noqa: F401,F403
from .local_attention import *  # noqa: F401,F403
from .modeling_coglm import *  # noqa: F401,F403
from .modeling_coglm_sr import CogLMForIterativeSuperResolution  # noqa: F401
