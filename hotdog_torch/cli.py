"""The training command's arguments, without torch: `python -m hotdog_torch.train` reads them in train.main, and
reads them first, the same way, in the package's __init__.py, to start decoding the run's folders (cache.prefetch)."""

from __future__ import annotations

import argparse
import gc
import signal
import sys

from .config import UserError


def command_line(argv: list[str] | None, quiet: bool = False, prog: str = "") -> argparse.Namespace:
    """The command's --config, --resume, overrides and --no-progress.  quiet, for the prefetch: no -h, and a mistake
    raises UserError instead of printing, left for the command itself to say."""
    what = "Random search over the MLP's weights" if prog else "Train the hot-dog MLP"  # search.py's, or train.py's
    name, about = prog or "python -m hotdog_torch.train", f"{what} from a YAML config."
    p = argparse.ArgumentParser(name, description=about, add_help=not quiet)
    p.add_argument("--config", help="YAML config (keys: hotdog_torch/config.py); without it, the schema's defaults")
    resume = "continue runs/<name> from its checkpoints/last.pt, with its config.yaml (overrides still apply)"
    p.add_argument("--resume", metavar="RUN_DIR", help=resume)
    example = "overrides, values parsed as YAML, e.g. optim.lr=0.5 model.hidden=[256,64]"
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help=example)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if quiet:

        def refuse(message):
            raise UserError(message)

        p.error = refuse
    return p.parse_intermixed_args(argv)  # overrides after a flag too


def interrupted_while_starting(signum, frame) -> None:
    """SIGINT's handler while `python -m hotdog_torch.train` imports torch (seconds, its folders decoding in the
    prefetch meanwhile), until `run` calls its main(): nothing of the run is written yet; one line, not the
    import's traceback."""
    print("interrupted before the run started", file=sys.stderr, flush=True)
    raise SystemExit(130)


def exit_code(command, *stopped: type, interrupted: str = "the checkpoints already written are kept") -> int:
    """The exit code of every command's main(): command()'s own (None: 0); 2 for a user's mistake, said in one
    sentence; a `stopped` exception's own code (stopping.Interrupted: saved, then stopped by a signal); 130 for
    Ctrl-C, saying what was kept (`interrupted`)."""
    try:
        return command() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except stopped as e:
        return e.code
    except KeyboardInterrupt:
        print(f"interrupted; {interrupted}", file=sys.stderr)
        return 130


def run(main) -> None:
    """The end of `python -m hotdog_torch.<command>`: exit with main()'s code.  What the imports made (torch's
    objects, alive until exit) is frozen first (gc.freeze), so that the collector does not walk it again and again,
    while the command runs nor as the interpreter exits."""
    gc.freeze()
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:  # started: Ctrl-C is KeyboardInterrupt again
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
