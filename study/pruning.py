"""Deprecated: import from ``prunelab.prune`` (the prune API and the mask library).

Kept because docs/plugins.md told third-party plugins to import the mask helpers from
``prunelab.pruning`` before the stage subpackages existed; remove after one release.
"""

import warnings

from prunelab.prune import *  # noqa: F403
from prunelab.prune import __all__  # noqa: F401

warnings.warn("prunelab.pruning is deprecated: import from prunelab.prune", DeprecationWarning, stacklevel=2)
