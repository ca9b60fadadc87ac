"""`make bench`: run every benchmark side by side and write benchmarks/results/.

Usage: python -m benchmarks.run [--out DIR] [--only NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
from pathlib import Path

from benchmarks import common

BENCHMARKS = ("optimizers", "training", "compile", "microbatches", "resnet50", "system", "load", "parallel_trials", "tune")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    machine = common.machine_description()
    pkgs = common.versions("jax", "jaxlib", "flax", "optax", "numpy")
    sections, raw = [], {"machine": machine, "versions": pkgs}
    rounds = 2 if args.quick else 5
    for name in args.only:
        module = __import__(f"benchmarks.{name}", fromlist=["run", "to_markdown"])
        logging.info("running %s", name)
        # The load run has its own smoke shape (4 clients for 5 s) rather than fewer rounds.
        # parallel_trials runs whole experiments: 2 rounds (P = 1..4, then 4..1), smaller if quick.
        # tune runs the same study three ways (local, services, Ray Tune): 2 rounds, 2 runs if quick.
        extra = {"quick": args.quick} if name in ("load", "parallel_trials", "tune") else {}
        full_rounds = {"compile": 3, "microbatches": 2, "system": 3, "parallel_trials": 2, "tune": 2}.get(name, rounds)
        result = module.run(rounds=1 if args.quick else full_rounds, **extra)
        raw[name] = result
        sections.append(module.to_markdown(result))

    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        f"# batchlab benchmarks ({stamp})",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine.items()],
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in pkgs.items()),
        "",
        "Command: `make bench` (python -m benchmarks.run). Contenders run in interleaved rounds in one process.",
        "",
    ]
    kind = re.sub(r"[^a-z0-9]+", "-", f"{machine['jax backend']}-{machine['devices']}".lower()).strip("-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{kind}.md"
    md.write_text("\n".join(header) + "\n".join(sections))
    (out / f"{kind}.json").write_text(json.dumps(raw, indent=1, default=str))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
