"""Score trained runs: `python evaluate.py run_dir=outputs/runs/<run>` (or ckpt_path=..., sweep_dir=...).

See conf/evaluate.yaml for every key.
"""

import hydra
from omegaconf import DictConfig

import autoencoders  # noqa: F401  (registers the config schemas and resolvers; imports no torch)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from autoencoders.cli import exit_with, stops_kept, user_error

    try:
        with stops_kept():  # SIGTERM's stop, even where the code it landed in made another error of it
            from autoencoders.evaluation import evaluate  # torch and lightning load only after the config is composed

            evaluate(cfg)
    except Exception as e:  # bad input, or a file system that refused a write: one `error:` paragraph, exit 2
        error = user_error(e)
        if error is None:
            raise
        exit_with(error)


if __name__ == "__main__":
    import sys

    from autoencoders.cli import refuse_unreadable_overrides, stopped_by_signals

    refuse_unreadable_overrides(sys.argv[1:])  # a value unquoted: say how to quote it (exit 2)
    with stopped_by_signals():  # Ctrl-C or SIGTERM: one `error:` line, exit 130 or 143
        main()
