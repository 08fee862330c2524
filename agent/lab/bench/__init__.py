"""`tdn bench`: model (Table 1), stream (the line under load), soak, bridge, frame (per-frame cost), swap, heldout,
explain (the explainer's cost)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    from agent.lab.bench import bridge, explain, frame, heldout, model, soak, stream, swap

    for name, module in (("model", model), ("stream", stream), ("soak", soak), ("bridge", bridge),
                         ("frame", frame), ("swap", swap), ("heldout", heldout), ("explain", explain)):
        doc = (module.__doc__ or "").strip().replace("%", "%%")  # argparse formats help with %
        sp = sub.add_parser(name, help=doc.splitlines()[0], description=doc)
        module.add_arguments(sp)
        sp.set_defaults(bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args.bench_run(args))
