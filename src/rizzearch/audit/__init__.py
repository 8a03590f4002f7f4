"""Hallucination audit after Magesh et al. (2024), "Hallucination-Free? Assessing the Reliability of
Leading AI Legal Research Tools".

    >>> from rizzearch.audit import load_queries, label_response
    >>> q = load_queries()[0]
    >>> label_response(q, "...")["correctness"] in ("correct", "incorrect", "refusal")
    True

``load_queries`` returns the bundled query set (four categories, gold answers and gold passages);
``label_response(query, answer_text)`` gives the paper's labels for one answer, with the citations found
in it and their existence / support verdicts. ``rizz audit`` runs whole systems and writes a report.
"""

from rizzearch.audit.labels import label_response
from rizzearch.audit.queries import load_queries

__all__ = ["load_queries", "label_response"]
