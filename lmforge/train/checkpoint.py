"""Moved to lmforge.checkpoint (inference must not import the training package); kept as a re-export."""
from lmforge.checkpoint import *  # noqa: F401,F403
from lmforge.checkpoint import _state_for_save, _verify  # noqa: F401
