"""The backbone's settings every recommender shares: precision, an optional LoRA adapter, and compilation.

Kept apart from ``model/adapter.py`` (which applies the adapter with torch and peft) so that reading and checking a
config imports neither torch nor transformers: a Ray run's driver checks its config before Ray starts."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from cllm4rec_dist.model.options import PRECISIONS
from cllm4rec_dist.settings import ConfigError, require

ADAPTERS = ("none", "lora")
"""``model.adapter``: 'none' (the frozen backbone of the papers) or 'lora'."""

@dataclass
class BackboneSettings:
    """The frozen backbone every recommender loads: its precision and an optional LoRA adapter. Validates itself
    (``check_backbone``); the target modules are checked against the loaded backbone (``apply_adapter``)."""

    precision: str = "fp32"
    """Backbone precision: fp32, bf16, int8 or nf4 (int8/nf4: bitsandbytes; the tables stay fp32)."""
    adapter: str = "none"
    """'none': the backbone stays frozen (the papers' method); 'lora': LoRA adapters (peft) on its target modules
    (model.lora_targets) are trained with the tables/projections, in every precision (int8/nf4: QLoRA-style); the
    rest of the backbone stays frozen. Their lr: the phase's lr x optim.adapter_lr_scale."""
    lora_rank: int = 8
    """LoRA rank r of each adapted module (adapter: lora)."""
    lora_alpha: float = 16.0
    """LoRA alpha: the adapter's update is scaled by alpha / r (adapter: lora)."""
    lora_dropout: float = 0.05
    """Dropout on the adapters' input while training (adapter: lora; the frozen backbone's own dropout stays off)."""
    lora_targets: str | None = None
    """Comma-separated names of the modules that get an adapter (e.g. 'q_proj,v_proj'; a name matches every layer's
    module of that name); none = peft's default for the architecture (LLaMA: q_proj,v_proj; GPT-2: c_attn)."""
    compile: bool = False
    """torch.compile each decoder layer of the backbone (model/backbone.py ``compile_decoder_layers``): the layers'
    element-wise work (norms, rotary, activation, residual adds) is fused around the GEMMs, the results equal the
    eager ones to rounding. fp32 and bf16 backbones; the first steps of each shape pay the compilation, which needs a
    C++ compiler (inductor builds its CPU kernels with g++, or $CXX)."""

    def check_backbone(self) -> BackboneSettings:
        """This class's rules (ConfigError naming the setting)."""
        require(self.precision in PRECISIONS, "model.precision", self.precision, ", ".join(PRECISIONS))
        require(self.adapter in ADAPTERS, "model.adapter", self.adapter, ", ".join(ADAPTERS))
        require(self.lora_rank >= 1, "model.lora_rank", self.lora_rank, ">= 1")
        require(self.lora_alpha > 0, "model.lora_alpha", self.lora_alpha, "> 0")
        require(0 <= self.lora_dropout < 1, "model.lora_dropout", self.lora_dropout, "in [0, 1)")
        if self.compile:
            require(self.precision in COMPILED_PRECISIONS, "model.compile", self.compile,
                    f"false with model.precision {self.precision} (compiled backbones: "
                    f"{', '.join(COMPILED_PRECISIONS)}; int8/nf4 layers run bitsandbytes' own kernels)")
            require(cxx_compiler() is not None, "model.compile", self.compile,
                    f"false on a machine without a C++ compiler: torch.compile builds its kernels with "
                    f"{cxx_name()}; install it (e.g. apt install g++), or point $CXX at one")
        if self.lora_targets is not None:
            require(bool(self.target_names()), "model.lora_targets", self.lora_targets,
                    "comma-separated module names (e.g. q_proj,v_proj), or none for the architecture's default")
        return self

    def check_trainable_backbone(self, what: str) -> None:
        """Refuse an adapter on a backbone that ``what`` (an ablation) trains whole: LoRA is for a frozen one."""
        if self.adapter != "none":
            raise ConfigError(f"model.adapter={self.adapter} with {what}: that ablation trains the whole backbone, "
                              "an adapter adapts a frozen one; set model.adapter none or choose another ablation")

    def backbone_settings(self) -> BackboneSettings:
        """These fields alone, as a ``BackboneSettings`` (what a recommender's model reads of its section)."""
        return BackboneSettings(**{name: getattr(self, name) for name in BACKBONE_FIELDS})

    @property
    def uses_adapter(self) -> bool:
        return self.adapter != "none"

    def target_names(self) -> list[str]:
        """The lora_targets names (empty when unset)."""
        return [name.strip() for name in (self.lora_targets or "").split(",") if name.strip()]


BACKBONE_FIELDS = ("precision", "adapter", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "compile")

COMPILED_PRECISIONS = ("fp32", "bf16")
"""The backbone precisions ``model.compile`` accepts."""


def cxx_name() -> str:
    """The C++ compiler torch.compile's inductor calls on Linux: $CXX, else g++."""
    return os.environ.get("CXX") or "g++"


def cxx_compiler() -> str | None:
    """``cxx_name()`` as a path on this machine; None if there is none."""
    return shutil.which(cxx_name())
