"""MHPOTrainer in TRL, on CPU: a tiny Llama-style model built from a config, a word-level
tokenizer built here (nothing downloaded), a handful of prompts and a trivial reward. Two training
steps run, and the loss and every parameter's gradient equal those of the same trainer computing
its loss with the reference (fp32 throughout: the op's logits gradient agrees with the reference to
~1e-6, and backpropagating it through two fp32 transformer layers adds rounding of the same order,
measured ≤ 5e-6; 3e-5 leaves room)."""

import math
import re

import pytest
import torch

trl = pytest.importorskip("trl", reason="the trl extra is not installed (pip install mhpo-kernels[trl])")

import mhpo_kernels  # noqa: E402
import reference  # noqa: E402
from _cases import max_rel_err  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

from mhpo_kernels.integrations.trl import MHPOConfig, MHPOTrainer  # noqa: E402

GRAD_RTOL = 3e-5
VOCAB = 512


class ReferenceTrainer(MHPOTrainer):
    """The same trainer, its loss from the plain-PyTorch reference on the model's logits."""

    def loss_from_logits(self, logits, completion_ids, old_logps, advantages, mask, ref_logps, normalizer=None,
                         loss_agg_mode=None, token_weights=None):
        kwargs = {**self.mhpo_kwargs(), **({"loss_agg_mode": loss_agg_mode} if loss_agg_mode else {})}
        return reference.mhpo_loss(logits, completion_ids, old_logps, advantages, mask, ref_logprobs=ref_logps,
                                   return_metrics=True, normalizer=normalizer, token_weights=token_weights, **kwargs)


class SamplerReferenceTrainer(ReferenceTrainer):
    """The reference trainer with the generation's filters on its loss and on its old and
    reference log-probs (the plain-PyTorch truncated log-softmax)."""

    def loss_from_logits(self, logits, completion_ids, old_logps, advantages, mask, ref_logps, normalizer=None,
                         loss_agg_mode=None, token_weights=None):
        kwargs = {**self.mhpo_kwargs(), **({"loss_agg_mode": loss_agg_mode} if loss_agg_mode else {})}
        return reference.mhpo_loss(logits, completion_ids, old_logps, advantages, mask, ref_logprobs=ref_logps,
                                   return_metrics=True, normalizer=normalizer, token_weights=token_weights, **kwargs,
                                   **self.sampling())


