"""bench_serve.png: aggregate tok/s against concurrency per row, each row's ratio over `ar`, and
TTFT / ITL p99 per row (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from adasd_core.bench.serve_goals import REFERENCE, vs_ar_goal


def plot(result: dict, out: Path) -> Path | None:
    from adasd_core.bench.plots import _pyplot

    rows = [r for r in result["rows"] if r["tokens_per_s"] is not None]
    if not rows:
        return None
    plt = _pyplot()
    names = list(dict.fromkeys(r["method"] for r in rows))
    levels = result["levels"]
    ratios = [n for n in names if any(n in lv.get(f"speedup_vs_{REFERENCE}", {}) for lv in levels)]
    fig, axes = plt.subplots(1, 3 if ratios else 2, figsize=(15 if ratios else 10, 4))
    a1 = axes[0]
    for i, name in enumerate(names):
        mine = [r for r in rows if r["method"] == name]
        a1.plot([r["concurrency"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", color=f"C{i}",
                label=f"{name}, all streams")
        a1.plot([r["concurrency"] for r in mine], [r["request_tokens_per_s"]["p50"] for r in mine], marker=".",
                ls=":", color=f"C{i}", label=f"{name}, one request (p50)")
    if result.get("in_process"):
        a1.axhline(result["in_process"]["tokens_per_s"], ls="--", color="grey",
                   label=f"in process, one request ({result['in_process']['method']})")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("concurrent clients")
    a1.set_ylabel("tokens/s")
    a1.set_title("aggregate tokens/s")
    a1.legend(fontsize=7)
    if ratios:
        a2 = axes[1]
        for name in ratios:
            pts = [(lv["concurrency"], lv[f"speedup_vs_{REFERENCE}"][name]) for lv in levels
                   if name in lv[f"speedup_vs_{REFERENCE}"]]
            a2.plot([c for c, _ in pts], [v for _, v in pts], marker="o", color=f"C{names.index(name)}", label=name)
        a2.axhline(1.0, color="grey", lw=0.8, ls="--")
        levels_c = sorted(lv["concurrency"] for lv in levels)
        a2.step(levels_c, [vs_ar_goal(c) for c in levels_c], where="mid", color="grey", lw=0.8, ls=":",
                label=f"goal over {REFERENCE}")
        a2.set_xscale("log", base=2)
        a2.set_xlabel("concurrent clients")
        a2.set_ylabel(f"aggregate tok/s / {REFERENCE}'s")
        a2.set_title(f"speedup over {REFERENCE}")
        a2.legend(fontsize=7)
    a3 = axes[-1]
    for i, name in enumerate(names):
        mine = [r for r in rows if r["method"] == name]
        c = [r["concurrency"] for r in mine]
        a3.plot(c, [r["ttft_ms"]["p99"] for r in mine], marker="o", color=f"C{i}", label=f"{name} TTFT p99")
        a3.plot(c, [r["itl_ms"]["p99"] for r in mine], marker=".", ls=":", color=f"C{i}", label=f"{name} ITL p99")
    a3.set_xscale("log", base=2)
    a3.set_yscale("log")
    a3.set_xlabel("concurrent clients")
    a3.set_ylabel("ms")
    a3.set_title("latency p99")
    a3.legend(fontsize=7)
    ticks = sorted({r["concurrency"] for r in rows})
    for ax in axes:
        ax.set_xticks(ticks, [str(c) for c in ticks])
        ax.xaxis.set_minor_locator(plt.NullLocator())
    fig.suptitle(f"bench-serve: {result['server']['model']}")
    path = out / "bench_serve.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
