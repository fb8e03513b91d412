"""Meta-training on Hugging Face ``Trainer``: one process on CPU, DDP/FSDP/DeepSpeed through ``torchrun`` or
``accelerate launch`` (the engine's own distribution; nothing hand-written here).

Python API::

    from saicl.meta_train.train import TrainConfig, train, train_structures
    result = train(TrainConfig(max_steps=2000, output_dir="runs/a"))   # -> TrainResult
    results = train_structures(TrainConfig(max_steps=2000), ["saicl", "full", "fid"])  # same initialisation
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from saicl import ICLProcessor
from saicl.checkpoints import check_resume_compatible, resume_checkpoint
from saicl.outputs import publish_entry

from .config import TrainConfig, resolve_precision
from .data import load_tasks, make_episode, read_split_config, resolve_config, sample_demonstrations
from .episodes import EpisodeCollator, EpisodeDataset, SyntheticSource, TaskSource, TruncationCounter, fixed_episodes
from .evaluate import option_accuracy
from .fsdp import (
    check_fsdp_launch,
    drop_tied_copies,
    enable_fsdp_on_cpu,
    fsdp_training_arguments,
    register_fsdp_method,
    sharded_checkpoints,
    share_embedding_module,
)
from .models import build_model, model_config_dict
from .run_dir import FINAL, STAGING, CheckpointWriteError, check_run_dir, claimed_run_dir, write_failure

logger = logging.getLogger(__name__)



# Per-step losses kept in TrainResult.step_losses (a 1M-step run would otherwise hold 1M floats per process).
LOSS_HISTORY = 10_000


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a run produced. ``model_dir`` holds the final model (``from_pretrained``-ready), ``None`` if the
    run stopped on a non-finite loss (then ``last_checkpoint`` is the last good one)."""

    structure: str
    output_dir: str
    model_dir: str | None
    last_checkpoint: str | None
    steps: int
    wall_time_s: float
    stopped: str  # "max_steps" or "nan"
    losses: list[tuple[int, float]] = field(default_factory=list)  # logged (step, mean training loss)
    # exact loss of each step run by this process; the newest LOSS_HISTORY steps only (``losses`` covers all)
    step_losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # {"step", "eval_loss", "accuracy", "chance", "ratio"}
    truncated: int = 0  # demonstrations + queries of training batches cut by the token caps (all ranks)
    eval_truncated: int = 0  # the same for held-out loss batches (counted apart from training)
    message: str = ""
    rank_digests: list[str] = field(default_factory=list)  # sha256 of each rank's final weights (FSDP: gathered)
    saving_ranks: list[int] = field(default_factory=list)  # ranks that wrote model/optimizer/state files

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Data


def build_data(config: TrainConfig, world_size: int = 1):
    """``(train_dataset, held-out episodes)`` for a config (synthetic stream or task files)."""
    schedule = config.k_schedule
    eval_k = config.eval_k if config.eval_k is not None else schedule.k_max
    families = config.synthetic_families
    if families is not None:
        source = SyntheticSource(families, lookup={"n_labels": config.lookup_labels})
        # Held-out tasks are fresh draws from another stream; lookup tasks get distinct labels, one
        # per shown key, so guessing among the labels seen in the demonstrations is exactly chance.
        held_out = SyntheticSource(families, lookup={"n_labels": max(1, min(eval_k, 8)), "distinct_labels": True})
        eval_episodes = fixed_episodes(held_out, eval_k, config.eval_episodes, config.seed + 1)
    else:
        tasks = load_tasks(config.data, split="train", config=config.data_config, k=schedule.k_max, seed=100)
        source = TaskSource(tasks, schedule.k_max)
        eval_episodes = held_out_task_episodes(config, eval_k)
    dataset = EpisodeDataset(source, schedule, config.max_steps * config.batch_size, config.seed,
                             per_step=config.batch_size)
    return dataset, eval_episodes


def held_out_task_episodes(config: TrainConfig, k: int) -> list[dict]:
    """Episodes of the split config's test tasks (MetaICL seed 100), queries spread evenly over tasks."""
    config_path = resolve_config(config.data_config, Path(config.data) if Path(config.data).is_dir() else None)
    if config_path is None or not read_split_config(config_path)["test"]:
        logger.warning("no held-out test tasks in the split config: held-out evaluation is off")
        return []
    tasks = load_tasks(config.data, split="test", config=config.data_config, k=k, seed=100)
    per_task = max(1, math.ceil(config.eval_episodes / len(tasks)))
    episodes = []
    for task in tasks.values():
        demos = sample_demonstrations(task, k, seed=100)
        episodes += [make_episode(demos, query) for query in task.test[:per_task]]
    return episodes


# ---------------------------------------------------------------------------------------------------
# Trainer


