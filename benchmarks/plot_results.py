"""Plot rows of a benchmark CSV again: one PNG per (kernel, mode), time/eager and GFLOP/s against batch.

    python benchmarks/plot_results.py [benchmarks/results/cpu.csv] [out_dir]
"""

import os
import sys

from fusedlinear.bench import plot, read_csv

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results", "cpu.csv")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(path)
    os.makedirs(out, exist_ok=True)
    rows = read_csv(path)
    for key in dict.fromkeys((r["kernel"], r["mode"]) for r in rows):
        mine = [r for r in rows if (r["kernel"], r["mode"]) == key]
        name = f"{key[0]}_{key[1]}.png" if key[0] != key[1] else f"{key[0]}.png"
        plot(mine, os.path.join(out, name))
        print("wrote", os.path.join(out, name))
