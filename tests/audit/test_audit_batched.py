"""The audit runner batches generation across a chunk's drafts and records the time split."""

import json

from rizzearch.audit import load_queries
from rizzearch.audit.runner import run_audit, timing_summary
from rizzearch.errors import DataError
from rizzearch.rag.generators import ExtractiveGenerator
from rizzearch.rag.systems import make_system


class Batching(ExtractiveGenerator):
    """The extractive answerer with a ``generate_batch`` that records its calls and fails on one question."""

    name = "batching"

    def __init__(self, fail_on: str = ""):
        super().__init__()
        self.calls: list[int] = []
        self.fail_on = fail_on

    def generate_batch(self, requests):
        self.calls.append(len(requests))
        return [DataError("boom") if r.question == self.fail_on else self.generate(r) for r in requests]

    def take_timing(self):
        return {"prefill_s": 0.5, "decode_s": 0.25, "new_tokens": 3}


def _systems(index, gen):
    return {s: make_system(s, index, gen, mode="bm25") for s in ("closed_book", "naive_rag", "verified_rag")}


def test_batched_audit_matches_one_at_a_time_and_records_the_split(bm25_index, tmp_path):
    qs = load_queries(limit=2)
    gen = Batching()
    res = run_audit(_systems(bm25_index, gen), qs, tmp_path / "b", progress=False, n_boot=50, chunk_size=6)
    n = 3 * len(qs)
    assert len(gen.calls) == -(-n // 6) and max(gen.calls) > 1  # one generation call per chunk, several drafts each
    singles = _systems(bm25_index, ExtractiveGenerator())
    by = {(r["system"], r["query_id"]): r for r in res["rows"]}
    for s, system in singles.items():
        for q in qs:
            a = system.answer(q["question"])
            assert by[(s, q["id"])]["answer"] == a.text and by[(s, q["id"])]["status"] == a.status
    t = res["timing"]
    assert t["new_answers"] == n and t["answers_per_s"] > 0
    assert t["prefill_s"] == 0.5 * len(gen.calls) and t["decode_s"] == 0.25 * len(gen.calls)
    for k in ("retrieval_s", "generation_s", "verification_s", "labelling_s"):
        assert t[k] >= 0
    assert json.loads((tmp_path / "b" / "timing.json").read_text()) == t
    assert "timing" not in res["metrics"]  # metrics stay deterministic


def test_a_failing_request_is_an_error_row_and_is_retried(bm25_index, tmp_path):
    qs = load_queries(limit=1)
    bad = qs[0]["question"]
    res = run_audit(_systems(bm25_index, Batching(fail_on=bad)), qs, tmp_path, progress=False, n_boot=50)
    errs = [r for r in res["rows"] if r["status"] == "error"]
    assert errs and all(r["question"] == bad and r["error"] == "boom" for r in errs)
    assert any(r["status"] != "error" for r in res["rows"])
    again = run_audit(_systems(bm25_index, Batching()), qs, tmp_path, progress=False, n_boot=50)
    assert again["new_answers"] == len(errs) and not [r for r in again["rows"] if r["status"] == "error"]


def test_timing_summary_rates():
    t = timing_summary({"retrieval_s": 1.0, "generation_s": 3.0}, 8, 8, 4.0)
    assert t["answers_per_s"] == 2.0 and t["wall_s"] == 4.0
    assert timing_summary({}, 0, 0, 0.0)["answers_per_s"] is None
