"""One benchmark configuration (:class:`BenchCase`) and how to build the call it times.

Three levels (``what``):

* ``attention``: one structured attention layer, ``backend.attend(q, k, v, prepared)`` on random
  ``(batch, length, heads, head_dim)`` inputs. ``fwd`` times the attend call with the per-forward state
  (segment plan, block mask, dense bias) built beforehand, as a model builds it once for all layers;
  its peak memory includes that ``prepare`` (the bias blocks are what differs between structures).
  ``fwd+bwd`` times prepare + attend + backward into q, k, v and the bias table.
* ``encoder``: ``model.encoder(...)`` of a randomly initialised SAICL model (layout, bias table, every layer).
* ``model``: ``model.score_options(...)`` with ``n_options`` options of ``option_len`` tokens per episode
  (encoder once, options batched through the decoder); ``fwd+bwd``: the training loss and its backward.

Every episode has ``n_demos`` demonstrations of ``demo_len`` tokens and a query of ``query_len`` tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch

from saicl.layout import EncoderLayout, build_layout
from saicl.testing import segment_batch

LEVELS = ("attention", "encoder", "model")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class BenchCase:
    """One measured configuration; its fields become the JSON row (docs/design.md §7 plus the model shape)."""

    what: str
    structure: str
    backend: str
    pass_: str
    n_demos: int
    demo_len: int = 64
    query_len: int = 64
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    # model shape (encoder and model levels)
    d_model: int = 256
    d_ff: int = 1024
    num_layers: int = 2
    num_decoder_layers: int = 2
    vocab_size: int = 32128
    n_options: int = 2
    option_len: int = 4
    seed: int = 0

    def to_row(self) -> dict:
        row = asdict(self)
        row["pass"] = row.pop("pass_")
        return row

    @classmethod
    def from_row(cls, row: dict) -> BenchCase:
        names = {f.name for f in fields(cls)}
        values = {("pass_" if k == "pass" else k): v for k, v in row.items()}
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def input_length(self) -> int:
        """Tokens per episode in the input (before ``fid`` copies the query)."""
        return self.n_demos * self.demo_len + self.query_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def layout(self, structure: str | None = None) -> EncoderLayout:
        """The encoder layout of this case's batch (on CPU; ``fid`` expands the query per demonstration)."""
        mask, seg = segment_batch([[self.demo_len] * self.n_demos] * self.batch, [self.query_len] * self.batch)
        return build_layout(mask, seg, structure or self.structure)

    def counting_layout(self) -> EncoderLayout:
        """:meth:`layout`, shared between the cases of one shape: for counting FLOPs and bytes only (read it,
        never run a backend on it: backends cache per-forward state on a layout)."""
        return _shared_layout(self.structure, self.n_demos, self.demo_len, self.query_len, self.batch)

    def model_config(self):
        """The ``SAICLConfig`` of the encoder/model levels (T5 relu FFN, 32 buckets, max distance 128)."""
        from saicl import SAICLConfig

        return SAICLConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.head_dim, num_heads=self.heads,
            d_ff=self.d_ff, num_layers=self.num_layers, num_decoder_layers=self.num_decoder_layers,
            dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
            structure=self.structure, attn_backend=self.backend,
        )


@functools.lru_cache(maxsize=32)  # a sweep visits every (structure, size) once per level, pass and backend
def _shared_layout(structure: str, n_demos: int, demo_len: int, query_len: int, batch: int) -> EncoderLayout:
    mask, seg = segment_batch([[demo_len] * n_demos] * batch, [query_len] * batch)
    return build_layout(mask, seg, structure)


_MODELS: dict[tuple, torch.nn.Module] = {}


def _model(case: BenchCase):
    """A randomly initialised model for the case's shape, cached per shape (structure/backend switched)."""
    from saicl import SAICLForConditionalGeneration

    key = (case.d_model, case.d_ff, case.heads, case.head_dim, case.num_layers, case.num_decoder_layers,
           case.vocab_size, case.dtype, case.device, case.seed)
    if key not in _MODELS:
        _MODELS.clear()  # one model alive at a time: memory measurements must not see stale ones
        torch.manual_seed(case.seed)
        _MODELS[key] = SAICLForConditionalGeneration(case.model_config()).to(case.device, case.torch_dtype)
    model = _MODELS[key]
    _switch(model, case)
    return model


def _inputs(case: BenchCase) -> dict[str, torch.Tensor]:
    mask, seg = segment_batch([[case.demo_len] * case.n_demos] * case.batch, [case.query_len] * case.batch)
    gen = torch.Generator().manual_seed(case.seed)
    ids = torch.randint(2, case.vocab_size, mask.shape, generator=gen)
    return {"input_ids": ids.to(case.device), "attention_mask": mask.to(case.device),
            "segment_ids": seg.to(case.device)}


