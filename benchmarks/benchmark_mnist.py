"""The MNIST model: training step (default) or inference (`infer`), fused vs eager vs compile vs BLAS.

    python benchmarks/benchmark_mnist.py [step|infer] [--batches 1,64,256,1024] [--rounds 5] ...

Every option of `fusedlinear bench step` applies; rows are appended to benchmarks/results/cpu.csv.
"""

import os
import sys

from fusedlinear.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    args = sys.argv[1:]
    what = args.pop(0) if args and args[0] in ("step", "infer") else "step"
    sys.exit(main(["bench", what, "--csv", os.path.join(HERE, "results", "cpu.csv"), *args]))
