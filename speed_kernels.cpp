/* The decoding product y = W x for one row x, written for the CPU: speed.py builds this file at first use
   (c++ -O3 -march=native -fopenmp -shared, against torch's headers) and loads it as the op speed::matvec.

   Decoding one token reads every weight once for two FLOPs, so its speed is the rate at which the weights
   stream in from memory. Three things get near that rate on the AVX2 CPU measured (docs/bench.md, "The
   decoding kernel"), where a plain loop, like inductor's, ran at 8-12 of the ~25 GB/s one core reads:
   - four weight rows at a time against one load of x, each with two accumulators, so no chain of dependent
     additions limits the loop (one row with one accumulator waits on every add);
   - weights widened to fp32 in registers (bf16 is the top half of an fp32: a shift), never in memory;
   - software prefetch PREFETCH_BYTES ahead: four short interleaved rows (1 KB each on SmolLM2) are too
     short for the hardware prefetcher to learn before they end.
   Weight kinds: fp32, bf16, fp16; int8 with one scale a row (quantize.Int8Linear); 4-bit codes, two a byte,
   low nibble first, with a scale and a minimum a group (quantize.Int4Linear: w = q * scale + minimum); those
   two as integer products (below, XBLOCK); on a CPU with AVX-512 VNNI the 4-bit ones by vpdpbusd (rows_u4_vnni).
   A few rows of x at once (batched decoding), float weights only: few_rows, each weight read once for all rows
   (below, by_x_rows); bf16 rows with AVX-512 BF16 across the vector lanes from 9 rows (bf16_lanes_block), on a CPU
   with AMX by its tile products (tile_rows_bf16).
   And the op speed::matvec_blocked: bf16 rows against bf16 weights laid out in blocks of 16 rows (speed.BlockedLinear;
   blocked_rows, AVX-512 BF16; batched rows with AMX by tiles, tile_blocks_bf16), speed::matvec_blocked_int8: rows
   against int8 codes so laid out (blocked_i8, AVX-512 VNNI), and speed::matvec_blocked_q4: against 4-bit codes so
   laid out, their groups' scales inline (blocked_q4, AVX-512 VNNI); on Intel's cores these prefetch their stream
   (prefetch_stream). And the op speed::decode_attention: one new position per row attending over the cache
   (attend_group; with AVX-512, attend_group_wide). And speed::greedy_pick: each row's largest logit's index. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <new>
#include <stdexcept>
#include <utility>
#include <vector>
/* the vector loops need AVX2, FMA and F16C (x86 since 2013-15); elsewhere the plain definition runs */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VECTOR_LOOPS 1
#include <immintrin.h>
#else
#define VECTOR_LOOPS 0
#endif

enum { F32 = 0, BF16 = 1, F16 = 2, I8 = 3, U4 = 4 };  /* the weight kinds: kind_of maps torch's dtypes to them */

/* A call's temporaries (x widened to fp32 and rounded, its steps and sums; attention's queries, scores and sums) in
   one buffer each thread keeps between calls, not in mallocs of their own: an int4 SmolLM2 step made ~1,000 mallocs
   and frees (8 a product), 4% of its time by perf, much of it glibc sorting its free lists (docs/bench.md, "A
   call's temporaries kept"). A call sizes its Scratch once for all its parts (`room` each), then takes them:
   growing the buffer would move the parts taken before. The buffer stays at the largest call's size (a prefill of
   256 rows of 1,536 takes ~3 MB). Parts are 64-byte aligned and not zeroed. */
class Scratch {
  public:
    template <typename T> static size_t room(long n) { return ((size_t)n * sizeof(T) + 63) / 64 * 64; }
    explicit Scratch(size_t bytes) : size(bytes) {
        struct Held { char *bytes = nullptr; size_t size = 0; ~Held() { free(bytes); } };
        static thread_local Held held;
        if (held.size < bytes) {
            free(held.bytes);
            held.bytes = (char *)aligned_alloc(64, bytes), held.size = held.bytes ? bytes : 0;
            if (!held.bytes) throw std::bad_alloc();  /* torch raises it in Python as an error */
        }
        base = held.bytes;
    }
    template <typename T> T *take(long n) {
        size_t bytes = room<T>(n);
        if (used + bytes > size) throw std::logic_error("speed_kernels.cpp: a call took more scratch than it sized");
        T *part = (T *)(base + used);
        used += bytes;
        return part;
    }
  private:
    char *base;
    size_t size, used = 0;
};

/* x as fp32: x itself, or its n bf16 values widened into `room` */
static const float *as_floats(const void *x, bool bf16, long n, float *room) {
    if (!bf16) return (const float *)x;
    const uint16_t *in = (const uint16_t *)x;
    uint32_t *out = (uint32_t *)room;
    for (long k = 0; k < n; k++) out[k] = (uint32_t)in[k] << 16;
    return room;
}

#define PREFETCH_BYTES 9216  /* measured best of 1-18 KB on one 1536 x 576 bf16 weight: 4 KB 23.6 GB/s, 9 KB 24.6, none 10.3 */
#define ROWS 4

static float half_to_float(uint16_t h) {  /* IEEE fp16, subnormals included */
    uint32_t sign = (uint32_t)(h >> 15) << 31, exponent = (h >> 10) & 31, mantissa = h & 1023, bits;
    if (exponent == 31) bits = sign | 0x7f800000u | (mantissa << 13);
    else if (exponent) bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    else if (!mantissa) bits = sign;
    else { float f = mantissa / 16777216.0f; memcpy(&bits, &f, 4); bits |= sign; }
    float f; memcpy(&f, &bits, 4); return f;
}

static inline __attribute__((always_inline)) float scalar_at(const void *p, int kind, long i) {
    switch (kind) {
        case BF16: { uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16; float f; memcpy(&f, &bits, 4); return f; }
        case F16: return half_to_float(((const uint16_t *)p)[i]);
        case I8: return ((const int8_t *)p)[i];
        case U4: { uint8_t b = ((const uint8_t *)p)[i / 2]; return (i & 1) ? b >> 4 : b & 15; }
        default: return ((const float *)p)[i];
    }
}

/* sum over k >= from of x[k] w[n, k], with w[n, k] by the definition (U4: code * scale + minimum of its group;
   I8: the code, the row's scale applied by the caller); for tails the vector loops leave and CPUs without them */
static float dot_scalar(const float *x, long K, long from, const void *w, int kind, long n,
                        const void *scales, const void *mins, int scale_kind, long group) {
    float sum = 0;
    for (long k = from; k < K; k++) {
        long i = n * K + k;
        float q = scalar_at(w, kind, i);
        if (kind == U4) q = q * scalar_at(scales, scale_kind, i / group) + scalar_at(mins, scale_kind, i / group);
        sum += x[k] * q;
    }
    return sum;
}
#if VECTOR_LOOPS
/* 8 weights from p (element index i) as fp32 */
static inline __attribute__((always_inline)) __m256 load8(const void *p, int kind, long i) {
    switch (kind) {
        case BF16: return _mm256_castsi256_ps(_mm256_slli_epi32(
                       _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
        case F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
        case I8: return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)p + i))));
        default: return _mm256_loadu_ps((const float *)p + i);
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* prefetch what the loop of rows n..n+R-1 reads PREFETCH_BYTES later: it reads their column `offset` side by
   side, and blocks of rows follow each other in memory, so it moves through the weight at R times a row's pace.
   (Prefetching each row of a block ahead, at its own column, measured 9 GB/s against this one's 15.) */
static inline __attribute__((always_inline)) void prefetch(const void *w, long row_bytes, long n, int R, long offset) {
    const char *ahead = (const char *)w + n * row_bytes + R * offset + PREFETCH_BYTES;
    for (int r = 0; r < R; r++) _mm_prefetch(ahead + r * 64, _MM_HINT_T0);
}

/* rows n..n+R-1 of a float or int8 weight: K in steps of 16, the rest by dot_scalar */
static inline __attribute__((always_inline)) void rows_float(const float *x, long K, const void *w, int kind,
        long n, int R, const void *scales, int scale_kind, float *y) {
    long size = kind == F32 ? 4 : kind == I8 ? 1 : 2, K16 = K & ~15L;
    __m256 a[ROWS], b[ROWS];
    for (int r = 0; r < R; r++) a[r] = b[r] = _mm256_setzero_ps();
    for (long k = 0; k < K16; k += 16) {
        prefetch(w, K * size, n, R, k * size);
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
        for (int r = 0; r < R; r++) {
            a[r] = _mm256_fmadd_ps(x0, load8(w, kind, (n + r) * K + k), a[r]);
            b[r] = _mm256_fmadd_ps(x1, load8(w, kind, (n + r) * K + k + 8), b[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        float sum = hsum(_mm256_add_ps(a[r], b[r])) + dot_scalar(x, K, K16, w, kind, n + r, 0, 0, 0, 1);
        y[n + r] = kind == I8 ? sum * scalar_at(scales, scale_kind, n + r) : sum;
    }
}

/* The int8 and 4-bit products multiply integers: x is quantized to int16 in blocks of XBLOCK, each with its step
   (x = xq * step + error, |error| <= step / 2 = max|x| / 65534, below bf16's rounding of x), so 16 weights take one
   widening to int16 and one multiply-add of pairs (_mm256_madd_epi16) instead of two conversions to fp32 and two
   FMAs: the float loop ran int8 at 15 G weights/s and 4-bit at 7 on one core, below their bandwidth. (Rounding x
   to int8 instead, as llama.cpp does for its 4-bit formats, made the 4-bit loop no faster than the layout below,
   and SmolLM2's logits through it moved ~10x further from the prefill's: KL 0.029-0.031 against 0.0024-0.0032;
   docs/bench.md.)
   For U4, 32 bytes of a row hold two blocks A and B (16 bytes each, two codes a byte, low nibble first). Masking
   gives the low nibbles (even positions) and the high ones (odd), and unpacking bytes to int16 with zeros works
   within each 128-bit half: A's 8 first even codes beside B's, and so on. So xq holds each pair of blocks in the
   order those four vectors need: [A even 0-7, B even 0-7], [A even 8-15, B even 8-15], then the odd positions
   alike; each multiply-add then gives A's sums in its lower four lanes and B's in the upper four. A last block
   without a partner: even positions, then odd. */
#define XBLOCK 32

static void quantize_x(const float *x, long K, int pairs, int16_t *xq, float *step) {
    long blocks = K / XBLOCK;
    for (long b = 0; b < blocks; b++) {
        const float *xb = x + b * XBLOCK;
        float most = 0;
        for (int i = 0; i < XBLOCK; i++) most = fmaxf(most, fabsf(xb[i]));
        step[b] = most / 32767;
        float inverse = most > 0 ? 32767 / most : 0;
        long pair = b / 2 * 2 * XBLOCK, which = b % 2, alone = (b | 1) >= blocks;
        for (int i = 0; i < XBLOCK; i++) {
            long odd = i & 1, j = i / 2;  /* position i is code j of the low (even) or high (odd) nibbles */
            long to = !pairs ? b * XBLOCK + i
                    : alone ? pair + odd * 16 + j : pair + (odd * 2 + j / 8) * 16 + which * 8 + j % 8;
            xq[to] = (int16_t)lrintf(xb[i] * inverse);
        }
    }
}

/* rows n..n+R-1 of int8 codes, K a multiple of XBLOCK; the row's scale applied at the end */
static inline __attribute__((always_inline)) void rows_i8(const int16_t *xq, const float *step, long K,
        const void *codes, long n, int R, const void *scales, int scale_kind, float *y) {
    const int8_t *w = (const int8_t *)codes;
    __m256 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (long k = 0; k < K; k += XBLOCK) {
        prefetch(w, K, n, R, k);
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + k)), x1 = _mm256_loadu_si256((const __m256i *)(xq + k + 16));
        __m256 x_step = _mm256_set1_ps(step[k / XBLOCK]);
        for (int r = 0; r < R; r++) {
            const int8_t *row = w + (n + r) * K + k;
            __m256i sum = _mm256_add_epi32(
                _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)row)), x0),
                _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + 16))), x1));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), x_step, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[n + r] = hsum(acc[r]) * scalar_at(scales, scale_kind, n + r);
}

/* the scales of groups i and i + 1 as [i, i, i, i, i + 1, i + 1, i + 1, i + 1]: what a pair of blocks' 8 sums need */
static inline __attribute__((always_inline)) __m256 pair_of_scales(const void *s, int kind, long i) {
    __m128 two;
    if (kind == F32) two = _mm_castpd_ps(_mm_load_sd((const double *)((const float *)s + i)));
    else {
        int32_t bits;
        memcpy(&bits, (const uint16_t *)s + i, 4);
        two = kind == F16 ? _mm_cvtph_ps(_mm_cvtsi32_si128(bits))
                          : _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), _mm_cvtsi32_si128(bits)));
    }
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

