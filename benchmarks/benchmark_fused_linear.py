"""One fused layer beside eager PyTorch, torch.compile and bare BLAS (Liger-Kernel style script).

    python benchmarks/benchmark_fused_linear.py [--shape 784x512] [--mode fwdbwd] [--activation relu] ...

Every option of `fusedlinear bench layer` applies; rows are appended to benchmarks/results/cpu.csv.
"""

import os
import sys

from fusedlinear.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    sys.exit(main(["bench", "layer", "--csv", os.path.join(HERE, "results", "cpu.csv"), *sys.argv[1:]]))
