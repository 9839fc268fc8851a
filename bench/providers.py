"""What is compared: each provider turns (inputs, mode) into a callable that runs one step.

All providers of a suite see the same inputs at the same settings (temperature, β with reference
log-probs, completion mask, per-sequence advantages, the mean over each sequence's tokens then over
sequences). Liger's kernels compute GRPO's clipped objective, not MHPO: on logits they are compared
with ``policy_loss(objective=PPOClip())`` on the same inputs (like against like); on the LM head,
Liger's fused linear GRPO is labelled as a different objective.

The logits suite times what a trainer runs: the model's logits (B, T + 1, V) as the leaf. The
fused op takes them whole (the next-token shift is its own), with and without
``inplace_backward``; the eager and compiled baselines slice them as trainers do,
``logits[:, :-1]``, and pay that slice's backward.
"""

import functools

import torch

import mhpo_kernels
import reference
from mhpo_kernels.objectives import PPOClip

from .workloads import KEPT

TEMPERATURE = 0.9
BETA = 0.04
TRL_VOCAB_CHUNK = 8192  # vocabulary columns per tile in TRL's ChunkedLogProbFunction


MIN_P = 0.05  # the truncated log-probs' min_p (a typical sampler setting)
TOP_P = 0.9   # and top_p: the selection launch's counting passes


def _loss_kwargs(inputs):
    return dict(temperature=TEMPERATURE, ref_logprobs=inputs["ref_logprobs"], beta=BETA)


def _mhpo_args(inputs):
    return inputs["input_ids"], inputs["old_logprobs"], inputs["advantages"], inputs["mask"]


@functools.lru_cache(maxsize=None)
def _compiled(name, dynamic=None):
    return torch.compile(getattr(reference, name), dynamic=dynamic)


def _liger():
    from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    return triton_grpo_loss, fused_selective_log_softmax


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@functools.lru_cache(maxsize=None)
def _liger_linear():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(beta=BETA, temperature=TEMPERATURE, epsilon_low=0.2,
                                    epsilon_high=0.2, loss_type="grpo", use_ref_model=True)


def _trl_logprobs(hidden, weight, ids, with_entropy=False):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    B, T, H = hidden.shape
    out = ChunkedLogProbFunction.apply(hidden.reshape(B * T, H), weight, None, ids.reshape(-1),
                                       TEMPERATURE, TRL_VOCAB_CHUNK, None, 1.0,
                                       ("entropy",) if with_entropy else ())
    if with_entropy:
        return out[0].reshape(B, T), out[1].reshape(B, T)
    return out[0].reshape(B, T)


# Differentiable (log-prob, entropy) steps, the hook verl, prime-rl and NeMo-RL call: take
# (inputs, hidden, weight), return both per token.

def _fused_linear_logprobs_grad(inputs, h, w, batch_invariant=False):
    return mhpo_kernels.fused_linear_token_logprobs(h, w, inputs["input_ids"], temperature=TEMPERATURE,
                                                    return_entropy=True, batch_invariant=batch_invariant)


def _eager_linear_logprobs_grad(inputs, h, w):
    return reference.token_logprobs(h @ w.T, inputs["input_ids"], TEMPERATURE, return_entropy=True)


def _trl_linear_logprobs_grad(inputs, h, w):
    return _trl_logprobs(h, w, inputs["input_ids"], with_entropy=True)


# Steps. Loss steps take (inputs, differentiable leaves) and return a scalar loss.

def _fused(inputs, x):
    return mhpo_kernels.mhpo_loss(x, *_mhpo_args(inputs), **_loss_kwargs(inputs))


