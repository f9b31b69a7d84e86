"""RoBERTa: BERT's layer (intermediate / output) under another model type; no token_type_ids in the export."""
from .base import register
from .bert import BertAdapter


@register("roberta", "xlm-roberta")
class RobertaAdapter(BertAdapter):
    pass
