"""Choose the tf.distribute strategy from the environment, before any other TensorFlow work.

* ``TF_CONFIG`` naming more than one task (chief + workers): ``MultiWorkerMirroredStrategy``;
  the chief (the ``chief`` task, else worker 0) is the one that writes checkpoints,
  TensorBoard logs and the export;
* several local GPUs: ``MirroredStrategy``;
* otherwise the default strategy on the one device there is.

GPUs get memory growth (so a trainer shares the card), and ``mixed_float16``
is switched on only where a GPU runs it; on a CPU the request is ignored with a
warning, since float16 there is slower and less precise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

log = logging.getLogger("textgen.train")


class ClusterError(ValueError):
    """TF_CONFIG that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class ClusterSpec:
    """What TF_CONFIG says about this process: how many workers, and which one it is."""

    num_workers: int = 1
    task_type: str = "worker"
    task_index: int = 0
    has_chief_task: bool = False

    @property
    def is_chief(self) -> bool:
        if self.has_chief_task:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def multi_worker(self) -> bool:
        return self.num_workers > 1


def parse_tf_config(env: Mapping[str, str]) -> ClusterSpec:
    raw = env.get("TF_CONFIG", "").strip()
    if not raw:
        return ClusterSpec()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ClusterError(f"TF_CONFIG is not valid JSON: {exc}") from exc
    cluster = data.get("cluster") or {}
    task = data.get("task") or {}
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise ClusterError("TF_CONFIG must hold objects 'cluster' and 'task'")
    workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    task_type = str(task.get("type", "worker"))
    try:
        task_index = int(task.get("index", 0))
    except (TypeError, ValueError):
        raise ClusterError(f"TF_CONFIG task index must be an integer, got {task.get('index')!r}") from None
    if workers > 1 and task_type not in ("chief", "worker"):
        raise ClusterError(f"TF_CONFIG task type must be 'chief' or 'worker' for training, got {task_type!r}")
    return ClusterSpec(
        num_workers=max(workers, 1), task_type=task_type, task_index=task_index, has_chief_task="chief" in cluster
    )


@dataclass(frozen=True)
class Placement:
    """The strategy chosen, described for logs and model.json."""

    strategy: Any  # tf.distribute.Strategy
    name: str
    devices: tuple[str, ...]
    cluster: ClusterSpec
    mixed_precision: bool

    @property
    def is_chief(self) -> bool:
        return self.cluster.is_chief

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "devices": list(self.devices),
            "num_workers": self.cluster.num_workers,
            "replicas": int(self.strategy.num_replicas_in_sync),
            "mixed_precision": self.mixed_precision,
        }


def choose_strategy(env: Mapping[str, str], *, mixed_precision: bool = False) -> Placement:
    """Pick and create the strategy (call once, first thing, before building any tensor)."""
    cluster = parse_tf_config(env)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised (a second run in one process)
            pass
    strategy: Any
    if cluster.multi_worker:
        strategy, name = tf.distribute.MultiWorkerMirroredStrategy(), "MultiWorkerMirroredStrategy"
    elif len(gpus) > 1:
        strategy, name = tf.distribute.MirroredStrategy(), "MirroredStrategy"
    else:
        strategy, name = tf.distribute.get_strategy(), "DefaultStrategy"  # one device
    devices = tuple(d.name for d in gpus) or ("/physical_device:CPU:0",)
    use_mixed = bool(mixed_precision and gpus)
    if mixed_precision and not gpus:
        log.warning("--mixed-precision needs a GPU; none found, training in float32")
    keras.mixed_precision.set_global_policy("mixed_float16" if use_mixed else "float32")
    placement = Placement(strategy=strategy, name=name, devices=devices, cluster=cluster, mixed_precision=use_mixed)
    log.info(
        "strategy %s, %d replica(s), devices %s, worker %d of %d%s, %s",
        name,
        strategy.num_replicas_in_sync,
        ", ".join(devices),
        cluster.task_index,
        cluster.num_workers,
        " (chief)" if cluster.is_chief else "",
        "mixed_float16" if use_mixed else "float32",
    )
    return placement
