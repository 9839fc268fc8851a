"""verl's actor takes its log-probs and entropy from this package: ``impl_backend: mhpo``.

verl 0.9 computes the per-token log-probs and entropy of its actor (and reference) in
``FSDPEngineWithLMHead``: the model's forward, then ``prepare_model_outputs``, then the policy loss.
With the switch

    actor_rollout_ref:
      model:
        fused_kernel_options:
          impl_backend: mhpo
        use_fused_kernels: false      # logits path; true: hidden-states path

each engine built for that model config runs

- logits path (``use_fused_kernels: false``): the model's logits go to one ``token_logprobs`` call
  that gives the log-probs and the entropy of softmax(logits / τ) in one read, with verl's τ
  (scalar, or per sample expanded per token), padding removal on or off, verl's Ulysses gather,
  and vocabulary-sharded DTensor logits through ``tp_group``. Its backward writes the gradient into
  the logits, which nothing reads after it. It replaces verl's temperature division, its
  ``entropy_from_logits`` (and the softmax it keeps for the entropy's backward) and its
  ``logprobs_from_logits``;
- hidden-states path (``use_fused_kernels: true``): the model's forward returns
  ``log_probs`` and ``entropy`` from the decoder's hidden states and the LM head through
  ``fused_linear_token_logprobs``, the logits never whole; a sharded head (FSDP2, or verl's TP
  engines) is gathered, its gradient averaged as FSDP2 averages the rest. verl's own unpacking of
  fused outputs is kept.

With ``top_k``, ``top_p`` or ``min_p`` beside ``impl_backend`` (the rollout's, e.g.
``top_p: ${actor_rollout_ref.rollout.top_p}``), both paths score the distribution the rollout
sampled from: the softmax truncated by those filters (SPEC.md, section 9; verl's −1 and 1.0 are
off), for the actor's log-probs; the reference engine (verl's ``forward_only`` one) scores its
full softmax, so that verl's KL loss stays finite. A sampled token outside the kept set gets −inf,
and the actor's loss leaves it out: where the current or the old log-prob is −inf, the switch
zeroes the response mask and both log-probs before verl's loss function runs (``_leaving_out``).

The hook is ``EngineRegistry.new``, wrapped at import: for a model config without the switch it
returns verl's engine untouched. With it, the engine instance (never its class) gets this module's
``prepare_model_outputs`` and, on the hidden-states path, its module gets this module's forward.
``uninstall()`` restores ``EngineRegistry.new``.
"""

import contextlib
import math
import types

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from verl.models.transformers.dense_common import CausalLMOutputForPPO
from verl.utils import tensordict_utils as tu
from verl.workers.engine import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead
from verl.workers.utils.padding import no_padding_2_padding

from .._inputs import overwrites_a_leaf
from ..fused_linear import fused_linear_token_logprobs
from ..loss import token_logprobs
from ._head import gathered_head, head_logit_scale

BACKEND = "mhpo"
IGNORE = -100
# verl routes these model types to their own multimodal forwards; this backend has none for them.
_MULTIMODAL = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe")


def enabled(model_config):
    """Whether a verl model config (dataclass or dict) asks for this backend."""
    options = _get(model_config, "fused_kernel_options", None) or {}
    return _get(options, "impl_backend", None) == BACKEND


def _get(obj, key, default):
    return obj.get(key, default) if hasattr(obj, "get") else getattr(obj, key, default)


def sampling(model_config):
    """The rollout's filters that the switch scores under: ``top_k``, ``top_p``, ``min_p`` under
    ``fused_kernel_options`` (absent or None: off)."""
    options = _get(model_config, "fused_kernel_options", None) or {}
    return {k: _get(options, k, None) for k in ("top_k", "top_p", "min_p") if _get(options, k, None) is not None}


_verl_new = EngineRegistry.__dict__["new"]


def _new(cls, model_type, backend, *args, **kwargs):
    engine = _verl_new.__func__(cls, model_type, backend, *args, **kwargs)
    model_config = kwargs.get("model_config", args[0] if args else None)
    if enabled(model_config):
        attach(engine)
    return engine


def install():
    """Route ``EngineRegistry.new`` through the switch (done on import)."""
    EngineRegistry.new = classmethod(_new)


def uninstall():
    """Give ``EngineRegistry.new`` back to verl."""
    EngineRegistry.new = _verl_new