/* rows n..n+R-1 of 4-bit codes, groups a multiple of XBLOCK: sum over groups of scale * (q . x) + minimum * sum(x) */
static inline __attribute__((always_inline)) void rows_u4(const int16_t *xq, const float *step, const float *xsum,
        long K, const void *codes, long n, int R, const void *scales, const void *mins, int scale_kind, long group,
        float *y) {
    const uint8_t *w = (const uint8_t *)codes;
    long half = K / 2, groups = K / group, K64 = K & ~(2L * XBLOCK - 1);
    const __m256i nibble = _mm256_set1_epi8(15), zero = _mm256_setzero_si256();
    __m256 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (long k = 0; k < K64; k += 2 * XBLOCK) {
        prefetch(w, half, n, R, k / 2);
        const __m256i *xv = (const __m256i *)(xq + k);
        __m256i x0 = _mm256_loadu_si256(xv), x1 = _mm256_loadu_si256(xv + 1);
        __m256i x2 = _mm256_loadu_si256(xv + 2), x3 = _mm256_loadu_si256(xv + 3);
        __m256 steps = _mm256_set_m128(_mm_set1_ps(step[k / XBLOCK + 1]), _mm_set1_ps(step[k / XBLOCK]));
        for (int r = 0; r < R; r++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + (n + r) * half + k / 2));
            __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
            __m256i even = _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpacklo_epi8(lo, zero), x0),
                                            _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, zero), x1));
            __m256i odd = _mm256_add_epi32(_mm256_madd_epi16(_mm256_unpacklo_epi8(hi, zero), x2),
                                           _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, zero), x3));
            __m256i sum = _mm256_add_epi32(even, odd);  /* A's sums in lanes 0-3, B's in 4-7 */
            long g = (n + r) * groups + k / group;
            __m256 scale = group == XBLOCK ? pair_of_scales(scales, scale_kind, g)
                : _mm256_set_m128(_mm_set1_ps(scalar_at(scales, scale_kind, (n + r) * groups + (k + XBLOCK) / group)),
                                  _mm_set1_ps(scalar_at(scales, scale_kind, g)));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(scale, steps), acc[r]);
        }
    }
    if (K64 < K) {
        __m256i even = _mm256_loadu_si256((const __m256i *)(xq + K64));
        __m256i odd = _mm256_loadu_si256((const __m256i *)(xq + K64 + 16));
        const __m128i nib = _mm_set1_epi8(15);
        for (int r = 0; r < R; r++) {
            __m128i v = _mm_loadu_si128((const __m128i *)(w + (n + r) * half + K64 / 2));
            __m128i low = _mm_and_si128(v, nib), high = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
            __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(_mm256_cvtepu8_epi16(low), even),
                                           _mm256_madd_epi16(_mm256_cvtepu8_epi16(high), odd));
            float scale = scalar_at(scales, scale_kind, (n + r) * groups + K64 / group) * step[K64 / XBLOCK];
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(scale), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        __m256 offsets = _mm256_setzero_ps();
        long g = 0, first = (n + r) * groups;
        for (; g + 8 <= groups; g += 8)
            offsets = _mm256_fmadd_ps(load8(mins, scale_kind, first + g), _mm256_loadu_ps(xsum + g), offsets);
        float offset = hsum(offsets);
        for (; g < groups; g++) offset += scalar_at(mins, scale_kind, first + g) * xsum[g];
        y[n + r] = hsum(acc[r]) + offset;
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VNNI_LOOPS 1
/* The loops over weights in blocks of 16 rows (bf16, int8, 4-bit) prefetch the weight's one stream BLOCKS_AHEAD bytes
   ahead on Intel's cores and not on AMD's. On the AMX Xeon (family 6 model 167) a SmolLM2 step at one row ran 1.42x
   (int8) and 1.43x (4-bit) as fast with it, 8 KB ahead as 4 KB, 2 KB less (docs/bench.md, "The weight's stream
   prefetched on Intel; bf16 blocks by tiles"); on the Zen 4 prefetching 2, 4 or 9 KB ahead made the int8 products
   slower (blocked_i8_rows). */
#define BLOCKS_AHEAD 4096
static bool intel_cpu() { __builtin_cpu_init(); return __builtin_cpu_is("intel"); }
static const bool prefetch_blocks = intel_cpu();
static inline __attribute__((always_inline)) void prefetch_stream(const void *at, int bytes) {
    if (prefetch_blocks)
        for (int i = 0; i < bytes; i += 64) _mm_prefetch((const char *)at + BLOCKS_AHEAD + i, _MM_HINT_T0);
}

/* 4-bit rows on a CPU with AVX-512 VNNI (Ice Lake and later Xeons, Zen 4): vpdpbusd multiplies 64 pairs of bytes,
   one unsigned and one signed, and adds each 4 products into an int32, exactly. On one core of the AMX Xeon the
   loop above streamed 4-bit codes at 4.4 GB/s, where bf16 weights streamed at 8.2; this one at 7.5 (docs/bench.md,
   "4-bit and int8 rows by AVX-512 VNNI"). 64 bytes of a row (128 codes, 4 groups of 32) at a time; the codes fit
   either side of the product (0..15); x, rounded to int16 as above, is split exactly into xq = 256 hi + lo, hi in
   -128..127 (signed), lo in 0..255 (unsigned), so q . xq = 256 (q . hi) + (lo . q). The four byte vectors of a
   chunk of 128 positions hold hi and lo at the even positions, then at the odd ones, group g's 16 of each at bytes
   16g..16g+15, as the masked codes come (the low nibbles are the even positions): each int32 lane then sums 4
   positions of one group (lanes 4g..4g+3). A last chunk of fewer than 128 positions is padded with zeros, its codes
   read under a mask. The groups' minimums times sum(x) go 16 groups at a time (a scalar loop over them took 41% of
   the first version's time, by perf). */
#define VCHUNK 128
/* quantize_x's rounding of x in blocks of 32, 16 lanes at a time (the same numbers: _mm512_cvtps_epi32 rounds as
   lrintf, to nearest even), into xq in plain order (int8 weights) or into the hi and lo bytes above (4-bit; zeroed
   by the caller past K), and the sums of x a group into xsum (4-bit). As int32 lanes, 32 int16 hold pairs: lane
   j = xq[2j] | xq[2j + 1] << 16, whose four bytes are lo and hi of the even position, then of the odd one;
   truncating the lanes (shifted) to bytes sorts them. */
static void quantize_x_wide(const float *x, long K, int16_t *xq, float *step, int8_t *hi, uint8_t *lo, float *xsum,
                            long group) {
    for (long b = 0; b < K / XBLOCK; b++) {
        __m512 first = _mm512_loadu_ps(x + b * XBLOCK), second = _mm512_loadu_ps(x + b * XBLOCK + 16);
        if (xsum) xsum[b * XBLOCK / group] += _mm512_reduce_add_ps(_mm512_add_ps(first, second));
        float most = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(first), _mm512_abs_ps(second)));
        step[b] = most / 32767;
        __m512 inverse = _mm512_set1_ps(most > 0 ? 32767 / most : 0);
        __m512i q = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(first, inverse)))),
            _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(second, inverse))), 1);
        if (xq) _mm512_storeu_si512(xq + b * XBLOCK, q);
        if (!hi) continue;
        long at = b / 4 * 128 + b % 4 * 16;  /* chunk b / 4, group b % 4 */
        _mm_storeu_si128((__m128i *)(lo + at), _mm512_cvtepi32_epi8(q));
        _mm_storeu_si128((__m128i *)(hi + at), _mm512_cvtepi32_epi8(_mm512_srli_epi32(q, 8)));
        _mm_storeu_si128((__m128i *)(lo + at + 64), _mm512_cvtepi32_epi8(_mm512_srli_epi32(q, 16)));
        _mm_storeu_si128((__m128i *)(hi + at + 64), _mm512_cvtepi32_epi8(_mm512_srli_epi32(q, 24)));
    }
}

/* the scale of each of a chunk's (up to) 4 groups times its block's step of x (steps4, zero past the end), in the
   lanes of the group's sums; groups of 32 (one a block) by one masked load, larger ones one by one */
static inline __attribute__((always_inline)) __m512 chunk_scales(const void *s, int kind, long row, long groups,
        long group, long k, long K, __m128 steps4) {
    __m128 four;
    if (group == 32) {
        const __mmask8 in = K - k >= VCHUNK ? 15 : (1 << (K - k) / 32) - 1;
        long i = row * groups + k / 32;
        if (kind == F32) four = _mm_maskz_loadu_ps(in, (const float *)s + i);
        else {
            __m128i bits = _mm_maskz_loadu_epi16(in, (const uint16_t *)s + i);
            four = kind == F16 ? _mm_cvtph_ps(bits) : _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(bits), 16));
        }
    } else {
        float v[4] = {0, 0, 0, 0};
        for (long b = 0; b < 4 && k + 32 * b < K; b++) v[b] = scalar_at(s, kind, row * groups + (k + 32 * b) / group);
        four = _mm_loadu_ps(v);
    }
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(_mm_mul_ps(four, steps4)));
}

/* 16 floats (the lanes `in` allows; zeros elsewhere, not read) from p + i, of kind F32, BF16 or F16 */
static inline __attribute__((always_inline)) __m512 load16(const void *p, int kind, long i, __mmask16 in) {
    if (kind == F32) return _mm512_maskz_loadu_ps(in, (const float *)p + i);
    __m256i bits = _mm256_maskz_loadu_epi16(in, (const uint16_t *)p + i);
    return kind == F16 ? _mm512_cvtph_ps(bits) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

static inline __attribute__((always_inline)) void rows_u4_vnni(const int8_t *hi, const uint8_t *lo, const float *step,
        const float *xsum, long K, const void *codes, long n, int R, const void *scales, const void *mins,
        int scale_kind, long group, float *y) {
    const uint8_t *w = (const uint8_t *)codes;
    long half = K / 2, groups = K / group;
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (long k = 0, c = 0; k < K; k += VCHUNK, c++) {
        prefetch(w, half, n, R, k / 2);
        __mmask64 in = K - k >= VCHUNK ? ~0ULL : (1ULL << (K - k) / 2) - 1;
        __m512i hi_even = _mm512_loadu_si512(hi + c * 128), hi_odd = _mm512_loadu_si512(hi + c * 128 + 64);
        __m512i lo_even = _mm512_loadu_si512(lo + c * 128), lo_odd = _mm512_loadu_si512(lo + c * 128 + 64);
        __m128 steps4 = _mm_loadu_ps(step + k / 32);
        for (int r = 0; r < R; r++) {
            __m512i v = _mm512_maskz_loadu_epi8(in, w + (n + r) * half + k / 2);
            __m512i even = _mm512_and_si512(v, nibble), odd = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            __m512i h = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), even, hi_even), odd, hi_odd);
            __m512i l = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo_even, even), lo_odd, odd);
            __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(h, 8), l));
            acc[r] = _mm512_fmadd_ps(sum, chunk_scales(scales, scale_kind, n + r, groups, group, k, K, steps4), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) {  /* plus sum over groups of minimum * sum(x), 16 groups at a time */
        for (long g = 0; g < groups; g += 16) {
            const __mmask16 in = groups - g >= 16 ? 0xffff : (1 << (groups - g)) - 1;
            acc[r] = _mm512_fmadd_ps(load16(mins, scale_kind, (n + r) * groups + g, in), _mm512_maskz_loadu_ps(in, xsum + g), acc[r]);
        }
        y[n + r] = _mm512_reduce_add_ps(acc[r]);
    }
}

/* fp32 sums to bf16, 16 at a time, rounded as float_to_bf16 rounds (to nearest even; NaN to 0x7fc0) */
static inline __attribute__((always_inline)) __m256i bf16_of_sums(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(rounded);
}

/* every row of 4-bit codes by the loop above: x rounded and split once for all of them */
static inline __attribute__((always_inline)) void all_rows_u4_vnni(const float *x, long K, const void *w, long N,
        const void *scales, const void *mins, int scale_kind, long group, float *y, int threads) {
    long padded = (K + VCHUNK - 1) / VCHUNK * 128;  /* hi and lo bytes of whole chunks, zeros past K */
    float *step = (float *)calloc(K / XBLOCK + 4, sizeof(float)), *xsum = (float *)calloc(K / group, sizeof(float));
    int8_t *hi = (int8_t *)calloc(padded, 1);
    uint8_t *lo = (uint8_t *)calloc(padded, 1);
    quantize_x_wide(x, K, nullptr, step, hi, lo, xsum, group);
    #pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long block = 0; block < N / ROWS; block++)
        rows_u4_vnni(hi, lo, step, xsum, K, w, block * ROWS, ROWS, scales, mins, scale_kind, group, y);
    for (long n = N - N % ROWS; n < N; n++) rows_u4_vnni(hi, lo, step, xsum, K, w, n, 1, scales, mins, scale_kind, group, y);
    free(step), free(xsum), free(hi), free(lo);
}
#else
#define VNNI_LOOPS 0
static const bool prefetch_blocks = false;
#endif

/* every row of a float or int8 weight, the kind a constant where it is inlined */
static inline __attribute__((always_inline)) void all_rows_float(const float *x, long K, const void *w, int kind, long N,
        const void *scales, int scale_kind, float *y, int threads) {
    #pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long block = 0; block < N / ROWS; block++) rows_float(x, K, w, kind, block * ROWS, ROWS, scales, scale_kind, y);
    for (long n = N - N % ROWS; n < N; n++) rows_float(x, K, w, kind, n, 1, scales, scale_kind, y);
}

/* every row of int8 (group 0) or 4-bit codes: x quantized once for all of them */
static inline __attribute__((always_inline)) void all_rows_integer(const float *x, long K, const void *w, int kind,
        long N, const void *scales, const void *mins, int scale_kind, long group, float *y, int threads) {
#if VNNI_LOOPS
    if (kind == U4) { all_rows_u4_vnni(x, K, w, N, scales, mins, scale_kind, group, y, threads); return; }
#endif
    int16_t *xq = (int16_t *)malloc(K * sizeof(int16_t));
    float *step = (float *)malloc(K / XBLOCK * sizeof(float)), *xsum = (float *)calloc(group ? K / group : 1, sizeof(float));
#if VNNI_LOOPS
    quantize_x_wide(x, K, xq, step, nullptr, nullptr, nullptr, 0);
#else
    for (long g = 0; group && g < K / group; g++)  /* no division a position: 576 of them cost us a call (docs/bench.md) */
        for (long k = g * group; k < (g + 1) * group; k++) xsum[g] += x[k];
    quantize_x(x, K, kind == U4, xq, step);
#endif
    #pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long block = 0; block < N / ROWS; block++) {
        if (kind == U4) rows_u4(xq, step, xsum, K, w, block * ROWS, ROWS, scales, mins, scale_kind, group, y);
        else rows_i8(xq, step, K, w, block * ROWS, ROWS, scales, scale_kind, y);
    }
    for (long n = N - N % ROWS; n < N; n++) {
        if (kind == U4) rows_u4(xq, step, xsum, K, w, n, 1, scales, mins, scale_kind, group, y);
        else rows_i8(xq, step, K, w, n, 1, scales, scale_kind, y);
    }
    free(xq), free(step), free(xsum);
}

/* by_x_rows<XMAX>(M, f) calls f.template operator()<XN>(m) over the M rows of x: XN = XMAX rows while that many are
   left, then the rest in one call, so that each loop sees its XN as a constant (its accumulators stay in registers) */
template <int XMAX, typename F>
static inline __attribute__((always_inline)) void by_x_rows(long M, F &&f) {
    long m = 0;
    for (; m + XMAX <= M; m += XMAX) f.template operator()<XMAX>(m);
    [&]<int... I>(std::integer_sequence<int, I...>) {
        ((M - m == I + 1 ? f.template operator()<I + 1>(m) : void()), ...);
    }(std::make_integer_sequence<int, XMAX - 1>{});
}

/* A few rows of x at once (batched decoding): each weight is read once and used for two FLOPs per row, so at 16
   rows the loop is bound by the multiply rate, not by memory. A block of WR weight rows, widened to fp32 in
   registers once per 8 columns, meets XR rows of x at a time: WR x XR accumulators (12 of AVX2's 16 registers),
   and the block stays in L1 while the groups of x rows pass over it; the first pass prefetches it (without, the
   bf16 loop below took 2.7x as long on a 4-row SmolLM2 step's products, on the Zen 4 measured). */