def _attention_call(case: BenchCase, with_prepare: bool = False) -> Callable[[], object]:
    from saicl.attention import get_backend
    from saicl.testing import random_qkv, random_table

    from .bench_providers import PROVIDERS, provider_call

    layout = case.layout()
    device = torch.device(case.device)
    layout = _layout_to(layout, device)
    train = case.pass_ == "fwd+bwd"
    q, k, v = random_qkv(case.batch, layout.length, case.heads, case.head_dim, dtype=case.torch_dtype,
                         device=device, requires_grad=train)
    table = random_table(case.heads, 128, dtype=case.torch_dtype).to(device).requires_grad_(train)
    if case.backend in PROVIDERS:  # dense SDPA baselines and the bare kernels (saicl.eval.bench_providers)
        return provider_call(case, q, k, v, table, layout, with_prepare)
    backend = get_backend(case.backend, device)
    if not train and not with_prepare:
        prepared = backend.prepare(layout, table)

        def forward():
            with torch.no_grad():  # not inference_mode: see saicl.eval.scoring
                return backend.attend(q, k, v, prepared)

        return forward
    if not train:

        def prepare_and_forward():
            with torch.no_grad():
                return backend.attend(q, k, v, backend.prepare(layout, table))

        return prepare_and_forward

    def forward_backward():
        for t in (q, k, v, table):
            t.grad = None
        out = backend.attend(q, k, v, backend.prepare(layout, table))
        out.float().sum().backward()

    return forward_backward


def _layout_to(layout: EncoderLayout, device: torch.device) -> EncoderLayout:
    if device.type == "cpu":
        return layout
    from dataclasses import replace

    moved = {name: getattr(layout, name).to(device)
             for name in ("valid", "segment", "position", "shift", "is_query")}
    if layout.source_index is not None:
        moved["source_index"] = layout.source_index.to(device)
    return replace(layout, **moved, cache={})


def _switch(model, case: BenchCase) -> None:
    # The cached model is shared by the contenders timed interleaved: each call selects its own structure and
    # backend (two attribute writes, nothing rebuilt).
    model.set_structure(case.structure)
    model.set_attn_backend(case.backend)


def _encoder_call(case: BenchCase) -> Callable[[], object]:
    model = _model(case)
    inputs = _inputs(case)
    if case.pass_ == "fwd":
        model.eval()

        def forward():
            _switch(model, case)
            with torch.no_grad():  # not inference_mode: see saicl.eval.scoring
                return model.encoder(**inputs).last_hidden_state

        return forward
    model.train()

    def forward_backward():
        _switch(model, case)
        model.zero_grad(set_to_none=True)
        model.encoder(**inputs).last_hidden_state.float().sum().backward()

    return forward_backward


def _model_call(case: BenchCase) -> Callable[[], object]:
    model = _model(case)
    inputs = _inputs(case)
    options = [[[3 + (i + j) % (case.vocab_size - 3) for j in range(case.option_len - 1)] + [1]
                for i in range(case.n_options)] for _ in range(case.batch)]
    if case.pass_ == "fwd":
        model.eval()

        def forward():
            _switch(model, case)
            with torch.no_grad():  # not inference_mode: see saicl.eval.scoring
                return model.score_options(**inputs, options=options)

        return forward
    model.train()
    labels = torch.tensor([opts[0] for opts in options], device=case.device)

    def forward_backward():
        _switch(model, case)
        model.zero_grad(set_to_none=True)
        model(**inputs, labels=labels).loss.backward()

    return forward_backward


def build_call(case: BenchCase, for_memory: bool = False) -> Callable[[], object]:
    """The zero-argument function that runs the case once (inputs and model built now, not timed).

    ``for_memory``: at the attention level, include the per-forward ``prepare`` in the call (its bias
    blocks are the memory that differs between structures; the timed call excludes it, see above).
    """
    if case.what not in LEVELS:
        raise ValueError(f"what={case.what!r}: expected one of {LEVELS}")
    if case.pass_ not in PASSES:
        raise ValueError(f"pass={case.pass_!r}: expected one of {PASSES}")
    if case.what == "attention":
        return _attention_call(case, with_prepare=for_memory)
    from .bench_providers import PROVIDERS

    if case.backend in PROVIDERS:
        raise ValueError(f"backend={case.backend!r} is an attention-level provider; it has no {case.what} level")
    return {"encoder": _encoder_call, "model": _model_call}[case.what](case)


def release_models() -> None:
    """Drop the cached model and layouts (before memory baselines, or at the end of a sweep)."""
    _MODELS.clear()
    _shared_layout.cache_clear()


def case_flops(case: BenchCase) -> int:
    """Structured FLOPs of one call of the case (see :mod:`saicl.eval.flops`)."""
    from .flops import attention_flops, decoder_flops, encoder_flops

    layout = case.counting_layout()
    if case.what == "attention":
        return attention_flops(layout, case.heads, case.head_dim, case.pass_)
    config = case.model_config()
    flops = encoder_flops(layout, config, case.pass_)
    if case.what == "model":
        enc_tokens = [int(layout.valid[b].sum()) for b in range(case.batch)]
        rows = [n for n in enc_tokens for _ in range(case.n_options if case.pass_ == "fwd" else 1)]
        flops += decoder_flops(rows, case.option_len, config, case.pass_)
    return flops


__all__ = ["DTYPES", "LEVELS", "PASSES", "BenchCase", "build_call", "case_flops", "release_models"]
