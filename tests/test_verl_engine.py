"""verl's own actor (``ActorRolloutRefWorker`` → ``TrainingWorker`` → ``FSDPEngineWithLMHead``) with
``actor_rollout_ref.model.fused_kernel_options.impl_backend: mhpo`` against the same actor without
it: ``compute_log_prob`` and one ``update_actor`` step on a tiny random Llama, fp32, world size 1,
FSDP2 and a plain module, padding removal on and off, the logits path and the fused path.

Tolerances: log-probs within 1e-6 and entropy within 1e-5 absolute (|log p| ≈ log V ≈ 4.6 and
H ≈ 4.6 here, so a few fp32 ulps: both sides reduce V = 96 fp32 terms in different orders); loss,
metrics and the LM head's gradient within the fp32 relative tolerance. The helpers (``_verl_engine``)
hold everything it takes to run verl's actor on CPU.
"""

import contextlib
import functools
import math
import types

import pytest
import torch

pytest.importorskip("verl", reason="the verl extra is not installed (pip install mhpo-kernels[verl])")

import _verl_engine as ve  # noqa: E402
from _cases import FP32_RTOL, max_rel_err  # noqa: E402

import mhpo_kernels  # noqa: E402
import reference  # noqa: E402
import mhpo_kernels.integrations.verl as plugin  # noqa: E402
from mhpo_kernels.integrations import verl_engine  # noqa: E402

V = 96
TAU = 0.7                     # verl's temperature, honoured on both sides
ROWS = 18                     # tokens of the smaller micro-batch (sequences 11 + 8 | 9 + 9)
MHPO_LOSS = {"_target_": "mhpo_kernels.integrations.verl.MHPOPolicyLossConfig", "loss_mode": "mhpo"}
LOGITS_FUNCTIONS = ("logprobs_from_logits", "entropy_from_logits")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verl_engine")
    with ve.verl_on_cpu(tmp):
        ve.tiny_llama(tmp / "model", vocab=V)
        yield tmp / "model"


_runs = {}


def actor(model_path, *, mhpo, plain=False, rmpad=True, fused=False, loss=None, temperature=TAU, update=True,
          sweeps="triton"):
    """One run of verl's actor, cached per configuration (each costs a worker build)."""
    key = (mhpo, plain, rmpad, fused, str(loss), str(temperature), update, sweeps)
    if key not in _runs:
        config = ve.actor_config(model_path, impl_backend="mhpo" if mhpo else "torch", use_remove_padding=rmpad,
                                 use_fused_kernels=fused, entropy_coeff=0.01, policy_loss=loss)
        data = ve.rollout_batch(V, temperature=temperature)
        with mhpo_kernels.use_backend(sweeps):
            _runs[key] = ve.run_actor(config, data, plain=plain, update=update,
                                      count_ops=functools.partial(ve.LogitsCounter, V, ROWS))
    return _runs[key]


def assert_same_log_probs(run, ref):
    assert run.log_probs.shape == ref.log_probs.shape
    assert (run.log_probs - ref.log_probs).abs().max().item() <= 1e-6
    assert (run.entropy - ref.entropy).abs().max().item() <= 1e-5


def assert_same_update(run, ref):
    assert set(run.metrics) == set(ref.metrics)
    for name, value in ref.metrics.items():
        if name.startswith("actor/") or name in ("loss", "grad_norm"):
            assert run.metrics[name] == pytest.approx(value, rel=FP32_RTOL, abs=1e-7), name
    assert max_rel_err(run.lm_head_grad, ref.lm_head_grad) <= FP32_RTOL


LOGITS_CASES = {
    "fsdp2-packed-vanilla": dict(rmpad=True),
    "fsdp2-padded-mhpo": dict(rmpad=False, loss=MHPO_LOSS),
}


@pytest.mark.parametrize("case", list(LOGITS_CASES))
def test_logits_path_is_verl(model_path, case):
    """Padding removal on and off, verl's vanilla PPO loss and the plugin's mhpo loss, both with
    entropy_coeff: the same log-probs, entropy, loss, metrics and LM-head gradient as verl's own
    logits path, none of verl's log-prob or entropy functions called, and the backward in place."""
    kwargs = LOGITS_CASES[case]
    ref, run = actor(model_path, mhpo=False, **kwargs), actor(model_path, mhpo=True, **kwargs)
    assert_same_log_probs(run, ref)
    assert_same_update(run, ref)
    assert all(ref.calls[name] > 0 for name in LOGITS_FUNCTIONS)
    assert all(n == 0 for n in run.calls.values()), run.calls
    assert run.update_ops.passes.get("sweeps_backward_", 0) == 2                 # one per micro-batch
    assert "sweeps_backward" not in run.update_ops.passes


def per_micro_batch(counts):
    return sum(counts.values()) / 2                    # the update step runs two micro-batches


