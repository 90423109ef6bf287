// fused_linear.cu — the "own" CUDA engine's GEMM: a tiled SIMT GEMM with the forward epilogue
// (bias + activation, one write of A and of Z) in registers. Picked with FUSEDLINEAR_CUDA_GEMM=own;
// the default engine ("vendor") runs its GEMMs in cuBLAS through PyTorch instead. Backward of the
// own engine: dZ and db by fl_elementwise.cu's fl_grad_* (as the vendor engine), then dX and dW here.
//
// Loaded by kernels/cuda.py with cupy.RawModule (headers inlined; extern "C" names); compiled by
// nvcc in the tests for register/spill reports, and by g++ in the CPU emulation harness.
// Tile sizes come in as -D options from kernels/tiling.py, the one place they are set.
//
// Shapes (row-major, leading dimensions ld*): X (M, K), W (N, K), b (N), Z and A (M, N).
//   forward   A = g(X Wᵀ + b)     fl_gemm_forward_<act>_<dtype>  = fl_gemm_body<T, false, true, ACT>
//   backward  dX = dZ W           fl_gemm_nn_<dtype>             = fl_gemm_body<T, false, false, -1>
//             dW = dZᵀ X          fl_gemm_tn_<dtype>             = fl_gemm_body<T, true, false, -1>
// Grid: x = tiles along M (up to 2^31 - 1, so any batch), y = tiles along N (<= 65535, asserted by
// the plans). float32 and float64 only; products accumulate in T. Deterministic: no atomics.

#include "fl_activations.cuh"

#ifndef FL_TILE_M
#error "compile with the -D options of fusedlinear.kernels.tiling.cuda_defines()"
#endif

#define FL_THREADS_N (FL_TILE_N / FL_THREAD_N)
#define FL_THREADS_M (FL_TILE_M / FL_THREAD_M)
#define FL_THREADS (FL_THREADS_M * FL_THREADS_N)

typedef long long i64;

// C (M, N) = op(A) (M, K) · op(B) (K, N), then, if ACT >= 0, the epilogue.
//   op(A)[m, k] = TA ? A[k * lda + m] : A[m * lda + k]
//   op(B)[k, n] = TB ? B[n * ldb + k] : B[k * ldb + n]
//   ACT < 0: C = acc.  ACT >= 0: z = acc + bias[n] (bias may be null); Z[m, n] = z if Z is not
//   null; C[m, n] = g_ACT(z).
// One block computes a FL_TILE_M x FL_TILE_N tile; thread (ty, tx) owns rows ty + i*FL_THREADS_M
// and columns tx + j*FL_THREADS_N (strided, so a warp's stores are contiguous along n). The shared
// tiles have one padding column, so the stores of a non-transposed tile (consecutive threads,
// consecutive k) fall in different banks.
template <typename T, bool TA, bool TB, int ACT>
__device__ __forceinline__ void fl_gemm_body(T* __restrict__ C, T* __restrict__ Z, const T* __restrict__ A,
                                             const T* __restrict__ B, const T* __restrict__ bias, i64 M, i64 N,
                                             i64 K, i64 lda, i64 ldb, i64 ldc, double slope)
{
    __shared__ T As[FL_TILE_K][FL_TILE_M + 1];
    __shared__ T Bs[FL_TILE_K][FL_TILE_N + 1];
    const int tid = threadIdx.x;
    const int tx = tid % FL_THREADS_N;
    const int ty = tid / FL_THREADS_N;
    const i64 m0 = (i64)blockIdx.x * FL_TILE_M;
    const i64 n0 = (i64)blockIdx.y * FL_TILE_N;

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
    const T s = (T)slope;
#pragma unroll
    for (int i = 0; i < FL_THREAD_M; ++i) {
        const i64 m = m0 + ty + i * FL_THREADS_M;
        if (m >= M)
            continue;
#pragma unroll
        for (int j = 0; j < FL_THREAD_N; ++j) {
            const i64 n = n0 + tx + j * FL_THREADS_N;
            if (n >= N)
                continue;
            T v = acc[i][j];
            if (ACT >= 0) {
                if (bias)
                    v += bias[n];
                if (Z)
                    Z[m * ldc + n] = v;
                v = fl_act_forward<ACT, T>(v, s);
            }
            C[m * ldc + n] = v;
        }
    }
}

#define FL_GEMM_FORWARD(ID, NAME, T, TAG)                                                          \
    extern "C" __global__ void fl_gemm_forward_##NAME##_##TAG(T* C, T* Z, const T* A, const T* B, const T* bias, \
                                                              i64 M, i64 N, i64 K, i64 lda, i64 ldb, i64 ldc, \
                                                              double slope)                        \
    {                                                                                              \
        fl_gemm_body<T, false, true, ID>(C, Z, A, B, bias, M, N, K, lda, ldb, ldc, slope);         \
    }
#define FL_GEMM_PLAIN(T, TAG)                                                                      \
    extern "C" __global__ void fl_gemm_nn_##TAG(T* C, const T* A, const T* B, i64 M, i64 N, i64 K, i64 lda, \
                                                i64 ldb, i64 ldc)                                  \
    {                                                                                              \
        fl_gemm_body<T, false, false, -1>(C, nullptr, A, B, nullptr, M, N, K, lda, ldb, ldc, 0.0); \
    }                                                                                              \
    extern "C" __global__ void fl_gemm_tn_##TAG(T* C, const T* A, const T* B, i64 M, i64 N, i64 K, i64 lda, \
                                                i64 ldb, i64 ldc)                                  \
    {                                                                                              \
        fl_gemm_body<T, true, false, -1>(C, nullptr, A, B, nullptr, M, N, K, lda, ldb, ldc, 0.0);  \
    }
// Every instance: X(ACT_ID, act_name, T, dtype_tag) and Y(T, dtype_tag), for the emulation driver too.
#define FL_GEMM_FORWARD_INSTANCES(X) FL_FOR_EACH_ACTIVATION(X, float, f32) FL_FOR_EACH_ACTIVATION(X, double, f64)
#define FL_GEMM_PLAIN_INSTANCES(Y) Y(float, f32) Y(double, f64)
FL_GEMM_FORWARD_INSTANCES(FL_GEMM_FORWARD)
FL_GEMM_PLAIN_INSTANCES(FL_GEMM_PLAIN)
