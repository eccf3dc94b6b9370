"""Text retention on the training curve (eval.retention_every): identical-% and mean KL against the frozen LLM.

Every `eval.retention_every` optimizer steps (and at step 0 of a fresh stage) the trainer measures, on the first
`eval.retention_prompts` prompts of pipeline/eval/text_prompts.jsonl, what pipeline.eval.retention measures after a
stage (its functions, its definitions): the share of prompts whose greedy answer (first
`eval.retention_max_new_tokens` tokens, cut at the stop token) is the frozen LLM's, and the per-token KL(frozen ||
trained) along the frozen answer. The frozen reference is the model itself under adapters_off() (pipeline.eval.
retention "auto": transformers on model.llm for a method without the switch); its answers are computed once per
stage, since the frozen LLM never changes.

No extra process and no rank-0-only model call: under ZeRO-3 every layer's forward gathers its weights
collectively, so EVERY rank runs the same probe on the same prompts. Decoding runs a fixed number of forwards
(stop_at_eos=False, answers cut afterwards), so no rank's loop can end early on a different stop decision; the
ranks hold identical weights, so their results are identical and rank 0 logs them.
"""

from __future__ import annotations

import torch

from pipeline.data.eval import chat_prompt
from pipeline.eval.retention import answer_kl, frozen_answers, load_text_prompts, resolve_reference
from pipeline.generate import GenerationConfig, generate_ids, stop_ids


class RetentionProbe:
    """The fixed prompt subset of a stage and the frozen answers to it (computed at the first `measure`)."""

    def __init__(
        self, model, n_prompts: int, max_new_tokens: int, prompt_format: str = "auto", batch_size: int = 8
    ) -> None:
        self.texts = load_text_prompts(limit=n_prompts)
        self.prompts = [chat_prompt(model, t, prompt_format=prompt_format) for t in self.texts]
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.reference = resolve_reference(model, "auto")
        self.frozen = None

    @torch.no_grad()
    def measure(self, model) -> dict[str, float]:
        """{"retention/identical": percent, "retention/mean_kl": nats per token} of `model` now (train mode is
        restored after)."""
        was_training = model.training
        model.eval()
        try:
            if self.frozen is None:
                self.frozen = frozen_answers(model, self.prompts, self.max_new_tokens, self.batch_size, self.reference)
            ours = self._answers(model)
            kls = answer_kl(model, self.prompts, self.frozen, self.batch_size, self.reference)
        finally:
            model.train(was_training)
        same = [o == r[: self.max_new_tokens] for o, r in zip(ours, self.frozen.answers)]
        n_tok = sum(len(k) for k in kls)
        return {
            "retention/identical": 100.0 * sum(same) / len(same),
            "retention/mean_kl": sum(sum(k) for k in kls) / max(n_tok, 1),
        }

    def _answers(self, model) -> list[list[int]]:
        """Greedy answers with a fixed number of forwards per batch, cut at the first stop token."""
        eos = stop_ids(model)
        gen = GenerationConfig(max_new_tokens=self.max_new_tokens, stop_at_eos=False)
        out = []
        for s in range(0, len(self.prompts), self.batch_size):
            for row in generate_ids(model, self.prompts[s : s + self.batch_size], gen):
                cut = next((i for i, t in enumerate(row) if t in eos), None)
                out.append(row if cut is None else row[:cut])
        return out
