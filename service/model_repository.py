"""The model repository: find, load, check, warm up, resolve and retire model versions.

``--models DIR`` holds one folder per model name, each holding numbered
version folders (the SavedModel contract, docs/contract.md). The repository
serves the newest good version of every model (``keep_versions`` newest when
asked for more), checks each version against the contract and warms it up
before it takes traffic, and, when polling, loads new versions, retires old or
removed ones once their streams have ended, and never serves a bad version (it
is logged once, counted, and tried again only when its folder changes).

Each ``LoadedModel`` carries ONE ``tf.function`` (``decode``) that runs the
model's ``step`` signature and the sampler together, so logits never leave the
device, plus ``prefill_sample`` (the ``prefill`` signature and the sampler).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from service.metrics import ServingMetrics
from training.sampler import SAMPLER_SIGNATURE, sample
from training.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TOKENIZER_ASSET = "tokenizer.json"
MODEL_ASSET = "model.json"
# Expected signature inputs and outputs: name -> (dtype, rank).
STEP_INPUTS = {"tokens": (tf.int32, 1), "state": (tf.float32, 2)}
PREFILL_INPUTS = {"tokens": (tf.int32, 2), "lengths": (tf.int32, 1)}
OUTPUTS = {"logits": (tf.float32, 2), "state": (tf.float32, 2)}


class ModelNotFoundError(LookupError):
    """The request names a model or version that is not loaded (NOT_FOUND)."""


class NoModelLoadedError(LookupError):
    """No model version is loaded yet (UNAVAILABLE)."""


class ContractError(ValueError):
    """A version folder does not meet the SavedModel contract; the message says how."""


_configured = threading.Lock()
# Collections that may try to free an unloaded version before it is reported as leaked.
_UNLOAD_COLLECTIONS = 10
_devices_done: list[str] = []


def configure_cpu_threads(threads: int) -> bool:
    """Size TensorFlow's intra- and inter-op thread pools; False if TensorFlow had already started."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as exc:  # TensorFlow ran an op already (a server started inside another program)
        log.warning("keeping TensorFlow's thread pools: %s", exc)
        return False
    return True


def configure_devices() -> str:
    """Enable GPU memory growth (before any op runs) and return the device the models run on."""
    with _configured:
        if _devices_done:
            return _devices_done[0]
        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError as exc:  # TF already initialised the device
                log.warning("could not enable memory growth on %s: %s", gpu.name, exc)
        logical = tf.config.list_logical_devices("GPU")
        device = logical[0].name if logical else tf.config.list_logical_devices("CPU")[0].name
        log.info("models run on %s (GPUs visible: %d)", device, len(logical))
        _devices_done.append(device)
        return device


@dataclass(eq=False)
class LoadedModel:
    """One model version, loaded, checked and warmed up; what the engine runs."""

    name: str
    version: int
    path: str
    tokenizer: Tokenizer
    info: dict
    vocab_size: int
    state_size: int
    saved: Any = field(repr=False, default=None)  # the loaded SavedModel (keeps the variables alive)
    # decode(tokens[B], state[B,S], temperature[B], top_k[B], top_p[B], seed[B], position[B])
    #   -> (ids int32[B], logprobs float32[B], state float32[B,S])
    decode: Any = field(repr=False, default=None)
    # prefill_sample(tokens[B,T], lengths[B], temperature, top_k, top_p, seed, position) -> same as decode
    prefill_sample: Any = field(repr=False, default=None)
    # decode_steps(tokens[B], state[B,S], temperature, top_k, top_p, seed, position, steps[], forced[B,K], left[B])
    #   -> (ids[K,B] int32, logprobs[K,B] float32, state[B,S]): K = steps decode steps in one call. A row
    #   with left = n > 0 is still reading its prompt: at steps 0..n-1 it is fed forced[:, i] (its next
    #   prompt tokens) instead of its sample, and it generates from step n on (sampler position p + i - n).
    decode_steps: Any = field(repr=False, default=None)
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