class RecordGradients(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer, hidden-64 Llama and a 512-word tokenizer, saved locally for TRL to load."""
    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), tokenizer


def reward_len(completions, **kwargs):
    return [float(len(c.split())) + 0.1 * (sum(map(ord, c)) % 7) for c in completions]


def make_trainer(tiny_model, tmp_path, cls=MHPOTrainer, callbacks=(), **config):
    path, tokenizer = tiny_model
    prompts = [" ".join(f"w{(7 * i + j) % 500}" for j in range(3 + i % 3)) for i in range(8)]
    args = MHPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        learning_rate=1e-3, report_to="none", logging_steps=1, use_cpu=True, seed=0,
        save_strategy="no", disable_tqdm=True, bf16=False, **{
            "max_steps": 2, "temperature": 0.9, "beta": 0.04, "gradient_accumulation_steps": 2, "num_iterations": 2,
            **config})
    return cls(model=path, reward_funcs=reward_len, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
               processing_class=tokenizer, callbacks=list(callbacks))


def train(tiny_model, tmp_path, cls=MHPOTrainer, **config):
    grads = RecordGradients()
    trainer = make_trainer(tiny_model, tmp_path, cls, callbacks=[grads], **config)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, grads.steps, trainer.state.log_history


@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
def test_two_steps_equal_reference(tiny_model, tmp_path, fused_linear):
    losses, grads, history = train(tiny_model, tmp_path / "op", use_fused_linear=fused_linear)
    ref_losses, ref_grads, _ = train(tiny_model, tmp_path / "ref", cls=ReferenceTrainer)
    assert len(grads) == len(ref_grads) == 2
    assert losses == pytest.approx(ref_losses, abs=1e-6)  # means of terms of size ~ w·|A| ≤ e^c·|A|
    for step, ref_step in zip(grads, ref_grads):
        assert step.keys() == ref_step.keys() and len(step) > 0
        for name, g in step.items():
            assert max_rel_err(g, ref_step[name]) <= GRAD_RTOL, name
    logged = {k for h in history for k in h}
    assert {"mhpo/psi", "mhpo/zeta", "mhpo/survival", "mhpo/saturated_frac", "kl", "entropy"} <= logged


@mhpo_kernels.use_backend("torch")  # TRL's skipped old log-probs, not the kernels: the PyTorch path
def test_on_policy_step_without_old_logprobs(tiny_model, tmp_path):
    """num_iterations = 1: TRL skips the old log-probs and the ratio is 1, so ψ = 0 exactly."""
    losses, grads, history = train(tiny_model, tmp_path, num_iterations=1, beta=0.0)
    assert len(grads) == 2 and all(torch.isfinite(torch.tensor(losses)))
    psi = [h["mhpo/psi"] for h in history if "mhpo/psi" in h]
    assert psi and all(p == 0.0 for p in psi)


def _inputs(tokenizer, B=4, P=5, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0
    tool_mask = torch.ones(B, T, dtype=torch.long)
    tool_mask[2, 1:3] = 0          # tokens a tool wrote: no policy gradient
    return {
        "prompt_ids": torch.randint(3, VOCAB, (B, P), generator=g), "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(3, VOCAB, (B, T), generator=g), "completion_mask": completion_mask,
        "tool_mask": tool_mask, "advantages": torch.randn(B, generator=g),
        "old_per_token_logps": torch.randn(B, T, generator=g) - 6.0, "ref_per_token_logps": torch.randn(B, T, generator=g) - 6.0,
    }


def _same_step(trainer, ref_trainer, inputs, accumulation):
    """One _compute_loss and backward of each trainer on ``inputs``: the loss and every gradient
    agree; returns the reference's loss."""
    results = []
    for t in (trainer, ref_trainer):
        t.model.train()
        t.current_gradient_accumulation_steps = accumulation
        t.model.zero_grad()
        loss = t._compute_loss(t.model, inputs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}))
    (loss, grads), (ref_loss, ref_grads) = results
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    for name, g in grads.items():
        assert max_rel_err(g, ref_grads[name]) <= GRAD_RTOL, name
    return ref_loss


@pytest.mark.parametrize("fused_linear", [False, True], ids=["logits", "fused-linear"])
def test_compute_loss_tool_mask_and_accumulation(tiny_model, tmp_path, fused_linear):
    """One _compute_loss on a crafted batch: tool-written tokens are excluded, the loss is divided
    by the gradient-accumulation steps, and it equals the reference trainer's."""
    trainer = make_trainer(tiny_model, tmp_path / "op", use_fused_linear=fused_linear)
    ref_trainer = make_trainer(tiny_model, tmp_path / "ref", cls=ReferenceTrainer)
    inputs = _inputs(tiny_model[1])
    ref_loss = _same_step(trainer, ref_trainer, inputs, accumulation=3)
    # Without the tool mask and without accumulation: a different loss, 3× the scaled one's size.
    no_tool = {k: v for k, v in inputs.items() if k != "tool_mask"}
    ref_trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        unscaled = ref_trainer._compute_loss(ref_trainer.model, inputs)
        unmasked = ref_trainer._compute_loss(ref_trainer.model, no_tool)
    assert unscaled.item() == pytest.approx(3 * ref_loss.item(), rel=1e-6)
    assert unmasked.item() != pytest.approx(unscaled.item(), rel=1e-3)


@pytest.mark.parametrize("option", [dict(top_entropy_quantile=0.5), dict(importance_sampling_level="sequence"),
                                    dict(use_bias_correction_kl=True), dict(loss_agg_mode="sum")],
                         ids=["entropy-quantile", "sequence-level", "bias-corrected-kl", "agg-mode"])
def test_unsupported_options_fail_clearly(tiny_model, tmp_path, option):
    with pytest.raises(ValueError, match="MHPOTrainer does not support|loss_agg_mode"):
        make_trainer(tiny_model, tmp_path, **option)