def test_logits_path_counted(model_path):
    """Per micro-batch of the update step on the logits path: the logits-sized buffers alive at
    once, the ops reading or writing one, and the buffers allocated (docs/verl.md's table). With the
    switch: the logits alone, touched by the forward sweep, the backward sweep (which writes the
    gradient over them) and the LM head's two backward GEMMs.

    The switch's side runs the PyTorch sweeps (the same custom ops, the same reads and writes):
    Triton's interpreter keeps the last launch's arguments alive until the next launch, which would
    add the previous micro-batch's logits to the count."""
    for rmpad in (True, False):
        ref = actor(model_path, mhpo=False, rmpad=rmpad)
        run = actor(model_path, mhpo=True, rmpad=rmpad, sweeps="torch")
        assert_same_log_probs(run, ref)
        assert run.update_ops.peak == 1
        assert {k: v / 2 for k, v in run.update_ops.passes.items()} == {
            "sweeps_forward": 1, "sweeps_backward_": 1, "mm": 2}
        assert run.update_ops.allocated == {"mm": 2}                            # the logits
        mhpo = (run.update_ops.peak, per_micro_batch(run.update_ops.passes), per_micro_batch(run.update_ops.allocated))
        assert mhpo == ve.MHPO_COUNTS
        # verl 0.9.1's own; a verl release that changes them changes ve.VERL_COUNTS and docs/verl.md together
        verl = (ref.update_ops.peak, per_micro_batch(ref.update_ops.passes), per_micro_batch(ref.update_ops.allocated))
        assert verl == ve.VERL_COUNTS[rmpad], (ref.update_ops.peak_ops, ref.update_ops.passes, ref.update_ops.allocated)


def test_per_sample_temperature(model_path):
    """verl's per-sample temperature (a (B,) tensor in the batch), padding removal off: one τ per
    token in the fused call (with padding removal verl hands one per packed token, passed as is)."""
    tau = torch.tensor([0.7, 1.0, 1.3, 0.9])
    ref = actor(model_path, mhpo=False, plain=True, rmpad=False, temperature=tau)
    run = actor(model_path, mhpo=True, plain=True, rmpad=False, temperature=tau)
    assert_same_log_probs(run, ref)
    assert_same_update(run, ref)


def test_fused_path_log_probs_fsdp2(model_path):
    """use_fused_kernels under FSDP2, where the LM head is its own sharded unit (verl's torch backend
    fails there: 'mixed torch.Tensor and DTensor'): compute_log_prob gives verl's logits-path
    values, without verl's functions."""
    ref = actor(model_path, mhpo=False)
    run = actor(model_path, mhpo=True, fused=True, update=False)
    assert_same_log_probs(run, ref)
    assert all(n == 0 for n in run.calls.values()), run.calls


def test_fused_path_update_fsdp2(model_path):
    """The update step through the differentiable fused linear op: loss, metrics and the LM head's
    gradient (gathered from its FSDP2 shard) equal verl's logits path."""
    ref = actor(model_path, mhpo=False)
    run = actor(model_path, mhpo=True, fused=True, loss=None)
    assert_same_log_probs(run, ref)
    assert_same_update(run, ref)
    assert all(n == 0 for n in run.calls.values()), run.calls


def test_fused_path_is_verl_torch_backend(model_path):
    """Plain module: verl's own fused torch backend (FusedLinearForPPO) against this one."""
    ref = actor(model_path, mhpo=False, plain=True, fused=True, loss=MHPO_LOSS)
    run = actor(model_path, mhpo=True, plain=True, fused=True, loss=MHPO_LOSS)
    assert ref.calls["FusedLinearForPPO"] > 0
    assert_same_log_probs(run, ref)
    assert_same_update(run, ref)
    assert all(n == 0 for n in run.calls.values()), run.calls


def test_gpu_check_verl_mem_dry_run(tmp_path, monkeypatch):
    """The GPU check's verl-mem step on the CPU (its dry run): every case runs verl's update step,
    and per micro-batch the logits-sized buffers counted at the peak are those the GPU run's
    prediction takes from this file's count (logits path: verl's 7, the switch's 1; hidden-states
    path: none, the micro-batches being longer than verl's 512-row tiles). The cases with padding
    removal off run the same code with rmpad False, and their count is test_logits_path_counted's:
    left out here for time."""
    import json

    from bench import check_report, gpu_check

    cases = [c for c in gpu_check.VERL_MEM_CASES if c[1] or c[2]]
    assert len(cases) == 4 and len(gpu_check.VERL_MEM_CASES) == 6
    monkeypatch.setattr(gpu_check, "VERL_MEM_CASES", cases)
    with mhpo_kernels.use_backend("torch"):          # see test_logits_path_counted
        gpu_check.main(["verl-mem", "--dry-run", "--out", str(tmp_path)])
    check_report.main(["summary", "--out", str(tmp_path)])
    step = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]["verl-mem"]
    assert step["status"] == "ok" and list(step["cases"]) == [c[0] for c in cases]
    for name, fused, rmpad, backend in cases:
        case = step["cases"][name]
        assert "error" not in case, case
        passes = 0 if fused else (ve.MHPO_COUNTS if backend == "mhpo" else ve.VERL_COUNTS[rmpad])[1]
        assert len(case["micro_batches"]) == 2
        for window in case["micro_batches"]:
            assert window["tokens"] > 512
            assert window["counted_buffers"] == window["predicted_buffers"], (name, window)
            assert window["counted_passes"] == passes, (name, window)
            assert window["logits_bytes"] >= window["tokens"] * V * 4
    assert "logits-rmpad-verl 7.00/7" in (tmp_path / "summary.txt").read_text()


