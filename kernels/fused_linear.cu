// fused_linear.cu — CUDA kernels of fusedlinear: fused Linear + activation, forward and backward.
//
// Loaded at run time by kernels/cuda.py with cupy.RawModule (NVRTC; templates instantiated with
// name_expressions); compiled by nvcc in the tests for register/spill reports (with
// FL_EXPLICIT_INSTANTIATIONS), and by g++ in the CPU emulation harness (tests/cuda_emu/).
// Tile sizes come in as -D options from kernels/tiling.py, the one place they are set.
//
// Shapes (row-major, leading dimensions ld*): X (M, K), W (N, K), b (N), Z and A (M, N).
//   forward   A = g(X Wᵀ + b)            fl_gemm<T, false, true>  epilogue: + b, g, one write of A (and Z)
//   backward  dZ = dA ⊙ g'(A or Z)       fl_grad_z<T>
//             db = Σ_rows dZ             fl_column_sum<T> twice (row chunks, then the chunk partials)
//             dX = dZ W                  fl_gemm<T, false, false>
//             dW = dZᵀ X                 fl_gemm<T, true, false>
// All index arithmetic is 64-bit; any M, N, K (bounds-checked loads, no alignment assumption).
// No atomics: every reduction has a fixed order, so results are deterministic.

#include "fl_activations.cuh"

#ifndef FL_TILE_M
#error "compile with the -D options of fusedlinear.kernels.tiling.cuda_defines()"
#endif

#define FL_THREADS_N (FL_TILE_N / FL_THREAD_N)
#define FL_THREADS_M (FL_TILE_M / FL_THREAD_M)
#define FL_THREADS (FL_THREADS_M * FL_THREADS_N)

typedef long long i64;

// ---------------------------------------------------------------------------------------------
// C (M, N) = op(A) (M, K) · op(B) (K, N), then the epilogue.
//   op(A)[m, k] = TA ? A[k * lda + m] : A[m * lda + k]
//   op(B)[k, n] = TB ? B[n * ldb + k] : B[k * ldb + n]
//   act < 0: C = acc.  act >= 0: z = acc + bias[n] (bias may be null); Z[m, n] = z if Z is not
//   null; C[m, n] = g_act(z).
// One block computes a FL_TILE_M x FL_TILE_N tile; thread (ty, tx) owns rows ty + i*FL_THREADS_M
// and columns tx + j*FL_THREADS_N (strided, so a warp's stores are contiguous along n).
// K is walked FL_TILE_K at a time through shared memory; products accumulate in T.
template <typename T, bool TA, bool TB>
__global__ void fl_gemm(T* __restrict__ C, T* __restrict__ Z, const T* __restrict__ A,
                        const T* __restrict__ B, const T* __restrict__ bias, i64 M, i64 N, i64 K,
                        i64 lda, i64 ldb, i64 ldc, int act, T slope)
{
    __shared__ T As[FL_TILE_K][FL_TILE_M];
    __shared__ T Bs[FL_TILE_K][FL_TILE_N];
    const int tid = threadIdx.x;
    const int tx = tid % FL_THREADS_N;
    const int ty = tid / FL_THREADS_N;
    const i64 m0 = (i64)blockIdx.y * FL_TILE_M;
    const i64 n0 = (i64)blockIdx.x * FL_TILE_N;

    T acc[FL_THREAD_M][FL_THREAD_N];
    for (int i = 0; i < FL_THREAD_M; ++i)
        for (int j = 0; j < FL_THREAD_N; ++j)
            acc[i][j] = T(0);

    for (i64 k0 = 0; k0 < K; k0 += FL_TILE_K) {
        // Load the tiles; consecutive threads read consecutive addresses of the stored layout.
        for (int e = tid; e < FL_TILE_M * FL_TILE_K; e += FL_THREADS) {
            const int mm = TA ? e % FL_TILE_M : e / FL_TILE_K;
            const int kk = TA ? e / FL_TILE_M : e % FL_TILE_K;
            const i64 gm = m0 + mm, gk = k0 + kk;
            T v = T(0);
            if (gm < M && gk < K)
                v = TA ? A[gk * lda + gm] : A[gm * lda + gk];
            As[kk][mm] = v;
        }
        for (int e = tid; e < FL_TILE_N * FL_TILE_K; e += FL_THREADS) {
            const int nn = TB ? e / FL_TILE_K : e % FL_TILE_N;
            const int kk = TB ? e % FL_TILE_K : e / FL_TILE_N;
            const i64 gn = n0 + nn, gk = k0 + kk;
            T v = T(0);
            if (gn < N && gk < K)
                v = TB ? B[gn * ldb + gk] : B[gk * ldb + gn];
            Bs[kk][nn] = v;
        }
        __syncthreads();
        for (int kk = 0; kk < FL_TILE_K; ++kk) {
            T a[FL_THREAD_M], b[FL_THREAD_N];
            for (int i = 0; i < FL_THREAD_M; ++i)
                a[i] = As[kk][ty + i * FL_THREADS_M];
            for (int j = 0; j < FL_THREAD_N; ++j)
                b[j] = Bs[kk][tx + j * FL_THREADS_N];
            for (int i = 0; i < FL_THREAD_M; ++i)
                for (int j = 0; j < FL_THREAD_N; ++j)
                    acc[i][j] += a[i] * b[j];
        }
        __syncthreads();  // the next iteration overwrites As/Bs
    }

    // Epilogue, in registers: bias, activation, one write of C (and of Z where backward needs it).
    for (int i = 0; i < FL_THREAD_M; ++i) {
        const i64 m = m0 + ty + i * FL_THREADS_M;
        if (m >= M)
            continue;
        for (int j = 0; j < FL_THREAD_N; ++j) {
            const i64 n = n0 + tx + j * FL_THREADS_N;
            if (n >= N)
                continue;
            T v = acc[i][j];
            if (act >= 0) {
                if (bias)
                    v += bias[n];
                if (Z)
                    Z[m * ldc + n] = v;
                v = fl_act_forward<T>(act, v, slope);
            }
            C[m * ldc + n] = v;
        }
    }
}

