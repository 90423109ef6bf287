// fl_types.cuh — storage types of the CUDA kernels and their compute types, without CUDA headers.
//
// A kernel is instantiated on a *storage* type S (what the tensor holds) and computes in
// fl_num<S>::C: float for float16, bfloat16 and float32 (as PyTorch's element-wise kernels do),
// double for float64. float16 and bfloat16 are 16-bit patterns here (no cuda_fp16.h, which NVRTC
// may not find): converted on the GPU by the PTX cvt instructions (round to nearest even, no
// flush), and on the CPU (the emulation harness, tests/cuda_emu) by exact integer/float code with
// the same rounding, so the emulator rounds to the same storage format as the GPU.
#pragma once

struct fl_f16 {
    unsigned short bits;
};
struct fl_bf16 {
    unsigned short bits;
};

__host__ __device__ __forceinline__ unsigned fl_float_bits(float f)
{
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    unsigned u;
    __builtin_memcpy(&u, &f, sizeof u);
    return u;
#endif
}

__host__ __device__ __forceinline__ float fl_bits_float(unsigned u)
{
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
#endif
}

// IEEE half <-> float, round to nearest even. Host: the branch-free conversions of the FP16
// library (M. Dukhan), which c10::Half uses too; they need IEEE float arithmetic without
// flush-to-zero, which the host has.
__host__ __device__ __forceinline__ float fl_half_to_float(unsigned short h)
{
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    const unsigned w = (unsigned)h << 16;
    const unsigned sign = w & 0x80000000u;
    const unsigned two_w = w + w;
    const float normalized = fl_bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = fl_bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
    return fl_bits_float(sign | (two_w < (1u << 27) ? fl_float_bits(denormalized) : fl_float_bits(normalized)));
#endif
}

__host__ __device__ __forceinline__ unsigned short fl_float_to_half(float f)
{
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const unsigned w = fl_float_bits(f);
    const unsigned shl1_w = w + w;
    const unsigned sign = w & 0x80000000u;
    unsigned bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u)
        bias = 0x71000000u;
    base = fl_bits_float((bias >> 1) + 0x07800000u) + base;
    const unsigned bits = fl_float_bits(base);
    const unsigned nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (unsigned short)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
}

// bfloat16 <-> float: the upper half of a float; round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16).
__host__ __device__ __forceinline__ float fl_bf16_to_float(unsigned short h)
{
    return fl_bits_float((unsigned)h << 16);
}

__host__ __device__ __forceinline__ unsigned short fl_float_to_bf16(float f)
{
    const unsigned u = fl_float_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return 0x7FC0;
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// fl_num<S>: C = compute type, load(S) -> C, store(C) -> S.
template <typename S> struct fl_num;
template <> struct fl_num<float> {
    typedef float C;
    static __host__ __device__ __forceinline__ C load(float v) { return v; }
    static __host__ __device__ __forceinline__ float store(C v) { return v; }
};
template <> struct fl_num<double> {
    typedef double C;
    static __host__ __device__ __forceinline__ C load(double v) { return v; }
    static __host__ __device__ __forceinline__ double store(C v) { return v; }
};
template <> struct fl_num<fl_f16> {
    typedef float C;
    static __host__ __device__ __forceinline__ C load(fl_f16 v) { return fl_half_to_float(v.bits); }
    static __host__ __device__ __forceinline__ fl_f16 store(C v) { return fl_f16{fl_float_to_half(v)}; }
};
template <> struct fl_num<fl_bf16> {
    typedef float C;
    static __host__ __device__ __forceinline__ C load(fl_bf16 v) { return fl_bf16_to_float(v.bits); }
    static __host__ __device__ __forceinline__ fl_bf16 store(C v) { return fl_bf16{fl_float_to_bf16(v)}; }
};

// fl_vec<S>: 16 bytes of S (8 float16/bfloat16, 4 float, 2 double), moved by one 16-byte load or
// store (ld/st.global.v4 on the GPU: a warp then moves 512 bytes per instruction instead of 64 for
// 2-byte scalars). Only for addresses that are multiples of 16 (fl_aligned16); callers check.
template <typename S> struct alignas(16) fl_vec {
    static constexpr int N = 16 / sizeof(S);
    S v[N];
};

__host__ __device__ __forceinline__ bool fl_aligned16(const void* p)
{
    return ((unsigned long long)p & 15ull) == 0;  // a null pointer counts as aligned
}

template <typename S> __host__ __device__ __forceinline__ fl_vec<S> fl_load16(const S* p)
{
#ifdef __CUDA_ARCH__
    return *reinterpret_cast<const fl_vec<S>*>(p);
#else
    if (!fl_aligned16(p))  // the emulator faults where the GPU would ("misaligned address")
        __builtin_trap();
    fl_vec<S> r;  // (a copy, as C++ aliasing rules want)
    __builtin_memcpy(&r, p, sizeof r);
    return r;
#endif
}

template <typename S> __host__ __device__ __forceinline__ void fl_store16(S* p, const fl_vec<S>& r)
{
#ifdef __CUDA_ARCH__
    // One st.global.v4 by hand: written as a struct assignment, NVVM (nvcc 13.0, NVRTC 13.0) split
    // the dZ+db pass's store into 4-8 scalar stores in 55 of its 64 instances (every activation
    // with a branch in g'); the forward pass's stayed whole. (A generic address of global memory
    // is its global address, as CUTLASS's global stores assume.)
    // (NVRTC has no __builtin_memcpy: the words through a union, which NVVM and g++ define.)
    union {
        fl_vec<S> v;
        unsigned w[4];
    } u;
    u.v = r;
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.w[0]), "r"(u.w[1]), "r"(u.w[2]),
                 "r"(u.w[3])
                 : "memory");
#else
    if (!fl_aligned16(p))
        __builtin_trap();
    __builtin_memcpy(p, &r, sizeof r);
#endif
}
