#!/usr/bin/env python3
"""Check rendered Kubernetes manifests, offline.

  check_manifests.py validate VERSION[,VERSION...] FILE
      Validates every object in FILE against the Kubernetes JSON schemas of each version,
      as the package kubernetes-validate ships them, in strict mode. An unknown field, a
      missing required field, a value of the wrong type, or a kind or apiVersion without
      a schema fails the check.

  check_manifests.py compare FILE_A FILE_B
      Fails unless both files hold the same objects with the same content, ignoring the
      order of objects and of mapping keys. k8s/validate.sh uses it to hold k8s/render.py
      to the output of the real kustomize.

Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "validate":
        return validate(sys.argv[2].split(","), sys.argv[3])
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        return compare(sys.argv[2], sys.argv[3])
    print(__doc__, file=sys.stderr)
    return 2


def load(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as file:
        return [document for document in yaml.safe_load_all(file) if document]


def object_id(obj: dict[str, Any]) -> str:
    metadata = obj.get("metadata", {})
    namespace = metadata.get("namespace")
    name = metadata.get("name", "?")
    return f"{obj.get('kind', '?')}/{namespace + '/' if namespace else ''}{name}"


def validate(versions: list[str], path: str) -> int:
    import kubernetes_validate.utils as schemas

    objects = load(path)
    if not objects:
        print(f"FAIL {path} contains no objects")
        return 1
    failures = 0
    for version in versions:
        for obj in objects:
            try:
                schema_version = schemas.validate(obj, version, strict=True)
            except schemas.ValidationError as err:
                field = ".".join(str(part) for part in err.path) or "(top level)"
                print(f"FAIL {object_id(obj)} against Kubernetes {version}: {field}: {err.message}")
                failures += 1
            except (schemas.SchemaNotFoundError, schemas.VersionNotSupportedError) as err:
                # The command line tool only warns about these, but here they fail the check.
                print(f"FAIL {object_id(obj)} against Kubernetes {version}: {err.message}")
                failures += 1
            else:
                print(f"ok   {object_id(obj)} against Kubernetes {schema_version} (strict)")
    checked = len(objects) * len(versions)
    print(f"{checked - failures} passed, {failures} failed")
    return 1 if failures else 0


def compare(path_a: str, path_b: str) -> int:
    objects_a = {object_id(obj): obj for obj in load(path_a)}
    objects_b = {object_id(obj): obj for obj in load(path_b)}
    differences = []
    for key in sorted(objects_a.keys() - objects_b.keys()):
        differences.append(f"{key} only in {path_a}")
    for key in sorted(objects_b.keys() - objects_a.keys()):
        differences.append(f"{key} only in {path_b}")
    for key in sorted(objects_a.keys() & objects_b.keys()):
        differences.extend(diff(objects_a[key], objects_b[key], key))
    for line in differences:
        print(f"DIFF {line}")
    if differences:
        print(f"{path_a} and {path_b} differ in {len(differences)} place(s)")
        return 1
    print(f"{path_a} and {path_b} hold the same {len(objects_a)} objects")
    return 0


def diff(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                found.append(f"{where}.{key}: {a.get(key)!r} != {b.get(key)!r}")
            else:
                found.extend(diff(a[key], b[key], f"{where}.{key}"))
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        found = []
        for index, (item_a, item_b) in enumerate(zip(a, b)):
            found.extend(diff(item_a, item_b, f"{where}[{index}]"))
        return found
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


if __name__ == "__main__":
    sys.exit(main())