def test_trl_objective_refuses_trls_default_bias_corrected_kl(tiny_model, tmp_path):
    """TRL's loss multiplies its KL term by the ratio by default (use_bias_correction_kl=True),
    which the op does not: objective='trl' with beta > 0 and the option left unset is refused
    rather than trained with another KL gradient; set to False, or with beta = 0 (no KL term),
    or under the MHPO objective (whose KL term is SPEC.md's k3), the trainer builds."""
    with pytest.raises(ValueError, match="use_bias_correction_kl=False for the plain k3"):
        make_trainer(tiny_model, tmp_path / "a", objective="trl", loss_type="dapo")
    for config in (dict(objective="trl", loss_type="dapo", use_bias_correction_kl=False),
                   dict(objective="trl", loss_type="dapo", beta=0.0), dict()):
        assert make_trainer(tiny_model, tmp_path / "b", **config).beta == config.get("beta", 0.04)


def _vllm_ratio(inputs, ratio_shape, seed=3):
    B, T = inputs["completion_ids"].shape
    g = torch.Generator().manual_seed(seed)
    ratio = torch.rand(B, T if ratio_shape == "token" else 1, generator=g) + 0.5
    ratio[0, 0] = 0.0                               # a token TRL's token_mask mode masked
    return {**inputs, "importance_sampling_ratio": ratio}


@pytest.mark.parametrize("ratio_shape", ["token", "sequence"])
def test_vllm_importance_sampling_ratio(tiny_model, tmp_path, ratio_shape):
    """TRL's vLLM correction multiplies each token's policy term, not its KL term (β > 0 here), by a
    per-token (B, T) or per-sequence (B, 1) ratio: the op's token_weights. The loss and every
    gradient equal the reference trainer's given the same ratio."""
    trainer = make_trainer(tiny_model, tmp_path / "op")
    ref_trainer = make_trainer(tiny_model, tmp_path / "ref", cls=ReferenceTrainer)
    for t in (trainer, ref_trainer):
        t.use_vllm, t.vllm_importance_sampling_correction = True, True
    inputs = _vllm_ratio(_inputs(tiny_model[1]), ratio_shape)
    loss = _same_step(trainer, ref_trainer, inputs, accumulation=1)
    ref_trainer.use_vllm = False
    assert ref_trainer._compute_loss(ref_trainer.model, inputs).item() != pytest.approx(loss.item(), rel=1e-3)


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_trl_gspo_with_the_vllm_ratio_equals_trl(tiny_model, tmp_path, mode):
    """objective='trl' at sequence level (GSPO) with TRL's vLLM ratio, per token or per sequence:
    the loss and every gradient equal TRL's own GRPOTrainer's on the same inputs."""
    config = dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4)
    ours, theirs = (_trl_trainer(tiny_model, tmp_path / name, cls, **config)
                    for name, cls in (("ours", MHPOTrainer), ("trl", trl.GRPOTrainer)))
    for t in (ours, theirs):
        t.use_vllm, t.vllm_importance_sampling_correction, t.vllm_importance_sampling_mode = True, True, mode
    inputs = _vllm_ratio(_inputs(tiny_model[1]), "token" if mode.startswith("token") else "sequence")
    with mhpo_kernels.use_backend("torch"):  # TRL's GSPO, not the kernels
        _same_step(ours, theirs, inputs, accumulation=1)


def test_head_logit_scale_follows_trl():
    from types import SimpleNamespace

    from mhpo_kernels.integrations.trl import head_logit_scale

    assert head_logit_scale(SimpleNamespace()) == 1.0
    assert head_logit_scale(SimpleNamespace(logit_scale=0.5, output_multiplier=3.0)) == 0.5
    assert head_logit_scale(SimpleNamespace(output_multiplier=3.0)) == 3.0
    assert head_logit_scale(SimpleNamespace(lm_head_multiplier=2.0)) == 2.0
    assert head_logit_scale(SimpleNamespace(logits_scaling=4.0, model_type="granite")) == 0.25
    assert head_logit_scale(SimpleNamespace(logits_scaling=4.0, model_type="hyperclovax")) == 4.0


