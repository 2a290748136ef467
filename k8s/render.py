#!/usr/bin/env python3
"""Render a Kustomize base as `kustomize build` does, for machines without kustomize.

Supports only the fields that k8s/kustomization.yaml uses, and rejects every other field
so that an unsupported feature fails loudly instead of rendering something else:

- `resources`: YAML files next to kustomization.yaml (no folders, no URLs).
- `labels`: `pairs` added to every object's metadata, and with `includeTemplates` to the
  pod templates and volume claim templates; `includeSelectors: true` is rejected.
- `configMapGenerator`: `envs` and `literals`, named with kustomize's content hash suffix
  and with every reference to them in the other objects renamed.
- `images`: `newName`, `newTag` and `digest` for every container whose image name matches.

The objects come out in kustomize's default (legacy) order. The key order and quoting of
the YAML text differ from kustomize's, so compare parsed objects, as
`check_manifests.py compare` does, not text.

Usage: render.py [KUSTOMIZATION_DIR]   (default: the folder of this script)
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "labels",
    "configMapGenerator",
    "images",
}
LABEL_FIELDS = {"pairs", "includeSelectors", "includeTemplates"}
GENERATOR_FIELDS = {"name", "envs", "literals"}
IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}

# Kinds whose pod template is at spec.template, as in kustomize's template label specs.
TEMPLATE_KINDS = {
    "Deployment",
    "ReplicaSet",
    "DaemonSet",
    "StatefulSet",
    "Job",
    "ReplicationController",
}

# kustomize's legacy order: these kinds first, in this order, then every other kind
# sorted by name, then the webhook configurations.
ORDER_FIRST = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]

ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


class RenderError(Exception):
    """A kustomization that this renderer cannot build, with the reason."""


class StrictLoader(yaml.SafeLoader):
    """A YAML loader that rejects a key repeated in one mapping, which PyYAML would
    otherwise resolve silently to the last value."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        keys = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def main() -> int:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    try:
        objects = render(folder)
    except RenderError as err:
        print(f"render.py: {err}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=True, default_flow_style=False)
    return 0


def render(folder: Path) -> list[dict[str, Any]]:
    """Build the kustomization in `folder` and return its objects in output order."""
    path = folder / "kustomization.yaml"
    kustomization = load_yaml(path)
    check_fields(kustomization, SUPPORTED_FIELDS, str(path))
    if kustomization.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{path}: kind must be Kustomization, not {kustomization['kind']!r}")

    objects = []
    for name in kustomization.get("resources", []):
        objects.extend(load_resource(folder, name))

    renamed = {}
    for generator in kustomization.get("configMapGenerator", []):
        config_map = generate_config_map(folder, generator)
        renamed[generator["name"]] = config_map["metadata"]["name"]
        objects.append(config_map)

    check_unique(objects)
    for entry in kustomization.get("labels", []):
        check_fields(entry, LABEL_FIELDS, "labels entry")
        if entry.get("includeSelectors", False):
            raise RenderError("labels with includeSelectors: true are not supported")
        for obj in objects:
            add_labels(obj, entry.get("pairs", {}), entry.get("includeTemplates", False))
    for obj in objects:
        rename_config_map_refs(obj, renamed)
    for entry in kustomization.get("images", []):
        check_fields(entry, IMAGE_FIELDS, "images entry")
        for obj in objects:
            set_images(obj, entry)

    return sorted(objects, key=order_key)


def load_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=StrictLoader)
    except (OSError, yaml.YAMLError) as err:
        raise RenderError(f"cannot read {path}: {err}") from err


def check_fields(mapping: Any, allowed: set[str], where: str) -> None:
    if not isinstance(mapping, dict):
        raise RenderError(f"{where}: expected a mapping, found {type(mapping).__name__}")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise RenderError(
            f"{where}: unsupported field(s) {', '.join(unknown)}. "
            "Render with kustomize or kubectl kustomize instead."
        )


def load_resource(folder: Path, name: str) -> list[dict[str, Any]]:
    path = folder / name
    if "://" in name or not path.is_file():
        raise RenderError(f"resource {name!r} is not a file in {folder}")
    try:
        documents = list(yaml.load_all(path.read_text(encoding="utf-8"), Loader=StrictLoader))
    except (OSError, yaml.YAMLError) as err:
        raise RenderError(f"cannot read {path}: {err}") from err
    objects = []
    for document in documents:
        if document is None:
            continue
        if not isinstance(document, dict) or not {"apiVersion", "kind", "metadata"} <= set(
            document
        ):
            raise RenderError(f"{path}: every document needs apiVersion, kind and metadata")
        if not document["metadata"].get("name"):
            raise RenderError(f"{path}: a {document['kind']} has no metadata.name")
        objects.append(document)
    return objects


def check_unique(objects: list[dict[str, Any]]) -> None:
    seen = set()
    for obj in objects:
        key = (
            obj["apiVersion"],
            obj["kind"],
            obj["metadata"].get("namespace"),
            obj["metadata"]["name"],
        )
        if key in seen:
            raise RenderError(f"two objects share the id {'/'.join(str(part) for part in key)}")
        seen.add(key)


