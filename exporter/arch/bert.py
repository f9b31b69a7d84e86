"""BERT (and models built like it, e.g. sentence-transformers' MiniLM): intermediate.dense (d -> I) and
its activation, then output.dense (I -> d), dropout, residual LayerNorm."""
from torch import nn

from .base import FFNAdapter, register


@register("bert")
class BertAdapter(FFNAdapter):
    task = "feature-extraction"
    layers_path = "encoder.layer"
    up, down, act = "intermediate.dense", "output.dense", "intermediate.intermediate_act_fn"
    ffn_input = "intermediate"

    def replacements(self, layer, moe):
        # BertOutput computes LayerNorm(dropout(dense(h)) + residual): with intermediate = the MoE FFN (bias
        # included) and dense = Identity, the rest of the layer is untouched.
        return {"intermediate": moe, "output.dense": nn.Identity()}

    def post_norm(self, config):
        return True
