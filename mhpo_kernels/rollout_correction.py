"""Rollout correction: the per-token weights and masks that correct for the rollout engine's
policy differing from the trainer's old policy, as verl and TRL define them, for the losses'
``token_weights`` and ``mask`` (SPEC.md, section 3).

Both take the trainer's old log-probs and the engine's log-probs of the sampled tokens, (B, T),
and a (B, T) mask of the valid tokens; log r_t = old_t − rollout_t. O(N) PyTorch on the inputs'
device; the metrics are detached 0-d tensors, named as each framework logs them, and nothing is
read on the host but ``verl_rollout_correction``'s check that the mask holds a token (verl's).

- ``trl_importance_weights``: TRL's ``vllm_importance_sampling_mode`` (GRPOTrainer, TRL 1.14–1.16).
- ``verl_rollout_correction``: verl 0.9's ``rollout_is`` weights and ``rollout_rs`` rejection
  masks (``verl.trainer.ppo.rollout_corr_helper``).

    weights, metrics = trl_importance_weights(old, rollout, mask, mode="token_truncate", clip_max=3.0)
    loss = mhpo_loss(logits, ids, old, advantages, mask, token_weights=weights)
"""

import math

import torch

TRL_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# verl bounds every log-ratio it exponentiates to [−20, 20].
VERL_LOG_BOUND = 20.0
VERL_RS_OPTIONS = tuple(f"token_k{k}" for k in (1, 2, 3)) + tuple(
    f"seq_{how}_k{k}" for how in ("sum", "mean") for k in (1, 2, 3)) + ("seq_max_k2", "seq_max_k3")


