"""prunelab's built-in plugins: one module per evaluator and per pruning strategy.

Each module is registered under the ``prunelab`` entry-point group in pyproject.toml, exactly as a
third-party plugin package would register its own modules.
"""
