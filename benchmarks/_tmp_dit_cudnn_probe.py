# temporary probe (deleted after use)
import sys, warnings
from dataclasses import replace
import torch
import torch.nn.functional as F
warnings.filterwarnings("ignore")
import models.attention as A
from models.config import preset
from models.dit import WorldDiT
variant = sys.argv[1]
if variant == "contig":
    orig = F.scaled_dot_product_attention
    A.F = type("F", (), {"scaled_dot_product_attention": staticmethod(lambda q, k, v, **kw: orig(q.contiguous(), k.contiguous(), v.contiguous(), **kw))})
cfg = replace(preset("small"), attn_backend="sdpa", camera=variant != "nocam", text_dim=0 if variant == "notext" else 768)
m = WorldDiT(cfg).cuda()
T, H, W = int(sys.argv[2]), 30, 52
x = torch.randn(1, 16, T, H, W, device="cuda")
kw = dict(text=torch.randn(1, 256, 768, device="cuda")) if variant != "notext" else {}
w2c = torch.eye(4, device="cuda").expand(1, T, 4, 4)
K = torch.eye(3, device="cuda").expand(1, T, 3, 3)
try:
    for it in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x, torch.rand(1, T, device="cuda"), w2c=w2c, K=K, chunk_size=int(sys.argv[3]) or None, **kw)
        y.float().square().mean().backward()
        torch.cuda.synchronize()
    print(variant, sys.argv[2:], "ok", all(torch.isfinite(p.grad).all().item() for p in m.parameters() if p.grad is not None))
except Exception as e:
    print(variant, sys.argv[2:], "FAIL", str(e)[:90])
