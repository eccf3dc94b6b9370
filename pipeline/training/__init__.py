"""PILL training under DeepSpeed (entry point: pipeline/train.py; docs/training.md).

config      dataclasses, YAML presets, --set overrides, validation (ConfigError names the field)
ds_config   fill the "auto" fields of ds_configs/*.json from the config; validate the combination early
optim       AdamW over trainable parameters only (decay / no-decay groups, never empty); warmup + cosine
dist        process group for deepspeed / torchrun / srun / plain python; SIGTERM/SIGUSR1 flag; exit code 99
data_glue   pipeline.data's loader as an endless, resumable batch stream with skip counters
loop        one stage, top to bottom: model -> optimizer -> engine -> resume -> steps -> checkpoints -> export
checkpoint  atomic DeepSpeed checkpoints without frozen weights, consolidated copy for any world size, export
metrics     tqdm bar, text log, TensorBoard scalars (+ per-layer gate image), metrics.jsonl
evaluate    held-out multiple-choice accuracy of the export with and without images -> eval.json
"""
