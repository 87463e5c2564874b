"""The ``green-mlops`` command line. Every error ends in one line and a documented exit code:

0 done · 1 a gate or claim failed · 2 bad input (arguments, model directory, configuration,
records, an unreachable or missing backend: the line says what to fix) · 3 an internal error (the
line names a log file holding the traceback) · 130 interrupted (Ctrl-C or SIGTERM).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from datetime import UTC, datetime
from pathlib import Path

from rich.text import Text

from green_mlops.run_setup import (EXIT_GATE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE,
                                   make_default_controller, make_results_dir, open_energy, stderr, stdout)
from loadtests.capacity import AUTO_RATE
from targets.errors import GreenMLOpsError

DEFAULT_REPEATS = 3  # validate's load-stage replicates: the job takes about 2 min 15 s here (see the README)

def error_line(message: str) -> None:
    """One line on stderr: ``error: message``, the prefix in red, the message verbatim."""
    stderr.print(Text.assemble(("error: ", "red"), message), soft_wrap=True)


def log_dir() -> Path:
    """Where internal errors leave their traceback: $GREEN_MLOPS_LOG_DIR or ~/.cache/green-mlops/logs."""
    return Path(os.environ.get("GREEN_MLOPS_LOG_DIR") or Path.home() / ".cache" / "green-mlops" / "logs")


def write_traceback(exc: BaseException, argv: list[str]) -> Path:
    """The traceback of ``exc`` in a new log file (the temporary directory if the log directory
    cannot be written); its path."""
    import tempfile

    name = f"error-{datetime.now(UTC):%Y%m%dT%H%M%S}-{os.getpid()}.log"
    text = "green-mlops " + " ".join(argv) + "\n\n" + "".join(traceback.format_exception(exc))
    for directory in (log_dir(), Path(tempfile.gettempdir())):
        try:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / name
            path.write_text(text)
            return path
        except OSError:
            continue
    return Path("(unwritable: no log)")


def _add_controller_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("controller (override the TOML file and the defaults)")
    group.add_argument("--config", type=Path, help="TOML file with a [controller] table")
    group.add_argument("--alpha", type=float, help="weight of (1 − u), default 1.0")
    group.add_argument("--beta", type=float, help="weight of the energy term ê, default 0.25")
    group.add_argument("--gamma", type=float, help="weight of the congestion term ĉ, default 0.5")
    group.add_argument("--tau0", type=float, help="τ at t=0, default α+β+γ (admit all)")
    group.add_argument("--tau-inf", type=float, dest="tau_inf",
                       help="steady τ, default from the model's calibration: α·(1 − u*)")
    group.add_argument("--k", type=float, dest="k_per_s", help="decay rate of τ(t) per second, default 1.0")
    group.add_argument("--uncertainty", choices=("entropy", "least_confidence", "margin"))
    group.add_argument("--skip-action", dest="skip_action", choices=("exit", "cache", "reject"))
    group.add_argument("--capacity", type=int, help="in-flight requests counted as full congestion, default 8")
    group.add_argument("--slo-ms", type=float, dest="slo_ms", help="latency objective for ĉ, default 100")
    group.add_argument("--policy", choices=("paper", "budget"),
                       help="'paper': J ≤ τ(t) alone; 'budget': held inside a certified accuracy budget "
                            "(default: budget, for validate and serve alike, falling back to paper, with a one-line "
                            "reason, when the model's validation split cannot certify one)")
    group.add_argument("--accuracy-budget-pp", type=float, dest="accuracy_budget_pp",
                       help="budget policy: accuracy loss against the full model, default 0.5 pp")
    group.add_argument("--risk", type=float, help="budget policy: δ, the certificate holds with probability "
                                                  "≥ 1 − δ over the validation draw, default 0.1")
    group.add_argument("--slo-p95-ms", type=float, dest="slo_p95_ms",
                       help="budget policy: latency SLO on p95 held by an AIMD loop inside the budget (default off)")
    group.add_argument("--overload-action", dest="overload_action", choices=("reject", "queue"),
                       help="budget policy, SLO unmet at the certified ceiling: 'reject' sheds (503), "
                            "'queue' waits in the gateway's bounded queue; default reject")
    group.add_argument("--spend", choices=("ceiling", "adaptive"),
                       help="budget policy: 'ceiling' rests at the certified ceiling (the most saving the budget "
                            "allows); 'adaptive' rests mid-path and lets congestion, energy and the SLO push it up "
                            "(default: ceiling for validate, adaptive for serve)")
    group.add_argument("--budget-loss", dest="budget_loss", choices=("harm", "net"),
                       help="budget policy: certify the rows harmed ('harm', default) or harmed minus fixed "
                            "('net', the accuracy gap itself)")
    group.add_argument("--budget-path", dest="budget_path", choices=("auto", "per-exit", "shared"),
                       help="budget policy: the certified family: per-exit thresholds screened on a third of the "
                            "validation split, one threshold shared by every exit, or 'auto' (default: per-exit "
                            "when the split is large enough)")
    group.add_argument("--audit-rate", dest="audit_rate", type=float,
                       help="budget policy, gateway: share of requests whose skipped stages the live audit runs "
                            "to check the certificate still applies (default 0.02; 0 with --audit-idle-rate 0: off)")
    group.add_argument("--audit-idle-rate", dest="audit_idle_rate", type=float,
                       help="the audit's share when the request is the only one in flight (default 0.25)")
    group.add_argument("--audit-risk", dest="audit_risk", type=float,
                       help="the live audit's false-alarm probability over a whole run (default 0.01)")


def _add_mlflow_flags(parser: argparse.ArgumentParser) -> None:
    from reports.tracking import DEFAULT_EXPERIMENT, DEFAULT_URI

    group = parser.add_argument_group("experiment tracking (optional extra: green-mlops[mlflow])")
    group.add_argument("--mlflow", nargs="?", const=DEFAULT_URI, metavar="URI",
                       help=f"log the run to MLflow: params, metrics, report, plots, records "
                            f"(URI default {DEFAULT_URI}, a local file store; or sqlite:///…, http://…)")
    group.add_argument("--mlflow-experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment name")


def _add_energy_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("energy")
    group.add_argument("--energy", choices=("auto", "off"), default="auto",
                       help="auto: every source that reads here (NVML, RAPL, CodeCarbon); off: none")
    group.add_argument("--country", default="USA", help="ISO 3166 alpha-3 code for CodeCarbon's CO2 intensity")
    group.add_argument("--region", help="region within the country, for CodeCarbon")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _split_seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _arrival_rate(text: str) -> float | str:
    """``auto`` (sized to this machine before the load stage), 0 (closed loop) or a finite rate > 0."""
    if text.strip().lower() == AUTO_RATE:
        return AUTO_RATE
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be 'auto', 0 (closed loop) or requests per second > 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="green-mlops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="standard vs bio ablation and its verdict")
    validate.add_argument("--model", default="digits", help="embedded model name or model directory")
    validate.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    validate.add_argument("--requests", type=_positive_int,
                          help="cap on measured requests (default: the evaluation set repeated to >= 2000)")
    validate.add_argument("--warmup", type=int, default=200, help="warm-up requests per mode, default 200")
    validate.add_argument("--json", type=Path, dest="json_path", help="write the figures as JSON here")
    validate.add_argument("--gate", action="store_true",
                          help="exit 1 when a claim does not hold or the report is INVALID")
    validate.add_argument("--sweep", action="store_true", help="also measure the τ∞ curve")
    validate.add_argument("--sweep-points", type=_positive_int, default=7)
    validate.add_argument("--results", type=Path,
                          help="where everything goes (default results/<UTC>-validate/)")
    load = validate.add_argument_group("load test (standard and bio under Locust, then the report)")
    load.add_argument("--no-load", action="store_true", help="only the in-process ablation")
    load.add_argument("--load-shape", default="spike", choices=("steady", "ramp", "spike", "wave", "step"))
    load.add_argument("--load-users", type=_positive_int, default=4, help="base users, default 4")
    load.add_argument("--load-phase-s", type=_positive_float,
                      help="phase length, default 5 s (with an auto rate below 40 req/s, stretched like --load-s)")
    load.add_argument("--load-s", type=_positive_int,
                      help="seconds per scenario, default 15; when neither this nor --load-phase-s is given and "
                           "the auto rate is below 40 req/s, both are stretched by 40 / rate (at most 4x), so a "
                           "run on a slower machine keeps about as many requests")
    load.add_argument("--load-arrival-rate", type=_arrival_rate, default=AUTO_RATE,
                      help="open loop: Poisson arrivals per second at base load, scaled by the shape, one seeded "
                           "schedule replayed by both runs. Default auto: measured before the load stage so the "
                           "shape's peak asks for half of what the standard path serves here, at most 40; "
                           "0: closed loop, which decides no claim")
    load.add_argument("--load-seed", type=int, default=0,
                      help="seed of the first replicate's open-loop schedule (times and rows); replicate k uses seed + k − 1")
    load.add_argument("--repeats", type=_positive_int, default=DEFAULT_REPEATS,
                      help=f"replicates of the load stage, each a fresh schedule of the same parameters, the modes "
                           f"in counterbalanced order (standard, bio | bio, standard | …); the latency bound is over "
                           f"the replicates, so it carries run-to-run variation (default {DEFAULT_REPEATS})")
    load.add_argument("--backend", choices=("gateway", "triton"), default="gateway",
                      help="what the load test drives: the gateway (default, one per run) or a Triton server started "
                           "here for the whole stage, standard on <model>_full and bio on <model>_bio (the ladder and "
                           "this controller inside Triton, 'triton repo --bio')")
    load.add_argument("--triton-flavour", choices=("python", "onnxruntime_onnx"), default="python",
                      help="--backend triton: how the graphs run inside Triton (default python: ONNX Runtime in the "
                           "Python backend, what the pytriton server has; onnxruntime_onnx for a full Triton)")
    load.add_argument("--triton-bio-stages", choices=("auto", "bls", "inline"), default="auto",
                      help="--backend triton: how <model>_bio runs the stages (see 'triton repo --bio-stages')")
    load.add_argument("--triton-server", help="--backend triton: the tritonserver binary (default: PATH, $TRITONSERVER, "
                                              "or the pytriton venv of 'green-mlops triton install')")
    load.add_argument("--compare-policies", action="store_true",
                      help="also run bio under the other policy (paper/budget) on the same schedule, "
                           "into bio-<policy>; the report sets the policies side by side")
    _add_energy_flags(validate)
    _add_controller_flags(validate)
    _add_mlflow_flags(validate)

    serve = commands.add_parser("serve", help="the gateway: controlled inference over KServe v2 HTTP")
    serve.add_argument("--model", default="digits", help="embedded model name or model directory")
    serve.add_argument("--controller", choices=("bio", "off"), default="bio")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    serve.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    serve.add_argument("--max-concurrency", type=_positive_int, default=4, help="inference threads")
    serve.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20,
                       help="larger request bodies get 413 (default 1 MiB)")
    serve.add_argument("--max-batch", type=_positive_int, default=256)
    serve.add_argument("--body-timeout-s", type=_positive_float, default=10.0,
                       help="a request body must arrive within this many seconds (else 408), default 10")
    serve.add_argument("--max-queue", type=_positive_int, default=256,
                       help="requests queued or running in the workers; beyond that 503 with Retry-After")
    serve.add_argument("--inline-max-body-bytes", type=_non_negative_int, default=64 << 10,
                       help="answer a request on the event loop, no thread hop, when nothing else is in flight "
                            "and its body is at most this big (default 64 KiB; 0: always the worker threads; "
                            "ONNX Runtime only: Triton calls always run in the worker threads)")
    serve.add_argument("--dynamic-batch-rows", type=_positive_int, default=32,
                       help="on a gateway pinned to one CPU (jobs serial on the event loop), requests that queue "
                            "while the model runs share its next run, up to this many rows (default 32; "
                            "1: one request per run)")
    serve.add_argument("--intra-op-threads", type=_positive_int,
                       help="ONNX Runtime intra-op threads per session (default: one per CPU this process may run on)")
    serve.add_argument("--drain-timeout-s", type=float, default=30.0,
                       help="on SIGTERM, how long in-flight requests may take to finish")
    serve.add_argument("--backend", choices=("onnxruntime", "triton"), default="onnxruntime",
                       help="where inference runs: ONNX Runtime in-process (Path A) or a Triton server (Path B)")
    serve.add_argument("--triton-url", default="127.0.0.1:8001",
                       help="Triton HTTP address (default: where 'triton up' listens)")
    serve.add_argument("--triton-metrics-url", help="Triton metrics, e.g. http://127.0.0.1:8002/metrics "
                       "(feeds the controller's congestion signal)")
    serve.add_argument("--triton-timeout-s", type=float, default=5.0, help="per call, default 5 s")
    serve.add_argument("--triton-fallback", action="store_true",
                       help="answer from ONNX Runtime in-process when Triton fails (else 503)")
    serve.add_argument("--energy-window-s", type=float, default=1.0,
                       help="energy window feeding the controller's ê, in seconds")
    serve.add_argument("--results", type=Path, help="directory for the energy windows (windows.jsonl)")
    _add_energy_flags(serve)
    _add_controller_flags(serve)

    triton = commands.add_parser("triton", help="Path B: Triton model repository and server")
    triton_commands = triton.add_subparsers(dest="triton_command", required=True)
    repo = triton_commands.add_parser("repo", help="write a Triton model repository for a model")
    repo.add_argument("--model", default="digits", help="embedded model name or model directory")
    repo.add_argument("--out", type=Path, required=True, help="repository directory")
    repo.add_argument("--flavour", choices=("onnxruntime_onnx", "python"), default="onnxruntime_onnx")
    repo.add_argument("--max-batch-size", type=_positive_int, default=64)
    repo.add_argument("--preferred-batch-sizes", default="4,8,16", help="comma-separated")
    repo.add_argument("--max-queue-delay-us", type=int, default=500)
    repo.add_argument("--instance-kind", choices=("cpu", "gpu"), default="cpu")
    repo.add_argument("--instance-count", type=_positive_int, default=1)
    repo.add_argument("--bio", action="store_true",
                      help="also write <model>_bio: the ladder and its controller inside Triton (Python backend, "
                           "BLS), with the thresholds certified here on the validation split (as 'serve' would)")
    repo.add_argument("--bio-instance-count", type=_positive_int, default=1,
                      help="instances of <model>_bio, each with a controller of its own (default 1)")
    repo.add_argument("--bio-stages", choices=("auto", "bls", "inline"), default="auto",
                      help="how <model>_bio runs the stages: bls sends each sub-batch to the stage's Triton model; "
                           "inline runs the stage graphs with ONNX Runtime inside <model>_bio's own process (no hop "
                           "between models); auto (default): inline for --flavour python, bls for onnxruntime_onnx")
    _add_controller_flags(repo)
    up = triton_commands.add_parser("up", help="start a real Triton server on 127.0.0.1 (Ctrl-C stops it)")
    up.add_argument("--repo", type=Path, required=True)
    up.add_argument("--http-port", type=int, default=8001, help="default 8001 (serve takes 8000)")
    up.add_argument("--metrics-port", type=int, default=8002)
    up.add_argument("--server", help="tritonserver binary (default: PATH, $TRITONSERVER, or the pytriton venv)")
    install = triton_commands.add_parser("install", help="create the server's own venv (nvidia-pytriton)")
    install.add_argument("--venv", type=Path, help="default $GREEN_MLOPS_TRITON_VENV or ~/.cache/green-mlops/triton-venv")

    report = commands.add_parser("report", help="report, verdict and plots from recorded runs")
    report.add_argument("results", type=Path, help="a run directory, or a directory of run directories")
    report.add_argument("--out", type=Path, help="where the report goes (default: RESULTS)")
    report.add_argument("--baseline", type=Path, help="a previous summary.json to compare with")
    report.add_argument("--gate", action="store_true",
                        help="exit 1 unless the report is VALID, every claim held and nothing regressed")
    report.add_argument("--min-duration-s", type=float, default=10.0, help="validity: minimum seconds per run")
    report.add_argument("--min-requests", type=int, default=500, help="validity: minimum answered requests per run")
    _add_mlflow_flags(report)

    models = commands.add_parser("models", help="build the embedded models")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    build = model_commands.add_parser("build", help="train and export a model (needs the 'models' extra)")
    build.add_argument("name", nargs="?", default="digits", choices=("digits", "reviews"))
    build.add_argument("--out", type=Path,
                       help="output directory (default: digits in the package; reviews in $GREEN_MLOPS_MODELS "
                            "or ~/.cache/green-mlops/models)")
    build.add_argument("--samples", type=_positive_int, help="reviews: cap the data (a quick, smaller build)")
    build.add_argument("--max-length", type=_positive_int, default=64, help="reviews: at most this many tokens per snippet")
    build.add_argument("--epochs", type=_positive_int, default=4, help="reviews: fine-tuning epochs")
    build.add_argument("--split-seed", type=_split_seed, dest="split_seed",
                       help="seed that draws the held-out, validation and training rows, apart from the training "
                            "seed (default: the builder's SPLIT_SEED); model.json → split records it and a digest "
                            "of the held-out rows")

    ladder = commands.add_parser("ladder", help="your own model: a checkpoint and labelled data to an early-exit ladder")
    ladder_commands = ladder.add_subparsers(dest="ladder_command", required=True)
    lbuild = ladder_commands.add_parser(
        "build", help="cut a local Hugging Face encoder checkpoint into a validated early-exit model directory "
                      "(needs the 'models' extra)")
    lbuild.add_argument("--checkpoint", type=Path,
                        help="text: a local Hugging Face checkpoint directory (BERT, RoBERTa, XLM-RoBERTa, MiniLM, "
                             "DistilBERT; a sequence classifier, or a bare encoder whose final head is trained too)")
    lbuild.add_argument("--data", type=Path, help="text: labelled texts, .csv, .tsv, .jsonl or .parquet")
    lbuild.add_argument("--arch", help="images: resnet18, resnet34 or resnet50 (torchvision's definitions)")
    lbuild.add_argument("--weights", type=Path, help="images: the network's weights (a torchvision state dict)")
    lbuild.add_argument("--images", type=Path, help="images: an image folder, one sub-folder per class")
    lbuild.add_argument("--image-size", type=_positive_int, default=224, help="images: square side in pixels (default 224)")
    lbuild.add_argument("--text-column", default="text", help="the column holding the texts (default text)")
    lbuild.add_argument("--label-column", default="label",
                        help="the column holding the labels: class names or indices of the classifier (default label)")
    lbuild.add_argument("--out", type=Path, required=True, help="the model directory to write (replaced when done)")
    lbuild.add_argument("--name", help="the model's name on the server (default: the --out directory's name)")
    lbuild.add_argument("--exits", type=_positive_int, default=1, metavar="K",
                        help="an exit after every K-th layer (default 1: after every layer but the last)")
    lbuild.add_argument("--finetune", action="store_true",
                        help="train every layer with the exit heads (default: backbone frozen, the final classifier "
                             "untouched, so the full model answers as your checkpoint does)")
    lbuild.add_argument("--epochs", type=_positive_int, default=2, help="--finetune: epochs (default 2)")
    lbuild.add_argument("--max-length", type=_positive_int, default=128, help="tokens per text (default 128)")
    lbuild.add_argument("--split-seed", type=_split_seed, default=0, dest="split_seed",
                        help="seed that draws the held-out, validation and training rows (recorded; default 0)")
    lbuild.add_argument("--allow-small", action="store_true",
                        help="build even when the validation split is too small to certify the default budget")

    crossval = commands.add_parser(
        "crossval", help="compare calibration rules out of fold over validation ∪ held-out (no retraining)")
    crossval.add_argument("--model", default="digits", help="embedded model name or model directory")
    crossval.add_argument("--scheme", choices=("resplit", "kfold"), default="resplit",
                          help="resplit: R random splits, each rule fitted on as many rows as the validation split "
                               "and scored on the rest (default); kfold: K folds, repeated R times")
    crossval.add_argument("--pool", choices=("all", "validation"), default="all",
                          help="the rows re-split: 'all' (validation ∪ held-out, default) or 'validation' alone, the "
                               "held-out set untouched (compare rules here before any held-out figure); with "
                               "'validation' a re-split fits on two thirds")
    crossval.add_argument("--folds", type=_positive_int, default=5, help="kfold: folds per repetition, default 5")
    crossval.add_argument("--repeats", type=_positive_int,
                          help="resplit: splits (default 200); kfold: repetitions of the K folds (default 20)")
    crossval.add_argument("--seed", type=_split_seed, default=0, help="seed of the splits, default 0")
    crossval.add_argument("--costs", choices=("measured", "unit"), default="measured",
                          help="stage costs: measured (model.json → build.stage_cost_ms if recorded, else the median "
                               "batch-1 time of each graph with ONNX Runtime CPU) or unit (every stage costs 1)")
    crossval.add_argument("--uncertainty", choices=("entropy", "least_confidence", "margin"), default="entropy")
    crossval.add_argument("--loss-target-pp", type=_positive_float, default=0.5, dest="loss_target_pp",
                          help="accuracy-loss target each split's loss is compared with, default 0.5 pp")
    crossval.add_argument("--accuracy-budget-pp", type=_positive_float, default=0.5, dest="accuracy_budget_pp",
                          help="the budget policy's certified budget, default 0.5 pp")
    crossval.add_argument("--risk", type=float, default=0.1, help="the budget policy's δ, default 0.1")
    crossval.add_argument("--json", type=Path, dest="json_path", help="write the figures as JSON here")
    return parser


def _run_crossval(args) -> int:
    from green_mlops.crossval import run_crossval

    return run_crossval(args)


def _run_validate(args) -> int:
    from green_mlops.validate import run_validate

    return run_validate(args)


def _run_serve(args) -> int:
    import socket

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """Drains on SIGTERM/SIGINT, then returns (uvicorn would re-raise the signal: exit 0 instead).
        Says it listens only once it does, with its signal handlers in place."""

        ready_line = ""

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(self.ready_line, flush=True)

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

    from green_mlops.models import resolve_model
    from targets.serving.gateway import GatewaySettings, create_app
    from targets.control.budget_policy import DEFAULT_SERVE_SPEND
    from targets.control.calibration import check_ladder
    from targets.control.controller_config import read_toml
    from targets.cpus import cpu_list, serving_threads
    from targets.backends.ort_target import OnnxRuntimeTarget

    from profilers.feed import PeriodicEnergyFeed

    if args.energy_window_s <= 0:
        raise GreenMLOpsError("--energy-window-s must be > 0")
    spec = resolve_model(args.model)
    intra_op_threads = args.intra_op_threads or serving_threads()
    backend = OnnxRuntimeTarget(spec, device=args.device, intra_op_threads=intra_op_threads)
    check_ladder(spec, backend)  # a stage graph from another build: one line, exit 2, before serving
    # Calibration (and the budget policy's certificate) run in-process on the validation split.
    if args.spend is None and (args.config is None or "spend" not in read_toml(args.config)):
        args.spend = DEFAULT_SERVE_SPEND
    controller = make_default_controller(args, spec, backend)  # budget unless told (or unable): as validate
    if args.backend == "triton":
        from targets.backends.triton_target import FallbackBackend, TritonTarget

        triton = TritonTarget(spec, args.triton_url, args.triton_metrics_url, timeout_s=args.triton_timeout_s,
                              concurrency=args.max_concurrency)
        backend = FallbackBackend(triton, backend) if args.triton_fallback else triton
        if controller is not None and args.triton_metrics_url:
            _poll_triton_congestion(triton, controller)
    profiler = open_energy(args, make_results_dir(args.results))
    settings = GatewaySettings(max_concurrency=args.max_concurrency, max_body_bytes=args.max_body_bytes,
                               max_batch=args.max_batch, body_timeout_s=args.body_timeout_s,
                               max_queue=args.max_queue,
                               # never on the loop for Triton: a network call could hold it for --triton-timeout-s
                               inline_max_body_bytes=args.inline_max_body_bytes if args.backend == "onnxruntime" else 0,
                               serial_on_loop=len(os.sched_getaffinity(0)) == 1 and args.backend == "onnxruntime",
                               dynamic_batch_rows=args.dynamic_batch_rows)
    app = create_app(spec, backend, controller, settings)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this: without it, a response written in two parts waits for
    # the client's delayed ACK (measured here: 44 ms per request instead of 0.3 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((args.host, args.port))
        sock.listen(2048)  # connections made once the address is printed wait in the backlog
    except (OSError, OverflowError) as exc:
        sock.close()
        raise GreenMLOpsError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    host, port = sock.getsockname()[:2]
    try:  # headers and body in one write (see targets.serving.http_protocol); uvicorn's choice without httptools
        from targets.serving.http_protocol import GatheringHttpToolsProtocol as http_protocol
    except ImportError:
        http_protocol = "auto"
    config = uvicorn.Config(app, log_level="warning", access_log=False, http=http_protocol,
                            timeout_graceful_shutdown=args.drain_timeout_s)
    feed = None
    if profiler is not None and profiler.sources:
        feed = PeriodicEnergyFeed(profiler, controller, app.state.answered_requests, args.energy_window_s)
        feed.start()
        app.state.energy_feed = feed  # the dashboard's energy, CO2 and their source labels
    energy = ", ".join(profiler.source_labels()) if feed is not None else "off"
    server = DrainingServer(config)
    server.ready_line = (f"green-mlops gateway: model {spec.name} · controller {args.controller} · "
                         f"{backend.provider} · CPUs {cpu_list(os.sched_getaffinity(0))} · "
                         f"{intra_op_threads} intra-op thread(s){f' · serial on the event loop, dynamic batches up to {settings.dynamic_batch_rows} rows' if settings.serial_on_loop else ''}"
                         f" · energy {energy} · listening on http://{host}:{port}"
                         f"\ngreen-mlops gateway: dashboard http://{host}:{port}/dashboard")
    try:
        server.run(sockets=[sock])
    finally:
        if feed is not None:
            feed.stop()
        if profiler is not None:
            profiler.close()
    print("green-mlops gateway: stopped", flush=True)
    return EXIT_OK


def _run_report(args) -> int:
    from reports.build import build_report, gate_failures
    from reports.render import print_report

    out = args.out or args.results
    if args.mlflow:
        from reports.tracking import require_mlflow

        require_mlflow()  # before the work, not after it
    summary = build_report(args.results, out, args.baseline, args.min_duration_s, args.min_requests)
    print_report(summary, verdict=False)
    stdout.print(f"report: {out / 'report.html'}, {out / 'report.md'}, {out / 'summary.json'}", soft_wrap=True)
    if args.mlflow:
        from reports.tracking import log_report

        uri, run_id = log_report(args.mlflow, args.mlflow_experiment, args.results, out, summary)
        stdout.print(f"MLflow: run {run_id} in {uri} (experiment {args.mlflow_experiment})", soft_wrap=True)
    stdout.print(summary["verdict"], soft_wrap=True)  # the last line
    failures = gate_failures(summary)
    if args.gate and failures:
        stderr.print("gate: " + "; ".join(failures), soft_wrap=True)
        return EXIT_GATE
    return EXIT_OK


def _poll_triton_congestion(triton, controller, interval_s: float = 0.5) -> None:
    """Feed Triton's queue time into the controller's ĉ, twice a second, in the background."""
    import threading
    import time

    def poll():
        while True:
            controller.set_backend_congestion(triton.congestion(controller.config.slo_ms))
            time.sleep(interval_s)

    threading.Thread(target=poll, name="triton-congestion", daemon=True).start()


def _bio_bundle(args, spec) -> dict:
    """The controller ``serve`` would run for these flags (budget policy unless told, resting
    mid-path: ``--spend adaptive``), certified in-process on the validation split, as data."""
    from targets.control.budget_policy import DEFAULT_SERVE_SPEND
    from targets.control.calibration import check_ladder
    from targets.control.controller_bundle import controller_bundle
    from targets.control.controller_config import read_toml
    from targets.backends.ort_target import OnnxRuntimeTarget

    backend = OnnxRuntimeTarget(spec)
    check_ladder(spec, backend)
    if args.spend is None and (args.config is None or "spend" not in read_toml(args.config)):
        args.spend = DEFAULT_SERVE_SPEND
    controller = make_default_controller(args, spec, backend)
    certificate = controller.budget.calibration.as_dict() if controller.budget is not None else None
    stderr.print(f"{spec.name}_bio: policy {controller.config.policy}"
                 + (f", spend {controller.budget.spend}, certified ceiling {certificate['ceiling_thresholds']} "
                    f"({certificate['budget_pp']:g} pp at δ = {certificate['risk_delta']:g}, "
                    f"{certificate['path']} path, {certificate['n_test']} test rows)" if certificate else
                    f", τ∞ {controller.config.exit_tau_inf or controller.config.tau_inf}"), soft_wrap=True, markup=False)
    return controller_bundle(controller)


def _run_triton(args) -> int:
    from green_mlops.models import resolve_model
    from targets.serving.triton_repo import RepoOptions, write_repository
    from targets.backends.triton_server import TritonServer, install_venv

    if args.triton_command == "install":
        venv = install_venv(args.venv, log=lambda line: stderr.print(line, soft_wrap=True))
        stdout.print(f"Triton server environment ready: {venv}", soft_wrap=True)
        return EXIT_OK
    if args.triton_command == "repo":
        try:
            preferred = tuple(int(b) for b in args.preferred_batch_sizes.split(",") if b.strip())
        except ValueError as exc:
            raise GreenMLOpsError(f"--preferred-batch-sizes must be integers, got '{args.preferred_batch_sizes}'") from exc
        options = RepoOptions(flavour=args.flavour, max_batch_size=args.max_batch_size,
                              preferred_batch_sizes=preferred, max_queue_delay_us=args.max_queue_delay_us,
                              instance_kind=args.instance_kind, instance_count=args.instance_count,
                              bio_instance_count=args.bio_instance_count, bio_stages=args.bio_stages)
        spec = resolve_model(args.model)
        written = write_repository(spec, args.out, options, bio_bundle=_bio_bundle(args, spec) if args.bio else None)
        stdout.print(f"Triton repository ({args.flavour}) written to {args.out}: "
                     f"{', '.join(p.name for p in written.values())}", soft_wrap=True)
        return EXIT_OK
    if not args.repo.is_dir() or not any(args.repo.glob("*/config.pbtxt")):
        raise GreenMLOpsError(f"{args.repo} is not a Triton model repository (no <model>/config.pbtxt): "
                              "write one with 'green-mlops triton repo'")
    # Ctrl-C or SIGTERM while it starts: the constructor stops the server, then exit 130.
    server = TritonServer(args.repo, http_port=args.http_port, metrics_port=args.metrics_port, server=args.server)
    stop = threading.Event()
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"tritonserver ready: http://{server.url} · metrics {server.metrics_url} · log {server.log_path}",
              flush=True)
        while not stop.is_set() and server.process.poll() is None:
            stop.wait(0.5)
        died = None if stop.is_set() else server.log_tail(1500)
    finally:
        code = server.stop()
    if died is not None:
        raise GreenMLOpsError(f"tritonserver exited by itself ({code}): {died}")
    print(f"tritonserver stopped ({code})", flush=True)
    return EXIT_OK


def _run_models_build(args) -> int:
    import time

    from green_mlops.models import model_home

    out = args.out or model_home(args.name)
    log = lambda line: stderr.print(line, soft_wrap=True)  # noqa: E731
    started = time.monotonic()
    if args.name == "digits":
        from green_mlops.models.build_digits import build

        build(out, log=log, split_seed=args.split_seed)
    else:
        from green_mlops.models.build_reviews import build

        build(out, log=log, samples=args.samples, max_length=args.max_length, epochs=args.epochs,
              split_seed=args.split_seed)
    stderr.print(f"models build {args.name}: {time.monotonic() - started:.0f} s")
    return EXIT_OK


def _run_ladder_build(args) -> int:
    import time

    text, vision = (args.checkpoint, args.data), (args.arch, args.weights, args.images)
    if any(v is not None for v in text) == any(v is not None for v in vision):
        raise GreenMLOpsError("ladder build takes a text model (--checkpoint DIR --data FILE) or an image model "
                              "(--arch resnet18 --weights FILE --images DIR), one of the two")
    missing = [flag for flag, v in zip(("--checkpoint", "--data") if any(v is not None for v in text) else
                                       ("--arch", "--weights", "--images"),
                                       text if any(v is not None for v in text) else vision) if v is None]
    if missing:
        raise GreenMLOpsError(f"ladder build: {' and '.join(missing)} missing")
    log = lambda line: stderr.print(line, soft_wrap=True)  # noqa: E731
    started = time.monotonic()
    if args.checkpoint is not None:
        from green_mlops.ladder.text import build_text

        build_text(args.checkpoint, args.data, args.out, text_column=args.text_column, label_column=args.label_column,
                   name=args.name, exits_every=args.exits, finetune=args.finetune, epochs=args.epochs,
                   max_length=args.max_length, split_seed=args.split_seed, allow_small=args.allow_small, log=log)
    else:
        from green_mlops.ladder.vision import build_vision

        build_vision(args.arch, args.weights, args.images, args.out, image_size=args.image_size, name=args.name,
                     split_seed=args.split_seed, allow_small=args.allow_small, log=log)
    stderr.print(f"ladder build: {time.monotonic() - started:.0f} s; next: green-mlops validate --model {args.out}")
    return EXIT_OK


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Parse, dispatch, and turn every outcome into one of the documented exit codes."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)  # bad arguments: argparse's usage line and exit 2
    handlers = {"validate": _run_validate, "serve": _run_serve, "triton": _run_triton, "report": _run_report,
                "models": _run_models_build, "crossval": _run_crossval, "ladder": _run_ladder_build}
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C: every finally runs (children stopped, files closed). `serve`
        # and `triton up` replace this with their own graceful stop once they are up.
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return handlers[args.command](args)
    except GreenMLOpsError as exc:  # ModelDirError, ConfigError, InputError, RecordsError, BackendError
        error_line(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        stderr.print("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line for the user, the traceback for whoever fixes it
        path = write_traceback(exc, argv)
        summary = (str(exc).strip().splitlines() or [""])[0][:200]
        error_line(f"internal error ({type(exc).__name__}: {summary}); traceback in {path}")
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