// dZ[i] = dA[i] ⊙ g'(saved[i]) over `count` contiguous elements (saved null: identity).
template <typename T>
__global__ void fl_grad_z(T* __restrict__ dz, const T* __restrict__ da, const T* __restrict__ saved,
                          i64 count, int act, T slope)
{
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride)
        dz[i] = fl_act_backward<T>(act, da[i], saved ? saved[i] : T(0), slope);
}

// out[c, n] = Σ_{m in chunk c} x[m, n] for x (M, N) contiguous, chunks of `rows` rows
// (blockIdx.y = chunk). Summed in double in a fixed order: deterministic, no atomics.
template <typename T>
__global__ void fl_column_sum(T* __restrict__ out, const T* __restrict__ x, i64 M, i64 N, i64 rows)
{
    const i64 n = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N)
        return;
    const i64 begin = (i64)blockIdx.y * rows;
    const i64 end = begin + rows < M ? begin + rows : M;
    double acc = 0.0;
    for (i64 m = begin; m < end; ++m)
        acc += (double)x[m * N + n];
    out[(i64)blockIdx.y * N + n] = (T)acc;
}

#ifdef FL_EXPLICIT_INSTANTIATIONS
// For nvcc's register report and for the emulation harness; CuPy instantiates by name instead.
#define FL_INSTANTIATE(T)                                                                          \
    template __global__ void fl_gemm<T, false, true>(T*, T*, const T*, const T*, const T*, i64, i64,  \
                                                     i64, i64, i64, i64, int, T);                   \
    template __global__ void fl_gemm<T, false, false>(T*, T*, const T*, const T*, const T*, i64, i64, \
                                                      i64, i64, i64, i64, int, T);                  \
    template __global__ void fl_gemm<T, true, false>(T*, T*, const T*, const T*, const T*, i64, i64,  \
                                                     i64, i64, i64, i64, int, T);                   \
    template __global__ void fl_grad_z<T>(T*, const T*, const T*, i64, int, T);                    \
    template __global__ void fl_column_sum<T>(T*, const T*, i64, i64, i64);
FL_INSTANTIATE(float)
FL_INSTANTIATE(double)
#endif
