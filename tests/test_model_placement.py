"""The model as Hugging Face tooling places it: one config as the source of truth, blocks never split by
``device_map``, the attention state prepared on each block's own device, and the bias table computed inside
the first block (so FSDP sharding of that block works)."""

import os

import pytest
import torch
import torch.distributed as dist

from saicl import SAICLConfig, SAICLForConditionalGeneration
from saicl.attention import BackendUnavailableError
from saicl.attention.eager import EagerBackend
from saicl.testing import assert_close_to_reference, segment_batch, tiny_t5_config


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = SAICLConfig(**{**tiny_t5_config().to_dict(), **overrides})
    return SAICLForConditionalGeneration(config).eval()


def _batch(seed=0):
    mask, seg = segment_batch([[3, 5, 2], [4]], [4, 6])
    ids = torch.randint(2, 300, mask.shape, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=mask, segment_ids=seg)


def test_setting_config_fields_directly_takes_effect():
    """``model.config.structure = "full"`` (the usual HF idiom) changes what the encoder computes."""
    model, batch = _model(), _batch()
    with torch.no_grad():
        saicl = model.encoder(**batch).last_hidden_state
        model.config.structure = "full"
        full = model.encoder(**batch).last_hidden_state
        reference = _model(structure="full").encoder(**batch).last_hidden_state  # same seed, same weights
    assert not torch.allclose(full, saicl), "the structure change had no effect"
    assert_close_to_reference(full, reference)
    model.config.attn_backend = "xformers"  # CUDA only: the encoder must now refuse on CPU
    with pytest.raises(BackendUnavailableError, match="xformers"):
        model.encoder(**batch)


@pytest.mark.parametrize("cpu_fraction", [0.5, 0.7])
def test_device_map_never_splits_an_encoder_block(cpu_fraction):
    from accelerate import infer_auto_device_map

    model = _model(num_layers=3)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    device_map = infer_auto_device_map(
        model, max_memory={"cpu": int(total * cpu_fraction), "disk": 10**9},
        no_split_module_classes=model._no_split_modules,
    )
    assert len(set(device_map.values())) == 2, device_map  # the budget did force a split of the model
    inside_blocks = [name for name in device_map if name.startswith("encoder.block.") and name.count(".") > 2]
    assert not inside_blocks, inside_blocks


def _move_inputs_with_accelerate(module, device):
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(module, AlignDevicesHook(execution_device=device, io_same_device=False))


def _move_hidden_states_only(module, device):
    # A hook that moves the tensors alone (as a hand-written pipeline would): the block itself must move
    # the attention state it is handed.
    def hook(_, args, kwargs):
        return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args), kwargs

    module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("move", [_move_inputs_with_accelerate, _move_hidden_states_only], ids=["accelerate", "plain"])
def test_attention_state_follows_each_blocks_device(move, monkeypatch):
    """Block 1 (and the final norm) on another device, inputs moved there by hooks as ``device_map`` does: each
    device gets its own prepared state. The second device is ``meta`` (this machine has one real device), which
    the eager backend runs on."""
    devices = []
    original = EagerBackend.prepare

    def recording(self, layout, table):
        devices.append((layout.device.type, table.device.type))
        return original(self, layout, table)

    monkeypatch.setattr(EagerBackend, "prepare", recording)
    model = _model(attn_backend="eager")
    for module in (model.encoder.block[1], model.encoder.final_layer_norm):
        module.to("meta")
        move(module, "meta")
    batch = _batch()
    with torch.no_grad():
        out = model.encoder(**batch).last_hidden_state
    assert out.device.type == "meta" and out.shape == (*batch["input_ids"].shape, model.config.d_model)
    assert devices == [("cpu", "cpu"), ("meta", "meta")]


def test_bias_table_is_built_inside_the_first_block_under_fsdp(tmp_path):
    """FSDP2 shards every block (one process, gloo): the encoder must read block 0's bucket weight only inside
    that block's forward, where FSDP has unsharded it. Loss and that weight's gradient equal the plain model's."""
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group already exists in this test process; FSDP needs its own")
    model, batch = _model(attn_backend="torch"), _batch()
    model.train()
    labels = batch["input_ids"][:, :3].contiguous()
    model(**batch, labels=labels).loss.backward()
    weight = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    expected_loss = model(**batch, labels=labels).loss.detach()
    expected_grad = weight.grad.clone()
    model.zero_grad()
    dist.init_process_group("gloo", store=dist.FileStore(os.fspath(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for block in model.encoder.block:
            fully_shard(block)
        fully_shard(model)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        sharded_weight = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        grad = sharded_weight.grad.full_tensor()
    finally:
        dist.destroy_process_group()
    assert_close_to_reference(loss.detach(), expected_loss, name="loss")
    assert grad.abs().sum() > 0
    assert_close_to_reference(grad, expected_grad, name="bucket weight gradient")
