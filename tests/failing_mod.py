"""A user score_mod that always raises: the injected failing config of the tracking tests."""


def boom(score, b, h, q_idx, kv_idx):
    raise RuntimeError("injected failure for the tracking tests")
