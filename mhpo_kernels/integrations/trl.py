"""MHPO in TRL: ``MHPOTrainer``, a ``GRPOTrainer`` whose loss is the fused MHPO op.

Everything but the loss is TRL's: generation, rewards, advantages, the reference model, the
old-policy log-probs (absent when TRL skips them: the step is then on-policy), logging. The loss
replaces ``GRPOTrainer._compute_loss`` (TRL 1.14–1.16) and honours TRL's temperature, β with
``ref_per_token_logps``, ``tool_mask``, vLLM importance-sampling correction (the op's
``token_weights``: a factor on each token's policy term, not its KL term, as TRL applies it) and
gradient-accumulation scaling. It logs the MHPO metrics as ``mhpo/<name>`` beside TRL's ``kl`` and
``entropy`` (with ``objective="trl"``, also TRL's clipped shares, as ``clip_ratio/*_mean`` or
``cispo_clip_ratio``).

Two paths, chosen by ``MHPOConfig.use_fused_linear``:

- logits (default): the model's forward gives the C + 1 positions that predict the C completion
  tokens (and the one after), and ``mhpo_loss`` takes them whole with the next-token shift: one
  read in the forward, one read and one write in the backward, no slice backward, and with
  ``inplace_backward`` (on by default) the gradient written into the logits themselves;
- fused linear: the model's backbone gives the hidden states and ``fused_linear_mhpo_loss`` takes
  them with the LM head, never materializing the logits. It runs inside the wrapped model's
  forward (TRL's forward redirection), so DDP/FSDP/DeepSpeed hooks see a normal forward.

    from mhpo_kernels.integrations.trl import MHPOConfig, MHPOTrainer
    trainer = MHPOTrainer(model=model, reward_funcs=reward, args=MHPOConfig(c=1.5, ...),
                          train_dataset=dataset)
"""

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
import trl
from packaging.version import Version
from trl import GRPOConfig, GRPOTrainer

import mhpo_kernels

TRL_RANGE = (Version("1.14"), Version("1.17"))  # [1.14, 1.17): what _compute_loss is written for
if not TRL_RANGE[0] <= Version(trl.__version__) < TRL_RANGE[1]:
    raise ImportError(
        f"mhpo_kernels.integrations.trl supports trl >= 1.14, < 1.17 (it replaces "
        f"GRPOTrainer._compute_loss of those releases); found trl {trl.__version__}. "
        f"Install a supported one: pip install 'mhpo-kernels[trl]'"
    )

from trl.models.utils import _ForwardRedirection  # noqa: E402

# Whether TRL's own loss multiplies its KL term by the ratio by default (False where the release
# has no such option).
TRL_BIAS_CORRECTION_KL = getattr(GRPOConfig.__dataclass_fields__.get("use_bias_correction_kl"), "default", False)

from ._head import gathered_head, head_logit_scale  # noqa: E402

try:  # ZeRO-3 gathering of the head for a fused loss (TRL ≥ 1.15); a no-op elsewhere.
    from trl.trainer.utils import maybe_gather_lm_head_ctx  # noqa: E402
except ImportError:  # pragma: no cover - depends on the installed TRL
    def maybe_gather_lm_head_ctx(*params):
        return contextlib.nullcontext()

AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum")
TRL_LOSS_TYPES = ("grpo", "dapo", "bnpo", "dr_grpo", "cispo", "sapo")
# TRL's aggregation per loss type (its normalizer: MHPOTrainer.aggregation).
TRL_AGGREGATION = {"grpo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "bnpo": "token-mean",
                   "dr_grpo": "seq-mean-token-sum", "dapo": "token-mean", "cispo": "token-mean"}
# generation_kwargs (transformers' or vLLM's) that leave each sampled token's distribution as the
# scoring with sampler_logprobs forms it (the filters it takes, lengths, stops, ids, outputs).
SAMPLING_NEUTRAL = frozenset((
    "top_k", "top_p", "min_p", "max_new_tokens", "max_tokens", "max_length", "stop", "stop_strings",
    "stop_token_ids", "eos_token_id", "pad_token_id", "bos_token_id", "ignore_eos", "n", "num_return_sequences",
    "seed", "logprobs", "prompt_logprobs", "output_scores", "output_logits", "return_dict_in_generate",
    "renormalize_logits", "cache_implementation", "use_cache", "skip_special_tokens",
    "spaces_between_special_tokens", "include_stop_str_in_output", "detokenize",
))
# The processors (transformers' or vLLM's) the scoring does not take, each with its off value
# (None is off for all of them): another value reshapes the distribution sampled from.
PROCESSORS_OFF = dict(
    repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, encoder_repetition_penalty=1.0,
    typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, no_repeat_ngram_size=0, num_beams=1, min_new_tokens=0,
    min_tokens=0, min_length=0, do_sample=True, bad_words_ids=None, suppress_tokens=None,
    begin_suppress_tokens=None, sequence_bias=None, logit_bias=None, allowed_token_ids=None, bad_words=None,
)


