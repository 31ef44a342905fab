"""Entry module of `image_tokenizer` for diffusers' remote-code loader (written by save_pretrained): it imports every file the component needs."""

from .modeling_icevq import IceVQModel  # noqa: F401
