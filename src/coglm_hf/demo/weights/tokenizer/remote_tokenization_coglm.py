"""Entry module of `tokenizer` for diffusers' remote-code loader (written by save_pretrained): it imports every file the component needs."""

from .tokenization_coglm import CogLMTokenizer  # noqa: F401