def _check_signature(fn: Any, name: str, inputs: dict[str, tuple[tf.DType, int]]) -> None:
    args, kwargs = fn.structured_input_signature
    specs = dict(kwargs)
    if args:
        raise ContractError(f"signature {name!r} takes positional inputs; the contract names them {sorted(inputs)}")
    if set(specs) != set(inputs):
        raise ContractError(f"signature {name!r} has inputs {sorted(specs)}, the contract needs {sorted(inputs)}")
    for key, (dtype, rank) in inputs.items():
        spec = specs[key]
        if spec.dtype != dtype or spec.shape.rank != rank:
            raise ContractError(
                f"signature {name!r} input {key!r} is {spec.dtype.name}{spec.shape}, the contract needs "
                f"{dtype.name} of rank {rank}"
            )
        if spec.shape[0] is not None:
            raise ContractError(f"signature {name!r} input {key!r} has a fixed batch size {spec.shape[0]}, needs None")
    outputs = fn.structured_outputs
    if not isinstance(outputs, dict) or not set(OUTPUTS) <= set(outputs):
        got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
        raise ContractError(f"signature {name!r} returns {got}, the contract needs {sorted(OUTPUTS)}")
    for key, (dtype, rank) in OUTPUTS.items():
        spec = outputs[key]
        if spec.dtype != dtype or spec.shape.rank != rank:
            raise ContractError(
                f"signature {name!r} output {key!r} is {spec.dtype.name}{spec.shape}, needs {dtype.name}"
            )


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ContractError(f"{what} {os.path.basename(path)} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ContractError(f"{what} {os.path.basename(path)} must hold a JSON object")
    return data


def _zeros_params(batch: int) -> list[tf.Tensor]:
    return [
        tf.zeros([batch], tf.float32),  # temperature 0: greedy
        tf.zeros([batch], tf.int32),
        tf.ones([batch], tf.float32),
        tf.zeros([batch], tf.int64),
        tf.zeros([batch], tf.int64),
    ]


def load_model(name: str, version: int, path: str, warmup_batch_sizes: Iterable[int] = (1,)) -> LoadedModel:
    """Load one version folder, check it against the contract, build and warm its decode function.

    Raises ``ContractError`` (or whatever TensorFlow raises for an unreadable
    SavedModel) with a message saying what is wrong.
    """
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise ContractError("saved_model.pb is missing")
    assets = os.path.join(path, "assets")
    try:
        tokenizer = Tokenizer.from_dict(_read_json(os.path.join(assets, TOKENIZER_ASSET), "tokenizer"))
    except ValueError as exc:
        raise ContractError(f"assets/{TOKENIZER_ASSET} is not a valid tokenizer: {exc}") from exc
    info = _read_json(os.path.join(assets, MODEL_ASSET), "model info")
    saved = tf.saved_model.load(path)
    signatures = getattr(saved, "signatures", {})
    for sig, inputs in (("step", STEP_INPUTS), ("prefill", PREFILL_INPUTS)):
        if sig not in signatures:
            raise ContractError(f"signature {sig!r} is missing (found {sorted(signatures)})")
        _check_signature(signatures[sig], sig, inputs)
    step_fn = signatures["step"]
    prefill_fn = signatures["prefill"]

    # A real call finds S and V and proves the variables are there.
    start = tf.constant([tokenizer.start_ids[:1]], tf.int32)
    out = prefill_fn(tokens=start, lengths=tf.constant([1], tf.int32))
    logits, state = out["logits"], out["state"]
    vocab_size = int(logits.shape[-1])
    state_size = int(state.shape[-1])
    if vocab_size != tokenizer.vocab_size:
        raise ContractError(f"the model has {vocab_size} logits but its tokenizer has {tokenizer.vocab_size} tokens")
    if state_size < 1:
        raise ContractError(f"prefill returned a state of size {state_size}")
    stepped = step_fn(tokens=tf.constant([tokenizer.start_ids[0]], tf.int32), state=tf.zeros([1, state_size]))
    if tuple(stepped["state"].shape) != (1, state_size) or tuple(stepped["logits"].shape) != (1, vocab_size):
        raise ContractError(
            f"step returned logits {tuple(stepped['logits'].shape)} and state {tuple(stepped['state'].shape)}, "
            f"expected (1, {vocab_size}) and (1, {state_size})"
        )
    if not np.isfinite(stepped["logits"].numpy()).all():
        raise ContractError("step returned non-finite logits from the start state")

    # tokens[B], state[B,S], then the sampler's per-row parameters
    decode_signature = [
        tf.TensorSpec([None], tf.int32, name="tokens"),
        tf.TensorSpec([None, None], tf.float32, name="state"),
        *SAMPLER_SIGNATURE[1:],
    ]

    @tf.function(input_signature=decode_signature)
    def _decode(tokens, state, temperature, top_k, top_p, seed, position):  # type: ignore[no-untyped-def]
        out = step_fn(tokens=tokens, state=state)
        ids, logprobs = sample(out["logits"], temperature, top_k, top_p, seed, position)
        return ids, logprobs, out["state"]

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="tokens"),
            tf.TensorSpec([None], tf.int32, name="lengths"),
            *SAMPLER_SIGNATURE[1:],
        ]
    )
    def _prefill_sample(tokens, lengths, temperature, top_k, top_p, seed, position):  # type: ignore[no-untyped-def]
        out = prefill_fn(tokens=tokens, lengths=lengths)
        ids, logprobs = sample(out["logits"], temperature, top_k, top_p, seed, position)
        return ids, logprobs, out["state"]

    @tf.function(
        input_signature=[
            *decode_signature,
            tf.TensorSpec([], tf.int32, name="steps"),
            tf.TensorSpec([None, None], tf.int32, name="forced"),
            tf.TensorSpec([None], tf.int32, name="left"),
        ]
    )
    def _decode_steps(tokens, state, temperature, top_k, top_p, seed, position, steps, forced, left):  # type: ignore[no-untyped-def]
        # A generating row feeds back its own sample at position + (i - left); a row still
        # reading its prompt is fed its next prompt token: exactly the tokens `steps` calls
        # of _decode would give (with the engine feeding prompts), in one call.
        def body(i, tokens, state, ids_ta, logprobs_ta):  # type: ignore[no-untyped-def]
            out = step_fn(tokens=tokens, state=state)
            generated = tf.cast(tf.maximum(i - left, 0), tf.int64)
            ids, logprobs = sample(out["logits"], temperature, top_k, top_p, seed, position + generated)
            fed = tf.where(i >= left, ids, tf.gather(forced, i, axis=1))
            return i + 1, fed, out["state"], ids_ta.write(i, ids), logprobs_ta.write(i, logprobs)

        loop_vars = [
            tf.constant(0),
            tokens,
            state,
            tf.TensorArray(tf.int32, size=steps),
            tf.TensorArray(tf.float32, size=steps),
        ]
        _, _, state, ids_ta, logprobs_ta = tf.while_loop(lambda i, *_: i < steps, body, loop_vars)
        return ids_ta.stack(), logprobs_ta.stack(), state  # (k, b), (k, b), (b, S)

    # The concrete functions: traced once (batch None). Calling them directly
    # skips tf.function's argument dispatch, which costs more than a small
    # model's whole step on a CPU.
    decode = _decode.get_concrete_function()
    prefill_sample = _prefill_sample.get_concrete_function()
    decode_steps = _decode_steps.get_concrete_function()
    # Warm-up: run at the sizes the engine uses before any traffic.
    for batch in sorted(set(warmup_batch_sizes) | {1}):
        decode(tf.fill([batch], tokenizer.start_ids[0]), tf.zeros([batch, state_size]), *_zeros_params(batch))
        prefill_sample(tf.fill([batch, 2], tokenizer.start_ids[0]), tf.fill([batch], 2), *_zeros_params(batch))
    decode_steps(
        tf.fill([1], tokenizer.start_ids[0]),
        tf.zeros([1, state_size]),
        *_zeros_params(1),
        tf.constant(2),
        tf.fill([1, 2], tokenizer.start_ids[0]),
        tf.ones([1], tf.int32),
    )
    return LoadedModel(
        name=name,
        version=version,
        path=path,
        tokenizer=tokenizer,
        info=info,
        vocab_size=vocab_size,
        state_size=state_size,
        saved=saved,
        decode=decode,
        prefill_sample=prefill_sample,
        decode_steps=decode_steps,
        loaded_at=time.time(),
    )


