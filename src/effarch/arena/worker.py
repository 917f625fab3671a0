"""One arena job in its own process (see `effarch.arena.parallel`): one architecture, one phase, one device.

`python -m effarch.arena.worker --suite-file suite.json --arch SPEC --out FOLDER --only quality|speed
--device cuda [--data PATH] [--stop-after S]`. It writes FOLDER/results.json as cells finish and no report.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from effarch.arena.runner import Arena, ArenaOptions
    from effarch.arena.suites import Suite

    p = argparse.ArgumentParser(prog="python -m effarch.arena.worker")
    p.add_argument("--suite-file", required=True)
    p.add_argument("--arch", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--only", required=True, choices=["quality", "speed"])
    p.add_argument("--device", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--stop-after", type=float, default=None)
    args = p.parse_args(argv)
    with open(args.suite_file, encoding="utf-8") as f:
        suite = Suite.from_dict(json.load(f))
    opts = ArenaOptions(
        suite=suite,
        archs=[args.arch],
        data=args.data,
        out=args.out,
        device=args.device,
        only=args.only,
        stop_after_s=args.stop_after,
        progress=False,
        workers=1,
    )
    Arena(opts).run(write_report=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
