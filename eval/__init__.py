"""Evaluation, benchmarks and the main job (installed as ``saicl.eval``).

- :mod:`saicl.eval.evaluate`: ``saicl-eval``, MetaICL-style evaluation (metrics in :mod:`saicl.eval.metrics`,
  model calls in :mod:`saicl.eval.scoring`);
- :mod:`saicl.eval.bench`: ``saicl-bench``, speed and peak memory against the number of demonstrations
  (cases in :mod:`saicl.eval.bench_cases`, FLOPs in :mod:`saicl.eval.flops`, memory in :mod:`saicl.eval.memory`);
- :mod:`saicl.eval.main_job`: ``saicl-run`` / ``python -m saicl run``, the whole loop with a report
  (:mod:`saicl.eval.report`, plots in :mod:`saicl.eval.plots`).

Nothing is imported here, so ``import saicl.eval.<module>`` stays cheap.
"""