#define WR 2
#define XR 6
template <int KIND, int R, int XN>
static inline __attribute__((always_inline)) void float_block(const float *x, long K, const void *w, long n,
        long m, long N, float *y) {
    long K8 = K & ~7L, size = KIND == F32 ? 4 : 2;
    __m256 acc[R][XN];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < XN; j++) acc[r][j] = _mm256_setzero_ps();
    for (long k = 0; k < K8; k += 8) {
        if (m == 0) prefetch(w, K * size, n, R, k * size);
        __m256 wv[R];
        for (int r = 0; r < R; r++) wv[r] = load8(w, KIND, (n + r) * K + k);
        for (int j = 0; j < XN; j++) {
            __m256 xv = _mm256_loadu_ps(x + (m + j) * K + k);
            for (int r = 0; r < R; r++) acc[r][j] = _mm256_fmadd_ps(wv[r], xv, acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < XN; j++)
            y[(m + j) * N + n + r] = hsum(acc[r][j]) + dot_scalar(x + (m + j) * K, K, K8, w, KIND, n + r, 0, 0, 0, 1);
}

template <int KIND>
static void all_rows_few(const float *x, long M, long K, const void *w, long N, float *y, int threads) {
    #pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long n = 0; n < N - N % WR; n += WR)
        by_x_rows<XR>(M, [&]<int XN>(long m) { float_block<KIND, WR, XN>(x, K, w, n, m, N, y); });
    for (long n = N - N % WR; n < N; n++)
        by_x_rows<XR>(M, [&]<int XN>(long m) { float_block<KIND, 1, XN>(x, K, w, n, m, N, y); });
}
#endif

/* y (N) = W x for x (K, fp32) and W (N, K) of `kind`: for I8 `scales` holds one a row, for U4 `scales` and `mins`
   one a group of `group` weights along a row, both of `scale_kind` (F32, BF16 or F16); `threads` split the rows */
static void matvec(const float *x, long K, const void *w, int kind, long N, const void *scales, const void *mins,
            int scale_kind, long group, float *y, int threads) {
#if VECTOR_LOOPS
    switch (kind) {
        case F32: all_rows_float(x, K, w, F32, N, scales, scale_kind, y, threads); return;
        case BF16: all_rows_float(x, K, w, BF16, N, scales, scale_kind, y, threads); return;
        case F16: all_rows_float(x, K, w, F16, N, scales, scale_kind, y, threads); return;
        case I8:
        case U4:
            if (kind == I8 && K % XBLOCK) { all_rows_float(x, K, w, I8, N, scales, scale_kind, y, threads); return; }
            if (K % XBLOCK || (kind == U4 && (group % XBLOCK || K % group))) break;
            if (kind == I8) group = 0;
            if (scale_kind == BF16) all_rows_integer(x, K, w, kind, N, scales, mins, BF16, group, y, threads);
            else if (scale_kind == F16) all_rows_integer(x, K, w, kind, N, scales, mins, F16, group, y, threads);
            else all_rows_integer(x, K, w, kind, N, scales, mins, F32, group, y, threads);
            return;
    }
#endif
    #pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long n = 0; n < N; n++) {
        float sum = dot_scalar(x, K, 0, w, kind, n, scales, mins, scale_kind, group);
        y[n] = kind == I8 ? sum * scalar_at(scales, scale_kind, n) : sum;
    }
}

#if VNNI_LOOPS && defined(__AVX512BF16__)  /* bf16_of_sums, load16: the VNNI section's */
#define BF16_ROWS 1
/* bf16 rows against bf16 weights on a CPU that multiplies bf16 (AVX-512 BF16: Zen 4, Cooper Lake and later):
   vdpbf16ps multiplies 32 pairs at once, exactly (the product of two bf16 fits an fp32), and sums in fp32, four
   times the columns of an fp32 FMA. Up to 8 rows (9 and more: bf16_lanes_block below; the AMX tiles' last
   outputs: any number), one weight row meets BF16_XR rows of x: 12 accumulators. Measured on the Zen 4
   (16 rows of SmolLM2's products, interleaved runs): 1 x 12 took 48-62 ms a step, 2 x 6 69-75, 2 x 8 64-78 (its
   16 accumulators the compiler kept in memory), torch's F.linear 59-79. The sums are rounded to bf16 as torch
   rounds (to nearest even). */
#define BF16_XR 12
static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  /* NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}

template <int XN>
static inline __attribute__((always_inline)) void bf16_row(const uint16_t *x, long K, const uint16_t *w, long n,
        long m, long N, uint16_t *y) {
    __m512 acc[XN];
    for (int j = 0; j < XN; j++) acc[j] = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 32) {
        if (m == 0) prefetch(w, K * 2, n, 1, k * 2);  /* the first pass over the row brings it from memory */
        __mmask32 mask = K - k >= 32 ? 0xffffffffu : (1u << (K - k)) - 1;  /* a row's last columns */
        __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + n * K + k);
        for (int j = 0; j < XN; j++)
            acc[j] = _mm512_dpbf16_ps(acc[j], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (m + j) * K + k));
    }
    for (int j = 0; j < XN; j++) y[(m + j) * N + n] = float_to_bf16(_mm512_reduce_add_ps(acc[j]));
}

/* 9 rows and more (BF16_LANES_FROM): the rows of x lie across the 16 lanes, so the sums need no horizontal adds.
   x is packed once a call, 16 rows at a time, as pairs of columns: xp[p][j] = (x[j][2p], x[j][2p + 1]), one
   32-bit lane a row (rows past M are zeros). A block of BF16_WR weight rows streams past it: for each pair p, one
   load of xp[p] and, for each weight row, its pair (w[n][2p], w[n][2p + 1]) broadcast from memory to every lane,
   so one vdpbf16ps adds that weight row's two products to all 16 rows' sums. 16 accumulators, one a weight row,
   rounded to bf16 16 at a time at the end. bf16_row above ends each weight row with 12 horizontal sums of 16 lanes
   (a chain of shuffles and adds each) after only 18 products on a 576-column row: they cost as much as the
   products. While the first pass over a block runs, the block BF16_BLOCKS_AHEAD further on is prefetched into L2,
   a line of each of its rows per line of ours. Measured on the Zen 4 (a scratch timing of one decode step's 211
   SmolLM2 products, random bf16 weights, median of 7, bf16_row against this loop in one process): 16 rows 45.2 ->
   30.2 ms at 1 thread, 24.0 -> 18.4 at 2; 32 rows 106.9 -> 64.2 and 54.1 -> 31.5 (F.linear 82.9 and 44.5).
   Prefetching the next block into L1 took 36.5 ms at 16 rows, the prefetch of the other loops 41.2. 16 x 16
   products a cycle is the CPU's limit: 230 GFLOP/s on this Zen 4 with no memory traffic (a loop of vdpbf16ps
   alone); this loop reached 143 at 16 rows. At 8 rows and fewer the lanes would be half empty: bf16_row is as fast
   or faster there. */
#define BF16_WR 16
#define BF16_LANES_FROM 9
#define BF16_BLOCKS_AHEAD 2
static void pack_x_pairs(const uint16_t *x, long M, long K, uint32_t *xp) {
    long P = (K + 1) / 2;
    for (long c = 0; c < (M + 15) / 16; c++)
        for (long p = 0; p < P; p++)
            for (long j = 0; j < 16; j++) {
                long m = c * 16 + j;
                uint32_t lo = m < M ? x[m * K + 2 * p] : 0, hi = m < M && 2 * p + 1 < K ? x[m * K + 2 * p + 1] : 0;
                xp[(c * P + p) * 16 + j] = lo | hi << 16;
            }
}

template <int WN>
static inline __attribute__((always_inline)) void bf16_lanes_block(const uint32_t *xp, long M, long K,
        const uint16_t *w, long n, long N, uint16_t *y) {
    long P = (K + 1) / 2, full = K / 2;  /* an odd K's last column: a pair whose second weight is 0 */
    const uint16_t *rows = w + n * K;
    const char *ahead = (const char *)(rows + BF16_BLOCKS_AHEAD * BF16_WR * K);
    for (long c = 0; c < (M + 15) / 16; c++) {  /* 16 rows of x at a time; the block stays in L1 or L2 */
        const uint32_t *xc = xp + c * P * 16;
        __m512 acc[WN];
        for (int r = 0; r < WN; r++) acc[r] = _mm512_setzero_ps();
        for (long p = 0; p < full; p++) {
            if (c == 0 && (p & 15) == 0)
                for (int r = 0; r < WN; r++) _mm_prefetch(ahead + (WN * p * 4 + r * 64), _MM_HINT_T1);
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xc + p * 16);
            #pragma GCC unroll 16
            for (int r = 0; r < WN; r++) {
                uint32_t pair;
                memcpy(&pair, rows + r * K + 2 * p, 4);
                acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_set1_epi32(pair));
            }
        }
        if (full < P) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xc + full * 16);
            for (int r = 0; r < WN; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_set1_epi32(rows[r * K + K - 1]));
        }
        for (int r = 0; r < WN; r++) {
            uint16_t sums[16];
            _mm256_storeu_si256((__m256i *)sums, bf16_of_sums(acc[r]));
            for (long j = 0; j < std::min(16L, M - c * 16); j++) y[(c * 16 + j) * N + n + r] = sums[j];
        }
    }
}

static void few_rows_bf16(const uint16_t *x, long M, long K, const uint16_t *w, long N, uint16_t *y, int threads) {
    if (M >= BF16_LANES_FROM) {
        std::vector<uint32_t> xp((M + 15) / 16 * ((K + 1) / 2) * 16);
        pack_x_pairs(x, M, K, xp.data());
        #pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
        for (long b = 0; b < (N + BF16_WR - 1) / BF16_WR; b++)
            by_x_rows<BF16_WR>(std::min((long)BF16_WR, N - b * BF16_WR), [&]<int WN>(long r) {
                bf16_lanes_block<WN>(xp.data(), M, K, w, b * BF16_WR + r, N, y); });
        return;
    }
    #pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long n = 0; n < N; n++) by_x_rows<BF16_XR>(M, [&]<int XN>(long m) { bf16_row<XN>(x, K, w, n, m, N, y); });
}

/* Weights laid out in blocks of 16 rows for the CPU's bf16 products (speed.BlockedLinear lays them out once):
   blocks[b][p][r] is the pair (w[16b + r][2p], w[16b + r][2p + 1]), so 16 rows' pair p fill one 64-byte vector and
   a block streams from memory in one run. One vdpbf16ps then adds pair p of x (broadcast to every lane) times
   those 16 rows' pairs into 16 row sums at once: no sums across the lanes at the end, and one stream for the
   hardware prefetcher, where the row-major loops above read four (one row of x) or sixteen (bf16_lanes_block)
   interleaved rows. Measured on the Zen 4 at 1 thread, 30 layers of SmolLM2's four product shapes called from
   Python (random weights, medians of 11): one row 12.81 -> 9.56 ms, 16 rows 23.96 -> 20.41 (166 GFLOP/s); in the
   compiled step 1.03-1.05x at one row, 1.06x at 16 (docs/bench.md, "Weights in blocks of 16 rows").
   Up to 16 rows of x at a time, one accumulator each (one row: four, over alternate pairs, so no chain of
   dependent adds limits it); rows of x past 16 meet the block again while it is in L1 or L2. On a CPU with AMX,
   more than one row goes to tile_blocks_bf16 instead. */
#define BLOCKED_AHEAD 2048
template <int XN>
static inline __attribute__((always_inline)) void blocked_rows(const uint16_t *x, const uint32_t *packed, long K,
        const uint32_t *block, long m, long N, long n, uint16_t *y) {
    long P = K / 2;
    const uint32_t *xp = (const uint32_t *)x;  /* x's pairs, read as one 32-bit lane each */
    if (XN == 1) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        long p = 0;
        for (; p + 4 <= P; p += 4) {
            const uint32_t *xr = xp + m * P + p;
            prefetch_stream(block + p * 16, 4 * 64);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(block + p * 16), (__m512bh)_mm512_set1_epi32(xr[0]));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(block + p * 16 + 16), (__m512bh)_mm512_set1_epi32(xr[1]));
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(block + p * 16 + 32), (__m512bh)_mm512_set1_epi32(xr[2]));
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(block + p * 16 + 48), (__m512bh)_mm512_set1_epi32(xr[3]));
        }
        for (; p < P; p++)
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(block + p * 16), (__m512bh)_mm512_set1_epi32(xp[m * P + p]));
        _mm256_storeu_si256((__m256i *)(y + m * N + n), bf16_of_sums(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))));
        return;
    }
    __m512 acc[XN];
    for (int j = 0; j < XN; j++) acc[j] = _mm512_setzero_ps();
    const uint32_t *xc = packed + m / 16 * P * 16;  /* pack_x_pairs' chunk of 16 rows: pair p of row j at [p][j] */
    for (long p = 0; p < P; p++) {
        if (m == 0) _mm_prefetch((const char *)(block + p * 16) + BLOCKED_AHEAD, _MM_HINT_T0);
        __m512bh wv = (__m512bh)_mm512_loadu_si512(block + p * 16);
        #pragma GCC unroll 16
        for (int j = 0; j < XN; j++) acc[j] = _mm512_dpbf16_ps(acc[j], wv, (__m512bh)_mm512_set1_epi32(xc[p * 16 + j]));
    }
    for (int j = 0; j < XN; j++) _mm256_storeu_si256((__m256i *)(y + (m + j) * N + n), bf16_of_sums(acc[j]));
}

static void blocked_bf16(const uint16_t *x, long M, long K, const uint16_t *blocks, long N, uint16_t *y, int threads) {
    std::vector<uint32_t> packed(M > 1 ? (M + 15) / 16 * (K / 2) * 16 : 0);  /* one base address for 16 rows' pairs */
    if (M > 1) pack_x_pairs(x, M, K, packed.data());
    #pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long b = 0; b < N / 16; b++)
        by_x_rows<16>(M, [&]<int XN>(long m) {
            blocked_rows<XN>(x, packed.data(), K, (const uint32_t *)blocks + b * (K / 2) * 16, m, N, b * 16, y); });
}
#else
#define BF16_ROWS 0
static void few_rows_bf16(const uint16_t *, long, long, const uint16_t *, long, uint16_t *, int) {}
static void blocked_bf16(const uint16_t *, long, long, const uint16_t *, long, uint16_t *, int) {}
#endif

/* the bytes of one group of 16 rows' 4-bit codes in blocks with their scales and minimums inline (blocked_q4_rows) */
static long q4_group_bytes(long group, int scale_kind) { return group * 8 + 32 * (scale_kind == F32 ? 4 : 2); }

#if VNNI_LOOPS
#define I8_BLOCKS 1
/* int8 weights laid out in blocks of 16 rows (speed.BlockedLinear of a quantize.Int8Linear), as the bf16 ones above:
   blocks[b][p][r] = (W[16b + r][2p], W[16b + r][2p + 1]), the 16 rows' codes of a pair of columns in 32 bytes.
   vpmovsxbw widens them to int16 and one vpdpwssd adds each row's two products with x's pair (x rounded to int16 in
   blocks of 32, quantize_x_wide, the row-major loop's very numbers) into that row's int32 lane, exactly: no sums
   across the lanes, and the weight streams from memory in one run where rows_i8 reads four rows interleaved with
   256-bit vectors. A block of 32 columns (16 pairs) ends with its sums in fp32 times its step of x; the rows' own
   scales come last. One row of x sums alternate pairs into four accumulators (no chain of dependent adds); more
   rows (batched decoding) up to 8 at a time, one accumulator each, the block read from L1 or L2 again past the
   first 8. |one block's sum| <= 16 x 2 x 127 x 32767 < 2^31. One block follows another in memory: on the Zen 4 the
   hardware prefetcher alone streams it, and prefetching 2, 4 or 9 KB ahead made a SmolLM2 step's products slower
   (scratch: 6.5-10.0 ms against 5.8-6.5 without); on Intel's cores prefetch_stream (above). */
template <int XN>
static inline __attribute__((always_inline)) void blocked_i8_rows(const uint32_t *xpairs, const float *step, long K,
        const int8_t *block, long m, __m512 *sums) {
    long P = K / 2, B = K / XBLOCK;
    for (int j = 0; j < XN; j++) sums[j] = _mm512_setzero_ps();
    for (long b = 0; b < B; b++) {
        const int8_t *wb = block + b * 16 * 32;  /* 16 pairs of columns, 32 bytes each */
        const uint32_t *xb = xpairs + m * P + b * 16;
        if (m == 0) prefetch_stream(wb, 16 * 32);  /* rows of x past the first meet the block in L1 or L2 */
        if constexpr (XN == 1) {
            __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
            for (int q = 0; q < 16; q += 4) {
                s0 = _mm512_dpwssd_epi32(s0, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wb + q * 32))), _mm512_set1_epi32(xb[q]));
                s1 = _mm512_dpwssd_epi32(s1, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wb + q * 32 + 32))), _mm512_set1_epi32(xb[q + 1]));
                s2 = _mm512_dpwssd_epi32(s2, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wb + q * 32 + 64))), _mm512_set1_epi32(xb[q + 2]));
                s3 = _mm512_dpwssd_epi32(s3, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wb + q * 32 + 96))), _mm512_set1_epi32(xb[q + 3]));
            }
            __m512i s = _mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3));
            sums[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(step[m * B + b]), sums[0]);
            continue;
        }
        __m512i s[XN];
        for (int j = 0; j < XN; j++) s[j] = _mm512_setzero_si512();
        for (int q = 0; q < 16; q++) {
            __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wb + q * 32)));
            #pragma GCC unroll 8
            for (int j = 0; j < XN; j++) s[j] = _mm512_dpwssd_epi32(s[j], wv, _mm512_set1_epi32(xb[j * P + q]));
        }
        for (int j = 0; j < XN; j++)
            sums[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[j]), _mm512_set1_ps(step[(m + j) * B + b]), sums[j]);
    }
}

