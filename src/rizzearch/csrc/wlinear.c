/* Weight-only low-precision linear layer for decoding: Y (M, N) = X (M, K) @ W^T (+ bias), M small.

   Called from rizzearch/ops/wlinear.py (through ctypes), which holds the reference form this kernel
   is tested against (tests/ops/test_wlinear.py). W keeps nn.Linear's (N, K) row-major layout in one
   of three formats, read in place:
     0: float32;
     1: bfloat16 (the top 16 bits of a float32: widened by a shift, exact);
     2: int8 with one float32 scale per output row (W[j, :] = scale[j] * q[j, :]).
   Activations and accumulation are float32. Batch-1 decoding streams every weight once per token,
   so the time is the weight bytes over the read bandwidth: bf16 halves them, int8 quarters them.
   Plain C with GCC/Clang vector extensions (compiled with -march=native: AVX-512, AVX2 or SSE as the
   CPU has them); OpenMP splits the outputs across threads when it is there. */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "wl_dots.h"


/* Y (M, N) = X (M, K) @ W^T, plus bias (N) when it is not NULL. wtype as above; scale (N) for int8.
   Each thread takes a contiguous share of the outputs, cut at multiples of 16 (cache lines of Y).
   Returns 0, or 1 for an unknown wtype (nothing is written). */
int wl_linear(int wtype, const void *W, const float *scale, const float *bias, const float *X, int M, int K,
              int N, float *Y, int nthreads) {
    if (wtype < 0 || wtype > 2 || (wtype == 2 && !scale)) return 1;
#pragma omp parallel num_threads(nthreads)
    {
        int nt, tid;
        THREAD_IDS(nt, tid);
        int j0, j1;
        share(N, nt, tid, &j0, &j1);
        dots(wtype, W, scale, K, X, M, j0, j1, Y, N);
        if (bias)
            for (int b = 0; b < M; b++)
                for (int j = j0; j < j1; j++) Y[(size_t)b * N + j] += bias[j];
    }
    return 0;
}
