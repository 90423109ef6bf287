// fl_activations.cuh: GENERATED from kernels/activations.py by `python -m fusedlinear.kernels.cuda`.
// Do not edit; tests/test_cuda_build.py fails when this file and the table disagree.
// Activation table digest: c840970afe88b195
#pragma once

template <typename T> __host__ __device__ __forceinline__ T where(bool c, T x, T y) { return c ? x : y; }
template <typename T> __host__ __device__ __forceinline__ T sigmoid(T x) { return T(1.0) / (T(1.0) + exp(-x)); }

// a = g_ACT(z); ACT is a compile-time constant, so each instance holds one formula
template <int ACT, typename T> __host__ __device__ __forceinline__ T fl_act_forward(T z, T s)
{
    switch (ACT) {
    case 0: return z;  // identity
    case 1: return where(z <= T(0.0), T(0.0), z);  // relu
    case 2: return sigmoid(z);  // sigmoid
    case 3: return tanh(z);  // tanh
    case 4: return T(0.5) * z * (T(1.0) + erf(z * T(0.7071067811865476)));  // gelu
    case 5: return T(0.5) * z * (T(1.0) + tanh(T(0.7978845608028654) * (z + T(0.044715) * z * z * z)));  // gelu_tanh
    case 6: return z * sigmoid(z);  // silu
    case 7: return where(z > T(0.0), z, z * s);  // leaky_relu
    }
    return z;
}

// dz = da * g_ACT'(.), v being the saved tensor's element (a or z, as the table says)
template <int ACT, typename T> __host__ __device__ __forceinline__ T fl_act_backward(T da, T v, T s)
{
    switch (ACT) {
    case 0: { return da; }  // identity
    case 1: { const T a = v; return where(a <= T(0.0), T(0.0), da); }  // relu
    case 2: { const T a = v; return da * (T(1.0) - a) * a; }  // sigmoid
    case 3: { const T a = v; return da * (T(1.0) - a * a); }  // tanh
    case 4: { const T z = v; return da * (T(0.5) * (T(1.0) + erf(z * T(0.7071067811865476))) + z * T(0.3989422804014327) * exp(-T(0.5) * z * z)); }  // gelu
    case 5: { const T z = v; return da * (T(0.5) * (T(1.0) + tanh(T(0.7978845608028654) * (z + T(0.044715) * z * z * z))) + T(0.5) * z * (T(1.0) - tanh(T(0.7978845608028654) * (z + T(0.044715) * z * z * z)) * tanh(T(0.7978845608028654) * (z + T(0.044715) * z * z * z))) * T(0.7978845608028654) * (T(1.0) + T(3.0) * T(0.044715) * z * z)); }  // gelu_tanh
    case 6: { const T z = v; return da * sigmoid(z) * (T(1.0) + z * (T(1.0) - sigmoid(z))); }  // silu
    case 7: { const T z = v; return where(z > T(0.0), da, da * s); }  // leaky_relu
    }
    return da;
}

// X(activation id, activation name, S, TAG) for every activation of the table
#define FL_FOR_EACH_ACTIVATION(X, S, TAG) \
    X(0, identity, S, TAG) \
    X(1, relu, S, TAG) \
    X(2, sigmoid, S, TAG) \
    X(3, tanh, S, TAG) \
    X(4, gelu, S, TAG) \
    X(5, gelu_tanh, S, TAG) \
    X(6, silu, S, TAG) \
    X(7, leaky_relu, S, TAG)
