"""Command line: `python -m seqpar bench [options]`, `python -m seqpar plan [options]`
(see `python -m seqpar COMMAND --help`)."""
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"bench": "run every strategy against dense attention on a local world (--grid: the cost model "
                         "against measurement)",
                "plan": "predict every strategy's time on a problem and show the choice (no process group)"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m seqpar COMMAND [options]\n\ncommands:")
        for name, text in commands.items():
            print(f"  {name:8s} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if argv[0] == "plan":
        from .dispatch import main as plan_main

        return plan_main(argv[1:])
    from .benchmark import main as bench_main

    return bench_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
