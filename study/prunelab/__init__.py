"""prunelab: what can this model lose, and what does it cost?

The core (this package, the ``study/`` folder) holds the plugin registry, model handling,
the one batched scoring/generation engine, the runner and the artifacts. Strategies and
evaluators are pluggy plugins (``plugins/`` holds the built-in ones).
"""

__version__ = "0.1.0"
