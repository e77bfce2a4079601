from prunelab.testing import tiny_model_dir  # noqa: F401  (a tiny random model folder, built offline)
