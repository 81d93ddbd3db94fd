"""The spec language: reading, schema validation and expansion into a flat node list.

A spec's ``layers`` is a sequence of items; each item takes the previous item's output
unless it names ``inputs``. Items:

* ``{"op": OP, "name"?, "inputs"?, ATTRS...}``: one node of the op table.
* ``{"block": ID, "name"?, "args"?}``: a call of a reusable block (``blocks`` section); the
  block's body is a sequence in the scope ``name``; ``"$arg"`` strings in it are replaced by
  the call's argument values (plain data substitution, no expressions).
* ``{"repeat": N, "name"?, "start"?, "block"|"body", "args"?, "first"?, "each"?}``: N copies
  named ``start``, ``start+1``...; ``args`` for every copy, ``first`` overriding them in the
  first, ``each`` a list of N values per argument.
* ``{"seq": [...], "name"?}``: a named sub-sequence.
* ``{"add"|"concat"|"mul": [BRANCH, ...], "name"?}``: branches fed the same input and merged;
  a branch is a list of items (empty = identity) or ``{"name", "body"}`` (name ``""`` keeps
  the branch in the enclosing scope).
* ``{"aux": [...], "name", "weight"}``: a side output (auxiliary head) with its loss weight,
  run in training only; the input passes through.
* A list (spliced in) or ``"$arg"`` standing for a list of items.

Names: an item without a name is named by its index in its sequence; node names join
scopes with dots (``layer3.2.conv1``). Block calls, repeats, ``seq`` items and named
branches open scopes; a named branch ``{"name": "downsample", "body": ...}`` lives in the
enclosing scope (as torchvision's submodules do: ``layer1.0.downsample.0``), so two merges in
one scope need different branch names; an unnamed branch is scoped ``<merge name>.<index>``.
``inputs`` entries are resolved lexically (the innermost scope first, then outwards);
``"@input"`` is the input of the enclosing sequence.

Arguments are lexical: a block body sees only its own arguments (pass a top-level argument
such as ``$classes`` on explicitly); an inline ``repeat`` body or a branch sees the enclosing
ones. A block's defaults may name its other arguments (``"$out"``). ``defaults`` gives
attributes per op for the whole spec; its ``init`` entries apply to the parameters a node
has (a default bias initializer is ignored on a conv without bias).
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import SpecError, UsageError
from .ops import OPS

# harness/specs: in a checkout a link to specs/ (resolved: messages name specs/), in a wheel the copy.
SCHEMA_PATH = (Path(__file__).resolve().parent / "specs" / "spec.schema.json").resolve()
LIMITS = {"bytes": 4_000_000, "depth": 64, "nodes": 100_000, "params": 10_000_000_000}
"""What a spec may be: its file's size, the nesting of its lists and objects (the zoo's deepest
is under 20), the nodes it expands to (Inception-ResNet-v2, the largest, has under 1,000), its
parameters (VGG-19-BN, the largest, has 144M). Each is overridden by SAMENET_SPEC_BYTES,
SAMENET_SPEC_DEPTH, SAMENET_SPEC_NODES, SAMENET_SPEC_PARAMS."""

ITEM_KEYS = ("op", "block", "repeat", "seq", "aux", "add", "concat", "mul")
MERGES = ("add", "concat", "mul")


@dataclass
class RawNode:
    """A node as expanded from a spec, before shape inference."""

    name: str
    op: str
    attrs: dict
    inputs: list[str]
    refs: list[str] | None  # explicit references still to resolve, else None
    scope: str
    path: str
    chain: tuple[str, ...] = ()
    train_only: bool = False
    default_init: dict = field(default_factory=dict)  # the spec's per-op default initializers

    def where(self) -> str:
        """JSON path plus the block calls that led here."""
        if not self.chain:
            return self.path
        return f"{self.path} (via {' > '.join(self.chain)})"


@dataclass
class Expansion:
    """Result of expanding a spec document."""

    nodes: list[RawNode]
    output: str
    aux: list[tuple[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------- reading


def read_document(path: str | Path) -> dict:
    """Reads a spec file, resolves ``extends`` and schema-checks the result.

    Raises:
        SpecError: with the file and a JSON path.
    """
    path = Path(path)
    doc = resolve_extends(_read_json(path), path, ())
    validate_document(doc, str(path))
    return doc


NOT_INHERITED = ("name", "aliases", "extends", "$schema")
"""Top-level keys a spec never takes from the spec it extends."""
MERGED_BY_KEY = ("args", "blocks")
"""Top-level objects merged key by key (the extending spec's entries win); ``defaults`` is
merged per op and then per attribute. Every other key is replaced whole."""


def resolve_extends(doc: Any, path: Path, seen: tuple[Path, ...]) -> Any:
    """The document with its ``extends`` chain applied (a family member over its base).

    ``"extends": "resnet50"`` names a spec file in the same folder (``resnet50.json``, or a
    relative path ending in ``.json``). The result keeps ``extends`` as provenance.
    """
    if not isinstance(doc, dict) or "extends" not in doc:
        return doc
    file, base_ref = str(path), doc["extends"]
    if not isinstance(base_ref, str) or not base_ref:
        raise SpecError(f"extends names a spec file in the same folder, got {base_ref!r}", file=file, path="$.extends")
    base_path = path.parent / (base_ref if base_ref.endswith(".json") else f"{base_ref}.json")
    chain = (*seen, path.resolve())
    if base_path.resolve() in chain:
        names = " -> ".join(p.stem for p in (*chain, base_path.resolve()))
        raise SpecError(f"extends cycle: {names}", file=file, path="$.extends")
    if not base_path.is_file():
        raise SpecError(f"extends '{base_ref}': no spec file {base_path}", file=file, path="$.extends")
    try:
        base = resolve_extends(_read_json(base_path), base_path, chain)
    except SpecError as e:
        raise SpecError(f"extends '{base_ref}': {e}", file=file, path="$.extends") from None
    if not isinstance(base, dict):
        raise SpecError(f"extends '{base_ref}': the base is not a spec object", file=file, path="$.extends")
    merged = {k: copy.deepcopy(v) for k, v in base.items() if k not in NOT_INHERITED}
    for key, value in doc.items():
        if key in MERGED_BY_KEY and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif key == "defaults" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            defaults = dict(merged[key])
            for op, attrs in value.items():
                before = defaults.get(op)
                defaults[op] = {**before, **attrs} if isinstance(before, dict) and isinstance(attrs, dict) else attrs
            merged[key] = defaults
        else:
            merged[key] = value
    return merged


def _read_json(path: Path) -> Any:
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("no such file", file=file) from None
    except IsADirectoryError:
        raise SpecError("is a directory, not a spec file", file=file) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read: {e}", file=file) from None
    return parse_json(text, file)


def limit(name: str) -> int:
    """A bound on what a spec may be (LIMITS), or its SAMENET_SPEC_<NAME> override."""
    value = os.environ.get(f"SAMENET_SPEC_{name.upper()}")
    try:
        return int(value) if value else LIMITS[name]
    except ValueError:
        raise UsageError(f"SAMENET_SPEC_{name.upper()}: expected an integer, got '{value}'") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise _BadJSON(f"duplicate key '{dup}' in an object (JSON keeps only the last; say it once)")
    return dict(pairs)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadJSON(f"number {text} is out of range (not a finite float)")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 18:
        raise _BadJSON(f"integer {text[:20]}... has {len(text.lstrip('-'))} digits (at most 18)")
    return int(text)


def _constant(name: str):
    raise _BadJSON(f"{name} is not a JSON number (write a finite number)")


class _BadJSON(ValueError):
    pass


def _nesting(text: str) -> int:
    """The deepest nesting of [ and { outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(text: str, file: str) -> Any:
    """A spec's JSON, strictly: bounded size and nesting, no duplicate keys, finite numbers only."""
    if len(text) > limit("bytes"):
        raise SpecError(f"{len(text)} bytes, more than a spec may hold ({limit('bytes')}; SAMENET_SPEC_BYTES)",
                        file=file)
    depth = _nesting(text)
    if depth > limit("depth"):
        raise SpecError(f"lists and objects nested {depth} deep, more than {limit('depth')} (SAMENET_SPEC_DEPTH)",
                        file=file)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_finite, parse_int=_bounded_int,
                          parse_constant=_constant)
    except _BadJSON as e:
        raise SpecError(f"invalid JSON: {e}", file=file) from None
    except json.JSONDecodeError as e:
        raise SpecError(f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})", file=file) from None
    except (ValueError, RecursionError) as e:
        raise SpecError(f"invalid JSON: {type(e).__name__}: {e}"[:300], file=file) from None


@lru_cache(maxsize=None)
def _validator(definition: str | None = None):
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    if definition is not None:  # one of the schema's definitions, for a part of a spec
        schema = {"$defs": schema["$defs"], "$ref": f"#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(schema)


def validate_document(doc: Any, file: str, definition: str | None = None, at: str = "$",
                      chain: tuple[str, ...] = ()) -> None:
    """Checks a parsed spec against specs/spec.schema.json.

    Args:
        definition: Check ``doc`` against this definition of the schema (``item``: an item a
            block argument delivered) rather than as a whole spec.
        at: The JSON path of ``doc`` in its spec, for the error.
        chain: The block calls that led there, for the error.
    """
    import jsonschema

    try:
        error = jsonschema.exceptions.best_match(_validator(definition).iter_errors(doc))
    except RecursionError:
        raise SpecError("nested too deep to check", file=file) from None
    if error is None:
        return
    where = at + error.json_path[1:]
    if chain:
        where += f" (via {' > '.join(chain)})"
    # Point at the item, with a message a person can act on, when no item kind matched.
    item = error.instance if isinstance(error.instance, dict) else None
    if item is not None and error.validator in ("oneOf", "additionalProperties", "required", "maxProperties") \
            and not any(k in item for k in ITEM_KEYS) and where.startswith("$.") and where != "$":
        top_level = where.count(".") == 1 and "[" not in where
        if not top_level:
            raise SpecError(f"an item needs one of the keys {', '.join(ITEM_KEYS)}; got {sorted(item)}",
                            file=file, path=where)
    message = error.message
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        present = [k for k in ITEM_KEYS if k in error.instance]
        if len(present) > 1:
            message = f"an item takes only one of {', '.join(ITEM_KEYS)}; got {', '.join(present)}"
    raise SpecError(f"schema: {message}", file=file, path=where)


# --------------------------------------------------------------------------- substitution


def is_argref(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("$") and len(value) > 1


def substitute(value: Any, env: dict) -> Any:
    """Replaces every ``"$name"`` bound in ``env`` by its value; leaves unbound ones."""
    if is_argref(value):
        key = value[1:]
        return copy.deepcopy(env[key]) if key in env else value
    if isinstance(value, list):
        return [substitute(v, env) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, env) for k, v in value.items()}
    return value


def find_unbound(value: Any, path: str) -> tuple[str, str] | None:
    """The first ``"$name"`` left in a value, with its path, or None."""
    if is_argref(value):
        return value[1:], path
    if isinstance(value, list):
        for i, v in enumerate(value):
            hit = find_unbound(v, f"{path}[{i}]")
            if hit:
                return hit
    if isinstance(value, dict):
        for k, v in value.items():
            hit = find_unbound(v, f"{path}.{k}")
            if hit:
                return hit
    return None


# --------------------------------------------------------------------------- expansion


class Expander:
    """Expands a checked spec document into RawNodes (see module docs)."""

    def __init__(self, doc: dict, file: str):
        self.doc = doc
        self.file = file
        self.blocks = doc.get("blocks", {})
        self.defaults = doc.get("defaults", {})
        self.nodes: list[RawNode] = []
        self.where: dict[str, str] = {}
        self.aux: list[tuple[str, float]] = []

    def error(self, reason: str, path: str, chain: tuple[str, ...] = ()) -> SpecError:
        if chain:
            path = f"{path} (via {' > '.join(chain)})"
        return SpecError(reason, file=self.file, path=path)

    def check_bound(self, value: Any, path: str, chain) -> None:
        hit = find_unbound(value, path)
        if hit:
            raise self.error(f"missing block argument '{hit[0]}'", hit[1], chain)

    def add_node(self, node: RawNode) -> str:
        if len(self.nodes) >= limit("nodes"):
            raise SpecError(f"expands to more than {limit('nodes')} nodes (SAMENET_SPEC_NODES)", file=self.file,
                            path=node.where())
        if not isinstance(node.name, str) or not node.name or node.name != node.name.strip():
            raise SpecError(f"a node name is a non-empty string without surrounding space, got {node.name!r}",
                            file=self.file, path=node.where())
        if node.name in self.where:
            raise SpecError(f"duplicate node name '{node.name}' (first defined at {self.where[node.name]})",
                            file=self.file, path=node.where())
        self.where[node.name] = node.where()
        self.nodes.append(node)
        return node.name

    def expand(self, overrides: dict | None = None) -> Expansion:
        env = dict(self.doc.get("args", {}))
        for key, value in (overrides or {}).items():
            if key not in env:
                raise SpecError(f"the spec has no argument '{key}' (args: {', '.join(env) or 'none'})",
                                file=self.file, path="$.args")
            env[key] = value
        self.add_node(RawNode("input", "input", {}, [], None, "", "$.input"))
        out = self.sequence(self.doc["layers"], "$.layers", "", env, "input", (), False)
        return Expansion(self.nodes, out, self.aux)

    @staticmethod
    def join(scope: str, name: str) -> str:
        return f"{scope}.{name}" if scope and name else (scope or name)

    def sequence(self, items, path, scope, env, inp, chain, train_only) -> str:
        written = items
        items = substitute(items, env)
        if is_argref(items):
            raise self.error(f"missing block argument '{items[1:]}'", path, chain)
        if not isinstance(items, list):
            raise self.error(f"expected a list of items, got {type(items).__name__}", path, chain)
        cur = inp
        for i, item in enumerate(items):
            if is_argref(written) or is_argref(written[i]):  # an argument's items: the schema never saw them
                validate_document(item, self.file, "item", f"{path}[{i}]", chain)
            cur = self.item(item, f"{path}[{i}]", scope, str(i), env, cur, inp, chain, train_only)
        return cur

    def item(self, item, path, scope, index, env, cur, seq_input, chain, train_only) -> str:
        if isinstance(item, list):
            return self.sequence(item, path, self.join(scope, index), env, cur, chain, train_only)
        if is_argref(item):
            raise self.error(f"missing block argument '{item[1:]}'", path, chain)
        if not isinstance(item, dict):
            raise self.error(f"an item is an object or a list, got {item!r}", path, chain)
        kinds = [k for k in ITEM_KEYS if k in item]
        if "repeat" in item and kinds == ["block", "repeat"]:
            kinds = ["repeat"]  # a repeat names the block it repeats
        if len(kinds) != 1:
            raise self.error(f"an item needs exactly one of the keys {', '.join(ITEM_KEYS)}; got {sorted(item)}",
                             path, chain)
        kind = kinds[0]
        name = substitute(item.get("name", index), env)
        self.check_bound(name, path + ".name", chain)
        if isinstance(name, int) and not isinstance(name, bool):
            name = str(name)
        if not isinstance(name, str) or name != name.strip():
            raise self.error(f"a name is a string without surrounding space, got {name!r}",
                             path + ".name", chain)
        if kind == "op":
            return self.op(item, path, scope, name, env, cur, seq_input, chain, train_only)
        if kind == "block":
            args = substitute(item.get("args", {}), env)
            self.check_bound(args, path + ".args", chain)
            return self.call(item["block"], args, path, self.join(scope, name), cur, chain, train_only)
        if kind == "repeat":
            return self.repeat(item, path, self.join(scope, name), env, cur, chain, train_only)
        if kind == "seq":
            return self.sequence(item["seq"], path + ".seq", self.join(scope, name), env, cur, chain, train_only)
        if kind == "aux":
            weight = substitute(item.get("weight"), env)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight < 0:
                raise self.error(f"an aux weight is a finite number >= 0, got {weight!r}", path + ".weight", chain)
            out = self.sequence(item["aux"], path + ".aux", self.join(scope, name), env, cur, chain, True)
            self.aux.append((out, float(weight)))
            return cur
        return self.merge(kind, item, path, scope, name, env, cur, chain, train_only)

    def op(self, item, path, scope, name, env, cur, seq_input, chain, train_only) -> str:
        item = substitute(item, env)
        op = item["op"]
        self.check_bound(op, path + ".op", chain)
        if not isinstance(op, str):
            raise self.error(f"an op is an op name (a string), got {type(op).__name__}", path + ".op", chain)
        if op not in OPS or op == "input":
            known = ", ".join(sorted(k for k in OPS if k != "input"))
            raise self.error(f"unknown op '{op}' (known: {known})", path + ".op", chain)
        attrs = {k: v for k, v in item.items() if k not in ("op", "name", "inputs")}
        defaults = self.defaults.get(op, {})
        merged = {**defaults, **attrs}
        merged.pop("init", None)
        default_init = defaults.get("init", {})
        if "init" in attrs:
            merged["init"] = attrs["init"]
        self.check_bound(merged, path, chain)
        refs = None
        inputs = [cur]
        if "inputs" in item:
            self.check_bound(item["inputs"], path + ".inputs", chain)
            refs = [seq_input if r == "@input" else r for r in item["inputs"]]
            inputs = []
        node = RawNode(self.join(scope, name), op, merged, inputs, refs, scope, path, chain, train_only,
                       default_init if isinstance(default_init, dict) else {})
        return self.add_node(node)

    def call(self, block_id, args, path, scope, cur, chain, train_only) -> str:
        if not isinstance(block_id, str):
            raise self.error(f"a block is a block name (a string), got {type(block_id).__name__}", path + ".block",
                             chain)
        if not isinstance(args, dict):
            raise self.error(f"'args' is an object, got {type(args).__name__}", path + ".args", chain)
        if block_id not in self.blocks:
            known = ", ".join(sorted(self.blocks)) or "none"
            raise self.error(f"unknown block '{block_id}' (known: {known})", path + ".block", chain)
        if any(c.startswith(f"$.blocks.{block_id}.") for c in chain) or len(chain) > 32:
            raise self.error(f"block '{block_id}' calls itself", path, chain)
        block = self.blocks[block_id]
        declared = block.get("args", [])
        defaults = block.get("defaults", {})
        for key in defaults:
            if key not in declared:
                raise self.error(f"default for undeclared argument '{key}'", f"$.blocks.{block_id}.defaults")
        for key in args:
            if key not in declared:
                raise self.error(f"block '{block_id}' has no argument '{key}' (args: {', '.join(declared) or 'none'})",
                                 f"{path}.args.{key}", chain)
        env = {**defaults, **args}
        for key in declared:
            if key not in env:
                raise self.error(f"block '{block_id}' needs argument '{key}'", path, chain)
        return self.sequence(block["body"], f"$.blocks.{block_id}.body", scope, env, cur, (*chain, path), train_only)

    def repeat(self, item, path, scope, env, cur, chain, train_only) -> str:
        item = {k: (substitute(v, env) if k != "body" else v) for k, v in item.items()}
        self.check_bound({k: v for k, v in item.items() if k != "body"}, path, chain)
        n = item["repeat"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise self.error(f"repeat count must be a positive integer, got {n!r}", path + ".repeat", chain)
        if n > limit("nodes"):
            raise self.error(f"repeat count {n} is more than a spec's {limit('nodes')} nodes (SAMENET_SPEC_NODES)",
                             path + ".repeat", chain)
        for key in ("args", "first", "each"):
            if not isinstance(item.get(key, {}), dict):
                raise self.error(f"'{key}' is an object, got {type(item[key]).__name__}", f"{path}.{key}", chain)
        start = item.get("start", 0)
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise self.error(f"'start' is an integer >= 0, got {start!r}", path + ".start", chain)
        each = item.get("each", {})
        for key, values in each.items():
            if not isinstance(values, list) or len(values) != n:
                raise self.error(f"'each' needs a list of {n} values", f"{path}.each.{key}", chain)
        start = item.get("start", 0)
        for i in range(n):
            args = {**item.get("args", {}), **(item.get("first", {}) if i == 0 else {}),
                    **{k: v[i] for k, v in each.items()}}
            sub = self.join(scope, str(start + i))
            if "block" in item:
                cur = self.call(item["block"], args, path, sub, cur, chain, train_only)
            else:
                shadowed = sorted(set(args) & set(env))
                if shadowed:
                    raise self.error(f"repeat argument '{shadowed[0]}' shadows an enclosing argument", path, chain)
                cur = self.sequence(item["body"], path + ".body", sub, {**env, **args}, cur, chain, train_only)
        return cur

    def merge(self, kind, item, path, scope, name, env, cur, chain, train_only) -> str:
        branches = substitute(item[kind], env)
        if is_argref(branches):
            raise self.error(f"missing block argument '{branches[1:]}'", f"{path}.{kind}", chain)
        if not isinstance(branches, list) or not branches:
            raise self.error(f"{kind} takes a non-empty list of branches, got {type(branches).__name__}",
                             f"{path}.{kind}", chain)
        if kind == "mul" and len(branches) != 2:
            raise self.error(f"mul takes exactly 2 branches, got {len(branches)}", f"{path}.{kind}", chain)
        outs = []
        for b, branch in enumerate(branches):
            bpath = f"{path}.{kind}[{b}]"
            if isinstance(branch, dict) and "body" in branch:
                bname = branch.get("name", f"{name}.{b}")
                if not isinstance(bname, str) or bname != bname.strip():
                    raise self.error(f"a branch name is a string without surrounding space, got {bname!r}",
                                     bpath + ".name", chain)
                bscope = self.join(scope, bname)
                body, bpath = branch["body"], bpath + ".body"
            else:
                bscope, body = self.join(scope, f"{name}.{b}"), branch
            outs.append(self.sequence(body, bpath, bscope, env, cur, chain, train_only))
        node = RawNode(self.join(scope, name), kind, {}, outs, None, scope, path, chain, train_only)
        return self.add_node(node)


def expand(doc: dict, file: str, overrides: dict | None = None) -> Expansion:
    """Expands a checked document into a flat list of raw nodes."""
    return Expander(doc, file).expand(overrides)
