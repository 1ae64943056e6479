"""What writing `last.ckpt` costs the training thread, and what waiting for the disk would cost.

The MLP AE's checkpoint (weights and Adam state, 13 MB at latent 16) is saved `--repeats` times each way, the ways
taking turns, and the median is printed in ms, with the ratio to a plain torch.save without CRC32 records (how this
project saved before its checkpoints were made durable):
  no_crc      torch.save with the zip's CRC32 records off
  crc         torch.save with them (torch's default, which this project keeps)
  safe        SafeCheckpointIO.save_checkpoint as training calls it, the previous save's fsync already done (as it is
              after an epoch of training): serialise, then hand the fsyncs and rename to the background thread
  safe_wait   the same and then waiting for the background thread: what a synchronous durable save would cost
  held        a copy in memory (copy.deepcopy), what an epoch's end costs when no last.ckpt is due
              (callbacks.LastCheckpoint, which writes at most every checkpoint_every_s seconds)

    python benchmarks/checkpoint_save.py [--repeats 30] [--latent-dim 16] [--json FILE] [--quick]
"""

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.serialization import config as serialization_config

from autoencoders.checkpoints import SafeCheckpointIO
from autoencoders.models import AE, minimised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats

    model = AE((1, 28, 28), latent_dim=args.latent_dim)
    optimizer = model.configure_optimizers()
    minimised(model.loss_terms(torch.rand(8, 1, 28, 28))).backward()
    optimizer.step()  # Adam's state exists after a step: the checkpoint is as large as a real last.ckpt
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]}

    with tempfile.TemporaryDirectory(dir=Path.cwd()) as folder:  # on the disk runs write to, not a tmpfs
        io, target = SafeCheckpointIO(), Path(folder) / "last.ckpt"

        def plain(crc: bool) -> None:
            with open(Path(folder) / "plain.ckpt", "wb") as f, serialization_config.patch({"save.compute_crc32": crc}):
                torch.save(checkpoint, f)

        def safe_wait() -> None:
            io.save_checkpoint(checkpoint, target)
            io.wait()

        ways = {
            "no_crc": lambda: plain(False),
            "crc": lambda: plain(True),
            "safe": lambda: io.save_checkpoint(checkpoint, target),
            "safe_wait": safe_wait,
            "held": lambda: copy.deepcopy(checkpoint),
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(repeats):
            for name, save in ways.items():
                io.wait()  # untimed: the previous background fsync, as an epoch of training would overlap it
                start = time.perf_counter()
                save()
                times[name].append(time.perf_counter() - start)
        io.wait()
        size_mb = target.stat().st_size / 1e6

    figures = {name: 1000 * statistics.median(values) for name, values in times.items()}
    print(f"last.ckpt of the MLP AE (latent {args.latent_dim}): {size_mb:.1f} MB, median of {repeats}")
    for name, ms in figures.items():
        print(f"{name:10} {ms:8.1f} ms   {ms / figures['no_crc']:5.2f}x no_crc")
    if args.json:
        args.json.write_text(json.dumps({"size_mb": size_mb, "ms": figures}, indent=2))


if __name__ == "__main__":
    main()