/* y (M, N) = x (M, K) against int8 blocks and one scale a row (of scale_kind); x and y both fp32 or both bf16 */
static void blocked_i8(const void *x_in, long M, long K, const int8_t *blocks, long N, const void *scales,
                       int scale_kind, void *y, bool y_bf16, int threads) {
    Scratch scratch(Scratch::room<float>(y_bf16 ? M * K : 0) + Scratch::room<int16_t>(M * K) +
                    Scratch::room<float>(M * (K / XBLOCK)));
    const float *x = as_floats(x_in, y_bf16, M * K, scratch.take<float>(y_bf16 ? M * K : 0));
    int16_t *xq = scratch.take<int16_t>(M * K);
    float *step = scratch.take<float>(M * (K / XBLOCK));
    for (long m = 0; m < M; m++)
        quantize_x_wide(x + m * K, K, xq + m * K, step + m * (K / XBLOCK), nullptr, nullptr, nullptr, 0);
    #pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long b = 0; b < N / 16; b++) {
        __m512 row_scales = load16(scales, scale_kind, b * 16, 0xffff);
        by_x_rows<8>(M, [&]<int XN>(long m) {
            __m512 sums[XN];
            blocked_i8_rows<XN>((const uint32_t *)xq, step, K, blocks + b * 16 * K, m, sums);
            for (int j = 0; j < XN; j++) {
                __m512 v = _mm512_mul_ps(sums[j], row_scales);
                long at = (m + j) * N + b * 16;
                if (y_bf16) _mm256_storeu_si256((__m256i *)((uint16_t *)y + at), bf16_of_sums(v));
                else _mm512_storeu_ps((float *)y + at, v);
            }
        });
    }
}

/* 4-bit codes (quantize.Int4Linear's) laid out in blocks of 16 rows with their groups' scales and minimums inline
   (speed.BlockedLinear of an Int4Linear): blocks[b][g], group g of rows 16b..16b+15, is group / 8 lanes of 64 bytes,
   then the 16 rows' scales, then their 16 minimums (of scale_kind). Lane c holds each row's codes of 8 columns in
   its own 4 bytes, byte i = q[16b + r][group g + 8c + i] | q[16b + r][group g + 8c + 4 + i] << 4: low nibbles
   columns 8c..8c+3, high nibbles 8c+4..8c+7. vpdpbusd adds a row's 4 products with 4 bytes of x into that row's
   int32 lane, where rows_u4_vnni sums across the lanes and gathers each row's scales. Everything a block needs lies
   in one run of memory: with the scales and minimums in two arrays of their own, read beside the codes, the same
   loop streamed a SmolLM2 step's 4-bit products 1.22x slower (docs/bench.md, "4-bit scales inline"). x is rounded
   to int16 in blocks of 32 as the row-major loop rounds it (quantize_x_wide) and split, x = 256 hi + lo (hi signed,
   lo unsigned): codes by hi and lo by codes (0..15 pass as signed bytes), four vpdpbusd a load. A block of 32
   columns: |256 h + l| <= 32 x 15 x 32767 < 2^31 exactly, then fp32 times its group's scales and x's step; each
   group's minimums times the sum of x over it. One loop over the blocks of 32 columns, counting down to a group's
   end: as two nested loops (groups, their blocks) GCC compiled it 1.5x slower (scratch, the Zen 4). */
template <int XN>
static inline __attribute__((always_inline)) void blocked_q4_rows(const int8_t *xhi, const uint8_t *xlo,
        const float *step, const float *xsum, long K, long group, const uint8_t *block, int scale_kind, long m,
        __m512 *sums) {
    long B = K / XBLOCK, G = K / group, per = group / XBLOCK, size = scale_kind == F32 ? 4 : 2, left = per, g = 0;
    const __m512i nibble = _mm512_set1_epi8(15);
    for (int j = 0; j < XN; j++) sums[j] = _mm512_setzero_ps();
    const uint8_t *wb = block;
    __m512 scale = load16(wb + group * 8, scale_kind, 0, 0xffff);
    for (long b = 0; b < B; b++) {
        if (m == 0) prefetch_stream(wb, 4 * 64 + 64);  /* this block of 32 columns, and scales past a group's end */
        __m512i h[XN][2], l[XN][2];  /* two of each a row: no chain of 8 dependent adds */
        #pragma GCC unroll 4
        for (int j = 0; j < XN; j++) h[j][0] = h[j][1] = l[j][0] = l[j][1] = _mm512_setzero_si512();
        #pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {  /* unrolled: h[j][c & 1] then names registers, not a stack slot */
            __m512i v = _mm512_loadu_si512(wb + c * 64);
            __m512i first = _mm512_and_si512(v, nibble), second = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            #pragma GCC unroll 4
            for (int j = 0; j < XN; j++) {
                long k = (m + j) * K + b * XBLOCK + c * 8;
                int32_t hi0, hi1, lo0, lo1;
                memcpy(&hi0, xhi + k, 4), memcpy(&hi1, xhi + k + 4, 4), memcpy(&lo0, xlo + k, 4), memcpy(&lo1, xlo + k + 4, 4);
                h[j][c & 1] = _mm512_dpbusd_epi32(h[j][c & 1], first, _mm512_set1_epi32(hi0));
                h[j][c & 1] = _mm512_dpbusd_epi32(h[j][c & 1], second, _mm512_set1_epi32(hi1));
                l[j][c & 1] = _mm512_dpbusd_epi32(l[j][c & 1], _mm512_set1_epi32(lo0), first);
                l[j][c & 1] = _mm512_dpbusd_epi32(l[j][c & 1], _mm512_set1_epi32(lo1), second);
            }
        }
        for (int j = 0; j < XN; j++) {
            __m512i hj = _mm512_add_epi32(h[j][0], h[j][1]), lj = _mm512_add_epi32(l[j][0], l[j][1]);
            __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(hj, 8), lj));
            sums[j] = _mm512_fmadd_ps(sum, _mm512_mul_ps(scale, _mm512_set1_ps(step[(m + j) * B + b])), sums[j]);
        }
        wb += 4 * 64;  /* the next block of 32 columns, or this group's scales and minimums */
        if (--left == 0) {
            __m512 minimum = load16(wb + 16 * size, scale_kind, 0, 0xffff);
            for (int j = 0; j < XN; j++) sums[j] = _mm512_fmadd_ps(minimum, _mm512_set1_ps(xsum[(m + j) * G + g]), sums[j]);
            wb += 32 * size, left = per, g++;
            if (b + 1 < B) scale = load16(wb + group * 8, scale_kind, 0, 0xffff);
        }
    }
}

/* y (M, N) = x (M, K) against 4-bit blocks with scales and minimums (of scale_kind) inline; x and y both fp32 or both
   bf16 */
static void blocked_q4(const void *x_in, long M, long K, const uint8_t *blocks, long N, int scale_kind, long group,
                       void *y, bool y_bf16, int threads) {
    long B = K / XBLOCK, G = K / group, block_bytes = G * q4_group_bytes(group, scale_kind);
    Scratch scratch(Scratch::room<float>(y_bf16 ? M * K : 0) + Scratch::room<int16_t>(M * K) +
                    Scratch::room<float>(M * B) + Scratch::room<float>(M * G) + 2 * Scratch::room<int8_t>(M * K));
    const float *x = as_floats(x_in, y_bf16, M * K, scratch.take<float>(y_bf16 ? M * K : 0));
    int16_t *xq = scratch.take<int16_t>(M * K);
    float *step = scratch.take<float>(M * B), *xsum = scratch.take<float>(M * G);
    int8_t *xhi = scratch.take<int8_t>(M * K);
    uint8_t *xlo = scratch.take<uint8_t>(M * K);
    memset(xsum, 0, M * G * sizeof(float));
    for (long m = 0; m < M; m++)
        quantize_x_wide(x + m * K, K, xq + m * K, step + m * B, nullptr, nullptr, xsum + m * G, group);
    for (long k = 0; k < M * K; k += XBLOCK) {  /* the hi and lo bytes of each int16 (a scalar loop: 2% of a step) */
        __m512i q = _mm512_loadu_si512(xq + k);
        _mm256_storeu_si256((__m256i *)(xhi + k), _mm512_cvtepi16_epi8(_mm512_srai_epi16(q, 8)));
        _mm256_storeu_si256((__m256i *)(xlo + k), _mm512_cvtepi16_epi8(q));
    }
    #pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long b = 0; b < N / 16; b++) {
        by_x_rows<4>(M, [&]<int XN>(long m) {
            __m512 sums[XN];
            blocked_q4_rows<XN>(xhi, xlo, step, xsum, K, group, blocks + b * block_bytes,
                                scale_kind, m, sums);
            for (int j = 0; j < XN; j++) {
                long at = (m + j) * N + b * 16;
                if (y_bf16) _mm256_storeu_si256((__m256i *)((uint16_t *)y + at), bf16_of_sums(sums[j]));
                else _mm512_storeu_ps((float *)y + at, sums[j]);
            }
        });
    }
}
#else
#define I8_BLOCKS 0
static void blocked_i8(const void *, long, long, const int8_t *, long, const void *, int, void *, bool, int) {}
static void blocked_q4(const void *, long, long, const uint8_t *, long, int, long, void *, bool, int) {}
#endif


#if BF16_ROWS && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define TILE_ROWS 1
#include <sys/syscall.h>
#include <unistd.h>
/* Up to 64 bf16 rows at once on a CPU with AMX (Sapphire Rapids and later): one tile instruction multiplies a
   16 x 32 block of bf16 by a 32 x 16 one into 16 x 16 fp32 sums, 8,192 products, so at 16 rows the loop is bound
   by memory again, as one row's is (torch's product, oneDNN, took 55 ms for a SmolLM2 step's products at 16 rows
   where one row took 31 here: docs/bench.md, "Tiles for batched rows"). The weight is the tiles' left operand as
   it lies in memory: 16 of its rows (outputs) by 32 columns, loaded with the row stride. x is the right operand,
   packed the way the tiles want it (pairs of columns side by side: B[p][2m + j] = x[m][2p + j]), 16 rows a tile,
   so each 16 x 16 block of sums is (outputs, rows) and is written out transposed. Each weight tile is loaded once
   and meets up to 4 tiles of x rows. The next 16 weight rows lie right after these in memory: they are prefetched
   a kilobyte a step. Linux lends a process the tiles' 8 KB of state when it asks (arch_prctl); tiles_permitted. */
struct TileConfig { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };

static bool tiles_permitted() {
    static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return permitted;
}

/* six tiles of 16 rows by 64 bytes (16 x 32 bf16, or 16 x 16 fp32 sums), for the calling thread */
static void load_tile_config() {
    TileConfig config = {};
    config.palette = 1;
    for (int t = 0; t < 6; t++) config.rows[t] = 16, config.colsb[t] = 64;
    _tile_loadconfig(&config);
}

/* 16 weight rows from n against XB tiles of x rows (from tile m0): sums in tiles 0..XB-1, weight in 4, x in 5 */
template <int XB>
static inline __attribute__((always_inline)) void tile_block(const uint16_t *xp, long m0, long M, long K,
        const uint16_t *w, long n, long N, bool last, uint16_t *y) {
    long KC = K / 32;
    const uint16_t *block = w + n * K;
    _tile_zero(0); if (XB > 1) _tile_zero(1); if (XB > 2) _tile_zero(2); if (XB > 3) _tile_zero(3);
    for (long kc = 0; kc < KC; kc++) {
        if (!last) for (int i = 0; i < 16; i++) _mm_prefetch((const char *)(block + 16 * K) + kc * 1024 + i * 64, _MM_HINT_T0);
        _tile_loadd(4, block + kc * 32, K * 2);
        const uint16_t *xs = xp + (m0 * KC + kc) * 512;
        _tile_loadd(5, xs, 64); _tile_dpbf16ps(0, 4, 5);
        if (XB > 1) { _tile_loadd(5, xs + KC * 512, 64); _tile_dpbf16ps(1, 4, 5); }
        if (XB > 2) { _tile_loadd(5, xs + 2 * KC * 512, 64); _tile_dpbf16ps(2, 4, 5); }
        if (XB > 3) { _tile_loadd(5, xs + 3 * KC * 512, 64); _tile_dpbf16ps(3, 4, 5); }
    }
    alignas(64) float sums[4][16][16];  /* [x tile][output][row] */
    _tile_stored(0, sums[0], 64); if (XB > 1) _tile_stored(1, sums[1], 64);
    if (XB > 2) _tile_stored(2, sums[2], 64); if (XB > 3) _tile_stored(3, sums[3], 64);
    const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(16));
    for (int b = 0; b < XB; b++)  /* row m's 16 sums are column m of the block: gathered, rounded to bf16 (to nearest even) */
        for (long m = 0; m < 16 && (m0 + b) * 16 + m < M; m++)
            _mm256_storeu_si256((__m256i *)(y + ((m0 + b) * 16 + m) * N + n),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_i32gather_ps(column, &sums[b][0][m], 4)));
}

static void tile_rows_bf16(const uint16_t *x, long M, long K, const uint16_t *w, long N, uint16_t *y, int threads) {
    long KC = K / 32, MB = (M + 15) / 16;
    std::vector<uint16_t> xp(MB * KC * 512, 0);  /* rows past M stay zero */
    uint32_t *pairs = (uint32_t *)xp.data();  /* a pair of columns, (2p, 2p + 1), moves as one 32-bit word */
    for (long m = 0; m < M; m++) {
        const uint32_t *row = (const uint32_t *)(x + m * K);
        for (long kc = 0; kc < KC; kc++)
            for (long p = 0; p < 16; p++) pairs[((m / 16) * KC + kc) * 256 + p * 16 + m % 16] = row[kc * 16 + p];
    }
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        load_tile_config();
        #pragma omp for schedule(static)
        for (long n = 0; n < N - N % 16; n += 16)
            for (long m0 = 0; m0 < MB; m0 += 4) {
                bool last = n + 32 > N;
                switch (std::min(MB - m0, 4L)) {
                    case 1: tile_block<1>(xp.data(), m0, M, K, w, n, N, last, y); break;
                    case 2: tile_block<2>(xp.data(), m0, M, K, w, n, N, last, y); break;
                    case 3: tile_block<3>(xp.data(), m0, M, K, w, n, N, last, y); break;
                    default: tile_block<4>(xp.data(), m0, M, K, w, n, N, last, y);
                }
            }
        _tile_release();
    }
    for (long n = N - N % 16; n < N; n++)  /* the last outputs, fewer than a tile's 16: the vector loop above */
        by_x_rows<BF16_XR>(M, [&]<int XN>(long m) { bf16_row<XN>(x, K, w, n, m, N, y); });
}

