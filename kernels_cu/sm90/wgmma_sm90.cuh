// wgmma.mma_async wrappers (sm_90a): m64nNk16, fp32 accumulate, fp16/bf16 operands.
//
// Accumulator layout (PTX ISA, "wgmma register fragments"): warp w of the warpgroup owns rows
// 16w..16w+15; within it, with g = lane / 4 and t = lane % 4, d[j][0..1] = (row g, cols 8j+2t,
// 8j+2t+1) and d[j][2..3] = (row g+8, same cols): the mma.sync m16n8 C fragment repeated along N.
// The register A operand (m64k16) is the mma.sync m16n8k16 A fragment of the warp's 16 rows, so
// the fp32 accumulator of S = Q K^T, packed pairwise, is already the A operand of O += P V.
//
// Inline asm needs literal operand numbers, so per N the accumulator operands and their
// placeholders are spelled out (CUFLASH_WGMMA_D<N>, _LIST<N>, each extending the smaller N's;
// regular text, written once by a generator); one macro, CUFLASH_WGMMA_SPEC, makes every specialisation from them, for each N the
// kernels use and both fp16 and bf16 (the instruction's type is part of its literal text).
// Ordering contract (PTX ISA): `fence()` before the first wgmma that reads registers written by
// ordinary instructions, `commit()` after issuing, `wait<n>()` before touching d or a again.
#pragma once

#include "../core/common.cuh"

namespace cuflash {

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(kPending) : "memory");
}

// Pins registers across an asynchronous wgmma: the compiler may neither move reads or writes of
// them across this point nor assume their values unchanged.
template <int kN> __device__ __forceinline__ void fence_operand(float (&d)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e]) :: "memory");
}
template <int kN> __device__ __forceinline__ void fence_operand(uint32 (&a)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[j][e]) :: "memory");
}

// D (64 x N, fp32) (+)= A (64 x 16) * B (16 x N). SS: A and B from shared-memory descriptors,
// `kTransA` / `kTransB` 1 when that operand is MN-major (0, K-major, by default). RS: A from
// registers, B from a descriptor, `kTransB` 1 when B is MN-major.
// `accumulate` 0 overwrites D.
template <typename T, int N> struct Wgmma;

// One specialisation for operand type T (its PTX name TS) and N (J = N / 8 accumulator groups per
// thread): the accumulators are operands %0 .. %(N/2 - 1) (CUFLASH_WGMMA_D<N>, _LIST<N>), and
// R0 .. R6 are the numbers of the operands after them (N/2 .. N/2 + 6), given as literals because
// inline asm needs literal operand numbers.
#define CUFLASH_WGMMA_SPEC(T, TS, N, J, R0, R1, R2, R3, R4, R5, R6) \
template <> struct Wgmma<T, N> { \
  template <int kTransA = 0, int kTransB = 0> \
  static __device__ __forceinline__ void ss(float (&d)[J][4], uint64 desc_a, uint64 desc_b, int accumulate) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %" #R2 ", 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TS "." TS " " \
        "{" CUFLASH_WGMMA_LIST##N "}, " \
        "%" #R0 ", %" #R1 ", p, 1, 1, %" #R3 ", %" #R4 ";\n}\n" \
        : CUFLASH_WGMMA_D##N \
        : "l"(desc_a), "l"(desc_b), "r"(accumulate), \
          "n"(kTransA), "n"(kTransB)); \
  } \
  template <int kTransB> \
  static __device__ __forceinline__ void rs(float (&d)[J][4], const uint32 (&a)[4], uint64 desc_b, int accumulate) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %" #R5 ", 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TS "." TS " " \
        "{" CUFLASH_WGMMA_LIST##N "}, " \
        "{%" #R0 ", %" #R1 ", %" #R2 ", %" #R3 "}, %" #R4 ", p, 1, 1, %" #R6 ";\n}\n" \
        : CUFLASH_WGMMA_D##N \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), \
          "n"(kTransB)); \
  } \
};
#define CUFLASH_WGMMA_SPECS(N, J, R0, R1, R2, R3, R4, R5, R6) \
  CUFLASH_WGMMA_SPEC(f16, "f16", N, J, R0, R1, R2, R3, R4, R5, R6) \
  CUFLASH_WGMMA_SPEC(bf16, "bf16", N, J, R0, R1, R2, R3, R4, R5, R6)

// Accumulator operands of N (those of the next smaller N, then the rest), and their placeholders.
#define CUFLASH_WGMMA_D32 \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), \
  "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
  "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
  "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
