"""The pass registry: every fusion pass, in the order it runs. A pass is a module with NAME, DESCRIPTION and
run(gm, ctx) -> list[MatchRecord]; it rewrites the graph in place and leaves what it does not match untouched."""
from fxopt.passes import attention, cross_entropy, layer_norm, lora, moe, qlora, rms_norm, swiglu

PASSES = [qlora, lora, swiglu, moe, rms_norm, layer_norm, attention, cross_entropy]


def pass_names() -> list[str]:
    return [p.NAME for p in PASSES]
