"""PILL's peers as methods of this engine: LLaMA-Adapter, LaVIN, LLaMA-Excitor, IAA (docs/peers.md).

Each is a FrozenLLMMethod (pipeline.model.base) on a frozen transformers Llama with a frozen CLIP ViT front end
(pipeline.model.clip), registered in pipeline.model.methods under its `model.method` name.
"""

from pipeline.model.peers.excitor import Excitor, ExcitorConfig, load_excitor
from pipeline.model.peers.iaa import IAA, IAAConfig, load_iaa
from pipeline.model.peers.lavin import LaVIN, LaVINConfig, load_lavin
from pipeline.model.peers.llama_adapter import LlamaAdapter, LlamaAdapterConfig, load_llama_adapter

PEERS = {
    # name: (model class, config class, loader, stages)
    "llama_adapter": (LlamaAdapter, LlamaAdapterConfig, load_llama_adapter, (2,)),
    "lavin": (LaVIN, LaVINConfig, load_lavin, (2,)),
    "excitor": (Excitor, ExcitorConfig, load_excitor, (2,)),
    "iaa": (IAA, IAAConfig, load_iaa, (1, 2)),
}


def register_peers() -> None:
    """Add the four peers to the method registry (called by pipeline.model.methods._register_builtin)."""
    from pipeline.model.methods import MethodSpec, register

    for name, (_, config_cls, loader, stages) in PEERS.items():
        register(MethodSpec(name, config_cls, loader, front_end="clip", stages=stages))


__all__ = ["PEERS", "register_peers", "LlamaAdapter", "LlamaAdapterConfig", "LaVIN", "LaVINConfig", "Excitor",
           "ExcitorConfig", "IAA", "IAAConfig"]
