"""The configurations the benchmark compares: every registered psoft_vision method, named variants of them (the
quantized ones, qpsoft and qoft, on a bitsandbytes NF4 base), PEFT's methods on exactly the same layers (peft-qlora
on the same NF4 base), and two references (the frozen floor and full fine-tuning).

Each is ``apply(model, spec) -> (model, merge or None)``, where ``spec`` is the workload's (see workloads.py).
"""

import psoft_vision as pv


def ours(method_name: str, **overrides):
    """A registered method with the workload's size for its ``size_field`` and ``overrides`` on top."""

    def apply(model, spec):
        method = pv.get_method(method_name)
        sizes = {k: v for k, v in spec["sizes"].items() if k == method.size_field}
        train_modules = (spec["head"],) if spec["head"] else ()
        config = method.config(targets=spec["targets"], train_modules=train_modules, **sizes, **overrides)
        pv.inject(model, config)
        return model, pv.merge

    return apply


def _peft(make_config):
    def apply(model, spec):
        import peft

        from psoft_vision.targets import select

        config = make_config(peft, spec)
        config.target_modules = select(model, spec["targets"])  # exactly the layers ours adapts
        config.modules_to_save = [spec["head"]] if spec["head"] else None
        model = peft.get_peft_model(model, config)
        return model, lambda m: m.merge_adapter()

    return apply


def _frozen(model, spec):
    model.requires_grad_(False)
    return model, None


def _full(model, spec):
    return model, None


def on_quantized_base(apply, scheme: str = "nf4"):
    """``apply`` after the model's linears are quantized (QLoRA's NF4 by default); no merge: a quantized base is
    not merged into."""

    def quantized(model, spec):
        model, _ = apply(pv.quantize_base(model, scheme), spec)
        return model, None

    return quantized


def through_the_weight(apply):
    """``apply``, with every adapted layer run on the weight path (the adapted weight formed, then the layer's own
    forward), which parents that read ``child.weight`` (EVA, Swin V2) use: its cost against the activation path."""

    def forced(model, spec):
        import dataclasses

        model, merge = apply(model, spec)
        for _, layer in pv.adapted_layers(model):
            layer.kind = dataclasses.replace(layer.kind, weight_path=True)
        return model, merge

    return forced


def compiled(apply):
    """``apply``, then ``torch.compile``: on a GPU, fusing the many small kernels of the adapters' transforms."""

    def compile_after(model, spec):
        import torch

        model, merge = apply(model, spec)
        return torch.compile(model), merge

    return compile_after


#: Named settings of our methods worth measuring on their own.
VARIANTS = {"psoft-neumann": ours("psoft", neumann_terms=4), "psoft-weight-path": through_the_weight(ours("psoft")),
            "qpsoft": on_quantized_base(ours("psoft")), "qoft": on_quantized_base(ours("oft")),
            "psoft-compiled": compiled(ours("psoft"))}
PEFT = {
    "peft-lora": _peft(lambda peft, spec: peft.LoraConfig(r=spec["lora_rank"], lora_alpha=2 * spec["lora_rank"])),
    "peft-oft": _peft(lambda peft, spec: peft.OFTConfig(r=0, oft_block_size=spec["sizes"]["block_size"])),
    "peft-boft": _peft(lambda peft, spec: peft.BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2)),
    "peft-psoft": _peft(lambda peft, spec: peft.PsoftConfig(r=spec["sizes"]["rank"])),
}
PEFT["peft-qlora"] = on_quantized_base(PEFT["peft-lora"])  # QLoRA: LoRA on the same NF4 base
PEFT["peft-lora-compiled"] = compiled(PEFT["peft-lora"])


def methods() -> dict:
    """Every configuration by name, ours first: the registered methods are read when this is called."""
    return {"floor": _frozen, "full": _full, **{name: ours(name) for name in pv.registered_methods()},
            **VARIANTS, **PEFT}
