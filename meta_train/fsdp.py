"""FSDP for meta-training: the ``--fsdp`` flag's grammar, the ``TrainingArguments`` it maps to, and the one
step Accelerate leaves out on CPU.

Sharding, checkpointing and consolidation are the engine's (Accelerate's FSDP2 plugin driven by
``Trainer``); this module only translates the user's flag. ``--fsdp`` (bare) means ``full_shard``: every
encoder and decoder block (the model's ``_no_split_modules``) is its own FSDP2 unit and parameters,
gradients and optimizer state are sharded over all processes. Checkpoints are sharded
(``SHARDED_STATE_DICT``: one file per rank, written through ``torch.distributed.checkpoint``); the final
model is consolidated into an ordinary ``save_pretrained`` folder.
"""

from __future__ import annotations

import os

# The words of --fsdp: Hugging Face's own option names, restricted to what FSDP2 supports.
SHARDING = {"full_shard": True, "shard_grad_op": False}  # -> fsdp_config["reshard_after_forward"]
OFFLOAD = "offload"
AUTO_WRAP = "auto_wrap"  # accepted for compatibility with Trainer's strings: wrapping per block is always on
DEFAULT = "full_shard"
USAGE = ("expected 'full_shard' or 'shard_grad_op', optionally with 'offload' (e.g. --fsdp \"full_shard offload\"); "
         "bare --fsdp means full_shard")


def parse_fsdp(value: str) -> dict | None:
    """``--fsdp``'s value as ``{"reshard_after_forward": bool, "cpu_offload": bool}``, ``None`` if off (``""``).

    Raises ValueError naming the flag for anything else (FSDP1-only strategies such as ``hybrid_shard``
    included: this project runs FSDP2 only).
    """
    words = value.replace(",", " ").split()
    if not words:
        return None
    unknown = [w for w in words if w not in SHARDING and w not in (OFFLOAD, AUTO_WRAP)]
    strategies = [w for w in words if w in SHARDING]
    if unknown or len(strategies) > 1 or len(set(words)) != len(words):
        raise ValueError(f"fsdp={value!r}: {USAGE}")
    return {"reshard_after_forward": SHARDING[strategies[0] if strategies else DEFAULT],
            "cpu_offload": OFFLOAD in words}


def check_fsdp_launch(value: str, world_size: int) -> None:
    """Refuse ``--fsdp`` in a process not started by a distributed launcher (Trainer would refuse it later,
    after the model is built, with a message that does not name the flag)."""
    if parse_fsdp(value) is not None and "LOCAL_RANK" not in os.environ and world_size < 2:
        raise ValueError(f"fsdp={value!r}: FSDP shards over processes; launch with torchrun --nproc_per_node N "
                         "(or accelerate launch)")


def fsdp_training_arguments(value: str, activation_checkpointing: bool, world_size: int) -> dict:
    """The ``TrainingArguments`` keywords for ``--fsdp`` (``{}`` when off).

    ``activation_checkpointing`` (``--gradient-checkpointing``) goes to FSDP's own activation checkpointing,
    which Trainer prefers under FSDP (the plain one re-gathers parameters a second time in backward).
    """
    options = parse_fsdp(value)
    if options is None:
        return {}
    check_fsdp_launch(value, world_size)
    config = {
        "version": 2,
        "reshard_after_forward": options["reshard_after_forward"],
        "cpu_offload": options["cpu_offload"],
        "state_dict_type": "SHARDED_STATE_DICT",  # checkpoints: one shard per rank, no gather on rank 0
        "activation_checkpointing": activation_checkpointing,
    }
    return {"fsdp": True, "fsdp_config": config}


def share_embedding_module(model) -> None:
    """Make the encoder and the decoder read the token embedding through the one ``shared`` module.

    Hugging Face T5 ties ``decoder.embed_tokens.weight`` to ``shared.weight`` with two modules holding one
    parameter; FSDP2 (torch >= 2.13) refuses a parameter seen by two FSDP groups, and Accelerate groups
    ``shared`` with ``lm_head``. One module is the same tie (state dict keys and values unchanged).
    """
    model.set_input_embeddings(model.get_input_embeddings())


def sharded_checkpoints(accelerator) -> bool:
    """Whether the FSDP plugin writes sharded checkpoints (then Trainer writes no top-level weights)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return plugin is not None and "SHARDED_STATE_DICT" in str(plugin.state_dict_type)


def register_fsdp_method(model, name: str) -> None:
    """Run ``model.<name>`` with FSDP's pre/post-forward hooks (root parameters gathered), once per model.

    ``score_options`` calls ``model.encoder`` directly, outside the root's ``forward``: without this the
    root-level weights (final layer norms) would be read as shards.
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    registered = model.__dict__.setdefault("_fsdp_forward_methods", set())
    if name not in registered:
        register_fsdp_forward_method(model, name)
        registered.add(name)


def drop_tied_copies(model, state_dict: dict) -> dict:
    """``state_dict`` without the extra names of tied parameters, as ``save_pretrained`` writes them.

    A consolidated FSDP state dict holds one separate tensor per name, so ``save_pretrained`` cannot see the
    tie (it looks for shared storage) and would write the embedding four times. The ties are read from the
    live model (names of one parameter object); the name kept is the one ``from_pretrained`` loads
    (not a key of ``_tied_weights_keys``).
    """
    tied = getattr(model, "_tied_weights_keys", None)
    targets = set(tied) if isinstance(tied, dict) else set()
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    for names in names_of.values():
        keep = next((n for n in names if n not in targets), names[0])
        for name in names:
            if name != keep:
                state_dict.pop(name, None)
    return state_dict


def enable_fsdp_on_cpu(accelerator, plugin_args: dict) -> bool:
    """Turn an Accelerate state that dropped the FSDP plugin because it runs on CPU processes into FSDP.

    Accelerate (1.x) enables FSDP only for accelerator devices; with ``MULTI_CPU`` it silently trains DDP
    instead. FSDP2 itself runs on CPU with the gloo backend, so this sets the fields Accelerate sets on GPUs
    (the distributed type, shared with ``PartialState``, and the plugin); ``fully_shard`` and the checkpoint
    code are then Accelerate's, unchanged. Returns whether it changed anything.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
    state.distributed_type = DistributedType.FSDP
    # as Accelerate does at the end of AcceleratorState.__init__: every later AcceleratorState() copies it back
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


__all__ = ["check_fsdp_launch", "drop_tied_copies", "enable_fsdp_on_cpu", "fsdp_training_arguments", "parse_fsdp",
           "register_fsdp_method", "share_embedding_module", "sharded_checkpoints"]
