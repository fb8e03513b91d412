"""``python -m saicl``: version and backends; ``python -m saicl demo``: the built-in demonstration;
``python -m saicl run``: the main job (train, evaluate, benchmark, report; see ``saicl.eval.main_job``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "run":
        from .eval.main_job import main as run_main

        return run_main(argv[1:])
    if argv and argv[0] not in ("-h", "--help", "info"):
        print(f"unknown command {argv[0]!r}; expected 'info', 'demo' or 'run' (see --help)", file=sys.stderr)
        return 2
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m saicl [info | demo [--help] | run [--help]]\n"
              "  info  print the version and which attention backends are available here (default)\n"
              "  demo  run the built-in demonstration\n"
              "  run   the main job: meta-train tiny models under saicl/full/fid, evaluate them at k = 4..1024,\n"
              "        benchmark, and write a report folder (./saicl-report); at most 15 minutes on an idle\n"
              "        2-core CPU (one training seed; 'run --study' trains several)")
        return 0
    import torch

    from . import __version__
    from .attention import available_backends

    print(f"saicl {__version__} (torch {torch.__version__})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for name, reason in available_backends(device).items():
            print(f"  {device:4s} {name:8s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