def attach(engine):
    """Make one verl engine take its log-probs and entropy from this package."""
    if isinstance(engine, FSDPEngineWithValueHead):
        return  # a critic reads no log-probs
    own = getattr(type(engine), "prepare_model_outputs", None) is FSDPEngineWithLMHead.prepare_model_outputs
    if not isinstance(engine, FSDPEngineWithLMHead) or not own:
        raise NotImplementedError(
            f"fused_kernel_options.impl_backend={BACKEND!r} runs on verl's FSDP engine (actor.strategy fsdp or "
            f"fsdp2) and its subclasses that keep its prepare_model_outputs; {type(engine).__name__} is not "
            f"supported")
    engine.prepare_model_outputs = types.MethodType(prepare_model_outputs, engine)
    # verl's reference engine (forward only) scores its full softmax: a sampled token outside the
    # reference's own kept set would make verl's KL loss infinite (SPEC.md, section 9).
    engine.mhpo_sampling = {} if engine.engine_config.forward_only else sampling(engine.model_config)
    if engine.mhpo_sampling:
        forward_step = engine.forward_step

        def forward_step_leaving_out(micro_batch, loss_function, forward_only):
            return forward_step(micro_batch, loss_function=_leaving_out(loss_function), forward_only=forward_only)

        engine.forward_step = forward_step_leaving_out
        # With LoRA verl's reference is this engine with the adapter off (``no_lora_adapter``): its
        # full softmax too. The filters dict is shared with the module's fused forward: emptied
        # for the block, refilled after.
        disable_adapter = engine.disable_adapter

        @contextlib.contextmanager
        def reference_without_filters():
            filters = engine.mhpo_sampling
            saved = dict(filters)
            with disable_adapter():
                filters.clear()
                try:
                    yield
                finally:
                    filters.update(saved)

        engine.disable_adapter = reference_without_filters
    build_module = engine._build_module

    def _build_module():
        module = build_module()
        if engine.model_config.use_fused_kernels:
            model_type = getattr(module.config, "model_type", None)
            if model_type in _MULTIMODAL:
                raise NotImplementedError(f"impl_backend={BACKEND!r} with use_fused_kernels supports text models; "
                                          f"got model_type {model_type!r}")
            module.forward = types.MethodType(forward_with_mhpo_backend, module)
            module.mhpo_sampling = engine.mhpo_sampling
        return module

    engine._build_module = _build_module


def _flag(micro_batch, key, default=False):
    return tu.get_non_tensor_data(data=micro_batch, key=key, default=default)


def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
    """``FSDPEngineWithLMHead.prepare_model_outputs`` with the log-probs and entropy from one fused
    call on the logits (the hidden-states path's outputs are unpacked by verl's own code)."""
    if _flag(micro_batch, "use_fused_kernels"):
        return FSDPEngineWithLMHead.prepare_model_outputs(self, output, output_args, micro_batch,
                                                          logits_processor_func)
    for key in ("distillation_use_topk", "calculate_sum_pi_squared"):
        if _flag(micro_batch, key):
            raise NotImplementedError(f"impl_backend={BACKEND!r} does not support {key}=True: it reads the whole "
                                      "logits, which this backend does not keep")
    calculate_entropy = _flag(micro_batch, "calculate_entropy")
    cu_seqlens = micro_batch["input_ids"].offsets()
    temperature = micro_batch["temperature"]
    logits, tp_group = _local_logits(output.logits)
    labels = output_args["input_ids_rmpad_rolled"]

    if _flag(micro_batch, "use_remove_padding", True):
        if isinstance(temperature, torch.Tensor):
            temperature = output_args["temperature_rmpad"]            # one τ per packed token
        logp, entropy = _token_logprobs(logits.squeeze(0), labels, temperature, calculate_entropy, tp_group,
                                        self.mhpo_sampling)
        pad_size = output_args["pad_size"]
        logp = self._gather_and_unpad_packed(logp, pad_size)
        entropy = None if entropy is None else self._gather_and_unpad_packed(entropy, pad_size)
    else:
        # (B, T, V) padded logits and the rolled packed labels scattered to their positions; the
        # padding positions are ignored (no work, no gradient) and dropped.
        batch_size, seq_len = logits.shape[:2]
        valid = torch.arange(seq_len, device=logits.device) < cu_seqlens.diff().unsqueeze(1)
        padded = labels.new_full((batch_size, seq_len), IGNORE).masked_scatter_(valid, labels)
        if isinstance(temperature, torch.Tensor):
            temperature = output_args["temperature"].unsqueeze(1).expand(batch_size, seq_len).contiguous()
        logp, entropy = _token_logprobs(logits, padded, temperature, calculate_entropy, tp_group, self.mhpo_sampling)
        logp = logp[valid]
        entropy = None if entropy is None else entropy[valid]

    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(logp, cu_seqlens)}
    if calculate_entropy:
        model_output["entropy"] = torch.nested.nested_tensor_from_jagged(entropy, cu_seqlens)
    return model_output


