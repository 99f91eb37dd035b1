"""A BERT classifier over the masked mean of its tokens, for transformers alone.

transformers has no standard class for a sentence-transformers encoder (all-MiniLM's
mean pooling) with a classification head, so ``tools.export_hf`` copies this file,
unchanged, into the exported folder as ``modeling_bitfit_mean_pooling.py`` and names
the class in config.json's ``auto_map``; the folder then loads with

    AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)

This file imports torch and transformers only (never fairseq_ext): whoever loads
the folder needs no package of this project.  The head is RoBERTa's (dropout,
dense, tanh, dropout, out_proj) over the mean of the non-padding tokens' last
hidden states, which is the fairseq ``bert`` model's ``--pooling mean`` head.
"""
import torch
from torch import nn
from torch.nn import functional
from transformers import BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPooledClassificationHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions ``attention_mask`` keeps (sentence-transformers' mean pooling)."""
    keep = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)


class BertForMeanPooledSequenceClassification(BertPreTrainedModel):
    """BertModel (no pooler), masked mean of the last hidden states, a dense-tanh-out_proj head."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = MeanPooledClassificationHead(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, output_hidden_states=None, output_attentions=None,
                return_dict=None, **kwargs):
        outputs = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds,
                            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                            return_dict=True)
        hidden = outputs.last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        logits = self.classifier(masked_mean(hidden, attention_mask))
        loss = None
        if labels is not None:
            if self.config.problem_type == "regression" or self.num_labels == 1:
                loss = functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
            else:
                loss = functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)
