"""Models behind the CausalLM contract (``rizzearch.models.base``) and the registry.

Importing this package registers every model family; ``build_model(name, **overrides)`` builds one.
"""

from rizzearch.models.base import CausalLM, build_model, generate, model_names
from rizzearch.models.gpt import GPT, GPTConfig
from rizzearch.models.llama import Llama, LlamaConfig
from rizzearch.models.pretrained import Pretrained, load_pretrained, save_pretrained
from rizzearch.models.rwkv import RWKV, RWKVConfig
from rizzearch.models.xlstm import XLSTM, XLSTMConfig

__all__ = ["CausalLM", "GPT", "GPTConfig", "Llama", "LlamaConfig", "Pretrained", "RWKV", "RWKVConfig", "XLSTM", "XLSTMConfig", "build_model", "generate", "load_pretrained", "model_names", "save_pretrained"]
