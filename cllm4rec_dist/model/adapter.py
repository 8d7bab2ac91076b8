"""The backbone's settings every recommender shares (precision, adapter) and LoRA adapters on a frozen backbone.

``BackboneSettings`` is the backbone part of the training config's ``model`` section: a recommender's section
inherits it (so the keys stay ``model.precision``, ``model.adapter``, ``model.lora_*``) and any recommender reads it
through this type. ``apply_adapter`` puts LoRA layers (the ``peft`` library, injected in place, so the backbone stays
the transformers model its callers know: ``backbone.base_model`` is still the decoder) on a loaded, frozen backbone
in any precision (fp32, bf16, int8, nf4: peft's bitsandbytes LoRA layers, QLoRA-style): the adapter weights are the
only backbone parameters with ``requires_grad``, always fp32 (the precision of every trainable tensor here).
``save_peft_adapter`` writes them in PEFT's own format (``adapter_config.json`` + ``adapter_model.safetensors``),
which ``peft.PeftModel.from_pretrained(base, folder)`` loads.

peft's ``prepare_model_for_kbit_training`` is NOT used: it turns on gradient checkpointing, makes the input
embeddings' output require gradients and casts every non-quantised weight to fp32 (bf16 norms and embeddings of a
bf16 backbone included); ``load_backbone`` already keeps the non-quantised weights of an int8/nf4 backbone in their
dtype, ``freeze`` keeps them frozen, and the trainable token tables make the inputs carry gradients anyway.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

from cllm4rec_dist.model.backbone_settings import ADAPTERS, BACKBONE_FIELDS, BackboneSettings  # noqa: F401 (re-exported)
from cllm4rec_dist.settings import ConfigError

ADAPTER_NAME = "default"
"""peft's adapter name (the one ``PeftModel.from_pretrained`` gives the adapter it loads)."""
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
"""What ``PeftModel.save_pretrained`` puts before the backbone's own parameter names (its state dict's prefix)."""




def _leaf_names(backbone: nn.Module) -> set[str]:
    """The last name parts of the backbone's leaf modules (what a LoRA target name matches)."""
    return {name.rsplit(".", 1)[-1] for name, module in backbone.named_modules()
            if name and not list(module.children())}


def lora_targets(settings: BackboneSettings, backbone: nn.Module) -> list[str]:
    """The module names to adapt: ``settings.lora_targets``, else peft's default for the backbone's architecture;
    ConfigError naming every missing one and the names the backbone has."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(backbone, "config", None), "model_type", None)
    names = settings.target_names() or list(DEFAULTS.get(model_type, []))
    available = _leaf_names(backbone)
    if not names:
        raise ConfigError(f"model.lora_targets: peft has no default target modules for a {model_type!r} backbone; "
                          f"name them (comma-separated), from: {', '.join(sorted(available))}")
    missing = [name for name in names if name not in available]
    if missing:
        raise ConfigError(f"model.lora_targets={','.join(names)}: the backbone ({model_type}) has no module named "
                          f"{', '.join(missing)}; its modules are: {', '.join(sorted(available))}")
    # The recommenders read the input embeddings and the LM head's weight directly (the token tables sit beside the
    # first; fused softmaxes use the second), so an adapter there would be skipped without a word: refused.
    read_directly = {name.rsplit(".", 1)[-1] for name, module in backbone.named_modules()
                     if module is backbone.get_input_embeddings() or module is backbone.get_output_embeddings()}
    if read_directly & set(names):
        raise ConfigError(f"model.lora_targets: {', '.join(sorted(read_directly & set(names)))} is the backbone's "
                          "input embedding or LM head, whose weights the recommenders read directly; adapt the "
                          "decoder layers' modules instead")
    return names


def check_adapter_targets(settings: BackboneSettings, backbone_dir: str, gguf_file: str | None = None) -> None:
    """Check the adapter's target modules before anything is loaded (the driver, before any worker starts): the
    backbone is built from its config on the meta device (no weights read, no memory)."""
    if settings.uses_adapter:
        lora_targets(settings, _skeleton(backbone_dir, gguf_file))


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2's fused projections are transformers Conv1D (weight stored fan_in x fan_out); peft must be told
    return type(module).__name__ == "Conv1D"


def lora_config(settings: BackboneSettings, backbone: nn.Module):
    """The ``peft.LoraConfig`` of these settings for this backbone (the same config the export writes)."""
    from peft import LoraConfig

    names = lora_targets(settings, backbone)
    adapted = [m for n, m in backbone.named_modules() if n.rsplit(".", 1)[-1] in names]
    return LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=names, fan_in_fan_out=any(_is_conv1d(m) for m in adapted), bias="none",
                      task_type="CAUSAL_LM")


def apply_adapter(backbone: nn.Module, settings: BackboneSettings) -> list[nn.Parameter]:
    """Inject the adapter ``settings`` asks for into a FROZEN ``backbone`` in place (none: nothing) and return its
    parameters: fp32, trainable, initialised as peft does (B = 0: the adapted backbone starts equal to the frozen
    one). Every other backbone weight keeps ``requires_grad=False`` and its dtype."""
    if not settings.uses_adapter:
        return []
    if any(p.requires_grad for p in backbone.parameters()):
        raise ValueError("apply_adapter needs a frozen backbone (model/backbone.py freeze); an adapter on a backbone "
                         "that is trained whole (ablation ftall/scratch) is refused by the config")
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora_config(settings, backbone), backbone, adapter_name=ADAPTER_NAME)
    params = adapter_parameters(backbone)
    for param in params:
        # peft makes them the base layer's dtype (bf16 on a bf16 backbone); every trainable tensor here is fp32,
        # and peft's LoRA forward casts the layer input to the adapter's dtype and the sum back to the layer's
        param.data = param.data.float()
        param.requires_grad_(True)
    frozen = [n for n, p in backbone.named_parameters() if p.requires_grad and not is_adapter_name(n)]
    if frozen:
        raise RuntimeError(f"peft unfroze backbone weights: {', '.join(frozen[:5])}")
    return params


def is_adapter_name(name: str) -> bool:
    """Whether a parameter name (of the backbone, or of a model holding it) is one of the injected LoRA tensors."""
    return ".lora_" in name


def adapter_parameters(backbone: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters injected into ``backbone`` (none without an adapter), in module order."""
    return [p for n, p in backbone.named_parameters() if is_adapter_name(n)]