#define CUFLASH_WGMMA_LIST32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define CUFLASH_WGMMA_D64 \
  CUFLASH_WGMMA_D32, \
  "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), \
  "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
  "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), \
  "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define CUFLASH_WGMMA_LIST64 CUFLASH_WGMMA_LIST32 ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define CUFLASH_WGMMA_D80 \
  CUFLASH_WGMMA_D64, \
  "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), \
  "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3])
#define CUFLASH_WGMMA_LIST80 CUFLASH_WGMMA_LIST64 ", %32, %33, %34, %35, %36, %37, %38, %39"
#define CUFLASH_WGMMA_D128 \
  CUFLASH_WGMMA_D80, \
  "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), \
  "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), \
  "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), \
  "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), \
  "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), \
  "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
#define CUFLASH_WGMMA_LIST128 CUFLASH_WGMMA_LIST80 ", %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define CUFLASH_WGMMA_D192 \
  CUFLASH_WGMMA_D128, \
  "+f"(d[16][0]), "+f"(d[16][1]), "+f"(d[16][2]), "+f"(d[16][3]), \
  "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3]), \
  "+f"(d[18][0]), "+f"(d[18][1]), "+f"(d[18][2]), "+f"(d[18][3]), \
  "+f"(d[19][0]), "+f"(d[19][1]), "+f"(d[19][2]), "+f"(d[19][3]), \
  "+f"(d[20][0]), "+f"(d[20][1]), "+f"(d[20][2]), "+f"(d[20][3]), \
  "+f"(d[21][0]), "+f"(d[21][1]), "+f"(d[21][2]), "+f"(d[21][3]), \
  "+f"(d[22][0]), "+f"(d[22][1]), "+f"(d[22][2]), "+f"(d[22][3]), \
  "+f"(d[23][0]), "+f"(d[23][1]), "+f"(d[23][2]), "+f"(d[23][3])
#define CUFLASH_WGMMA_LIST192 CUFLASH_WGMMA_LIST128 ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define CUFLASH_WGMMA_D256 \
  CUFLASH_WGMMA_D192, \
  "+f"(d[24][0]), "+f"(d[24][1]), "+f"(d[24][2]), "+f"(d[24][3]), \
  "+f"(d[25][0]), "+f"(d[25][1]), "+f"(d[25][2]), "+f"(d[25][3]), \
  "+f"(d[26][0]), "+f"(d[26][1]), "+f"(d[26][2]), "+f"(d[26][3]), \
  "+f"(d[27][0]), "+f"(d[27][1]), "+f"(d[27][2]), "+f"(d[27][3]), \
  "+f"(d[28][0]), "+f"(d[28][1]), "+f"(d[28][2]), "+f"(d[28][3]), \
  "+f"(d[29][0]), "+f"(d[29][1]), "+f"(d[29][2]), "+f"(d[29][3]), \
  "+f"(d[30][0]), "+f"(d[30][1]), "+f"(d[30][2]), "+f"(d[30][3]), \
  "+f"(d[31][0]), "+f"(d[31][1]), "+f"(d[31][2]), "+f"(d[31][3])
#define CUFLASH_WGMMA_LIST256 CUFLASH_WGMMA_LIST192 ", %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"

CUFLASH_WGMMA_SPECS(32, 4, 16, 17, 18, 19, 20, 21, 22)
CUFLASH_WGMMA_SPECS(64, 8, 32, 33, 34, 35, 36, 37, 38)
CUFLASH_WGMMA_SPECS(80, 10, 40, 41, 42, 43, 44, 45, 46)
CUFLASH_WGMMA_SPECS(128, 16, 64, 65, 66, 67, 68, 69, 70)
CUFLASH_WGMMA_SPECS(192, 24, 96, 97, 98, 99, 100, 101, 102)
CUFLASH_WGMMA_SPECS(256, 32, 128, 129, 130, 131, 132, 133, 134)

#undef CUFLASH_WGMMA_D32
#undef CUFLASH_WGMMA_LIST32
#undef CUFLASH_WGMMA_D64
#undef CUFLASH_WGMMA_LIST64
#undef CUFLASH_WGMMA_D80
#undef CUFLASH_WGMMA_LIST80
#undef CUFLASH_WGMMA_D128
#undef CUFLASH_WGMMA_LIST128
#undef CUFLASH_WGMMA_D192
#undef CUFLASH_WGMMA_LIST192
#undef CUFLASH_WGMMA_D256
#undef CUFLASH_WGMMA_LIST256
#undef CUFLASH_WGMMA_SPECS
#undef CUFLASH_WGMMA_SPEC

}  // namespace cuflash
