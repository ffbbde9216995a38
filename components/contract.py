"""The API contract checker: holds registered resources against `components/contract.yaml`.

Pure: a resource is its type token, its name and its inputs as registered (camelCase, plain
values), so the offline plan, the tests and settings all use it without Pulumi. A type the
contract does not list, or an input no rule covers, is a violation like any broken rule: never
a silent pass (the same model as the cost model's pricer table).

    violations("digitalocean:index/uptimeAlert:UptimeAlert", "prod-alerts-uptime-ssl", inputs)
    check(resources)                # ContractError on the first violation, as one line
    rules(TYPE, PATH), bounds(...)  # an input's rules, for settings to offer what they allow
    when_enum(TYPE, PATH, engine="pg")  # the enum a cross-field rule puts on an input
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

CONTRACT_PATH = Path(__file__).with_name("contract.yaml")
AUTONAME_SUFFIX = "-abcdefg"
"""Stands in for the 7 random characters Pulumi appends to an auto-name."""
_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
          "list": list, "object": Mapping}
_ABSENT = object()
SECRET = object()
"""Shown as [secret] in place of a secret input's value."""


class ContractError(ValueError):
    """A registered resource breaks the API contract; the message is one line naming the
    resource, the input, the value, the rule and its source."""


@dataclass(frozen=True)
class Violation:
    resource: str
    type: str
    input: str
    value: Any
    rule: str
    source: str

    def __str__(self) -> str:
        return (f"API contract: {self.resource} ({self.type}) input {self.input} = "
                f"{_show(self.value)} breaks rule '{self.rule}' [{self.source}]")


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if value is SECRET:
        return "[secret]"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@cache
def contract() -> dict[str, Any]:
    """The contract data (`components/contract.yaml`)."""
    return yaml.safe_load(CONTRACT_PATH.read_text())


def source_text(key: str | list[str]) -> str:
    """A rule's citation: the source keys resolved to file and commit, joined with '; '."""
    sources = contract()["sources"]
    return "; ".join(sources.get(k, k) for k in ([key] if isinstance(key, str) else key))


def rules(type_: str, path: str) -> Mapping[str, Any]:
    """The rules on input `path` of `type_`, e.g. rules(POOL, "name")["max_length"]."""
    return contract()["types"][type_]["inputs"][path]


def bounds(type_: str, path: str) -> tuple[int, int]:
    """The (min, max) range of a numeric input, e.g. the LB's health-check interval."""
    r = rules(type_, path)
    return r["min"], r["max"]


def when_enum(type_: str, path: str, **condition: Any) -> list[Any]:
    """The enum a cross-field rule puts on `path` where its `if` matches `condition` exactly,
    e.g. when_enum(DATABASE_CLUSTER, "version", engine="pg")."""
    for rule in contract()["types"][type_].get("when", []):
        if all(condition.get(k, _ABSENT) in _values(v) for k, v in rule["if"].items()) and \
                path in rule["then"] and "enum" in rule["then"][path]:
            return list(rule["then"][path]["enum"])
    raise KeyError(f"no cross-field enum for {type_} {path} where {condition}")


def _values(listed: list[Any]) -> list[Any]:
    return [_ABSENT if v is None else v for v in listed]


# --------------------------------------------------------------------------- paths


def _resolve(value: Any, parts: list[str], where: str) -> Iterator[tuple[str, Any, bool]]:
    """Every place `parts` names under `value`: (concrete path, value or _ABSENT, whether the
    parent holding it exists). `x[]` walks every item of list x."""
    if not parts:
        yield where, value, True
        return
    head, rest = parts[0], parts[1:]
    each = head.endswith("[]")
    key = head[:-2] if each else head
    if not isinstance(value, Mapping):
        return
    child = value.get(key, _ABSENT)
    if child is None:
        child = _ABSENT
    here = f"{where}.{key}" if where else key
    if not each:
        if child is _ABSENT:
            yield here, _ABSENT, not rest  # a missing parent object holds nothing
            return
        yield from _resolve(child, rest, here)
        return
    if isinstance(child, list):
        for i, item in enumerate(child):
            yield from _resolve(item, rest, f"{here}[{i}]")


def _locate(inputs: Mapping[str, Any], path: str) -> list[tuple[str, Any, bool]]:
    return list(_resolve(inputs, path.split("."), ""))


def input_paths(inputs: Any, prefix: str = "") -> set[str]:
    """The contract paths of every value set in `inputs` (leaves, lists, objects and the
    items of scalar lists), e.g. {"healthcheck", "healthcheck.path", "rules", "rules[].type",
    "tags", "tags[]"}."""
    out: set[str] = set()
    if isinstance(inputs, Mapping):
        for key, value in inputs.items():
            if value is None:
                continue
            path = f"{prefix}.{key}" if prefix else key
            out.add(path)
            if isinstance(value, Mapping):
                out |= input_paths(value, path)
            elif isinstance(value, list):
                for item in value:  # an object item is covered by rules on its fields
                    if isinstance(item, Mapping):
                        out |= input_paths(item, f"{path}[]")
                    elif item is not None:
                        out.add(f"{path}[]")
    return out


