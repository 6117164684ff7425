/* A test driver for bitfleet's native kernels: runs bf_pack and bf_conv2d on cases written by
 * the Python tests, so that the C library can be checked on another architecture under an
 * emulator (qemu-aarch64), where Python and numpy are not available. It links the library's
 * objects directly (see tests/native_build.py) and has no dependency beyond libc.
 *
 * Usage:
 *   conv_driver info              print the library's instruction sets (format below), exit 0
 *   conv_driver run CASES OUT     run every case of the file CASES, write the results to OUT
 *
 * `info` prints one line `best NAME` (bf_best_isa()), then for every set a line
 *   `isa NAME compiled=C supported=S pack=P conv=Q`
 * where C and S are bf_isa_compiled / bf_isa_supported and P and Q are the return codes of
 * bf_pack and bf_conv2d forced to that set on a tiny built-in problem (0 where supported,
 * BF_ERR_ISA where not): the dispatcher's whole contract in one call.
 *
 * Case file (all integers int64, all little-endian, arrays C-ordered):
 *   magic "BFCASES1" (8 bytes), n_cases
 *   per case:
 *     isa name (16 bytes, NUL-padded), threads,
 *     n, in_channels, out_channels, height, width, kernel_h, kernel_w, stride_h, stride_w,
 *     dilation_h, dilation_w, pad_top, pad_bottom, pad_left, pad_right, has_residual,
 *     float32 x (n, in_channels, height, width),
 *     uint64 weights (n_blocks, kernel_h * kernel_w * cin_words, 64) in the kernel layout,
 *     float32 multiplier (n_blocks * 64), float32 bias (n_blocks * 64),
 *     float32 residual (n, out_channels, out_h, out_w) if has_residual.
 * Output file:
 *   magic "BFOUTS01", n_cases
 *   per case:
 *     n_words, uint64 packed (n, height + pad_top + pad_bottom, width + pad_left + pad_right,
 *       cin_words): bf_pack of x with the conv's top/left padding,
 *     n_values, float32 out (n, out_channels, out_h, out_w): bf_conv2d.
 *
 * Any failure (a short or malformed file, an unknown set name, a non-zero return code) prints
 * one line on stderr naming it and exits with status 1, before anything is written to OUT.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitfleet_native.h"

#define NAME_BYTES 16
#define N_FIELDS 16

static void die(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fputs("conv_driver: ", stderr);
    vfprintf(stderr, fmt, args);
    fputc('\n', stderr);
    va_end(args);
    exit(1);
}

static const char *error_name(int code) {
    switch (code) {
    case BF_ERR_ISA: return "BF_ERR_ISA";
    case BF_ERR_ARG: return "BF_ERR_ARG";
    case BF_ERR_NOMEM: return "BF_ERR_NOMEM";
    default: return "unknown error";
    }
}

static void *checked_malloc(int64_t count, size_t size, const char *what) {
    if (count < 0 || (count > 0 && (uint64_t)count > SIZE_MAX / size))
        die("bad size for %s: %" PRId64 " elements", what, count);
    void *p = malloc(count ? (size_t)count * size : 1);
    if (!p) die("out of memory for %s (%" PRId64 " elements)", what, count);
    return p;
}

static void read_exact(FILE *f, void *dst, size_t bytes, const char *what) {
    if (bytes && fread(dst, 1, bytes, f) != bytes) die("case file ends inside %s", what);
}

static int64_t read_i64(FILE *f, const char *what) {
    int64_t v;
    read_exact(f, &v, sizeof v, what);
    return v;
}

static void *read_array(FILE *f, int64_t count, size_t size, const char *what) {
    void *p = checked_malloc(count, size, what);
    read_exact(f, p, (size_t)count * size, what);
    return p;
}

static void write_exact(FILE *f, const void *src, size_t bytes) {
    if (bytes && fwrite(src, 1, bytes, f) != bytes) die("cannot write the output file");
}

static int isa_by_name(const char *name) {
    for (int isa = 0; isa < BF_ISA_COUNT; isa++)
        if (strcmp(bf_isa_name(isa), name) == 0) return isa;
    die("unknown instruction set '%s'", name);
    return -1;
}

typedef struct {
    int64_t packed_words, out_values;
    uint64_t *packed;
    float *out;
} result;

/* Read one case, run bf_pack and bf_conv2d on it, return their outputs. */
static result run_case(FILE *f, int64_t index) {
    char name[NAME_BYTES + 1] = {0};
    read_exact(f, name, NAME_BYTES, "the set name");
    const int isa = isa_by_name(name);
    const int64_t threads = read_i64(f, "threads");
    int64_t v[N_FIELDS];
    for (int i = 0; i < N_FIELDS; i++) v[i] = read_i64(f, "the geometry");
    const int64_t n = v[0], cin = v[1], cout = v[2], height = v[3], width = v[4];
    for (int i = 0; i < N_FIELDS; i++)
        if (v[i] < 0 || v[i] > (INT64_C(1) << 31)) die("case %" PRId64 ": bad geometry", index);
    if (threads < 1 || threads > 64) die("case %" PRId64 ": bad thread count", index);
    bf_conv conv = {
        .in_channels = cin, .out_channels = cout, .kernel_h = v[5], .kernel_w = v[6],
        .stride_h = v[7], .stride_w = v[8], .dilation_h = v[9], .dilation_w = v[10],
        .pad_top = v[11], .pad_bottom = v[12], .pad_left = v[13], .pad_right = v[14],
        .cin_words = (cin + 63) / 64, .n_blocks = (cout + 63) / 64};
    const int has_residual = v[15] != 0;
    const int64_t out_h = bf_conv_output_size(height, conv.kernel_h, conv.stride_h,
                                              conv.pad_top, conv.pad_bottom, conv.dilation_h);
    const int64_t out_w = bf_conv_output_size(width, conv.kernel_w, conv.stride_w,
                                              conv.pad_left, conv.pad_right, conv.dilation_w);
    const int64_t padded_h = height + conv.pad_top + conv.pad_bottom;
    const int64_t padded_w = width + conv.pad_left + conv.pad_right;

    float *x = read_array(f, n * cin * height * width, sizeof(float), "x");
    uint64_t *weights =
        read_array(f, conv.n_blocks * conv.kernel_h * conv.kernel_w * conv.cin_words * 64,
                   sizeof(uint64_t), "the weights");
    float *multiplier = read_array(f, conv.n_blocks * 64, sizeof(float), "the multiplier");
    float *bias = read_array(f, conv.n_blocks * 64, sizeof(float), "the bias");
    result r = {n * padded_h * padded_w * conv.cin_words, n * cout * out_h * out_w, NULL, NULL};
    float *residual = has_residual ? read_array(f, r.out_values, sizeof(float), "the residual")
                                   : NULL;
    conv.weights = weights;
    conv.multiplier = multiplier;
    conv.bias = bias;

    r.packed = checked_malloc(r.packed_words, sizeof(uint64_t), "the packed words");
    /* poison: bf_pack must write every word, the border included */
    memset(r.packed, 0xa5, (size_t)r.packed_words * sizeof(uint64_t));
    int code = bf_pack(isa, (int)threads, x, n, cin, height, width, conv.pad_top,
                       conv.pad_left, padded_h, padded_w, r.packed);
    if (code != 0)
        die("case %" PRId64 ": bf_pack(isa=%s, threads=%" PRId64 ") returned %d (%s)", index,
            name, threads, code, error_name(code));
    r.out = checked_malloc(r.out_values, sizeof(float), "the output");
    for (int64_t i = 0; i < r.out_values; i++) r.out[i] = -12345.0f; /* poison as well */
    code = bf_conv2d(&conv, isa, (int)threads, x, n, height, width, residual, r.out);
    if (code != 0)
        die("case %" PRId64 ": bf_conv2d(isa=%s, threads=%" PRId64 ") returned %d (%s)", index,
            name, threads, code, error_name(code));
    free(x);
    free(weights);
    free(multiplier);
    free(bias);
    free(residual);
    return r;
}

