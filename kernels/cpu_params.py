"""The parameter block of the Numba CPU kernels (fusedlinear.kernels.cpu): the index of each
int64 slot. Plain Python, so the backend fills blocks without importing (or compiling) the kernels."""

# The parameter block: int64 slots (P_SLOPE holds a float64's bits). Each kernel has its
# activation compiled in, so the block does not name it.
# P_STAGE splits a kernel for large problems (see fusedlinear.backend.numba_cpu): forward
# 0 = BLAS + epilogue per tile, 1 = BLAS only, 2 = epilogue only; backward_columns 0 = dZ, db and
# dW per block, 1 = dZ and db only, 2 = dW only. P_WHOLE = 1: the call is one whole-matrix tile
# made outside any parallel region, and BLAS may use its own threads (PyTorch's pool again).
(P_THREAD_NUM, P_NUM_THREADS, P_GEMM, P_BLAS_THREADS, P_ALPHA, P_BETA,
 P_X, P_LDX, P_TX, P_W, P_LDW, P_TW, P_M, P_N, P_K,
 P_BIAS, P_A, P_Z, P_SLOPE, P_TM, P_TN,
 P_DA, P_SAVED, P_DZ, P_DX, P_DW, P_DB, P_CB, P_TK, P_WHOLE, P_STAGE) = range(31)
N_PARAMS = 31
