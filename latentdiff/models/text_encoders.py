"""OpenCLIP's text tower as a Diffusers model: the text encoder of Stable Diffusion 2.

A latent diffusion U-Net cross-attends to per-token text features (Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.3). Stable Diffusion 2 takes
them from the OpenCLIP ViT-H/14 text transformer (Cherti et al. 2023, "Reproducible scaling laws for
contrastive language-image learning"), read at its penultimate layer. :class:`OpenCLIPTextModel`
wraps ``open_clip.transformer.TextTransformer`` in Diffusers' ``ModelMixin`` / ``ConfigMixin``, so
the tower

- is a pipeline's ``text_encoder``: ``text_encoder(input_ids)[0]`` is the per-token conditioning,
  as ``StableDiffusionPipeline.encode_prompt`` expects;
- saves and loads as a Diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``);
  a pipeline's ``model_index.json`` records it under its public name ``["latentdiff",
  "OpenCLIPTextModel"]``, which Diffusers resolves once ``latentdiff`` has been imported;
- can be built from an OpenCLIP architecture name and an OpenCLIP checkpoint file
  (:meth:`OpenCLIPTextModel.from_open_clip`), with nothing downloaded.

Example::

    from latentdiff.models.text_encoders import OpenCLIPTextModel
    text_encoder = OpenCLIPTextModel.from_open_clip("ViT-H-14", "open_clip_vit_h14.safetensors")
    text_encoder.save_pretrained("sd2/text_encoder")
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

# ``ModelMixin`` must be a name of this module: when Diffusers loads a component recorded as
# ``["latentdiff.models.text_encoders", "OpenCLIPTextModel"]`` it looks up the base classes it knows
# (``ModelMixin``, ...) *in this module* to decide how to load the class.
from diffusers.models.modeling_utils import ModelMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling

__all__ = ["OpenCLIPTextModel", "open_clip_text_config", "ModelMixin"]

HiddenLayer = Literal["last", "penultimate"]

_HIDDEN_LAYERS = ("last", "penultimate")
_ACTIVATIONS = ("gelu", "quick_gelu")
# Top-level names of the text tower's tensors in an OpenCLIP CLIP state dict (the image tower's
# live under ``visual.``; models with ``custom_text`` put the text tower under ``text.``).
_TEXT_TOWER_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _activation_layer(hidden_act: str) -> type[torch.nn.Module]:
    from open_clip.transformer import QuickGELU

    return {"gelu": torch.nn.GELU, "quick_gelu": QuickGELU}[hidden_act]


class OpenCLIPTextModel(ModelMixin, ConfigMixin):
    r"""OpenCLIP's causal text transformer, returning Stable Diffusion 2's text conditioning.

    The forward pass is OpenCLIP's (token + position embeddings, ``layers`` pre-norm residual
    attention blocks under a causal mask, final layer norm). ``last_hidden_state`` is the
    conditioning a U-Net cross-attends to: with ``hidden_layer="penultimate"`` (Stable Diffusion 2)
    the output of the second-to-last block passed through the final layer norm, as in SD 2's
    ``FrozenOpenCLIPEmbedder(layer="penultimate")``; with ``"last"`` the last block's. The pooled
    output is OpenCLIP's ``encode_text`` feature (before normalisation): the final layer's state at
    the end-of-text token (the largest id of each row), times ``text_projection`` if ``output_dim``.

    Args:
        width: Model width; also the cross-attention width of a U-Net conditioned on this model.
        layers: Number of residual attention blocks.
        heads: Attention heads per block; ``width`` must be divisible by it.
        mlp_ratio: MLP hidden width over ``width``.
        context_length: Maximum number of tokens (77 for CLIP's tokenizer).
        vocab_size: Token vocabulary size (49408 for CLIP's tokenizer).
        hidden_act: ``"gelu"`` (OpenCLIP's LAION models) or ``"quick_gelu"`` (OpenAI CLIP's).
        output_dim: Width of the pooled feature after ``text_projection``; ``None``: no projection.
        hidden_layer: Which block's output ``last_hidden_state`` is: ``"penultimate"`` or ``"last"``.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResidualAttentionBlock"]

    @register_to_config
    def __init__(
        self,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        context_length: int = 77,
        vocab_size: int = 49408,
        hidden_act: str = "gelu",
        output_dim: int | None = None,
        hidden_layer: HiddenLayer = "penultimate",
    ) -> None:
        super().__init__()
        _check_architecture(width, layers, heads, mlp_ratio, context_length, vocab_size, hidden_act,
                            output_dim, hidden_layer)
        from open_clip.transformer import LayerNorm, TextTransformer

        self.text_model = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            mlp_ratio=mlp_ratio,
            output_dim=output_dim,
            act_layer=_activation_layer(hidden_act),
            norm_layer=LayerNorm,
        )
        # Diffusers' ``enable_gradient_checkpointing`` sets this flag (and ``_gradient_checkpointing_func``).
        self.gradient_checkpointing = False

    def freeze_pooling_only_parameters(self) -> OpenCLIPTextModel:
        """Stop gradients to the parameters that only feed ``pooler_output``: the last block (with
        ``hidden_layer="penultimate"``) and ``text_projection``.

        Training on ``last_hidden_state`` alone never reaches them; under DistributedDataParallel a
        parameter without a gradient stalls the gradient synchronisation, so they are frozen instead.
        """
        if self.config.hidden_layer == "penultimate":
            self.text_model.transformer.resblocks[-1].requires_grad_(False)
        if self.text_model.text_projection is not None:
            self.text_model.text_projection.requires_grad_(False)
        return self

    @property
    def hidden_size(self) -> int:
        """Width of ``last_hidden_state``: the ``cross_attention_dim`` of a U-Net using this encoder."""
        return self.config.width

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling | tuple[torch.Tensor, ...]:
        """Encode token ids (``[batch, tokens]``, at most ``context_length`` tokens, CLIP's ids).

        Args:
            input_ids: Token ids, e.g. ``clip_tokenizer()(text, padding="max_length").input_ids``.
            attention_mask: Optional ``[batch, tokens]`` mask, 1 for tokens to attend to and 0 for
                padding. OpenCLIP (and Stable Diffusion 2) use the causal mask alone, so ``None``
                gives their outputs; with a mask, padded keys are also hidden from every query.
            output_hidden_states: Also return every block's output (``hidden_states``: the
                embeddings, then each of the ``layers`` blocks, without the final layer norm).
            return_dict: Return a ``BaseModelOutputWithPooling`` (else a tuple in the same order).

        Returns:
            ``last_hidden_state`` ``[batch, tokens, width]`` (the conditioning, see the class
            docstring), ``pooler_output`` ``[batch, output_dim or width]`` and, if asked,
            ``hidden_states``.
        """
        self._check_inputs(input_ids, attention_mask)
        tower = self.text_model
        num_tokens = input_ids.shape[1]
        # Written out rather than calling ``TextTransformer.forward``, which returns only the final
        # layer: one pass here yields the penultimate states (SD 2's conditioning) and the pooled
        # feature, applies an optional padding mask, and honours Diffusers' gradient checkpointing.
        cast_dtype = tower.transformer.get_cast_dtype()
        hidden = tower.token_embedding(input_ids).to(cast_dtype)
        hidden = hidden + tower.positional_embedding[:num_tokens].to(cast_dtype)
        attention_bias = self._attention_bias(attention_mask, num_tokens, hidden.dtype)

        batch_first = getattr(tower.transformer, "batch_first", False)
        all_states: list[torch.Tensor] = [hidden]
        hidden = hidden if batch_first else hidden.transpose(0, 1)
        for block in tower.transformer.resblocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = self._gradient_checkpointing_func(block, hidden, None, None, attention_bias)
            else:
                hidden = block(hidden, attn_mask=attention_bias)
            all_states.append(hidden if batch_first else hidden.transpose(0, 1))

        final = all_states[-1]
        chosen = all_states[-2] if self.config.hidden_layer == "penultimate" else final
        last_hidden_state = tower.ln_final(chosen)
        # OpenCLIP's "argmax" pooling: the end-of-text token has the largest id of each row. The
        # final layer norm is per token, so it is applied after pooling when it has not been yet.
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        eot_positions = input_ids.argmax(dim=-1)
        if chosen is final:
            pooled = last_hidden_state[rows, eot_positions]
        else:
            pooled = tower.ln_final(final[rows, eot_positions])
        if tower.text_projection is not None:
            pooled = pooled @ tower.text_projection

        hidden_states = tuple(all_states) if output_hidden_states else None
        if not return_dict:
            return tuple(value for value in (last_hidden_state, pooled, hidden_states) if value is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=hidden_states
        )

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [batch, tokens], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        context_length = self.config.context_length
        if not 1 <= input_ids.shape[1] <= context_length:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens per row; this text encoder takes 1 to "
                f"{context_length} (tokenize with truncation=True, max_length={context_length})"
            )
        if input_ids.numel():
            low, high = torch.aminmax(input_ids)
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids holds ids from {int(low)} to {int(high)}, outside the vocabulary "
                    f"[0, {self.config.vocab_size}); was the text tokenized with a different tokenizer?"
                )
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )

    def _attention_bias(
        self, attention_mask: torch.Tensor | None, num_tokens: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """The additive attention mask: OpenCLIP's causal mask, plus padded keys if a mask is given.

        Returns ``[tokens, tokens]``, or ``[batch * heads, tokens, tokens]`` (the layout
        ``torch.nn.MultiheadAttention`` takes for per-sample masks) with ``attention_mask``.
        """
        causal = self.text_model.attn_mask[:num_tokens, :num_tokens].to(dtype)
        if attention_mask is None:
            return causal
        # The finite minimum rather than -inf: a query whose every visible key is padding (only
        # possible with left padding) gets uniform attention instead of NaN, as in transformers.
        padding = torch.zeros(attention_mask.shape, dtype=dtype, device=causal.device)
        padding = padding.masked_fill(attention_mask.to(causal.device) == 0, torch.finfo(dtype).min)
        bias = causal.unsqueeze(0) + padding.unsqueeze(1)  # [batch, query, key]
        return bias.repeat_interleave(self.config.heads, dim=0)

    @classmethod
    def from_open_clip(
        cls,
        model_name: str,
        pretrained: str | os.PathLike | None = None,
        *,
        hidden_layer: HiddenLayer = "penultimate",
        allow_pickle: bool = False,
    ) -> OpenCLIPTextModel:
        """Build the text tower of an OpenCLIP architecture, with its weights from a local checkpoint.

        Nothing is downloaded: the architecture comes from the configs shipped with
        ``open_clip_torch`` (or from ``local-dir:PATH``, a folder with an ``open_clip_config.json``),
        the weights from a local file holding a full OpenCLIP CLIP state dict (the image tower's
        tensors are skipped).

        Args:
            model_name: An OpenCLIP architecture, e.g. ``"ViT-H-14"`` (``open_clip.list_models()``).
            pretrained: Path of a checkpoint: ``.safetensors``, or, with ``allow_pickle=True``,
                a pickled ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` state dict. ``None``: random weights.
            hidden_layer: Which block's output is the conditioning (see the class docstring).
            allow_pickle: Allow reading a pickle-based checkpoint (read with ``weights_only=True``).

        Raises:
            ValueError: unknown or unsupported architecture, unsupported checkpoint format, or a
                checkpoint whose text tower does not match the architecture.
            FileNotFoundError: ``pretrained`` does not exist.
        """
        config = open_clip_text_config(model_name)
        state = None
        if pretrained is not None:
            pretrained = os.fspath(pretrained)
            _check_checkpoint_path(pretrained, allow_pickle)
            with torch.device("meta"):  # the expected tensor shapes, without allocating weights
                expected = cls(**config, hidden_layer=hidden_layer).text_model.state_dict()
            state = _read_text_tower_state(pretrained, allow_pickle)
            _check_text_tower_state(state, expected, pretrained, model_name)
        model = cls(**config, hidden_layer=hidden_layer)
        if state is not None:
            model.text_model.load_state_dict(state, strict=True)
        return model


def _check_architecture(
    width: int,
    layers: int,
    heads: int,
    mlp_ratio: float,
    context_length: int,
    vocab_size: int,
    hidden_act: str,
    output_dim: int | None,
    hidden_layer: str,
) -> None:
    """Raise a ``ValueError`` naming the bad argument before any weight is allocated."""
    for name, value in (("width", width), ("layers", layers), ("heads", heads),
                        ("context_length", context_length), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"OpenCLIPTextModel: {name} must be a positive integer, got {value!r}")
    if width % heads:
        raise ValueError(f"OpenCLIPTextModel: width ({width}) must be divisible by heads ({heads})")
    if not mlp_ratio > 0 or int(width * mlp_ratio) < 1:
        raise ValueError(f"OpenCLIPTextModel: mlp_ratio must be positive, got {mlp_ratio!r}")
    if hidden_act not in _ACTIVATIONS:
        raise ValueError(f"OpenCLIPTextModel: hidden_act must be one of {_ACTIVATIONS}, got {hidden_act!r}")
    if output_dim is not None and (isinstance(output_dim, bool) or not isinstance(output_dim, int) or output_dim < 1):
        raise ValueError(f"OpenCLIPTextModel: output_dim must be a positive integer or None, got {output_dim!r}")
    if hidden_layer not in _HIDDEN_LAYERS:
        raise ValueError(f"OpenCLIPTextModel: hidden_layer must be one of {_HIDDEN_LAYERS}, got {hidden_layer!r}")
    if hidden_layer == "penultimate" and layers < 2:
        raise ValueError(
            f"OpenCLIPTextModel: hidden_layer='penultimate' needs at least 2 layers, got layers={layers}; "
            "use hidden_layer='last'"
        )


def open_clip_text_config(model_name: str) -> dict[str, object]:
    """The :class:`OpenCLIPTextModel` arguments of an OpenCLIP architecture's text tower.

    Reads the architecture with ``open_clip.get_model_config`` (the JSON configs shipped with
    ``open_clip_torch``, or ``local-dir:PATH/open_clip_config.json``); nothing is downloaded.

    Raises:
        ValueError: ``model_name`` is a Hub id, is unknown to OpenCLIP, or its text tower uses an
            option this class does not implement (a Hugging Face text model, a class token,
            non-causal attention, layer scale, another pooling or projection, ...).
    """
    import open_clip
    from open_clip.model import CLIPTextCfg

    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be an OpenCLIP architecture name such as 'ViT-H-14', got {model_name!r}")
    if model_name.startswith("hf-hub:"):
        raise ValueError(
            f"{model_name!r}: reading an architecture from the Hub is not supported (nothing is downloaded); "
            "pass a built-in architecture name such as 'ViT-H-14' or 'local-dir:PATH' for a folder "
            "holding open_clip_config.json"
        )
    try:
        model_config = open_clip.get_model_config(model_name)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not read the OpenCLIP architecture {model_name!r}: {error}") from error
    if model_config is None:
        raise ValueError(
            f"{model_name!r} is not an OpenCLIP architecture; expected one of open_clip.list_models() "
            "(e.g. 'ViT-H-14', 'ViT-L-14', 'ViT-B-32') or 'local-dir:PATH'"
        )
    text_config = dict(model_config.get("text_cfg") or {})
    defaults = CLIPTextCfg()
    # Settings this class implements, or that concern only the tokenizer.
    handled = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "proj_type",
               "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "output_tokens", "pad_id", "eos_id"}
    unsupported = {
        key: value
        for key, value in text_config.items()
        if key not in handled and value != getattr(defaults, key, None)
    }
    proj_type = text_config.get("proj_type", defaults.proj_type)
    if proj_type not in ("linear", "none"):
        unsupported["proj_type"] = proj_type
    if unsupported:
        raise ValueError(
            f"OpenCLIP architecture {model_name!r} has a text tower OpenCLIPTextModel does not implement "
            f"(settings {unsupported}); it supports OpenCLIP's standard causal text transformer, as in "
            "'ViT-H-14' or 'ViT-L-14'"
        )
    embed_dim = model_config.get("embed_dim")
    if proj_type != "none" and embed_dim is None:
        raise ValueError(f"OpenCLIP architecture {model_name!r} has no 'embed_dim' (the text projection's width)")
    return {
        "width": int(text_config.get("width", defaults.width)),
        "layers": int(text_config.get("layers", defaults.layers)),
        "heads": int(text_config.get("heads", defaults.heads)),
        "mlp_ratio": float(text_config.get("mlp_ratio", defaults.mlp_ratio)),
        "context_length": int(text_config.get("context_length", defaults.context_length)),
        "vocab_size": int(text_config.get("vocab_size", defaults.vocab_size)),
        "hidden_act": "quick_gelu" if model_config.get("quick_gelu", False) else "gelu",
        "output_dim": None if proj_type == "none" else int(embed_dim),
    }


def _check_checkpoint_path(path: str, allow_pickle: bool) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"OpenCLIP checkpoint {path!r} does not exist (expected a local .safetensors file)")
    if path.endswith(".safetensors"):
        return
    if path.endswith(_PICKLE_SUFFIXES):
        if not allow_pickle:
            raise ValueError(
                f"{path!r} is a pickle-based checkpoint, which can run code when read; convert it to "
                ".safetensors, or pass allow_pickle=True if you trust the file"
            )
        return
    raise ValueError(
        f"{path!r}: unknown checkpoint format; expected a .safetensors file "
        f"(or, with allow_pickle=True, one of {', '.join(_PICKLE_SUFFIXES)})"
    )


