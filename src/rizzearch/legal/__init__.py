"""What the legal RAG systems (``rizzearch.rag``) and the hallucination audit (``rizzearch.audit``) share.

* ``legal.corpus``: the bundled corpus (U.S. Constitution, Supreme Court opinions, LegalBench rule_qa)
  as ``Passage`` objects with stable ids and citable references, and small corpus helpers
  (``date_words``, ``REVIEW_PHRASES``).
* ``legal.citations``: citation extraction (eyecite, our Constitution parser, internal passage ids),
  the authority table (``Authorities``: which cases, statutes and provisions exist) and existence checks
  (with reporters-db), and ``propositions`` (an answer's sentences with the citations they carry).
* ``legal.documents``: a user's own documents (folder of .txt/.md/.html, or JSONL) as passages, chunked like
  the bundled corpus (``rizz rag index --documents``).
* ``legal.embed``: the bundled all-MiniLM-L6-v2 sentence encoder (offline), used by dense retrieval and by
  the audit labeller's paraphrase similarity.
* ``legal.text``: text normalisation (content tokens, the light stemmer, stop words, case-name stop
  words, Roman numerals, ordinals, the sentence splitter, IDF tables and weighted recall).

Nothing here judges an answer: the audit's labels and support scorer live in ``audit.labels``, the
verified system's own support check in ``rag.support``. ``rag`` and ``audit`` import this package and
never each other; the command that wires systems to the judge is ``commands.audit``, above both.
"""
