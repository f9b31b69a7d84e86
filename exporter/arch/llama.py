"""LLaMA-style gated FFNs (LLaMA, SmolLM2, Qwen2, Mistral): mlp = down_proj(act(gate_proj(x)) * up_proj(x)),
SwiGLU with SiLU; biases only if config.mlp_bias. The operator's gated form computes exactly this with
Wg = gate_proj, W1 = up_proj, W2 = down_proj."""
from .base import FFNAdapter, register


@register("llama", "qwen2", "mistral")
class LlamaAdapter(FFNAdapter):
    task = "text-generation"
    layers_path = "layers"
    up, down, gate, act = "mlp.up_proj", "mlp.down_proj", "mlp.gate_proj", "mlp.act_fn"
    ffn_input = "mlp"

    def replacements(self, layer, moe):
        return {"mlp": moe}