# ---- the switch itself, without an engine -------------------------------------------------------

def test_switch_read_from_model_config():
    from verl.workers.config import HFModelConfig

    assert verl_engine.enabled({"fused_kernel_options": {"impl_backend": "mhpo"}})
    assert not verl_engine.enabled({"fused_kernel_options": {"impl_backend": "torch"}})
    assert not verl_engine.enabled({"fused_kernel_options": None})
    config = HFModelConfig.__new__(HFModelConfig)          # the dataclass, without loading a model
    object.__setattr__(config, "fused_kernel_options", {"impl_backend": "mhpo"})
    assert verl_engine.enabled(config)


def test_hook_is_reversible():
    from verl.workers.engine import EngineRegistry

    assert EngineRegistry.new.__func__ is verl_engine._new
    verl_engine.uninstall()
    try:
        assert EngineRegistry.__dict__["new"] is verl_engine._verl_new
    finally:
        verl_engine.install()
    assert EngineRegistry.new.__func__ is verl_engine._new


def test_other_engines_refused():
    from verl.workers.engine.base import BaseEngine

    class OtherEngine(BaseEngine):
        def __init__(self):
            pass

    with pytest.raises(NotImplementedError, match="FSDP engine"):
        verl_engine.attach(OtherEngine())

    class OwnOutputs(verl_engine.FSDPEngineWithLMHead):     # e.g. verl's VeOmni engine
        def __init__(self):
            pass

        def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
            return {}

    with pytest.raises(NotImplementedError, match="OwnOutputs"):
        verl_engine.attach(OwnOutputs())


@pytest.mark.parametrize("flag", ["distillation_use_topk", "calculate_sum_pi_squared"])
def test_whole_logits_consumers_refused(flag):
    from verl.utils import tensordict_utils as tu

    batch = ve.rollout_batch(V)
    tu.assign_non_tensor(batch, **{flag: True})
    with pytest.raises(NotImplementedError, match=flag):
        verl_engine.prepare_model_outputs(None, None, {}, batch, None)


@pytest.mark.parametrize("version", ["0.8.5", "0.10.0", "1.0.0"])
def test_verl_outside_range_refused(version):
    with pytest.raises(ImportError, match=r"verl >= 0.9, < 0.10"):
        plugin.check_verl_version(version)
    plugin.check_verl_version("0.9.1")


