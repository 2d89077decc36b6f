// Device helpers the CUDA C++ kernels share (cuda_int4.cu, cuda_int8.cu): cuda_rtc.source
// puts this file before a kernel's source.

#pragma once

typedef unsigned int u32;
typedef unsigned short u16;

__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// griddepcontrol: without a programmatic launch, wait returns at once and launch_dependents
// does nothing
__device__ __forceinline__ void let_dependents_start() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The wait is a call of its own: ptxas moves loads past the griddepcontrol.wait instruction
// within a block (it sank the first weights' loads of cuda_int4.cu's 2-chunk kernels after
// it once it had predicated them), not past a call, so a kernel's loads before the wait are
// issued before it and stay in flight through it (tests/test_cuda_machine_code.py)
#if __CUDA_ARCH__ >= 900
__device__ __noinline__ void wait_for_inputs() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
#else
__device__ __forceinline__ void wait_for_inputs() {}
#endif

__device__ __forceinline__ void mma_bf16(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                         u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// (q & mask) | magic in one instruction (the compiler makes two of it: both are constants)
__device__ __forceinline__ u32 and_or(u32 q, u32 mask, u32 magic) {
  u32 r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(q), "r"(mask), "r"(magic));
  return r;
}

__device__ __forceinline__ u16 float_to_bf16(float f) {
  u16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ float bf16_to_float(u32 bits) { return __uint_as_float(bits << 16); }

// v = the sums of a lane's C fragment of row tile mt, added over the `warps` warps of a block
// that each left theirs in partial[warp][4 mt + i][lane] (warps: a compile-time constant)
template <typename T, int ROWS>
__device__ __forceinline__ void add_warps(T* v, const T (*partial)[ROWS][32], int warps, int mt,
                                          int lane) {
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = 0;
#pragma unroll
  for (int other = 0; other < warps; ++other)
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] += partial[other][4 * mt + i][lane];
}