def _masked_mean(x, mask, dim=None):
    """Σ x over the mask / the mask's count (0 where empty), NaN outside the mask dropped."""
    x = torch.where(mask, x, 0.0)
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def trl_importance_weights(old_logprobs, rollout_logprobs, mask, mode="token_truncate", clip_min=None,
                           clip_max=3.0):
    """TRL's vLLM importance-sampling ratio and the metrics it logs under ``sampling/``.

    Per token (``token_*``, (B, T)) r_t = exp(log r_t), or per sequence (``sequence_*``, (B, 1))
    exp(Σ_t log r_t); a NaN log-prob of the engine counts as log r = 0, an infinite log r as the
    largest finite one of its sign. ``*_truncate`` clamps to
    [clip_min, clip_max] (None: unbounded); ``*_mask`` sets to 0 every ratio outside it. The result
    goes to the losses as ``token_weights``; TRL multiplies each token's policy term by it.
    """
    if mode not in TRL_MODES:
        raise ValueError(f"mode must be one of {TRL_MODES}, got {mode!r}")
    _check_shapes(old_logprobs, rollout_logprobs, mask, "mask")
    if clip_min is not None and clip_max is not None and not clip_min < clip_max:   # TRL's GRPOConfig refuses them
        raise ValueError(f"clip_min ({clip_min}) must be less than clip_max ({clip_max})")
    if mode.endswith("truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"mode={mode!r} needs clip_min or clip_max (a truncation needs a bound)")
    mask = mask.bool()
    log_ratio = torch.where(mask, old_logprobs - rollout_logprobs, 0.0)
    finite = torch.finfo(log_ratio.dtype)  # as TRL's nan_to_num: NaN → 0, ±inf → the largest finite values
    log_ratio = torch.where(log_ratio.isnan(), 0.0, log_ratio).clamp(finite.min, finite.max)
    sequence = mode.startswith("sequence")
    if sequence:
        log_ratio = log_ratio.sum(-1, keepdim=True)
    ratio = log_ratio.exp()
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    if mode.endswith("truncate"):
        ratio = ratio.clamp(min=clip_min, max=clip_max)
    else:
        ratio = torch.where((ratio < low) | (ratio > high), 0.0, ratio)
    delta = (old_logprobs - rollout_logprobs).abs()
    seen = mask & ~delta.isnan()
    counted = torch.ones_like(ratio, dtype=torch.bool) if sequence else mask

    def extreme(x, where, largest):  # 0 where nothing counts, as TRL reports it
        if x.numel() == 0:
            return x.new_zeros(())
        fill = -math.inf if largest else math.inf
        x = torch.where(where, x, fill)
        return torch.where(where.any(), x.max() if largest else x.min(), 0.0)

    metrics = {
        "sampling/sampling_logp_difference/mean": _masked_mean(delta, seen),
        "sampling/sampling_logp_difference/max": extreme(delta, seen, True),
        "sampling/importance_sampling_ratio/min": extreme(ratio, counted, False),
        "sampling/importance_sampling_ratio/mean": _masked_mean(ratio, counted),
        "sampling/importance_sampling_ratio/max": extreme(ratio, counted, True),
    }
    return ratio.detach(), {k: v.detach() for k, v in metrics.items()}


def _check_shapes(old_logprobs, rollout_logprobs, mask, mask_name):
    for name, x in (("old_logprobs", old_logprobs), ("rollout_logprobs", rollout_logprobs), (mask_name, mask)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (old_logprobs.dim() == 2 and old_logprobs.shape == rollout_logprobs.shape == mask.shape):
        raise ValueError(f"old_logprobs, rollout_logprobs and {mask_name} must have one shape (B, T), got "
                         f"{tuple(old_logprobs.shape)}, {tuple(rollout_logprobs.shape)} and {tuple(mask.shape)}")


def _bounds(spec, name):
    """verl's threshold strings: "upper" or "lower_upper", each > 0, lower ≤ upper."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"{name} must be a number or a string 'upper' or 'lower_upper', got {spec!r}")
    parts = str(spec).strip().split("_", 1)
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{name} must be 'upper' or 'lower_upper' with numbers, got {spec!r}") from None
    upper, lower = values[-1], (values[0] if len(values) == 2 else None)
    if upper <= 0 or (lower is not None and not 0 < lower <= upper):
        raise ValueError(f"{name} must be > 0, with 0 < lower <= upper, got {spec!r}")
    return lower, upper


def _rs_thresholds(options, spec):
    """One threshold spec per rejection option (one shared by all, or one each, comma-separated)."""
    if spec is None:
        raise ValueError("rollout_rs_threshold is required with rollout_rs")
    specs = [s.strip() for s in str(spec).split(",") if s.strip()]
    if len(specs) not in (1, len(options)):
        raise ValueError(f"rollout_rs_threshold needs one threshold or {len(options)}, got {spec!r}")
    out = {}
    for option, s in zip(options, specs * len(options) if len(specs) == 1 else specs):
        lower, upper = _bounds(s, f"rollout_rs_threshold for {option}")
        if option.endswith("k1"):        # a ratio band; "upper" alone means [1/upper, upper]
            if lower is None and upper < 1:   # as verl refuses it: the band would be empty
                raise ValueError(f"rollout_rs_threshold for {option} must be >= 1 when given alone (the band "
                                 f"[1/upper, upper]), got {s!r}")
            out[option] = (math.log(1.0 / upper if lower is None else lower), math.log(upper))
        elif lower is not None:
            raise ValueError(f"rollout_rs_threshold for {option} takes one upper bound, got {s!r}")
        else:
            out[option] = (None, upper)
    return out


def verl_rollout_correction(old_logprobs, rollout_logprobs, response_mask, *, rollout_is=None,
                            rollout_is_threshold=2.0, rollout_is_batch_normalize=False, rollout_rs=None,
                            rollout_rs_threshold=None):
    """verl's rollout correction: (``rollout_is_weights`` (B, T) or None, the response mask with
    rejected tokens 0, metrics named ``rollout_corr/<name>`` as verl logs them).

    - ``rollout_is`` "token" (r_t) or "sequence" (exp Σ_t log r_t for every token), log r bounded
      to ±20; ``rollout_is_threshold`` "upper" truncates at it (TIS), "lower_upper" zeroes every
      weight outside the band (IcePop); ``rollout_is_batch_normalize`` divides by the batch mean
      (of tokens, or of sequences) on this process (verl averages over the data-parallel group
      once torch.distributed is initialized).
    - ``rollout_rs``: comma-separated options (``VERL_RS_OPTIONS``), every one must pass. With
      k1 = −log r, k2 = (log r)²/2, k3 = r − 1 − log r per token (log r bounded): ``token_k*``
      per token, ``seq_sum_k*``/``seq_mean_k*``/``seq_max_k*`` their sum, mean or max over the
      sequence, rejecting the whole sequence. k1 is kept within [ln lower, ln upper], the others
      at or below the upper bound.

    Metrics: the weights' mean, max, min, std, effective sample size and the shares of raw
    ratios beyond the band; each option's rejected share of tokens and of sequences and the
    total ones; the off-policy diagnostics (both perplexities, kl, k3_kl, the log-perplexity
    differences, chi2_token, chi2_seq). verl's per-option statistics of k (mean, max, std, seq_*)
    and its per-sequence weight statistics are not computed here.
    """
    _check_shapes(old_logprobs, rollout_logprobs, response_mask, "response_mask")
    mask = response_mask.bool()
    if not bool(mask.any()):
        raise ValueError("response_mask must hold at least one valid token")
    maskf = mask.to(old_logprobs.dtype)
    log_ratio = old_logprobs - rollout_logprobs
    bounded = log_ratio.clamp(-VERL_LOG_BOUND, VERL_LOG_BOUND)
    metrics = {}
    weights = None
    if rollout_is is not None and rollout_is_threshold is not None:  # either None: off, as in verl
        if rollout_is not in ("token", "sequence"):
            raise ValueError(f"rollout_is must be 'token' or 'sequence', got {rollout_is!r}")
        lower, upper = _bounds(rollout_is_threshold, "rollout_is_threshold")
        if rollout_is == "token":
            raw_log = log_ratio
            raw = bounded.exp() * maskf
        else:
            raw_log = torch.where(mask, log_ratio, 0.0).sum(-1, keepdim=True)
            raw = raw_log.clamp(-VERL_LOG_BOUND, VERL_LOG_BOUND).exp().expand_as(log_ratio) * maskf
        if lower is None:
            weights = raw.clamp(max=upper)
        else:
            weights = torch.where((raw >= lower) & (raw <= upper), raw, 0.0)
        metrics.update(_is_metrics(weights, raw, raw_log, mask, rollout_is, lower, upper))
        if lower is not None:  # IcePop: the share of tokens whose raw weight left the band
            metrics["rollout_is_oob_ratio"] = _masked_mean(((raw < lower) | (raw > upper)).to(raw.dtype), mask)
        weights = weights.detach()
        if rollout_is_batch_normalize:
            mean = _masked_mean(weights, mask) if rollout_is == "token" else _masked_mean(
                _masked_mean(weights, mask, -1), mask.any(-1))
            big = mean > 1e-8
            weights = torch.where(big, weights / torch.where(big, mean, 1.0), weights)
            metrics["rollout_is_batch_norm_factor"] = torch.where(big, mean, 1.0)
    kept = response_mask.clone()   # the caller's own is never handed back (verl's is a new tensor too)
    if rollout_rs is not None:
        options = list(dict.fromkeys(o.strip() for o in str(rollout_rs).split(",") if o.strip()))
        unknown = [o for o in options if o not in VERL_RS_OPTIONS]
        if not options or unknown:
            raise ValueError(f"rollout_rs options must be among {VERL_RS_OPTIONS}, got {rollout_rs!r}")
        k = {"k1": -bounded, "k2": 0.5 * bounded.square(), "k3": bounded.exp() - 1.0 - bounded}
        keep_all = torch.ones_like(mask)
        for option, (low, high) in _rs_thresholds(options, rollout_rs_threshold).items():
            stat = k[option[-2:]]
            if option.startswith("seq_sum"):
                stat = torch.where(mask, stat, 0.0).sum(-1, keepdim=True)
            elif option.startswith("seq_mean"):
                stat = _masked_mean(stat, mask, -1).unsqueeze(-1)
            elif option.startswith("seq_max"):
                top = torch.where(mask, stat, -math.inf).amax(-1, keepdim=True)
                stat = torch.where(top == -math.inf, 0.0, top)
            keep = (stat <= high) if low is None else (stat >= low) & (stat <= high)
            keep = keep.expand_as(mask)
            keep_all = keep_all & keep
            metrics[f"rollout_rs_{option}_masked_fraction"] = _masked_mean((~keep).to(maskf.dtype), mask)
            metrics[f"rollout_rs_{option}_seq_masked_fraction"] = _masked_mean(
                (~keep & mask).any(-1).to(maskf.dtype), mask.any(-1))
        metrics["rollout_rs_masked_fraction"] = _masked_mean((~keep_all).to(maskf.dtype), mask)
        metrics["rollout_rs_seq_masked_fraction"] = (~keep_all & mask).any(-1).to(maskf.dtype).mean()
        kept = (response_mask * keep_all).to(response_mask.dtype)
    metrics.update(_offpolicy_metrics(old_logprobs, rollout_logprobs, mask))
    return weights, kept, {f"rollout_corr/{name}": v.detach() for name, v in metrics.items()}


def _is_metrics(weights, raw, raw_log, mask, level, lower, upper):
    low = 1.0 / upper if lower is None else lower
    out = {"rollout_is_mean": _masked_mean(weights, mask)}
    if level == "sequence":   # from the unbounded log of each sequence's ratio
        out["rollout_is_max"] = raw_log.max().clamp(max=VERL_LOG_BOUND).exp()
        out["rollout_is_min"] = raw_log.min().exp()
        out["rollout_is_ratio_fraction_high"] = (raw_log > math.log(upper)).to(weights.dtype).mean()
        out["rollout_is_ratio_fraction_low"] = (raw_log < math.log(low)).to(weights.dtype).mean()
    else:
        out["rollout_is_ratio_fraction_high"] = _masked_mean((raw > upper).to(weights.dtype), mask)
        out["rollout_is_ratio_fraction_low"] = _masked_mean((raw < low).to(weights.dtype), mask)
        out["rollout_is_max"] = torch.where(mask, weights, -math.inf).max()
        out["rollout_is_min"] = torch.where(mask, weights, math.inf).min()
    clipped = weights.clamp(0.0, upper)
    mean = _masked_mean(clipped, mask)
    std = (_masked_mean(clipped.square(), mask) - mean.square()).clamp(min=0).sqrt()
    out["rollout_is_std"] = torch.where(mask.sum() > 1, std, 0.0)
    out["rollout_is_eff_sample_size"] = 1.0 / _masked_mean((clipped / (mean + 1e-8)).square(), mask)
    return out


def _offpolicy_metrics(old, rollout, mask):
    """verl's off-policy diagnostics between the trainer's old policy and the engine's (its batch
    means count every row)."""
    mean_old, mean_rollout = _masked_mean(old, mask, -1), _masked_mean(rollout, mask, -1)
    log_ratio = old - rollout
    bounded = log_ratio.clamp(-VERL_LOG_BOUND, VERL_LOG_BOUND)
    log_ppl_diff = mean_rollout - mean_old
    seq_sum = torch.where(mask, log_ratio, 0.0).sum(-1).clamp(-VERL_LOG_BOUND, VERL_LOG_BOUND)
    return {
        "training_ppl": (-mean_old).exp().mean(), "training_log_ppl": (-mean_old).mean(),
        "kl": _masked_mean(rollout - old, mask), "k3_kl": _masked_mean(log_ratio.exp() - log_ratio - 1, mask),
        "rollout_ppl": (-mean_rollout).exp().mean(), "rollout_log_ppl": (-mean_rollout).mean(),
        "log_ppl_diff": log_ppl_diff.mean(), "log_ppl_abs_diff": log_ppl_diff.abs().mean(),
        "log_ppl_diff_max": log_ppl_diff.max(), "log_ppl_diff_min": log_ppl_diff.min(),
        "ppl_ratio": log_ppl_diff.exp().mean(),
        "chi2_token": _masked_mean(bounded.exp().square(), mask) - 1.0,
        "chi2_seq": (2.0 * seq_sum).exp().mean() - 1.0,
    }
