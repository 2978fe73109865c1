"""Training presets: each module's ``get_config()`` returns an ml_collections.ConfigDict for
``experiments.train`` (``--config=experiments/configs/<name>.py``); the keys are documented in
``experiments.train_lib.default_config``."""
