// Shared by every kernel file: selfsup-kernels prepends this text to each `.cu` before NVRTC
// compiles it (NVRTC gets no include paths), and the host emulation force-includes it.
//
// - Element types: f32, and bf16 / f16 as 16-bit structs converted by hand (no cuda_fp16.h /
//   cuda_bf16.h, so NVRTC needs no headers). Arithmetic is always f32.
// - Shared memory is dynamic only (`SMEM(T)`), so the host emulation can give each emulated
//   block its own buffer.
// - `ENTRY(name, (params), (args), body)` defines an `extern "C"` kernel that calls a templated
//   `__device__` body. Under SELFSUP_HOST_EMULATION it defines instead a host function
//   `name(grid, block, smem, params...)` that runs the body on an emulated grid.

#define SELFSUP_NONE 0xffffffffu

struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };

#ifdef SELFSUP_HOST_EMULATION
#include "host_emulation.h"
#else
#define SMEM(T) (reinterpret_cast<T*>(selfsup_smem))
extern __shared__ __attribute__((aligned(16))) unsigned char selfsup_smem[];
#define EMU_UNPAREN(...) __VA_ARGS__
#define ENTRY(name, params, args, body) \
    extern "C" __global__ void name(EMU_UNPAREN params) { body args; }
#endif

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((unsigned)v.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 v) {
#ifdef SELFSUP_HOST_EMULATION
    return emu_half_to_float(v.bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
#endif
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) {
    unsigned u = __float_as_uint(v);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
    } else {
        r.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
    }
    return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) {
    f16 r;
#ifdef SELFSUP_HOST_EMULATION
    r.bits = emu_float_to_half(v);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
#endif
    return r;
}

// Instantiates `ENTRY` for f32, bf16 and f16: `FOR_DTYPES(M)` calls `M(T, suffix)`.
#define FOR_DTYPES(M) M(float, f32) M(bf16, bf16) M(f16, f16)

// Grid-stride loop over `total` elements.
#define GRID_STRIDE(e, total) \
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (long long)(total); \
         e += (long long)gridDim.x * blockDim.x)

// Sums `chunks` partial rows of `len` floats in a fixed order (deterministic).
__device__ __forceinline__ float sum_chunks(const float* partial, long long i, long long len, int chunks) {
    float acc = 0.f;
    for (int k = 0; k < chunks; ++k) acc += partial[k * len + i];
    return acc;
}
