"""Render a kustomization offline, for the manifest tests where ``kubectl kustomize`` is absent.

It implements the part of kustomize that ``deploy/k8s`` uses and refuses everything else
by name, so a kustomization that grows a new feature fails here instead of rendering
differently from the real tool:

* ``resources``: YAML files (several documents each) and folders holding a kustomization;
* ``images``: ``name`` -> ``newName`` / ``newTag`` / ``digest`` on every container image;
* ``patches``: JSON 6902 operations (add, remove, replace, test) with a ``target`` selected
  by kind, name, group and version.

Where ``kubectl`` is installed, ``tests/deploy/test_manifests.py`` checks that this renderer
and ``kubectl kustomize`` produce the same objects.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render (or that is invalid); the message says which part."""


def render(directory: str | Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build <directory>`` would emit (order aside)."""
    root = Path(directory)
    path = root / "kustomization.yaml"
    if not path.is_file():
        raise KustomizeError(f"{root} has no kustomization.yaml")
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = sorted(set(spec) - SUPPORTED_KEYS)
    if unknown:
        raise KustomizeError(f"{path}: unsupported fields {unknown}; supported: {sorted(SUPPORTED_KEYS)}")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = root / entry
        if target.is_dir():
            objects.extend(render(target))
        elif target.is_file():
            objects.extend(doc for doc in yaml.safe_load_all(target.read_text(encoding="utf-8")) if doc)
        else:
            raise KustomizeError(f"{path}: resource {entry!r} does not exist")
    _check_unique(objects, path)
    for patch in spec.get("patches", []):
        _apply_patch(objects, patch, root, path)
    for image in spec.get("images", []):
        _set_image(objects, image)
    return objects


def object_key(obj: dict[str, Any]) -> tuple[str, str, str]:
    """(apiVersion, kind, name): what identifies an object in one namespace."""
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


def _check_unique(objects: list[dict[str, Any]], path: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = object_key(obj)
        if key in seen:
            raise KustomizeError(f"{path}: {key} appears twice")
        seen.add(key)


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    wanted = {"kind": obj["kind"], "name": obj["metadata"]["name"], "group": group, "version": version}
    for field, value in target.items():
        if field not in wanted:
            raise KustomizeError(f"patch target field {field!r} is not supported (kind, name, group, version)")
        if wanted[field] != value:
            return False
    return True


def _apply_patch(objects: list[dict[str, Any]], patch: dict[str, Any], root: Path, path: Path) -> None:
    if set(patch) - {"target", "patch", "path"}:
        raise KustomizeError(f"{path}: unsupported patch fields {sorted(set(patch) - {'target', 'patch', 'path'})}")
    if "target" not in patch:
        raise KustomizeError(f"{path}: only JSON 6902 patches with a target are supported")
    text = patch["patch"] if "patch" in patch else (root / patch["path"]).read_text(encoding="utf-8")
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise KustomizeError(f"{path}: the patch for {patch['target']} is not a JSON 6902 list of operations")
    hits = [obj for obj in objects if _matches(obj, patch["target"])]
    if not hits:
        raise KustomizeError(f"{path}: patch target {patch['target']} matches no resource")
    for obj in hits:
        for op in operations:
            _apply_operation(obj, op)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer must start with '/', got {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _apply_operation(doc: dict[str, Any], op: dict[str, Any]) -> None:
    kind = op.get("op")
    *parents, last = _pointer(op["path"])
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    try:
        if kind == "add":
            value = copy.deepcopy(op["value"])
            if isinstance(node, list):
                node.insert(len(node) if last == "-" else int(last), value)
            else:
                node[last] = value
        elif kind == "replace":
            index: Any = int(last) if isinstance(node, list) else last
            if isinstance(node, dict) and last not in node:
                raise KeyError(last)
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[int(last) if isinstance(node, list) else last]
        elif kind == "test":
            actual = node[int(last) if isinstance(node, list) else last]
            if actual != op["value"]:
                raise KustomizeError(f"test at {op['path']} failed: {actual!r} != {op['value']!r}")
        else:
            raise KustomizeError(f"JSON 6902 op {kind!r} is not supported (add, remove, replace, test)")
    except (KeyError, IndexError) as exc:
        raise KustomizeError(f"{kind} {op['path']}: no such location ({exc})") from None


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] == "Pod":
        pod = obj.get("spec", {})
    elif obj["kind"] in POD_TEMPLATE_KINDS:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    else:
        return []
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _set_image(objects: list[dict[str, Any]], image: dict[str, Any]) -> None:
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise KustomizeError(f"images entry {image.get('name')!r}: unsupported fields {sorted(unknown)}")
    for obj in objects:
        for container in _containers(obj):
            ref = container.get("image", "")
            name, tag = _split_image(ref)
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{name}@{image['digest']}"
            else:
                new_tag = image.get("newTag", tag)
                container["image"] = f"{name}:{new_tag}" if new_tag else name


def _split_image(ref: str) -> tuple[str, str]:
    """'repo/name:tag' -> ('repo/name', 'tag'); a ':' in a registry's port is not a tag."""
    name, _, digest = ref.partition("@")
    if digest:
        return name, ""
    head, sep, tail = name.rpartition(":")
    if sep and "/" not in tail:
        return head, tail
    return name, ""
