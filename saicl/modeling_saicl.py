"""SAICLForConditionalGeneration: T5 whose encoder attends with a structure (docs/design.md §2–5).

The encoder keeps T5's parameter names (``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}``,
``relative_attention_bias`` in block 0, ``layer.1.DenseReluDense``...), so every T5 checkpoint loads
unchanged; the decoder, the LM head and generation are Hugging Face's T5 as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.t5.modeling_t5 import (
    T5Attention,
    T5ForConditionalGeneration,
    T5LayerFF,
    T5LayerNorm,
)
from transformers.utils.deprecation import deprecate_kwarg

from .attention.encoder_pass import EncoderPass
from .attention.registry import check_backend_name
from .configuration_saicl import SAICLConfig
from .layout import EncoderLayout, build_layout
from .structures import QUERY_SEGMENT, get_structure


@dataclass
class SAICLEncoderOutput(BaseModelOutput):
    """Encoder output plus the mask of its tokens.

    ``attention_mask``: ``(batch, encoder_length)``. For ``fid`` the encoder output holds every
    (demonstration, query) pair, so it is longer than the input; the decoder must use this mask.
    """

    attention_mask: torch.Tensor | None = None


def _clamp_fp16(hidden_states: torch.Tensor) -> torch.Tensor:
    # Same guard as Hugging Face T5: keeps fp16 activations finite.
    if hidden_states.dtype != torch.float16:
        return hidden_states
    clamp_value = torch.where(
        torch.isinf(hidden_states).any(),
        torch.finfo(hidden_states.dtype).max - 1000,
        torch.finfo(hidden_states.dtype).max,
    )
    return torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)


class SAICLEncoderAttention(T5Attention):
    """T5 self-attention projections (same names and init as T5) with a structured attend step."""

    def forward(self, hidden_states: torch.Tensor, attend: EncoderPass) -> torch.Tensor:  # type: ignore[override]
        """``(batch, length, d_model)`` -> ``(batch, length, d_model)``."""
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.n_heads, self.key_value_proj_dim)
        q = self.q(hidden_states).view(shape)
        k = self.k(hidden_states).view(shape)
        v = self.v(hidden_states).view(shape)
        return self.o(attend(q, k, v).reshape(batch, length, self.inner_dim))


class SAICLEncoderLayerSelfAttention(nn.Module):
    def __init__(self, config: SAICLConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = SAICLEncoderAttention(
            config, has_relative_attention_bias=has_relative_attention_bias
        )
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states: torch.Tensor, attend: EncoderPass) -> torch.Tensor:
        return hidden_states + self.dropout(self.SelfAttention(self.layer_norm(hidden_states), attend))


class SAICLEncoderBlock(GradientCheckpointingLayer):
    """One T5 encoder block: structured self-attention, then the feed-forward layer."""

    def __init__(self, config: SAICLConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList(
            [SAICLEncoderLayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)]
        )

    def forward(self, hidden_states: torch.Tensor, attend: EncoderPass) -> tuple[torch.Tensor, EncoderPass]:
        """``(batch, length, d_model)`` -> the same, and the pass state (with the table after block 0).

        The block with the bucket embedding builds the pass's bias table here, inside its own forward (where
        FSDP has unsharded the weight and ``device_map`` placed it); every block then attends with the
        backend's state prepared on its own device.
        """
        attention = self.layer[0].SelfAttention
        if attention.has_relative_attention_bias:
            attend = attend.with_table(attention.relative_attention_bias.weight, hidden_states.dtype)
        attend = attend.to(hidden_states.device)
        hidden_states = _clamp_fp16(self.layer[0](hidden_states, attend))
        return _clamp_fp16(self.layer[1](hidden_states)), attend


class SAICLEncoder(nn.Module):
    """The structured T5 encoder.

    Per forward pass it builds the :class:`~saicl.layout.EncoderLayout` once; block 0 builds the
    per-distance bias table from its bucket embedding (shared by all layers as in T5), and the backend's
    prepared state is built once per device the blocks live on (:class:`~saicl.attention.encoder_pass.
    EncoderPass`); every layer then only projects and attends.
    """

    main_input_name = "input_ids"

    def __init__(self, config: SAICLConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList(
            [SAICLEncoderBlock(config, has_relative_attention_bias=i == 0) for i in range(config.num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.embed_tokens = new_embeddings

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def build_layout(
        self, input_shape: torch.Size, attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None,
        device: torch.device,
    ) -> EncoderLayout:
        # Checked here for every structure: fid gathers input_ids by the layout's indices, which would
        # silently drop extra tokens or episodes (or fail deep inside torch) on a shape mismatch.
        for name, tensor in (("attention_mask", attention_mask), ("segment_ids", segment_ids)):
            if tensor is not None and tuple(tensor.shape) != tuple(input_shape):
                raise ValueError(
                    f"{name} shape {tuple(tensor.shape)} does not match input_ids / inputs_embeds shape "
                    f"{tuple(input_shape)} (batch, length)"
                )
        if attention_mask is None:
            attention_mask = torch.ones(input_shape, dtype=torch.long, device=device)
        if segment_ids is None:  # no demonstrations: every structure is plain T5 on the query
            segment_ids = torch.full(input_shape, QUERY_SEGMENT, dtype=torch.long, device=device)
        return build_layout(attention_mask, segment_ids, get_structure(self.config.structure))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> SAICLEncoderOutput:
        """Encode a batch of episodes.

        Args:
            input_ids: ``(batch, length)`` token ids (or ``inputs_embeds`` ``(batch, length, d_model)``).
            attention_mask: ``(batch, length)``, 1 on tokens, 0 on right padding.
            segment_ids: ``(batch, length)``, demonstration index or -1 for the query (docs/design.md §5).
        Returns:
            :class:`SAICLEncoderOutput` with ``last_hidden_state`` ``(batch, encoder_length, d_model)``
            and its ``attention_mask``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported by the structured encoder (no dense weights)")
        source = input_ids if input_ids is not None else inputs_embeds
        layout = self.build_layout(source.shape[:2], attention_mask, segment_ids, source.device)
        if input_ids is not None:
            if layout.source_index is not None:
                input_ids = input_ids.gather(1, layout.source_index)
            inputs_embeds = self.embed_tokens(input_ids)
        elif layout.source_index is not None:
            index = layout.source_index[:, :, None].expand(-1, -1, inputs_embeds.shape[-1])
            inputs_embeds = inputs_embeds.gather(1, index)

        attend = EncoderPass(
            backend_name=self.config.attn_backend, layout=layout, head_dim=self.config.d_kv,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )

        hidden_states = self.dropout(inputs_embeds)
        all_hidden_states = [] if output_hidden_states else None
        for block in self.block:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states, attend = block(hidden_states, attend=attend)
        hidden_states = self.dropout(self.final_layer_norm(hidden_states))
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)
        return SAICLEncoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
            attention_mask=layout.valid.long(),
        )


