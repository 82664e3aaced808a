import pytest

from launch.config import ConfigError, RunConfig, dump_toml, load_config

DEMO = "launch/configs/demo.toml"


def test_demo_config_parses_into_typed_sections():
    cfg = load_config(DEMO)
    assert isinstance(cfg, RunConfig)
    assert [t.name for t in cfg.data.tasks] == ["ctr", "cvr", "conv"]
    assert cfg.data.sparse[0].column == "user_id" and cfg.data.sparse[0].num_embeddings == 20_000
    assert cfg.balancer.method == "multibalance" and cfg.balancer.multibalance.beta == 1.0


def test_overrides_are_typed():
    cfg = load_config(DEMO, ["balancer.multibalance.beta=5", "trainer.max_steps=7",
                             "balancer.method=equal", "model.shared_arch=[8, 4]"])
    assert cfg.balancer.multibalance.beta == 5.0 and isinstance(cfg.balancer.multibalance.beta, float)
    assert cfg.trainer.max_steps == 7 and cfg.balancer.method == "equal"
    assert cfg.model.shared_arch == [8, 4]


@pytest.mark.parametrize("override,match", [
    ("trainer.max_stepz=3", "unknown config key.*trainer.max_stepz"),
    ("trainer.max_steps=many", "trainer.max_steps: expected int"),
    ("balancer.method=magic", "balancer.method 'magic' unknown"),
])
def test_bad_overrides_are_named(override, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        load_config(DEMO, [override])


def test_dump_round_trips(tmp_path):
    cfg = load_config(DEMO, ["balancer.fixed.weights=[1.0, 2.0, 3.0]"])
    p = tmp_path / "c.toml"
    p.write_text(dump_toml(cfg))
    assert load_config(p) == cfg


def test_every_shipped_config_parses():
    from pathlib import Path
    for path in Path("launch/configs").glob("*.toml"):
        load_config(path)


def test_component_passes_max_restarts_and_the_port_to_torchrun():
    from torchx import specs
    from launch.components import bench, compare, predict, train, with_agent
    args = " ".join(train(j="2x4", max_restarts=3).roles[0].args)
    assert "python -m launch.agent --max_restarts 3 " in args and "--nnodes 2" in args and ":29500" in args
    assert "--rdzv_endpoint localhost:0 " in " ".join(train(j="1x2").roles[0].args)  # a free port by default
    for app in (train(j="1x2", rdzv_port=29611), predict(j="1x2", rdzv_port=29611), compare(j="1x2", rdzv_port=29611),
                bench(j="1x2", rdzv_port=29611)):
        assert "--rdzv_endpoint localhost:29611 " in " ".join(app.roles[0].args), app.roles[0].args
    assert ":29611" in " ".join(train(j="2x2", rdzv_port=29611).roles[0].args)
    bare = specs.AppDef("x", roles=[specs.Role("r", image="i", entrypoint="python", args=["-m", "x"])])
    with pytest.raises(ValueError, match="--max_restarts"):
        with_agent(bare, 1)


def test_bench_overrides_reach_the_worker_as_tokens_torchx_accepts():
    """torchx refuses an option repeated among a component's arguments (`--set a --set b`): the
    bench passes each override as one `--set=...` token, which the worker parses back."""
    from collections import Counter

    from launch.cli import build_parser, set_tokens
    sets = ["model.dense_arch=[128,16]", "model.head_arch=[64]", "model.head_arch=[64]"]
    tokens = set_tokens(sets)
    assert max(Counter(tokens).values()) == 1
    args = build_parser().parse_args(["bench-worker", "launch/configs/demo.toml", *tokens])
    assert args.set == ["model.dense_arch=[128,16]", "model.head_arch=[64]"]


def test_every_launching_command_takes_a_port(monkeypatch):
    """`--port` reaches torchx as the component's rdzv_port, for every command that launches."""
    import launch.cli as cli
    import launch.demo as demo
    seen = []
    monkeypatch.setattr(cli, "launch", lambda *a, **kw: seen.append(kw.get("port")) or 1)
    monkeypatch.setattr(demo, "launch", lambda *a, **kw: seen.append(kw.get("port")) or 1)
    monkeypatch.setattr(demo, "ensure_dataset", lambda *_: None)
    for argv in (["launch", "launch/configs/demo.toml"], ["predict", "launch/configs/demo.toml", "--from", "r",
                 "--data", "d", "--out", "o", "-j", "1x2"], ["bench", "launch/configs/demo.toml"], ["demo"]):
        args = cli.build_parser().parse_args([*argv, "--port", "29611"])
        args.fn(args)
    assert seen == [29611] * 4
    from launch.jobs import launch
    import subprocess
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    launch("launch/configs/demo.toml", [], "local_cwd", "1x2", port=29611)
    assert calls[0][calls[0].index("--rdzv_port") + 1] == "29611"
