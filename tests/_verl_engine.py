"""verl's engine actor, in this process, on CPU (and on CUDA, for the GPU check's verl-mem step).

verl 0.9 runs its actor as ``ActorRolloutRefWorker`` → ``TrainingWorker`` → ``FSDPEngineWithLMHead``
on CUDA or NPU inside Ray. Everything below is what it takes to run that same code here instead;
none of it belongs in the package:

- the packages in ``UNUSED`` (imported at module level by verl, never used by the actor: uvicorn,
  fastapi, ray, datasets) are stubbed when they are not installed;
- ``verl_on_cpu``, undone on exit: a CPU platform for verl's platform layer (device "cpu",
  communication backend gloo), the FSDP engine registered for device "cpu" (verl registers it for
  cuda and npu only), verl's state_dict patch for TRL's value-head model skipped (TRL 1.x moved the
  class; the actor has no value head), a one-process gloo group on a ``FileStore`` (verl's own
  initialisation would read a TCP port) and the environment verl's ``Worker`` reads;
  ``verl_in_process(tmp_path, "cuda")`` is the same on verl's own CUDA platform and engine;
- ``run_actor(plain=True)``: the model left unwrapped instead of FSDP-wrapped (and moved to verl's
  device, which FSDP would do);
- a tiny random Llama written to a temporary folder (no hub), attention "sdpa", fp32 weights and
  fp32 mixed precision, no tokenizer.
"""

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


# Imported at module level by verl, never used by the actor built here in-process: the rollout
# servers' uvicorn and fastapi, ray (verl's protocol and single controller decorate their actor
# classes with ``ray.remote``; nothing here starts it) and datasets (verl's dataset module).
UNUSED = ("uvicorn", "fastapi", "ray", "datasets")


class _UnusedType(type):
    """An empty class whose attributes are empty classes (``ray.actor.ActorHandle``): an annotation
    or a base class works; an instance has nothing, so a call made at run time fails loudly."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _UnusedType(name, (), {})


class _UnusedModule(types.ModuleType):
    """A package that is not installed, for verl's module-level imports: any name is an
    ``_UnusedType``; ``ray.is_initialized()`` is False and ``ray.remote`` leaves what it decorates
    as it is."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _UnusedType(name, (), {})
        setattr(self, name, value)
        return value

    @staticmethod
    def is_initialized():
        return False

    @staticmethod
    def remote(*args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]
        return lambda cls: cls


class _UnusedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``_UnusedModule`` for the packages in ``names`` and their submodules."""

    def __init__(self, names):
        self.names = names

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _UnusedModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


MISSING = tuple(name for name in UNUSED if importlib.util.find_spec(name) is None)
if MISSING:
    sys.meta_path.append(_UnusedFinder(MISSING))

import verl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from verl.models.transformers import monkey_patch  # noqa: E402
from verl.plugin.platform import platform_manager  # noqa: E402
from verl.plugin.platform.platform_base import PlatformBase  # noqa: E402
from verl.workers.engine import EngineRegistry  # noqa: E402
from verl.workers.engine.fsdp import transformer_impl  # noqa: E402


def _cpu_device_module():
    """torch.cpu plus the allocator statistics verl logs (0 here: host memory is not tracked)."""
    module = types.ModuleType("verl_cpu_device")
    module.__dict__.update({k: v for k, v in vars(torch.cpu).items() if not k.startswith("__")})
    for name in ("memory_reserved", "memory_allocated", "max_memory_reserved", "max_memory_allocated"):
        setattr(module, name, lambda *args, **kwargs: 0)
    module.mem_get_info = lambda *args, **kwargs: (0, 0)
    module.empty_cache = lambda: None
    module.get_rng_state = torch.get_rng_state
    module.set_rng_state = torch.set_rng_state
    module.get_device_name = lambda *args: "cpu"
    return module


class PlatformCPU(PlatformBase):
    """verl's platform interface for host memory and gloo."""

    device_name = "cpu"
    vendor_name = "cpu"
    device_module = _cpu_device_module()

    def is_available(self):
        return True

    def current_device(self):
        return torch.device("cpu")  # verl moves tensors to the current device id

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

    def get_device_capability(self, device_index=0):
        return (None, None)

    def communication_backend_name(self):
        return "gloo"

    def visible_devices_envvar(self):
        return "CPU_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg):
        yield

    def profiler_start(self):
        pass

    def profiler_stop(self):
        pass

    def ray_resource_name(self):
        return "CPU"

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self):
        return False

    def cudart(self):
        return None


