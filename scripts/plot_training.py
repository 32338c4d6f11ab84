"""Read megatron's TensorBoard scalars of one or more runs and draw their training curves into one
PNG (a panel per tag, a line per run), so a run's loss curve can be attached to results without a
TensorBoard server. `read_scalars` is also what the GPU checks use to compare runs.

    python scripts/plot_training.py --out curve.png runs/full/tensorboard runs/resumed/tensorboard
"""

from __future__ import annotations

import argparse
import os

DEFAULT_TAGS = ("lm loss", "grad-norm", "learning-rate", "throughput")


def read_scalars(tensorboard_dir: str, tag: str) -> dict[int, float]:
    """Every (step, value) of `tag` in the event files under `tensorboard_dir`; later files win."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for root, _, files in sorted(os.walk(tensorboard_dir)):
        for name in sorted(files):
            if name.startswith("events.out.tfevents"):
                events = EventAccumulator(os.path.join(root, name), size_guidance={"scalars": 0})
                events.Reload()
                if tag in events.Tags()["scalars"]:
                    values.update({e.step: e.value for e in events.Scalars(tag)})
    return values


def plot_runs(run_dirs: list[str], tags: list[str], out: str, title: str = "") -> list[str]:
    """Draw one panel per tag with a line per run; returns the tags that had no data anywhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {tag: {run: read_scalars(run, tag) for run in run_dirs} for tag in tags}
    drawn = [tag for tag in tags if any(curves[tag].values())]
    if not drawn:
        raise ValueError(f"none of the tags {tags} has data under {run_dirs}")
    figure, axes = plt.subplots(len(drawn), 1, figsize=(8, 2.6 * len(drawn)), squeeze=False)
    for axis, tag in zip(axes[:, 0], drawn, strict=True):
        for run, values in curves[tag].items():
            if values:
                steps = sorted(values)
                axis.plot(steps, [values[s] for s in steps], label=run_label(run), linewidth=1)
        axis.set_ylabel(tag)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("iteration")
    axes[0, 0].legend(fontsize=8)
    if title:
        axes[0, 0].set_title(title)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return [tag for tag in tags if tag not in drawn]


def run_label(tensorboard_dir: str) -> str:
    """`runs/full/tensorboard` -> `full`: the run's own directory names the line."""
    path = os.path.normpath(tensorboard_dir)
    if os.path.basename(path) == "tensorboard":
        path = os.path.dirname(path)
    return os.path.basename(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="TensorBoard directories (one per run)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--tags", nargs="+", default=list(DEFAULT_TAGS))
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    missing = plot_runs(args.run_dirs, args.tags, args.out, args.title)
    print(f"wrote {args.out}" + (f" (no data for: {', '.join(missing)})" if missing else ""))


if __name__ == "__main__":
    main()
