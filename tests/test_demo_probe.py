"""shards.demo_probe's probes: the MLP reads what a linear probe cannot (XOR of two features), both read a linear
label; this is what lets the probe table tell a VPG limit from a training limit."""

import torch

from shards.demo_probe import probe


def _xor(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (n, 2), generator=g).float()
    noisy = x + 0.1 * torch.randn(n, 2, generator=g)
    return noisy, (x[:, 0] != x[:, 1]).long(), x[:, 0].long()


def test_the_mlp_probe_reads_xor_and_the_linear_one_does_not():
    xtr, xor_tr, first_tr = _xor(400, 0)
    xva, xor_va, first_va = _xor(200, 1)
    torch.manual_seed(0)
    assert probe(xtr, xor_tr, xva, xor_va, 2) < 0.7
    assert probe(xtr, xor_tr, xva, xor_va, 2, hidden=32) > 0.95
    assert probe(xtr, first_tr, xva, first_va, 2) > 0.95


def test_an_unknown_qtype_exits_2_naming_it_before_any_vpg_is_built(tmp_path, capsys):
    import pytest

    from shards.demo_probe import main

    with pytest.raises(SystemExit) as e:
        main(["--qtypes", "color,colour", "--tiny-dir", str(tmp_path / "tiny")])
    assert e.value.code == 2 and "colour" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()
