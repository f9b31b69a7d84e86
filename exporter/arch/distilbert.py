"""DistilBERT: transformer.layer[i].ffn = lin1 (d -> I), activation, lin2 (I -> d), dropout; the activation
is named by config.activation."""
from .base import FFNAdapter, register


@register("distilbert")
class DistilBertAdapter(FFNAdapter):
    task = "feature-extraction"
    layers_path = "transformer.layer"
    up, down, act, act_config = "ffn.lin1", "ffn.lin2", "ffn.activation", "activation"
    ffn_input = "ffn"

    def replacements(self, layer, moe):
        return {"ffn": moe}  # its output goes to output_layer_norm(ffn + attention output), as before

    def post_norm(self, config):
        return True
