"""`mbrec` command line.

    mbrec synth  CONFIG                 write the synthetic dataset of [synth]
    mbrec train  CONFIG                 train in this process (a rank under torchrun/torchx)
    mbrec launch CONFIG -s local_cwd -j 1x2   train through torchx
    mbrec export RUN --out DIR [--dtype int8] [--layout single|sharded]   a serving artifact
    mbrec predict CONFIG --from RUN --data PATHS --out URI [--keep COLS] [-j 1x2]   batch scoring
    mbrec demo   [CONFIG]               synth + equal weights and MultiBalance runs + report
    mbrec report RUN_DIR...             results table, report.md and plots of finished runs
    mbrec validate CONFIG               scan every row group of the data once, report every error
    mbrec schema PATH...                draft a [data] section from Parquet logs (footers + a sample)
    mbrec plan CONFIG --nodes N --gpus-per-node G   sharding plan and memory per GPU, simulated
    mbrec bench-scale CONFIG --rows 100000,1000000 -j 1x2   time and memory of the model-state paths

Every command takes `--set section.key=value` overrides (TOML values; bare words are strings).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from launch.quiet import silence_benign

silence_benign()  # before the imports below: fbgemm logs a known-benign warning when imported

from launch.config import load_config  # noqa: E402
from launch.failures import USER_ERRORS, FileOnly, run_rank, said_by_rank0  # noqa: E402
from launch.jobs import launch  # noqa: E402
from trainer.errors import RunError  # noqa: E402

log = logging.getLogger("mbrec")
DEMO_CONFIG = "launch/configs/demo.toml"


PROJECT_LOGGERS = ("mbrec", "trainer", "data", "launch", "balancing", "models")
LOG_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"


def _setup_logging() -> None:
    """Library loggers at WARNING; this project's at INFO on rank 0's console (WARNING on the
    others'; every rank's file has INFO, see `_log_to_file`); Python warnings through logging;
    known-benign library warnings silenced (launch.quiet). `force`: an import may already have
    configured the root logger, which would make this a no-op."""
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.WARNING, force=True, format=LOG_FORMAT.format(rank=rank))
    logging.root.handlers[0].setLevel(logging.INFO if rank == "0" else logging.WARNING)
    logging.root.handlers[0].addFilter(FileOnly())
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    logging.captureWarnings(True)
    silence_benign()


def _log_to_file(out_dir: str) -> Path:
    """Each rank's log in the run directory (torchx's local scheduler deletes its own on exit);
    a restarted attempt appends to it."""
    rank = os.environ.get("RANK", "0")
    path = Path(out_dir) / "logs" / f"rank{rank}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    except OSError as e:
        raise RunError(f"trainer.out_dir {out_dir} is not writable (its log file {path}): {e}") from e
    handler.setFormatter(logging.Formatter(LOG_FORMAT.format(rank=rank)))
    logging.root.addHandler(handler)
    global _LOGS
    _LOGS = path.parent
    return path.parent


_LOGS: Optional[Path] = None  # this rank's logs/ folder, once the run's out_dir is known


def cmd_synth(args) -> int:
    from data.synth import write_dataset
    write_dataset(load_config(args.config, args.set).synth)
    return 0


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.set)
    logs = _log_to_file(cfg.trainer.out_dir)

    def fn():
        from trainer.loop import train  # (imported here: a restart that is not run need not load torch)
        return train(cfg)
    return run_rank(fn, logs, cfg.trainer.pg_timeout_s)


def cmd_launch(args) -> int:
    extra = (["--gpu", str(args.gpu)] if args.gpu else []) + ["--max_restarts", str(args.max_restarts)]
    return launch(args.config, args.set, args.scheduler, args.j, args.scheduler_args, extra, port=args.port)


def cmd_predict(args) -> int:
    """In this process (a rank under torchrun), or through torchx with -j."""
    if args.j:
        extra = ["--source", args.source, "--out", args.out, "--data", ",".join(args.data),
                 "--keep", ",".join(args.keep), "--gpu", str(args.gpu)]
        return launch(args.config, args.set, args.scheduler, args.j, None, extra, component_fn="predict",
                      port=args.port)
    from trainer.serving.predict import predict
    cfg = load_config(args.config, args.set)
    predict(cfg, args.source, args.data, args.out, args.keep)
    return 0


def cmd_export(args) -> int:
    from trainer.serving.export import export
    manifest = export(args.source, args.out, args.dtype, args.layout)
    print(json.dumps({k: manifest[k] for k in ("checkpoint", "step", "layout", "embedding_dtype", "bytes")}))
    return 0


def cmd_demo(args) -> int:
    from launch.demo import run_demo
    return run_demo(args.config, args.set, args.j, port=args.port)


def cmd_compare(args) -> int:
    from launch.compare import ALL_METHODS, plan, write_compare_report
    from launch.demo import ensure_dataset
    out = Path(args.out)
    methods = args.methods.split(",") if args.methods else ALL_METHODS
    if "equal" not in methods:
        methods = ["equal"] + methods
    overrides = list(args.set) + ([f"trainer.max_steps={args.steps}"] if args.steps else [])
    if args.synth and _has_section(args.config, "synth"):  # a config without [synth] brings its own data
        ensure_dataset(load_config(args.config, overrides).synth)
    entries = plan(args.config, overrides, methods, [float(b) for b in args.betas.split(",") if b],
                   args.seeds, not args.no_single_task, out, tuple(args.beta_steps.split(",")))
    log.info("compare: %d runs (%s), %s", len(entries), ", ".join(dict.fromkeys(e[0] for e in entries)),
             f"{args.steps} steps each" if args.steps else "the config's epochs / max_steps")
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / "plan.json"
    plan_file.write_text(json.dumps(entries, indent=1))
    from launch.demo import default_j
    rc = launch(args.config, [], args.scheduler, args.j or default_j(), component_fn="compare", port=args.port,
                extra=["--plan", str(plan_file)])
    if rc != 0:
        log.error("the compare job failed (exit status %d); no report written", rc)
        return rc
    write_compare_report(out)
    return 0


def _has_section(config: str, name: str) -> bool:
    import tomllib
    with open(config, "rb") as f:
        return name in tomllib.load(f)


def _beta_steps(text: str) -> str:
    """--beta-steps: "paper", "capped" or both, comma-separated ("paper+capped" also reads as both)."""
    steps = text.replace("+", ",").split(",")
    if not steps or any(s not in ("paper", "capped") for s in steps) or len(set(steps)) != len(steps):
        raise argparse.ArgumentTypeError(f"expected paper, capped or paper,capped; got {text!r}")
    return ",".join(steps)


def cmd_compare_worker(args) -> int:
    from launch.compare import run_plan
    return run_plan(args.config, args.plan)


def _bench_args(args) -> List[str]:
    out = ["--variants", args.variants, "--rounds", str(args.rounds), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--rebuilds", str(args.rebuilds), "--out", args.out]
    flags = (("--parquet", args.parquet), ("--one-at-a-time", args.one_at_a_time), ("--breakdown", args.breakdown),
             ("--no-pin", not args.pin))
    return out + [flag for flag, on in flags if on]


def set_tokens(overrides: List[str]) -> List[str]:
    """Overrides for a worker's command line as one `--set=...` token each: torchx refuses an
    option repeated in a component's arguments (`--set a --set b`), not distinct tokens."""
    return [f"--set={o}" for o in dict.fromkeys(overrides)]