@contextlib.contextmanager
def _restored(obj, name):
    """Whatever is done to ``obj.name`` inside is undone on exit."""
    saved = vars(obj)[name]
    try:
        yield
    finally:
        setattr(obj, name, saved)


def verl_on_cpu(tmp_path):
    """verl's actor able to run in this process on CPU, for the duration; everything undone on exit."""
    return verl_in_process(tmp_path, "cpu")


@contextlib.contextmanager
def verl_in_process(tmp_path, device):
    """verl's actor able to run in this process, for the duration; everything undone on exit.

    ``device`` "cpu": the CPU platform and verl's FSDP engine registered for it. "cuda": verl's own
    CUDA platform and engine registration. Either way a one-process gloo group (on CUDA verl's only
    collectives at world size 1 are an all_reduce, which gloo runs on CUDA tensors, a barrier and
    object gathers; no NCCL), and TRL's value-head patch skipped."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           # verl's Worker records an address; the group below is the one it uses (no port is opened).
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    saved_env = {k: os.environ.get(k) for k in env}
    engines = EngineRegistry._engines["language_model"]
    with contextlib.ExitStack() as stack:
        for obj, name in ((platform_manager, "_current_platform"), (transformer_impl, "device_name"),
                          (monkey_patch, "is_trl_available")):
            stack.enter_context(_restored(obj, name))
        if device == "cpu":
            platform_manager.set_platform(PlatformCPU())
            transformer_impl.device_name = "cpu"
        # verl's patch of TRL's value-head class imports a name TRL 1.x no longer has (no value head here)
        monkey_patch.is_trl_available = lambda: False
        added = [b for b in ("fsdp", "fsdp2") if device not in engines[b]]
        for backend in added:
            engines[backend][device] = transformer_impl.FSDPEngineWithLMHead
        os.environ.update(env)
        owns_group = not torch.distributed.is_initialized()
        if owns_group:
            store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
            torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            if owns_group:
                torch.distributed.destroy_process_group()
            for backend in added:
                del engines[backend][device]
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def tiny_llama(path, vocab=96, hidden=16, layers=1, seed=0, max_positions=64):
    """A random LlamaConfig model, saved where verl's HFModelConfig reads it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return config


def actor_config(model_path, *, strategy="fsdp2", use_remove_padding=True, use_fused_kernels=False,
                 impl_backend="torch", batch_size=4, micro_batch_size=2, entropy_coeff=0.0,
                 policy_loss=None, fused_options=None):
    """verl's generated PPO trainer config, actor_rollout_ref part, set for this process."""
    root = os.path.dirname(verl.__file__)
    full = OmegaConf.load(os.path.join(root, "trainer", "config", "_generated_ppo_trainer.yaml"))
    cfg = OmegaConf.create({"actor_rollout_ref": full.actor_rollout_ref, "trainer": {"n_gpus_per_node": 1},
                            "data": {"max_prompt_length": 16, "max_response_length": 16}})
    over = {
        "model": {"path": str(model_path), "load_tokenizer": False, "use_remove_padding": use_remove_padding,
                  "use_fused_kernels": use_fused_kernels,
                  "fused_kernel_options": {"impl_backend": impl_backend, **(fused_options or {})},
                  "enable_gradient_checkpointing": False,
                  "override_config": {"attn_implementation": "sdpa"}},
        "actor": {"strategy": strategy, "ppo_mini_batch_size": batch_size,
                  "ppo_micro_batch_size_per_gpu": micro_batch_size, "use_torch_compile": False,
                  "entropy_coeff": entropy_coeff, "calculate_entropy": True,
                  "fsdp_config": {"strategy": strategy, "use_torch_compile": False, "dtype": "float32",
                                  "model_dtype": "fp32",
                                  "mixed_precision": {"param_dtype": "fp32", "reduce_dtype": "fp32",
                                                      "buffer_dtype": "fp32"}},
                  "optim": {"lr": 1e-3, "weight_decay": 0.0}},
        "rollout": {"name": "hf", "log_prob_micro_batch_size_per_gpu": micro_batch_size,
                    "tensor_model_parallel_size": 1},
        "ref": {"fsdp_config": {"strategy": strategy}},
    }
    if policy_loss is not None:
        over["actor"]["policy_loss"] = policy_loss
    cfg.actor_rollout_ref = OmegaConf.merge(cfg.actor_rollout_ref, over)
    return cfg.actor_rollout_ref


