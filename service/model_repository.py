"""The model repository: find, load, resolve and retire model versions.

``--models DIR`` holds one folder per model name, each holding numbered
version folders (the SavedModel contract, ``training/contract.py``). The
repository serves the newest good version of every model (``keep_versions``
newest when asked for more). A version takes traffic once it passed the
contract check (``training.check.check_version``, what ``textgen check`` runs)
and its ``Decoder`` (``service/decoder.py``) is warmed up. When polling, it
loads new versions, retires old or removed ones once their streams have ended,
and never serves a bad version (it is logged once, counted, and tried again
only when its folder changes).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import tensorflow as tf

from service import catalog
from service.config import XlaShapes
from service.decoder import Decoder, configure_devices
from service.metrics import ServingMetrics
from service.threads import NamedThread
from training.check import check_version, failure_reason
from training.contract import is_visible_model_name, list_versions
from training.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# Collections that may try to free an unloaded version before it is reported as leaked.
_UNLOAD_COLLECTIONS = 10


@dataclass(eq=False)
class LoadedModel:
    """One model version, loaded, checked and warmed up; what the engine runs (through ``decoder``)."""

    name: str
    version: int
    path: str
    tokenizer: Tokenizer
    info: dict
    vocab_size: int
    state_size: int
    decoder: Decoder = field(repr=False)
    loaded_at: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._streams = 0
        self._on_idle: Callable[[LoadedModel], None] | None = None

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def streams(self) -> int:
        """Streams submitted on this version that have not ended."""
        with self._lock:
            return self._streams

    def acquire(self) -> None:
        with self._lock:
            self._streams += 1

    def release(self) -> None:
        with self._lock:
            self._streams -= 1
            idle = self._streams == 0
            callback = self._on_idle
        if idle and callback is not None:
            callback(self)

    def retire(self, on_idle: Callable[[LoadedModel], None]) -> bool:
        """From now on, call ``on_idle(self)`` when the last stream ends; returns whether none is running now.

        When it returns True the caller acts on idleness itself: no release is coming to call back.
        """
        with self._lock:
            self._on_idle = on_idle
            return self._streams == 0


def load_model(
    name: str, version: int, path: str, warmup_batch_sizes: Iterable[int] = (1,), xla: XlaShapes | None = None
) -> LoadedModel:
    """Check one version folder against the contract, build its decoder and warm it up at every batch size.

    With ``xla``, the K-step decode is XLA-compiled for those shapes (each compiled here); a version
    whose ``step`` XLA cannot compile (a shape known only at run time, an op XLA lacks) decodes op
    by op instead, with a warning.

    Raises ``ContractError`` (or whatever TensorFlow raises for an unreadable
    SavedModel) with a message saying what is wrong.
    """
    checked = check_version(path)
    decoder = Decoder(checked, xla)
    sizes = set(warmup_batch_sizes) | {1}
    try:
        decoder.warm_up(sizes)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as exc:
        if xla is None:
            raise
        log.warning(
            "model %s version %d: XLA cannot compile its decode (%s); it decodes op by op",
            name,
            version,
            failure_reason(exc),
        )
        decoder = Decoder(checked)
        decoder.warm_up(sizes)
    return LoadedModel(
        name=name,
        version=version,
        path=path,
        tokenizer=checked.tokenizer,
        info=checked.info,
        vocab_size=checked.vocab_size,
        state_size=checked.state_size,
        decoder=decoder,
        loaded_at=time.time(),
    )


def folder_fingerprint(path: str) -> tuple:
    """What changes when a version folder changes: every file's relative path, size and mtime."""
    entries: list[tuple[str, int, int]] = []
    try:
        top = os.stat(path)
        entries.append((".", 0, top.st_mtime_ns))
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for fname in sorted(files):
                full = os.path.join(root, fname)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                entries.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
            for dname in dirs:
                st = os.stat(os.path.join(root, dname))
                entries.append((os.path.relpath(os.path.join(root, dname), path) + "/", 0, st.st_mtime_ns))
    except OSError:
        pass
    return tuple(entries)


