"""The ``dinolab`` command: parse, call, report. No training or evaluation logic lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from dinolab import __version__
from dinolab.config import ConfigError, load_config, preset_names, to_yaml

# Exit statuses of ``dinolab train`` (README, "Crash safety and preemption").
EXIT_CONFIG_ERROR = 2  # a mistake in the configuration, arguments or input files (or an upload
#                        without a network): found before any work, except that upload
EXIT_NON_FINITE = 3  # NaN or inf in the loss or gradients: stopped, the last good checkpoint kept
EXIT_STOPPED = 4  # SIGTERM or SIGINT: the current step saved; the same command resumes
EXIT_SAVE_FAILED = 5  # a checkpoint could not be written (disk full, I/O error); the last is kept
EXIT_NO_GROUP = 6  # under torchrun: not every process came to create the process group in time
EXIT_INTERRUPTED = 130  # a second SIGINT: stopped at once; resumes from the last checkpoint


class _OneLineParser(argparse.ArgumentParser):
    """argparse's errors as one line (it prints the whole usage first otherwise), status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="dinolab", description="Self-supervised pre-training of vision backbones with DINO "
        "(Caron et al., 2021), and the tools to evaluate and look at what they learned. "
        "`dinolab COMMAND --help` tells more.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True,
                                     parser_class=_OneLineParser)
    train = commands.add_parser(
        "train",
        help="pre-train a backbone with DINO (resumes when the run folder has a checkpoint)",
        description="dinolab train [PRESET_OR_YAML] [key=value ...]; with no preset or YAML "
        f"the demo preset is the base. Presets: {', '.join(preset_names())}.",
    )
    train.add_argument("overrides", nargs="*", metavar="PRESET_OR_YAML|key=value")
    train.add_argument("--show-config", action="store_true",
                       help="print the resolved configuration (every key, with its value; the "
                       "keys at auto are resolved from the data set's size when a run starts "
                       "and saved in its config.yaml) and exit without training")
    _add_evaluation_commands(commands)
    _add_visualization_commands(commands)
    return parser


