"""Command line: `python -m seqpar bench [options]`, `python -m seqpar plan [options]`
(see `python -m seqpar COMMAND --help`)."""
import sys

COMMANDS = {"bench": "run every strategy against dense attention on a local world (--grid: the cost model "
                     "against measurement)",
            "plan": "predict every strategy's time on a problem and show the choice (no process group)"}


def _usage() -> str:
    lines = ["usage: python -m seqpar COMMAND [options]", "", "commands:"]
    lines += [f"  {name:8s} {text}" for name, text in COMMANDS.items()]
    lines += ["", "python -m seqpar COMMAND --help lists a command's options and their defaults."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"python -m seqpar: unknown command {argv[0]!r} (known commands: {', '.join(COMMANDS)})\n\n{_usage()}",
              file=sys.stderr)
        return 2
    if argv[0] == "plan":
        from .planner.cli import main as plan_main

        return plan_main(argv[1:])
    from .bench.exact import main as bench_main

    return bench_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