def cmd_bench(args) -> int:
    """Launches `bench-worker` on -j NxP ranks through torchx; the table is printed by rank 0."""
    rc = launch(args.config, args.set, args.scheduler, args.j, component_fn="bench", port=args.port,
                extra=["--gpu", str(args.gpu), "--"] + _bench_args(args) + set_tokens(args.set),
                pass_overrides=False)
    if rc == 0 and Path(args.out).is_file():
        from trainer.tools.bench import format_table
        from trainer.tools.breakdown import format_breakdown
        result = json.loads(Path(args.out).read_text())
        print(format_breakdown(result["variants"]) if args.breakdown else format_table(result))
    return rc


def cmd_bench_worker(args) -> int:
    from trainer.tools.bench import BenchConfig, format_table, run_bench, write_result
    from trainer.build import init_distributed
    cfg = load_config(args.config, args.set)
    bench = BenchConfig(variants=args.variants.split(","), rounds=args.rounds, steps=args.steps,
                        warmup_steps=args.warmup, parquet=args.parquet, one_at_a_time=args.one_at_a_time,
                        pin=args.pin, rebuilds=args.rebuilds)
    env = init_distributed(cfg.trainer.pg_timeout_s, cfg.trainer.device)
    if args.breakdown:
        return _breakdown_worker(cfg, bench, env, args.out)
    result = run_bench(cfg, bench, env)
    if env.is_main:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_result(result, args.out)
        print(format_table(result), flush=True)
    return 0