class ModelRepository:
    """Every loaded model version, and the polling that keeps them in step with the folder.

    ``load_all`` (and each poll) is blocking TensorFlow work: call it from a
    worker thread, never from the event loop. ``resolve`` and ``loaded`` are
    cheap and thread-safe.
    """

    def __init__(
        self,
        models_dir: str,
        *,
        default_model: str | None = None,
        metrics: ServingMetrics | None = None,
        poll_seconds: float = 0.0,
        keep_versions: int = 1,
        warmup_batch_sizes: Iterable[int] = (1, 8, 64),
        xla: XlaShapes | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep_versions}")
        self.models_dir = models_dir
        self.default_model = default_model
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.keep_versions = keep_versions
        self.warmup_batch_sizes = tuple(warmup_batch_sizes)
        self.xla = xla
        self.on_change = on_change
        self.device = configure_devices()
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()  # one scan at a time
        self._serving: dict[str, dict[int, LoadedModel]] = {}  # taking traffic
        self._retiring: dict[int, LoadedModel] = {}  # id -> model: no new traffic, streams still running
        self._failed: dict[tuple[str, int], tuple] = {}  # (name, version) -> folder fingerprint when it failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._scan_error = ""
        # Unloaded versions whose memory has not been seen to go yet: their loaded SavedModel, and
        # how many collections have not freed it (a poll collects while this list is not empty).
        self._unloaded: list[tuple[str, weakref.ref, int]] = []

    # ------------------------------------------------------------ queries
    def loaded(self) -> list[LoadedModel]:
        """Versions taking traffic, by model name then version."""
        with self._lock:
            return [self._serving[n][v] for n in sorted(self._serving) for v in sorted(self._serving[n])]

    def has_model(self) -> bool:
        with self._lock:
            return any(self._serving.values())

    def can_serve(self) -> bool:
        """Readiness: the default model has a version serving (without a default model: any model has)."""
        with self._lock:
            return catalog.can_serve(self._serving, self.default_model)

    def why_not_serving(self) -> str:
        """What ``can_serve`` misses, for the log."""
        with self._lock:
            return catalog.why_not_serving(self._serving, self.default_model, self.models_dir)

    def retiring(self) -> list[LoadedModel]:
        """Versions that take no new traffic but still have streams running."""
        with self._lock:
            return list(self._retiring.values())

    def resolve(self, name: str, version: int) -> LoadedModel:
        """The model for a request: ``""`` is the default model, version 0 the newest loaded."""
        with self._lock:
            return catalog.resolve_version(self._serving, name, version, self.default_model, self.models_dir)

    # ------------------------------------------------------------ loading
    def load_all(self) -> None:
        """Scan the repository once and bring the loaded versions in step with it (blocking)."""
        self.poll()

    def poll(self) -> bool:
        """One scan: load new good versions, retire old and removed ones. Returns whether anything changed."""
        with self._scan_lock:
            changed = False
            on_disk = self._scan()
            # Names on disk first, names gone after: a renamed model folder loads under its new
            # name before the old one retires, so there is no moment with neither.
            gone = sorted(set(self._serving) - set(on_disk))
            for name in [*sorted(on_disk), *gone]:
                if self._stop.is_set():
                    break  # stopping: no more loads
                changed |= self._sync_model(name, on_disk.get(name, []))
        if changed and self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("the repository's on_change callback failed")
        with self._lock:
            unloaded, self._unloaded = self._unloaded, []
        if changed or unloaded:
            self._collect_and_freeze(unloaded)
        return changed

    def _collect_and_freeze(self, unloaded: list[tuple[str, weakref.ref, int]]) -> None:
        """Free what unloaded versions left, then freeze what the loaded ones hold; ``unloaded``
        (taken off ``_unloaded``) goes back there while a version is still alive.

        An unloaded version's memory goes with its reference cycles (TF's function graphs), so
        collect. Then freeze: the loaded models' hundreds of thousands of Python objects live as
        long as the models, yet every full collection would walk them all (0.2 s with the GIL
        held, measured with the benchmark model: a stall of every stream). A version still
        referenced when its unload is collected (a request handler finishing) would have its
        cycles frozen with the rest, so the next polls thaw and collect again until it is gone,
        at most ``_UNLOAD_COLLECTIONS`` times.
        """
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        alive: list[tuple[str, weakref.ref, int]] = []
        for what, ref, tries in unloaded:
            if ref() is None:
                continue
            if tries + 1 >= _UNLOAD_COLLECTIONS:
                log.warning("%s is still referenced after %d collections; its memory stays", what, tries + 1)
                continue
            alive.append((what, ref, tries + 1))
        with self._lock:
            self._unloaded.extend(alive)  # after any the engine thread's _unload added meanwhile

    def _scan(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        try:
            names = os.listdir(self.models_dir)
        except OSError as exc:
            if str(exc) != self._scan_error:  # logged once, not every poll
                log.warning("cannot list the model repository %r: %s", self.models_dir, exc)
            self._scan_error = str(exc)
            return out
        self._scan_error = ""
        for name in names:
            base = os.path.join(self.models_dir, name)
            if is_visible_model_name(name) and os.path.isdir(base):
                out[name] = list_versions(base)
        return out

    def _sync_model(self, name: str, versions: list[int]) -> bool:
        changed = False
        with self._lock:
            serving = dict(self._serving.get(name, {}))
        keep: list[int] = []
        for version in sorted(versions, reverse=True):
            if len(keep) >= self.keep_versions:
                break
            if version in serving:
                keep.append(version)
                continue
            path = os.path.join(self.models_dir, name, str(version))
            fingerprint = folder_fingerprint(path)
            if self._failed.get((name, version)) == fingerprint:
                continue  # known bad and unchanged
            began = time.monotonic()
            try:
                model = load_model(name, version, path, self.warmup_batch_sizes, self.xla)
            except Exception as exc:  # a bad version never serves; any failure is reported, none escapes
                self._failed[(name, version)] = fingerprint
                reason = failure_reason(exc)
                log.error("model %s version %d at %s cannot be served: %s", name, version, path, reason)
                if self.metrics is not None:
                    self.metrics.model_load_failures.labels(model=name).inc()
                continue
            self._failed.pop((name, version), None)
            log.info(
                "loaded model %s version %d (vocab %d, state %d) in %.2fs",
                name,
                version,
                model.vocab_size,
                model.state_size,
                time.monotonic() - began,
            )
            with self._lock:
                self._serving.setdefault(name, {})[version] = model
            if self.metrics is not None:
                self.metrics.model_loaded.labels(model=name, version=str(version)).set(1)
            serving[version] = model
            keep.append(version)
            changed = True
        for version, model in serving.items():
            if version not in keep:
                self._retire(model)
                changed = True
        for key in [k for k in self._failed if k[0] == name and k[1] not in versions]:
            del self._failed[key]
        return changed

    def _retire(self, model: LoadedModel) -> None:
        with self._lock:
            versions = self._serving.get(model.name, {})
            versions.pop(model.version, None)
            if not versions:
                self._serving.pop(model.name, None)
            self._retiring[id(model)] = model
        if self.metrics is not None:
            try:
                # With frontend processes, a sample stays in the multiprocess files: it reads 0.
                self.metrics.model_loaded.labels(model=model.name, version=str(model.version)).set(0)
                self.metrics.model_loaded.remove(model.name, str(model.version))
            except KeyError:
                pass
        log.info("model %s version %d takes no new traffic; unloading once its streams end", model.name, model.version)
        if model.retire(self._unload):
            self._unload(model)

    def _unload(self, model: LoadedModel) -> None:
        with self._lock:
            if self._retiring.pop(id(model), None) is None:
                return
        # The repository drops its reference; the engine dropped its batch when
        # the last stream ended. The memory goes when the last reference does
        # (the poll thread runs the cycle collector for TF's function graphs).
        with self._lock:
            held = model.decoder.checked.saved  # the SavedModel holds the graphs
            self._unloaded.append((f"model {model.name} version {model.version}", weakref.ref(held), 0))
        log.info("unloaded model %s version %d", model.name, model.version)

    # ------------------------------------------------------------ polling
    def start_polling(self) -> None:
        """Poll every ``poll_seconds`` in a daemon thread (no-op when ``poll_seconds`` <= 0)."""
        if self.poll_seconds <= 0 or self._thread is not None:
            return
        self._thread = NamedThread(target=self._poll_loop, name="textgen-poll", daemon=True)
        self._thread.start()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:
                log.exception("polling the model repository failed")

    def stop(self) -> None:
        """Stop polling (waits for a scan in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
