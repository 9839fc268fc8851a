"""The LM head as the fused linear ops take it, for the trainer integrations."""

from torch.distributed.tensor import DTensor, Partial


def head_logit_scale(text_config):
    """The multiplier a model applies to its LM head's output, as the model's own forward applies
    it (and as TRL 1.16 reads it for the old and reference log-probs): ``logit_scale``, else
    ``output_multiplier``, else ``lm_head_multiplier``, else ``logits_scaling`` (a divisor, except
    for HyperCLOVA X, which multiplies); 1 when none is set."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    return 1.0


def gathered_head(head):
    """The LM head's (weight, bias) as plain tensors for the fused loss.

    Under FSDP2 with the head as its own unit, they are sharded DTensors outside the head's own
    forward (which the fused path never calls): gathered with ``full_tensor``, whose default
    backward keeps each rank's slice of its *own* gradient, dropping the other ranks' share.
    ``grad_placements=Partial("avg")`` makes the backward a reduce-scatter that averages over the
    data-parallel ranks, as FSDP2 averages every other gradient.
    """
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor(grad_placements=[Partial("avg")] * weight.device_mesh.ndim)
    if isinstance(bias, DTensor):
        bias = bias.full_tensor(grad_placements=[Partial("avg")] * bias.device_mesh.ndim)
    return weight, bias