class MetaTrainer(Trainer):
    """``Trainer`` plus: a finite-loss guard, held-out accuracy in ``evaluate``, atomic checkpoints."""

    def __init__(self, *args, accuracy_episodes: Sequence[dict] = (), processor=None, **kwargs):
        super().__init__(*args, **kwargs)
        # The model returns a mean loss (and ignores num_items_in_batch): tell Trainer, or it would
        # rescale the loss by the number of processes under DDP.
        self.model_accepts_loss_kwargs = False
        self.accuracy_episodes = list(accuracy_episodes)
        self.processor = processor
        # Per-step losses stay on the device until a logging step (one transfer per logging interval, not per step)
        self.step_losses: deque[float] = deque(maxlen=LOSS_HISTORY)
        self._pending_losses: list[torch.Tensor] = []
        self._staging_root: str | None = None
        self.owned_dir = None  # the claimed output folder (saicl.outputs.OwnedDir) on the main process
        self.truncation = TruncationCounter()  # the collated batches' counts, summed here (not in workers)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            # Accelerate keeps FSDP to accelerator devices; on CPU processes (gloo) it would silently run DDP
            self.is_fsdp_enabled = enable_fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args)
            if not self.is_fsdp_enabled:
                raise ValueError(f"--fsdp: Accelerate did not enable FSDP ({self.accelerator.distributed_type})")

    def compute_loss(self, model, inputs, *args, **kwargs):
        self.truncation.pop(inputs, "train" if model.training else "eval")
        return super().compute_loss(model, inputs, *args, **kwargs)

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        detached = loss.detach().float().reshape(())
        # The guard must stop before the optimizer step, on every rank (or the others would hang in the next
        # all-reduce), so it reads one flag per step on the host: one device sync per step on GPUs, which
        # keeps the host from queueing the next step while this one runs (docs/meta_training.md). The loss
        # values themselves are read only at logging steps (flush_step_losses).
        finite = torch.isfinite(detached).float().reshape(1)
        if self.args.world_size > 1:
            finite = self.accelerator.gather(finite).min()
        if not bool(finite.item()):
            self.flush_step_losses()
            raise NonFiniteLossError(f"the training loss is {detached.item()} at step {self.state.global_step + 1}")
        self._pending_losses.append(detached)
        if len(self._pending_losses) >= LOSS_HISTORY:  # a logging interval longer than the history
            self.flush_step_losses()
        return loss

    def flush_step_losses(self) -> None:
        """Move the losses of the steps since the last flush to ``step_losses`` (one device-to-host copy)."""
        if self._pending_losses:
            self.step_losses.extend(torch.stack(self._pending_losses).tolist())
            self._pending_losses.clear()

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        if self.control.should_log:  # Trainer reads its own loss sum now as well
            self.flush_step_losses()
        return super()._maybe_log_save_evaluate(*args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.accuracy_episodes:
            if self.is_fsdp_enabled:  # score_options reads root-level weights outside forward: gather them
                register_fsdp_method(self.model, "score_options")
            accuracy = option_accuracy(self.model, self.processor, self.processing_class, self.accuracy_episodes)
            extra = {f"{metric_key_prefix}_{name}": value for name, value in accuracy.items()}
            self.log(extra)
            metrics.update(extra)
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP with sharded checkpoints, Trainer writes no model files: a checkpoint still gets its
        config and tokenizer (resume checks read them; the weights are in ``pytorch_model_fsdp_0/``), and the
        final model is consolidated into an ordinary ``save_pretrained`` folder (a collective: every rank calls)."""
        if not (self.is_fsdp_enabled and sharded_checkpoints(self.accelerator)):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if _internal_call:
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                self.accelerator.unwrap_model(self.model).config.save_pretrained(output_dir)
                self.processing_class.save_pretrained(output_dir)
            return
        state_dict = self.accelerator.get_state_dict(self.model)  # full tensors, on rank 0 only
        self._save(output_dir, state_dict=drop_tied_copies(self.accelerator.unwrap_model(self.model), state_dict))

    def _get_output_dir(self, trial):
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Write ``checkpoint-N`` under ``.staging/`` and rename it into place once complete, so an
        interrupted save never leaves a half-written checkpoint where resume would find it."""
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING)
        if self.args.should_save:
            shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)  # leftover of a crash
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        if self.owned_dir is not None:
            self.owned_dir.record(STAGING, name)  # before writing: a crash never leaves an entry nobody owns
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:  # disk full, ...: only .staging/ was written, the published checkpoints are intact
            reason = write_failure(err, run_dir)
            if reason is None:
                raise
            if self.args.should_save:
                shutil.rmtree(os.path.join(staging_root, name), ignore_errors=True)
            last = get_last_checkpoint(run_dir)
            raise CheckpointWriteError(f"could not write {name} into {run_dir} ({reason}); the last complete "
                                       f"checkpoint is {last or 'none (none was written yet)'}") from err
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            publish(os.path.join(staging_root, name), os.path.join(run_dir, name))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


