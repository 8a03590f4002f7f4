"""rizzearch: xLSTM, RWKV-4, ORPO, the Goldfish loss and a legal RAG hallucination audit.

Tested, offline-first PyTorch implementations that reproduce each paper's main claim.
See README.md for the two commands (``make demo``, ``make test``) and DESIGN.md for the layout.
"""

__version__ = "0.1.0"
