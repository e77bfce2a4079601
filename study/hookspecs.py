"""Deprecated: import from ``prunelab.plugin`` (the hook specs and every type a plugin needs).

Kept because docs/plugins.md told third-party plugins to write ``from prunelab.hookspecs import
Strategy, hookimpl`` before the stage subpackages existed; remove after one release.
"""

import warnings

from prunelab.plugin import *  # noqa: F403
from prunelab.plugin import __all__  # noqa: F401

warnings.warn("prunelab.hookspecs is deprecated: import from prunelab.plugin", DeprecationWarning, stacklevel=2)
