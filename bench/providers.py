"""What is compared: each provider turns (inputs, mode) into a callable that runs one step.

All providers see the same inputs at the same settings (temperature, β with reference log-probs,
completion mask, per-sequence advantages, the mean over each sequence's tokens then over
sequences). Liger's kernel computes GRPO's clipped objective, not MHPO: it is the nearest fused
Triton RL loss on logits, and is labelled as such wherever it is reported.
"""

import functools

import torch

import mhpo_kernels
import reference

TEMPERATURE = 0.9
BETA = 0.04


def _mhpo_call(fn, inputs, logits):
    return fn(
        logits, inputs["input_ids"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
        temperature=TEMPERATURE, ref_logprobs=inputs["ref_logprobs"], beta=BETA,
    )


def _logprobs_call(fn, inputs):
    return fn(inputs["logits"], inputs["input_ids"], temperature=TEMPERATURE)


@functools.lru_cache(maxsize=None)
def _compiled(name):
    return torch.compile(getattr(reference, name))


def _liger():
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    return triton_grpo_loss, fused_selective_log_softmax


def _liger_call(inputs, logits_full):
    triton_grpo_loss, _ = _liger()
    out = triton_grpo_loss(
        logits_full, inputs["old_logprobs"], inputs["ref_logprobs"], inputs["input_ids"],
        inputs["advantages"], inputs["mask"], temperature=TEMPERATURE, beta=BETA,
        eps_low=0.2, eps_high=0.2, inplace=False, loss_type="grpo", reduce=True,
    )
    return out[0] if isinstance(out, (tuple, list)) else out


class Provider:
    """name, what it computes, when it is available, and its step for each mode."""

    def __init__(self, name, computes, loss, logprobs, needs=None, uses_full_logits=False):
        self.name = name
        self.computes = computes
        self._loss = loss            # (inputs, logits) -> scalar loss
        self._logprobs = logprobs    # (inputs) -> (B, T) log-probs, no gradient
        self._needs = needs
        self.uses_full_logits = uses_full_logits

    def unavailable(self, device):
        """None if the provider can run on ``device``, else the reason it cannot."""
        return self._needs(device) if self._needs else None

    def step(self, inputs, mode):
        """A callable running one step of ``mode``; forward and backward keep autograd on."""
        if mode == "logprobs":
            def run():
                with torch.no_grad():
                    return self._logprobs(inputs)
            return run
        source = inputs["full_logits"] if self.uses_full_logits else inputs["logits"]
        x = source.detach().requires_grad_()

        if mode == "fwd":
            return lambda: self._loss(inputs, x)

        def run():
            x.grad = None
            loss = self._loss(inputs, x)
            loss.backward()
            return loss

        run.release = lambda: setattr(x, "grad", None)  # so a memory reading starts from the inputs
        return run


def _needs_cuda(device):
    return None if device.type == "cuda" else "runs on CUDA only"


def _needs_liger(device):
    if device.type != "cuda":
        return "runs on CUDA only"
    try:
        _liger()
    except ImportError as e:
        return f"liger_kernel not importable ({e.name or e})"
    return None


PROVIDERS = {
    "fused": Provider(
        "fused", "MHPO",
        loss=lambda inputs, x: _mhpo_call(mhpo_kernels.mhpo_loss, inputs, x),
        logprobs=lambda inputs: _logprobs_call(mhpo_kernels.token_logprobs, inputs),
    ),
    "eager": Provider(
        "eager", "MHPO",
        loss=lambda inputs, x: _mhpo_call(reference.mhpo_loss, inputs, x),
        logprobs=lambda inputs: _logprobs_call(reference.token_logprobs, inputs),
    ),
    "compile": Provider(
        "compile", "MHPO",
        loss=lambda inputs, x: _mhpo_call(_compiled("mhpo_loss"), inputs, x),
        logprobs=lambda inputs: _logprobs_call(_compiled("token_logprobs"), inputs),
        needs=_needs_cuda,
    ),
    "liger": Provider(
        "liger", "GRPO (not MHPO)",
        loss=lambda inputs, x: _liger_call(inputs, x),
        logprobs=lambda inputs: _liger()[1](inputs["full_logits"], inputs["input_ids"], TEMPERATURE),
        needs=_needs_liger,
        uses_full_logits=True,
    ),
}
