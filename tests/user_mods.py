"""User mods for the tests, named `tests.user_mods:<name>` like any user mod."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distance_penalty(score, b, h, q_idx, kv_idx):
    """A user score_mod using every index: penalise distance, per head and batch."""
    return score - 0.02 * (h + 1) * (b + 1) * torch.abs(q_idx - kv_idx)


def explode(score, b, h, q_idx, kv_idx):
    """Fails while flex traces it: the config must fail alone, not the sweep."""
    raise RuntimeError("boom from a user score_mod")


def recompile_probe(score, b, h, q_idx, kv_idx):
    """Used by the recompile-limit test only, so no other test has graphs cached for it."""
    return score * 0.5


NOT_CALLABLE = 3


def rank_sensitive(score, b, h, q_idx, kv_idx):
    """Flex calls a mod on 0-d indices: a reference on broadcast [1,H,Q,KV] index tensors got
    this one wrong (score * 5); evaluated as flex does (vmap) it is score * 1."""
    return score * (1 + kv_idx.dim())


# --- mask_mods, factories, compositions ---------------------------------------------------------


def lookback_64(b, h, q_idx, kv_idx):
    """A mask_mod given directly: causal within 64 positions."""
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 64)


def generate_window(window):
    """A factory (attention-gym style): a symmetric window of `window` positions."""

    def window_mask(b, h, q_idx, kv_idx):
        return torch.abs(q_idx - kv_idx) <= window

    window_mask.__name__ = f"window_{window}"
    return window_mask


def generate_doc_mask(length, documents, device="cpu"):
    """A factory that needs the config's length (`{kv_len}`): equal packed documents."""
    doc = torch.arange(length, device=device) * documents // length

    def doc_mask(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    return doc_mask


def generate_causal(q_len, kv_len, align):
    """Causal for any lengths, aligned as flexbench's --align says (`{align}`)."""
    offset = kv_len - q_len if align == "end" else 0

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal


def generate_document_mask(kv_len, q_len, documents, device="cpu"):
    """The built-in document_mask:N written as a user factory (the same function), for
    comparing the two: documents of lengths in proportion 1:2:...:N, queries aligned end."""
    from flexbench.mods import document_ids

    doc, offset = document_ids(kv_len, documents, device), kv_len - q_len

    def document_mask(b, h, q_idx, kv_idx):
        return doc[q_idx + offset] == doc[kv_idx]

    return document_mask


def heads_see_more(b, h, q_idx, kv_idx):
    """Differs per head and batch element: the BlockMask must be per (b, h)."""
    return kv_idx <= q_idx + 64 * h + 32 * b


def mask_everything(b, h, q_idx, kv_idx):
    """Every score masked: every output row is 0, which measures nothing."""
    return q_idx < 0


# --- score_mods the reference must get right ----------------------------------------------------

INTERVALS = torch.tensor([[0, 40], [40, 128], [128, 512]])
TABLE = torch.linspace(-1, 1, 4 * 512).reshape(512, 4)


def scalar_indexing(score, b, h, q_idx, kv_idx):
    """Indexes with a scalar index and takes a dot product: fine for flex (0-d indices), not
    for a reference that broadcasts index tensors."""
    start = INTERVALS[h % 3][0]
    return score + 0.01 * (q_idx - start) * torch.dot(TABLE[q_idx], TABLE[kv_idx])


def log_score(score, b, h, q_idx, kv_idx):
    """NaN wherever the score is negative (about half of them)."""
    return torch.log(score)


def shift_bias(score, b, h, q_idx, kv_idx):
    """Additive, and marked so: the baseline is SDPA with the bias as attn_mask."""
    return score + 0.1 * (q_idx - kv_idx) / (h + 1)


shift_bias.additive = True


def squash(score, b, h, q_idx, kv_idx):
    """Marked additive but is not: the dense reference (a bias) differs from flex."""
    return score * 0.25


squash.additive = True


# --- a semantically wrong mod with its reference ------------------------------------------------


def alibi_reference(heads):
    """ALiBi attention computed with SDPA: reference(q, k, v, scale) -> out."""

    def reference(q, k, v, scale):
        slopes = torch.exp2(
            -8.0 * torch.arange(1, heads + 1, dtype=q.dtype, device=q.device) / heads
        )
        pos = torch.arange(q.shape[2], dtype=q.dtype, device=q.device)
        bias = slopes.view(-1, 1, 1) * (pos.view(1, 1, -1) - pos.view(1, -1, 1))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    return reference


def generate_alibi_flipped(heads):
    """ALiBi with the sign flipped (favours far keys): the check against the attached
    reference must fail."""
    slopes = torch.exp2(-8.0 * torch.arange(1, heads + 1) / heads)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (kv_idx - q_idx)

    alibi.reference = alibi_reference(heads)
    return alibi


def generate_alibi(heads, device="cpu"):
    """ALiBi, right this time, with the same reference: passes."""
    slopes = torch.exp2(-8.0 * torch.arange(1, heads + 1, device=device) / heads)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    alibi.reference = alibi_reference(heads)
    return alibi