def publish(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a completely written folder to ``dst`` by rename (replacing an older ``dst``, set aside under a hidden
    name first: nothing of the user's, such as a ``final.old``, is ever touched)."""
    publish_entry(src, dst)


class _LogAccuracy(TrainerCallback):
    """Logs held-out accuracy as it comes (the progress bar shows only losses)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "eval_accuracy" in logs and state.is_world_process_zero:
            logger.info("step %d: held-out accuracy %.3f (chance %.3f)", state.global_step, logs["eval_accuracy"],
                        logs.get("eval_chance", float("nan")))


def close_distributed(wait: bool = True) -> None:
    """Tear down the process group, if any, before the interpreter exits.

    Left to interpreter shutdown, gloo's worker threads are sometimes destroyed while still joinable, and a rank
    aborts (SIGABRT, "terminate called without an active exception") after a run that succeeded: measured
    1 in ~10 two-rank FSDP runs. ``wait`` first waits for every rank (skip it on an error path, where a peer may
    never arrive).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def device_precision(bf16: bool | None, cuda: bool) -> dict:
    """:func:`~.config.resolve_precision` for this machine's device (CUDA: device 0's capabilities)."""
    bf16_supported = cuda and torch.cuda.is_bf16_supported()
    tf32_supported = cuda and torch.cuda.get_device_capability(0)[0] >= 8
    return resolve_precision(bf16, cuda, bf16_supported, tf32_supported)


def training_arguments(config: TrainConfig, world_size: int, has_eval: bool) -> TrainingArguments:
    """The ``TrainingArguments`` of a config (``batch_size`` is global: split over ``world_size``)."""
    if config.batch_size % world_size:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by the {world_size} processes")
    cuda = torch.cuda.is_available()
    fsdp = fsdp_training_arguments(config.fsdp, config.gradient_checkpointing, world_size)
    return TrainingArguments(
        output_dir=config.output_dir,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size // world_size,
        per_device_eval_batch_size=config.batch_size // world_size,
        learning_rate=config.lr,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must be seen (the guard stops the run), not filtered
        eval_strategy="steps" if has_eval and config.eval_steps else "no",
        eval_steps=config.eval_steps or None,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to="none",
        remove_unused_columns=False,  # keep segment_ids
        train_sampling_strategy="sequential",  # episodes are already random per index (resumable order)
        disable_tqdm=not config.progress,
        dataloader_num_workers=config.num_workers,
        use_cpu=not cuda,
        ddp_backend=None if cuda or world_size == 1 else "gloo",
        **device_precision(config.bf16, cuda),
        # under FSDP, activation checkpointing is FSDP's own (see fsdp_training_arguments)
        gradient_checkpointing=config.gradient_checkpointing and not fsdp,
        deepspeed=config.deepspeed,
        **fsdp,
    )


def _resume_path(config: TrainConfig) -> str | None:
    if config.resume is None:
        stale = get_last_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None
        if stale is not None:
            raise ValueError(
                f"{config.output_dir} already holds {Path(stale).name}: pass --resume latest to continue it, "
                "or choose another --output-dir"
            )
        return None
    # Checked before anything is built: a damaged newest checkpoint falls back to the newest intact one
    # (with a warning), and a checkpoint of another structure or architecture is refused, naming both.
    resume = resume_checkpoint(config.output_dir, config.resume)
    check_resume_compatible(resume, config.structure, config.model, model_config_dict(config.model))
    return str(resume)


def _evals(log_history: list[dict]) -> list[dict]:
    by_step: dict[int, dict] = {}
    for entry in log_history:
        if any(key.startswith("eval_") for key in entry):
            row = by_step.setdefault(entry["step"], {"step": entry["step"]})
            row.update({key[5:]: value for key, value in entry.items() if key.startswith("eval_")})
    return [by_step[s] for s in sorted(by_step)]


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, in name order (equal digests = bitwise-equal weights); under FSDP,
    of the consolidated weights (every rank must call)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if hasattr(tensor, "full_tensor"):  # FSDP's DTensor: gather it (a collective, same order on every rank)
            tensor = tensor.full_tensor()
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train(config: TrainConfig, callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Run one meta-training job and return its :class:`TrainResult` (only rank 0 writes files).

    ``config.output_dir`` is checked first and claimed for the run (see :mod:`saicl.meta_train.run_dir`):
    a folder holding anything this tool did not write, a finished run, or another run's lock is refused
    before anything is built, and nothing is ever replaced or deleted that a run did not write.

    Raises:
        ValueError: bad configuration or data, or an output folder that must not be written (the message
            says what and where).
        CheckpointWriteError: a checkpoint or the final model could not be written (the last complete
            checkpoint is named and intact).
    """
    check_fsdp_launch(config.fsdp, int(os.environ.get("WORLD_SIZE", "1")))  # before the output folder is claimed
    with claimed_run_dir(config.output_dir, config.resume) as owned:
        return _train(config, callbacks, owned)


def _train(config: TrainConfig, callbacks: Sequence[TrainerCallback], owned) -> TrainResult:
    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resume = _resume_path(config)
    model, tokenizer = build_model(config.model, config.structure, config.attn_backend, config.seed)
    processor = ICLProcessor(tokenizer, template=config.template, max_demo_tokens=config.max_demo_tokens,
                             max_query_tokens=config.max_query_tokens)
    collator = EpisodeCollator(processor, config.max_target_tokens)
    train_dataset, eval_episodes = build_data(config, world_size)
    args = training_arguments(config, world_size, has_eval=bool(eval_episodes))
    if args.fsdp:
        share_embedding_module(model)
    trainer = MetaTrainer(
        model=model, args=args, data_collator=collator, train_dataset=train_dataset,
        eval_dataset=eval_episodes or None, processing_class=tokenizer, callbacks=[_LogAccuracy(), *callbacks],
        accuracy_episodes=eval_episodes, processor=processor,
    )
    trainer.owned_dir = owned
    stopped, message = "max_steps", ""
    try:
        trainer.train(resume_from_checkpoint=resume)
        trainer.flush_step_losses()  # the steps after the last logging step
    except NonFiniteLossError as err:
        stopped = "nan"
        last = get_last_checkpoint(config.output_dir) if Path(config.output_dir).is_dir() else None
        message = f"{err}; stopped. The last good checkpoint is kept: {last or 'none was written yet'}"
        logger.error(message)
    output_dir = Path(config.output_dir)
    model_dir = None
    if stopped == "max_steps":
        staging = output_dir / STAGING / FINAL
        try:
            if owned is not None:
                owned.record(STAGING, FINAL)
            trainer.save_model(str(staging))  # writes on the main process only
            trainer.accelerator.wait_for_everyone()
            if trainer.is_world_process_zero():
                (staging / "meta_train_config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
                publish(staging, output_dir / FINAL)
        except Exception as err:  # disk full, ...: the published checkpoints are intact
            reason = write_failure(err, output_dir)
            if reason is None:
                raise
            shutil.rmtree(staging, ignore_errors=True)
            last = get_last_checkpoint(str(output_dir))
            raise CheckpointWriteError(f"could not write the final model into {output_dir / FINAL} ({reason}); "
                                       f"the last complete checkpoint is {last or 'none (none was written yet)'}"
                                       ) from err
        trainer.accelerator.wait_for_everyone()
        model_dir = str(output_dir / FINAL)
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    from accelerate.utils import gather_object

    rank_digests = gather_object([weights_digest(trainer.model)])
    saving_ranks = [r for r, saves in enumerate(gather_object([trainer.args.should_save])) if saves]
    history = trainer.state.log_history
    return TrainResult(
        structure=config.structure,
        output_dir=str(output_dir),
        model_dir=model_dir,
        last_checkpoint=last,
        steps=trainer.state.global_step,
        wall_time_s=round(time.perf_counter() - start, 2),
        stopped=stopped,
        losses=[(e["step"], e["loss"]) for e in history if "loss" in e],
        step_losses=list(trainer.step_losses),
        evals=_evals(history),
        truncated=sum(gather_object([trainer.truncation.truncated("train")])),
        eval_truncated=sum(gather_object([trainer.truncation.truncated("eval")])),
        message=message,
        rank_digests=rank_digests,
        saving_ranks=saving_ranks,
    )


def train_structures(config: TrainConfig, structures: Sequence[str] = ("saicl", "full", "fid"),
                     callbacks: Sequence[TrainerCallback] = (),
                     results: dict[str, TrainResult] | None = None) -> dict[str, TrainResult]:
    """Train each structure from the same initialisation and data (``config.seed``) into
    ``{config.output_dir}/{structure}``.

    Every structure's output folder is checked before any training starts. ``results``, if given, is filled
    as each structure finishes, so a caller keeps the finished ones when a later structure fails.
    """
    configs = {s: config.replace(structure=s, output_dir=str(Path(config.output_dir) / s)) for s in structures}
    for structure_config in configs.values():
        check_run_dir(structure_config.output_dir, structure_config.resume)
    results = {} if results is None else results
    for s, structure_config in configs.items():
        results[s] = train(structure_config, callbacks)
    return results


__all__ = ["CheckpointWriteError", "NonFiniteLossError", "TrainConfig", "TrainResult", "publish", "train",
           "train_structures"]
