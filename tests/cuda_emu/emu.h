// emu.h — run CUDA C++ kernels on the CPU, for tests without a GPU.
//
// Each block's threads are std::threads meeting at a std::barrier for __syncthreads; blocks run
// one after another, so `__shared__` can be function-static storage (shared by the block's
// threads, reused by the next block); threadIdx/blockIdx are thread_local. Built with
// -fsanitize=thread, a missing __syncthreads shows up as a data race on that static storage.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

using std::erf;
using std::exp;
using std::log1p;
using std::tanh;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline thread_local std::barrier<>* emu_block_barrier = nullptr;

#define __global__
#define __launch_bounds__(...)
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

// Launch `kernel` (a callable running one thread's work) over grid x block. A grid or block
// outside CUDA's limits fails here as the launch would on a GPU (exit status 3).
template <class Kernel>
void emu_launch(dim3 grid, dim3 block, Kernel kernel)
{
    const unsigned long long block_threads = 1ull * block.x * block.y * block.z;
    if (grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535 ||
        block_threads < 1 || block_threads > 1024) {
        std::fprintf(stderr, "launch outside CUDA's limits: grid (%u, %u, %u), block (%u, %u, %u)\n", grid.x, grid.y,
                     grid.z, block.x, block.y, block.z);
        std::exit(3);
    }
    blockDim = block;
    gridDim = grid;
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> barrier(threads);
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (unsigned t = 0; t < threads; ++t)
                    pool.emplace_back([&, t] {
                        threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        blockIdx = {bx, by, bz};
                        emu_block_barrier = &barrier;
                        kernel();
                    });
                for (auto& th : pool)
                    th.join();
            }
}
