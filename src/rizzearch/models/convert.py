"""Weight import/export between rizzearch models and the reference implementations.

- ``from_official_xlstm(official_model) -> XLSTM``: NX-AI ``xlstm`` package's ``xLSTMLMModel``.
- ``from_hf_rwkv(hf_model) -> RWKV`` and ``to_hf_rwkv(model) -> RwkvForCausalLM``: HF transformers.

The reference packages are optional (the ``anchors`` extra); they are imported inside the
functions that need them, never at module import.
"""

from __future__ import annotations

# ==============================================================================================
# xLSTM (official NX-AI package)
# ==============================================================================================


# ==============================================================================================
# RWKV-4 (HF transformers)
# ==============================================================================================
