"""objectives.preference: response log-probs and the chosen NLL from the logits of stacked rows (no model)."""

from __future__ import annotations

import pytest
import torch

from rizzearch.errors import ConfigError
from rizzearch.objectives.preference import preference_logprobs, shift_targets, stack_sides
from rizzearch.testing import assert_close


def _batch():
    # B = 2 pairs, right-padded to L = 6; prompts of 2 tokens, responses of 1-3 tokens
    ids = torch.tensor([[1, 2, 3, 4, 0, 0], [1, 5, 6, 7, 8, 0]])
    att = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]).bool()
    resp = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]]).bool()
    rej_ids = torch.tensor([[1, 2, 9, 0, 0, 0], [1, 5, 6, 4, 4, 4]])
    rej_att = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    rej_resp = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]).bool()
    return {"chosen_input_ids": ids, "chosen_attention_mask": att, "chosen_response_mask": resp,
            "rejected_input_ids": rej_ids, "rejected_attention_mask": rej_att, "rejected_response_mask": rej_resp}


def test_shift_targets_by_hand():
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1]])
    assert shift_targets(ids, mask).tolist() == [[-100, 3, 4, -100]]


@pytest.mark.parametrize("chunked", [True, False])
def test_logprobs_and_nll_match_a_row_by_row_loop(chunked):
    batch = _batch()
    ids, resp, att = stack_sides(batch)  # (4, 6): trailing column kept (a rejected row is full)
    assert ids.shape == (4, 6)
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 11)
    fw = preference_logprobs(logits, ids, resp, att, 2, nll_mode="prompt+response", chunked=chunked, chunk_size=3)
    logp = logits.log_softmax(-1)
    sums, counts, full_sum, full_n = [], [], 0.0, 0
    for r in range(4):
        s = sum(float(logp[r, t, ids[r, t + 1]]) for t in range(5) if resp[r, t + 1])
        sums.append(s)
        counts.append(sum(int(resp[r, t + 1]) for t in range(5)))
        if r < 2:  # the NLL counts every real chosen token after the first
            full_sum += sum(float(logp[r, t, ids[r, t + 1]]) for t in range(5) if att[r, t + 1])
            full_n += sum(int(att[r, t + 1]) for t in range(5))
    assert_close(fw.chosen.sum, torch.tensor(sums[:2]), name="chosen sum")
    assert_close(fw.rejected.sum, torch.tensor(sums[2:]), name="rejected sum")
    assert fw.chosen.count.tolist() == counts[:2] and fw.rejected.count.tolist() == counts[2:]
    assert_close(fw.chosen.mean, torch.tensor(sums[:2]) / torch.tensor(counts[:2]), name="chosen mean")
    assert_close(fw.chosen_nll, torch.tensor(-full_sum / full_n), name="prompt+response NLL")
    assert int(fw.nll_tokens) == full_n
    resp_only = preference_logprobs(logits, ids, resp, att, 2, nll_mode="response")
    assert_close(resp_only.chosen_nll, torch.tensor(-sum(sums[:2]) / sum(counts[:2])), name="response NLL")
    none = preference_logprobs(logits[:2], ids[:2], resp[:2], att[:2], 2, nll_mode=None, has_rejected=False)
    assert none.rejected is None and none.chosen_nll is None
    assert_close(none.chosen.sum, fw.chosen.sum, name="chosen only")


def test_unknown_nll_mode_is_named():
    batch = _batch()
    ids, resp, att = stack_sides(batch)
    with pytest.raises(ConfigError, match="nll_mode"):
        preference_logprobs(torch.zeros(4, 6, 11), ids, resp, att, 2, nll_mode="all")
