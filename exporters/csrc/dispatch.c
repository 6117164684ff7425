/* Which instruction sets this library holds and which the running CPU can execute.
 *
 * The build compiles one object per set with that set's flags and defines BF_HAVE_<SET> for
 * each object that compiled; this file (built without special flags, so it runs everywhere)
 * only ever calls a set's kernels after checking the CPU's feature flags: cpuid through
 * __builtin_cpu_supports on x86 (GCC's and clang's checks include the OS's saving of the wide
 * registers), the kernel's HWCAP bits on Linux/AArch64. */
#include <stddef.h>

#include "internal.h"

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#endif

static const char *const names[BF_ISA_COUNT] = {"scalar", "avx2", "avx512", "neon",
                                                "neon_dotprod"};

static const bf_kernels *compiled(int isa) {
    switch (isa) {
    case BF_ISA_SCALAR: return &bf_kernels_scalar;
#ifdef BF_HAVE_AVX2
    case BF_ISA_AVX2: return &bf_kernels_avx2;
#endif
#ifdef BF_HAVE_AVX512
    case BF_ISA_AVX512: return &bf_kernels_avx512;
#endif
#ifdef BF_HAVE_NEON
    case BF_ISA_NEON: return &bf_kernels_neon;
#endif
#ifdef BF_HAVE_NEON_DOTPROD
    case BF_ISA_NEON_DOTPROD: return &bf_kernels_neon_dotprod;
#endif
    default: return NULL;
    }
}

static int cpu_has(int isa) {
    switch (isa) {
    case BF_ISA_SCALAR: return 1;
#if defined(__x86_64__) || defined(__i386__)
    case BF_ISA_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
    case BF_ISA_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vpopcntdq");
#endif
#if defined(__aarch64__)
    case BF_ISA_NEON: return 1; /* Advanced SIMD is part of every AArch64 CPU */
#if defined(__linux__)
    case BF_ISA_NEON_DOTPROD: return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#endif
#endif
    default: return 0;
    }
}

int bf_abi_version(void) { return BF_ABI_VERSION; }

const char *bf_isa_name(int isa) { return (isa >= 0 && isa < BF_ISA_COUNT) ? names[isa] : NULL; }

int bf_isa_compiled(int isa) { return compiled(isa) != NULL; }

int bf_isa_supported(int isa) { return compiled(isa) != NULL && cpu_has(isa); }

int bf_best_isa(void) {
    static const int preference[] = {BF_ISA_AVX512, BF_ISA_AVX2, BF_ISA_NEON_DOTPROD, BF_ISA_NEON};
    for (size_t i = 0; i < sizeof preference / sizeof preference[0]; i++)
        if (bf_isa_supported(preference[i])) return preference[i];
    return BF_ISA_SCALAR;
}

int64_t bf_conv_output_size(int64_t size, int64_t kernel, int64_t stride, int64_t pad_before,
                            int64_t pad_after, int64_t dilation) {
    if (stride < 1 || dilation < 1 || kernel < 1) return 0;
    const int64_t span = size + pad_before + pad_after - dilation * (kernel - 1) - 1;
    return span < 0 ? 0 : span / stride + 1;
}

int bf_pack(int isa, int threads, const float *x, int64_t n, int64_t channels, int64_t height,
            int64_t width, int64_t pad_top, int64_t pad_left, int64_t padded_h, int64_t padded_w,
            uint64_t *out) {
    if (!bf_isa_supported(isa)) return BF_ERR_ISA;
    if (!x || !out || threads < 1 || n < 0 || channels < 1 || height < 0 || width < 0 ||
        pad_top < 0 || pad_left < 0 || padded_h < height + pad_top || padded_w < width + pad_left)
        return BF_ERR_ARG;
    compiled(isa)->pack(threads, x, n, channels, height, width, pad_top, pad_left, padded_h,
                        padded_w, out);
    return 0;
}

int bf_conv2d(const bf_conv *conv, int isa, int threads, const float *x, int64_t n,
              int64_t height, int64_t width, const float *residual, float *out) {
    if (!bf_isa_supported(isa)) return BF_ERR_ISA;
    if (!conv || !x || !out || !conv->weights || !conv->multiplier || !conv->bias ||
        threads < 1 || n < 0 || height < 1 || width < 1 || conv->in_channels < 1 ||
        conv->out_channels < 1 || conv->cin_words != (conv->in_channels + 63) / 64 ||
        conv->n_blocks != (conv->out_channels + 63) / 64 || conv->pad_top < 0 ||
        conv->pad_bottom < 0 || conv->pad_left < 0 || conv->pad_right < 0 ||
        conv->kernel_h < 1 || conv->kernel_w < 1 ||
        conv->in_channels * conv->kernel_h * conv->kernel_w >= (INT64_C(1) << 30))
        return BF_ERR_ARG; /* K - 2 * popcount is computed in 32 bits */
    if (n == 0) return 0;
    return compiled(isa)->conv2d(conv, threads, x, n, height, width, residual, out);
}
