"""Which model versions serve, and which one a request means: the rules every process shares.

``resolve_version`` is the one rule for a request's ``model``/``version`` fields (``""`` is the
default model, version 0 the newest serving), used by the engine's ``ModelRepository`` and by a
frontend's ``ModelCatalog``. ``ModelView`` is what a frontend needs of a version (name, version,
tokenizer, facts for ``ListModels``); ``LoadedModel`` (with TensorFlow) and ``RemoteModel``
(without) both have it.

A frontend process owns no model: the engine process tells it which versions serve
(``ModelCatalog.update``), and the frontend reads each version's ``assets/tokenizer.json`` and
``model.json`` itself, once per version.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from service.errors import ModelNotFoundError, NoModelLoadedError
from service.prompt import echo
from training import contract
from training.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class ModelView(Protocol):
    """What a frontend uses of a serving version."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def info(self) -> dict: ...
    @property
    def vocab_size(self) -> int: ...


M = TypeVar("M", bound=ModelView)


def describe(serving: Mapping[str, Mapping[int, Any]]) -> str:
    """``"a (versions 1, 2); b (versions 3)"``: what serves, for messages."""
    parts = [f"{n} (versions {', '.join(str(v) for v in sorted(vs))})" for n, vs in sorted(serving.items()) if vs]
    return "; ".join(parts) if parts else "none"


def resolve_version(
    serving: Mapping[str, Mapping[int, M]], name: str, version: int, default_model: str | None, models_dir: str
) -> M:
    """The version a request means: ``""`` is the default model (or the only one), version 0 the newest."""
    serving = {n: vs for n, vs in serving.items() if vs}
    if not serving:
        raise NoModelLoadedError(f"no model is loaded yet (repository {models_dir!r})")
    if not name:
        if default_model:
            name = default_model
        elif len(serving) == 1:
            name = next(iter(serving))
        else:
            raise ModelNotFoundError(f"model is empty and there is no default model; name one of: {describe(serving)}")
    versions = serving.get(name)
    if not versions:
        raise ModelNotFoundError(f"model {echo(name)} is not loaded; loaded: {describe(serving)}")
    if version == 0:
        return versions[max(versions)]
    if version not in versions:
        raise ModelNotFoundError(f"model {echo(name)} version {version} is not loaded; loaded: {describe(serving)}")
    return versions[version]


def can_serve(serving: Mapping[str, Mapping[int, Any]], default_model: str | None) -> bool:
    """Readiness: the default model has a version serving (without a default model: any model has)."""
    if default_model:
        return bool(serving.get(default_model))
    return any(serving.values())


def why_not_serving(serving: Mapping[str, Mapping[int, Any]], default_model: str | None, models_dir: str) -> str:
    """What ``can_serve`` misses, for the log."""
    if default_model:
        return f"the default model {default_model!r} has no version loaded (loaded: {describe(serving)})"
    return f"no model is loaded from {models_dir!r}"


@dataclass(frozen=True, eq=False)
class RemoteModel:
    """A version the engine process serves, as a frontend sees it (no weights)."""

    name: str
    version: int
    path: str
    tokenizer: Tokenizer
    info: dict
    vocab_size: int

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    @classmethod
    def read(cls, name: str, version: int, path: str, vocab_size: int) -> RemoteModel:
        """Reads the version's tokenizer and ``model.json`` from its folder."""
        with open(contract.asset_path(path, contract.TOKENIZER_ASSET), encoding="utf-8") as f:
            tokenizer = Tokenizer.from_json(f.read())
        info = contract.read_json_asset(path, contract.MODEL_ASSET)
        return cls(name, version, path, tokenizer, info, vocab_size)


class ModelCatalog:
    """A frontend's view of the versions the engine serves; ``update`` replaces it, ``resolve`` reads it.

    Thread-safe. ``on_change`` is called after each update that changed what serves.
    """

    def __init__(self, models_dir: str, default_model: str | None, on_change: Callable[[], None] | None = None) -> None:
        self.models_dir = models_dir
        self.default_model = default_model
        self.on_change = on_change
        self._lock = threading.Lock()
        self._serving: dict[str, dict[int, RemoteModel]] = {}

    def update(self, versions: list[dict[str, Any]]) -> None:
        """Serve exactly ``versions`` (dicts with name, version, path, vocab_size), reading new ones' files."""
        with self._lock:
            old = {(m.name, m.version, m.path): m for vs in self._serving.values() for m in vs.values()}
        serving: dict[str, dict[int, RemoteModel]] = {}
        for entry in versions:
            name, version, path = str(entry["name"]), int(entry["version"]), str(entry["path"])
            model = old.get((name, version, path))
            if model is None:
                try:
                    model = RemoteModel.read(name, version, path, int(entry["vocab_size"]))
                except (OSError, ValueError, KeyError) as exc:
                    log.error("cannot read the tokenizer of %s/%d from %s: %s", name, version, path, exc)
                    continue
            serving.setdefault(name, {})[version] = model
        with self._lock:
            changed = {k: set(v) for k, v in serving.items()} != {k: set(v) for k, v in self._serving.items()}
            self._serving = serving
        if changed and self.on_change is not None:
            self.on_change()

    def loaded(self) -> list[RemoteModel]:
        """Versions taking traffic, by model name then version."""
        with self._lock:
            return [self._serving[n][v] for n in sorted(self._serving) for v in sorted(self._serving[n])]

    def resolve(self, name: str, version: int) -> RemoteModel:
        with self._lock:
            return resolve_version(self._serving, name, version, self.default_model, self.models_dir)

    def can_serve(self) -> bool:
        with self._lock:
            return can_serve(self._serving, self.default_model)

    def why_not_serving(self) -> str:
        with self._lock:
            return why_not_serving(self._serving, self.default_model, self.models_dir)
