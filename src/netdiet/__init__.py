"""netdiet: what a neural network really costs, and how to make it cheaper."""
__version__ = "0.1.0"

from netdiet.api import *  # noqa: E402,F401,F403
from netdiet.api import __all__  # noqa: E402,F401