def _leaving_out(loss_function):
    """verl's loss function with the tokens outside the kept set left out (SPEC.md, section 9): where
    the current or the old log-prob is −inf, the response mask is 0, and each −inf log-prob is 0,
    so that verl's loss, which multiplies by the mask, stays finite (−inf − −inf would be NaN).
    verl's normalizers (its global token and sequence counts) still count those tokens."""
    if loss_function is None:
        return None

    def run(*args, model_output=None, data=None, **kwargs):
        if model_output is None or "log_probs" not in model_output or "response_mask" not in data.keys():
            return loss_function(*args, model_output=model_output, data=data, **kwargs)
        log_probs = model_output["log_probs"]
        outside = no_padding_2_padding(log_probs, data).detach() == -math.inf      # (B, R)
        data = data.copy()
        if "old_log_probs" in data.keys():  # a nested field pads to its own longest response only
            old = data["old_log_probs"]
            old_outside = _padded(old) == -math.inf
            outside = outside.clone()
            outside[:, :old_outside.shape[1]] |= old_outside
            data["old_log_probs"] = _where_padded(outside, 0.0, old)
        data["response_mask"] = _where_padded(outside, 0, data["response_mask"])
        values = log_probs.values()
        values = torch.where(values == -math.inf, 0.0, values)
        model_output = {**model_output, "log_probs": torch.nested.nested_tensor_from_jagged(values, log_probs.offsets())}
        return loss_function(*args, model_output=model_output, data=data, **kwargs)

    return run


def _padded(x):
    """A response-level field (B, R): jagged nested tensors padded with 0."""
    return x.to_padded_tensor(0.0) if x.is_nested else x


def _where_padded(where, value, x):
    """``x`` (nested jagged or (B, R)) with ``value`` where the (B, R) ``where`` is true."""
    if not x.is_nested:
        return torch.where(where[:, :x.shape[1]], value, x).to(x.dtype)
    lengths = x.offsets().diff()
    inside = torch.arange(where.shape[1], device=where.device) < lengths.unsqueeze(1)
    values = torch.where(where[inside], value, x.values()).to(x.dtype)
    return torch.nested.nested_tensor_from_jagged(values, x.offsets())


def _local_logits(logits):
    """Plain logits and the group their vocabulary is sharded over: a DTensor sharded on the vocab
    dimension over one mesh dimension stays sharded (``tp_group``), any other DTensor is gathered."""
    if not isinstance(logits, DTensor):
        return logits, None
    vocab_dim = logits.ndim - 1
    placements = logits.placements
    sharded = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim in (vocab_dim, -1)]
    if len(sharded) == 1 and all(isinstance(p, Replicate) for i, p in enumerate(placements) if i != sharded[0]):
        return logits.to_local(), logits.device_mesh.get_group(sharded[0])
    return logits.full_tensor(), None


def _token_logprobs(logits, labels, temperature, calculate_entropy, tp_group, filters=None):
    """One fused read of the logits; the backward overwrites them with their gradient (the model's
    output logits are read by nothing else: verl's own path only reads them to divide by τ)."""
    inplace = logits.requires_grad and not overwrites_a_leaf(logits)
    out = token_logprobs(logits, labels, temperature=temperature, ignore_index=IGNORE,
                         return_entropy=bool(calculate_entropy), inplace_backward=inplace, tp_group=tp_group,
                         **(filters or {}))
    return out if calculate_entropy else (out, None)


def forward_with_mhpo_backend(
    self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
    labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
    cache_position=None, logits_to_keep=0, temperature=1.0, shift_labels=None, **kwargs,
):
    """verl's fused-kernel forward (``dense_common.forward_with_torch_backend``'s signature, labels
    and outputs) with ``fused_linear_token_logprobs`` for the head: log-probs and entropy from the
    hidden states, the model's logit scale and final soft-cap applied."""
    if not return_dict:
        raise NotImplementedError("the mhpo fused-kernel forward returns a dict (verl passes return_dict=True)")
    outputs = self.model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
        output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        return_dict=True, cache_position=cache_position,
    )
    hidden = outputs[0]
    # The engine's globally rolled labels when it has them (packed, Ulysses), else verl's own roll.
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("the mhpo fused-kernel forward needs input_ids, labels or shift_labels")
    weight, bias = gathered_head(self.get_output_embeddings())
    text_config = self.config.get_text_config()
    log_probs, entropy = fused_linear_token_logprobs(
        hidden, weight, rolled, bias=bias, logit_scale=head_logit_scale(text_config),
        final_logit_softcap=getattr(text_config, "final_logit_softcapping", None),
        temperature=float(temperature), return_entropy=True, **getattr(self, "mhpo_sampling", {}),
    )
    return CausalLMOutputForPPO(log_probs=log_probs, entropy=entropy, past_key_values=outputs.past_key_values,
                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)


install()
