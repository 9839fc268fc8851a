"""verl's engine actor, in this process, on CPU.

verl 0.9 runs its actor as ``ActorRolloutRefWorker`` → ``TrainingWorker`` → ``FSDPEngineWithLMHead``
on CUDA or NPU inside Ray. Everything below is what it takes to run that same code here instead;
none of it belongs in the package:

- ``uvicorn`` and ``fastapi`` (imported by verl's rollout servers, never called by the actor) are
  stubbed when they are not installed;
- ``verl_on_cpu``, undone on exit: a CPU platform for verl's platform layer (device "cpu",
  communication backend gloo), the FSDP engine registered for device "cpu" (verl registers it for
  cuda and npu only), verl's state_dict patch for TRL's value-head model skipped (TRL 1.x moved the
  class; the actor has no value head), a one-process gloo group on a ``FileStore`` (verl's own
  initialisation would read a TCP port) and the environment verl's ``Worker`` reads;
- ``run_actor(plain=True)``: the model left unwrapped instead of FSDP-wrapped;
- a tiny random Llama written to a temporary folder (no hub), attention "sdpa", fp32 weights and
  fp32 mixed precision, no tokenizer.
"""

import contextlib
import os
import sys
import types
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


def _stub(name):
    """uvicorn/fastapi: imported at module level by verl's rollout servers, never called by the actor."""
    stub = types.ModuleType(name)
    for attr in ("FastAPI", "Request", "Server", "Config"):
        setattr(stub, attr, type(attr, (), {}))
    return stub


for _name in ("uvicorn", "fastapi"):
    try:
        __import__(_name)
    except ImportError:
        sys.modules[_name] = _stub(_name)

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


@contextlib.contextmanager
def verl_on_cpu(tmp_path):
    """verl's actor able to run in this process on CPU, for the duration; everything undone on exit."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           # verl's Worker records an address; the group below is the one it uses (no port is opened).
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    saved_env = {k: os.environ.get(k) for k in env}
    engines = EngineRegistry._engines["language_model"]
    with contextlib.ExitStack() as stack:
        for obj, name in ((platform_manager, "_current_platform"), (transformer_impl, "device_name"),
                          (monkey_patch, "is_trl_available")):
            stack.enter_context(_restored(obj, name))
        platform_manager.set_platform(PlatformCPU())
        transformer_impl.device_name = "cpu"
        # verl's patch of TRL's value-head class imports a name TRL 1.x no longer has (no value head here)
        monkey_patch.is_trl_available = lambda: False
        added = [b for b in ("fsdp", "fsdp2") if "cpu" not in engines[b]]
        for backend in added:
            engines[backend]["cpu"] = transformer_impl.FSDPEngineWithLMHead
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
                del engines[backend]["cpu"]
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def tiny_llama(path, vocab=96, hidden=16, layers=1, seed=0):
    """A random LlamaConfig model, saved where verl's HFModelConfig reads it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    return config


def actor_config(model_path, *, strategy="fsdp2", use_remove_padding=True, use_fused_kernels=False,
                 impl_backend="torch", batch_size=4, micro_batch_size=2, entropy_coeff=0.0,
                 policy_loss=None):
    """verl's generated PPO trainer config, actor_rollout_ref part, set for this process."""
    root = os.path.dirname(verl.__file__)
    full = OmegaConf.load(os.path.join(root, "trainer", "config", "_generated_ppo_trainer.yaml"))
    cfg = OmegaConf.create({"actor_rollout_ref": full.actor_rollout_ref, "trainer": {"n_gpus_per_node": 1},
                            "data": {"max_prompt_length": 16, "max_response_length": 16}})
    over = {
        "model": {"path": str(model_path), "load_tokenizer": False, "use_remove_padding": use_remove_padding,
                  "use_fused_kernels": use_fused_kernels, "fused_kernel_options": {"impl_backend": impl_backend},
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
    """FSDPEngine._build_fsdp_module for a model left unwrapped, in fp32."""
    self._autocast_dtype = torch.float32
    self.scaler = None
    return module


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


def run_actor(config, data, *, plain=False, count_ops=None, update=True):
    """Build verl's ActorRolloutRefWorker (role actor) from ``config``, run its compute_log_prob and
    (``update``) one update_actor step on ``data``, and return what they gave.

    ``plain``: the model is not wrapped by FSDP. ``count_ops``: a context manager factory (e.g.
    ``LogitsCounter``) entered around the update step. Everything patched here is restored on
    return, verl's fused-kernel backends' replacement of the model class's forward included."""
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
            grad = engine.module.get_output_embeddings().weight.grad
            grads.append((grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone())
            return type(engine).optimizer_step(engine)

        engine.optimizer_step = optimizer_step

        batch = data.clone()
        tu.assign_non_tensor(batch, calculate_entropy=True, compute_loss=False)
        out = worker.compute_log_prob(batch)

        if not update:
            return ActorRun(out["log_probs"].values(), out["entropy"].values(), None, None, dict(calls), None)
        batch = data.clone()
        size = batch.batch_size[0]
        tu.assign_non_tensor(batch, calculate_entropy=True, global_batch_size=size, mini_batch_size=size, epochs=1,
                             seed=0, dataloader_kwargs={"shuffle": False}, compute_loss=True)
        counter = count_ops() if count_ops is not None else contextlib.nullcontext()
        with counter:
            metrics = tu.get(worker.update_actor(batch), "metrics")
        (grad,) = grads
        return ActorRun(out["log_probs"].values(), out["entropy"].values(), metrics, grad, dict(calls),
                        counter if count_ops is not None else None)


def rollout_batch(vocab, batch_size=4, prompt_len=5, response_len=6, seed=0, temperature=1.0):
    """A left-padded prompt + right-padded response batch as verl's trainer hands it to the actor,
    already in verl's no-padding layout (nested input_ids and position_ids). Sequence lengths 11,
    8, 9, 9. ``temperature``: a float, or a (batch_size,) tensor (verl's per-sample τ)."""
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
        "old_log_probs": -3.0 - torch.rand(batch_size, response_len, generator=g),
        "advantages": torch.randn(batch_size, response_len, generator=g),
    }, batch_size=[batch_size])
    data = left_right_2_no_padding(data)
    if isinstance(temperature, torch.Tensor):
        data["temperature"] = temperature            # one τ per sample
    else:
        tu.assign_non_tensor(data, temperature=temperature)
    return data