@dataclass
class MHPOConfig(GRPOConfig):
    """TRL's GRPOConfig plus MHPO's hyperparameters (the paper's defaults).

    ``loss_type`` and the clipping ε of GRPOConfig have no effect: the loss is MHPO's, aggregated
    by ``loss_agg_mode``:

    - ``token-mean`` normalizes exactly as TRL's ``dapo`` (its default): the sum over this
      micro-batch's valid tokens divided by the generation batch's valid-token count across all
      processes, per process and per accumulation window (``num_items_in_batch /
      num_processes · accumulation steps / steps_per_generation``), so the summed gradient of an
      optimizer step is the global token mean whatever the batch split.
    - ``seq-mean-token-mean`` (the paper's): per sequence the mean over its valid tokens, then the
      mean over the micro-batch's sequences that have any, divided by the accumulation steps.
      TRL's ``grpo`` divides by every sequence of the micro-batch, empty ones included: the two
      agree when every completion has a valid token (TRL's ``mask_truncated_completions`` can
      empty one).
    - ``seq-mean-token-sum``: the mean over sequences of their token sums, divided by the
      accumulation steps.
    """

    c: float = field(default=1.5, metadata={"help": "MHPO: bound of the Log-Fidelity Modulator ψ."})
    k_pos: float = field(default=1.5, metadata={"help": "MHPO: Weibull shape of the positive-shift hazard."})
    lam_pos: float = field(default=1.0, metadata={"help": "MHPO: Weibull scale of the positive-shift hazard."})
    k_neg: float = field(default=2.0, metadata={"help": "MHPO: Weibull shape of the negative-shift hazard."})
    lam_neg: float = field(default=0.8, metadata={"help": "MHPO: Weibull scale of the negative-shift hazard."})
    loss_agg_mode: str = field(
        default="seq-mean-token-mean",
        metadata={"help": f"MHPO: aggregation over tokens, one of {AGG_MODES}."},
    )
    use_bias_correction_kl: Optional[bool] = field(
        default=None,
        metadata={"help": "TRL's KL term times the ratio, which the fused op does not compute: True is refused. "
                          "None (the default) is False with the MHPO objective, whose KL term is the plain k3 of "
                          "mhpo_kernels' SPEC.md, and TRL's own default (True, refused) with objective='trl' and "
                          "beta > 0: pass False there to train with the plain k3."},
    )
    use_fused_linear: bool = field(
        default=False,
        metadata={"help": "MHPO: take the hidden states and the LM head, never materializing the logits."},
    )
    objective: str = field(
        default="mhpo",
        metadata={"help": "'mhpo' (the MHPO loss, aggregated by loss_agg_mode) or 'trl': TRL's own loss for "
                          f"loss_type in {TRL_LOSS_TYPES} at importance_sampling_level token or sequence, with "
                          "TRL's epsilon, delta, SAPO temperatures and normalization, through the fused op."},
    )
    sampler_logprobs: bool = field(
        default=False,
        metadata={"help": "MHPO: score the old and current log-probs under the distribution the generation "
                          "sampled from: the softmax truncated by top_k, top_p and min_p (SPEC.md, section 9); "
                          "the reference model's over its full softmax. Text-only models; with "
                          "beta > 0 a separate reference model (not PEFT's). A generation that reshapes the "
                          "distribution otherwise (repetition_penalty, another processor) is refused."},
    )
    inplace_backward: bool = field(
        default=True,
        metadata={"help": "MHPO, logits path: write the logits' gradient into the logits (no logits-sized "
                          "buffer). Safe for a model's output logits, which nothing reads after the loss; "
                          "autograd raises if another op saved them."},
    )