/* The same tiles against bf16 weights in blocks of 16 rows (blocked_rows' layout, so that one row streams one run of
   memory): 16 pairs of columns of a block, 1 KB in one run, are the tiles' right operand as they lie (pair p of
   output r at [p][r], the pairs side by side as the tiles want them), and 16 rows of x by 32 columns the left one,
   loaded from x with its row stride: no packing, and each 16 x 16 block of sums is (rows, outputs), written out as
   it is. The block's next kilobytes are prefetched as they stream. XB tiles of x rows (from tile m0), sums in tiles
   0..XB-1, weight in 4, x in 5. */
template <int XB>
static inline __attribute__((always_inline)) void tile_blocked(const uint16_t *x, long m0, long M, long K,
        const uint16_t *block, long n, long N, uint16_t *y) {
    _tile_zero(0); if (XB > 1) _tile_zero(1); if (XB > 2) _tile_zero(2); if (XB > 3) _tile_zero(3);
    const uint16_t *xs = x + m0 * 16 * K;
    for (long kc = 0; kc < K / 32; kc++) {
        prefetch_stream(block + kc * 512, 1024);
        _tile_loadd(4, block + kc * 512, 64);
        _tile_loadd(5, xs + kc * 32, K * 2); _tile_dpbf16ps(0, 5, 4);
        if (XB > 1) { _tile_loadd(5, xs + 16 * K + kc * 32, K * 2); _tile_dpbf16ps(1, 5, 4); }
        if (XB > 2) { _tile_loadd(5, xs + 32 * K + kc * 32, K * 2); _tile_dpbf16ps(2, 5, 4); }
        if (XB > 3) { _tile_loadd(5, xs + 48 * K + kc * 32, K * 2); _tile_dpbf16ps(3, 5, 4); }
    }
    alignas(64) float sums[4][16][16];  /* [x tile][row][output] */
    _tile_stored(0, sums[0], 64); if (XB > 1) _tile_stored(1, sums[1], 64);
    if (XB > 2) _tile_stored(2, sums[2], 64); if (XB > 3) _tile_stored(3, sums[3], 64);
    for (int b = 0; b < XB; b++)
        for (long m = 0; m < 16 && (m0 + b) * 16 + m < M; m++)
            _mm256_storeu_si256((__m256i *)(y + ((m0 + b) * 16 + m) * N + n), bf16_of_sums(_mm512_load_ps(sums[b][m])));
}

/* y (M, N) = x (M, K) against bf16 blocks (N / 16, K / 2, 16, 2), K a multiple of 32, M > 1: rows of x past the last
   full tile are read from a copy padded with zero rows */
static void tile_blocks_bf16(const uint16_t *x, long M, long K, const uint16_t *blocks, long N, uint16_t *y, int threads) {
    long MB = (M + 15) / 16;
    std::vector<uint16_t> padded(M % 16 ? MB * 16 * K : 0, 0);
    if (M % 16) memcpy(padded.data(), x, M * K * sizeof(uint16_t)), x = padded.data();
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        load_tile_config();
        #pragma omp for schedule(static)
        for (long b = 0; b < N / 16; b++)
            for (long m0 = 0; m0 < MB; m0 += 4) {
                const uint16_t *block = blocks + b * K * 16;
                switch (std::min(MB - m0, 4L)) {
                    case 1: tile_blocked<1>(x, m0, M, K, block, b * 16, N, y); break;
                    case 2: tile_blocked<2>(x, m0, M, K, block, b * 16, N, y); break;
                    case 3: tile_blocked<3>(x, m0, M, K, block, b * 16, N, y); break;
                    default: tile_blocked<4>(x, m0, M, K, block, b * 16, N, y);
                }
            }
        _tile_release();
    }
}
#else
#define TILE_ROWS 0
static bool tiles_permitted() { return false; }
static void tile_rows_bf16(const uint16_t *, long, long, const uint16_t *, long, uint16_t *, int) {}
static void tile_blocks_bf16(const uint16_t *, long, long, const uint16_t *, long, uint16_t *, int) {}
#endif

/* y (M, N) = x W^T for M rows of x (M, K, fp32) and a float W (N, K) of `kind` (F32, BF16 or F16) */
static void few_rows(const float *x, long M, long K, const void *w, int kind, long N, float *y, int threads) {
#if VECTOR_LOOPS
    switch (kind) {
        case F32: all_rows_few<F32>(x, M, K, w, N, y, threads); return;
        case BF16: all_rows_few<BF16>(x, M, K, w, N, y, threads); return;
        case F16: all_rows_few<F16>(x, M, K, w, N, y, threads); return;
    }
#endif
    for (long m = 0; m < M; m++) matvec(x + m * K, K, w, kind, N, 0, 0, F32, 0, y + m * N, threads);
}

/* Attention of one new position per sequence over the cache (speed::decode_attention): for row b, query head h and
   its K/V head j = h / G (G query heads share one), out[b, h] = sum over the positions s the mask allows of
   p_s v[b, j, s], p = softmax of q[b, h] . k[b, j, s] / sqrt(D). Scores, softmax and sums in fp32. A (b, j) at a
   time: each cached key row is widened once for its G queries, the scores stay in a scratch of G x S floats, and
   positions the mask leaves out are skipped, not read. (Inductor's loop for the same, compiled from
   speed.decode_attention_by_ops, read the whole cache and recomputed the query's rotary embedding at every
   position: docs/bench.md, "Attention over the cache".) */
#define GMAX 4  /* query heads scored at once against one loaded key row (their accumulators in registers) */
#if VNNI_LOOPS  /* AVX-512 F, BW and VL, which every CPU with AVX-512 VNNI has (load16 above) */
#define WIDE_ATTENTION 1
/* e^x for 16 x at once: 2^n e^r with n = round(x log2 e) and r = x - n ln 2 (ln 2 in two parts, the first exact
   times any n here) within +-0.35, e^r by its Taylor series to r^7 / 7! (the rest below 2^-27 of it), 2^n by
   vscalefps; below -104 the result is 0, as expf's is */
static inline __attribute__((always_inline)) __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-6f), r);
    __m512 e = _mm512_set1_ps(1.0f / 5040);
    for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
    return _mm512_scalef_ps(e, n);
}

/* attend_group below for D a multiple of 64 with AVX-512, N (up to GMAX) query heads at a time, N a constant so that
   the accumulators stay in registers: keys 16 columns a vector; the weights' exponentials 16 positions at a time;
   each value row loaded once for the N heads, 64 columns of each in four registers. (by_x_rows deals the G heads
   out GMAX at a time, the rest in one call, as it deals rows of x.) */
template <int KIND, int N>
static inline __attribute__((always_inline)) void scores_wide(const float *q, long D, const void *k, long base,
        long S, const bool *mask, const void *v, float *p, float *most) {
    const long size = KIND == F32 ? 4 : 2;
    __m512 qv[N][4];  /* D = 64: the queries in registers (stores to p could alias q: reloaded at every s) */
    float best[N];
    for (int i = 0; i < N; i++) {
        best[i] = most[i];
        if (D == 64) for (int c = 0; c < 4; c++) qv[i][c] = _mm512_loadu_ps(q + i * D + 16 * c);
    }
    for (long s = 0; s < S; s++) {
        if (!mask[s]) continue;
        for (long b = 0; b < D * size; b += 64) {  /* the key row 8 on, and this value row for sums_wide after */
            _mm_prefetch((const char *)k + (base + (s + 8) * D) * size + b, _MM_HINT_T0);
            _mm_prefetch((const char *)v + (base + s * D) * size + b, _MM_HINT_T0);
        }
        __m512 acc[N];
        for (int i = 0; i < N; i++) acc[i] = _mm512_setzero_ps();
        if (D == 64) {
            for (int c = 0; c < 4; c++) {
                __m512 key = load16(k, KIND, base + s * D + 16 * c, 0xffff);
                for (int i = 0; i < N; i++) acc[i] = _mm512_fmadd_ps(qv[i][c], key, acc[i]);
            }
        } else for (long d = 0; d < D; d += 16) {
            __m512 key = load16(k, KIND, base + s * D + d, 0xffff);
            for (int i = 0; i < N; i++) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i * D + d), key, acc[i]);
        }
        for (int i = 0; i < N; i++) {
            float score = _mm512_reduce_add_ps(acc[i]);
            p[i * S + s] = score, best[i] = score > best[i] ? score : best[i];
        }
    }
    for (int i = 0; i < N; i++) most[i] = best[i];
}

#if BF16_ROWS
/* scores_wide for bf16 queries and keys (AVX-512 BF16): vdpbf16ps adds 16 lanes' products of pairs straight from
   the bf16 rows, no widening, half the instructions; the queries unscaled (their products are exact in fp32,
   subnormals aside, which vdpbf16ps takes as zero), the score times 1 / sqrt(D) after. Attention over SmolLM2's
   cache at 16 rows ran 1.08x faster at 1 thread, 1.27x at 2 (docs/bench.md, "The greedy pick and bf16 attention
   scores"). */
template <int N>
static inline __attribute__((always_inline)) void scores_pairs(const uint16_t *q, long D, float scale, const void *k,
        long base, long S, const bool *mask, const void *v, float *p, float *most) {
    const uint16_t *keys = (const uint16_t *)k;
    __m512i qv[N][2];  /* D = 64: the queries in registers */
    float best[N];
    for (int i = 0; i < N; i++) {
        best[i] = most[i];
        if (D == 64) qv[i][0] = _mm512_loadu_si512(q + i * D), qv[i][1] = _mm512_loadu_si512(q + i * D + 32);
    }
    for (long s = 0; s < S; s++) {
        if (!mask[s]) continue;
        for (long b = 0; b < D * 2; b += 64) {  /* the key row 8 on, and this value row for sums_wide after */
            _mm_prefetch((const char *)k + (base + (s + 8) * D) * 2 + b, _MM_HINT_T0);
            _mm_prefetch((const char *)v + (base + s * D) * 2 + b, _MM_HINT_T0);
        }
        __m512 acc[N];
        for (int i = 0; i < N; i++) acc[i] = _mm512_setzero_ps();
        const uint16_t *row = keys + base + s * D;
        if (D == 64) {
            __m512bh first = (__m512bh)_mm512_loadu_si512(row), second = (__m512bh)_mm512_loadu_si512(row + 32);
            for (int i = 0; i < N; i++)
                acc[i] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[i], (__m512bh)qv[i][0], first), (__m512bh)qv[i][1], second);
        } else for (long d = 0; d < D; d += 32) {
            __m512bh key = (__m512bh)_mm512_loadu_si512(row + d);
            for (int i = 0; i < N; i++) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(q + i * D + d), key);
        }
        for (int i = 0; i < N; i++) {
            float score = _mm512_reduce_add_ps(acc[i]) * scale;
            p[i * S + s] = score, best[i] = score > best[i] ? score : best[i];
        }
    }
    for (int i = 0; i < N; i++) most[i] = best[i];
}
#endif

static inline __attribute__((always_inline)) void weights_wide(long S, const bool *mask, float *p, float most,
        float *norm) {
    __m512 total = _mm512_setzero_ps();
    for (long s = 0; s < S; s += 16) {
        __mmask16 in = S - s >= 16 ? 0xffff : (1u << (S - s)) - 1;
        __mmask16 keep = _mm_mask_cmpneq_epi8_mask(in, _mm_maskz_loadu_epi8(in, mask + s), _mm_setzero_si128());
        __m512 e = _mm512_maskz_mov_ps(keep, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(keep, p + s), _mm512_set1_ps(most))));
        _mm512_mask_storeu_ps(p + s, in, e);
        total = _mm512_add_ps(total, e);
    }
    *norm = 1.0f / _mm512_reduce_add_ps(total);
}

template <int KIND, int N>
static inline __attribute__((always_inline)) void sums_wide(const float *p, long D, const void *v, long base, long S,
        const bool *mask, const float *norm, float *out) {
    for (long d0 = 0; d0 < D; d0 += 64) {
        __m512 acc[N][4];
        for (int i = 0; i < N; i++)
            for (int j = 0; j < 4; j++) acc[i][j] = _mm512_setzero_ps();
        for (long s = 0; s < S; s++) {
            if (!mask[s]) continue;  /* garbage in the cache there must not reach the sums (0 x NaN) */
            __m512 value[4];
            for (int j = 0; j < 4; j++) value[j] = load16(v, KIND, base + s * D + d0 + 16 * j, 0xffff);
            for (int i = 0; i < N; i++) {
                __m512 weight = _mm512_set1_ps(p[i * S + s]);
                for (int j = 0; j < 4; j++) acc[i][j] = _mm512_fmadd_ps(weight, value[j], acc[i][j]);
            }
        }
        for (int i = 0; i < N; i++)
            for (int j = 0; j < 4; j++)
                _mm512_storeu_ps(out + i * D + d0 + 16 * j, _mm512_mul_ps(acc[i][j], _mm512_set1_ps(norm[i])));
    }
}

template <int KIND>
static void attend_group_wide(const float *q, const uint16_t *q16, float scale, int G, long D, const void *k,
                              const void *v, long base, long S, const bool *mask, float *p, float *out) {
    float most[64], norm[64];
    for (int g = 0; g < G; g++) most[g] = -INFINITY;
#if BF16_ROWS
    if (KIND == BF16 && q16 && D % 32 == 0)
        by_x_rows<GMAX>(G, [&]<int N>(long g) {
            scores_pairs<N>(q16 + g * D, D, scale, k, base, S, mask, v, p + g * S, most + g);
        });
    else
#endif
    by_x_rows<GMAX>(G, [&]<int N>(long g) { scores_wide<KIND, N>(q + g * D, D, k, base, S, mask, v, p + g * S, most + g); });
    for (int g = 0; g < G; g++) weights_wide(S, mask, p + g * S, most[g], norm + g);
    by_x_rows<GMAX>(G, [&]<int N>(long g) { sums_wide<KIND, N>(p + g * S, D, v, base, S, mask, norm + g, out + g * D); });
}
#else
#define WIDE_ATTENTION 0
template <int KIND>
static void attend_group_wide(const float *, const uint16_t *, float, int, long, const void *, const void *, long, long,
                              const bool *, float *, float *) {}
#endif

template <int KIND>
static void attend_group(const float *q, const uint16_t *q16, float scale, int G, long D, const void *k, const void *v,
                         long base, long S, const bool *mask, float *p, float *out) {
    /* p (G x S): the scores, then the weights; q (G x D) already scaled by 1 / sqrt(D), q16 the same bf16 unscaled
       (or none); out (G x D) */
    if (WIDE_ATTENTION && D % 64 == 0) return attend_group_wide<KIND>(q, q16, scale, G, D, k, v, base, S, mask, p, out);
    float most[64], total[64];
    for (int g = 0; g < G; g++) most[g] = -INFINITY, total[g] = 0;
    bool vectors = VECTOR_LOOPS && D % 8 == 0;
    for (long s = 0; s < S; s++) {
        if (!mask[s]) continue;
        long row = base + s * D;
        int g = 0;
#if VECTOR_LOOPS
        for (; vectors && g < G; g += GMAX) {  /* up to GMAX queries against one load of the key row */
            int n = G - g < GMAX ? G - g : GMAX;
            __m256 acc[GMAX];
            for (int i = 0; i < GMAX; i++) acc[i] = _mm256_setzero_ps();
            for (long d = 0; d < D; d += 8) {
                __m256 kv = load8(k, KIND, row + d);
                for (int i = 0; i < GMAX; i++)
                    if (i < n) acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (g + i) * D + d), kv, acc[i]);
            }
            for (int i = 0; i < n; i++) p[(g + i) * S + s] = hsum(acc[i]);
        }
