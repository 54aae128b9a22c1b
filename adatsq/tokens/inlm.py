"""Image-token pruning inside a Llama-style decoder (FastV, PDrop, V-norm), done with module hooks.

In-LM methods run the first layers on every token and drop image tokens at given layers, so the
LM's own loop must see a shorter sequence from then on. Forward pre-hooks on the decoder layers
gather the kept positions out of the hidden states, the 4-D attention mask, the rotary embeddings
and the position ids; the KV cache of a pruned layer then holds only the kept tokens, and during
decoding the hooks drop the mask columns of the removed tokens. Positions stay the original ones,
as in FastV.

Scores come from the model itself: the last token's attention (mean over heads) in the layer just
before a pruning layer, captured by a forward hook on that layer's attention module — only an
attention backend that returns weights exposes it (load with ``attn_implementation="eager"``) —
or, for V-norm, the value projection of the hidden states entering the pruning layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from adatsq.errors import TokenReductionError
from adatsq.tokens.base import IN_LM, InLMReducer, ReductionContext, TokenReducer

__all__ = ["InLMPruner", "stage_plan"]


def stage_plan(
    reducer: TokenReducer, n: int, n_layers: int, keep: float, min_keep: int = 1
) -> list[tuple[int, int]]:
    """[(layer, image tokens kept from that layer on)] for an in-LM reducer on n image tokens."""
    if not isinstance(reducer, InLMReducer):
        raise TokenReductionError(
            f"reducer {reducer.name!r} has no pruning layer; it is not an in-LM reducer"
        )
    return reducer.stage_plan(n, n_layers, keep, min_keep)


def _gather(x: Tensor, index: Tensor, dim: int) -> Tensor:
    """x gathered along `dim` with a per-row index [B, L'] (x's batch dim may broadcast from 1)."""
    x = x.expand(index.shape[0], *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    full = list(x.shape)
    full[dim] = index.shape[1]
    return torch.gather(x, dim, index.view(shape).expand(full))


@dataclass
class _State:
    image: Tensor  # [B, N] positions of the image tokens in the full prefill sequence
    grid: tuple[int, int]
    full_len: int
    keep: Tensor | None = None  # [B, L'] full-sequence positions alive in the current layer
    layer_keep: dict[int, Tensor] = field(default_factory=dict)
    attention: dict[int, Tensor] = field(default_factory=dict)
    layer_lens: list[int] = field(default_factory=list)
    kept_image: Tensor | None = None  # [B, K_last] image-token indices (0..N-1) alive at the end
    done: bool = False


def _alive(st: _State) -> Tensor:
    """[B, L_cur] full-sequence positions alive in the current layer."""
    if st.keep is not None:
        return st.keep
    return torch.arange(st.full_len, device=st.image.device).expand(st.image.shape[0], -1)


class InLMPruner:
    """Context manager pruning image tokens in `layers` (a decoder's nn.ModuleList) with `reducer`.

    Call `arm(image_positions, grid)` before the prefill; the prefill then prunes, and later forward
    calls (decoding with the cache) are masked consistently. `layer_lens` reports the sequence length
    every layer ran on, for FLOPs and KV accounting.
    """

    def __init__(self, layers: nn.ModuleList, reducer: TokenReducer, keep: float, min_keep: int = 1) -> None:
        if reducer.stage != IN_LM or not isinstance(reducer, InLMReducer):
            raise TokenReductionError(f"reducer {reducer.name!r} runs {reducer.stage}, not inside the LM")
        self.layers, self.reducer, self.keep, self.min_keep = layers, reducer, keep, min_keep
        self._handles: list[RemovableHandle] = []
        self._state: _State | None = None
        self._plan: dict[int, int] = {}

    def arm(self, image_positions: Tensor, grid: tuple[int, int], full_len: int) -> None:
        n = image_positions.shape[1]
        self._plan = dict(stage_plan(self.reducer, n, len(self.layers), self.keep, self.min_keep))
        self._state = _State(image=image_positions.long(), grid=grid, full_len=full_len)

    @property
    def layer_lens(self) -> list[int]:
        return list(self._state.layer_lens) if self._state else []

    @property
    def kept_image(self) -> Tensor | None:
        """[B, K] indices (into the N image tokens) that survive the last pruning stage."""
        return self._state.kept_image if self._state else None

    def __enter__(self) -> InLMPruner:
        needs_attention = "attention" in self.reducer.needs
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_pre_hook(i), with_kwargs=True))
            if needs_attention and i + 1 < len(self.layers):
                self._handles.append(layer.self_attn.register_forward_hook(self._make_attn_hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_attn_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            st = self._state
            if st is None or st.done or index + 1 not in self._plan:
                return
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise TokenReductionError(
                    f"{self.reducer.name} needs attention weights, but the attention backend does not expose "
                    f"them; load the model with attn_implementation='eager'"
                )
            st.attention[index] = weights[:, :, -1, :].float().mean(1)  # [B, L_cur] from the last token

        return hook

    def _make_pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            st = self._state
            if st is None:
                return args, kwargs
            hidden = args[0] if args else kwargs["hidden_states"]
            if st.done:  # decoding: hide the pruned cache columns from the new queries
                return args, self._mask_decode(index, kwargs)
            if index in self._plan:
                hidden = self._prune(index, module, hidden)
            if st.keep is not None:
                kwargs = self._slice_prefill(kwargs, st.keep)
                st.layer_keep[index] = st.keep
            st.layer_lens.append(hidden.shape[1])
            if index == len(self.layers) - 1:
                st.done = True
            args = (hidden, *args[1:]) if args else args
            if not args:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _current_image(self, st: _State) -> tuple[Tensor, Tensor]:
        """Local positions [B, n] (in the current sequence) of alive image tokens and their indices 0..N-1."""
        keep = _alive(st)
        is_image = (keep[:, :, None] == st.image[:, None, :]).any(-1)  # [B, L_cur]
        local = is_image.nonzero()[:, 1].view(keep.shape[0], -1)
        image_index = torch.searchsorted(st.image, _gather(keep, local, 1))
        return local, image_index

    def _prune(self, index: int, layer: nn.Module, hidden: Tensor) -> Tensor:
        st = self._state
        assert st is not None
        local, image_index = self._current_image(st)
        count = self._plan[index]
        chosen = []
        for b in range(hidden.shape[0]):
            attention = st.attention.get(index - 1)
            if attention is None and "attention" in self.reducer.needs:
                raise TokenReductionError(
                    f"no attention captured from layer {index - 1} for {self.reducer.name}; decoder layers "
                    f"must call a `self_attn` module (Llama-style), loaded with attn_implementation='eager'"
                )
            score = attention[b, local[b]] if attention is not None else None
            values = None
            if "values" in self.reducer.needs:  # V-norm: values of the hidden states entering this layer
                values = layer.self_attn.v_proj(layer.input_layernorm(hidden[b, local[b]])).float()
            ctx = ReductionContext(
                grid=st.grid, keep=self.keep, min_keep=self.min_keep, attention=score, values=values
            )
            chosen.append(self.reducer.prune(hidden[b, local[b]], ctx, count))
        kept_local = torch.stack(chosen)  # [B, count] indices into the alive image tokens
        drop = torch.ones_like(local, dtype=torch.bool).scatter_(1, kept_local, False)
        alive = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        alive.scatter_(1, local.masked_select(drop).view(hidden.shape[0], -1), False)
        new_local = alive.nonzero()[:, 1].view(hidden.shape[0], -1)
        keep = _alive(st)
        st.keep = _gather(keep, new_local, 1)
        st.kept_image = torch.gather(image_index, 1, kept_local)
        return _gather(hidden, new_local, 1)

    @staticmethod
    def _slice_prefill(kwargs: dict, keep: Tensor) -> dict:
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 4:
            kwargs["attention_mask"] = _gather(_gather(mask, keep, 2), keep, 3)
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None:
            kwargs["position_embeddings"] = tuple(_gather(t, keep, 1) for t in cos_sin)
        if isinstance(kwargs.get("position_ids"), Tensor):
            kwargs["position_ids"] = _gather(kwargs["position_ids"], keep, 1)
        return kwargs

    def _mask_decode(self, index: int, kwargs: dict) -> dict:
        st = self._state
        assert st is not None
        mask = kwargs.get("attention_mask")
        if index not in st.layer_keep or not isinstance(mask, Tensor) or mask.dim() != 4:
            return kwargs
        keep = st.layer_keep[index]
        new = torch.arange(st.full_len, mask.shape[-1], device=keep.device).expand(keep.shape[0], -1)
        return dict(kwargs, attention_mask=_gather(mask, torch.cat([keep, new], 1), 3))