class MHPOTrainer(GRPOTrainer):
    """GRPOTrainer with the MHPO loss; see the module docstring."""

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if getattr(config, "use_liger_kernel", False):  # before TRL acts on it
            raise ValueError("MHPOTrainer does not support: use_liger_kernel (TRL's Liger GRPO loss "
                             "replaces the MHPO loss)")
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, MHPOConfig):
            raise TypeError(f"MHPOTrainer needs an MHPOConfig, got {type(self.args).__name__}")
        self._check_supported()
        self._forward_redirection = _ForwardRedirection()

    def _check_supported(self):
        """GRPO options that have no MHPO counterpart fail here, not silently in training."""
        args = self.args
        if args.objective not in ("mhpo", "trl"):
            raise ValueError(f"objective must be 'mhpo' or 'trl', got {args.objective!r}")
        trl_loss = args.objective == "trl"
        self.objective = self._trl_objective() if trl_loss else None
        unsupported = {
            "importance_sampling_level='sequence' (MHPO's ratio is per token)":
                getattr(self, "importance_sampling_level", "token") != "token" and not trl_loss,
            "top_entropy_quantile < 1": getattr(self, "top_entropy_quantile", 1.0) < 1.0,
            "off_policy_mask_threshold": getattr(self, "off_policy_mask_threshold", None) is not None,
            "adaptive entropy control (use_adaptive_entropy)": getattr(self, "use_adaptive_entropy", False),
            # TRL's bonus is the local token mean of the entropy whatever the loss type; the op's is
            # aggregated like the loss (Σ g_t · H_t): the same only where g_t is that token mean.
            "entropy_coef except with objective='trl' and loss_type='bnpo' (TRL's bonus is a local token "
            "mean of the entropy, which the fused loss aggregates like the loss)":
                getattr(self, "entropy_coef", 0.0) != 0.0 and not (trl_loss and self.loss_type == "bnpo"),
            # None is TRL's default, True, for TRL's own loss: its KL term is then not the op's.
            "use_bias_correction_kl (TRL's default with objective='trl' and beta > 0; pass "
            "use_bias_correction_kl=False for the plain k3 KL term)":
                args.use_bias_correction_kl or (args.use_bias_correction_kl is None and trl_loss and self.beta != 0.0
                                                and TRL_BIAS_CORRECTION_KL),
            "delta (two-sided clipping) with the MHPO objective": getattr(args, "delta", None) is not None
                and not trl_loss,
            "use_fused_linear with objective='trl' (the fused linear path computes MHPO)":
                trl_loss and args.use_fused_linear,
            "MoE router aux loss (router_aux_loss_coef = 0 turns it off)": getattr(self, "aux_loss_enabled", False),
            # TRL's Liger path computes its own GRPO loss and never calls _compute_loss: the run
            # would silently train GRPO.
            "use_liger_kernel (TRL's Liger GRPO loss replaces the MHPO loss)":
                getattr(args, "use_liger_kernel", False) or getattr(self, "use_liger_loss", False),
        }
        unsupported["cast_lm_head_to_fp32 on the logits path (use_fused_linear=True honours it)"] = (
            getattr(args, "cast_lm_head_to_fp32", False) and not args.use_fused_linear)
        # The reference is scored over its full softmax (SPEC.md, section 9), told apart by its model;
        # a PEFT reference is the policy's own model with the adapter off, which this cannot tell apart.
        unsupported["sampler_logprobs with beta > 0 and a PEFT model (the reference, the same model with its "
                    "adapter off, would be scored under the filters)"] = (
            args.sampler_logprobs and self.beta != 0.0 and getattr(self, "ref_model", None) is None)
        # A filter left None is filled at generate time from the model's generation_config: the
        # sampled distribution would not be the one scored.
        if args.sampler_logprobs:
            shipped = getattr(self.accelerator.unwrap_model(self.model), "generation_config", None)
            for name, value in self._generation_filters().items():
                if value is None and getattr(shipped, name, None) is not None:
                    unsupported[f"sampler_logprobs with {name} unset while the model's generation_config sets "
                                f"{name}={getattr(shipped, name)!r}, which generation may apply: set {name} in "
                                f"the config (or generation_kwargs)"] = True
            # Anything else that reshapes the sampled distribution is not scored: refused by name,
            # given for the generation or left to the model's generation_config (generation fills
            # in what it does not set).
            overrides = getattr(args, "generation_kwargs", None) or {}
            off = {**PROCESSORS_OFF, "temperature": self.temperature}
            given = {"repetition_penalty": self.repetition_penalty, **overrides}
            given.update({name: getattr(shipped, name, None) for name in PROCESSORS_OFF
                          if name not in given and name not in ("do_sample", "num_beams")})
            if getattr(args, "vllm_structured_outputs_regex", None) is not None:
                given["vllm_structured_outputs_regex"] = args.vllm_structured_outputs_regex
            unscored = [f"{name}={value!r}" for name, value in given.items() if name not in SAMPLING_NEUTRAL
                        and not (value is None or (name in off and value == off[name]))]
            unsupported[f"sampler_logprobs with {', '.join(unscored)} for the generation (the scoring takes "
                        f"temperature, top_k, top_p and min_p only)"] = bool(unscored)
            # transformers' generate applies top_p before min_p, the scoring vLLM's order (min_p, top_k,
            # top_p; SPEC.md, section 9): with both on, top_p renormalizes over other sets.
            filters = self._generation_filters()
            unsupported["sampler_logprobs with both top_p < 1 and min_p > 0 under transformers' generation, "
                        "which applies top_p before min_p (the scoring takes vLLM's order: min_p, top_k, top_p); "
                        "use one of them, or vLLM"] = (
                not getattr(args, "use_vllm", False) and (filters["top_p"] or 1.0) < 1.0 and (filters["min_p"] or 0.0) > 0)
        chosen = [name for name, on in unsupported.items() if on]
        if chosen:
            raise ValueError(f"MHPOTrainer does not support: {', '.join(chosen)}")
        if args.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {args.loss_agg_mode!r}")

    def _trl_objective(self):
        """The objective of TRL's own loss for this configuration, or a ValueError for the
        combinations TRL computes that the fused op does not."""
        from mhpo_kernels.objectives import CISPO, GSPO, SAPO, PPOClip

        args, loss_type, level = self.args, self.loss_type, self.importance_sampling_level
        if loss_type not in TRL_LOSS_TYPES:
            raise ValueError(f"MHPOTrainer does not support: objective='trl' with loss_type={loss_type!r} "
                             f"(supported: {TRL_LOSS_TYPES})")
        if level == "sequence" and (loss_type in ("cispo", "sapo") or args.delta is not None):
            raise ValueError(f"MHPOTrainer does not support: objective='trl' with importance_sampling_level="
                             f"'sequence' and {'delta' if args.delta is not None else 'loss_type=' + loss_type}")
        if args.delta is not None and args.delta <= 1 + self.epsilon_high:
            raise ValueError(f"MHPOTrainer does not support: objective='trl' with delta={args.delta} <= 1 + "
                             f"epsilon_high (TRL's cap then also binds positive advantages; only delta > "
                             f"1 + epsilon_high is the dual clip)")
        if loss_type == "cispo":
            return CISPO(max_ratio=self.epsilon_high, min_ratio=0.0)
        if loss_type == "sapo":
            return SAPO(tau_pos=args.sapo_temperature_pos, tau_neg=args.sapo_temperature_neg)
        if level == "sequence":
            return GSPO(eps_low=self.epsilon_low, eps_high=self.epsilon_high)
        # TRL's delta caps the unclipped ratio: for A < 0 that is the dual clip, and for A > 0 it
        # never binds since delta > 1 + epsilon_high (checked above).
        return PPOClip(eps_low=self.epsilon_low, eps_high=self.epsilon_high, dual_clip=args.delta)

    def aggregation(self, inputs, completion_ids):
        """(loss_agg_mode, normalizer, divide by the accumulation steps) of the loss."""
        if self.objective is None:
            normalizer = self.token_mean_normalizer(inputs)
            return self.args.loss_agg_mode, normalizer, normalizer is None
        mode = TRL_AGGREGATION[self.loss_type]
        if self.loss_type in ("grpo", "sapo"):   # the mean over every sequence, empty ones included
            return mode, float(completion_ids.shape[0]), True
        if self.loss_type == "dr_grpo":
            return mode, float(completion_ids.shape[0] * self.max_completion_length), True
        if self.loss_type == "bnpo":
            return mode, None, True
        return mode, self.dapo_normalizer(inputs), False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Always the MHPO loss: no option of the parent's may route around ``_compute_loss``."""
        if return_outputs:
            raise ValueError("MHPOTrainer does not support returning outputs")
        return self._compute_loss(model, inputs)

    # -- the loss ----------------------------------------------------------------------------

    def mhpo_kwargs(self):
        a = self.args
        return dict(c=a.c, k_pos=a.k_pos, lam_pos=a.lam_pos, k_neg=a.k_neg, lam_neg=a.lam_neg,
                    temperature=self.temperature, loss_agg_mode=a.loss_agg_mode, beta=self.beta)

    def sampling(self, model=None):
        """The generation's filters, with ``sampler_logprobs``: TRL's off values (top_k 0, top_p 1,
        min_p None) are the op's off values too. None for the reference model, scored over its full
        softmax: a sampled token outside its own kept set would make the KL term infinite."""
        if not self.args.sampler_logprobs or (model is not None and model is getattr(self, "ref_model", None)):
            return {}
        return self._generation_filters()

    def _generation_filters(self):
        """top_k, top_p and min_p as the generation takes them: GRPOConfig's, which
        ``generation_kwargs`` override (TRL's rule, for transformers and vLLM generation alike)."""
        filters = dict(top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)
        overrides = getattr(self.args, "generation_kwargs", None) or {}
        return {**filters, **{name: overrides[name] for name in filters if name in overrides}}

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's old- and reference-policy log-probs, or with ``sampler_logprobs`` the old policy's
        of the sampled (truncated) distribution: the model's logits for the completion, whole with
        the next-token shift, through ``token_logprobs`` with TRL's temperature and the filters. A
        sampled token outside the old policy's kept set gets −inf, and the loss leaves it out."""
        filters = self.sampling(model)
        if not filters or compute_aux_loss or any(v is not None for v in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            with self.accelerator.autocast():
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=logits_to_keep + 1,
                               use_cache=False).logits[:, -logits_to_keep - 1:]
            out = mhpo_kernels.token_logprobs(logits, ids[:, -logits_to_keep:], temperature=self.temperature,
                                              return_entropy=bool(compute_entropy), mask=mask[:, -logits_to_keep:],
                                              **filters)
            logps.append(out[0] if compute_entropy else out)
            if compute_entropy:
                entropies.append(out[1])
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def loss_from_logits(self, logits, completion_ids, old_logps, advantages, mask, ref_logps, normalizer=None,
                         loss_agg_mode=None, token_weights=None):
        """The loss and metrics from the logits (B, C + 1, V) that predict the completion;
        ``token_weights``: TRL's vLLM importance-sampling ratio, (B, C) or (B, 1), or None."""
        kwargs = self.mhpo_kwargs()
        if loss_agg_mode is not None:
            kwargs["loss_agg_mode"] = loss_agg_mode
        common = dict(ref_logprobs=ref_logps, return_metrics=True, normalizer=normalizer,
                      token_weights=token_weights,
                      inplace_backward=self.args.inplace_backward, entropy_coef=self.entropy_bonus_coef(),
                      **self.sampling())
        if self.objective is None:
            return mhpo_kernels.mhpo_loss(logits, completion_ids, old_logps, advantages, mask, **common, **kwargs)
        return mhpo_kernels.policy_loss(logits, completion_ids, old_logps, advantages, mask, objective=self.objective,
                                        temperature=kwargs["temperature"], loss_agg_mode=kwargs["loss_agg_mode"],
                                        beta=kwargs["beta"], **common)

    def entropy_bonus_coef(self):
        """TRL's static ``entropy_coef`` (only where ``_check_supported`` found the meanings equal)."""
        return float(getattr(self, "entropy_coef", 0.0))

    def token_mean_normalizer(self, inputs):
        """TRL's ``dapo`` divisor for token-mean: the generation batch's valid tokens (all processes),
        per process and per accumulation window; None for the other modes (local counts)."""
        if self.args.loss_agg_mode != "token-mean":
            return None
        return self.dapo_normalizer(inputs)

    def dapo_normalizer(self, inputs):
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if self.model.training:  # in eval the batch is neither split across steps nor accumulated
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normalizer

    def _fused_linear_forward(self, model, input_ids, attention_mask, logits_to_keep, *loss_args):
        """Backbone → completion hidden states → fused_linear_mhpo_loss, inside model.forward."""
        backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = hidden[:, -logits_to_keep - 1:-1]            # the states that predict the completion
        head = model.get_output_embeddings()
        text_config = model.config.get_text_config()
        completion_ids, old_logps, advantages, mask, ref_logps, normalizer, token_weights = loss_args
        fp32_head = getattr(self.args, "cast_lm_head_to_fp32", False)  # as TRL's head computed the old log-probs
        # Under ZeRO-3 the head is a 0-element shard outside its gather; under FSDP2 a DTensor.
        with maybe_gather_lm_head_ctx(head.weight, head.bias):
            weight, bias = gathered_head(head)
            if fp32_head:
                hidden, weight = hidden.float(), weight.float()
                bias = None if bias is None else bias.float()
            with torch.autocast(hidden.device.type, enabled=False) if fp32_head else contextlib.nullcontext():
                return mhpo_kernels.fused_linear_mhpo_loss(
                    hidden, weight, completion_ids, old_logps, advantages, mask, bias=bias,
                    logit_scale=head_logit_scale(text_config),
                    final_logit_softcap=getattr(text_config, "final_logit_softcapping", None),
                    ref_logprobs=ref_logps, return_metrics=True, normalizer=normalizer, token_weights=token_weights,
                    **self.mhpo_kwargs(), **self.sampling(),
                )

    def _compute_loss(self, model, inputs):
        if inputs.get("pixel_values") is not None:
            raise NotImplementedError("MHPOTrainer supports text-only models")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        advantages = inputs["advantages"]
        # TRL scales each token's policy term by the ratio, per token (B, C) or per sequence (B, 1)
        ratio = inputs["importance_sampling_ratio"] if self.use_vllm and self.vllm_importance_sampling_correction \
            else None
        old_logps = inputs.get("old_per_token_logps")          # None: on-policy (ratio 1)
        ref_logps = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        agg_mode, normalizer, per_accumulation = self.aggregation(inputs, completion_ids)
        loss_args = (completion_ids, old_logps, advantages, mask.bool(), ref_logps, normalizer, ratio)

        with self.accelerator.autocast():
            if self.args.use_fused_linear:
                unwrapped = self.accelerator.unwrap_model(model)
                loss, metrics = self._forward_redirection(
                    model, unwrapped, functools.partial(self._fused_linear_forward, unwrapped),
                    input_ids, attention_mask, logits_to_keep, *loss_args)
            else:
                logits = model(input_ids=input_ids, attention_mask=attention_mask,
                               logits_to_keep=logits_to_keep + 1, use_cache=False).logits
                # The C + 1 positions that predict the completion and the token after it, taken
                # whole (the op's next-token shift). Only a model that ignores logits_to_keep
                # and returns every position needs a slice here.
                if logits.shape[1] != logits_to_keep + 1:
                    logits = logits[:, -logits_to_keep - 1:]
                *args, ratio = loss_args
                loss, metrics = self.loss_from_logits(logits, *args, loss_agg_mode=agg_mode, token_weights=ratio)

        mode = "train" if self.model.training else "eval"
        coef = self.entropy_bonus_coef()
        if coef != 0.0:  # TRL's logs with a bonus: the loss before it (unscaled) and the coefficient
            policy_loss = loss.detach() + coef * metrics["entropy"]   # the bonus: coef · the token mean of H
            self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(coef)
        if mode == "train" and per_accumulation:
            # TRL turns off HF's loss scaling: scale for gradient accumulation here (a dapo
            # normalizer already carries it, as TRL's dapo does).
            loss = loss / self.current_gradient_accumulation_steps
        self._log_mhpo_metrics(mode, metrics, mask)
        return loss

    def _log_mhpo_metrics(self, mode, metrics, mask):
        """Token-weighted means across processes, like TRL's own masked metrics; TRL's own names
        for its kl, entropy and (token level) clipped shares, ``mhpo/<name>`` for the rest."""
        n = mask.sum().float()
        names = [k for k in metrics if k not in ("logp",)]  # MHPO's ψ, ζ, … only with the MHPO objective
        local = torch.stack([metrics[k].float() * n for k in names] + [n])
        totals = self.accelerator.reduce(local, reduction="sum")
        means = dict(zip(names, (totals[:-1] / totals[-1].clamp(min=1.0)).tolist()))
        trl_names = {"entropy": "entropy", "kl": "kl"}
        if self.loss_type == "cispo":    # TRL's cispo clips the ratio above only
            trl_names.update(clip_high_frac="cispo_clip_ratio")
            means.pop("clip_low_frac", None)
        elif "clip_low_frac" in means:   # PPO-clip; the two shares are disjoint (A < 0, A > 0)
            trl_names.update(clip_low_frac="clip_ratio/low_mean", clip_high_frac="clip_ratio/high_mean")
            means["clip_ratio/region_mean"] = means["clip_low_frac"] + means["clip_high_frac"]
        for k, mean in means.items():
            self._metrics[mode][trl_names.get(k, k if "/" in k else f"mhpo/{k}")].append(mean)
