"""What a command tells the user at its end: a small table of metrics by split."""

from collections.abc import Mapping

SPLITS = ("val", "test")


def metrics_table(metrics: Mapping[str, float]) -> str:
    """`split/name` metrics as one row per name and one column per split, e.g. elbo | -112.3 | -113.6."""
    names = list(dict.fromkeys(key.split("/", 1)[1] for key in metrics if "/" in key))
    splits = [split for split in SPLITS if any(key.startswith(f"{split}/") for key in metrics)]
    width = max(len("metric"), *map(len, names))
    lines = [f"  {'metric':<{width}}" + "".join(f"{split:>12}" for split in splits)]
    for name in names:
        cells = (metrics.get(f"{split}/{name}") for split in splits)
        lines.append(f"  {name:<{width}}" + "".join(" " * 12 if v is None else f"{v:>12.6g}" for v in cells).rstrip())
    return "\n".join(lines)