def _positive(kind: type[int] | type[float]) -> Callable[[str], list[int] | list[float]]:
    """A comma-separated list of positive numbers: --k 10,20 or --lrs 0.01,0.1."""
    def parse(text: str) -> list[int] | list[float]:
        try:
            values = [kind(item) for item in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of {kind.__name__}s: {text}") from None
        if not all(value > 0 for value in values):
            raise argparse.ArgumentTypeError(f"must be > 0: {text}")
        return values  # type: ignore[return-value]

    return parse


WEIGHTS_HELP = "the teacher's backbone (default; DINO evaluates it) or the student's"


def _add_evaluation_commands(commands: argparse._SubParsersAction) -> None:
    """knn, linear, embed, export: a run folder, a checkpoint or an export, then options."""
    def evaluated(name: str, help_text: str, data: bool = True) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("path", metavar="CHECKPOINT_OR_RUN",
                             help="a run folder, a checkpoint .pt or an exported .safetensors")
        command.add_argument("--weights", choices=("teacher", "student"), default="teacher",
                             help=WEIGHTS_HELP)
        if data:
            command.add_argument("overrides", nargs="*", metavar="key=value",
                                 help="data.* overrides (default: the run's own data)")
            command.add_argument("--data", metavar="FOLDER",
                                 help="an image folder (class sub-folders are the labels)")
        return command

    knn = evaluated("knn", "weighted k-NN accuracy (k-NN of L2-normalised features, T=0.07)")
    knn.add_argument("--k", type=_positive(int), default=[10, 20, 100, 200], metavar="K,K,...",
                     help="neighbour counts, one accuracy each (default: 10,20,100,200)")
    knn.add_argument("--temperature", type=float, default=0.07,
                     help="a neighbour's vote is exp(cosine similarity / T) (default: 0.07)")
    linear = evaluated("linear", "linear probe on frozen features (several LRs at once)")
    linear.add_argument("--blocks", type=int, metavar="N",
                        help="[CLS] of the last N blocks (default 4 for ViTs, 1 otherwise)")
    linear.add_argument("--avgpool", action="store_true",
                        help="also the mean of the last block's patch tokens")
    linear.add_argument("--epochs", type=int, default=100,
                        help="passes over the frozen features (default: 100)")
    linear.add_argument("--lrs", type=_positive(float), metavar="LR,LR,...",
                        help="learning rates trained at once (default 1e-3 ... 1)")
    embed = evaluated("embed", "write embeddings (and labels, paths) to .npz or .parquet")
    embed.add_argument("--out", required=True, metavar="FILE",
                       help="FILE.npz, or FILE.parquet (needs pyarrow)")
    embed.add_argument("--split", choices=("train", "test"), default="train",
                       help="which split of the data (default: train)")
    embed.add_argument("--plot", metavar="FILE.png", help="a 2-D PCA map coloured by label")
    export = evaluated("export", "the backbone as safetensors + a JSON sidecar timm reads, a "
                       "Hugging Face Hub folder, or ONNX (one or several)", data=False)
    export.add_argument("--out", metavar="FILE.safetensors",
                        help="where the weights go; FILE.json, next to it, names the model")
    export.add_argument("--hub", metavar="DIR", help="a folder timm loads as local-dir:DIR "
                        "(config.json, model.safetensors, a README.md model card)")
    export.add_argument("--push", metavar="REPO_ID",
                        help="then upload the --hub folder to this Hugging Face Hub repository")
    export.add_argument("--onnx", metavar="FILE.onnx", help="an ONNX graph with a dynamic batch "
                        "axis (needs pip install 'dinolab[onnx]')")


def _add_visualization_commands(commands: argparse._SubParsersAction) -> None:
    """attention, features: a checkpoint and images; plot: a run folder's curves; compare:
    several run folders side by side."""
    def looked_at(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("path", metavar="CHECKPOINT_OR_RUN",
                             help="a run folder, a checkpoint .pt or an exported .safetensors")
        command.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
        command.add_argument("--out", required=True, metavar="DIR",
                             help="the folder the PNGs are written to")
        command.add_argument("--weights", choices=("teacher", "student"), default="teacher",
                             help=WEIGHTS_HELP)
        command.add_argument("--size", type=int, metavar="S", help="input side in pixels "
                             "(default: the run's crop size; ViTs: a multiple of the patch)")
        return command

    attention = looked_at("attention", "the last block's [CLS] attention per head, with the "
                          "masks that keep --threshold of its mass (ViTs)")
    attention.add_argument("--threshold", type=float, default=0.6,
                           help="the share of attention the masks keep (default: 0.6)")
    features = looked_at("features", "patch features as colours: PCA over the images' "
                         "foreground patches (any backbone)")
    features.add_argument("--keep-background", action="store_true",
                          help="colour every patch (no foreground threshold)")
    plot = commands.add_parser("plot", help="training curves of a run as a PNG",
                               description="loss, learning rate, teacher entropy and KL, k-NN "
                               "from RUN_DIR/metrics.jsonl")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run folder")
    plot.add_argument("--out", metavar="FILE.png", help="default: RUN_DIR/curves.png")
    compare = commands.add_parser(
        "compare", help="several runs side by side: the keys that differ, final metrics, curves",
        description="a table (one row per run: the config keys that differ, last loss, k-NN, "
        "epochs, steps) and the runs' curves overlaid in one PNG")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders")
    compare.add_argument("--out", metavar="FILE.png", help="default: ./compare.png")


def _split(arguments: list[str]) -> tuple[str | None, list[str]]:
    """The first argument without '=' is the preset or YAML; the rest are overrides."""
    if arguments and "=" not in arguments[0]:
        return arguments[0], arguments[1:]
    return None, arguments


def _train(arguments: argparse.Namespace) -> int:
    base, overrides = _split(arguments.overrides)
    config = load_config(base, overrides)
    if arguments.show_config:
        print(to_yaml(config), end="")
        return 0
    from dinolab.distributed.rendezvous import JoinTimeout
    from dinolab.training.loop import CheckpointWriteError, NonFiniteLoss, RunStopped, train

    statuses: dict[type[Exception], int] = {NonFiniteLoss: EXIT_NON_FINITE,
                                            RunStopped: EXIT_STOPPED,
                                            CheckpointWriteError: EXIT_SAVE_FAILED,
                                            JoinTimeout: EXIT_NO_GROUP}
    try:
        train(config)
    except tuple(statuses) as error:
        print(f"dinolab: {'' if isinstance(error, RunStopped) else 'error: '}{error}",
              file=sys.stderr)
        return next(status for kind, status in statuses.items() if isinstance(error, kind))
    except KeyboardInterrupt:  # a second Ctrl-C: the first asked for a save at the next step
        print(f"dinolab: interrupted at once; {config.run.dir} resumes from its last checkpoint",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _knn(arguments: argparse.Namespace) -> int:
    from dinolab.evaluation.commands import run_knn

    run_knn(arguments.path, arguments.weights, arguments.data, arguments.overrides,
            arguments.k, arguments.temperature)
    return 0


def _linear(arguments: argparse.Namespace) -> int:
    from dinolab.evaluation.commands import run_linear
    from dinolab.evaluation.linear import LEARNING_RATES, ProbeSettings

    if arguments.epochs <= 0 or (arguments.blocks is not None and arguments.blocks <= 0):
        raise ConfigError("--epochs and --blocks must be > 0")
    settings = ProbeSettings(tuple(arguments.lrs or LEARNING_RATES), arguments.epochs)
    run_linear(arguments.path, arguments.weights, arguments.data, arguments.overrides,
               arguments.blocks, arguments.avgpool, settings)
    return 0


def _embed(arguments: argparse.Namespace) -> int:
    from dinolab.evaluation.commands import run_embed

    run_embed(arguments.path, arguments.out, arguments.weights, arguments.data,
              arguments.overrides, arguments.split, arguments.plot)
    return 0


def _export(arguments: argparse.Namespace) -> int:
    from dinolab.evaluation.commands import run_export

    run_export(arguments.path, arguments.weights, arguments.out, arguments.hub, arguments.onnx,
               arguments.push)
    return 0


def _attention(arguments: argparse.Namespace) -> int:
    from dinolab.visualization.commands import run_attention

    run_attention(arguments.path, arguments.images, arguments.out, arguments.weights,
                  arguments.threshold, arguments.size)
    return 0


def _features(arguments: argparse.Namespace) -> int:
    from dinolab.visualization.commands import run_features

    run_features(arguments.path, arguments.images, arguments.out, arguments.weights,
                 arguments.size, arguments.keep_background)
    return 0


def _plot(arguments: argparse.Namespace) -> int:
    from dinolab.visualization.commands import run_plot

    run_plot(arguments.run_dir, arguments.out)
    return 0


def _compare(arguments: argparse.Namespace) -> int:
    from dinolab.visualization.compare import run_compare

    run_compare(arguments.run_dirs, arguments.out)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train, "knn": _knn, "linear": _linear, "embed": _embed, "export": _export,
    "attention": _attention, "features": _features, "plot": _plot,
    "compare": _compare,
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # key=value overrides may follow options (knn RUN --k 20 data.root=...): argparse leaves
    # those it cannot place among the unknown arguments.
    arguments, unknown = parser.parse_known_args(argv)
    if unknown and (getattr(arguments, "overrides", None) is None
                    or any("=" not in item or item.startswith("-") for item in unknown)):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if unknown:
        arguments.overrides += unknown
    try:
        return COMMANDS[arguments.command](arguments)
    except ConfigError as error:
        print(f"dinolab: error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