#endif
        for (; g < G; g++) {
            float sum = 0;
            for (long d = 0; d < D; d++) sum += q[g * D + d] * scalar_at(k, KIND, row + d);
            p[g * S + s] = sum;
        }
        for (g = 0; g < G; g++) most[g] = fmaxf(most[g], p[g * S + s]);
    }
    for (int g = 0; g < G; g++)
        for (long s = 0; s < S; s++) {
            float e = mask[s] ? expf(p[g * S + s] - most[g]) : 0.0f;
            p[g * S + s] = e, total[g] += e;
        }
    for (int g = 0; g < G; g++) {
        const float *w = p + g * S, norm = 1.0f / total[g];
        float *o = out + g * D;
        long d0 = 0;
#if VECTOR_LOOPS
        for (; vectors && d0 + 64 <= D; d0 += 64) {  /* 64 columns of the output in eight registers over all positions */
            __m256 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
            for (long s = 0; s < S; s++) {
                if (!mask[s]) continue;
                __m256 wv = _mm256_set1_ps(w[s]);
                for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(wv, load8(v, KIND, base + s * D + d0 + 8 * i), acc[i]);
            }
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + d0 + 8 * i, _mm256_mul_ps(acc[i], _mm256_set1_ps(norm)));
        }
#endif
        for (long d = d0; d < D; d++) {
            float sum = 0;
            for (long s = 0; s < S; s++)
                if (mask[s]) sum += w[s] * scalar_at(v, KIND, base + s * D + d);
            o[d] = sum * norm;
        }
    }
}

/* q (B, H, D) as fp32, scaled by `scale`, and as bf16 unscaled where it came so (q16, else none); k, v (B, Hkv, S, D)
   of `kind`; mask (Bm, S), Bm 1 (all rows) or B; scores: room for G x S floats for each thread, `spacing` apart;
   out (B, H, D) */
static void decode_attention(const float *q, const uint16_t *q16, float scale, long B, long H, long Hkv, long S, long D,
                             const void *k, const void *v, int kind, const bool *mask, long mask_rows, float *scores,
                             long spacing, float *out, int threads) {
    int G = H / Hkv;
    #pragma omp parallel num_threads(threads) if (threads > 1 && B * Hkv > 1)
    {
        float *p = scores + omp_get_thread_num() * spacing;
        #pragma omp for schedule(static)
        for (long i = 0; i < B * Hkv; i++) {
            long b = i / Hkv;
            const float *qi = q + i * G * D;
            const uint16_t *qi16 = q16 ? q16 + i * G * D : nullptr;
            const bool *mi = mask + (mask_rows == 1 ? 0 : b) * S;
            if (kind == BF16) attend_group<BF16>(qi, qi16, scale, G, D, k, v, i * S * D, S, mi, p, out + i * G * D);
            else if (kind == F16) attend_group<F16>(qi, nullptr, scale, G, D, k, v, i * S * D, S, mi, p, out + i * G * D);
            else attend_group<F32>(qi, nullptr, scale, G, D, k, v, i * S * D, S, mi, p, out + i * G * D);
        }
    }
}

/* A decoding step's layers in one call (speed::decode_layers), for one row of x with every projection in blocks of 16
   rows (speed.BlockedLinear: bf16, int8 or 4-bit). Why: called op by op, a SmolLM2 step spends ~0.9 ms a token
   around its products (the compiled graph's glue, ~150 op calls' dispatch and outputs, attention's own call), and
   at 2 threads each product is a parallel region of its own whose threads wake and meet; that ~0.9 ms does not
   split over the threads (docs/bench.md, "What the ~0.9 ms is"). Here the threads enter one parallel region for the
   whole step and meet at a barrier after each product and after attention: each thread computes its share of each
   product's 16-row blocks into a shared buffer, and everything between products (the norms, RoPE, the residual
   stream, SiLU, x rounded for the integer loops) every thread computes whole for itself, the same numbers in each.
   The residual stream stays fp32 throughout (the op-by-op bf16 step rounds it at every op). An owner's K/V head
   goes into the cache (its dtype) by the thread that attends with it; a K/V consumer reads its source's cache; a
   layer that takes another's attention pattern (EchoAtt) writes its values and attends with its source's queries
   and keys, which the same thread computed. */
#if I8_BLOCKS
struct Product {  /* one projection's weights as speed.BlockedLinear lays them out */
    int kind;  /* BF16, I8 or U4 */
    const void *blocks, *scales;  /* scales: int8's, one a row (of scale_kind) */
    int scale_kind;
    long group, N, K;
};

/* x prepared once by each thread for a product: rounded as blocked_i8 and blocked_q4 round it, or as bf16 pairs */
struct PreparedX {
    int16_t *xq;
    int8_t *hi;
    uint8_t *lo;
    float *step, *xsum;
    uint16_t *x16;
};

static void prepare_x(const float *x, const Product &w, PreparedX &px) {
    long K = w.K;
    if (w.kind == BF16) {
        for (long k = 0; k + 16 <= K; k += 16) _mm256_storeu_si256((__m256i *)(px.x16 + k), bf16_of_sums(_mm512_loadu_ps(x + k)));
        return;
    }
    if (w.kind == U4) memset(px.xsum, 0, K / w.group * sizeof(float));
    quantize_x_wide(x, K, px.xq, px.step, nullptr, nullptr, w.kind == U4 ? px.xsum : nullptr, w.group);
    if (w.kind != U4) return;
    for (long k = 0; k < K; k += XBLOCK) {  /* blocked_q4's hi and lo bytes */
        __m512i q = _mm512_loadu_si512(px.xq + k);
        _mm256_storeu_si256((__m256i *)(px.hi + k), _mm512_cvtepi16_epi8(_mm512_srai_epi16(q, 8)));
        _mm256_storeu_si256((__m256i *)(px.lo + k), _mm512_cvtepi16_epi8(q));
    }
}

/* y[16 b0 .. 16 b1) of the product, fp32, by the blocked loops' one-row forms */
static void product_blocks(const Product &w, const PreparedX &px, long b0, long b1, float *y) {
    long K = w.K, q4_bytes = w.kind == U4 ? K / w.group * q4_group_bytes(w.group, w.scale_kind) : 0;
    for (long b = b0; b < b1; b++) {
        __m512 sums[1];
        if (w.kind == U4) {
            blocked_q4_rows<1>(px.hi, px.lo, px.step, px.xsum, K, w.group, (const uint8_t *)w.blocks + b * q4_bytes,
                               w.scale_kind, 0, sums);
        } else if (w.kind == I8) {
            blocked_i8_rows<1>((const uint32_t *)px.xq, px.step, K, (const int8_t *)w.blocks + b * 16 * K, 0, sums);
            sums[0] = _mm512_mul_ps(sums[0], load16(w.scales, w.scale_kind, b * 16, 0xffff));
        } else {
#if BF16_ROWS
            const uint32_t *block = (const uint32_t *)w.blocks + b * (K / 2) * 16, *xp = (const uint32_t *)px.x16;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0;
            for (long p = 0; p < K / 2; p += 2) {
                prefetch_stream(block + p * 16, 2 * 64);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(block + p * 16), (__m512bh)_mm512_set1_epi32(xp[p]));
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(block + p * 16 + 16), (__m512bh)_mm512_set1_epi32(xp[p + 1]));
            }
            sums[0] = _mm512_add_ps(a0, a1);
#endif
        }
        _mm512_storeu_ps(y + b * 16, sums[0]);
    }
}

static void rms_norm(const float *x, long C, const void *w, int kind, float eps, float *y) {
    float squares = 0;
    for (long i = 0; i < C; i++) squares += x[i] * x[i];
    float r = 1.0f / sqrtf(squares / C + eps);
    for (long i = 0; i < C; i++) y[i] = x[i] * r * scalar_at(w, kind, i);
}

/* rotate-half RoPE of one head (model.apply_rope), in place */
static void rope(float *x, long D, const float *cos, const float *sin) {
    for (long i = 0; i < D / 2; i++) {
        float a = x[i], b = x[i + D / 2];
        x[i] = a * cos[i] - b * sin[i], x[i + D / 2] = b * cos[i + D / 2] + a * sin[i + D / 2];
    }
}

static void store_row(const float *x, long D, void *to, int kind) {
    if (kind == F32) return (void)memcpy(to, x, D * sizeof(float));
    for (long i = 0; i < D; i += 16) _mm256_storeu_si256((__m256i *)((uint16_t *)to + i), bf16_of_sums(_mm512_loadu_ps(x + i)));
}

struct Layer {  /* one decoder layer's weights and the cache it attends over */
    const void *norm1, *norm2;
    Product qkv, o, gate_up, down;  /* qkv: an owner's q, k and v joined, a K/V consumer's q, an attention sharer's v */
    void *k, *v;  /* the keys of its K/V source (a sharer: of its attention source's), the values of its K/V source */
    bool owner, sharer;  /* computes its own K/V; takes the queries and keys of another layer (EchoAtt) */
    float *queries;  /* its queries after RoPE, scaled (H x D), which a sharer reads from its attention source's */
};

struct Shape { long C, H, Hkv, D, I, S, pos; int norm_kind, cache_kind; float eps; };

struct ThreadRoom { float *x, *h, *scores; PreparedX px; };  /* each thread's own */
struct SharedRoom { float *qkv, *attention, *projected, *gate_up, *logits; const bool *mask; };  /* written by all, in parts */

/* the final norm and the head, where the call takes them: the logits in the output's dtype */
struct Head { const void *norm; Product w; void *out; bool out_bf16; };

/* this thread's share of a product (16-row blocks dealt out evenly), then the barrier where all meet */
static void product_share(const Product &w, const float *x, ThreadRoom &own, float *y, int t, int T) {
    prepare_x(x, w, own.px);
    long blocks = w.N / 16;
    product_blocks(w, own.px, blocks * t / T, blocks * (t + 1) / T, y);
    #pragma omp barrier
}

/* the K/V heads j = t, t + T, ...: an owner writes its new K/V row into the cache, then G query heads attend */
static void attention_share(const Layer &l, const Shape &s, const float *cos, const float *sin, ThreadRoom &own,
                            SharedRoom &sh, int t, int T) {
    long D = s.D, G = s.H / s.Hkv, size = s.cache_kind == F32 ? 4 : 2;
    float scale = 1.0f / sqrtf((float)D);
    for (long j = t; j < s.Hkv; j += T) {
        long row = (j * s.S + s.pos) * D * size;  /* the cache is (1, Hkv, S, D) */
        if (l.owner) {
            float *k = sh.qkv + (s.H + j) * D, *v = sh.qkv + (s.H + s.Hkv + j) * D;  /* head j's alone: this thread's */
            rope(k, D, cos, sin);
            store_row(k, D, (char *)l.k + row, s.cache_kind), store_row(v, D, (char *)l.v + row, s.cache_kind);
        }
        float *q = l.queries + j * G * D;  /* head j's queries: a sharer's source wrote them in this thread too */
        if (l.sharer) {
            store_row(sh.qkv + j * D, D, (char *)l.v + row, s.cache_kind);
        } else {
            for (long i = 0; i < G * D; i++) q[i] = sh.qkv[j * G * D + i];
            for (long g = 0; g < G; g++) rope(q + g * D, D, cos, sin);
            for (long i = 0; i < G * D; i++) q[i] *= scale;
        }
        if (s.cache_kind == BF16)
            attend_group<BF16>(q, nullptr, scale, G, D, l.k, l.v, j * s.S * D, s.pos + 1, sh.mask, own.scores, sh.attention + j * G * D);
        else
            attend_group<F32>(q, nullptr, scale, G, D, l.k, l.v, j * s.S * D, s.pos + 1, sh.mask, own.scores, sh.attention + j * G * D);
    }
    #pragma omp barrier
}

/* thread t of T through every layer; own.x, the residual stream, comes in and goes out the same in every thread; then
   the head's share of the logits, where there is one (head.norm) */
static void layers_thread(const std::vector<Layer> &layers, const Shape &s, const float *cos, const float *sin,
                          const Head &head, ThreadRoom &own, SharedRoom &sh, int t, int T) {
    long C = s.C, I = s.I;
    for (const Layer &l : layers) {
        rms_norm(own.x, C, l.norm1, s.norm_kind, s.eps, own.h);
        product_share(l.qkv, own.h, own, sh.qkv, t, T);
        attention_share(l, s, cos, sin, own, sh, t, T);
        product_share(l.o, sh.attention, own, sh.projected, t, T);
        for (long i = 0; i < C; i++) own.x[i] += sh.projected[i];
        rms_norm(own.x, C, l.norm2, s.norm_kind, s.eps, own.h);
        product_share(l.gate_up, own.h, own, sh.gate_up, t, T);
        for (long i = 0; i < I; i += 16) {  /* silu(gate) x up */
            __m512 g = _mm512_loadu_ps(sh.gate_up + i), u = _mm512_loadu_ps(sh.gate_up + I + i);
            __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            _mm512_storeu_ps(own.h + i, _mm512_mul_ps(silu, u));
        }
        product_share(l.down, own.h, own, sh.projected, t, T);
        for (long i = 0; i < C; i++) own.x[i] += sh.projected[i];
    }
    if (!head.norm) return;
    rms_norm(own.x, C, head.norm, s.norm_kind, s.eps, own.h);
    prepare_x(own.h, head.w, own.px);
    long blocks = head.w.N / 16, b0 = blocks * t / T, b1 = blocks * (t + 1) / T;
    product_blocks(head.w, own.px, b0, b1, sh.logits);
    for (long i = b0 * 16; i < b1 * 16; i += 16) {  /* this thread's logits to the output: no barrier needed */
        __m512 v = _mm512_loadu_ps(sh.logits + i);
        if (head.out_bf16) _mm256_storeu_si256((__m256i *)((uint16_t *)head.out + i), bf16_of_sums(v));
        else _mm512_storeu_ps((float *)head.out + i, v);
    }
}
#define LAYER_LOOPS 1
#else
#define LAYER_LOOPS 0
#endif

/* speed::matvec(x, weight, scales, minimums, group_size): the product in x's dtype, for speed.py (its docstring) */
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

static int kind_of(const at::Tensor &t) {
    switch (t.scalar_type()) {
        case at::kFloat: return F32;
        case at::kBFloat16: return BF16;
        case at::kHalf: return F16;
        case at::kChar: return I8;
        case at::kByte: return U4;
        default: TORCH_CHECK(false, "speed::matvec: no kernel for ", t.scalar_type());
    }
}