# --------------------------------------------------------------------------- rules


def _broken(rules: Mapping[str, Any], value: Any, present_parent: bool) -> str | None:
    """The first of `rules` that `value` breaks, as text; None when it keeps them all."""
    if value is _ABSENT:
        if rules.get("required") and present_parent:
            return "required"
        return None
    if rules.get("forbidden"):
        return "must be absent"
    kind = rules.get("type")
    if kind and (not isinstance(value, _TYPES[kind]) or
                 (kind in ("integer", "number") and isinstance(value, bool))):
        return f"type {kind}"
    if "enum" in rules and value not in rules["enum"]:
        return f"one of {', '.join(map(str, rules['enum']))}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = rules.get("min"), rules.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"range {'' if lo is None else lo}..{'' if hi is None else hi}"
    if isinstance(value, str):
        lo, hi = rules.get("min_length"), rules.get("max_length")
        if (lo is not None and len(value) < lo) or (hi is not None and len(value) > hi):
            return f"length {'' if lo is None else lo}..{'' if hi is None else hi}"
        if "pattern" in rules and not re.search(rules["pattern"], value):
            return f"pattern {rules['pattern']}"
    if isinstance(value, list):
        lo, hi = rules.get("min_items"), rules.get("max_items")
        if (lo is not None and len(value) < lo) or (hi is not None and len(value) > hi):
            return f"items {'' if lo is None else lo}..{'' if hi is None else hi}"
    return None


def _matches(scope: Mapping[str, Any], condition: Mapping[str, list[Any]]) -> bool:
    for path, values in condition.items():
        found = _locate(scope, path)
        value = found[0][1] if found else _ABSENT
        if value not in _values(values):
            return False
    return True


def violations(type_: str, name: str, inputs: Mapping[str, Any]) -> list[Violation]:
    """Every way a resource of `type_` named `name` with `inputs` breaks the contract."""
    types = contract()["types"]
    if type_ not in types:
        return [Violation(name, type_, "(type)", type_, "resource type has no contract entry",
                          "components/contract.yaml")]
    entry = types[type_]
    if entry.get("component"):
        extra = sorted(k for k, v in inputs.items() if v is not None)
        return [Violation(name, type_, k, inputs[k], "a component registers no inputs",
                          source_text(entry["source"])) for k in extra]
    rules = entry["inputs"]
    filled = dict(inputs)
    for key in entry.get("autoname", []):
        if filled.get(key) is None:
            filled[key] = f"{name}{AUTONAME_SUFFIX}"
    found: list[Violation] = []

    def add(path: str, value: Any, rule: str, source: Any) -> None:
        found.append(Violation(name, type_, path, value, rule, source_text(source)))

    for path in sorted(input_paths(filled) - set(rules)):
        add(path, "(set)", "no contract rule covers this input", "components/contract.yaml")
    for path, path_rules in rules.items():
        for where, value, parent in _locate(filled, path):
            broken = _broken(path_rules, value, parent)
            if broken:
                add(where, value, broken, path_rules["source"])
    for cross in entry.get("when", []):
        scope = cross.get("scope")
        scopes = [v for _, v, _ in _locate(filled, scope)] if scope else [filled]
        for i, item in enumerate(s for s in scopes if isinstance(s, Mapping)):
            if not _matches(item, cross["if"]):
                continue
            where = f"{scope.replace('[]', f'[{i}]')}." if scope else ""
            condition = " and ".join(f"{k} in {v}" for k, v in cross["if"].items())
            for path, then in cross["then"].items():
                for sub, value, parent in _locate(item, path) or [(path, _ABSENT, True)]:
                    broken = _broken(then, value, parent)
                    if broken:
                        add(where + sub, value, f"where {condition}: {broken}", cross["source"])
    return found


def check(resources: Iterable[Any], secret: Collection[str] = ()) -> None:
    """ContractError (one line) for the first violation among `resources` (objects with
    `type`, `name`, `inputs` and optionally `secret_inputs`), in name order so that the same
    stack always names the same one (the engine registers in no fixed order); secret values
    are masked."""
    for r in sorted(resources, key=lambda r: (r.name, r.type)):
        found = violations(r.type, r.name, r.inputs)
        if found:
            v = found[0]
            hidden = set(secret) | set(getattr(r, "secret_inputs", ()))
            if v.input.split(".")[0].split("[")[0] in hidden:
                v = Violation(v.resource, v.type, v.input, SECRET, v.rule, v.source)
            raise ContractError(str(v))
