/* Declarations shared by the library's translation units (not part of the public interface). */
#ifndef BITFLEET_INTERNAL_H
#define BITFLEET_INTERNAL_H

#include <stdint.h>

#include "bitfleet_native.h"

/* Runs fn(ctx, unit) for every unit in [0, n_units) on up to `threads` threads (the caller is
 * one of them). Units are handed out one at a time from a shared counter, so uneven units
 * balance. Workers sleep between jobs: they never spin against the caller's other work. */
typedef void (*bf_unit_fn)(void *ctx, int64_t unit);
void bf_parallel_for(int threads, int64_t n_units, bf_unit_fn fn, void *ctx);

/* One instruction set's kernels (see kernel_body.h). */
typedef struct bf_kernels {
    void (*pack)(int threads, const float *x, int64_t n, int64_t channels, int64_t height,
                 int64_t width, int64_t pad_top, int64_t pad_left, int64_t padded_h,
                 int64_t padded_w, uint64_t *out);
    int (*conv2d)(const bf_conv *conv, int threads, const float *x, int64_t n, int64_t height,
                  int64_t width, const float *residual, float *out);
} bf_kernels;

#define BF_DECLARE_KERNELS(isa) extern const bf_kernels bf_kernels_##isa;
BF_DECLARE_KERNELS(scalar)
BF_DECLARE_KERNELS(avx2)
BF_DECLARE_KERNELS(avx512)
BF_DECLARE_KERNELS(neon)
BF_DECLARE_KERNELS(neon_dotprod)

#define BF_BLOCK 64 /* output channels per weight block */

#endif
