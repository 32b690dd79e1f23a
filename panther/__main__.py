"""``python -m panther demo`` (the main job; ``--report-png PATH`` picks where the graph picture goes)
and ``python -m panther bench linear|conv2d|attention|causal-scaling|transformer|llama|decode [--device cuda]``
(``--plot FILE.png [--sizes 64,128]``: a size sweep, dense vs sketched, speed and memory drawn to FILE).
``python -m panther bench --help`` lists the benchmark options."""
import sys

USAGE = """usage: python -m panther {demo,bench} [options]

  demo    the main job: a built-in model, its graph diff report, speed and accuracy
          (python -m panther demo --help)
  bench   dense against sketched: linear, conv2d, attention, causal-scaling, transformer, llama, decode
          (python -m panther bench --help)

  --version   print panther's version"""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"panther {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    print(f"{USAGE}\n\npython -m panther: error: unknown command {command!r}; expected 'demo' or 'bench'",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