def test_fp32_head_needs_the_fused_linear_path(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="cast_lm_head_to_fp32"):
        make_trainer(tiny_model, tmp_path, cast_lm_head_to_fp32=True)
    make_trainer(tiny_model, tmp_path, cast_lm_head_to_fp32=True, use_fused_linear=True)


def test_logits_path_runs_no_slice_backward_over_the_logits(tiny_model, tmp_path):
    """The model returns the C + 1 positions that predict the completion; the op takes them whole:
    the backward of a step slices nothing logits-sized, and writes the gradient in place."""
    from test_trainer_calls import _Recorder

    trainer = make_trainer(tiny_model, tmp_path)
    inputs = _inputs(tiny_model[1])
    B, C = inputs["completion_ids"].shape
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, inputs)
    with _Recorder() as rec:
        loss.backward()
    logits_numel = B * (C + 1) * VOCAB
    slices = [sizes for name, sizes in rec.calls if "slice_backward" in name and any(n >= logits_numel for n in sizes)]
    assert not slices, slices
    assert any("sweeps_backward_" in name for name, _ in rec.calls)  # in place: on by default


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_token_mean_normalizes_as_trl_dapo(tiny_model, tmp_path, mode):
    """token-mean: Σ over the micro-batch's valid tokens / (num_items_in_batch / num_processes ·
    accumulation steps / steps_per_generation) in training, / (num_items_in_batch /
    num_processes) in eval: TRL's dapo, with no further division by the accumulation steps."""
    trainer = make_trainer(tiny_model, tmp_path, loss_agg_mode="token-mean", steps_per_generation=4)
    ref_trainer = make_trainer(tiny_model, tmp_path / "ref", cls=ReferenceTrainer, loss_agg_mode="token-mean",
                               steps_per_generation=4)
    inputs = {**_inputs(tiny_model[1]), "num_items_in_batch": torch.tensor(57.0)}
    mask = inputs["completion_mask"] * inputs["tool_mask"]
    results = []
    for t in (trainer, ref_trainer):
        t.model.train(mode == "train")
        t.current_gradient_accumulation_steps = 3
        with torch.no_grad():
            results.append(t._compute_loss(t.model, inputs).item())
    divisor = 57.0 * (3 / 4 if mode == "train" else 1.0)
    with torch.no_grad():  # the local token mean from the model's logits, rescaled to TRL's divisor
        C = inputs["completion_ids"].shape[1]
        logits = ref_trainer.model(
            input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)).logits[:, -C - 1:]
        local = reference.mhpo_loss(logits, inputs["completion_ids"], inputs["old_per_token_logps"],
                                    inputs["advantages"], mask.bool(), ref_logprobs=inputs["ref_per_token_logps"],
                                    **ref_trainer.mhpo_kwargs())
    assert results[0] == pytest.approx(results[1], rel=1e-6)
    assert results[1] == pytest.approx(local.item() * mask.sum().item() / divisor, rel=1e-5)


def test_liger_kernel_is_refused(tiny_model, tmp_path):
    """TRL's Liger path would train its own GRPO loss and never call _compute_loss."""
    with pytest.raises(ValueError, match="use_liger_kernel"):
        make_trainer(tiny_model, tmp_path, use_liger_kernel=True)


class RecordingTrainer(MHPOTrainer):
    """Keeps a copy of every batch its loss sees."""

    def _compute_loss(self, model, inputs):
        self.seen = getattr(self, "seen", []) + [
            {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}]
        return super()._compute_loss(model, inputs)


def _two_process_worker(rank, world_size, model_path, out_dir):
    import os

    from transformers import PreTrainedTokenizerFast

    # What `accelerate launch --cpu --num_processes 2` sets; the process group itself is already
    # initialized (gloo over a FileStore), and accelerate uses it as it is.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_path)
    grads = RecordGradients()
    trainer = make_trainer((model_path, tokenizer), f"{out_dir}/rank{rank}", RecordingTrainer, callbacks=[grads],
                           **TWO_PROCESS_CONFIG)
    assert trainer.accelerator.num_processes == world_size
    with mhpo_kernels.use_backend("torch"):  # DDP's reductions, not the kernels (tested on their own)
        trainer.train()
    logged = [h for h in trainer.state.log_history if "mhpo/psi" in h]
    torch.save(dict(seen=trainer.seen, grads=grads.steps[0], logged=logged[0]), f"{out_dir}/trl-{rank}.pt")


