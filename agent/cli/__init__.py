"""`tdn`: the one command line of TinyDefectNet Line; each subcommand's --help explains it."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from agent.config import MODELS_DIR
from agent.errors import TdnError
from agent.lab import default_data

DELEGATED = {
    "camera": ("simulators.camera", "camera simulator: replay NEU-DET (or synthetic surfaces) as PUSH cameras"),
    "plc-bridge": ("simulators.plc_bridge", "PLC bridge simulator: subscribe to verdicts, track gaps, fail safe"),
}


# Subcommands whose module provides add_arguments(parser) and run(args) -> exit code; imported without TensorFlow.
MODULE_COMMANDS = {
    "demo": ("agent.cli.demo", "the demo line: agent + 2 NEU-DET cameras + a PLC bridge, live, then a summary"),
    "bench": ("agent.lab.bench", "benchmarks: model (Table 1 / Figure 4), stream (the line under load)"),
    "audit": ("agent.lab.audit", "explainability audit: Grad-CAM vs NEU-DET defect boxes, decision impact, report"),
    "keygen": ("agent.cli.keygen", "make a CurveZMQ key pair (NAME.key, NAME.key_secret) or a control token file"),
    "health": ("agent.health", "exit 0 when the local agent answers ready on /readyz"),
    "export": ("agent.lab.export", "build LiteRT/OpenVINO artifacts (fp32, bf16, int8) of a model, gated on NEU-DET"),
    "robustness": ("agent.lab.robustness", "accuracy and decisions under line-camera degradations, table + plot"),
    "tune": ("agent.lab.tune", "sweep backend x precision x threads x batch here; write the profile `auto` uses"),
    "thresholds": ("agent.cli.thresholds", "show or change a running agent's decision thresholds (its control socket)"),
    "console": ("agent.console", "operator console: a live web page of the line, explanations and a review queue"),
}




def _quiet_tf() -> None:
    # TensorFlow's C++ start-up chatter drowns the structured log; warnings and errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# --- agent ---


def _agent_parser(sub: Any) -> None:
    from agent.config import AgentSettings, describe

    rows = describe()
    epilog = "settings (flag, environment variable, default):\n" + "\n".join(
        f"  --{env[4:].lower().replace('_', '-'):<22} {env:<26} {default}" for env, default, _ in rows
    )
    p = sub.add_parser(
        "agent",
        help="run the inspection agent (PULL frames, PUB verdicts/explanations/heartbeats)",
        description="Run the agent. Settings come from defaults, then .env, then TDN_* environment variables, "
        "then --config FILE (JSON or KEY=VALUE lines), then flags. All are validated at start-up.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="settings file: JSON object or KEY=VALUE lines")
    for name, f in AgentSettings.model_fields.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, metavar="V", help=f.description)
    p.set_defaults(func=cmd_agent)


def _single_thread_blas() -> None:
    # OpenBLAS's idle threads spin on sched_yield for ~0.1 s after each call, and the agent makes a small matmul
    # (OOD score, CAM) every batch, so they never sleep: perf showed a third of the agent's CPU in sched_yield at
    # 650 frames/s. The backend runs its own thread pool; numpy's matrices here are a few hundred wide. Read when
    # numpy loads, so this runs before anything imports it.
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def cmd_agent(args: argparse.Namespace) -> int:
    _single_thread_blas()
    from agent import config
    from agent.logging import configure, get_logger

    overrides = {k: getattr(args, k) for k in config.AgentSettings.model_fields if getattr(args, k, None) is not None}
    settings = config.load(args.config, **overrides)
    configure(settings.log_level, settings.log_json, native=True)
    log = get_logger("agent")
    _quiet_tf()
    import zmq

    from agent.beacon import Beacon

    ctx: zmq.Context[Any] = zmq.Context.instance()
    try:
        # First, so a bridge hears `starting` within a second of launch, before the imports and the model load.
        beacon = Beacon(settings, ctx)
    except zmq.ZMQError as exc:
        raise TdnError(f"agent failed to start: cannot bind {settings.publish_endpoint}: {exc}") from None
    from agent.backends import from_settings
    from agent.card import read
    from agent.service import Agent

    read(settings.model_path)
    backend = from_settings(settings)
    agent = Agent(settings, backend, beacon, ctx)
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop())
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    try:
        agent.startup()
    except Exception as exc:
        # zmq address-in-use and backend failures are the usual cases; one line, exit 1.
        if isinstance(exc, TdnError):
            raise
        raise TdnError(f"agent failed to start: {type(exc).__name__}: {exc}") from None
    agent.main_loop()
    log.info("exit", code=0)
    return 0


# --- model ---


def _train_parser(sub: Any, load: bool = True) -> None:
    p = sub.add_parser("train", help="train TinyDefectNet on a dataset folder and write the model + model card",
                       description="Layouts: NEU-DET (IMAGES/ + ANNOTATIONS/), NEU-CLS (flat), or one folder per "
                       "class (images at any depth, <stem>.png masks beside <stem>.jpg).")
    if not load:
        return  # another command runs: do not import the trainer just to list its flags
    from agent.lab.model.train import add_arguments

    add_arguments(p, MODELS_DIR)
    p.set_defaults(func=cmd_train)


def _need_data(path: str | None) -> str:
    if not path:
        raise TdnError("no dataset folder: pass --data DIR or set TDN_DATA")
    if not Path(path).is_dir():
        raise TdnError(f"dataset folder {path} not found")
    return path


def cmd_train(args: argparse.Namespace) -> int:
    from agent.lab.model.train import train_command
    from agent.logging import configure

    configure()
    _quiet_tf()
    args.data = _need_data(args.data)
    return train_command(args)


def _display_path(p: str) -> str:
    # Model cards are committed: record the data location relative to the project, not this machine's root.
    try:
        return os.path.relpath(p, Path(__file__).resolve().parent.parent.parent)
    except ValueError:
        return p


def _search_parser(sub: Any) -> None:
    p = sub.add_parser(
        "design-search",
        help="constrained design exploration of the residual prototype (FLOP band, speed floor, NetScore)",
        description="Sample architectures from the residual design prototype; keep those whose FLOPs are within "
        "--tolerance of --flops and whose native-TF throughput is >= --min-speedup x ResNet-50's; train each "
        "briefly; score by NetScore. Every candidate is appended to --log as JSON; re-running resumes.",
    )
    p.add_argument("--data", default=default_data())
    p.add_argument("--log", type=Path, default=MODELS_DIR / "design_search.jsonl")
    p.add_argument("--budget-minutes", type=float, default=30.0)
    p.add_argument("--epochs", type=int, default=8, help="training epochs per candidate")
    p.add_argument("--flops", type=float, default=100e6, help="FLOP target of the indicator function")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--max-params", type=int, default=430_000)
    p.add_argument("--min-speedup", type=float, default=45.0, help="throughput floor vs ResNet-50, same host")
    p.add_argument("--finalists", type=int, default=3, help="retrain this many best screened candidates longer")
    p.add_argument("--finalist-epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    from agent.lab.model.search import run_finalists, run_search
    from agent.logging import configure

    configure()
    _quiet_tf()
    data = _need_data(args.data)
    winner = run_search(data, args.log, args.budget_minutes, args.epochs, args.seed,
                        args.flops, args.tolerance, args.max_params, args.min_speedup)
    if args.finalists > 0:
        winner = run_finalists(data, args.log, args.finalists, args.finalist_epochs, args.seed)
    if winner is None:
        print("no candidate was trained within the budget")
        return 1
    print(f"winner: NetScore {winner['netscore']}, val accuracy {winner['val_accuracy']:.4f}, "
          f"params {winner['params']:,}, FLOPs {winner['flops'] / 1e6:.1f}M, "
          f"{winner.get('speedup_vs_resnet50')}x ResNet-50")
    return 0


# --- entry point ---


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; module commands are imported only when `command` names them (None: all of them).

    So `tdn agent` never imports the lab (OpenCV, matplotlib, TensorFlow) just to build its own arguments.
    """
    parser = argparse.ArgumentParser(
        prog="tdn",
        description="TinyDefectNet Line: streaming steel-surface inspection over ZeroMQ.",
        epilog="also: "
        + "; ".join(f"tdn {name} --help ({text})" for name, (_, text) in DELEGATED.items()),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    _agent_parser(sub)
    _train_parser(sub, load=command in (None, "train"))
    _search_parser(sub)
    import importlib

    for name, (module_name, text) in MODULE_COMMANDS.items():
        if command not in (None, name):
            sub.add_parser(name, help=text)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=text, description=(module.__doc__ or text).strip())
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in DELEGATED:
            import importlib

            module = importlib.import_module(DELEGATED[argv[0]][0])
            return int(module.main(argv[1:]) or 0)
        command = next((a for a in argv if not a.startswith("-")), None)
        parser = build_parser(command if command in MODULE_COMMANDS or command in ("agent", "train") else None)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except TdnError as exc:
        print(f"tdn: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
