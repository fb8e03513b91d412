"""TrainConfig: every knob of a meta-training run, validated on construction; YAML files and CLI flags map onto it."""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .episodes import KSchedule
from .models import NAMED_CONFIGS

SYNTHETIC = "synthetic"


@dataclass
class TrainConfig:
    """A meta-training run. The defaults are the built-in default run: a tiny T5 from scratch on the
    synthetic ``lookup`` family (exact-match lookup), the recipe measured in ``docs/meta_training.md``."""

    # what to train
    model: str = field(default="tiny", metadata={"help": f"named tiny config {sorted(NAMED_CONFIGS)}, a local "
                                                 "T5/SAICL checkpoint folder, or a Hub id"})
    structure: str = field(default="saicl", metadata={"help": "encoder structure: saicl, full or fid"})
    attn_backend: str = field(default="auto", metadata={"help": "attention backend (auto, torch, eager, flex, ...)"})
    # data
    data: str = field(default=SYNTHETIC, metadata={"help": "'synthetic' or 'synthetic:FAMILY[,FAMILY]' (fresh tasks "
                                                   "every episode: lookup, mapping, position, noisy, noisy-keys), or a "
                                                   ".jsonl file, MetaICL folder or Hub dataset (docs/design.md §6)"})
    data_config: str | None = field(default=None, metadata={"help": "split config for --data (path or shipped "
                                                            "name); its 'train' tasks train, 'test' tasks evaluate"})
    k: str = field(default="2", metadata={"help": "demonstrations per episode: N or a range LO-HI drawn uniformly"})
    k_start: int | None = field(default=None, metadata={"help": "curriculum: the upper end of k during the first "
                                                        "--k-warmup-steps steps (few demonstrations first)"})
    k_warmup_steps: int = field(default=0, metadata={"help": "curriculum length in optimizer steps"})
    lookup_labels: int = field(default=4, metadata={"help": "label tokens per synthetic lookup task (chance = 1/N)"})
    max_demo_tokens: int = field(default=64, metadata={"help": "per-demonstration token cap"})
    max_query_tokens: int = field(default=64, metadata={"help": "query token cap"})
    max_target_tokens: int = field(default=32, metadata={"help": "output (label) token cap"})
    template: str = field(default="{input} {output}", metadata={"help": "demonstration template"})
    # optimisation
    output_dir: str = field(default="runs/meta_train", metadata={"help": "checkpoints, final model, results"})
    max_steps: int = field(default=1500, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=128, metadata={"help": "episodes per optimizer step, over all processes"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW)"})
    warmup_steps: int = field(default=200, metadata={"help": "linear learning-rate warm-up steps"})
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": "transformers scheduler name"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    seed: int = field(default=0, metadata={"help": "initialisation and data seed (same seed = same init for every "
                                           "structure)"})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: on for CUDA devices that "
                                                      "support bf16, off on CPU; see resolve_precision)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    # bookkeeping
    eval_steps: int = field(default=250, metadata={"help": "held-out loss and accuracy every N steps (0: off)"})
    eval_episodes: int = field(default=256, metadata={"help": "held-out episodes per evaluation"})
    eval_k: int | None = field(default=4, metadata={"help": "demonstrations in held-out episodes (none: the top of "
                                                    "--k); the default run trains on k=2 and is measured at k=4"})
    save_steps: int = field(default=500, metadata={"help": "checkpoint every N steps"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    logging_steps: int = field(default=50, metadata={"help": "training-loss log interval"})
    resume: str | None = field(default=None, metadata={"help": "'latest' (newest checkpoint in --output-dir) or "
                                                       "a checkpoint folder"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)"})
    num_workers: int = field(default=0, metadata={"help": "data-loader worker processes"})
    fsdp: str = field(default="", metadata={"help": "FSDP2 over all processes (torchrun/accelerate launch; CPU gloo or "
                                           "GPU): full_shard or shard_grad_op, optionally 'offload'; bare --fsdp "
                                           "means full_shard (each encoder/decoder block sharded)"})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config path"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        from saicl.attention.registry import check_backend_name
        from saicl.structures import get_structure

        for f in dataclasses.fields(self):  # types first: YAML "no" must not pass as a true boolean
            setattr(self, f.name, check_field_value(f.name, getattr(self, f.name)))
        try:
            get_structure(self.structure)
        except (KeyError, ValueError) as err:
            raise ValueError(f"structure={self.structure!r}: expected one of saicl, full, fid") from err
        check_backend_name(self.attn_backend)
        _ = self.k_schedule  # validates k, k_start
        for name in ("max_steps", "batch_size", "eval_episodes", "max_demo_tokens", "max_query_tokens",
                     "max_target_tokens", "save_steps", "logging_steps", "save_total_limit"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected an integer >= 1")
        for name in ("warmup_steps", "eval_steps", "k_warmup_steps", "num_workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected an integer >= 0")
        from .fsdp import parse_fsdp

        if parse_fsdp(self.fsdp) is not None and self.deepspeed:
            raise ValueError(f"fsdp={self.fsdp!r} and deepspeed={self.deepspeed!r}: choose one engine")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: expected a positive number")
        if self.eval_k is not None and self.eval_k < 0:
            raise ValueError(f"eval_k={self.eval_k}: expected >= 0")
        if self.resume is not None and self.resume != "latest" and not Path(self.resume).is_dir():
            raise ValueError(f"resume={self.resume!r}: expected 'latest' or an existing checkpoint folder")
        if self.synthetic_families is None and not Path(self.data).expanduser().exists() \
                and looks_like_local_path(self.data):
            # a mistyped local path: say so now, instead of trying it as a Hub dataset first
            raise ValueError(f"data={self.data!r}: no such file or folder (Hub dataset names are 'name' or "
                             "'owner/name')")

    @property
    def k_schedule(self) -> KSchedule:
        return KSchedule.parse(self.k, self.k_warmup_steps, self.k_start)

    @property
    def synthetic_families(self) -> list[str] | None:
        """The families of ``data='synthetic[:a,b]'``, or ``None`` for task files."""
        if self.data != SYNTHETIC and not self.data.startswith(SYNTHETIC + ":"):
            return None
        _, _, names = self.data.partition(":")
        return [n for n in names.split(",") if n] or ["lookup"]

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


@functools.cache
def _type_hints() -> dict:
    return typing.get_type_hints(TrainConfig)


def field_type(name: str) -> tuple[type, bool]:
    """``(base type, whether None is allowed)`` of a TrainConfig field (``int | None`` -> ``(int, True)``)."""
    hint = _type_hints()[name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def check_field_value(name: str, value):
    """``value`` checked against the field's type (YAML gives strings such as ``"no"`` where a boolean is
    meant); an integer for a text field (``k: 2``) or a numeric string for a float (PyYAML reads ``3e-3`` as
    text) is converted. Raises ValueError naming the field."""
    kind, optional = field_type(name)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name}=None: a value is required")
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: expected true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r}: expected an integer")
    elif kind is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{name}={value!r}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}={value!r}: expected a number")
        value = float(value)
    elif kind is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"{name}={value!r}: expected text")
        value = str(value)
    return value


def looks_like_local_path(text: str) -> bool:
    """Whether a ``--data`` value that does not exist was meant as a local path (not a Hub dataset id): it is
    absolute or starts with ``.``/``~``, ends with ``.jsonl``/``.json``, has more than one ``/`` (Hub ids are
    ``name`` or ``owner/name``), or its first component exists here (``data/offlin`` beside ``data/``)."""
    if text.startswith((".", "~", "/")) or Path(text).is_absolute() or text.endswith((".jsonl", ".json")):
        return True
    if os.sep != "/" and os.sep in text:
        return True
    parts = text.split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).exists())