static at::Tensor matvec_op(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &scales,
                            const std::optional<at::Tensor> &minimums, int64_t group_size) {
    long K = x.size(-1), N = weight.size(0), M = K ? x.numel() / K : 0;
    int kind = kind_of(weight);
    TORCH_CHECK(M >= 1 && weight.dim() == 2 && weight.size(1) * (kind == U4 ? 2 : 1) == K,
                "speed::matvec: rows of ", K, " against a weight of ", weight.sizes());
    TORCH_CHECK(M == 1 || kind <= F16, "speed::matvec: ", M, " rows against int8 or 4-bit codes; it takes one");
    TORCH_CHECK(kind < I8 || scales.has_value(), "speed::matvec: int8 and 4-bit weights need their scales");
    TORCH_CHECK(kind != U4 || (minimums.has_value() && group_size > 0 && K % group_size == 0),
                "speed::matvec: 4-bit weights need their minimums and a group size dividing ", K);
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                "speed::matvec: x is ", x.scalar_type(), "; it takes fp32, bf16 or fp16");
    long n_scales = kind == I8 ? N : kind == U4 ? N * (K / group_size) : 0;
    for (const auto &t : {scales, minimums})
        TORCH_CHECK(!t.has_value() || kind < I8 || (t->numel() == n_scales && kind_of(*t) <= F16 &&
                    t->scalar_type() == scales->scalar_type()),
                    "speed::matvec: scales and minimums must be ", n_scales, " floats of one dtype");
    /* x to fp32 and the sums back to x's dtype here, not by torch ops: each of those costs a few us a call, and
       a SmolLM2 decode step makes 211 calls of ~60 us */
    at::Tensor xc = x.contiguous(), w = weight.contiguous();
    at::Tensor s = scales.has_value() ? scales->contiguous() : at::Tensor(), m = minimums.has_value() ? minimums->contiguous() : at::Tensor();
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = N;
    at::Tensor out = at::empty(shape, x.options());
    if (TILE_ROWS && M > 1 && kind == BF16 && x.scalar_type() == at::kBFloat16 && K % 32 == 0 && tiles_permitted()) {
        tile_rows_bf16((const uint16_t *)xc.data_ptr(), M, K, (const uint16_t *)w.data_ptr(), N,
                       (uint16_t *)out.data_ptr(), at::get_num_threads());
        return out;
    }
    if (BF16_ROWS && M > 1 && kind == BF16 && x.scalar_type() == at::kBFloat16) {
        few_rows_bf16((const uint16_t *)xc.data_ptr(), M, K, (const uint16_t *)w.data_ptr(), N,
                      (uint16_t *)out.data_ptr(), at::get_num_threads());
        return out;
    }
    bool fp32 = x.scalar_type() == at::kFloat;
    std::vector<float> xf(fp32 ? 0 : M * K), yf(fp32 ? 0 : M * N);
    const float *xp = fp32 ? xc.data_ptr<float>() : xf.data();
    float *yp = fp32 ? out.data_ptr<float>() : yf.data();
    if (!fp32) AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "speed::matvec", [&] {
        const scalar_t *in = xc.data_ptr<scalar_t>();
        for (long k = 0; k < M * K; k++) xf[k] = static_cast<float>(in[k]);
    });
    if (M > 1) few_rows(xp, M, K, w.data_ptr(), kind, N, yp, at::get_num_threads());
    else matvec(xp, K, w.data_ptr(), kind, N, s.defined() ? s.data_ptr() : nullptr, m.defined() ? m.data_ptr() : nullptr,
                s.defined() ? kind_of(s) : F32, group_size, yp, at::get_num_threads());
    if (!fp32) AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "speed::matvec", [&] {
        scalar_t *result = out.data_ptr<scalar_t>();
        for (long i = 0; i < M * N; i++) result[i] = static_cast<scalar_t>(yf[i]);
    });
    return out;
}

/* blocks (N / 16, K / columns, 16, lane): a lane of 2 values (bf16 or int8 pairs) or 4 bytes of 8 4-bit codes */
static at::Tensor blocked_output(const char *op, const at::Tensor &x, const at::Tensor &blocks, long &K, long &M, long &N,
                                 long lane = 2, long columns = 2) {
    K = x.size(-1), M = K ? x.numel() / K : 0;
    TORCH_CHECK(blocks.dim() == 4 && blocks.size(2) == 16 && blocks.size(3) == lane && blocks.size(1) * columns == K &&
                M >= 1, op, ": rows of ", K, " against blocks of ", blocks.sizes());
    N = blocks.size(0) * 16;
    at::DimVector shape(x.sizes());
    shape.back() = N;
    return at::empty(shape, x.options());
}

/* speed::matvec_blocked(x, blocks): x (..., K) bf16 against the weight of N rows laid out in blocks of 16 rows
   (blocks: (N / 16, K / 2, 16, 2) bf16; speed.BlockedLinear); the result (..., N) in bf16, summed in fp32 */
static at::Tensor matvec_blocked_op(const at::Tensor &x, const at::Tensor &blocks) {
    TORCH_CHECK(BF16_ROWS, "speed::matvec_blocked: this build has no AVX-512 BF16 loops (the CPU or compiler lacks them)");
    TORCH_CHECK(x.scalar_type() == at::kBFloat16 && blocks.scalar_type() == at::kBFloat16,
                "speed::matvec_blocked: x and blocks must be bf16, not ", x.scalar_type(), " and ", blocks.scalar_type());
    long K, M, N;
    at::Tensor out = blocked_output("speed::matvec_blocked", x, blocks, K, M, N), xc = x.contiguous(), bc = blocks.contiguous();
    auto product = TILE_ROWS && M > 1 && K % 32 == 0 && tiles_permitted() ? tile_blocks_bf16 : blocked_bf16;
    product((const uint16_t *)xc.data_ptr(), M, K, (const uint16_t *)bc.data_ptr(), N, (uint16_t *)out.data_ptr(),
            at::get_num_threads());
    return out;
}

/* speed::matvec_blocked_int8(x, blocks, scales): the same for int8 codes in blocks (int8 (N / 16, K / 2, 16, 2))
   and one scale a row (N floats; quantize.Int8Linear's), x fp32 or bf16, the result in x's dtype. Its own op, not
   an argument more of matvec_blocked: inductor's cached compiled code does not know an op's schema changed, and
   called the old one with the old arguments (a segmentation fault, seen). */
static at::Tensor matvec_blocked_int8_op(const at::Tensor &x, const at::Tensor &blocks, const at::Tensor &scales) {
    TORCH_CHECK(I8_BLOCKS, "speed::matvec_blocked_int8: this build has no AVX-512 VNNI loops (the CPU or compiler lacks them)");
    long K, M, N;
    TORCH_CHECK(blocks.scalar_type() == at::kChar, "speed::matvec_blocked_int8: blocks are ", blocks.scalar_type(),
                "; it takes int8 codes (bf16 blocks: speed::matvec_blocked)");
    at::Tensor out = blocked_output("speed::matvec_blocked_int8", x, blocks, K, M, N), xc = x.contiguous(), bc = blocks.contiguous();
    TORCH_CHECK(scales.numel() == N && kind_of(scales) <= F16 && K % XBLOCK == 0,
                "speed::matvec_blocked_int8: int8 blocks need ", N, " float scales and rows of a multiple of ", XBLOCK);
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                "speed::matvec_blocked_int8: x is ", x.scalar_type(), "; it takes fp32 or bf16");
    at::Tensor s = scales.contiguous();
    blocked_i8(xc.data_ptr(), M, K, (const int8_t *)bc.data_ptr(), N, s.data_ptr(), kind_of(s), out.data_ptr(),
               x.scalar_type() == at::kBFloat16, at::get_num_threads());
    return out;
}

/* speed::matvec_blocked_q4(x, blocks, group_size, scale_kind): x (..., K) fp32 or bf16 against 4-bit codes in blocks
   of 16 rows with a scale and a minimum a group of group_size columns (a multiple of 32) inline (uint8 (N / 16,
   K / group_size, group_size * 8 + 32 x the scales' bytes): blocked_q4_rows), the scales of kind scale_kind (0 fp32,
   1 bf16, 2 fp16); the result in x's dtype. */
static at::Tensor matvec_blocked_q4_op(const at::Tensor &x, const at::Tensor &blocks, int64_t group_size,
                                       int64_t scale_kind) {
    TORCH_CHECK(I8_BLOCKS, "speed::matvec_blocked_q4: this build has no AVX-512 VNNI loops (the CPU or compiler lacks them)");
    long K = x.size(-1), M = K ? x.numel() / K : 0;
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                "speed::matvec_blocked_q4: x is ", x.scalar_type(), "; it takes fp32 or bf16");
    TORCH_CHECK(blocks.scalar_type() == at::kByte, "speed::matvec_blocked_q4: blocks are ", blocks.scalar_type(),
                "; it takes 4-bit codes two a byte with their scales (uint8)");
    TORCH_CHECK(scale_kind >= F32 && scale_kind <= F16, "speed::matvec_blocked_q4: scale kind ", scale_kind,
                "; it takes 0 (fp32), 1 (bf16) or 2 (fp16)");
    TORCH_CHECK(group_size > 0 && group_size % XBLOCK == 0 && K % group_size == 0,
                "speed::matvec_blocked_q4: groups of ", group_size, " columns; it takes a multiple of ", XBLOCK,
                " that divides the rows of ", K);
    TORCH_CHECK(blocks.dim() == 3 && blocks.size(1) * group_size == K &&
                blocks.size(2) == q4_group_bytes(group_size, scale_kind) && M >= 1, "speed::matvec_blocked_q4: rows of ",
                K, " in groups of ", group_size, " against blocks of ", blocks.sizes());
    long N = blocks.size(0) * 16;
    at::DimVector shape(x.sizes());
    shape.back() = N;
    at::Tensor out = at::empty(shape, x.options()), xc = x.contiguous(), bc = blocks.contiguous();
    blocked_q4(xc.data_ptr(), M, K, (const uint8_t *)bc.data_ptr(), N, (int)scale_kind, group_size, out.data_ptr(),
               x.scalar_type() == at::kBFloat16, at::get_num_threads());
    return out;
}

/* speed::decode_attention(q, k, v, mask): q (B, H, 1, D), k and v (B, Hkv, S, D) of one float dtype, mask (1 or B,
   S) bool; the result (B, H, 1, D) in q's dtype. A row whose mask allows no position gets NaN, as softmax over none. */
static at::Tensor decode_attention_op(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask) {
    TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0 && q.size(1) / k.size(1) <= 64,
                "speed::decode_attention: q ", q.sizes(), " against k and v ", k.sizes(), " and ", v.sizes());
    auto dtype = q.scalar_type();
    TORCH_CHECK(dtype == k.scalar_type() && dtype == v.scalar_type() &&
                (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf),
                "speed::decode_attention: q, k and v must share one dtype of fp32, bf16 or fp16");
    long B = q.size(0), H = q.size(1), Hkv = k.size(1), S = k.size(2), D = q.size(3);
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(1) == S &&
                (mask.size(0) == 1 || mask.size(0) == B), "speed::decode_attention: mask ", mask.sizes(),
                " must be bool (1 or ", B, ", ", S, ")");
    /* q to fp32 (scaled) and the result back to q's dtype here, not by torch ops: a few us each, 30 calls a step */
    at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), mc = mask.contiguous();
    at::Tensor out = at::empty({B, H, 1, D}, q.options());
    int threads = at::get_num_threads();
    long spacing = Scratch::room<float>(H / Hkv * S) / sizeof(float);  /* each thread's scores, G x S */
    Scratch scratch(2 * Scratch::room<float>(B * H * D) + Scratch::room<float>(threads * spacing));
    float *qf = scratch.take<float>(B * H * D), *yf = scratch.take<float>(B * H * D);
    float *scores = scratch.take<float>(threads * spacing);
    float scale = 1.0f / sqrtf((float)D);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "speed::decode_attention", [&] {
        const scalar_t *in = qc.data_ptr<scalar_t>();
        for (long i = 0; i < B * H * D; i++) qf[i] = static_cast<float>(in[i]) * scale;
    });
    const uint16_t *q16 = dtype == at::kBFloat16 ? (const uint16_t *)qc.data_ptr() : nullptr;
    decode_attention(qf, q16, scale, B, H, Hkv, S, D, kc.data_ptr(), vc.data_ptr(), kind_of(k), mc.data_ptr<bool>(),
                     mc.size(0), scores, spacing, yf, threads);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "speed::decode_attention", [&] {
        scalar_t *result = out.data_ptr<scalar_t>();
        for (long i = 0; i < B * H * D; i++) result[i] = static_cast<scalar_t>(yf[i]);
    });
    return out;
}

/* The greedy pick (speed::greedy_pick): the index of a row's largest value, the first of equal ones; a NaN counts as
   largest (the first NaN), as torch.max's indices. With AVX-512 16 values at a time, each lane keeping its largest
   and where (a later equal one does not replace it), then the largest of the lanes at their least index; a NaN
   anywhere sends the row to the plain loop, which finds the first. (torch's max took 44 us for one row of 49,152
   bf16 logits and 660 us for 16, a thread: docs/bench.md, "The greedy pick and bf16 attention scores".) */
template <int KIND>
static long first_largest_plain(const void *row, long V) {
    long best = 0;
    float most = scalar_at(row, KIND, 0);
    for (long i = 0; i < V; i++) {
        float x = scalar_at(row, KIND, i);
        if (x != x) return i;
        if (x > most) best = i, most = x;
    }
    return best;
}

template <int KIND>
static long first_largest(const void *row, long V) {
#if WIDE_ATTENTION
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i where = _mm512_setzero_si512(), at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __mmask16 nan = 0;
    for (long i = 0; i < V; i += 16, at = _mm512_add_epi32(at, _mm512_set1_epi32(16))) {
        __mmask16 in = V - i >= 16 ? 0xffff : (1u << (V - i)) - 1;
        __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), in, load16(row, KIND, i, in));
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        __mmask16 larger = _mm512_cmp_ps_mask(x, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, larger, x), where = _mm512_mask_mov_epi32(where, larger, at);
    }
    if (nan || V > (1L << 31)) return first_largest_plain<KIND>(row, V);
    __mmask16 top = _mm512_cmp_ps_mask(best, _mm512_set1_ps(_mm512_reduce_max_ps(best)), _CMP_EQ_OQ);
    return _mm512_mask_reduce_min_epi32(top, where);
#else
    return first_largest_plain<KIND>(row, V);
#endif
}

static at::Tensor greedy_pick_op(const at::Tensor &logits) {
    TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && (logits.scalar_type() == at::kFloat ||
                logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kHalf),
                "speed::greedy_pick: logits ", logits.sizes(), " ", logits.scalar_type(),
                "; it takes (rows, vocabulary) of fp32, bf16 or fp16");
    at::Tensor lc = logits.contiguous(), out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
    long B = lc.size(0), V = lc.size(1), size = lc.element_size();
    int kind = kind_of(lc), threads = at::get_num_threads();
    const char *rows = (const char *)lc.data_ptr();
    int64_t *picks = out.data_ptr<int64_t>();
    #pragma omp parallel for num_threads(threads) if (threads > 1 && B > 1) schedule(static)
    for (long b = 0; b < B; b++)
        picks[b] = kind == BF16 ? first_largest<BF16>(rows + b * V * size, V)
                 : kind == F16 ? first_largest<F16>(rows + b * V * size, V) : first_largest<F32>(rows + b * V * size, V);
    return out;
}

