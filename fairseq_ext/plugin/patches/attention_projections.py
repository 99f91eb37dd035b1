"""fairseq's attention computed through its projection modules: the predictor's mixed-task batches, whose
forward hooks must see every projection (see PATCHES: attention-through-projections), and models whose
projections a tuner wraps (LoRA, IA3), which fairseq's fast path would skip (tuned-projections)."""
import contextlib
import functools

import torch


def projections_as_modules(model: torch.nn.Module) -> int:
    """For the model's life, each of its MultiheadAttention modules whose projections a tuner wrapped
    (a projection module that is no longer a plain Linear) computes with those modules, in training too
    (see PATCHES: tuned-projections); returns how many.  fairseq's fast path reads ``q_proj.weight``
    and would silently leave the tuner out."""
    from fairseq.modules.multihead_attention import MultiheadAttention

    changed = 0
    for module in model.modules():
        projections = (module.q_proj, module.k_proj, module.v_proj, module.out_proj) if isinstance(
            module, MultiheadAttention) else ()
        if any(type(projection) is not torch.nn.Linear for projection in projections):
            module.skip_embed_dim_check = True
            module.forward = functools.partial(_attention_through_projections, module, module.forward)
            changed += 1
    return changed


@contextlib.contextmanager
def attention_through_projections(attention_modules):
    """While the block runs, each of fairseq's MultiheadAttention modules given computes with its
    q/k/v/out projection modules, so forward hooks on them see every projection (see PATCHES)."""
    attention_modules = list(attention_modules)
    before = [(module.skip_embed_dim_check, module.__dict__.get("forward")) for module in attention_modules]
    for module in attention_modules:
        module.skip_embed_dim_check = True  # fairseq's own path, for what the fast one below does not cover
        module.forward = functools.partial(_attention_through_projections, module, module.forward)
    try:
        yield
    finally:
        for module, (skip, forward) in zip(attention_modules, before):
            module.skip_embed_dim_check = skip
            if forward is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = forward


def _attention_through_projections(module, fairseq_forward, query, key=None, value=None, key_padding_mask=None,
                                   incremental_state=None, need_weights=True, static_kv=False, attn_mask=None,
                                   before_softmax=False, need_head_weights=False):
    """Attention as torch's multi_head_attention_forward computes it without weights (three projections,
    scaled_dot_product_attention with fairseq's attention dropout, the output projection), through the modules."""
    if (incremental_state is not None
            or static_kv or before_softmax or need_weights or need_head_weights or attn_mask is not None
            or module.bias_k is not None or module.add_zero_attn or key is None or value is None):
        return fairseq_forward(query, key, value, key_padding_mask=key_padding_mask,
                               incremental_state=incremental_state, need_weights=need_weights, static_kv=static_kv,
                               attn_mask=attn_mask, before_softmax=before_softmax,
                               need_head_weights=need_head_weights)
    target_length, batch, embed_dim = query.shape

    def heads(x):  # (T, B, C) -> (B, heads, T, head_dim)
        return x.view(x.shape[0], batch, module.num_heads, module.head_dim).permute(1, 2, 0, 3)

    mask = None
    if key_padding_mask is not None:
        mask = ~key_padding_mask.bool().view(batch, 1, 1, -1)  # True: attend
    dropout = module.dropout_module
    dropout_p = dropout.p if module.training or dropout.apply_during_inference else 0.0
    attention = torch.nn.functional.scaled_dot_product_attention(
        heads(module.q_proj(query)), heads(module.k_proj(key)), heads(module.v_proj(value)), attn_mask=mask,
        dropout_p=dropout_p)
    attention = attention.permute(2, 0, 1, 3).reshape(target_length, batch, embed_dim)
    return module.out_proj(attention), None
