"""The online-training study's table and plot (`gpurec experiment online`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TASK_TITLES = {"like": "like AUC", "finish": "finish AUC"}


def _cell(stats: dict[str, Any], index: int | None = None) -> str:
    mean = stats["mean"] if index is None else stats["mean"][index]
    std = stats["std"] if index is None else stats["std"][index]
    if mean is None:
        return "-"
    return f"{mean:.3f} ± {std:.3f}"


def print_report(report: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    settings, days = report["settings"], report["days"]
    seeds = ", ".join(str(s) for s in settings["seeds"])
    console = Console()
    if not console.is_terminal:  # a pipe or log file: wide enough for the table
        console = Console(width=140)
    for task, title in TASK_TITLES.items():
        table = Table(
            title=f"{title} per simulated day (mean ± sd over seeds {seeds}); trained on days 1-{settings['train_days']}"
        )
        table.add_column("variant")
        for day in days:
            table.add_column(f"day {day}", justify="right")
        table.add_column(f"days {days[0]}-{days[-1]}", justify="right")
        for name, label in report["variants"].items():
            stats = report["summary"][name]
            table.add_row(
                label, *(_cell(stats[task], i) for i in range(len(days))), _cell(stats[f"{task}_all"])
            )
        console.print(table)
    last = [r["frozen_on_last_train_day"] for r in report["per_seed"]]
    in_sample = ", ".join(f"{t} {sum(x[t] for x in last) / len(last):.3f}" for t in TASK_TITLES)
    console.print(
        f"frozen model on its last training day (day {settings['train_days']}, in-sample): {in_sample}"
    )
    batch = settings.get("batch_training") or {}
    if batch:
        console.print(
            f"batch training: {batch['epochs']} epochs of {batch['batch_size']}-example batches, dense lr {batch['dense_lr']:g}, "
            f"sparse lr {batch['sparse_lr']:g}; daily retrain: {settings['daily_retrain']}"
        )
    console.print(
        f"label delay {settings['label_delay_s']:g} s, trainer steps every {settings['trainer_window_s']:g} s of simulated time, "
        f"a step of n examples weighs its loss by {_weighting(settings)}; "
        f"{report['seconds']:.0f} s; results.json and {Path(report['plot']).name} under {out}"
    )


def _weighting(settings: dict[str, Any]) -> str:
    reference = settings.get("reference_batch")
    return f"n / {reference}" if reference else "1 (a plain mean)"


def plot(report: dict[str, Any], path: Path) -> Path:
    """AUC per day per variant (mean over seeds, bars: one sd), one panel per task, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    settings, days = report["settings"], report["days"]
    figure, axes = plt.subplots(1, len(TASK_TITLES), figsize=(12, 4.8), constrained_layout=True)
    for ax, (task, title) in zip(axes, TASK_TITLES.items(), strict=True):
        for name, label in report["variants"].items():
            stats = report["summary"][name][task]
            points = [
                (d, m, s) for d, m, s in zip(days, stats["mean"], stats["std"], strict=True) if m is not None
            ]
            if not points:
                continue
            x, mean, std = zip(*points, strict=True)
            style = "--" if name == "frozen" else ":" if name == "daily" else "-"
            ax.errorbar(x, mean, yerr=std, label=label, linestyle=style, marker="o", capsize=3)
        in_sample = [r["frozen_on_last_train_day"][task] for r in report["per_seed"]]
        ax.set_xticks(days)
        # In the label, not a point: the in-sample AUC sits far above the rest and would flatten the lines.
        mean = sum(in_sample) / len(in_sample)
        ax.set_xlabel(
            f"simulated day  (the frozen model on its last training day, day {settings['train_days']}: {mean:.3f})"
        )
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.set_title(f"{title}: trained on days 1-{settings['train_days']}, then served")
    axes[0].legend(fontsize=8, loc="best")
    figure.suptitle(
        f"Online training on the drifting synthetic world ({settings['users']:,} users, {settings['items']:,} items; "
        f"seeds {', '.join(map(str, settings['seeds']))}; label delay {settings['label_delay_s']:g} s)",
        fontsize=10,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
