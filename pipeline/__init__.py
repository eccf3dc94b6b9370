"""PILL-train: DeepSpeed training of PILL (Plug Into LLM with adapter experts and attention gates)."""
