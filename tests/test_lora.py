"""LoRA: adapters train alone, merged weights reproduce the adapter model, adapters round-trip."""

import torch

from models.config import preset
from models.dit import WorldDiT
from train.lora import LoraConfig, adapter_state, apply_lora, load_adapter, merge_lora_state, save_adapter


def _inputs(cfg, g):
    B, T, h, w = 1, 4, 3, 3
    x = torch.randn(B, cfg.latent_channels, T, h, w, generator=g)
    return x, dict(
        sigma=torch.rand(B, T, generator=g),
        actions=torch.randint(0, 81, (B, T), generator=g),
        w2c=torch.eye(4).expand(B, T, 4, 4),
        K=torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1]]).expand(B, T, 3, 3),
        image_latent=x[:, :, 0],
        cond_mask=torch.arange(T)[None] == 0,
        chunk_size=2,
    )


def test_merged_equals_adapter_and_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.text_dim = 0
    net = WorldDiT(cfg)
    with torch.no_grad():  # zero-initialised output/gate layers would hide every difference
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = apply_lora(net, LoraConfig(enabled=True, rank=4, alpha=8.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # B starts at zero: make the adapters do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    x, kw = _inputs(cfg, g)
    with torch.no_grad():
        out_adapter = model(x, **kw)
        merged = WorldDiT(cfg)
        merged.load_state_dict(merge_lora_state(model.state_dict(), LoraConfig(rank=4, alpha=8.0)), strict=True)
        out_merged = merged(x, **kw)
        base = WorldDiT(cfg)
        base.load_state_dict(merge_lora_state({k: v for k, v in model.state_dict().items() if "lora_B" not in k and "lora_A" not in k}, LoraConfig()), strict=True)
        out_base = base(x, **kw)
    assert torch.allclose(out_adapter, out_merged, atol=1e-5)
    assert not torch.allclose(out_adapter, out_base, atol=1e-4)  # the adapters matter
    save_adapter(model.state_dict(), LoraConfig(rank=4, alpha=8.0), tmp_path / "adapter")
    again = load_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(again(x, **kw), out_adapter, atol=1e-6)
    assert set(adapter_state(again.state_dict())) == set(adapter_state(model.state_dict()))
