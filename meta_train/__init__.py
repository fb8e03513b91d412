"""saicl.meta_train: MetaICL-style meta-training (task data, synthetic tasks, episodes, Trainer-based training).

Modules: ``data`` (docs/design.md §6 loading, demonstrations, episodes), ``synthetic`` (ICL task families),
``sources`` + ``convert`` (offline real tasks, ``saicl-data``), ``episodes`` (training stream),
``models`` (named tiny configs), ``config`` + ``train`` + ``cli`` (``saicl-train``). Import the
submodules directly; this package imports nothing heavy.
"""