def test_vocab_sharded_logits_keep_their_shard(tmp_path):
    """verl's TP engines hand DTensor logits sharded on the vocabulary: the local shard goes to the
    fused call with the mesh dimension's group as tp_group (no gather); other layouts are gathered."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    with ve.verl_on_cpu(tmp_path):
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        logits = torch.randn(5, V)
        local, group = verl_engine._local_logits(distribute_tensor(logits, mesh, [Shard(1)]))
        assert group is mesh.get_group(0) and torch.equal(local, logits)
        full, group = verl_engine._local_logits(distribute_tensor(logits, mesh, [Replicate()]))
        assert group is None and torch.equal(full, logits)
        ids = torch.randint(0, V, (5,))
        sharded = verl_engine._token_logprobs(local, ids, TAU, True, mesh.get_group(0))
        whole = verl_engine._token_logprobs(logits, ids, TAU, True, None)
        for a, b in zip(sharded, whole):
            torch.testing.assert_close(a, b, rtol=FP32_RTOL, atol=1e-6)


@mhpo_kernels.use_backend("torch")  # verl's calls; test_truncation.py holds the kernels to the oracle
def test_rollout_filters_reach_the_fused_call(model_path, monkeypatch):
    """top_k, top_p and min_p under fused_kernel_options: compute_log_prob's log-probs are the
    float64 truncated log-softmax of the logits the engine hands the fused call (−inf for a
    sampled token outside the kept set), at verl's temperature; the hidden-states path
    (use_fused_kernels) gives the same."""
    seen = []

    def recording(logits, labels, **kw):
        out = mhpo_kernels.token_logprobs(logits, labels, **kw)
        seen.append((logits.detach().clone(), labels.clone(), kw, out[0].detach().clone()))
        return out

    monkeypatch.setattr(verl_engine, "token_logprobs", recording)
    filters = dict(top_k=20, top_p=0.8, min_p=0.02)
    config = ve.actor_config(model_path, impl_backend="mhpo", fused_options=filters)
    assert verl_engine.sampling(config.model) == filters
    run = ve.run_actor(config, ve.rollout_batch(V, temperature=TAU), update=False)
    assert seen and torch.isinf(run.log_probs).any()
    for logits, labels, kw, logp in seen:
        assert {k: kw[k] for k in filters} == filters
        want = reference.token_logprobs(logits.double(), labels, temperature=kw["temperature"], ignore_index=-100,
                                        **filters)
        assert torch.equal(logp.isinf(), want.isinf())
        finite = want.isfinite()
        assert max_rel_err(logp[finite], want[finite]) <= FP32_RTOL
    fused = ve.run_actor(ve.actor_config(model_path, impl_backend="mhpo", use_fused_kernels=True, fused_options=filters),
                         ve.rollout_batch(V, temperature=TAU), update=False)
    assert torch.equal(fused.log_probs.isinf(), run.log_probs.isinf())
    finite = run.log_probs.isfinite()
    assert (fused.log_probs[finite] - run.log_probs[finite]).abs().max().item() <= 1e-5


@mhpo_kernels.use_backend("torch")  # the switch's masking, not the kernels (the test above holds them to the oracle)
def test_rollout_filters_leave_out_tokens_outside_the_kept_set(model_path):
    """With the filters on, an update whose old log-probs are compute_log_prob's (−inf at sampled
    tokens outside the kept set, as the current ones are) has a finite loss and gradient, equal to the
    same update with those tokens taken out of the response mask beforehand (verl's token-mean
    would differ by its global token count, which still counts them); verl's reference engine
    (forward_only) scores its full softmax."""
    from verl.workers.utils.padding import no_padding_2_padding

    filters = dict(top_k=20, top_p=0.8, min_p=0.02)
    config = ve.actor_config(model_path, impl_backend="mhpo", fused_options=filters)
    config.actor.loss_agg_mode = "seq-mean-token-sum"   # normalized by sequences, which a left-out token leaves alone
    data = ve.rollout_batch(V, temperature=TAU)
    first = ve.run_actor(config, data, update=False)
    old = no_padding_2_padding(torch.nested.nested_tensor_from_jagged(first.log_probs, data["input_ids"].offsets()),
                               data)
    response = data["response_mask"].bool()                 # (B, R), as verl's trainer hands it
    assert (old.isinf() & response).any() and (old.isfinite() & response).any()
    run = ve.run_actor(config, ve.rollout_batch(V, temperature=TAU, old_log_probs=old), log_prob=False)
    assert run.lm_head_grad.isfinite().all() and run.lm_head_grad.abs().sum() > 0
    losses = ("loss", "actor/pg_loss", "actor/ppo_kl")        # verl's, NaN were −inf − −inf computed
    assert all(math.isfinite(run.metrics[k][0]) for k in losses), run.metrics
    masked = ve.rollout_batch(V, temperature=TAU, old_log_probs=torch.where(old.isinf(), 0.0, old))
    masked["response_mask"] = torch.where(old.isinf(), 0, masked["response_mask"])
    want = ve.run_actor(config, masked, log_prob=False)
    assert torch.equal(run.lm_head_grad, want.lm_head_grad)
    assert all(run.metrics[k] == want.metrics[k] for k in losses)

    reference_engine = verl_engine.FSDPEngineWithLMHead.__new__(verl_engine.FSDPEngineWithLMHead)
    reference_engine.engine_config = types.SimpleNamespace(forward_only=True)
    reference_engine.model_config = config.model
    verl_engine.attach(reference_engine)
    assert reference_engine.mhpo_sampling == {}
    # with LoRA verl's reference is the actor's engine with its adapter off: no filters inside that
    actor = verl_engine.FSDPEngineWithLMHead.__new__(verl_engine.FSDPEngineWithLMHead)
    actor.engine_config = types.SimpleNamespace(forward_only=False)
    actor.model_config = config.model
    adapter = []
    actor.module = types.SimpleNamespace(disable_adapter=lambda: _recording(adapter))
    verl_engine.attach(actor)
    assert actor.mhpo_sampling == filters
    with actor.disable_adapter():
        assert actor.mhpo_sampling == {} and adapter == ["off"]
    assert actor.mhpo_sampling == filters and adapter == ["off", "on"]


@contextlib.contextmanager
def _recording(events):
    events.append("off")
    yield
    events.append("on")