def has_adapter(backbone: nn.Module) -> bool:
    return bool(adapter_parameters(backbone))


def set_adapter_training(backbone: nn.Module, mode: bool) -> None:
    """Switch the adapters' dropout to ``mode`` inside a backbone kept in eval mode (frozen: its own dropout off)."""
    if "peft" not in sys.modules:  # no LoRA layer can exist: importing peft only to find none costs ~1.5 s a process
        return
    from peft.tuners.lora import LoraLayer

    for module in backbone.modules():
        if isinstance(module, LoraLayer):
            module.lora_dropout.train(mode)


def _skeleton(backbone_dir: str, gguf_file: str | None = None) -> nn.Module:
    """The backbone's architecture from its config on the meta device: module names and types, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = dict(gguf_file=gguf_file) if gguf_file else {}
    config = AutoConfig.from_pretrained(backbone_dir, local_files_only=True, **source)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def peft_adapter_files(settings: BackboneSettings, backbone_dir: str, gguf_file: str | None,
                       tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """The adapter among ``tensors`` (a model's or a checkpoint's parameters by name, under any prefix, e.g.
    ``backbone.model.layers.0.self_attn.q_proj.lora_A.default.weight``) as PEFT's two files, by name: what
    ``PeftModel.save_pretrained`` writes (keys ``base_model.model.<module>.lora_A.weight``, the adapter name
    removed), for the backbone in ``backbone_dir``, which ``PeftModel.from_pretrained(base, folder)`` loads."""
    from safetensors.torch import save

    skeleton = _skeleton(backbone_dir, gguf_file)
    modules = {name for name, _ in skeleton.named_modules() if name}
    state = {}
    for name, tensor in tensors.items():
        if not is_adapter_name(name):
            continue
        head, _, tail = name.partition(".lora_")  # "<prefix>.<module>", "A.default.weight"
        parts = head.split(".")
        module = next((".".join(parts[k:]) for k in range(len(parts)) if ".".join(parts[k:]) in modules), None)
        kind, *adapter, leaf = tail.split(".")
        if module is None or adapter != [ADAPTER_NAME]:
            raise ValueError(f"{name}: not a LoRA tensor of a module of the backbone in {backbone_dir}")
        state[f"{PEFT_KEY_PREFIX}{module}.lora_{kind}.{leaf}"] = tensor.detach().float().cpu().contiguous()
    if not state:
        raise ValueError("no LoRA adapter tensors to export (model.adapter is lora but the weights hold none)")
    config = lora_config(settings, skeleton)
    config.base_model_name_or_path = str(backbone_dir)
    config.inference_mode = True  # as PeftModel.save_pretrained marks a saved adapter
    # what PeftConfig.save_pretrained writes (sets as lists; sorted here, for stable bytes)
    payload = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    text = json.dumps(payload, indent=2, sort_keys=True, default=str)
    return {PEFT_CONFIG_FILE: text.encode(), PEFT_WEIGHTS_FILE: save(dict(sorted(state.items())),
                                                                   metadata={"format": "pt"})}


def save_peft_adapter(settings: BackboneSettings, backbone_dir: str, gguf_file: str | None, backbone: nn.Module,
                      out_dir: str) -> list[str]:
    """Write a live backbone's adapter in PEFT's format into the local folder ``out_dir``; the file names."""
    os.makedirs(out_dir, exist_ok=True)
    files = peft_adapter_files(settings, backbone_dir, gguf_file, dict(backbone.named_parameters()))
    for name, data in files.items():
        with open(os.path.join(out_dir, name + ".tmp"), "wb") as f:
            f.write(data)
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    return sorted(files)
