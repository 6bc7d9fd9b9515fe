"""The optimiser of a run: Adam or AdamW, with the gradient clipping the config names.

``--weight-decay 0`` is Adam, anything above is AdamW (decoupled decay, not on
biases). ``--clipping global`` scales all gradients together when their joint
norm passes ``--clip-norm``; ``per-variable`` clips each variable's gradient on
its own (the presets' ``Adam(clipnorm=5.0)``).
"""

from __future__ import annotations

from typing import Any

import keras

from training.config import TrainConfig


def make_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
    clip: dict[str, Any] = {}
    if config.clipping == "global":
        clip["global_clipnorm"] = config.clip_norm
    elif config.clipping == "per-variable":
        clip["clipnorm"] = config.clip_norm
    if config.weight_decay > 0:
        optimizer = keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay, **clip)
        optimizer.exclude_from_weight_decay(var_names=["bias"])
        return optimizer
    return keras.optimizers.Adam(config.learning_rate, **clip)