def load_yaml(path: str | os.PathLike) -> dict:
    """Fields of a YAML config file (keys are TrainConfig field names, ``-`` or ``_``), validated by name."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not valid YAML ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of field names to values")
    names = {f.name for f in config_fields()}
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"--config {path}: unknown fields {unknown}; known: {sorted(names)}")
    for name, value in values.items():
        if name == "structure" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            continue  # a YAML list of structures (the flag's comma list)
        try:
            values[name] = check_field_value(name, value)
        except ValueError as err:
            raise ValueError(f"--config {path}: {err}") from None
    return values


__all__ = ["SYNTHETIC", "TrainConfig", "check_field_value", "config_fields", "field_type", "load_yaml",
           "looks_like_local_path"]


def resolve_precision(bf16: bool | None, cuda: bool, bf16_supported: bool, tf32_supported: bool) -> dict:
    """Mixed-precision settings of a run: ``{"bf16": bool, "tf32": bool | None}`` for ``TrainingArguments``.

    ``bf16=None`` (the default) means bf16 autocast on a CUDA device that supports it (tensor cores for the
    attention kernels and the linear layers), fp32 on CPU (bf16 matmuls are slow there and change results).
    When a CUDA run stays in fp32 (``bf16=False``, or no bf16 support), TF32 matmuls are enabled where the
    device has them; ``tf32=None`` leaves torch's setting alone (CPU). ``bf16=True`` without a CUDA device
    that supports it is refused here, naming the flag, rather than failing inside the trainer.
    """
    if bf16 and not (cuda and bf16_supported):
        raise ValueError("bf16=True: bf16 autocast needs a CUDA device that supports bf16 (none here); "
                         "leave --bf16 unset for the device's default")
    use_bf16 = bool(cuda and bf16_supported) if bf16 is None else bf16
    tf32 = (not use_bf16 and tf32_supported) if cuda else None
    return {"bf16": use_bf16, "tf32": tf32}