def _breakdown_worker(cfg, bench, env, out: str) -> int:
    from trainer.tools.bench import write_result
    from trainer.tools.breakdown import format_breakdown, run_breakdown
    rows = run_breakdown(cfg, bench.variants, bench.steps or 300, bench.warmup_steps, env)
    if env.is_main:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_result({"kind": "breakdown", "rank": env.rank, "world_size": env.world_size,
                      "tasks": len(cfg.data.tasks), "variants": rows}, out)
        print(format_breakdown(rows), flush=True)
    return 0


def cmd_bench_data(args) -> int:
    from data.bench import format_table, run, strings_copy
    cfg = load_config(args.config, args.set)
    data = strings_copy(cfg.data, args.as_strings) if args.as_strings else cfg.data
    result = run(data, args.workers, args.rounds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(format_table(result))
    return 0


def _scale_args(args) -> List[str]:
    return ["--tables", str(args.tables), "--dim", str(args.dim), "--batch", str(args.batch),
            "--steps", str(args.steps), "--out", args.out]


def cmd_bench_scale(args) -> int:
    """One job per table size (`bench-scale-worker` on -j NxP ranks); the tables of every size."""
    from trainer.tools.scale import format_table, write_result
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        rc = launch(args.config, args.set, args.scheduler, args.j, component_fn="bench", port=args.port,
                    extra=["--worker", "bench-scale-worker", "--gpu", str(args.gpu), "--", "--rows", str(rows)]
                    + _scale_args(args) + set_tokens(args.set), pass_overrides=False)
        if rc != 0:
            return rc
        ranks = [json.loads(p.read_text()) for p in sorted((Path(args.out) / str(rows)).glob("rank*.json"))]
        results.append({"rows": rows, "tables": args.tables, "dim": args.dim, "batch": args.batch, "ranks": ranks})
    write_result({"results": results}, Path(args.out) / "scale.json")
    print(format_table(results))
    return 0


def cmd_bench_scale_worker(args) -> int:
    from trainer.build import init_distributed
    from trainer.tools.scale import run_scale, scale_config, write_result
    cfg = scale_config(load_config(args.config, args.set), args.rows, args.tables, args.dim, args.batch)
    env = init_distributed(cfg.trainer.pg_timeout_s, cfg.trainer.device)
    out = Path(args.out) / str(args.rows)
    result = run_scale(cfg, env, out / "work", args.steps)
    write_result(result, out / f"rank{env.rank}.json")
    if env.is_main:
        shutil.rmtree(out / "work", ignore_errors=True)  # checkpoints and exports: gigabytes
    return 0


def cmd_validate(args) -> int:
    """Scans every row group of data.train and data.eval; exit 2 if any is bad."""
    from data.footers import read_footers
    from data.reader import fit_transforms
    from data.validate import problems, scan
    cfg = load_config(args.config, args.set)
    transforms = fit_transforms(read_footers(cfg.data.train, cfg.data), cfg.data)
    bad = 0
    for split, patterns in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        result = scan(cfg.data, patterns, args.workers, transforms)
        print(f"data.{split}: {result['files']} files, {result['row_groups']} row groups, "
              f"{result['counters']['rows']} rows; counters {json.dumps(result['counters'])}")
        for name, c in result["tasks"].items():
            print(f"  task {name}: {c['labelled']} labelled, {c['positive']} positive")
        for w in problems(result):
            log.warning("data.%s: %s", split, w)
        for err in result["errors"]:
            log.error("%s", err)
        bad += len(result["errors"])
    print(f"{bad} bad row group(s)" if bad else "no errors")
    return 2 if bad else 0


def cmd_schema(args) -> int:
    """Prints a whole config drafted from the files (local paths, URIs, directories, globs): the
    [data] section from the data, the others from the defaults, with an out_dir of its own."""
    from data.draft import draft, run_name
    from launch.config import drafted_sections
    name = run_name(args.paths)
    text = draft(args.paths) + drafted_sections(name)
    print(text, end="")
    taken = Path("runs", name).exists()
    log.info("drafted: trainer.out_dir = runs/%s%s, trainer.epochs = 1 (the default: raise it to train longer); "
             "read the comments, then `mbrec launch CONFIG`", name,
             " (it exists: this config resumes the run there; set another out_dir for a new run)" if taken else "")
    return 0


def cmd_plan(args) -> int:
    """The sharding plan and memory per GPU on a simulated topology (no GPU needed)."""
    from trainer.tools.plan import format_report, simulate
    report = simulate(load_config(args.config, args.set), args.nodes, args.gpus_per_node, args.hbm_gb)
    print(format_report(report, args.nodes, args.gpus_per_node))
    return 0


def cmd_report(args) -> int:
    from launch.report import write_report
    write_report([Path(d) for d in args.runs], Path(args.out))
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except where there is none to show (flags, empty values)."""

    def _get_help_string(self, action):
        if action.help is None or action.nargs == 0 or action.default in (None, "", argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mbrec", description="Multi-task recommendation trainer with MultiBalance")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    helps = {"synth": "write the synthetic dataset of [synth]", "train": "train in this process (one rank)",
             "launch": "train through torchx", "predict": "score Parquet rows with a trained checkpoint",
             "demo": "synth + equal and MultiBalance runs + report",
             "compare": "every balancing method + single-task models, paired over seeds",
             "bench": "training QPS of the variants", "plan": "sharding plan and memory per GPU, simulated",
             "validate": "decode every row group once; list every error",
             "bench-data": "reader rows/s next to pyarrow's decode",
             "bench-scale": "save, resume, predict and export: time and memory at growing table sizes"}

    def add(name: str, fn, config_required: bool = True):
        # internal commands (the workers torchx starts) get no help line: not listed
        kw = {"help": helps[name]} if name in helps else {}
        sp = sub.add_parser(name, formatter_class=_Help, **kw)
        if config_required:
            sp.add_argument("config")
        else:
            sp.add_argument("config", nargs="?", default=DEMO_CONFIG)
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
        sp.set_defaults(fn=fn)
        return sp

    def add_launcher(sp, j: Optional[str] = "1x2") -> None:
        sp.add_argument("-s", "--scheduler", default="local_cwd", help="torchx scheduler")
        sp.add_argument("-j", default=j, help="NNODESxNPROC_PER_NODE" + ("" if j else " (default: 1x2, or 1xGPUs up to 2)"))
        add_port(sp)

    def add_port(sp) -> None:
        sp.add_argument("--port", type=int, default=0, help="rendezvous port (0: a free port on a single node, "
                        "29500 on the first node across nodes)")

    add("synth", cmd_synth)
    add("train", cmd_train)
    sp = add("launch", cmd_launch)
    add_launcher(sp)
    sp.add_argument("--gpu", type=int, default=0, help="GPUs per node")
    sp.add_argument("--scheduler-args", default=None, help="torchx -cfg string, e.g. partition=gpu")
    sp.add_argument("--max-restarts", type=int, default=2,
                    help="torchrun restarts of all ranks after one fails; each resumes from the last checkpoint")
    sp = add("predict", cmd_predict)
    sp.add_argument("--from", dest="source", required=True,
                    help="a run directory, checkpoint directory or step-N checkpoint (path or URI)")
    sp.add_argument("--data", nargs="+", required=True, help="Parquet files, directories, globs or URIs")
    sp.add_argument("--out", required=True, help="output directory or URI (part-R.parquet per rank)")
    sp.add_argument("--keep", nargs="*", default=[], help="input columns copied beside the predictions")
    sp.add_argument("-s", "--scheduler", default="local_cwd", help="torchx scheduler (with -j)")
    sp.add_argument("-j", default=None, help="NNODESxNPROC_PER_NODE through torchx (default: this process)")
    sp.add_argument("--gpu", type=int, default=0, help="GPUs per node (with -j)")
    add_port(sp)
    sp = sub.add_parser("export", help="a TorchScript serving artifact of a trained checkpoint",
                        formatter_class=_Help)
    sp.add_argument("source", help="a run directory, checkpoint directory or step-N checkpoint (path or URI)")
    sp.add_argument("--out", required=True, help="the artifact's directory")
    sp.add_argument("--dtype", default="int8", choices=["int8", "fp16", "fp32"], help="embedding tables' dtype")
    sp.add_argument("--layout", default="single", choices=["single", "sharded"],
                    help="single: one TorchScript file (the model must fit one host's memory); sharded: the dense "
                         "part as TorchScript and each table as row-range shards (docs/serving.md)")
    sp.set_defaults(fn=cmd_export)
    sp = add("demo", cmd_demo, config_required=False)
    sp.add_argument("-j", default=None, help="NNODESxNPROC_PER_NODE (default: 1x2, or 1xGPUs up to 2)")
    add_port(sp)
    sp = add("compare", cmd_compare, config_required=False)
    add_launcher(sp, j=None)
    sp.add_argument("--methods", default="", help="comma-separated (default: all)")
    sp.add_argument("--seeds", type=int, default=3, help="paired seeds: each seed, every method")
    sp.add_argument("--betas", default="", help="extra MultiBalance variants at these betas, e.g. 0.5,2,5")
    sp.add_argument("--beta-steps", default="paper", type=_beta_steps, metavar="{paper,capped,paper+capped}",
                    help="the beta variants' step rule: the paper's update, the capped (stable) one, or both")
    sp.add_argument("--steps", type=int, default=0, help="training steps per run (0: the config's epochs)")
    sp.add_argument("--no-single-task", action="store_true", help="skip the single-task models")
    sp.add_argument("--no-synth", dest="synth", action="store_false",
                    help="do not generate the dataset (only done for a config with [synth])")
    sp.add_argument("--out", default="runs/compare")
    add("compare-worker", cmd_compare_worker).add_argument("--plan", required=True)
    for name, fn in (("bench", cmd_bench), ("bench-worker", cmd_bench_worker)):
        sp = add(name, fn)
        sp.add_argument("--variants", default="equal,multibalance,param_mgda,dlrm_dcn")
        sp.add_argument("--rounds", type=int, default=0, help="rounds (>= 8 for an interval; the table says how "
                        "many an interval of +-1 %% needs); default 200 on a CPU, 30 on a GPU, 5 with one variant built at a time")
        sp.add_argument("--steps", type=int, default=0, help="timed steps per variant per round; default 2 (short "
                        "rounds pair the variants closely in time) on a CPU, 20 on a GPU, 50 with one variant built at a time")
        sp.add_argument("--warmup", type=int, default=10, help="steps before a variant's first round")
        sp.add_argument("--rebuilds", type=int, default=1, help="build the variants anew this many times over the "
                        "rounds: averages over builds' memory layouts, which move an identical variant by ~1 %%")
        sp.add_argument("--no-pin", dest="pin", action="store_false",
                        help="CPU: leave the ranks' threads where the OS puts them")
        sp.add_argument("--parquet", action="store_true", help="read the config's train files")
        sp.add_argument("--one-at-a-time", action="store_true", help="build one variant at a time (GPU memory)")
        sp.add_argument("--breakdown", action="store_true",
                        help="profile one step of each variant instead: where its time goes (trainer/tools/breakdown.py)")
        sp.add_argument("--out", default="runs/bench/bench.json")
        if name == "bench":
            add_launcher(sp)
            sp.add_argument("--gpu", type=int, default=0, help="GPUs per node")
    for name, fn in (("bench-scale", cmd_bench_scale), ("bench-scale-worker", cmd_bench_scale_worker)):
        sp = add(name, fn)
        if name == "bench-scale":
            add_launcher(sp)
            sp.add_argument("--gpu", type=int, default=0, help="GPUs per node")
            sp.add_argument("--rows", default="100000,500000,1000000", help="rows per table, one job per size")
        else:
            sp.add_argument("--rows", type=int, required=True)
        sp.add_argument("--tables", type=int, default=26)
        sp.add_argument("--dim", type=int, default=64)
        sp.add_argument("--batch", type=int, default=4096, help="rows per rank and step")
        sp.add_argument("--steps", type=int, default=5, help="steady steps timed")
        sp.add_argument("--out", default="runs/bench/scale")
    sp = add("plan", cmd_plan)
    sp.add_argument("--nodes", type=int, default=1)
    sp.add_argument("--gpus-per-node", type=int, default=8)
    sp.add_argument("--hbm-gb", type=float, default=80.0, help="memory per GPU")
    sp = add("validate", cmd_validate)
    sp.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel decoding processes")
    sp = add("bench-data", cmd_bench_data)
    sp.add_argument("--workers", type=int, default=2, help="also time the reader with this many workers")
    sp.add_argument("--rounds", type=int, default=2)
    sp.add_argument("--out", default="runs/bench/bench_data.json")
    sp.add_argument("--as-strings", metavar="DIR", default="",
                    help="measure a copy of the training files (written to DIR) whose ids are strings")
    sp = sub.add_parser("schema", help="draft a [data] section from Parquet logs",
                        formatter_class=_Help)
    sp.add_argument("paths", nargs="+", help="files, directories, globs or URIs (s3://...)")
    sp.set_defaults(fn=cmd_schema)
    sp = sub.add_parser("report", help="tables, report.md and plots of finished runs",
                        formatter_class=_Help)
    sp.add_argument("runs", nargs="+")
    sp.add_argument("--out", default="runs/report")
    sp.set_defaults(fn=cmd_report)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except USER_ERRORS as e:
        # bad config, input or state: the message's first line says what and names the key, file or
        # column; details follow, a line each. Printed by one rank where every rank met it.
        log.error("%s", e, extra={"file_only": said_by_rank0(_LOGS, e)})
        return 2


if __name__ == "__main__":
    sys.exit(main())