class ModelOutput(torch.autograd.Function):
    """The leaf's storage as a model's output, with no copy: a non-leaf that the in-place backward
    may overwrite (the op refuses a leaf that requires grad, and a view of one, whose values the
    caller would lose; here that is the point: the bench's private copy of the logits becomes their
    gradient at each step, and the values stay finite). Its gradient passes through to the leaf."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def _fused_inplace(inputs, x):
    return mhpo_kernels.mhpo_loss(ModelOutput.apply(x), *_mhpo_args(inputs), inplace_backward=True,
                                  **_loss_kwargs(inputs))


def _fused_ppo(inputs, x):
    return mhpo_kernels.policy_loss(x, *_mhpo_args(inputs), objective=PPOClip(eps_low=0.2, eps_high=0.2),
                                    **_loss_kwargs(inputs))


def _fused_packed(inputs, x):
    return mhpo_kernels.mhpo_loss(x, inputs["packed_input_ids"], inputs["packed_old_logprobs"], inputs["advantages"],
                                  cu_seqlens=inputs["cu_seqlens"], temperature=TEMPERATURE,
                                  ref_logprobs=inputs["packed_ref_logprobs"], beta=BETA)


def _eager(inputs, x):
    return reference.mhpo_loss(x[:, :-1], *_mhpo_args(inputs), **_loss_kwargs(inputs))


def _compile(inputs, x, dynamic=None):
    return _compiled("mhpo_loss", dynamic)(x[:, :-1], *_mhpo_args(inputs), **_loss_kwargs(inputs))


def _liger_logits(inputs, x):
    triton_grpo_loss, _ = _liger()
    return _first(triton_grpo_loss(
        x, inputs["old_logprobs"], inputs["ref_logprobs"], inputs["input_ids"], inputs["advantages"],
        inputs["mask"], temperature=TEMPERATURE, beta=BETA, eps_low=0.2, eps_high=0.2,
        inplace=False, loss_type="grpo", reduce=True))


def _fused_linear(inputs, h, w, batch_invariant=False):
    return mhpo_kernels.fused_linear_mhpo_loss(h, w, *_mhpo_args(inputs), **_loss_kwargs(inputs),
                                               batch_invariant=batch_invariant)


def _eager_linear(inputs, h, w):
    return reference.mhpo_loss(h @ w.T, *_mhpo_args(inputs), **_loss_kwargs(inputs))


def _trl_linear(inputs, h, w):
    logp = _trl_logprobs(h, w, inputs["input_ids"])
    return reference.mhpo_loss_from_logprobs(
        logp, inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
        ref_logprobs=inputs["ref_logprobs"], beta=BETA)


def _liger_fused_linear(inputs, h, w):
    return _first(_liger_linear()(
        h, w, inputs["input_ids"], inputs["mask"], inputs["advantages"],
        ref_per_token_logps=inputs["ref_logprobs"], old_per_token_logps=inputs["old_logprobs"]))


class Provider:
    """A provider: what it computes, when it can run, its loss step, its no-grad log-probs and its
    differentiable (log-prob, entropy)."""

    def __init__(self, name, computes, loss, logprobs, needs=None, leaves=("full_logits",),
                 private=False, modes=None, logprobs_grad=None):
        self.name, self.computes = name, computes
        self._loss, self._logprobs, self._needs = loss, logprobs, needs
        self._logprobs_grad = logprobs_grad
        self.leaves = leaves   # the inputs the loss differentiates
        self.private = private  # the step overwrites its leaves: it gets copies (made untimed)
        self.modes = modes

    def unavailable(self, device, mode):
        """None if the provider can run ``mode`` on ``device``, else the reason it cannot."""
        if self.modes is not None and mode not in self.modes:
            return f"only {', '.join(self.modes)}"
        if mode == "logprobs" and self._logprobs is None:
            return "no log-probs entry point"
        if mode == "logprobs_grad" and self._logprobs_grad is None:
            return "no differentiable log-probs entry point"
        return self._needs(device) if self._needs else None

    def step(self, inputs, mode):
        """A callable running one step of ``mode``; forward and backward keep autograd on."""
        if mode == "logprobs":
            def run():
                with torch.no_grad():
                    return self._logprobs(inputs)
            return run
        leaves = [(inputs[k].detach().clone() if self.private else inputs[k].detach()).requires_grad_()
                  for k in self.leaves]

        def release():  # so that a memory reading starts from the inputs
            for x in leaves:
                x.grad = None

        if mode == "fwd":
            def run():
                return self._loss(inputs, *leaves)
        elif mode == "logprobs_grad":
            # Random upstream gradients on both outputs, as a loss that uses log-probs and an
            # entropy bonus hands back; drawn once, untimed.
            g = torch.Generator().manual_seed(5)
            up_logp, up_ent = torch.randn((2,) + tuple(inputs["input_ids"].shape), generator=g).to(
                inputs["input_ids"].device)

            def run():
                release()
                logp, ent = self._logprobs_grad(inputs, *leaves)
                ((logp * up_logp).sum() + (ent * up_ent).sum()).backward()
                return torch.stack([logp, ent])
        else:
            def run():
                release()
                loss = self._loss(inputs, *leaves)
                loss.backward()
                return loss
        run.release = release
        return run


def _needs_import(probe, cuda_only=False):
    """Available where ``probe`` imports (and, with ``cuda_only``, on CUDA alone). TRL's chunked
    log-probs fall back to PyTorch where Triton does not run, as the fused op does."""
    def needs(device):
        if cuda_only and device.type != "cuda":
            return "runs on CUDA only"
        try:
            probe()
        except ImportError as e:
            return f"{e.name or e} not importable"
        return None
    return needs


def _probe_trl():
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: F401


def _probe_liger_linear():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: F401


def compile_dynamic():
    """The ``compile`` provider compiled once for every shape (``dynamic=True``): one graph serves
    every N and V of a dtype, so a run over many shapes compiles once (and a warm-up at a small
    shape leaves the graph in inductor's on-disk cache)."""
    return Provider("compile", "MHPO", functools.partial(_compile, dynamic=True), None, modes=("fwd_bwd", "fwd"))


PROVIDERS = {
    "logits": {
        "fused": Provider("fused", "MHPO", _fused,
                          lambda i: mhpo_kernels.token_logprobs(i["full_logits"], i["input_ids"], TEMPERATURE)),
        "fused-packed": Provider("fused-packed", "MHPO, packed (cu_seqlens)", _fused_packed,
                                 lambda i: mhpo_kernels.token_logprobs(i["packed_logits"], i["packed_input_ids"],
                                                                       TEMPERATURE),
                                 leaves=("packed_logits",)),
        "fused-inplace": Provider("fused-inplace", "MHPO", _fused_inplace, None, private=True,
                                  modes=("fwd_bwd",)),
        "eager": Provider("eager", "MHPO", _eager,
                          lambda i: reference.token_logprobs(i["full_logits"][:, :-1], i["input_ids"], TEMPERATURE)),
        "compile": Provider("compile", "MHPO", _compile,
                            lambda i: _compiled("token_logprobs")(i["full_logits"][:, :-1], i["input_ids"],
                                                                  TEMPERATURE)),
        "fused-grpo": Provider("fused-grpo", "GRPO", _fused_ppo, None, modes=("fwd_bwd", "fwd")),
        # the sampler's truncated softmax beside the untruncated log-probs: two reads of each row
        "fused-min-p": Provider("fused-min-p", f"log-probs, min_p = {MIN_P}", None,
                                lambda i: mhpo_kernels.token_logprobs(i["full_logits"], i["input_ids"], TEMPERATURE,
                                                                      min_p=MIN_P), modes=("logprobs",)),
        "eager-min-p": Provider("eager-min-p", f"log-probs, min_p = {MIN_P}", None,
                                lambda i: reference.token_logprobs(i["full_logits"][:, :-1], i["input_ids"],
                                                                   TEMPERATURE, min_p=MIN_P), modes=("logprobs",)),
        "fused-top-p": Provider("fused-top-p", f"log-probs, top_p = {TOP_P}", None,
                                lambda i: mhpo_kernels.token_logprobs(i["full_logits"], i["input_ids"], TEMPERATURE,
                                                                      top_p=TOP_P), modes=("logprobs",)),
        "eager-top-p": Provider("eager-top-p", f"log-probs, top_p = {TOP_P}", None,
                                lambda i: reference.token_logprobs(i["full_logits"][:, :-1], i["input_ids"],
                                                                   TEMPERATURE, top_p=TOP_P), modes=("logprobs",)),
        # a replayed kept set (workloads.KEPT ids per row): the kept logits gathered, no pass over the
        # row. Its GB/s counts every logit as the others' do (bytes_moved), though it reads KEPT of V.
        "fused-kept-ids": Provider("fused-kept-ids", f"log-probs, {KEPT} kept ids replayed", None,
                                   lambda i: mhpo_kernels.token_logprobs(i["full_logits"], i["input_ids"], TEMPERATURE,
                                                                         kept_ids=i["kept_ids"]), modes=("logprobs",)),
        "liger": Provider("liger", "GRPO", _liger_logits,
                          lambda i: _liger()[1](i["full_logits"], i["input_ids"], TEMPERATURE),
                          needs=_needs_import(_liger, cuda_only=True)),
    },
    "linear": {
        "fused": Provider("fused", "MHPO", _fused_linear,
                          lambda i: mhpo_kernels.fused_linear_token_logprobs(
                              i["hidden"], i["weight"], i["input_ids"], temperature=TEMPERATURE),
                          leaves=("hidden", "weight"), logprobs_grad=_fused_linear_logprobs_grad),
        # every chunk padded to the chunk size: a row's bits independent of the batch (the cost: the padding)
        "fused-batch-invariant": Provider(
            "fused-batch-invariant", "MHPO", functools.partial(_fused_linear, batch_invariant=True),
            lambda i: mhpo_kernels.fused_linear_token_logprobs(i["hidden"], i["weight"], i["input_ids"],
                                                               temperature=TEMPERATURE, batch_invariant=True),
            leaves=("hidden", "weight"),
            logprobs_grad=functools.partial(_fused_linear_logprobs_grad, batch_invariant=True)),
        "eager": Provider("eager", "MHPO", _eager_linear,
                          lambda i: reference.token_logprobs(i["hidden"] @ i["weight"].T, i["input_ids"], TEMPERATURE),
                          leaves=("hidden", "weight"), logprobs_grad=_eager_linear_logprobs_grad),
        "trl": Provider("trl", "MHPO (TRL log-probs + eager loss)", _trl_linear,
                        lambda i: _trl_logprobs(i["hidden"], i["weight"], i["input_ids"]),
                        needs=_needs_import(_probe_trl), leaves=("hidden", "weight"),
                        logprobs_grad=_trl_linear_logprobs_grad),
        "liger": Provider("liger", "GRPO (not MHPO)", _liger_fused_linear, None,
                          needs=_needs_import(_probe_liger_linear, cuda_only=True), leaves=("hidden", "weight")),
    },
}
