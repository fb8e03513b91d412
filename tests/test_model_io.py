"""Loading T5 checkpoints, save/load round trips, Auto classes, score_options, checkpointing, dtypes."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM

import saicl  # noqa: F401  (registers the Auto classes)
from saicl import ICLProcessor, SAICLConfig, SAICLForConditionalGeneration
from saicl.testing import assert_close_to_reference


@pytest.mark.parametrize("checkpoint", ["t5_checkpoint", "t5_v1_1_checkpoint"])
def test_t5_checkpoint_loads_without_missing_or_unexpected_keys(checkpoint, request):
    path = request.getfixturevalue(checkpoint)
    model, info = SAICLForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info["mismatched_keys"]
    assert model.config.model_type == "saicl" and model.config.structure == "saicl"
    from transformers import T5ForConditionalGeneration

    hf = T5ForConditionalGeneration.from_pretrained(path)
    ours = dict(model.named_parameters())
    for name, param in hf.named_parameters():
        assert torch.equal(ours[name], param), name


def test_save_load_round_trip_is_bit_identical(t5_v1_1_checkpoint, tmp_path, tokenizer, episodes):
    model = SAICLForConditionalGeneration.from_pretrained(
        t5_v1_1_checkpoint, structure="fid", attn_backend="torch"
    ).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = SAICLForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert again.config.structure == "fid" and again.config.attn_backend == "torch"
    batch = ICLProcessor(tokenizer)(episodes)
    decoder_input_ids = torch.zeros(len(episodes), 3, dtype=torch.long)
    with torch.no_grad():
        a = model(**batch, decoder_input_ids=decoder_input_ids).logits
        b = again(**batch, decoder_input_ids=decoder_input_ids).logits
    assert torch.equal(a, b)


def test_auto_classes_load_saved_model(t5_checkpoint, tmp_path, tokenizer, episodes):
    SAICLForConditionalGeneration.from_pretrained(t5_checkpoint, structure="full").save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SAICLConfig)
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert isinstance(model, SAICLForConditionalGeneration)
    assert model.config.structure == "full"
    override = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, structure="saicl")
    assert override.config.structure == "saicl"


def test_score_options_matches_per_option_loss_and_runs_encoder_once(t5_checkpoint, tokenizer, episodes):
    model = SAICLForConditionalGeneration.from_pretrained(t5_checkpoint, attn_backend="torch").eval()
    processor = ICLProcessor(tokenizer)
    batch = processor(episodes)
    options = [["animal", "color"], ["y", "z", "yy"], ["ok"], ["5", "6", "seven"]]
    calls = []
    hook = model.encoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        scores = model.score_options(**batch, options=options, tokenizer=tokenizer, max_options_per_batch=4)
    hook.remove()
    assert len(calls) == 1
    assert [len(s) for s in scores] == [2, 3, 1, 3]
    for b, episode in enumerate(episodes):
        single = processor([episode])
        for j, option in enumerate(options[b]):
            labels = processor.encode_targets([option])
            with torch.no_grad():
                loss = model(**single, labels=labels).loss
            assert_close_to_reference(scores[b][j], loss, name=f"score of option {b}/{j}")


def test_score_options_bad_input(t5_checkpoint, tokenizer, episodes):
    model = SAICLForConditionalGeneration.from_pretrained(t5_checkpoint).eval()
    batch = ICLProcessor(tokenizer)(episodes[:2])
    with pytest.raises(ValueError, match="options has 1 entries but the batch has 2"):
        model.score_options(**batch, options=[["a"]], tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"options\[1\] must be a non-empty list"):
        model.score_options(**batch, options=[["a"], []], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="pass tokenizer="):
        model.score_options(**batch, options=[["a"], ["b"]])


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_gradient_checkpointing_gives_the_same_gradients(backend, t5_checkpoint, tokenizer, episodes):
    processor = ICLProcessor(tokenizer)
    batch = processor(episodes)
    labels = processor.encode_targets(["color", "y", "ok", "6"])
    grads = []
    for checkpointing in (False, True):
        model = SAICLForConditionalGeneration.from_pretrained(t5_checkpoint, attn_backend=backend).double()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in grads[0]
    for name in grads[0]:
        assert_close_to_reference(grads[1][name], grads[0][name], name=f"grad {name}")


# A half-precision forward of the tiny model is off its float32 logits by about one rounding unit of the
# dtype at the logits' scale: RMS error / (eps * RMS of the logits) measures 0.97 (bf16) and 0.90 (fp16).
# Dropping the encoder's position bias moves them by 2.4 (bf16) and 17.7 (fp16) such units, so a budget
# of 1.5 passes the first and fails the second in both dtypes. RMS, not max: a statistic over all logits
# is stable across CPUs, while the single largest error is an extreme value.
HALF_PRECISION_RMS_UNITS = 1.5


def _rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_runs_and_stays_close(dtype, t5_checkpoint, tokenizer, episodes):
    batch = ICLProcessor(tokenizer)(episodes)
    decoder_input_ids = torch.zeros(len(episodes), 2, dtype=torch.long)
    model = SAICLForConditionalGeneration.from_pretrained(t5_checkpoint, attn_backend="torch").eval()
    no_bias = SAICLForConditionalGeneration.from_pretrained(t5_checkpoint, attn_backend="torch").eval()
    with torch.no_grad():
        no_bias.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
        ref = model(**batch, decoder_input_ids=decoder_input_ids).logits
        wrong = no_bias(**batch, decoder_input_ids=decoder_input_ids).logits
        low = model.to(dtype)(**batch, decoder_input_ids=decoder_input_ids).logits
    assert low.dtype == dtype and torch.isfinite(low).all()
    budget = HALF_PRECISION_RMS_UNITS * torch.finfo(dtype).eps * _rms(ref)
    # The test can fail: an encoder without its position bias would be outside the budget.
    assert _rms(wrong - ref) > budget, "inputs too weak to tell a bias-free encoder from rounding"
    error = _rms(low.double() - ref.double())
    units = error / (torch.finfo(dtype).eps * _rms(ref))
    assert error <= budget, f"RMS error {error:.3g} > budget {budget:.3g} ({units:.2f} units)"


def test_backends_agree_through_the_model(t5_checkpoint, tokenizer, episodes):
    processor = ICLProcessor(tokenizer)
    batch = processor(episodes)
    labels = processor.encode_targets(["color", "y", "ok", "6"])
    results = {}
    for backend in ("eager", "torch"):
        model = SAICLForConditionalGeneration.from_pretrained(t5_checkpoint, attn_backend=backend)
        model = model.double().train()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        grad = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad
        results[backend] = (loss.detach(), grad.clone())
    assert_close_to_reference(results["torch"][0], results["eager"][0], name="loss")
    assert_close_to_reference(results["torch"][1], results["eager"][1], name="bias gradient")


def test_training_works_after_inference_mode(t5_checkpoint, tokenizer, episodes):
    """Nothing cached during an inference_mode pass may poison a later autograd pass."""
    model = SAICLForConditionalGeneration.from_pretrained(t5_checkpoint, attn_backend="torch")
    processor = ICLProcessor(tokenizer)
    batch = processor(episodes)
    labels = processor.encode_targets(["color", "y", "ok", "6"])
    with torch.inference_mode():
        model(**batch, labels=labels)
    model.train()
    model(**batch, labels=labels).loss.backward()
    assert model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad is not None


@pytest.mark.parametrize("backend", ["eager", "torch", "flex"])
def test_autocast_bf16_on_padded_batch_stays_finite(backend, t5_checkpoint, tokenizer, episodes):
    """Mixed precision (as Trainer's bf16=True runs it) on a padded batch: no NaN from fully masked rows."""
    processor = ICLProcessor(tokenizer)
    batch = processor(episodes)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    labels = processor.encode_targets(["color", "y", "ok", "6"])
    model = SAICLForConditionalGeneration.from_pretrained(t5_checkpoint, attn_backend=backend).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()


def test_reentrant_checkpointing_is_refused_clearly(t5_checkpoint):
    model = SAICLForConditionalGeneration.from_pretrained(t5_checkpoint)
    with pytest.raises(ValueError, match="use_reentrant=True is not supported"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
