"""Commands that wire several packages together, above them all (beside ``cli.py``).

``rizz audit`` (``commands.audit``) builds the RAG index, the systems under audit and their
generators (``rizzearch.rag``) and hands their answers to the judge (``rizzearch.audit``). It lives
here, not in ``audit/``, so that the judge imports nothing of the systems it judges and ``rag`` and
``audit`` stay independent (the import-linter contract in ``.importlinter``).
"""
