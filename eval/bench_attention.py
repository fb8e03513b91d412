"""Moved: the attention level of ``saicl-bench`` (``saicl-bench --what attention``, docs/evaluation.md).

``python -m saicl.eval.bench_attention [flags]`` runs ``saicl-bench --what attention [flags]``; the dense
baseline ``sdpa-dense`` is the provider ``sdpa-bias`` (``--backends torch,flex,sdpa-bias``).
"""

import sys

from .bench import main as bench_main


def main(argv: list[str] | None = None) -> int:
    return bench_main(["--what", "attention", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