#if LAYER_LOOPS
/* speed::decode_layers(x, weights, caches, kv_source, attn_source, cos, sin, pos, n_head, n_kv_head, eps, group_size,
   head): one row x (its C values, fp32 or bf16) through every layer at position pos, as decode_layers above; the
   residual stream after the last layer in x's dtype, or with head (the final norm's weight, the head's blocks and
   scales) the logits (x's shape, the vocabulary last). weights: 10 a layer, the input norm, the q(kv) blocks and their
   scales, o's, the post-attention norm, gate_up's and down's: blocks as speed.BlockedLinear holds them (bf16; int8
   with its scales; 4-bit with a 0-element tensor of its scales' dtype in the scales' place), one kind for all; an owner's first product is q, k and v joined, a K/V consumer's q alone, an attention sharer's
   (attn_source, EchoAtt) v alone. caches: 2 a layer, its K and V cache (1, n_kv_head, S, D), one float dtype, where
   it computes them (an owner's values, and its keys unless it shares attention), anything elsewhere: a layer attends
   over the keys of its K/V source (a sharer: of its attention source's) and the values of its K/V source, read from
   their places here, so a layer cannot be handed another's. cos and sin: position pos's RoPE rows (D fp32). */
static Product product_of(const at::Tensor &blocks, const at::Tensor &scales, long group) {
    Product w{BF16, blocks.data_ptr(), nullptr, F32, 0, blocks.size(0) * 16, 0};
    if (blocks.scalar_type() == at::kByte) {
        w.kind = U4, w.scale_kind = kind_of(scales), w.group = group, w.K = blocks.size(1) * group;
        TORCH_CHECK(group > 0 && group % XBLOCK == 0, "speed::decode_layers: 4-bit groups of ", group,
                    " columns; it takes a multiple of ", XBLOCK);
        TORCH_CHECK(blocks.dim() == 3 && w.scale_kind <= F16 && blocks.size(2) == q4_group_bytes(group, w.scale_kind),
                    "speed::decode_layers: 4-bit blocks ", blocks.sizes(), " in groups of ", group);
    } else {
        TORCH_CHECK(blocks.dim() == 4 && blocks.size(2) == 16 && blocks.size(3) == 2, "speed::decode_layers: blocks ",
                    blocks.sizes(), "; it takes speed.BlockedLinear's");
        w.K = blocks.size(1) * 2;
        if (blocks.scalar_type() == at::kChar) {
            w.kind = I8, w.scales = scales.data_ptr(), w.scale_kind = kind_of(scales);
            TORCH_CHECK(scales.numel() == w.N && w.scale_kind <= F16 && scales.is_contiguous(),
                        "speed::decode_layers: int8 blocks need ", w.N, " contiguous float scales");
        } else {
            TORCH_CHECK(blocks.scalar_type() == at::kBFloat16 && BF16_ROWS, "speed::decode_layers: blocks of ",
                        blocks.scalar_type(), " (it takes bf16 where the CPU multiplies it, int8 or 4-bit codes)");
        }
    }
    TORCH_CHECK(blocks.is_contiguous() && w.K % XBLOCK == 0, "speed::decode_layers: blocks must be contiguous, rows of a multiple of ", XBLOCK);
    return w;
}

static at::Tensor decode_layers_op(const at::Tensor &x, at::TensorList weights, at::TensorList caches,
                                   at::IntArrayRef kv_source, at::IntArrayRef attn_source, const at::Tensor &cos, const at::Tensor &sin, int64_t pos,
                                   int64_t n_head, int64_t n_kv_head, double eps, int64_t group_size,
                                   at::TensorList head) {
    TORCH_CHECK(LAYER_LOOPS, "speed::decode_layers: this build has no AVX-512 VNNI loops (the CPU or compiler lacks them)");
    long L = kv_source.size(), C = x.numel(), H = n_head, Hkv = n_kv_head;
    TORCH_CHECK(L > 0 && (long)weights.size() == 10 * L && (long)caches.size() == 2 * L, "speed::decode_layers: ", L,
                " layers need 10 weights and 2 caches each, not ", weights.size(), " and ", caches.size());
    TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && H / Hkv <= 64 && x.is_contiguous() && C == x.size(-1) &&
                (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), "speed::decode_layers: x ",
                x.sizes(), " ", x.scalar_type(), " with ", H, " heads over ", Hkv, " K/V heads");
    const at::Tensor &k0 = caches[0];
    TORCH_CHECK(k0.dim() == 4 && k0.size(0) == 1 && k0.size(1) == Hkv && k0.size(3) % 16 == 0 && pos >= 0 && pos < k0.size(2) &&
                (k0.scalar_type() == at::kFloat || k0.scalar_type() == at::kBFloat16), "speed::decode_layers: cache ",
                k0.sizes(), " ", k0.scalar_type(), " at position ", pos);
    long S = k0.size(2), D = k0.size(3);
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.numel() == D && sin.numel() == D &&
                cos.is_contiguous() && sin.is_contiguous(), "speed::decode_layers: cos and sin must be ", D, " fp32 each");
    TORCH_CHECK((long)attn_source.size() == L, "speed::decode_layers: ", L, " layers need ", L, " attention sources");
    std::vector<Layer> layers(L);
    long I = 0;
    for (long i = 0; i < L; i++) {
        const at::Tensor *w = &weights[10 * i];
        Layer &l = layers[i];
        long source = kv_source[i], pattern = attn_source[i];
        TORCH_CHECK(source >= 0 && source <= i && kv_source[source] == source, "speed::decode_layers: layer ", i,
                    " reads the K/V of layer ", source, ", which is not an owner at or below it");
        TORCH_CHECK(pattern >= 0 && pattern <= i && attn_source[pattern] == pattern && (pattern == i || source == i),
                    "speed::decode_layers: layer ", i, " takes the attention of layer ", pattern, " (it must have its own"
                    " and lie at or below it, and a sharer computes its own values)");
        l.owner = source == i && pattern == i, l.sharer = pattern != i;
        l.qkv = product_of(w[1], w[2], group_size), l.o = product_of(w[3], w[4], group_size);
        l.gate_up = product_of(w[6], w[7], group_size), l.down = product_of(w[8], w[9], group_size);
        I = i == 0 ? l.gate_up.N / 2 : I;
        int kind = l.qkv.kind;
        long first = l.sharer ? Hkv * D : (H + (l.owner ? 2 * Hkv : 0)) * D;
        TORCH_CHECK(l.o.kind == kind && l.gate_up.kind == kind && l.down.kind == kind && kind == layers[0].qkv.kind &&
                    l.qkv.K == C && l.qkv.N == first && l.o.K == H * D && l.o.N == C && l.gate_up.K == C &&
                    l.gate_up.N == 2 * I && I % 16 == 0 && l.down.K == I && l.down.N == C,
                    "speed::decode_layers: layer ", i, "'s products do not fit one kind and the model's widths");
        TORCH_CHECK(w[0].numel() == C && w[5].numel() == C && w[0].scalar_type() == weights[0].scalar_type() &&
                    w[5].scalar_type() == weights[0].scalar_type() && kind_of(w[0]) <= F16 && w[0].is_contiguous() &&
                    w[5].is_contiguous(), "speed::decode_layers: layer ", i, "'s norms must be ", C,
                    " contiguous floats of layer 0's dtype");
        const at::Tensor &keys = caches[2 * kv_source[pattern]], &values = caches[2 * source + 1];  /* as the maps say */
        for (const at::Tensor *c : {&keys, &values})
            TORCH_CHECK(c->sizes() == k0.sizes() && c->scalar_type() == k0.scalar_type() && c->is_contiguous(),
                        "speed::decode_layers: the cache layer ", i, " attends over differs from layer 0's");
        l.norm1 = w[0].data_ptr(), l.norm2 = w[5].data_ptr(), l.k = keys.data_ptr(), l.v = values.data_ptr();
    }
    Shape s{C, H, Hkv, D, I, S, pos, kind_of(weights[0]), kind_of(k0), (float)eps};
    TORCH_CHECK(head.empty() || head.size() == 3, "speed::decode_layers: head takes the final norm, blocks and scales");
    Head last{nullptr, {}, nullptr, x.scalar_type() == at::kBFloat16};
    if (!head.empty()) {
        last.norm = head[0].data_ptr(), last.w = product_of(head[1], head[2], group_size);
        TORCH_CHECK(head[0].numel() == C && head[0].scalar_type() == weights[0].scalar_type() && head[0].is_contiguous() &&
                    last.w.K == C,
                    "speed::decode_layers: the head must take the ", C, " values of the final norm (of the layers' dtype)");
    }
    at::DimVector shape(x.sizes());
    shape.back() = head.empty() ? C : last.w.N;
    at::Tensor out = at::empty(shape, x.options());
    last.out = out.data_ptr();
    int threads = at::get_num_threads();
    long widest = std::max({C, H * D, I}), G = H / Hkv;
    size_t each = Scratch::room<float>(C) + Scratch::room<float>(widest) + Scratch::room<float>(G * S) + Scratch::room<int16_t>(widest) + 2 * Scratch::room<int8_t>(widest) +
                  2 * Scratch::room<float>(widest / XBLOCK) + Scratch::room<uint16_t>(widest);
    Scratch scratch(threads * each + Scratch::room<float>((H + 2 * Hkv) * D) + Scratch::room<float>(H * D) +
                    Scratch::room<float>(C) + Scratch::room<float>(2 * I) + Scratch::room<float>(last.w.N) +
                    Scratch::room<bool>(S) + Scratch::room<float>(L * H * D));
    std::vector<ThreadRoom> rooms(threads);
    for (ThreadRoom &r : rooms) {
        r.x = scratch.take<float>(C), r.h = scratch.take<float>(widest);
        r.scores = scratch.take<float>(G * S), r.px.xq = scratch.take<int16_t>(widest);
        r.px.hi = scratch.take<int8_t>(widest), r.px.lo = scratch.take<uint8_t>(widest);
        r.px.step = scratch.take<float>(widest / XBLOCK), r.px.xsum = scratch.take<float>(widest / XBLOCK);
        r.px.x16 = scratch.take<uint16_t>(widest);
        for (long i = 0; i < C; i++) r.x[i] = scalar_at(x.data_ptr(), kind_of(x), i);
    }
    SharedRoom sh{scratch.take<float>((H + 2 * Hkv) * D), scratch.take<float>(H * D), scratch.take<float>(C),
                  scratch.take<float>(2 * I), scratch.take<float>(last.w.N), nullptr};
    bool *mask = scratch.take<bool>(S);
    std::fill(mask, mask + S, true), sh.mask = mask;
    float *queries = scratch.take<float>(L * H * D);  /* each layer's, where a sharer finds its source's */
    for (long i = 0; i < L; i++) layers[i].queries = queries + attn_source[i] * H * D;
    #pragma omp parallel num_threads(threads) if (threads > 1)
    layers_thread(layers, s, cos.data_ptr<float>(), sin.data_ptr<float>(), last, rooms[omp_get_thread_num()], sh,
                  omp_get_thread_num(), omp_get_num_threads());
    if (!head.empty()) return out;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "speed::decode_layers", [&] {
        scalar_t *result = out.data_ptr<scalar_t>();
        for (long i = 0; i < C; i++) result[i] = static_cast<scalar_t>(rooms[0].x[i]);
    });
    return out;
}
#else
static at::Tensor decode_layers_op(const at::Tensor &, at::TensorList, at::TensorList, at::IntArrayRef, at::IntArrayRef,
                                   const at::Tensor &, const at::Tensor &, int64_t, int64_t, int64_t, double, int64_t,
                                   at::TensorList) {
    TORCH_CHECK(false, "speed::decode_layers: this build has no AVX-512 VNNI loops (the CPU or compiler lacks them)");
}
#endif

TORCH_LIBRARY(speed, m) {
    m.def("matvec(Tensor x, Tensor weight, Tensor? scales=None, Tensor? minimums=None, int group_size=0) -> Tensor");
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
    m.def("matvec_blocked(Tensor x, Tensor blocks) -> Tensor");
    m.def("matvec_blocked_int8(Tensor x, Tensor blocks, Tensor scales) -> Tensor");
    m.def("matvec_blocked_q4(Tensor x, Tensor blocks, int group_size, int scale_kind) -> Tensor");
    m.def("greedy_pick(Tensor logits) -> Tensor");
    m.def("decode_layers(Tensor x, Tensor[] weights, Tensor(a!)[] caches, int[] kv_source, int[] attn_source, "
          "Tensor cos, Tensor sin, int pos, int n_head, int n_kv_head, float eps, int group_size, Tensor[] head) -> Tensor");
    m.def("multiplies_layers() -> bool", [] { return (bool)LAYER_LOOPS; });  /* decode_layers' loops were built */
    m.def("multiplies_bf16() -> bool", [] { return (bool)BF16_ROWS; });  /* matvec_blocked's bf16 loops were built */
    m.def("multiplies_int8_blocks() -> bool", [] { return (bool)I8_BLOCKS; });  /* matvec_blocked_int8's and _q4's loops */
    m.def("multiplies_tiles() -> bool", [] { return TILE_ROWS && tiles_permitted(); });  /* bf16 rows by AMX tiles */
    m.def("prefetches_blocks() -> bool", [] { return I8_BLOCKS && prefetch_blocks; });  /* the blocked loops' stream */
}

/* its shape alone, for torch.compile's tracing */
static at::Tensor matvec_meta(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &,
                              const std::optional<at::Tensor> &, int64_t) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = weight.size(0);
    return at::empty(shape, x.options());
}

static at::Tensor matvec_blocked_meta(const at::Tensor &x, const at::Tensor &blocks) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = blocks.size(0) * 16;
    return at::empty(shape, x.options());
}

static at::Tensor matvec_blocked_int8_meta(const at::Tensor &x, const at::Tensor &blocks, const at::Tensor &) {
    return matvec_blocked_meta(x, blocks);
}

static at::Tensor matvec_blocked_q4_meta(const at::Tensor &x, const at::Tensor &blocks, int64_t, int64_t) {
    return matvec_blocked_meta(x, blocks);
}

static at::Tensor greedy_pick_meta(const at::Tensor &logits) {
    return at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
}

static at::Tensor decode_attention_meta(const at::Tensor &q, const at::Tensor &, const at::Tensor &, const at::Tensor &) {
    return at::empty(q.sizes(), q.options());
}

static at::Tensor decode_layers_meta(const at::Tensor &x, at::TensorList, at::TensorList, at::IntArrayRef,
                                     at::IntArrayRef, const at::Tensor &, const at::Tensor &, int64_t, int64_t, int64_t,
                                     double, int64_t, at::TensorList head) {
    at::DimVector shape(x.sizes());
    shape.back() = head.empty() ? x.size(-1) : 16 * head[1].size(0);
    return at::empty(shape, x.options());
}

TORCH_LIBRARY_IMPL(speed, CPU, m) {
    m.impl("matvec", &matvec_op);
    m.impl("matvec_blocked", &matvec_blocked_op);
    m.impl("matvec_blocked_int8", &matvec_blocked_int8_op);
    m.impl("matvec_blocked_q4", &matvec_blocked_q4_op);
    m.impl("greedy_pick", &greedy_pick_op);
    m.impl("decode_attention", &decode_attention_op);
    m.impl("decode_layers", &decode_layers_op);
}
TORCH_LIBRARY_IMPL(speed, Meta, m) {
    m.impl("matvec", &matvec_meta);
    m.impl("matvec_blocked", &matvec_blocked_meta);
    m.impl("matvec_blocked_int8", &matvec_blocked_int8_meta);
    m.impl("matvec_blocked_q4", &matvec_blocked_q4_meta);
    m.impl("greedy_pick", &greedy_pick_meta);
    m.impl("decode_attention", &decode_attention_meta);
    m.impl("decode_layers", &decode_layers_meta);
}
