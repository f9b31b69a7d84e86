"""GPT-2: h[i].mlp = c_fc (d -> I), gelu_new (the tanh GELU), c_proj (I -> d), dropout. Its linear maps are
Conv1D modules, whose weights are stored [in, out]."""
from .base import FFNAdapter, register


@register("gpt2")
class GPT2Adapter(FFNAdapter):
    task = "text-generation"
    layers_path = "h"
    up, down, act, act_config = "mlp.c_fc", "mlp.c_proj", "mlp.act", "activation_function"
    ffn_input = "mlp"
    conv1d = True

    def replacements(self, layer, moe):
        return {"mlp": moe}
