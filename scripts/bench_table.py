#!/usr/bin/env python3
"""Prints the README's benchmark table (Markdown) from `aioctx-bench --json FILE` output.

Usage: python3 scripts/bench_table.py bench.json
For each workload: aioctx's median and p99, the best peer's median, and the ratio aioctx / best
peer (lower is better); "floor" (the raw eventfd + epoll loop) and "spin" are listed separately,
never as peers.
"""
import json
import sys


def fmt(ns):
    if ns >= 1_000_000:
        return f"{ns / 1_000_000:.2f} ms"
    if ns >= 10_000:
        return f"{ns / 1_000:.1f} µs"
    return f"{ns:.0f} ns"


def main(path):
    rows = json.load(open(path))
    workloads = []
    for r in rows:
        if r["workload"] not in workloads:
            workloads.append(r["workload"])
    print("| workload | aioctx median (p99) | best peer | peer median | aioctx / peer | aioctx / floor |")
    print("|---|---|---|---|---|---|")
    for w in workloads:
        mine = [r for r in rows if r["workload"] == w]
        ours = next((r for r in mine if r["system"] == "aioctx"), None)
        if ours is None:
            continue
        peers = [r for r in mine if r["system"] not in ("aioctx", "floor", "spin", "aioctx-poll")]
        best = min(peers, key=lambda r: r["median_ns"]) if peers else None
        floor = next((r for r in mine if r["system"] == "floor"), None)
        peer_cells = (
            [best["system"], fmt(best["median_ns"]), f"{ours['median_ns'] / best['median_ns']:.2f}"]
            if best
            else ["–", "–", "–"]
        )
        floor_cell = f"{ours['median_ns'] / floor['median_ns']:.2f}" if floor else "–"
        print(
            f"| {w} | {fmt(ours['median_ns'])} ({fmt(ours['p99_ns'])}) | "
            + " | ".join(peer_cells)
            + f" | {floor_cell} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
