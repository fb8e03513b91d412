"""``saicl-eval``'s settings: what to evaluate (:class:`EvalConfig`) and how to run it (:class:`EvalRunOptions`).

Each field's default, type and help text live here once; ``saicl-eval``'s flags are generated from both
dataclasses (:mod:`saicl.config_cli`). Both validate themselves and raise :class:`~saicl.config_cli.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from saicl.config_cli import ConfigError, check_at_least, check_choices
from saicl.structures import STRUCTURES

DEFAULT_SEEDS = (100, 13, 21, 42, 87)
DTYPES = ("float32", "bfloat16", "float16")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class EvalConfig:
    """What to evaluate and how (the CLI flags map one to one onto these fields; ``ks`` is ``--k``).

    Attributes:
        data: task collection (format: docs/design.md): a ``.jsonl`` file or a MetaICL folder.
        split: ``"test"`` (held-out tasks) or ``"train"`` of the split config.
        split_config: split config path or shipped name (default: ``splits.json`` in the folder, if any).
        structures: encoder structures to evaluate the same weights under.
        seeds: demonstration seeds.
        ks: demonstrations per episode (several values give the scaling curve).
        orders: demonstration orders per seed (1 = no order-sensitivity check).
        tasks: only these tasks (``None``: all of the split).
        max_queries: at most this many test queries per task (``None``: all), the first ones in file order.
    """

    data: str = field(metadata={"help": "task collection (docs/design.md): a .jsonl file or a MetaICL folder "
                                        "with splits.json"})
    split: str = field(default="test", metadata={
        "help": "which tasks of the split config to evaluate (test: the held-out tasks)", "choices": ("test", "train")})
    split_config: str | None = field(default=None, metadata={
        "help": "split config JSON (path or shipped name); none: splits.json in the data folder"})
    structures: tuple[str, ...] = field(default=("saicl", "full", "fid"), metadata={
        "help": "encoder structures, the same weights under each"})
    seeds: tuple[int, ...] = field(default=DEFAULT_SEEDS, metadata={"help": "demonstration seeds"})
    ks: tuple[int, ...] = field(default=(16,), metadata={
        "flag": "--k", "metavar": "K", "help": "demonstration counts; several give a scaling curve and plot, "
                                              "e.g. 4,16,64,256"})
    orders: int = field(default=3, metadata={
        "help": "demonstration orders per seed for the order-sensitivity check; 1 disables it"})
    tasks: tuple[str, ...] | None = field(default=None, metadata={"help": "task names to evaluate (none: all)"})
    max_queries: int | None = field(default=None, metadata={"help": "at most this many queries per task "
                                                                    "(none: all)"})
    batch_size: int = field(default=16, metadata={"help": "episodes per encoder pass"})
    max_new_tokens: int = field(default=16, metadata={"help": "generation length for tasks without options"})
    max_demo_tokens: int = field(default=256, metadata={"help": "token cap per demonstration"})
    max_query_tokens: int = field(default=256, metadata={"help": "token cap of the query"})
    template: str = field(default="{input} {output}", metadata={"help": "demonstration template"})
    query_template: str = field(default="{input}", metadata={"help": "query template"})

    def __post_init__(self):
        # tuples, not lists: the config is hashed into the JSON as given and compared across runs
        for name in ("structures", "seeds", "ks", "tasks"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))
        check_choices(self, ("split",))
        for name in ("structures", "seeds", "ks", "tasks"):
            value = getattr(self, name)
            if value is not None and not value:
                raise ConfigError(name, value, "needs at least one value")
        unknown = [s for s in self.structures if s not in STRUCTURES]
        if unknown:
            raise ConfigError("structures", self.structures,
                              f"unknown structure {unknown[0]!r}; expected some of {', '.join(sorted(STRUCTURES))}")
        check_at_least(self, 0, ("ks",))
        check_at_least(self, 1, ("orders", "max_queries", "batch_size", "max_new_tokens", "max_demo_tokens",
                                 "max_query_tokens"))
        for name in ("template", "query_template"):
            if "{input}" not in getattr(self, name):
                raise ConfigError(name, getattr(self, name), "expected a template containing {input}")


@dataclass
class EvalRunOptions:
    """How ``saicl-eval`` runs: the checkpoint, where it runs, where the results go (not part of the results)."""

    checkpoint: str = field(metadata={"help": "save_pretrained folder of a T5 or SAICL model"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "tokenizer folder or Hub id, or 'byt5' (none: the checkpoint's own)"})
    attn_backend: str = field(default="auto", metadata={"help": "encoder attention backend"})
    device: str = field(default_factory=_default_device, metadata={
        "help": "device to run on (cuda if available, else cpu; under torchrun, cuda means cuda:LOCAL_RANK)"})
    dtype: str = field(default="float32", metadata={"help": "model weights dtype", "choices": DTYPES})
    json: str | None = field(default=None, metadata={"metavar": "PATH",
                                                     "help": "write the full results as JSON to PATH"})
    plot_dir: str | None = field(default=None, metadata={
        "metavar": "DIR", "help": "write PNG plots to DIR (none: next to --json; no plots without either)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar on stderr"})

    def __post_init__(self):
        check_choices(self, ("dtype",))
        from saicl.attention.registry import check_backend_name

        try:
            check_backend_name(self.attn_backend)
        except ValueError as err:
            raise ConfigError("attn_backend", self.attn_backend, str(err)) from err


__all__ = ["DEFAULT_SEEDS", "DTYPES", "EvalConfig", "EvalRunOptions"]