def _is_visible(name: str) -> bool:
    return not name.startswith((".", "_")) and not name.endswith((".tmp", "~"))


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

    def retiring(self) -> list[LoadedModel]:
        """Versions that take no new traffic but still have streams running."""
        with self._lock:
            return list(self._retiring.values())

    def _describe(self) -> str:
        parts = [f"{n} (versions {', '.join(str(v) for v in sorted(vs))})" for n, vs in sorted(self._serving.items())]
        return "; ".join(parts) if parts else "none"

    def resolve(self, name: str, version: int) -> LoadedModel:
        """The model for a request: ``""`` is the default model, version 0 the newest loaded."""
        with self._lock:
            serving = {n: vs for n, vs in self._serving.items() if vs}
            if not serving:
                raise NoModelLoadedError(f"no model is loaded yet (repository {self.models_dir!r})")
            if not name:
                if self.default_model:
                    name = self.default_model
                elif len(serving) == 1:
                    name = next(iter(serving))
                else:
                    raise ModelNotFoundError(
                        f"model is empty and there is no default model; name one of: {self._describe()}"
                    )
            versions = serving.get(name)
            if not versions:
                raise ModelNotFoundError(f"model {name!r} is not loaded; loaded: {self._describe()}")
            if version == 0:
                return versions[max(versions)]
            if version not in versions:
                raise ModelNotFoundError(f"model {name!r} version {version} is not loaded; loaded: {self._describe()}")
            return versions[version]

    # ------------------------------------------------------------ loading
    def load_all(self) -> None:
        """Scan the repository once and bring the loaded versions in step with it (blocking)."""
        self.poll()

    def poll(self) -> bool:
        """One scan: load new good versions, retire old and removed ones. Returns whether anything changed."""
        with self._scan_lock:
            changed = False
            on_disk = self._scan()
            names = set(on_disk) | set(self._serving)
            for name in sorted(names):
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
            if not _is_visible(name) or not os.path.isdir(base):
                continue
            try:
                entries = os.listdir(base)
            except OSError:
                continue
            versions = [int(v) for v in entries if v.isdigit() and v.isascii() and int(v) > 0]
            out[name] = sorted(v for v in versions if os.path.isdir(os.path.join(base, str(v))))
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
                model = load_model(name, version, path, self.warmup_batch_sizes)
            except Exception as exc:  # a bad version never serves; any failure is reported, none escapes
                self._failed[(name, version)] = fingerprint
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                log.error("model %s version %d at %s cannot be served: %s", name, version, path, reason[:500])
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
                self.metrics.model_loaded.remove(model.name, str(model.version))
            except KeyError:
                pass
        log.info("model %s version %d takes no new traffic; unloading once its streams end", model.name, model.version)
        with model._lock:
            model._on_idle = self._unload
            idle = model._streams == 0
        if idle:
            self._unload(model)

    def _unload(self, model: LoadedModel) -> None:
        with self._lock:
            if self._retiring.pop(id(model), None) is None:
                return
        # The repository drops its reference; the engine dropped its batch when
        # the last stream ended. The memory goes when the last reference does
        # (the poll thread runs the cycle collector for TF's function graphs).
        with self._lock:
            held = model.saved if model.saved is not None else model  # the SavedModel holds the graphs
            self._unloaded.append((f"model {model.name} version {model.version}", weakref.ref(held), 0))
        log.info("unloaded model %s version %d", model.name, model.version)

    # ------------------------------------------------------------ polling
    def start_polling(self) -> None:
        """Poll every ``poll_seconds`` in a daemon thread (no-op when ``poll_seconds`` <= 0)."""
        if self.poll_seconds <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._poll_loop, name="textgen-model-poll", daemon=True)
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
