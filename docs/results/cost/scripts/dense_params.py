"""Dense (non-embedding) parameter counts of the demo model and the two larger dense parts:
    .venv/bin/python docs/results/cost/scripts/dense_params.py   (from the repository root)"""
import sys; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[4]))
import torch
from launch.config import load_config
from trainer.build import build_train_module
sets = {"demo": [], "x4": ["model.dense_arch=[128,16]", "model.shared_arch=[256,64]", "model.head_arch=[64]", "model.cross_low_rank=32"],
        "x16": ["model.dense_arch=[512,16]", "model.shared_arch=[768,128]", "model.head_arch=[128]", "model.cross_low_rank=64", "model.cross_layers=3"]}
for k, v in sets.items():
    cfg = load_config("launch/configs/demo.toml", v)
    m = build_train_module(cfg.data, cfg.model, cfg.balancer, torch.device("cpu"))
    n = sum(p.numel() for name, p in m.named_parameters() if "ebc" not in name and "carrier" not in name)
    print(k, n)
