"""lm-eval plug-in: `--model pill` scores an export's text-only path (no image: what PILL must not lose).

    python -m pipeline.eval.lm_eval_plugin --model pill --model_args llm=smollm2,adapter=EXPORT --tasks TASK
    (or in Python: `import pipeline.eval.lm_eval_plugin` registers "pill"; lm_eval.simple_evaluate(model="pill", ...))

lm-eval 0.4 resolves `--model NAME` from its own table only (no entry-point group for models), so the plug-in
registers itself on import and `python -m pipeline.eval.lm_eval_plugin` is lm-eval's own CLI with it imported.

The class is lm-eval's `hf` model (HFLM: its tokenisation, batching, rolling windows and stop handling, so a score
means what it means for any `hf` model) with the model calls replaced: `_model_call` runs the method's forward
(pipeline.model's Batch in, `output_logits` out) and `_model_generate` runs pipeline.generate's batched KV-cache
decoding. Without `adapter` it is a fresh PILL, which on text IS the frozen LLM (zero-init experts and gate):
the same scores as `--model hf` on the LLM dir, which tests/test_eval_plugins.py checks.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from pipeline.data.prompt_cut import Prompt
from pipeline.generate import GenerationConfig, generate_ids, load_trained
from pipeline.model.batch import Batch

MODEL_NAME = "pill"


@register_model(MODEL_NAME)
class PILLTextLM(HFLM):
    """`--model_args llm=...,adapter=...[,attn_backend=sdpa][,dtype=float32]`: any method's export (adapter
    omitted: the frozen LLM through the method's code). The device comes from lm-eval's own `--device` (as for
    `--model hf`; also naming it in model_args makes lm-eval pass it twice)."""

    def __init__(
        self,
        llm: str,
        adapter: str | None = None,
        attn_backend: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int | str = 1,
        max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("pretrained", None)
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else None
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        method = load_trained(llm, adapter or None, None, attn_backend, device, torch_dtype)
        super().__init__(
            pretrained=method.llm,
            tokenizer=method.tokenizer,
            backend="causal",
            batch_size=int(batch_size) if str(batch_size).isdigit() else batch_size,
            max_length=max_length,
            **kwargs,
        )
        self.method = method

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """(B, T, V) logits of right-padded rows (causal: a row's pad tail never reaches its scored positions)."""
        with torch.no_grad():
            return self.method.output_logits(self.method(Batch(input_ids=inps)))

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **kw: Any) -> torch.Tensor:
        """HF generate's contract: (B, T + new) = the left-padded context then each row's continuation (padded);
        rows finish at EOS or once their decoded continuation holds a stop string (lm-eval cuts it after)."""
        attn = kw.pop("attention_mask", None)
        attn = torch.ones_like(context) if attn is None else attn
        sample = bool(kw.get("do_sample")) and float(kw.get("temperature") or 0.0) > 0
        cfg = GenerationConfig(
            max_new_tokens=max(1, max_length - context.shape[1]),
            temperature=float(kw.get("temperature") or 0.0) if sample else 0.0,
            top_p=float(kw.get("top_p") or 1.0) if sample else 1.0,
        )
        prompts = [Prompt(row[m.bool()].tolist(), [False] * int(m.sum())) for row, m in zip(context, attn)]
        rows = generate_ids(self.method, prompts, cfg, on_step=self._stop_hook(len(prompts), stop))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = torch.full((len(rows), context.shape[1] + cfg.max_new_tokens), pad, dtype=context.dtype)
        out[:, : context.shape[1]] = context.cpu()
        for b, row in enumerate(rows):
            out[b, context.shape[1] : context.shape[1] + len(row)] = torch.as_tensor(row, dtype=context.dtype)
        return out.to(context.device)

    def _stop_hook(self, n: int, stop: list[str]):
        """generate_ids' on_step: finish a row once its decoded continuation contains one of `stop`."""
        new: list[list[int]] = [[] for _ in range(n)]
        pad = self.tokenizer.pad_token_id

        def hook(ids: torch.Tensor) -> torch.Tensor:
            finished = []
            for row, t in zip(new, ids.tolist()):
                if t != pad:
                    row.append(t)
                text = self.tokenizer.decode(row, skip_special_tokens=True)
                finished.append(any(s in text for s in stop))
            return torch.tensor(finished)

        return hook


def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI (`lm-eval run ...` arguments) with `--model pill` registered."""
    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