static int run(const char *cases_path, const char *out_path) {
    FILE *f = fopen(cases_path, "rb");
    if (!f) die("cannot open the case file %s", cases_path);
    char magic[8];
    read_exact(f, magic, sizeof magic, "the magic");
    if (memcmp(magic, "BFCASES1", sizeof magic) != 0) die("%s is not a case file", cases_path);
    const int64_t n_cases = read_i64(f, "the case count");
    if (n_cases < 1 || n_cases > 100000) die("bad case count %" PRId64, n_cases);
    result *results = checked_malloc(n_cases, sizeof(result), "the results");
    for (int64_t i = 0; i < n_cases; i++) results[i] = run_case(f, i);
    if (fgetc(f) != EOF) die("trailing bytes after the last case of %s", cases_path);
    fclose(f);

    FILE *out = fopen(out_path, "wb");
    if (!out) die("cannot create the output file %s", out_path);
    write_exact(out, "BFOUTS01", 8);
    write_exact(out, &n_cases, sizeof n_cases);
    for (int64_t i = 0; i < n_cases; i++) {
        write_exact(out, &results[i].packed_words, sizeof(int64_t));
        write_exact(out, results[i].packed, (size_t)results[i].packed_words * sizeof(uint64_t));
        write_exact(out, &results[i].out_values, sizeof(int64_t));
        write_exact(out, results[i].out, (size_t)results[i].out_values * sizeof(float));
        free(results[i].packed);
        free(results[i].out);
    }
    free(results);
    if (fclose(out) != 0) die("cannot write the output file %s", out_path);
    return 0;
}

static int info(void) {
    /* a 1x1 conv of a 2x2 single-channel image: valid for every set that can run */
    const float x[4] = {1.0f, -1.0f, 0.5f, -0.5f};
    uint64_t weights[64] = {1};
    float multiplier[64], bias[64], out[4];
    uint64_t packed[4];
    for (int j = 0; j < 64; j++) multiplier[j] = 1.0f, bias[j] = 0.0f;
    const bf_conv conv = {.in_channels = 1, .out_channels = 1, .kernel_h = 1, .kernel_w = 1,
                          .stride_h = 1, .stride_w = 1, .dilation_h = 1, .dilation_w = 1,
                          .cin_words = 1, .n_blocks = 1, .weights = weights,
                          .multiplier = multiplier, .bias = bias};
    printf("best %s\n", bf_isa_name(bf_best_isa()));
    for (int isa = 0; isa < BF_ISA_COUNT; isa++) {
        const int pack = bf_pack(isa, 1, x, 1, 1, 2, 2, 0, 0, 2, 2, packed);
        const int conv_code = bf_conv2d(&conv, isa, 1, x, 1, 2, 2, NULL, out);
        printf("isa %s compiled=%d supported=%d pack=%d conv=%d\n", bf_isa_name(isa),
               bf_isa_compiled(isa), bf_isa_supported(isa), pack, conv_code);
    }
    return fflush(stdout) == 0 ? 0 : 1;
}

int main(int argc, char **argv) {
    if (bf_abi_version() != BF_ABI_VERSION)
        die("library ABI %d, driver built for %d", bf_abi_version(), BF_ABI_VERSION);
    if (argc == 2 && strcmp(argv[1], "info") == 0) return info();
    if (argc == 4 && strcmp(argv[1], "run") == 0) return run(argv[2], argv[3]);
    die("usage: conv_driver info | conv_driver run CASES OUT");
    return 1;
}