def generate_config_map(folder: Path, generator: dict[str, Any]) -> dict[str, Any]:
    """Build a ConfigMap as kustomize's configMapGenerator does, with the hash suffix."""
    check_fields(generator, GENERATOR_FIELDS, "configMapGenerator entry")
    name = generator.get("name")
    if not name:
        raise RenderError("a configMapGenerator entry has no name")

    pairs = []
    for env_file in generator.get("envs", []):
        pairs.extend(read_env_file(folder / env_file))
    for literal in generator.get("literals", []):
        key, separator, value = literal.partition("=")
        if not separator:
            raise RenderError(f"literal {literal!r} of {name} is not KEY=VALUE")
        pairs.append((key, value))

    data: dict[str, str] = {}
    for key, value in pairs:
        if key in data:
            raise RenderError(f"key {key} appears twice in configMapGenerator {name}")
        data[key] = value
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-{config_map_hash(data)}"},
        "data": data,
    }


def read_env_file(path: Path) -> list[tuple[str, str]]:
    """Read KEY=VALUE lines as kustomize does: blank lines and `#` lines are skipped,
    leading white space is dropped, and the value is kept verbatim (no quote handling)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise RenderError(f"cannot read {path}: {err}") from err
    text = text.removeprefix("\ufeff")
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        key, separator, value = line.partition("=")
        if not separator:
            # kustomize would read the value from its own environment, which would make
            # the rendered output depend on the machine.
            raise RenderError(f"{path}:{number}: expected KEY=VALUE, found {line!r}")
        if not ENV_NAME.match(key):
            raise RenderError(f"{path}:{number}: invalid variable name {key!r}")
        pairs.append((key, value))
    return pairs


def config_map_hash(data: dict[str, str]) -> str:
    """Return kustomize's name suffix for a generated ConfigMap with `data`.

    The suffix is the SHA-256 of Go's JSON encoding of the kind, name and data. Its first
    10 hex digits are kept, and those that are a vowel (a, e) or a digit that reads like
    a letter (0, 1, 3) are mapped to other letters.

    kustomize 5.5 hashes the generated ConfigMap before it names it, so the name in the
    encoding is empty; ConfigMaps with the same data get the same suffix.
    """
    encoded = json.dumps(
        {"data": data, "kind": "ConfigMap", "name": ""},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    # Go's encoding/json escapes these characters, and Python's json does not.
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e")):
        encoded = encoded.replace(char, escape)
    encoded = encoded.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    digest = hashlib.sha256(encoded.encode("utf-8")).hexdigest()
    return digest[:10].translate(str.maketrans("013ae", "ghkmt"))


def add_labels(obj: dict[str, Any], pairs: dict[str, str], include_templates: bool) -> None:
    targets = [obj["metadata"]]
    if include_templates:
        spec = obj.get("spec", {})
        if obj["kind"] in TEMPLATE_KINDS and "template" in spec:
            targets.append(spec["template"].setdefault("metadata", {}))
        if obj["kind"] == "StatefulSet":
            for claim in spec.get("volumeClaimTemplates", []):
                targets.append(claim.setdefault("metadata", {}))
        if obj["kind"] == "CronJob" and "jobTemplate" in spec:
            job = spec["jobTemplate"]
            targets.append(job.setdefault("metadata", {}))
            targets.append(
                job.setdefault("spec", {}).setdefault("template", {}).setdefault("metadata", {})
            )
    for metadata in targets:
        metadata.setdefault("labels", {}).update({key: str(value) for key, value in pairs.items()})


def rename_config_map_refs(node: Any, renamed: dict[str, str]) -> None:
    """Rename envFrom, env and volume references to generated ConfigMaps."""
    if isinstance(node, dict):
        for key, value in node.items():
            is_reference = key in ("configMapRef", "configMapKeyRef", "configMap")
            if is_reference and isinstance(value, dict) and value.get("name") in renamed:
                value["name"] = renamed[value["name"]]
            rename_config_map_refs(value, renamed)
    elif isinstance(node, list):
        for item in node:
            rename_config_map_refs(item, renamed)


def set_images(node: Any, entry: dict[str, str]) -> None:
    """Apply one `images` entry to every container and init container under `node`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for container in value:
                    if isinstance(container, dict) and "image" in container:
                        container["image"] = replace_image(container["image"], entry)
            else:
                set_images(value, entry)
    elif isinstance(node, list):
        for item in node:
            set_images(item, entry)


def replace_image(image: str, entry: dict[str, str]) -> str:
    name, _, digest = image.partition("@")
    tag = ""
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        name, tag = name[:colon], name[colon + 1 :]
    if name != entry["name"]:
        return image
    name = entry.get("newName", name)
    if "digest" in entry:
        return f"{name}@{entry['digest']}"
    tag = entry.get("newTag", tag)
    result = f"{name}:{tag}" if tag else name
    return f"{result}@{digest}" if digest and "newTag" not in entry else result


def order_key(obj: dict[str, Any]) -> tuple[int, str, str, str]:
    kind = obj["kind"]
    if kind in ORDER_FIRST:
        rank = ORDER_FIRST.index(kind)
    elif kind in ORDER_LAST:
        rank = len(ORDER_FIRST) + 1 + ORDER_LAST.index(kind)
    else:
        rank = len(ORDER_FIRST)
    metadata = obj["metadata"]
    return (rank, kind, metadata.get("namespace", ""), metadata["name"])


if __name__ == "__main__":
    sys.exit(main())
