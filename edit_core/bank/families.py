"""What a bank knows of each model family, without ComfyUI: which layer names a bank of the
family may hold, which of them are hybrid (prompt tokens take part), and what ConvFusion can
read there. ``edit_core/comfyui/`` holds the rest of a family (its adapter, one file each)."""
from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class BankFamily:
    name: str
    layer_pattern: str             # regex of a converted layer's name; group 1: the block index
    layer_examples: str            # such names, for error messages
    hybrid_suffix: Optional[str]   # layers whose names end so are hybrid; None: every layer is linear
    cf_inputs: Tuple[str, ...]     # what ConvFusion may read, the default (where a bank does not say) first
    cf_input_reason: str = ""      # why only those, where it is fewer than all

    def layer_kind(self, name: str) -> str:
        return "hybrid" if self.hybrid_suffix and name.endswith(self.hybrid_suffix) else "linear"


BANK_FAMILIES = {family.name: family for family in (
    # SD3's blocks hand ConvFusion the raw residual stream x (before norm1 and the adaLN
    # modulation): joint attention is hybrid, MMDiT-X attn2 image-only.
    BankFamily("sd3", r"joint_blocks\.(0|[1-9][0-9]{0,2})\.attn2?",
               "'joint_blocks.0.attn' or 'joint_blocks.0.attn2'", ".attn", ("residual", "modulated")),
    BankFamily("pixart", r"blocks\.(0|[1-9][0-9]{0,2})\.attn", "'blocks.0.attn'", None, ("modulated",),
               "its attention input is the modulated one; only SD3 can read the residual stream"),
)}
