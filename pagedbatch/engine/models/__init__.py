from .config import SUPPORTED_ARCHITECTURES, ModelArgs
from .llama import LlamaForCausalLM
from .loader import load_model

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelArgs", "LlamaForCausalLM", "load_model"]
