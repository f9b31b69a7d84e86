"""OPT: fc1 (d -> I), activation_fn (ReLU), fc2 (I -> d) are called one after another inside the decoder
layer's forward (on [tokens, d]: the layer flattens the batch first), so all three are replaced."""
from torch import nn

from .base import FFNAdapter, register


@register("opt")
class OPTAdapter(FFNAdapter):
    task = "text-generation"
    layers_path = "decoder.layers"
    up, down, act, act_config = "fc1", "fc2", "activation_fn", "activation_function"
    ffn_input = "fc1"

    def replacements(self, layer, moe):
        return {"fc1": moe, "activation_fn": nn.Identity(), "fc2": nn.Identity()}

    def post_norm(self, config):
        return not getattr(config, "do_layer_norm_before", True)  # OPT-350m normalises after the residual
