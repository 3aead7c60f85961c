// Host emulation of the CUDA execution model, for checking the kernels on a machine without a
// GPU (selfsup-kernels, feature `host-emulation`). Each emulated block runs its threads as OS
// threads that share one dynamic shared-memory buffer and one barrier (`__syncthreads`); blocks
// run one after another. A thread that returns early drops out of the barrier, as on sm_70+.
// Not emulated: warps (no shuffles are used), memory ordering beyond the barrier, timing.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x, y, z;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;
inline thread_local unsigned char* emu_smem_ptr = nullptr;
inline thread_local std::barrier<>* emu_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define SMEM(T) (reinterpret_cast<T*>(emu_smem_ptr))

inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float emu_half_to_float(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline unsigned short emu_float_to_half(float f) { _Float16 v = (_Float16)f; unsigned short h; std::memcpy(&h, &v, 2); return h; }
using std::max;
using std::min;

inline void emu_launch(dim3 grid, dim3 block, unsigned smem, const std::function<void()>& body) {
    unsigned n = block.x * block.y * block.z;
    std::vector<unsigned char> shared(smem + 16);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                // Garbage, not zeros: a kernel must not rely on shared memory starting zeroed.
                std::fill(shared.begin(), shared.end(), (unsigned char)0x7f);
                std::barrier<> bar((std::ptrdiff_t)n);
                std::vector<std::thread> threads;
                threads.reserve(n);
                for (unsigned t = 0; t < n; ++t) {
                    threads.emplace_back([&, t] {
                        threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        blockIdx = dim3{bx, by, bz};
                        blockDim = block;
                        gridDim = grid;
                        emu_smem_ptr = shared.data();
                        emu_barrier = &bar;
                        body();
                        bar.arrive_and_drop();
                    });
                }
                for (auto& th : threads) th.join();
            }
}

#define EMU_UNPAREN(...) __VA_ARGS__
#define ENTRY(name, params, args, body) \
    extern "C" void name(dim3 grid, dim3 block, unsigned smem, EMU_UNPAREN params) { \
        emu_launch(grid, block, smem, [&] { body args; }); \
    }