class SAICLForConditionalGeneration(T5ForConditionalGeneration):
    """T5 encoder-decoder with a structured encoder; loads any T5 checkpoint.

    Example::

        model = SAICLForConditionalGeneration.from_pretrained(path, structure="saicl")
        batch = ICLProcessor(tokenizer)(episodes)
        out = model(**batch, labels=labels)
        nll = model.score_options(**batch, options=[["yes", "no"]], tokenizer=tokenizer)
    """

    config_class = SAICLConfig
    config: SAICLConfig
    # device_map="auto" never splits a block across devices (each block attends with state on its device).
    _no_split_modules = ["SAICLEncoderBlock", "T5Block"]

    def __init__(self, config: SAICLConfig):
        super().__init__(config)
        # The encoder reads the model's own config (no copy): setting model.config.structure or .attn_backend
        # takes effect, as the usual Hugging Face idiom expects. Nothing in the encoder reads is_decoder or
        # use_cache, the fields Hugging Face's T5 changes in its encoder copy.
        self.encoder = SAICLEncoder(config, self.shared)
        self.post_init()

    def set_structure(self, structure: str) -> None:
        """Switch the encoder structure (same weights): ``"saicl"``, ``"full"`` or ``"fid"``."""
        get_structure(structure)
        self.config.structure = structure

    def set_attn_backend(self, attn_backend: str) -> None:
        """Switch the encoder attention backend (checked when the next forward resolves it)."""
        check_backend_name(attn_backend)
        self.config.attn_backend = attn_backend

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Gradient checkpointing, always non-reentrant: the bias table is built once per encoder pass and
        shared by every block, which reentrant checkpointing cannot back-propagate through twice."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant"):
            raise ValueError("gradient_checkpointing_kwargs: use_reentrant=True is not supported; leave it unset")
        kwargs["use_reentrant"] = False
        super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def get_encoder(self, modality: str | None = None) -> SAICLEncoder:
        return self.encoder

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        """Same as T5's forward plus ``segment_ids`` ``(batch, length)`` (docs/design.md §5)."""
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, segment_ids=segment_ids,
                inputs_embeds=inputs_embeds, output_hidden_states=output_hidden_states,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs[0])
        encoder_mask = getattr(encoder_outputs, "attention_mask", None)
        if encoder_mask is None:
            encoder_mask = attention_mask

        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            inputs_embeds=decoder_inputs_embeds,
            cache=cache,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=encoder_mask,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        sequence_output = decoder_outputs[0]
        if self.config.scale_decoder_outputs:
            sequence_output = sequence_output * (self.model_dim**-0.5)
        logits = self.lm_head(sequence_output)

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            loss = nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
        )

    def score_options(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.LongTensor | None = None,
        options: Sequence[Sequence[str | Sequence[int]]] = (),
        tokenizer=None,
        max_options_per_batch: int = 256,
        **unused,
    ) -> list[torch.Tensor]:
        """Mean per-token negative log-likelihood of each answer option (lower is better).

        The encoder runs once per episode; every option of every episode goes through the decoder
        in batches of at most ``max_options_per_batch`` sequences.

        Args:
            input_ids, attention_mask, segment_ids: ``(batch, length)``, as from :class:`ICLProcessor`.
            options: per episode, a non-empty list of options, each a string (needs ``tokenizer``;
                EOS is appended as T5 tokenizers do) or a list of token ids.
            tokenizer: used to tokenize string options.
        Returns:
            One float32 tensor ``(num_options_b,)`` per episode.
        """
        if isinstance(max_options_per_batch, bool) or not isinstance(max_options_per_batch, int) \
                or max_options_per_batch < 1:
            raise ValueError(f"max_options_per_batch must be an integer >= 1, got {max_options_per_batch!r}")
        option_ids = _option_token_ids(options, tokenizer, input_ids.shape[0])
        encoder_out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, segment_ids=segment_ids)
        counts = [len(o) for o in option_ids]
        flat = [ids for episode in option_ids for ids in episode]
        owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(input_ids.device)
        scores = []
        for start in range(0, len(flat), max_options_per_batch):
            chunk = flat[start:start + max_options_per_batch]
            idx = owner[start:start + len(chunk)]
            longest = max(len(ids) for ids in chunk)
            labels = torch.full((len(chunk), longest), -100, dtype=torch.long, device=input_ids.device)
            for row, ids in enumerate(chunk):
                labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            out = self(
                encoder_outputs=SAICLEncoderOutput(last_hidden_state=encoder_out.last_hidden_state[idx]),
                attention_mask=encoder_out.attention_mask[idx],
                labels=labels,
                use_cache=False,
            )
            token_nll = nn.functional.cross_entropy(
                out.logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
            )
            scores.append(token_nll.sum(1) / (labels != -100).sum(1))
        return list(torch.cat(scores).split(counts))


def _option_token_ids(options, tokenizer, batch_size: int) -> list[list[list[int]]]:
    if len(options) != batch_size:
        raise ValueError(f"options has {len(options)} entries but the batch has {batch_size} episodes")
    result = []
    for b, episode_options in enumerate(options):
        if isinstance(episode_options, str) or len(episode_options) == 0:
            raise ValueError(f"options[{b}] must be a non-empty list of options, got {episode_options!r}")
        ids_list = []
        for j, option in enumerate(episode_options):
            if isinstance(option, str):
                if tokenizer is None:
                    raise ValueError(
                        f"options[{b}][{j}] is a string: pass tokenizer=... or give token id lists instead"
                    )
                ids = tokenizer(option, add_special_tokens=True)["input_ids"]
            else:
                ids = [int(i) for i in option]
            if not ids:
                raise ValueError(f"options[{b}][{j}] tokenizes to no tokens")
            ids_list.append(ids)
        result.append(ids_list)
    return result


__all__ = ["SAICLEncoder", "SAICLEncoderOutput", "SAICLForConditionalGeneration"]
