"""python -m bench.figure [PATH]: each objective's per-token weight and gradient against log r.

For one token with advantage A = +1 and A = −1, drawn from ``reference`` (autograd gives the
gradient): the loss's weight w (loss = −w·A for every objective but CISPO and GPG, whose loss is
−w·A·logp) and d loss / d logp, as the log importance ratio log r sweeps [−3, 3]. Writes
docs/objectives.png by default; the README shows it.
"""

import os
import sys

import torch

import reference
from mhpo_kernels.objectives import CISPO, GPG, MHPO, SAPO, PPOClip

CURVES = {
    "MHPO": MHPO(),
    "MHPO, no LFM": MHPO(lfm=False),
    "MHPO, no DHP": MHPO(dhp=False),
    "PPO-clip (GRPO, ε 0.2)": PPOClip(),
    "CISPO (0, 1.28)": CISPO(max_ratio=1.28, min_ratio=0.0),
    "SAPO": SAPO(),
    "GPG": GPG(),
}
LOGP = -1.0  # the current log-prob the curves are drawn at (it matters only to CISPO's and GPG's loss)


def curves(objective, adv, log_r):
    """(weight, d loss / d logp) of one token at each log ratio."""
    logp = torch.full_like(log_r, LOGP, requires_grad=True)
    old = LOGP - log_r
    advantages = torch.full_like(log_r, adv)
    loss = reference.objective_loss(logp, old, advantages, torch.ones_like(log_r, dtype=torch.bool), objective)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    per_logp = isinstance(objective, (CISPO, GPG))
    weight = loss / (-adv * (LOGP if per_logp else 1.0))
    return weight.detach(), grad


def main(argv=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = (argv or sys.argv[1:] or [os.path.join(os.path.dirname(__file__), "..", "docs", "objectives.png")])[0]
    log_r = torch.linspace(-3.0, 3.0, 601, dtype=torch.float64)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for col, adv in enumerate((1.0, -1.0)):
        for name, objective in CURVES.items():
            weight, grad = curves(objective, adv, log_r)
            style = dict(lw=2.2 if name == "MHPO" else 1.2, ls="-" if name.startswith("MHPO") else "--")
            axes[0, col].plot(log_r, weight, label=name, **style)
            axes[1, col].plot(log_r, grad, label=name, **style)
        axes[0, col].set_title(f"A = {adv:+.0f}: per-token weight w")
        axes[1, col].set_title(f"A = {adv:+.0f}: d loss / d logp")
        axes[1, col].set_xlabel("log r = logp − old logp")
        for ax in axes[:, col]:
            ax.axvline(0.0, color="0.8", lw=0.8)
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylim(-0.1, 3.5)
    axes[0, 1].set_ylim(-0.1, 3.5)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Objectives of mhpo_kernels.policy_loss (from reference/, float64)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
