/* bitfleet's native XNOR-popcount kernels: the public C interface.
 *
 * A plain C library with no Python dependency, loaded by exporters/native.py through ctypes.
 * Every kernel exists once per instruction set (isa_*.c compile kernel_body.h with their own
 * compiler flags); dispatch.c says which of them the running CPU can execute.
 *
 * Data layout (the packed-bit convention of exporters/packing.py, bit 1 = -1, LSB first):
 * - activations are packed from float NCHW into an NHWC word tensor (N, Hp, Wp, cin_words)
 *   whose spatial border and unused channel bits are 0 (= +1, bitfleet's binary padding);
 * - weights are (n_blocks, kh * kw * cin_words, 64) uint64: blocks of 64 output channels,
 *   output channel innermost, word-aligned per tap, channel padding bits 0;
 * - the output is float NCHW: multiplier[c] * (K - 2 * popcount) + bias[c] (+ residual), with
 *   K = cin * kh * kw (K - 2 * popcount is the exact +-1 dot product).
 */
#ifndef BITFLEET_NATIVE_H
#define BITFLEET_NATIVE_H

#include <stdint.h>

#define BF_ABI_VERSION 1

/* Instruction sets, numbered alike on every architecture. */
enum bf_isa {
    BF_ISA_SCALAR = 0,
    BF_ISA_AVX2 = 1,
    BF_ISA_AVX512 = 2,
    BF_ISA_NEON = 3,
    BF_ISA_NEON_DOTPROD = 4,
    BF_ISA_COUNT = 5
};

/* Error codes (0 is success). */
#define BF_ERR_ISA (-1)    /* the instruction set is not compiled in or the CPU lacks it */
#define BF_ERR_ARG (-2)    /* a size or pointer argument is invalid */
#define BF_ERR_NOMEM (-3)  /* the packed-activation buffer could not be allocated */

/* A binary convolution whose weights are already in the kernel layout (see above). */
typedef struct bf_conv {
    int64_t in_channels;
    int64_t out_channels;
    int64_t kernel_h, kernel_w;
    int64_t stride_h, stride_w;
    int64_t dilation_h, dilation_w;
    int64_t pad_top, pad_bottom, pad_left, pad_right;
    int64_t cin_words;             /* ceil(in_channels / 64) */
    int64_t n_blocks;              /* ceil(out_channels / 64) */
    const uint64_t *weights;       /* (n_blocks, kernel_h * kernel_w * cin_words, 64) */
    const float *multiplier;       /* n_blocks * 64 values */
    const float *bias;             /* n_blocks * 64 values */
} bf_conv;

#if defined(_WIN32)
#define BF_API __declspec(dllexport)
#else
#define BF_API __attribute__((visibility("default")))
#endif

BF_API int bf_abi_version(void);
/* Name of an instruction set ("scalar", "avx2", "avx512", "neon", "neon_dotprod"), or NULL. */
BF_API const char *bf_isa_name(int isa);
/* 1 if the set is compiled into this library, else 0. */
BF_API int bf_isa_compiled(int isa);
/* 1 if the set is compiled in and the running CPU (and OS) can execute it, else 0. */
BF_API int bf_isa_supported(int isa);
/* The fastest supported set. */
BF_API int bf_best_isa(void);

/* Binarize and pack float NCHW x (n, channels, height, width) into out, the zero-bordered
 * (n, padded_h, padded_w, ceil(channels / 64)) word tensor, the image placed at (pad_top,
 * pad_left). out is fully written (border included). */
BF_API int bf_pack(int isa, int threads, const float *x, int64_t n, int64_t channels,
                   int64_t height, int64_t width, int64_t pad_top, int64_t pad_left,
                   int64_t padded_h, int64_t padded_w, uint64_t *out);

/* The whole binary convolution of float NCHW x (n, in_channels, height, width): pack, XNOR-
 * popcount over the taps, fused epilogue, into out (n, out_channels, out_h, out_w). residual is
 * NULL or an array of out's shape, added last. Uses up to `threads` threads (>= 1). */
BF_API int bf_conv2d(const bf_conv *conv, int isa, int threads, const float *x, int64_t n,
                     int64_t height, int64_t width, const float *residual, float *out);

/* Output size of one spatial dimension (the formula of exporters/conventions.py). */
BF_API int64_t bf_conv_output_size(int64_t size, int64_t kernel, int64_t stride,
                                   int64_t pad_before, int64_t pad_after, int64_t dilation);

#endif