def _plain_module(self, module):
    """FSDPEngine._build_fsdp_module for a model left unwrapped, in fp32, on verl's device."""
    self._autocast_dtype = torch.float32
    self.scaler = None
    return module.to(transformer_impl.device_name)


# Ops that only re-describe a tensor or read its metadata: no pass over its elements.
_VIEWS = {"view", "_unsafe_view", "reshape", "squeeze", "unsqueeze", "expand", "slice", "select", "t",
          "transpose", "permute", "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind",
          "narrow", "_reshape_alias", "lift_fresh", "_nested_view_from_jagged", "values", "sym_size",
          "sym_stride", "sym_numel", "layout", "empty_like"}


class LogitsCounter(TorchDispatchMode):
    """Counts, over what runs inside it, the work on logits-sized tensors (a dimension V among the
    last two, transposed views included, and at least ``rows`` · V elements, ``rows`` being the
    micro-batch's tokens, more than the LM head's H): ``passes``, the ops that read or write one
    (views and metadata excluded), by op name; ``peak``, the most logits-sized buffers alive at
    once (a buffer is a storage of that size, alive while anything holds it, autograd's saved
    tensors included); ``allocated``, the logits-sized buffers created, by op name."""

    def __init__(self, vocab, rows):
        super().__init__()
        self.vocab, self.rows = vocab, rows
        self.passes = {}
        self.allocated = {}
        self.peak = 0
        self.peak_ops = []          # the ops that created the buffers alive at the peak
        self._alive = {}

    def _logits_sized(self, x):
        return (isinstance(x, torch.Tensor) and x.dim() >= 2 and self.vocab in x.shape[-2:]
                and x.numel() >= self.rows * self.vocab)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        inputs = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if self._logits_sized(x)]
        if inputs and name not in _VIEWS:
            self.passes[name] = self.passes.get(name, 0) + 1
        out = func(*args, **kwargs)
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.is_nested:
                x = x.values()
            # a buffer is logits-sized by its storage (an expanded row is not)
            if self._logits_sized(x) and x.untyped_storage().nbytes() >= self.rows * self.vocab * x.element_size():
                storage = x.untyped_storage()
                key = storage._cdata
                if key not in self._alive or self._alive[key][0].expired():
                    self._alive[key] = (StorageWeakRef(storage), name)
                    self.allocated[name] = self.allocated.get(name, 0) + 1
        self._alive = {k: v for k, v in self._alive.items() if not v[0].expired()}
        if len(self._alive) > self.peak:
            self.peak = len(self._alive)
            self.peak_ops = sorted(v[1] for v in self._alive.values())
        return out


# verl's functions that compute log-probs or entropy from logits or hidden states: counted per run.
COUNTED = ("logprobs_from_logits", "entropy_from_logits", "FusedLinearForPPO")

# Per micro-batch of the update step on the logits path (verl 0.9.1, fp32, the entropy on):
# (logits-sized buffers alive at peak, ops reading or writing one, logits-sized buffers allocated),
# verl's own path by use_remove_padding, and impl_backend: mhpo's either way. docs/verl.md's table:
# tests/test_verl_engine.py counts them, the GPU check's verl-mem step measures the first in bytes.
VERL_COUNTS = {True: (7, 20, 18), False: (7, 22, 21)}
MHPO_COUNTS = (1, 4, 1)


@dataclass
class ActorRun:
    log_probs: torch.Tensor        # compute_log_prob, packed valid tokens
    entropy: torch.Tensor
    metrics: dict                  # update_actor's
    lm_head_grad: torch.Tensor     # after the one update step
    calls: dict                    # COUNTED name -> calls during the run
    update_ops: object             # what ``count_ops`` returned for the update step, if given


