"""`python -m bench`: herald's benchmark harness.

    python -m bench list                         what each scenario measures
    python -m bench SCENARIO [--backend B] ...   run one scenario; JSON to bench/results/
    python -m bench report                       bench/results/REPORT.md + PNG plots

Backends: `embedded` (SQLite + Dramatiq's in-process broker, the default) and
`production` (PostgreSQL + RabbitMQ on 127.0.0.1, a fresh schema and vhost per run).
Benchmarks print figures and compare them with the goals; they never fail on a timing.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Any

from bench.common import BACKENDS, command_line, describe_goals, quiet_logging, save_result, say


def _parser() -> argparse.ArgumentParser:
    from bench.scenarios import SCENARIOS

    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="herald benchmarks: run a scenario against the embedded default "
                    "(SQLite + in-process broker) or production (PostgreSQL + RabbitMQ).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenarios:\n" + "\n".join(
            f"  {name:<18} {m.SUMMARY}" for name, m in SCENARIOS.items())
        + "\n\nResults: bench/results/<scenario>-<backend>.json; "
          "`python -m bench report` renders REPORT.md and plots.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{list,report,SCENARIO}")
    sub.add_parser("list", help="describe the scenarios")
    sub.add_parser("report", help="render bench/results/REPORT.md and PNG plots")
    for name, module in SCENARIOS.items():
        p = sub.add_parser(name, help=module.SUMMARY, description=module.DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--backend", choices=BACKENDS, default="embedded",
                       help="embedded: SQLite + in-process broker (default); production: "
                            "PostgreSQL + RabbitMQ, fresh schema and vhost")
        p.add_argument("--no-save", action="store_true",
                       help="print only; do not write bench/results/")
        module.add_arguments(p)
    return parser


def _list() -> int:
    from bench.scenarios import SCENARIOS

    for name, module in SCENARIOS.items():
        print(f"{name}\n  {module.SUMMARY}\n")
        for line in module.DESCRIPTION.splitlines():
            print(f"  {line}")
        print(f"\n  options: python -m bench {name} --help\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "list":
        return _list()
    if args.command == "report":
        from bench.report import render

        return render()

    from bench.scenarios import SCENARIOS

    quiet_logging()
    module = SCENARIOS[args.command]
    say(f"== {args.command} on {args.backend} ==")
    started = time.time()
    try:
        result: dict[str, Any] = module.run(args)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception:
        traceback.print_exc()
        say(f"{args.command} on {args.backend}: failed (see the traceback above)")
        return 1
    options = {k: v for k, v in vars(args).items() if k not in ("command", "no_save")}
    result.update(scenario=args.command, backend=args.backend, options=options,
                  command=command_line(argv), started_at=started,
                  duration_s=time.time() - started)
    if result.get("goals"):
        say(describe_goals(result["goals"]))
    if not args.no_save:
        path = save_result(args.command, args.backend, result)
        say(f"results: {path.relative_to(path.parents[2])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