TWO_PROCESS_CONFIG = dict(use_fused_linear=True, max_steps=1, gradient_accumulation_steps=1, num_iterations=1,
                          beta=0.0)


@mhpo_kernels.use_backend("torch")  # as the workers run
def test_two_processes_give_the_head_the_one_process_gradient(tiny_model, tmp_path):
    """MHPOTrainer in two processes (DDP on CPU, gloo), fused linear path: the metrics it logs are
    reduced across processes (the same on both, the token-weighted mean of each rank's), and the
    LM head's gradient after DDP's averaging equals what one process computes from the two
    ranks' batches."""
    import _dist

    _dist.run(_two_process_worker, 2, tmp_path, tiny_model[0], str(tmp_path), timeout=120)
    ranks = [torch.load(tmp_path / f"trl-{r}.pt") for r in range(2)]
    assert ranks[0]["logged"]["mhpo/psi"] == ranks[1]["logged"]["mhpo/psi"]
    single = make_trainer(tiny_model, tmp_path / "single", **TWO_PROCESS_CONFIG)
    single.model.train()
    single.current_gradient_accumulation_steps = 1
    single.model.zero_grad()
    tokens, weighted = [], []
    for got in ranks:
        (batch,) = got["seen"]
        loss = single._compute_loss(single.model, batch)
        (loss / 2).backward()                                  # DDP averages over the 2 ranks
        tokens.append(batch["completion_mask"].sum().item())
        weighted.append(single._metrics["train"]["mhpo/zeta"][-1] * tokens[-1])
    head = "lm_head.weight"
    expected = dict(single.model.named_parameters())[head].grad
    assert expected.abs().sum() > 0
    assert max_rel_err(ranks[0]["grads"][head], expected) <= GRAD_RTOL
    assert max_rel_err(ranks[1]["grads"][head], expected) <= GRAD_RTOL
    assert ranks[0]["logged"]["mhpo/zeta"] == pytest.approx(sum(weighted) / sum(tokens), rel=1e-5)


class LossLog(TrainerCallback):
    def __init__(self):
        self.losses, self.logs = [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
            self.logs.append(dict(logs))


def _trl_trainer(tiny_model, tmp_path, cls, callbacks=(), **config):
    """MHPOTrainer with objective='trl', or TRL's own GRPOTrainer, on the same configuration."""
    from trl import GRPOConfig

    path, tokenizer = tiny_model
    prompts = [" ".join(f"w{(7 * i + j) % 500}" for j in range(3 + i % 3)) for i in range(8)]
    common = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                  learning_rate=1e-3, report_to="none", logging_steps=1, use_cpu=True, seed=0, save_strategy="no",
                  disable_tqdm=True, bf16=False, max_steps=2, temperature=0.9, beta=0.04,
                  gradient_accumulation_steps=2, num_iterations=2, use_bias_correction_kl=False, **config)
    args = MHPOConfig(objective="trl", **common) if cls is MHPOTrainer else GRPOConfig(**common)
    return cls(model=path, reward_funcs=reward_len, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
               processing_class=tokenizer, callbacks=list(callbacks))


def _trl_run(tiny_model, tmp_path, cls, **config):
    log = LossLog()
    # TRL's loss semantics, not the kernels: the PyTorch path, whose sweeps every kernel test holds
    # the Triton kernels to (under the interpreter these runs took 10 s each).
    with mhpo_kernels.use_backend("torch"):
        _trl_trainer(tiny_model, tmp_path, cls, callbacks=[log], **config).train()
    return log


