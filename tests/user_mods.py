"""User score_mods for the tests, named `tests.user_mods:<function>` like any user mod."""

from __future__ import annotations

import torch


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
    """Not one function: flex sees 0-d indices, the dense reference [1,H,Q,KV]-broadcast ones.

    So compiled flex and the reference disagree, as a wrong kernel would: the check must fail.
    """
    return score * (1 + kv_idx.dim())