def _text_tower_entries(keys: list[str]) -> tuple[str, list[str]]:
    """The prefix of the text tower in an OpenCLIP state dict, and the keys belonging to it."""
    for prefix in ("", "text.", "module.", "module.text."):
        if f"{prefix}token_embedding.weight" in keys:
            selected = [
                key for key in keys
                if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0] in _TEXT_TOWER_KEYS
            ]
            return prefix, selected
    return "", []


def _read_text_tower_state(path: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The text tower's tensors of a CLIP checkpoint, named as in ``open_clip`` ``TextTransformer``."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        # Reads only the text tower's tensors, not the (larger) image tower's.
        with safe_open(path, framework="pt", device="cpu") as file:
            prefix, keys = _text_tower_entries(list(file.keys()))
            return {key[len(prefix):]: file.get_tensor(key) for key in keys}
    if not allow_pickle:  # pragma: no cover - _check_checkpoint_path rejects it first
        raise ValueError(f"{path!r} is a pickle-based checkpoint; pass allow_pickle=True to read it")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types here (UnpicklingError, RuntimeError, ...)
        raise ValueError(f"could not read {path!r} as a state dict of tensors: {error}") from error
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]  # OpenCLIP training checkpoints: {"epoch", "state_dict", ...}
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(checkpoint).__name__})")
    prefix, keys = _text_tower_entries([key for key in checkpoint if isinstance(key, str)])
    return {key[len(prefix):]: checkpoint[key] for key in keys}


def _check_text_tower_state(
    state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: str, model_name: str
) -> None:
    if not state:
        raise ValueError(
            f"{path!r} holds no OpenCLIP text tower (no 'token_embedding.weight' key); expected a full "
            "OpenCLIP CLIP state dict"
        )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(
            f"{path!r} does not match the text tower of OpenCLIP {model_name!r}: {len(missing)} tensors are "
            f"missing, e.g. {missing[:5]}"
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(
            f"{path!r} does not match the text tower of OpenCLIP {model_name!r}: unexpected tensors "
            f"{unexpected[:5]} (more layers than the architecture?)"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{path!r} does not match the text tower of OpenCLIP {model_name!r}: {key} has shape "
                f"{tuple(tensor.shape)}, the architecture expects {tuple(expected[key].shape)}"
            )


# Record the class under its public path, so a pipeline's model_index.json lists it as
# ["latentdiff", "OpenCLIPTextModel"] and Diffusers finds it after a plain `import latentdiff`
# (Diffusers resolves custom components from already-imported modules only; see latentdiff/__init__.py).
OpenCLIPTextModel.__module__ = "latentdiff"
