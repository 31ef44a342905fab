"""Entry module of `scheduler` for diffusers' remote-code loader (written by save_pretrained): it imports every file the component needs."""

from .sampling import *  # noqa: F401,F403
from .scheduling_cogview2 import CogView2Scheduler  # noqa: F401
