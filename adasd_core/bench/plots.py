"""PNG plots of `adasd bench`: speedup per method, acceptance by draft position, and T_G / T_V
over one request. matplotlib (the `bench` extra) with the Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path

MIN_DRAFTED = 5  # positions drafted fewer times are left out of the acceptance plot (too noisy)


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("the plots need matplotlib: pip install 'adasd[bench]' (or pass --no-plots)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(result: dict, out_dir: Path) -> dict[str, Path]:
    plt = _pyplot()
    paths = {}
    for name, fn in (("speedup", _speedup), ("acceptance_by_position", _acceptance), ("thresholds", _thresholds),
                     ("speed_quality", _speed_quality)):
        fig = fn(plt, result)
        if fig is None:
            continue
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths[name] = path
    return paths


def _speed_task(result: dict) -> str:
    names = [t["name"] for t in result["tasks"]]
    return "continuation" if "continuation" in names else names[0]


def _speedup(plt, result: dict):
    task, modes = _speed_task(result), result["config"]["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in result["rows"] if r["task"] == task and r["mode"] == mode]
        labels = [r["label"] for r in rows]
        vs_target = [r["speedup_vs_target"] or 0.0 for r in rows]
        vs_vanilla = [r["speedup_vs_vanilla"] or 0.0 for r in rows]
        x = range(len(rows))
        w = 0.4
        b1 = ax.bar([i - w / 2 for i in x], vs_target, w, label="over the target alone")
        b2 = ax.bar([i + w / 2 for i in x], vs_vanilla, w, label="over vanilla SD")
        for bars in (b1, b2):
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(list(x), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("speedup (tokens/s ratio)")
        temp = "greedy" if mode == "greedy" else f"sampled, T={result['config']['temperature']}"
        ax.set_title(f"{task}, {temp}")
        ax.legend(fontsize=8)
    fig.suptitle("Speedup per method")
    return fig


def _acceptance(plt, result: dict):
    modes = result["config"]["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    drawn = False
    for ax, mode in zip(axes[0], modes):
        per_method: dict[str, tuple[str, list[int], list[int]]] = {}
        for r in result["rows"]:  # summed over tasks
            if r["mode"] != mode or not r.get("by_position"):
                continue
            label, d, a = per_method.get(r["method"], (r["label"], [], []))
            for i, (dd, aa) in enumerate(zip(r["by_position"]["drafted"], r["by_position"]["accepted"])):
                if i >= len(d):
                    d.append(0)
                    a.append(0)
                d[i] += dd
                a[i] += aa
            per_method[r["method"]] = (label, d, a)
        for label, d, a in per_method.values():
            pos = [i + 1 for i in range(len(d)) if d[i] >= MIN_DRAFTED]
            rate = [a[i - 1] / d[i - 1] for i in pos]
            if pos:
                ax.plot(pos, rate, marker="o", ms=3, label=label)
                drawn = True
        ax.set_xlabel("draft position (1 = first candidate of a round)")
        ax.set_ylabel("acceptance rate")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{mode} (all tasks; positions drafted >= {MIN_DRAFTED} times)")
        ax.legend(fontsize=8)
    fig.suptitle("Acceptance by draft position (our loop; HF assisted generation does not report it)")
    return fig if drawn else None


def _thresholds(plt, result: dict):
    traces = result.get("traces", {}).get("rounds", {})
    if not any(traces.values()):
        return None
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    labels = {"adasd-bayes": "adasd (bayes)", "adasd-threshold": "adasd (threshold)", "hybrid": "hybrid (bayes)"}
    for key, rounds in traces.items():
        x = list(range(1, len(rounds) + 1))
        tg = [r.get("entropy_threshold") for r in rounds]
        axes[0].plot(x, [v if v is not None else float("nan") for v in tg], marker=".", label=labels.get(key, key))
        if key == "adasd-threshold":
            tv = [r.get("js_threshold") for r in rounds]
            axes[1].plot(x, [v if v is not None else float("nan") for v in tv], marker=".", color="C1",
                         label="T_V (threshold check)")
        if key == "adasd-bayes":
            ax2 = axes[1].twinx()
            ax2.plot(x, [r.get("kde_accepted") or 0 for r in rounds], ls=":", color="C2", label="KDE accepted (bayes)")
            ax2.plot(x, [r.get("kde_rejected") or 0 for r in rounds], ls=":", color="C3", label="KDE rejected (bayes)")
            ax2.set_ylabel("KDE sample size")
            ax2.legend(fontsize=7, loc="lower right")
        axes[2].step(x, [r.get("drafted", 0) for r in rounds], where="mid", label=f"drafted, {labels.get(key, key)}")
        axes[2].step(x, [r.get("accepted", 0) for r in rounds], where="mid", ls="--",
                     label=f"accepted, {labels.get(key, key)}")
    axes[0].set_ylabel("T_G (nats)")
    axes[0].set_title("T_G: mean draft entropy of rejected candidates (undefined before the first rejection)")
    axes[0].legend(fontsize=8)
    axes[1].set_ylabel("T_V (JS distance)")
    axes[1].legend(fontsize=7, loc="upper right")
    axes[2].set_ylabel("candidates")
    axes[2].set_xlabel("round")
    axes[2].legend(fontsize=7)
    t = result["traces"]
    fig.suptitle(f"One request: {t['task']} prompt {t['prompt']}, {t['mode']}")
    return fig


def _speed_quality(plt, result: dict):
    """Speedup over vanilla SD against the quality cost (excess surprisal, ± 1 s.e.), sampled runs of
    the speed task: one point per method and verification mode."""
    task = _speed_task(result)
    rows = [r for r in result["rows"] if r["task"] == task and r["mode"] == "sampled"
            and r.get("excess_surprisal") is not None and r.get("speedup_vs_vanilla")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        marker = "o" if r["lossless"] else "s"
        ax.errorbar(r["excess_surprisal"], r["speedup_vs_vanilla"], xerr=r.get("excess_surprisal_se") or 0,
                    fmt=marker, capsize=3, label=r["label"])
        ax.annotate(r["label"], (r["excess_surprisal"], r["speedup_vs_vanilla"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.axvline(0.15, color="tab:red", lw=0.8, ls="--", label="quality target (0.15 nats/token)")
    ax.axhline(1.0, color="grey", lw=0.8)
    temp = result["config"]["temperature"]
    ax.set_xlabel("excess surprisal, nats/token (-log p(x) - H(p) under the target; 0 = lossless)")
    ax.set_ylabel("speedup over vanilla SD (tok/s)")
    ax.set_title(f"Speed against quality cost: {task}, sampled (T={temp})")
    ax.legend(fontsize=7, loc="best")
    return fig
