"""PILL's peers as methods of this engine: LLaMA-Adapter, LaVIN, LLaMA-Excitor, IAA (docs/peers.md).

Each is one file: a PeerMethod (common.py: the contract's forward, adapters_off as the frozen LLM, the shared
layer loop) on a frozen Llama-family LLM with a frozen CLIP ViT front end (pipeline.model.clip), its config, and
its `SPEC` (listed in pipeline.model.methods). docs/peers.md "Fidelity" says what each was compared against.
"""

from pipeline.model.peers import excitor, iaa, lavin, llama_adapter
from pipeline.model.peers.excitor import Excitor, ExcitorConfig
from pipeline.model.peers.iaa import IAA, IAAConfig
from pipeline.model.peers.lavin import LaVIN, LaVINConfig
from pipeline.model.peers.llama_adapter import LlamaAdapter, LlamaAdapterConfig

SPECS = (llama_adapter.SPEC, lavin.SPEC, excitor.SPEC, iaa.SPEC)

__all__ = [
    "SPECS",
    "LlamaAdapter",
    "LlamaAdapterConfig",
    "LaVIN",
    "LaVINConfig",
    "Excitor",
    "ExcitorConfig",
    "IAA",
    "IAAConfig",
]
