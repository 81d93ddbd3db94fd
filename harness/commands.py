"""The spec commands: list, info, validate, ops."""

from __future__ import annotations

import sys
from pathlib import Path

from . import zoo
from .args import command, parse_sets, parse_shape
from .display import console, fmt_int, fmt_macs, table
from .errors import SpecError, UsageError
from .ops import OPS, REQUIRED, fmt_shape


def fmt_gmacs(macs: int) -> str:
    g = macs / 1e9
    return f"{g:.3f}" if g >= 0.01 else f"{g:.3g}"


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape)


@command("list", "List the model zoo with input shape, parameters and MACs")
def cmd_list(args) -> int:
    rows, errors = [], []
    for name in zoo.names():
        try:
            ir = zoo.validate(name)
        except SpecError as e:
            errors.append(str(e))
            continue
        m = ir.meta
        rows.append((name, m["title"], m["year"], _shape_text(ir.input_shape), fmt_int(ir.trainable_params),
                     fmt_int(ir.non_trainable_params), fmt_gmacs(ir.macs),
                     _shape_text(zoo.test_input(name))))
    out = console()
    out.print(table(f"{len(rows)} models", ["model", "title", "year", "input", "params", "non-trainable",
                                           "GMACs", "test input"], rows,
                    right=["params", "non-trainable", "GMACs"],
                    caption="params: trainable; non-trainable: BN running statistics; "
                            "GMACs: conv + linear multiply-accumulates per image, eval mode"))
    for e in errors:
        console(stderr=True).print(f"error: {e}", markup=False)
    return 2 if errors else 0


def _configure_info(p):
    p.add_argument("model", help="model name, alias or spec file")
    p.add_argument("--input", type=str, help="input CxHxW instead of the spec's default")
    p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a spec argument (repeatable)")
    p.add_argument("--params", action="store_true", help="list the parameter table too")


@command("info", "Per-node table of one model: op, output shape, parameters, MACs")
def cmd_info(args) -> int:
    shape = parse_shape(args.input) if args.input else None
    ir = zoo.load(args.model, shape, parse_sets(args.set) or None)
    params = ir.params
    rows = []
    for n in ir.nodes:
        count = sum(params[p].size for p in n.params)
        rows.append((n.name, n.op + (" (train only)" if n.train_only else ""), fmt_shape(n.shape),
                     fmt_int(count) if count else "", fmt_macs(n.macs) if n.macs else ""))
    m = ir.meta
    out = console()
    out.print(f"{ir.name}: {m['title']} ({m['year']})", markup=False)
    out.print(f"paper: {m['paper']}", markup=False)
    out.print(f"reproduces: {m['reproduces']}", markup=False)
    out.print(table(None, ["node", "op", "output", "params", "MACs"], rows, right=["params", "MACs"]))
    if args.params:
        out.print(table("parameters", ["name", "shape", "trainable", "init"],
                        [(p.name, fmt_shape(p.shape), "yes" if p.trainable else "no",
                          ", ".join(f"{k}={v}" for k, v in p.init.items())) for p in params.values()]))
    out.print(f"input {_shape_text(ir.input_shape)}, {len(ir.nodes)} nodes")
    out.print(f"trainable parameters:     {fmt_int(ir.trainable_params):>14}")
    out.print(f"non-trainable parameters: {fmt_int(ir.non_trainable_params):>14}")
    out.print(f"MACs (eval, per image):   {fmt_int(ir.macs):>14}  ({ir.macs / 1e9:.3f} GMACs)")
    return 0


cmd_info.configure = _configure_info


@command("validate", "Check spec files: schema, blocks, shapes, expected counts")
def cmd_validate(args) -> int:
    failed = 0
    for file in args.files:
        if Path(file).name == "spec.schema.json":
            print(f"{file}: skipped (the JSON Schema of specs, not a spec)")
            continue
        try:
            if not Path(file).is_file():
                raise SpecError("no such file", file=file) if not Path(file).exists() else \
                    SpecError("not a file", file=file)
            ir = zoo.validate(file)
            print(f"{file}: ok ({ir.name}: {fmt_int(ir.trainable_params)} params, {ir.macs / 1e9:.3f} GMACs)")
        except SpecError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            failed += 1
    return 2 if failed else 0


cmd_validate.configure = lambda p: p.add_argument("files", nargs="+", metavar="FILE", help="spec files")


@command("ops", "The op table: every op with its attributes")
def cmd_ops(args) -> int:
    out = console()
    names = args.op or [n for n in OPS if n != "input"]
    for name in names:
        if name not in OPS:
            raise UsageError(f"unknown op '{name}'")
        op = OPS[name]
        out.print(f"[bold]{name}[/bold]: {op.doc}")
        if op.attrs:
            out.print(table(None, ["attribute", "type", "default", "meaning"],
                            [(a.name, a.kind, "required" if a.default is REQUIRED else repr(a.default), a.doc)
                             for a in op.attrs]))
        else:
            out.print("  no attributes\n")
    return 0


cmd_ops.configure = lambda p: p.add_argument("op", nargs="*", help="ops to show (default: all)")
