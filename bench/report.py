"""Turn a saved pytest-benchmark run into bench/RESULTS.md and PNG plots of time vs L.

    python -m bench.report RUN.json [MORE.json ...] [--out bench/RESULTS.md] [--plots bench/plots] [--title TEXT]

RUN.json is a ``pytest ... --benchmark-json=RUN.json`` file (or one saved by ``--benchmark-save``
under .benchmarks/). The table lists, per benchmark: ours and the reference package's time (the
``extra_info`` numbers of bench/_timing.py; pytest-benchmark's median when a benchmark has no
extra_info, e.g. the CPU suite), the ratio reference / ours (> 1: we are faster), the roofline floor
and the fraction of it we reach, and per-benchmark extras (tokens/s, peak memory). The plots
(matplotlib, the ``bench`` extra) show scan and SSD time vs L for each N, ours solid, the
reference dashed, from the ``sweep`` benchmarks.
"""

from __future__ import annotations

import argparse
import os
import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _time(us):
    if us is None:
        return "-"
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    if us >= 1e3:
        return f"{us / 1e3:.2f} ms"
    return f"{us:.1f} us"


def _num(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def _rows(data):
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        ours = info.get("ours_us")
        if ours is None:
            ours = b["stats"]["median"] * 1e6
        extras = []
        if info.get("tokens_per_s") is not None:
            tps = f"{info['tokens_per_s']:.0f}"
            if info.get("peer_tokens_per_s"):
                tps += f" vs {info['peer_tokens_per_s']:.0f}"
            extras.append(f"tok/s {tps}")
        if info.get("ours_peak_mib") is not None:
            mem = f"peak {info['ours_peak_mib']:.0f} MiB"
            if info.get("peer_peak_mib") is not None:
                mem += f" vs {info['peer_peak_mib']:.0f} MiB"
            extras.append(mem)
        if info.get("target_us") is not None:
            extras.append(f"target <= {_time(info['target_us'])}")
        if info.get("peer_us") is None and info.get("peer_note"):
            note = info["peer_note"]
            extras.append("no reference: " + (note if len(note) < 90 else note[:87] + "..."))
        rows.append(dict(group=b.get("group") or "", name=b["name"], ours=ours, peer=info.get("peer_us"),
                         ratio=info.get("ratio"), floor=info.get("floor_us"),
                         fraction=info.get("fraction_of_floor"), extras="; ".join(extras), info=info))
    return rows


def _header(data, title):
    machine = data.get("machine_info", {})
    versions = machine.get("ssmcore_bench", {})
    commit = dict(data.get("commit_info", {}))
    if os.environ.get("SSMCORE_BENCH_COMMIT"):  # a run from a `git archive` copy: the commit it was made from
        commit = {"id": os.environ["SSMCORE_BENCH_COMMIT"], "dirty": False}
    gpu = versions.get("gpu") or "none (CPU run)"
    lines = [f"# {title}", "",
             f"- GPU: {gpu}",
             f"- CPU: {machine.get('cpu', {}).get('brand_raw', '?')}, Python {machine.get('python_version', '?')}",
             f"- date: {data.get('datetime', '?')}",
             f"- commit: {commit.get('id', '?')}{' (dirty)' if commit.get('dirty') else ''}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "gpu" and v is not None),
             ]
    if data.get("note"):
        lines.append(f"- note: {data['note']}")
    missing = [k for k in ("mamba_ssm", "causal_conv1d") if not versions.get(k)]
    if missing:
        lines.append(f"- reference package not importable in this run: {', '.join(missing)}")
    lines += ["",
              "Ratio = reference / ours (> 1: ours is faster). Floor = max(bytes / 4.8 TB/s, FLOPs / 989 TFLOP/s, "
              "exp2 / 4.2 T/s); fraction = floor / ours (1 = at the roofline). Times are medians "
              "(see bench/README.md for the method).", ""]
    return lines


def markdown(data, title="Benchmark results", plots=()):
    lines = _header(data, title)
    by_group = defaultdict(list)
    for row in _rows(data):
        by_group[row["group"]].append(row)
    for group in sorted(by_group):
        lines += [f"## {group or 'ungrouped'}", "",
                  "| benchmark | ours | reference | ratio | floor | fraction of floor | notes |",
                  "|---|---|---|---|---|---|---|"]
        for r in by_group[group]:
            lines.append(f"| {r['name']} | {_time(r['ours'])} | {_time(r['peer'])} | {_num(r['ratio'])} | "
                         f"{_time(r['floor'])} | {_num(r['fraction'])} | {r['extras']} |")
        lines.append("")
    for path in plots:
        lines += [f"![{Path(path).stem}]({path})", ""]
    return "\n".join(lines)


def sweeps(data):
    """{'scan': {N: [(L, ours_us, peer_us)]}, 'ssd': ...} from the sweep benchmarks."""
    out = defaultdict(lambda: defaultdict(list))
    for r in _rows(data):
        info = r["info"]
        if info.get("sweep") and info.get("L") is not None:
            out[info["sweep"]][info.get("N")].append((info["L"], r["ours"], r["peer"]))
    return out


def plot(data, folder: Path, relative_to: Path):
    """PNG plots of time vs L; returns their paths relative to `relative_to` (for the markdown)."""
    found = sweeps(data)
    if not found:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib not installed (pip install 'ssmcore[bench]'): no plots", file=sys.stderr)
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, by_n in sorted(found.items()):
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        for i, (n, points) in enumerate(sorted(by_n.items(), key=lambda kv: (kv[0] is None, kv[0]))):
            points.sort()
            ls, ours, peer = zip(*points)
            color = f"C{i}"
            ax.plot(ls, [u / 1e3 for u in ours], "o-", color=color, label=f"ssmcore N={n}")
            if any(p is not None for p in peer):
                pl = [(x, p / 1e3) for x, p in zip(ls, peer) if p is not None]
                ax.plot(*zip(*pl), "s--", color=color, label=f"reference N={n}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("time (ms)")
        ax.set_title({"scan": "selective_scan forward", "ssd": "ssd (mamba_chunk_scan_combined) forward"}.get(
            kind, kind))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"{kind}_time_vs_L.png"
        fig.savefig(path)
        plt.close(fig)
        try:
            written.append(str(path.resolve().relative_to(relative_to.resolve())))
        except ValueError:
            written.append(str(path))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="+",
                        help="pytest-benchmark JSON file(s) (--benchmark-json / --benchmark-save); several are merged")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown file to write")
    parser.add_argument("--plots", default=None, help="folder for the PNG plots (default: next to --out, plots/)")
    parser.add_argument("--title", default="Benchmark results")
    parser.add_argument("--merged", default=None, help="also write the merged runs to this JSON file")
    args = parser.parse_args(argv)
    data = None
    for run in args.run:
        try:
            part = json.loads(Path(run).read_text())
        except (OSError, ValueError) as err:
            parser.error(f"run: cannot read {run!r} as a pytest-benchmark JSON file ({err})")
        if not isinstance(part, dict) or not isinstance(part.get("benchmarks"), list):
            parser.error(f"run: {run!r} has no 'benchmarks' list (not a pytest-benchmark JSON file)")
        if data is None:
            data = part
        else:
            data["benchmarks"] = data["benchmarks"] + part["benchmarks"]
    if args.merged:
        Path(args.merged).write_text(json.dumps(data, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = plot(data, Path(args.plots) if args.plots else out.parent / "plots", out.parent)
    out.write_text(markdown(data, args.title, plots) + "\n")
    print(f"wrote {out} ({len(data['benchmarks'])} benchmarks)" + (f" and {', '.join(plots)}" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
