"""lmms-eval plug-in: `lmms-eval --model pill --model_args llm=...,vpg=...,adapter=...` on any method's export.

Registered through lmms-eval's plug-in entry point (setup.py: group `lmms_eval.models`, `pill = MANIFEST`), so an
installed pill-train is found by the `lmms-eval` command as it is. `generate_until` and `loglikelihood`; images
come from the task's `doc_to_visual` (PIL images) and go through the training transform (the data config's image
size, mean and std, as pipeline.eval reads shards), the text through `chat_prompt` in the run's prompt format with
the training system message. Decoding is pipeline.generate's batched KV-cache generation.

For ScienceQA-format records (the demo's held-out shards, ScienceQA shards) `sqa_doc_to_text`,
`sqa_doc_to_visual` and `sqa_process_results` make a task that asks exactly the prompt pipeline.eval.scienceqa
asks and scores it with the same parser: the same accuracy (tests/test_eval_plugins.py).

Installing: lmms-eval's PyPI dependency torchvision is built for CUDA torch; next to a CPU torch it fails to load
(and transformers then fails with it), so a CPU machine installs `lmms-eval --no-deps` plus the few modules it
imports (the Makefile's lmms line).
"""

from __future__ import annotations

import io
from typing import Any

import torch
import torch.nn.functional as F
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image, ImageFile

from pipeline.constants import IMAGE_MEAN, IMAGE_STD
from pipeline.data.eval import chat_prompt, default_data_config
from pipeline.data.prompts import scienceqa_user
from pipeline.data.transforms import decode_image, normalise
from pipeline.eval.parsing import parse_choice
from pipeline.generate import GenerationConfig, generate, load_trained, model_device_dtype
from pipeline.model.batch import Batch

# lmms-eval's task module turns on Pillow's process-wide LOAD_TRUNCATED_IMAGES when imported; our decoding counts a
# truncated image as a bad sample (pipeline.data.transforms), so importing the plug-in must not change that.
ImageFile.LOAD_TRUNCATED_IMAGES = False

MANIFEST = ModelManifest(model_id="pill", simple_class_path="pipeline.eval.lmms_plugin.PILLLMMs")
"""What the `lmms_eval.models` entry point names: lmms-eval imports the class only when `--model pill` asks."""


class PILLLMMs(lmms):
    """`--model_args llm=DIR|tiny|smollm2|x.gguf,vpg=...,adapter=EXPORT[,attn_backend=..][,device=..]
    [,prompt_format=auto][,batch_size=8]`."""

    def __init__(
        self,
        llm: str,
        vpg: str | None = None,
        adapter: str | None = None,
        attn_backend: str | None = None,
        device: str | None = None,
        prompt_format: str = "auto",
        batch_size: int | str = 8,
        **_: Any,
    ) -> None:
        super().__init__()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_trained(llm, adapter or None, vpg or None, attn_backend, device)
        self.data_cfg = default_data_config(num_query_tokens=self.model.cfg.num_query_tokens)
        self.prompt_format = prompt_format
        self.batch_size = int(batch_size)

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def _pixels(self, visuals: list) -> torch.Tensor | None:
        """PIL images -> (N, 3, S, S) with the shards' transform (PNG-encoded first: lossless, so the decoded
        pixels are those of the image's own PNG file)."""
        if not visuals:
            return None
        size = self.data_cfg.image_size
        arrays = []
        for img in visuals:
            if not isinstance(img, Image.Image):
                raise ValueError(f"pill takes images (PIL) from doc_to_visual, got {type(img).__name__}")
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            arrays.append(decode_image(buf.getvalue(), size))
        mean, std = self.data_cfg.image_mean or IMAGE_MEAN, self.data_cfg.image_std or IMAGE_STD
        return normalise(arrays, mean, std, size)

    def _prompt(self, context: str, doc_to_visual, doc_id: int, task: str, split: str):
        doc = self.task_dict[task][split][doc_id]
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        system = self.data_cfg.system_message
        return chat_prompt(self.model, context, self._pixels(visuals), system=system, prompt_format=self.prompt_format)

    # ---- lmms-eval's calls ----------------------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        """Greedy (or sampled, per the task's generation_kwargs) answers, cut at the task's `until` strings."""
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            by_kwargs: dict[str, list[int]] = {}
            for i, req in enumerate(chunk):
                by_kwargs.setdefault(repr(sorted(req.args[1].items())), []).append(i)
            texts = [""] * len(chunk)
            for rows in by_kwargs.values():
                kw = chunk[rows[0]].args[1]
                prompts = [self._prompt(chunk[i].args[0], *chunk[i].args[2:]) for i in rows]
                for i, text in zip(rows, generate(self.model, prompts, _generation_config(kw), len(rows))):
                    texts[i] = _cut(text, kw.get("until"))
            out += texts
        return out

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """log P(continuation | the rendered prompt) and whether greedy decoding would produce it."""
        device, dtype = model_device_dtype(self.model)
        results = []
        for req in requests:
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            prompt = self._prompt(context, doc_to_visual, doc_id, task, split)
            cont = self.model.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt.input_ids + cont], device=device)
            mm = torch.tensor([prompt.modality_mask + [False] * len(cont)], device=device)
            pixels = {} if prompt.images is None else {"pixel_values": prompt.images.to(device, dtype)}
            logits = self.model.output_logits(self.model(Batch(input_ids=ids, modality_mask=mm, **pixels)))
            logp = F.log_softmax(logits[0, len(prompt.input_ids) - 1 : -1].float(), -1)  # (C, V)
            target_ids = torch.tensor(cont, device=device)
            score = logp.gather(-1, target_ids[:, None]).sum().item()
            results.append((score, bool((logp.argmax(-1) == target_ids).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("pill answers one round per request (generate_until)")


def _generation_config(kw: dict) -> GenerationConfig:
    sample = bool(kw.get("do_sample")) and float(kw.get("temperature") or 0) > 0
    return GenerationConfig(
        max_new_tokens=int(kw.get("max_new_tokens") or 64),
        temperature=float(kw.get("temperature") or 0) if sample else 0.0,
        top_p=float(kw.get("top_p") or 1.0) if sample else 1.0,
    )


def _cut(text: str, until: Any) -> str:
    for stop in [until] if isinstance(until, str) else until or []:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


# ---- ScienceQA-format tasks: the prompt and the scoring of pipeline.eval.scienceqa ----------------------------------
def sqa_doc_to_visual(doc: dict) -> list:
    """The record's image ("image": a file path), as RGB; none for a text-only question."""
    path = doc.get("image")
    return [Image.open(path).convert("RGB")] if path else []


def sqa_doc_to_text(doc: dict) -> str:
    """The user turn the training template renders for this record (data.use_captions off, as the eval default)."""
    return scienceqa_user(doc, 1 if doc.get("image") else 0, False)


def sqa_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Accuracy in percent, the option parsed as pipeline.eval.scienceqa parses it (unparsed = wrong)."""
    return {"accuracy": 100.0 * (parse_choice(results[0], len(doc["choices"])) == int(doc["answer"]))}