@pytest.mark.parametrize("config", [
    dict(loss_type="grpo"), dict(loss_type="dapo"), dict(loss_type="bnpo", entropy_coef=0.5), dict(loss_type="dr_grpo"),
    dict(loss_type="cispo", epsilon_high=1.3), dict(loss_type="sapo"), dict(loss_type="dapo", delta=1.5),
    dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4),
], ids=["grpo", "dapo", "bnpo-entropy-bonus", "dr_grpo", "cispo", "sapo", "dapo-delta", "gspo"])
def test_trl_objective_trains_as_grpo_trainer(tiny_model, tmp_path, config):
    """objective='trl': the training losses equal TRL's own GRPOTrainer's on the same seed, for
    each supported loss_type (TRL's ε, δ, SAPO temperatures and normalization), and TRL's entropy
    bonus where its meaning is the op's (bnpo: both are the local token mean). TRL's logs of the
    KL, the entropy, the token-level clipped shares (clip_ratio/*_mean, cispo_clip_ratio: nonzero
    in the second step) and, with the bonus, the loss before it and the coefficient, are logged
    too and equal (clip_ratio/low_min and high_max are not: docs/trl.md)."""
    ours = _trl_run(tiny_model, tmp_path / "ours", MHPOTrainer, **config)
    theirs = _trl_run(tiny_model, tmp_path / "trl", trl.GRPOTrainer, **config)
    assert len(ours.losses) == len(theirs.losses) == 2
    # Means of per-token terms of size up to |A|·|logp| ≈ 10 (CISPO) that cancel to 1e-2 or less:
    # fp32 rounding of the terms leaves ~1e-7 absolute (measured ≤ 1.5e-7).
    assert ours.losses == pytest.approx(theirs.losses, rel=1e-5, abs=1e-6)
    names = {"kl", "entropy"} | ({"policy_loss", "entropy_coef"} if "entropy_coef" in config else set())
    if config.get("importance_sampling_level") != "sequence":
        names |= {"cispo": {"cispo_clip_ratio"}, "sapo": set()}.get(
            config["loss_type"], {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"})
    for mine, trls in zip(ours.logs, theirs.logs):
        assert names <= trls.keys() and names <= mine.keys(), (names, sorted(trls), sorted(mine))
        assert {k: mine[k] for k in names} == pytest.approx({k: trls[k] for k in names}, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("config, match", [
    (dict(loss_type="luspo", importance_sampling_level="sequence"), "loss_type='luspo'"),
    (dict(loss_type="sapo", importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(loss_type="grpo", use_fused_linear=True), "use_fused_linear"),
    (dict(loss_type="dapo", delta=1.1, epsilon_high=0.28), "delta=1.1"),
    (dict(loss_type="grpo", entropy_coef=0.1), "entropy_coef"),
    (dict(loss_type="bnpo", entropy_coef=0.1, use_adaptive_entropy=True), "use_adaptive_entropy"),
])
def test_trl_objective_refuses_what_it_does_not_compute(tiny_model, tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tiny_model, tmp_path, objective="trl", **config)


SAMPLER = dict(top_k=40, top_p=0.9)   # top_p with min_p only under vLLM (transformers applies them in another order)


def test_sampler_logprobs_take_the_filters_generation_takes(tiny_model, tmp_path):
    """TRL's generation_kwargs override its top_k, top_p and min_p for the generation: the scoring
    takes them too. A filter left None, which generation fills from a model's generation_config
    that sets it, is refused (the sampled distribution would not be the one scored)."""
    import shutil

    from transformers import GenerationConfig

    trainer = make_trainer(tiny_model, tmp_path / "kw", sampler_logprobs=True, beta=0.0, top_k=40,
                           generation_kwargs={"top_k": 5, "top_p": 0.5})
    assert trainer.sampling() == dict(top_k=5, top_p=0.5, min_p=None)
    generation = trainer.generation_config    # TRL's own, which its generation samples with
    assert (generation.top_k, generation.top_p, generation.min_p) == (5, 0.5, None)
    path, tokenizer = tiny_model
    shipped = str(tmp_path / "shipped")
    shutil.copytree(path, shipped)
    GenerationConfig(do_sample=True, top_k=20, top_p=0.95, min_p=0.1, pad_token_id=0, eos_token_id=2).save_pretrained(
        shipped)
    with pytest.raises(ValueError, match="sampler_logprobs with min_p unset while the model's generation_config "
                                         "sets min_p=0.1"):
        make_trainer((shipped, tokenizer), tmp_path / "shipped-run", sampler_logprobs=True, beta=0.0)
    trainer = make_trainer((shipped, tokenizer), tmp_path / "set", sampler_logprobs=True, beta=0.0, min_p=0.05)
    assert trainer.sampling() == dict(top_k=0, top_p=1.0, min_p=0.05)
    # transformers' generate applies top_p before min_p; the scoring takes vLLM's order: refused.
    with pytest.raises(ValueError, match="both top_p < 1 and min_p > 0 under transformers' generation"):
        make_trainer(tiny_model, tmp_path / "order", sampler_logprobs=True, beta=0.0, top_p=0.9,
                     generation_kwargs={"min_p": 0.02})
    assert make_trainer(tiny_model, tmp_path / "one", sampler_logprobs=True, beta=0.0, top_k=40,
                        min_p=0.02).sampling() == dict(top_k=40, top_p=1.0, min_p=0.02)


@pytest.mark.parametrize("config, named", [
    (dict(repetition_penalty=1.1), "repetition_penalty=1.1"),
    (dict(generation_kwargs={"temperature": 0.7}), "temperature=0.7"),
    (dict(generation_kwargs={"typical_p": 0.9, "max_new_tokens": 8}), "typical_p=0.9"),
    (dict(vllm_structured_outputs_regex="w1 w2"), "vllm_structured_outputs_regex='w1 w2'"),
    ("shipped", "no_repeat_ngram_size=2"),
], ids=["repetition-penalty", "temperature-override", "typical-p", "structured-outputs", "shipped-processor"])
def test_sampler_logprobs_refuse_what_reshapes_the_sampled_distribution(tiny_model, tmp_path, config, named):
    """The scoring takes the temperature and the three filters: a generation that also applies a
    repetition penalty, another temperature or another processor (given, or left to the model's
    generation_config, which generation fills in) sampled from a distribution it does not score,
    so the trainer refuses it by name; lengths, stops and processors at their off values change
    nothing."""
    import shutil

    from transformers import GenerationConfig

    model = tiny_model
    if config == "shipped":
        path, tokenizer = tiny_model
        model = (str(tmp_path / "shipped"), tokenizer)
        shutil.copytree(path, model[0])
        GenerationConfig(do_sample=True, no_repeat_ngram_size=2, pad_token_id=0, eos_token_id=2).save_pretrained(
            model[0])
        config = {}
    with pytest.raises(ValueError, match=f"sampler_logprobs with {re.escape(named)} for the generation"):
        make_trainer(model, tmp_path / "refused", sampler_logprobs=True, beta=0.0, **config)
    make_trainer(tiny_model, tmp_path / "kept", sampler_logprobs=True, beta=0.0, generation_kwargs={
        "max_new_tokens": 8, "do_sample": True, "temperature": 0.9, "presence_penalty": 0.0, "typical_p": 1.0,
        "num_beams": 1, "ignore_eos": False})


@mhpo_kernels.use_backend("torch")  # TRL's calls and semantics; test_truncation.py holds the kernels to the oracle
def test_sampler_logprobs_score_the_truncated_distribution(tiny_model, tmp_path):
    """sampler_logprobs: the old log-probs (TRL's _get_per_token_logps_and_entropies) and the loss
    are those of the softmax truncated by the generation's top_k, top_p and min_p: equal to the
    float64 truncated log-softmax of the model's logits, and the loss and gradients to the
    reference trainer's with the same filters. The reference model's log-probs are its full
    softmax's, so the KL term stays finite; old log-probs of −inf (sampled tokens outside the old
    policy's kept set) leave their tokens out of a finite loss."""
    trainer = make_trainer(tiny_model, tmp_path / "op", sampler_logprobs=True, **SAMPLER)
    ref_trainer = make_trainer(tiny_model, tmp_path / "ref", cls=SamplerReferenceTrainer, sampler_logprobs=True,
                               **SAMPLER)
    inputs = _inputs(tiny_model[1])
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logps, entropy, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, T,
                                                                       batch_size=3, compute_entropy=True)
        logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -T - 1:-1].double()
    want, want_entropy = reference.token_logprobs(logits, inputs["completion_ids"], temperature=0.9,
                                                  return_entropy=True, mask=inputs["completion_mask"].bool(), **SAMPLER)
    assert torch.isinf(want).any() and torch.equal(logps.isinf(), want.isinf())   # some sampled tokens left out
    finite = want.isfinite()
    assert max_rel_err(logps[finite], want[finite]) <= 1e-5 and max_rel_err(entropy, want_entropy) <= 1e-5
    with torch.no_grad():
        ref_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, attention, T)
        ref_logits = trainer.ref_model(input_ids=ids, attention_mask=attention).logits[:, -T - 1:-1].double()
    want_ref = reference.token_logprobs(ref_logits, inputs["completion_ids"], temperature=0.9)
    valid = inputs["completion_mask"].bool()
    assert max_rel_err(ref_logps[valid], want_ref[valid]) <= 1e-5   # the full softmax: finite everywhere
    # the loss on a crafted batch, whose completions the truncation keeps or leaves out, and one
    # token kept now but outside the old policy's kept set
    old = want.float().clone()
    old[finite.nonzero()[0].unbind()] = float("-inf")
    inputs["old_per_token_logps"], inputs["ref_per_token_logps"] = old, ref_logps
    loss = _same_step(trainer, ref_trainer, inputs, accumulation=1)
    assert loss.isfinite() and trainer.beta > 0
    assert 0 < trainer._metrics["train"]["mhpo/outside_support"][-1] < 1
    # The fused linear path (hidden states and the head) takes the same filters: the same step.
    fused = make_trainer(tiny_model, tmp_path / "fl", sampler_logprobs=True, use_fused_linear=True, **SAMPLER)
    _same_step(fused, ref_trainer, inputs, accumulation=1)
    assert fused._metrics["train"]["mhpo/outside_support"][-1] == trainer._metrics["train"]["mhpo/outside_support"][-1]


@pytest.mark.parametrize("mode, clip_min, clip_max", [("token_truncate", None, 3.0), ("token_mask", 0.5, 2.0),
                                                      ("sequence_truncate", 0.2, 1.5), ("sequence_mask", None, 3.0)])
def test_trl_importance_weights_are_trls(tiny_model, tmp_path, mode, clip_min, clip_max):
    """rollout_correction.trl_importance_weights equals the ratio and the sampling/ metrics TRL's
    own GRPOTrainer forms from the same old and engine log-probs (its generation replaced by fixed
    completions and engine log-probs, one of them NaN, as vLLM reports an unscored token)."""
    from mhpo_kernels.rollout_correction import trl_importance_weights

    trainer = _trl_trainer(tiny_model, tmp_path, trl.GRPOTrainer, loss_type="grpo", vllm_importance_sampling_mode=mode,
                           vllm_importance_sampling_clip_min=clip_min, vllm_importance_sampling_clip_max=clip_max)
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    g = torch.Generator().manual_seed(7)
    completions = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 3, 5, 6)]
    engine = [(-torch.rand(len(c), generator=g) * 3 - 0.2).tolist() for c in completions]
    engine[1][2] = None                               # vLLM's unscored token

    def generate(prompts):
        ids = [tiny_model[1](p)["input_ids"] for p in prompts]
        return ids, completions, None, ["x"] * len(prompts), engine, {}, None, None

    trainer._generate = generate
    trainer.model.train()
    with mhpo_kernels.use_backend("torch"):
        out = trainer._generate_and_score_completions([{"prompt": "w1 w2 w3"}, {"prompt": "w4 w5"},
                                                       {"prompt": "w6 w7 w8"}, {"prompt": "w9 w10"}])
    mask = out["completion_mask"].bool()
    rollout = torch.full(mask.shape, 0.0)
    for b, logps in enumerate(engine):
        rollout[b, :len(logps)] = torch.tensor([math.nan if v is None else v for v in logps])
    weights, metrics = trl_importance_weights(out["old_per_token_logps"], rollout, mask, mode, clip_min, clip_max)
    assert torch.allclose(weights, out["importance_sampling_ratio"], rtol=1e-6, atol=0) and weights.ne(1).any()
    for name, value in metrics.items():
        assert value.item() == pytest.approx(trainer._metrics["train"][name][-1], rel=1e-6), name