def _counting(calls, name, fn):
    def counted(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return counted


def run_actor(config, data, *, plain=False, count_ops=None, update=True, log_prob=True, probe=None):
    """Build verl's ActorRolloutRefWorker (role actor) from ``config``, run its compute_log_prob
    (``log_prob``) and (``update``) one update_actor step on ``data``, and return what they gave.

    ``plain``: the model is not wrapped by FSDP. ``count_ops``: a context manager factory (e.g.
    ``LogitsCounter``) entered around the update step. ``probe``: during the update step,
    ``probe.micro_batch(engine, micro_batch)`` is called as each micro-batch's forward starts and
    ``probe.done(engine)`` after the last one's backward, before the optimizer step. Everything
    patched here is restored on return, verl's fused-kernel backends' replacement of the model
    class's forward included."""
    from transformers import LlamaForCausalLM
    from verl.utils import tensordict_utils as tu
    from verl.utils import torch_functional as verl_F
    from verl.utils.experimental import torch_functional as verl_fused
    from verl.workers.engine_workers import ActorRolloutRefWorker

    calls = dict.fromkeys(COUNTED, 0)
    with contextlib.ExitStack() as stack:
        for obj, name in ((transformer_impl.FSDPEngine, "_build_fsdp_module"), (LlamaForCausalLM, "forward"),
                          (transformer_impl, "logprobs_from_logits"), (verl_F, "entropy_from_logits"),
                          (verl_fused.FusedLinearForPPO, "forward")):
            stack.enter_context(_restored(obj, name))
        transformer_impl.logprobs_from_logits = _counting(calls, "logprobs_from_logits",
                                                          transformer_impl.logprobs_from_logits)
        verl_F.entropy_from_logits = _counting(calls, "entropy_from_logits", verl_F.entropy_from_logits)
        verl_fused.FusedLinearForPPO.forward = _counting(calls, "FusedLinearForPPO",
                                                         verl_fused.FusedLinearForPPO.forward)
        if plain:
            transformer_impl.FSDPEngine._build_fsdp_module = _plain_module
        worker = ActorRolloutRefWorker(config=config, role="actor")
        worker.init_model()
        engine = worker.actor.engine
        grads = []

        def optimizer_step():  # the LM head's gradient before verl clips and applies it
            if probe is not None:
                probe.done(engine)
            grad = engine.module.get_output_embeddings().weight.grad
            grads.append((grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone())
            return type(engine).optimizer_step(engine)

        engine.optimizer_step = optimizer_step

        log_probs = entropy = None
        if log_prob:
            batch = data.clone()
            tu.assign_non_tensor(batch, calculate_entropy=True, compute_loss=False)
            out = worker.compute_log_prob(batch)
            log_probs, entropy = out["log_probs"].values(), out["entropy"].values()

        if not update:
            return ActorRun(log_probs, entropy, None, None, dict(calls), None)
        if probe is not None:
            forward_step = engine.forward_step

            def probed_forward_step(micro_batch, *args, **kwargs):
                probe.micro_batch(engine, micro_batch)
                return forward_step(micro_batch, *args, **kwargs)

            engine.forward_step = probed_forward_step
        batch = data.clone()
        size = batch.batch_size[0]
        tu.assign_non_tensor(batch, calculate_entropy=True, global_batch_size=size, mini_batch_size=size, epochs=1,
                             seed=0, dataloader_kwargs={"shuffle": False}, compute_loss=True)
        counter = count_ops() if count_ops is not None else contextlib.nullcontext()
        with counter:
            metrics = tu.get(worker.update_actor(batch), "metrics")
        (grad,) = grads
        return ActorRun(log_probs, entropy, metrics, grad, dict(calls), counter if count_ops is not None else None)


def rollout_batch(vocab, batch_size=4, prompt_len=5, response_len=6, seed=0, temperature=1.0, old_log_probs=None):
    """A left-padded prompt + right-padded response batch as verl's trainer hands it to the actor,
    already in verl's no-padding layout (nested input_ids and position_ids). Sequence lengths 11,
    8, 9, 9. ``temperature``: a float, or a (batch_size,) tensor (verl's per-sample τ).
    ``old_log_probs``: (batch_size, response_len), else random."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab, (batch_size, prompt_len), generator=g)
    responses = torch.randint(3, vocab, (batch_size, response_len), generator=g)
    prompt_mask = torch.ones(batch_size, prompt_len, dtype=torch.long)
    response_mask = torch.ones(batch_size, response_len, dtype=torch.long)
    for b in range(batch_size):                      # ragged prompts (left) and responses (right)
        prompt_mask[b, : b % 3] = 0
        response_mask[b, response_len - (b % 2) * 2:] = 0
    prompts = prompts * prompt_mask
    responses = responses * response_mask
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    data = TensorDict({
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention_mask, "position_ids": position_ids, "response_mask": response_mask,
        "old_log_probs": -3.0 - torch.rand(batch_size, response_len, generator=g) if old_log_probs is None
                         else old_log_probs,
        "advantages": torch.randn(batch_size, response_len, generator=g),
    }, batch_size=[batch_size])
    data = left_right_2_no_padding(data)
    if isinstance(temperature, torch.Tensor):
        data["temperature"] = temperature            # one τ per sample
    else:
        tu.assign_non_tensor(data, temperature=temperature)
    return data
