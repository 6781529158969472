"""docs/asyncapi.yaml as the AsyncAPI tests read it: the document, its local $refs, its
message payloads as jsonschema validators, and the one channel a topic is on.

tests/conftest.py registers this module as a plugin: its `doc` and `schemas` fixtures
(one per module) serve test_asyncapi.py and test_asyncapi_live.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "asyncapi.yaml"
DOC_URI = "urn:tapgate:asyncapi"


def load_doc() -> dict[str, Any]:
    doc = yaml.safe_load(DOC_PATH.read_text(encoding="utf-8"))
    assert isinstance(doc, dict), f"{DOC_PATH} is not a YAML mapping"
    return doc


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return load_doc()


def pointer(doc: dict[str, Any], ref: str) -> Any:
    """The node a local ``#/a/b`` reference points at (KeyError when it does not)."""
    assert ref.startswith("#/"), f"only local references are used here, not {ref!r}"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def deref(doc: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = pointer(doc, node["$ref"])
    return node


class Schemas:
    """The document's message payloads as jsonschema validators ($refs across the whole
    document resolve)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        resource = Resource.from_contents(doc, default_specification=DRAFT7)
        self.registry: Registry[Any] = Registry().with_resource(DOC_URI, resource)

    def validator(self, ref: str) -> jsonschema.Draft7Validator:
        return jsonschema.Draft7Validator({"$ref": f"{DOC_URI}{ref}"}, registry=self.registry)

    def errors(self, ref: str, instance: Any) -> list[str]:
        return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                for e in self.validator(ref).iter_errors(instance)]

    def check(self, message: str, instance: Any) -> None:
        """``instance`` is a valid payload of the message ``components/messages/<name>``."""
        found = self.errors(f"#/components/messages/{message}/payload", instance)
        assert not found, f"a real {message} does not match docs/asyncapi.yaml:\n" + "\n".join(
            found) + f"\n{json.dumps(instance, indent=1)[:3000]}"

    def valid(self, ref: str, instance: Any) -> bool:
        return not self.errors(ref, instance)


@pytest.fixture(scope="module")
def schemas(doc: dict[str, Any]) -> Schemas:
    return Schemas(doc)


def channel_regex(doc: dict[str, Any], channel: dict[str, Any]) -> re.Pattern[str]:
    """The channel's address as a regex: each ``{param}`` replaced by its x-pattern."""
    params = {name: deref(doc, p) for name, p in (channel.get("parameters") or {}).items()}
    out, pos = [], 0
    for m in re.finditer(r"\{([^}]+)\}", channel["address"]):
        out.append(re.escape(channel["address"][pos:m.start()]))
        pattern = params[m.group(1)]["x-pattern"]
        out.append("(?:" + pattern.removeprefix("^").removesuffix("$") + ")")
        pos = m.end()
    out.append(re.escape(channel["address"][pos:]))
    return re.compile("".join(out))


def channel_of(doc: dict[str, Any], topic: str) -> str:
    """The one channel whose address matches ``topic``."""
    found = [cid for cid, ch in doc["channels"].items()
             if channel_regex(doc, ch).fullmatch(topic)]
    assert len(found) == 1, f"topic {topic!r} matches channels {found}, not exactly one"
    return found[0]


def message_names(doc: dict[str, Any], channel_id: str) -> set[str]:
    """The components/messages names of a channel's messages."""
    names = set()
    for msg in doc["channels"][channel_id]["messages"].values():
        ref = msg["$ref"]
        assert ref.startswith("#/components/messages/"), ref
        names.add(ref.rsplit("/", 1)[1])
    return names
